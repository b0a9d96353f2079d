"""Measuring: seconds per image of each kind of network call, timed on this device with randomly
initialised networks of the configured architectures (CIFAR-10: google/ddpm-cifar10-32's
UNet2DModel and the WRN-28-10; digits: the configured digits UNet and small CNN), and the UNet calls
of each family's own network (``families.networks``: DDPM++, EDM's SongUNet) apart."""

from __future__ import annotations

import time
from typing import Any

from ..config import Experiment
from ..models.networks import network_class
from .count import image_shape


def _build_networks(cfg: dict):
    """Randomly initialised UNet and classifier of the configured architectures (no download)."""
    from ..models.classifiers import build_classifier

    c, h, _ = image_shape(cfg)
    if cfg["diffusion"]["source"] == "download" and cfg["diffusion"]["download"]["repo_id"] == "google/ddpm-cifar10-32":
        from ..models.hub_configs import build_ddpm_cifar10_32_unet

        unet, unet_name = build_ddpm_cifar10_32_unet(), "google/ddpm-cifar10-32 UNet2DModel (35.7M)"
    elif cfg["diffusion"]["source"] == "download":
        raise ValueError(f"no known architecture for {cfg['diffusion']['download']['repo_id']}; "
                         "add it to dbprepro.models.hub_configs")
    else:
        from ..models.diffusion import build_unet

        u = cfg["diffusion"]["unet"]
        unet = build_unet(h, c, u["block_out_channels"], layers_per_block=u["layers_per_block"],
                          attention=u["attention"], norm_num_groups=u["norm_num_groups"], dropout=u["dropout"])
        unet_name = f"digits UNet2DModel {u['block_out_channels']}"
    clf_cfg = cfg["classifier"]
    kwargs = dict(clf_cfg.get("kwargs", {}))
    if clf_cfg["arch"] == "small_cnn":
        kwargs.setdefault("in_channels", c)
        kwargs.setdefault("image_size", h)
    clf = build_classifier(clf_cfg["arch"], **kwargs)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return unet, clf, f"{unet_name}, {n(unet):,} parameters", f"{clf_cfg['arch']}, {n(clf):,} parameters"


def _time(fn, repeats: int, sync, clock) -> float:
    fn()  # warm-up (allocations, kernel selection)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        sync()
        best = min(best, clock() - t0)
    return best


def frozen_network(net):
    """``net`` in eval mode without parameter gradients (as a purifier holds it)."""
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def net_fwd(net, x, sigma) -> None:
    """One timed forward of a family's own network (its ``eps``, as the purifiers call it)."""
    import torch

    with torch.no_grad():
        net.eps(x, sigma)


def net_grad(net, x, sigma) -> None:
    """One timed input gradient through a family's own network."""
    import torch

    xi = x.detach().requires_grad_(True)
    torch.autograd.grad(net.eps(xi, sigma).square().sum(), xi)


def default_batch_size(cfg: dict) -> int:
    """The batch of the dominant calls (an attack's EOT pass: images x EOT samples, at most
    ``eot_chunk``): small networks cost mostly per call, not per image, so they must be timed
    at the batch the jobs use."""
    att = cfg["attacks"]
    return int(max(1, min(att["batch_size"] * att["pgd"]["eot"], att["pgd"].get("eot_chunk", 4096))))


