"""Measuring: seconds per image of each kind of network call, timed on this device with randomly
initialised networks of the configured architectures (CIFAR-10: google/ddpm-cifar10-32's
UNet2DModel and the WRN-28-10; digits: the configured digits UNet and small CNN), and the UNet calls
of each family's own network (``families.networks``: DDPM++, EDM's SongUNet) apart."""

from __future__ import annotations

import sys
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


#: seconds the timing of a CPU estimate aims at when no batch is given (:func:`cpu_batch_size`)
CPU_TARGET_SECONDS = 60.0


def cpu_batch_size(per_image_train: float, n_calls: int, largest: int, target: float = CPU_TARGET_SECONDS) -> int:
    """The batch that makes ``n_calls`` timed calls take about ``target`` seconds on a CPU, given the
    seconds per image of the costliest call (a UNet training pass, probed on a small batch), between 1
    and ``largest`` (the jobs' own batch).  Per-image cost is what the estimate extrapolates, and on a
    CPU it is flat in the batch once the batch fills the cores, so a smaller batch answers sooner at
    the same per-image cost."""
    if not per_image_train > 0:
        return int(largest)
    return int(max(1, min(int(largest), target / (n_calls * per_image_train))))


def measure_unit_costs(cfg: dict, device=None, batch_size: int | None = None, repeats: int = 3,
                       threads: int | None = 1, target_seconds: float = CPU_TARGET_SECONDS,
                       progress: bool = True) -> dict[str, Any]:
    """Seconds per image of each call kind on ``device``, measured (best of ``repeats`` after a
    warm-up) on random inputs with randomly initialised networks of the configured architectures,
    at ``batch_size`` images per call.  Without ``batch_size``: the jobs' own batch
    (:func:`default_batch_size`) on a GPU; on a CPU the batch that lets the whole timing take about
    ``target_seconds`` (:func:`cpu_batch_size`, from one probe of the costliest call), at most the
    jobs' batch.  On a CPU the calls run on ``threads`` torch threads (default 1, as the DAG's
    compute rules are declared with ``threads: 1``; None keeps torch's setting), so the estimate is
    in core-hours there.  ``progress``: a tqdm bar on stderr naming each call it times."""
    import torch
    from tqdm.auto import tqdm

    from ..runtime import resolve_device

    device = resolve_device(cfg.get("device", "auto")) if device is None else torch.device(device)
    unet, clf, unet_name, clf_name = _build_networks(cfg)
    unet, clf = unet.to(device), clf.to(device)
    shape = image_shape(cfg)
    nets = Experiment.from_config(cfg).networks  # the families' own networks (issue 18)
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
    n_calls = (6 + 2 * len(nets)) * (repeats + 1)  # every timed call, warm-ups included
    chosen = "given"
    if batch_size:
        B = int(batch_size)
    elif device.type == "cpu":
        probe = min(4, default_batch_size(cfg))
        xp = torch.randn(probe, *shape, generator=torch.Generator().manual_seed(1)).to(device)
        tp = torch.randint(0, 100, (probe,), generator=torch.Generator().manual_seed(1)).to(device)
        unet.train()
        t0 = clock()
        unet(xp, tp).sample.square().mean().backward()
        unet.zero_grad(set_to_none=True)
        B = cpu_batch_size((clock() - t0) / probe, n_calls, default_batch_size(cfg), target_seconds)
        chosen = f"CPU: about {target_seconds:.0f} s of timing (probe: {probe} images)"
    else:
        B = default_batch_size(cfg)
        chosen = "the jobs' batch"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, *shape, generator=g).to(device)
    x01 = torch.rand(B, *shape, generator=g).to(device)
    t = torch.randint(0, 100, (B,), generator=g).to(device)
    y = torch.randint(0, 10, (B,), generator=g).to(device)

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

    def mode(train):
        unet.train(train), clf.train(train)
        frozen(unet, train), frozen(clf, train)

    tasks = [("unet_fwd", unet_fwd, False), ("unet_grad", unet_grad, False), ("clf_fwd", clf_fwd, False),
             ("clf_grad", clf_grad, False), ("unet_train", unet_train, True), ("clf_train", clf_train, True)]
    out: dict[str, Any] = {"networks": {}}
    what = {"unet": unet_name, "clf": clf_name}
    bar = tqdm(total=len(tasks) + 2 * len(nets), desc="timing network calls", unit="kind", disable=not progress,
               file=sys.stderr)
    bar.write(f"estimate-cost: timing each kind of network call, {repeats} repeats after a warm-up, at "
              f"{B} images per call ({chosen}), on {device.type} with {threads} thread(s)", file=sys.stderr)
    for name, fn, train in tasks:
        bar.set_postfix_str(f"{name}: {what[name.split('_')[0]]}")
        mode(train)
        out[name] = _time(fn, repeats, sync, clock) / B
        bar.update()
    mode(False)
    for name, sec in nets.items():
        net = frozen_network(network_class(name).from_config(sec.get("config") or {}).to(device))
        sigma = torch.full((B,), 0.5, device=device)
        label = f"{name} ({sum(p.numel() for p in net.parameters()):,} parameters)"
        bar.set_postfix_str(f"unet_fwd: {label}")
        fwd = _time(lambda: net_fwd(net, x, sigma), repeats, sync, clock) / B
        bar.update()
        bar.set_postfix_str(f"unet_grad: {label}")
        grad = _time(lambda: net_grad(net, x, sigma), repeats, sync, clock) / B
        bar.update()
        out["networks"][name] = {"unet_fwd": fwd, "unet_grad": grad,
                                 "unet_train": out["unet_train"],  # no ADDT on these networks yet: never used
                                 "name": label}
        del net
    bar.close()
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
    out["meta"] = dict(device=dev, batch_size=B, batch_choice=chosen, repeats=repeats, unet=unet_name, classifier=clf_name,
                       torch=torch.__version__, clock=clock_name, load_average=load)
    return out
