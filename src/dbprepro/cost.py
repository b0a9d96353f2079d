"""Cost estimate of a configuration: network calls counted per job, seconds per call measured.

Two separate parts:

* :func:`count_calls` (pure, torch-free, unit-tested against hand counts) walks the jobs the DAG
  of a validated config runs and counts, per job, the network calls per image kind:

  ============== ===============================================================================
  ``unet_fwd``    UNet forward without autograd graph (a purification step, the forward pass of
                  the exact gradient)
  ``unet_grad``   UNet forward with graph + backward to the input, weights frozen (one recomputed
                  step of the exact gradient, a CGPO iteration)
  ``unet_train``  UNet forward + backward with weight gradients (a training step's pass)
  ``clf_fwd``     classifier forward
  ``clf_grad``    classifier forward + backward to the input (weights frozen)
  ``clf_train``   classifier forward + backward with weight gradients
  ============== ===============================================================================

  all in *images* (a batch of 64 is 64 calls).  The purification chain has ``S`` UNet steps
  (the timesteps <= t* of ``set_timesteps(num_inference_steps)``: 101 for t*=0.1 and 1000);
  a defended forward is ``S unet_fwd + 1 clf_fwd``; its exact gradient (``grad_mode`` exact or
  checkpoint) is the forward chain, then per step a recomputation + backward:
  ``S unet_fwd + S unet_grad + 1 clf_grad`` (``autograd``: ``S unet_grad + 1 clf_grad``).

* :func:`measure_unit_costs` times each kind of call on the current device with randomly
  initialised networks of the configured architectures (CIFAR-10: google/ddpm-cifar10-32's
  UNet2DModel and the WRN-28-10; digits: the configured digits UNet and small CNN).

:func:`estimate` multiplies the two into device-hours per job.  AutoAttack rows are upper
bounds (every image goes through every sub-attack; AutoAttack stops attacking an image once it
is broken).  Not counted: data preparation, downloads, tables and figures (seconds), the RBGM
figure (a few CGPO calls) and optimiser/scheduler arithmetic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .config import (addt_settings, analysis_threat, attack_runs, defense_attacks, defense_purification, family_defenses,
                     own_addt_defenses)

KINDS = ("unet_fwd", "unet_grad", "unet_train", "clf_fwd", "clf_grad", "clf_train")
DIGITS_IMAGES = 1797  # scikit-learn's digits


@dataclass
class Calls:
    """Network calls (in images) of one kind each."""

    unet_fwd: float = 0.0
    unet_grad: float = 0.0
    unet_train: float = 0.0
    clf_fwd: float = 0.0
    clf_grad: float = 0.0
    clf_train: float = 0.0

    def __add__(self, other: "Calls") -> "Calls":
        return Calls(**{k: getattr(self, k) + getattr(other, k) for k in KINDS})

    def __mul__(self, n: float) -> "Calls":
        return Calls(**{k: getattr(self, k) * n for k in KINDS})

    __rmul__ = __mul__

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in KINDS}


@dataclass
class Job:
    """One job (or a group of identical jobs) of the DAG and the calls it makes."""

    job: str                 # rule/wildcards, e.g. attack/vanilla/linf/whitebox_eot/pgd
    target: str              # the table or figure it is mainly for
    calls: Calls
    note: str = ""
    upper_bound: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- building blocks

def chain_length(t_star: float, num_inference_steps: int, num_train_timesteps: int = 1000) -> int:
    """Reverse steps of the purification chain: the timesteps <= round(t* T) of DDPM's
    ``set_timesteps(n)`` grid (every T // n), as :class:`dbprepro.purification.Purifier` uses."""
    T, n = int(num_train_timesteps), int(num_inference_steps)
    t_start = min(int(round(float(t_star) * T)), T - 1)
    step = T // n
    return sum(1 for i in range(n) if i * step <= t_start)


def network_calls(purification: dict, num_train_timesteps: int = 1000) -> int:
    """UNet calls of one purification for the configured sampler family: the DDPM/DDIM chain
    length; VP-SDE ``steps`` (twice with the Langevin corrector); EDM Heun 2 ``steps`` - 1 (the
    last step to sigma = 0 is an Euler step).  Tested against each purifier's own count."""
    sampler = purification.get("sampler", "ddpm")
    if sampler == "vpsde":
        vp = purification["vpsde"]
        return int(vp["steps"]) * (2 if vp["corrector"] else 1)
    if sampler == "edm":
        return 2 * int(purification["edm"]["steps"]) - 1
    return chain_length(purification["t_star"], purification["num_inference_steps"], num_train_timesteps)


def purify(S: int) -> Calls:
    return Calls(unet_fwd=S)


def defended_forward(S: int) -> Calls:
    return Calls(unet_fwd=S, clf_fwd=1)


def purify_grad(S: int, grad_mode: str = "exact") -> Calls:
    """Gradient of the purified image w.r.t. the input (a vector-Jacobian product)."""
    if grad_mode == "autograd":
        return Calls(unet_grad=S)
    return Calls(unet_fwd=S, unet_grad=S)  # exact / checkpoint: forward chain, then recompute + backward


def defended_grad(S: int, grad_mode: str = "exact") -> Calls:
    return purify_grad(S, grad_mode) + Calls(clf_grad=1)


def bpda_grad(S: int) -> Calls:
    """BPDA: the chain runs forward only, the backward pass skips it (identity)."""
    return Calls(unet_fwd=S, clf_grad=1)


def _attack_calls(cfg: dict, defense: str, setting: str, attack: str, S: int, grad_mode: str) -> tuple[Calls, bool]:
    """Calls per attacked image of one run (and whether the count is an upper bound)."""
    att = cfg["attacks"]
    pgd = att["pgd"]
    fixed = setting.startswith("dwbox")
    evaluation = defended_forward(S) * (1 if fixed else att["eval_draws"])
    if defense == "undefended":  # torchattacks PGD on the classifier + 3 evaluation forwards
        return Calls(clf_grad=pgd["steps"], clf_fwd=3), False
    if attack in ("pgd", "bpda"):
        K = pgd["eot"] if setting == "whitebox_eot" else 1
        grad = defended_grad(S, grad_mode) if attack == "pgd" else bpda_grad(S)
        # steps + 1 passes per restart: the last one measures the final iterate's loss
        return grad * (pgd["restarts"] * (pgd["steps"] + 1) * K) + evaluation, False
    aa = att["autoattack"]
    R, n_eval = aa["n_restarts"], (1 if fixed else aa["n_eval"])
    select = defended_forward(S) * n_eval  # multi-evaluation after each sub-attack
    g = defended_grad(S, grad_mode)
    if attack == "aa_standard":
        T = aa["n_target_classes"]
        apgd_ce = g * (R * (aa["apgd_steps"] + 1))
        apgd_t = g * (T * R * (aa["apgd_steps"] + 1))
        fab_t = (g + defended_forward(S)) * (T * R * aa["fab_steps"])
        square = defended_forward(S) * aa["square_queries"]
        return apgd_ce + apgd_t + fab_t + square + select * 4 + evaluation, True
    if attack == "aa_rand":
        E = aa["eot_iter"]
        apgd = g * (R * (aa["apgd_steps"] + 1) * E)
        return apgd * 2 + select * 2 + evaluation, True
    raise ValueError(f"unknown attack {attack!r}")


def addt_step_calls(variant: str, cgpo_iterations: int) -> Calls:
    """Calls per training image of one ADDT step: CGPO / PGD iterations (UNet and classifier
    forward+backward to the perturbation; MSE variant without the classifier), then one training
    pass; clean fine-tuning is the training pass alone."""
    K = int(cgpo_iterations)
    if variant == "clean_finetune":
        return Calls(unet_train=1)
    if variant == "cgpo_mse":
        return Calls(unet_grad=K, unet_train=1)
    if variant in ("addt", "addt_no_rbgm"):
        return Calls(unet_grad=K, clf_grad=K, unet_train=1)
    raise ValueError(f"unknown ADDT variant {variant!r}")


def image_shape(cfg: dict) -> tuple[int, int, int]:
    return (3, 32, 32) if cfg["data"]["dataset"] == "cifar10" else (1, 8, 8)


def n_train_images(cfg: dict) -> int:
    if cfg["data"]["dataset"] == "cifar10":
        return 50_000
    return DIGITS_IMAGES - int(DIGITS_IMAGES * cfg["data"]["test_fraction"])


# ------------------------------------------------------------------------------- the counting

def count_calls(cfg: dict) -> list[Job]:
    """Every compute-heavy job of the DAG of the validated config ``cfg`` with its network calls."""
    pur, sch = cfg["purification"], cfg["diffusion"]["schedule"]
    S = network_calls(pur, sch["num_train_timesteps"])
    gm = pur.get("grad_mode", "exact")
    variants = cfg["addt"]["variants"] if cfg["addt"]["enabled"] else []
    defenses = ["vanilla", *variants]
    jobs: list[Job] = []

    # base models trained by the DAG (source train)
    if cfg["classifier"]["source"] == "train":
        tr = cfg["classifier"]["train"]
        jobs.append(Job("train_classifier", "models", Calls(clf_train=tr["epochs"] * n_train_images(cfg)),
                        note=f"{tr['epochs']} epochs x {n_train_images(cfg)} images"))
    if cfg["diffusion"]["source"] == "train":
        tr = cfg["diffusion"]["train"]
        jobs.append(Job("train_diffusion", "models", Calls(unet_train=tr["steps"] * tr["batch_size"]),
                        note=f"{tr['steps']} steps x batch {tr['batch_size']}"))

    # ADDT fine-tuning
    a = cfg["addt"]
    for v in variants:
        per = addt_step_calls(v, a["cgpo_iterations"])
        jobs.append(Job(f"train_addt/{v}", "tables/addt_training.csv", per * (a["steps"] * a["batch_size"]),
                        note=f"{a['steps']} steps x batch {a['batch_size']}"))
    for d in own_addt_defenses(cfg):  # a family's own ADDT loss: the same passes per step as addt
        per = addt_step_calls("addt", a["cgpo_iterations"])
        jobs.append(Job(f"train_addt/{d}", "tables/p1_table_families.csv", per * (a["steps"] * a["batch_size"]),
                        note=f"{a['steps']} steps x batch {a['batch_size']}"))
    fam = family_defenses(cfg)

    def chain(d: str) -> int:  # network calls of one purification by defense d's sampler
        return network_calls(defense_purification(cfg, d), sch["num_train_timesteps"])

    # clean evaluation
    ev, n_test = cfg["evaluation"], cfg["data"]["n_test"]
    for d in [*defenses, *fam]:
        per = Calls(clf_fwd=1) + defended_forward(chain(d)) * (ev["random_draws"] + ev["fixed_configs"])
        jobs.append(Job(f"evaluate_clean/{d}", "tables/clean_accuracy.csv", per * n_test,
                        note=f"{n_test} images x ({ev['random_draws']} random + {ev['fixed_configs']} fixed)"))

    # attacks
    n_att = cfg["attacks"]["n_images"]
    for d, tm, s, atk in attack_runs(cfg, fixed_configs=True):
        per, bound = _attack_calls(cfg, d, s, atk, chain(d) if d != "undefended" else S, gm)
        n_d = defense_attacks(cfg, d)["n_images"]
        if d in fam:
            target = "tables/p1_table_families.csv"
        elif d in variants:
            target = "tables/p1_table_ablation.csv"
        elif s.startswith("dwbox_c"):
            target = "tables/p2_table_fixed_randomness.csv"
        else:
            target = "tables/p1_table_main.csv"
        jobs.append(Job(f"attack/{d}/{tm}/{s}/{atk}", target, per * n_d, upper_bound=bound,
                        note=f"{n_d} images" + (" (upper bound: every image through every sub-attack)"
                                                  if bound else "")))

    # paper 1 loss landscapes
    att = cfg["attacks"]
    if att["track_images"] > 0:
        ls = att["landscape"]
        m = min(ls["n_images"], att["track_images"])
        for d in ["vanilla"] + (["addt"] if "addt" in variants else []):
            jobs.append(Job(f"loss_landscape/{d}", "figures/p1_fig2_loss_landscape.png",
                            defended_forward(S) * (m * ls["grid"] ** 2), note=f"{m} images x {ls['grid']}^2 grid"))

    # paper 2
    an = cfg["analysis"]
    if an["enabled"]:
        n_a = an["n_images"] if an["n_images"] is not None else n_att
        dist = an["distances"]
        jobs.append(Job("p2_lp_distances", "tables/p2_lp_distances.csv",
                        purify(S) * (n_a * 2 * (dist["draws"] + dist["chain_draws"])),
                        note=f"{n_a} images x 2 x ({dist['draws']} draws + {dist['chain_draws']} chains)"))
        M = an["randomness"]["samples"]
        jobs.append(Job("p2_randomness", "tables/p2_randomness.csv", purify(S) * (n_a * 2 * M),
                        note=f"{n_a} images x 2 x {M} samples"))
        comp = an["compression"]
        D = 1
        for s_ in image_shape(cfg):
            D *= s_
        p2_threat = analysis_threat(cfg)
        addt_dw = [v for v in variants if p2_threat in a["attack_threat_models"] and "dwbox" in addt_settings(cfg, v)]
        for d in ["vanilla", *addt_dw]:
            n_cfg = an["fixed_configs"] if d == "vanilla" else 1
            per_img = purify(S) * (comp["probes"] + 1) + defended_forward(S)
            jac = purify_grad(S, gm) * (min(comp["jacobian_images"], n_a) * D)
            jobs.append(Job(f"p2_compression/{d}", "tables/p2_compression.csv", per_img * (n_cfg * n_a) + jac,
                            note=f"{n_cfg} configs x {n_a} images x ({comp['probes']} probes + 2); "
                                 f"Jacobian {min(comp['jacobian_images'], n_a)} x {D} rows"))
    for j in jobs:
        j.extra["chain_steps"] = S
    return jobs


# ------------------------------------------------------------------------------- measuring

def _build_networks(cfg: dict):
    """Randomly initialised UNet and classifier of the configured architectures (no download)."""
    from .models.classifiers import build_classifier

    c, h, _ = image_shape(cfg)
    if cfg["diffusion"]["source"] == "download" and cfg["diffusion"]["download"]["repo_id"] == "google/ddpm-cifar10-32":
        from .models.hub_configs import build_ddpm_cifar10_32_unet

        unet, unet_name = build_ddpm_cifar10_32_unet(), "google/ddpm-cifar10-32 UNet2DModel (35.7M)"
    elif cfg["diffusion"]["source"] == "download":
        raise ValueError(f"no known architecture for {cfg['diffusion']['download']['repo_id']}; "
                         "add it to dbprepro.models.hub_configs")
    else:
        from .models.diffusion import build_unet

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

    from .runtime import resolve_device

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


# ------------------------------------------------------------------------------- the estimate

def estimate(jobs: list[Job], unit: dict[str, float]):
    """A DataFrame: one row per job with its calls and device-hours, then a ``TOTAL`` row."""
    import pandas as pd

    rows = []
    for j in jobs:
        c = j.calls.as_dict()
        seconds = sum(c[k] * float(unit[k]) for k in KINDS)
        rows.append({"job": j.job, "target": j.target, **{f"calls_{k}": c[k] for k in KINDS},
                     "device_hours": seconds / 3600.0, "upper_bound": j.upper_bound, "note": j.note})
    df = pd.DataFrame(rows)
    total = {"job": "TOTAL", "target": "all", **{f"calls_{k}": df[f"calls_{k}"].sum() for k in KINDS},
             "device_hours": df["device_hours"].sum(), "upper_bound": bool(df["upper_bound"].any()),
             "note": "sum of the rows"}
    return pd.concat([df, pd.DataFrame([total])], ignore_index=True)


def by_target(df):
    """Device-hours summed per target (the table or figure each job mainly feeds)."""
    body = df[df["job"] != "TOTAL"]
    return body.groupby("target", sort=False)["device_hours"].sum().reset_index()


def format_report(df, unit: dict[str, Any], config_name: str) -> str:
    meta = unit["meta"]
    lines = [f"dbprepro cost estimate for config {config_name!r}",
             f"measured on {meta['device']} (torch {meta['torch']}, batch {meta['batch_size']}, "
             f"best of {meta['repeats']}; {meta['clock']}; load average {meta['load_average']:.1f})",
             f"  UNet: {meta['unet']}", f"  classifier: {meta['classifier']}",
             f"  purification chain: {int(df.attrs.get('chain_steps', 0)) or '?'} UNet steps per purification",
             "seconds per image: " + ", ".join(f"{k} {unit[k]:.3g}" for k in KINDS),
             "GPU throughput differs: run this command on the node that will run the DAG.", ""]
    w = max(len(j) for j in df["job"])
    lines.append(f"{'job':<{w}}  {'device-hours':>12}  {'UNet calls':>12}  note")
    for _, r in df.iterrows():
        unet_calls = r["calls_unet_fwd"] + r["calls_unet_grad"] + r["calls_unet_train"]
        mark = " (upper bound)" if r["upper_bound"] and r["job"] != "TOTAL" else ""
        lines.append(f"{r['job']:<{w}}  {r['device_hours']:>12.2f}  {unet_calls:>12.3g}  {r['note']}{mark}")
    lines += ["", "per target:"]
    for _, r in by_target(df).iterrows():
        lines.append(f"  {r['target']:<44} {r['device_hours']:>12.2f} h")
    return "\n".join(lines)


def run_estimate(cfg: dict, device=None, batch_size: int | None = None, repeats: int = 3, csv: str | None = None,
                 threads: int | None = 1) -> str:
    """Count, measure, combine; optionally write the per-job CSV. Returns the printed report."""
    jobs = count_calls(cfg)
    unit = measure_unit_costs(cfg, device=device, batch_size=batch_size, repeats=repeats, threads=threads)
    df = estimate(jobs, unit)
    df.attrs["chain_steps"] = jobs[0].extra["chain_steps"] if jobs else 0
    if csv:
        from pathlib import Path

        out = df.copy()
        out["measured_on"] = unit["meta"]["device"]
        for k in KINDS:
            out[f"seconds_per_{k}"] = unit[k]
        Path(csv).parent.mkdir(parents=True, exist_ok=True)
        out.to_csv(csv, index=False)
    return format_report(df, unit, cfg.get("name", "?"))