def measure_unit_costs(cfg: dict, device=None, batch_size: int | None = None, repeats: int = 3,
                       threads: int | None = 1) -> dict[str, Any]:
    """Seconds per image of each call kind on ``device``, measured (best of ``repeats`` after a
    warm-up) on random inputs with randomly initialised networks of the configured architectures,
    at ``batch_size`` images per call (default :func:`default_batch_size`).  On a CPU the calls
    run on ``threads`` torch threads (default 1, as the DAG's compute rules are declared with
    ``threads: 1``; None keeps torch's setting), so the estimate is in core-hours there."""
    import torch

    from ..runtime import resolve_device

    device = resolve_device(cfg.get("device", "auto")) if device is None else torch.device(device)
    unet, clf, unet_name, clf_name = _build_networks(cfg)
    unet, clf = unet.to(device), clf.to(device)
    shape = image_shape(cfg)
    B = int(batch_size or default_batch_size(cfg))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, *shape, generator=g).to(device)
    x01 = torch.rand(B, *shape, generator=g).to(device)
    t = torch.randint(0, 100, (B,), generator=g).to(device)
    y = torch.randint(0, 10, (B,), generator=g).to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    old_threads = torch.get_num_threads()
    if device.type == "cpu" and threads:
        torch.set_num_threads(int(threads))
    threads = torch.get_num_threads()
    if device.type == "cuda":
        clock, clock_name = time.perf_counter, "wall-clock time"
    else:
        # a shared CPU inflates wall-clock time; this process's CPU time / its threads is what the
        # call costs on the cores it gets (assumes the threads scale, as they do for these models)
        def clock():
            return time.process_time() / threads
        clock_name = f"process CPU time / {threads} threads (robust to other load; wall time would include it)"

    def frozen(m, flag):
        for p in m.parameters():
            p.requires_grad_(flag)

    def unet_fwd():
        with torch.no_grad():
            unet(x, t).sample

    def unet_grad():
        xi = x.detach().requires_grad_(True)
        (gx,) = torch.autograd.grad(unet(xi, t).sample.square().sum(), xi)

    def unet_train():
        unet.zero_grad(set_to_none=True)
        unet(x, t).sample.square().mean().backward()

    def clf_fwd():
        with torch.no_grad():
            clf(x01)

    def clf_grad():
        xi = x01.detach().requires_grad_(True)
        (gx,) = torch.autograd.grad(torch.nn.functional.cross_entropy(clf(xi), y), xi)

    def clf_train():
        clf.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(clf(x01), y).backward()

    out: dict[str, Any] = {}
    unet.eval(), clf.eval()
    frozen(unet, False), frozen(clf, False)
    out["unet_fwd"] = _time(unet_fwd, repeats, sync, clock) / B
    out["unet_grad"] = _time(unet_grad, repeats, sync, clock) / B
    out["clf_fwd"] = _time(clf_fwd, repeats, sync, clock) / B
    out["clf_grad"] = _time(clf_grad, repeats, sync, clock) / B
    unet.train(), clf.train()
    frozen(unet, True), frozen(clf, True)
    out["unet_train"] = _time(unet_train, repeats, sync, clock) / B
    out["clf_train"] = _time(clf_train, repeats, sync, clock) / B
    out["networks"] = {}
    for name, sec in Experiment.from_config(cfg).networks.items():  # the families' own networks (issue 18)
        net = frozen_network(network_class(name).from_config(sec.get("config") or {}).to(device))
        sigma = torch.full((B,), 0.5, device=device)
        out["networks"][name] = {
            "unet_fwd": _time(lambda: net_fwd(net, x, sigma), repeats, sync, clock) / B,
            "unet_grad": _time(lambda: net_grad(net, x, sigma), repeats, sync, clock) / B,
            "unet_train": out["unet_train"],  # no ADDT on these networks yet: never used
            "name": f"{name} ({sum(p.numel() for p in net.parameters()):,} parameters)"}
        del net
    torch.set_num_threads(old_threads)
    if device.type == "cuda":
        dev = f"cuda: {torch.cuda.get_device_name(device)}"
    else:
        import platform

        dev = f"cpu: {platform.processor() or platform.machine()}, {threads} threads"
    try:
        import os

        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # pragma: no cover - not on every platform
        load = float("nan")
    out["meta"] = dict(device=dev, batch_size=B, repeats=repeats, unet=unet_name, classifier=clf_name,
                       torch=torch.__version__, clock=clock_name, load_average=load)
    return out
