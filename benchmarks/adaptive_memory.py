"""The ``adaptive`` comparison of the benchmark suite (``benchmarks/run.py --only adaptive``), the compass's P9:
time and peak memory of ONE iteration (EOT 1) of DiffAttack and DiffHammer on the paper-size UNet
(google/ddpm-cifar10-32's architecture, 35.7M parameters) before the WRN-28-10, both with random weights (cost
does not depend on the weights' values), through K = 101 reverse steps (t* = 0.1 of the 1000-step schedule,
``num_inference_steps`` 1000 as config/cifar10.yaml), in ``grad_mode`` budget and autograd, at batch 2 and 4,
extrapolated per image to batch 32 beside DiffBreak's stated >= 32 GB GPU; the target is <= 8 GiB at batch 32
in budget mode.  ``--quick``: the digits UNet and small CNN, K = 3 and 6 fitted, K = 11.

One iteration:
- DiffAttack: ``DiffAttack.loss_and_grad(x, y, ids, draws)`` with its deviation loss on the chain states
  (``purify_states``), config/cifar10.yaml's DiffAttack settings (the keys its constructor takes), one draw;
- DiffHammer: ``DiffHammer.per_draw(x, y, ids, draws)`` with K = 1 draw (its E-step adds no network call).

Measured in a fresh child process per (attack, grad_mode, batch, K), the first iteration (``run.run_child``):
- ``cpu_seconds``: the process's CPU time, torch on ``THREADS`` thread: on a machine shared with other jobs the
  wall time (``seconds``; ``load1`` the 1-minute load average at its start) measures the load as much as the
  iteration (2 threads' barriers wait for cores other jobs hold), the CPU time of one thread much less so;
  ``cpu_seconds_per_image`` = cpu_seconds / batch;
- ``peak_mib``: growth of the process's peak resident set (Linux VmHWM, reset right before the iteration, as
  ``run.peak_reset``; torch's CPU allocations are invisible to tracemalloc): everything the iteration allocates;
- ``saved_mib``: the most bytes autograd held for backward at once (``saved_tensors_hooks``, ``run.count_saved``;
  the frozen weights, saved by reference, count 0).

Plain autograd at K = 101 keeps ~50 MiB per image and step (~20 GiB at batch 4, more than this shared 24 GB
machine may spend) and a K = 101 iteration takes minutes on 2 cores, so every (attack, mode, batch) is measured at
K in ``FIT_KS`` and fitted by a line in K (one network call per step: autograd keeps every step's activations,
the budget mode a fixed number of steps and one chain state per step), evaluated at K = 101 (``status``
extrapolated).  The budget mode, whose memory is flat in K, is also measured at K = 101 at ``DIRECT_BATCHES``
(``status`` measured), a check of the line.
The budget is ``BUDGET_MIB_PER_IMAGE`` x batch MiB (``activation_budget_mb`` is per purifier call), so per image it
is the same at every batch.  To batch 32: ``gib_at_batch32`` = peak / batch x 32 (the fixed part of the peak
counted per image too: an upper estimate, the pass/fail figure) and ``gib_at_batch32_fit`` = the line through the
batches at 32.  A (attack, mode) that this build refuses (today DiffAttack's chain states in budget mode) is one
row with ``status`` "not supported by this build" and the error.
"""

from __future__ import annotations

import inspect
from pathlib import Path

ATTACKS = ("diffattack", "diffhammer")
MODES = ("budget", "autograd")
BATCHES = (2, 4)
FULL_K = 101  #: t* = 0.1 of the 1000-step schedule, every step
FIT_KS = (6, 11, 21)  #: chain lengths of t* = 0.1 on a schedule grid (K - 1 divides 100)
DIRECT_BATCHES = (2,)  #: the batches whose budget-mode iteration is also measured at the full K
BUDGET_MIB_PER_IMAGE = 128.0  #: 4 GiB per call at batch 32: half the target; keeps 2 steps of the paper-size UNet
THREADS = 1  #: on a shared machine one thread's CPU time is the load-independent measure (see below)
TARGET_GIB = 8.0  #: P9: one budget-mode iteration at batch 32
DIFFBREAK_GB = 32.0  #: DiffBreak (arXiv 2411.16598) code: one sample at a time, needs a >= 32 GB GPU
UNSUPPORTED = "not supported by this build"
FAILED = "failed"  #: a child process that crashed (its error in ``error``): the comparison goes on
DONE = ("measured", "extrapolated")
MEMORY_MEASURE = "peak RSS growth (VmHWM) in a fresh child process; saved_mib: saved_tensors_hooks"
MIB, GIB = 2**20, 2**30


def grid(q: bool) -> dict:
    """The comparison's sizes: the paper-size networks, or (quick) the digits ones at tiny K."""
    if q:
        return dict(model="digits", batches=BATCHES, fit_ks=(3, 6), full_k=11, direct_batches=DIRECT_BATCHES,
                    budget_mib_per_image=0.5)
    return dict(model="cifar", batches=BATCHES, fit_ks=FIT_KS, full_k=FULL_K, direct_batches=DIRECT_BATCHES,
                budget_mib_per_image=BUDGET_MIB_PER_IMAGE)


def build_iteration(h, attack: str, mode: str, model: str, batch: int, k: int, budget_mib_per_image: float):
    """(iteration, purifier, defended model, inputs) of one attack iteration on a ``k``-step chain;
    ``h`` is the ``run`` module (model builders, chain length, gradient-mode labels)."""
    import torch

    from dbprepro.attacks import attack_class, settings_randomness
    from dbprepro.config import load_configs
    from dbprepro.models.classifiers import build_classifier
    from dbprepro.purifiers import DefendedClassifier, Purifier

    unet, sch, shape = h.build_model(model)
    torch.manual_seed(1)
    clf = build_classifier("wrn-28-10") if model == "cifar" else build_classifier(
        "small_cnn", in_channels=shape[0], image_size=shape[1])
    p = Purifier(unet, sch, t_star=0.1, num_inference_steps=h.chain_inference_steps(k),
                 randomness=settings_randomness("whitebox_eot", 0))
    assert p.num_steps == k, (p.num_steps, k)
    h.set_grad_mode(p, f"budget:{budget_mib_per_image * batch:.6g}" if mode == "budget" else mode)
    net = DefendedClassifier(clf, p)
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(3))
    ids = torch.arange(batch)
    cfg = load_configs([h.ROOT / "config.yaml", h.ROOT / "config" / "cifar10.yaml"])["attacks"]
    threat = dict(eps=8 / 255, alpha=2 / 255)
    cls = attack_class(attack)
    if attack == "diffattack":
        a = cls(net, "whitebox_eot", "linf", steps=1, eot=1, **threat,
                **constructor_kwargs(cls, cfg["diffattack"]))
        draws = a.draws(0, 0)
        return (lambda: a.loss_and_grad(x, y, ids, draws)), p, net, (x, ids, draws)
    if attack == "diffhammer":
        a = cls(net, "whitebox_eot", "linf", steps=1, draws=1, **threat,
                **constructor_kwargs(cls, cfg["diffhammer"]))
        draws = a.draws(0, 0)
        return (lambda: a.per_draw(x, y, ids, draws)[:2]), p, net, (x, ids, draws)  # (losses, gradients)
    raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")


#: the sizes and schedule of one iteration are the benchmark's, not the config's
_NOT_FROM_CONFIG = {"model", "setting", "norm", "eps", "alpha", "steps", "eot", "draws", "restarts", "track",
                    "random_start", "eot_chunk"}


def constructor_kwargs(cls, section: dict) -> dict:
    """The keys of an attack's config ``section`` that its constructor takes (its loss settings)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in section.items() if k in params and k not in _NOT_FROM_CONFIG}


def child_adaptive(h, attack: str, mode: str, model: str, batch: int, k: int, budget_mib_per_image: float,
                   threads: int = THREADS) -> dict:
    """Time, peak memory and saved bytes of one iteration, in this (fresh) process."""
    import os
    import time

    import torch

    torch.set_num_threads(threads)
    step, p, net, (x, ids, draws) = build_iteration(h, attack, mode, model, batch, k, budget_mib_per_image)
    load1 = os.getloadavg()[0]
    rss0 = h.rss_bytes()
    h.peak_reset()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with h.count_saved(p, net) as live:
            _, grad = step()
    except ValueError as e:  # a combination this build refuses (e.g. chain states in budget mode)
        if "grad_mode" not in str(e):  # any other error is a bug of the benchmark or the build, not a refusal
            raise
        return dict(status=UNSUPPORTED, error=str(e))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = h.peak_bytes(rss0)
    assert torch.isfinite(grad).all()
    xd = x.repeat_interleave(draws.numel(), dim=0)
    idd, dd = ids.repeat_interleave(draws.numel()), draws.repeat(batch)
    with torch.no_grad():  # after the measured window: cached per shape, so free for the budget mode
        x_t = p.diffuse(xd, idd, dd)
    step_bytes = p.step_activation_bytes(x_t, idd, dd)
    kept = p.budget_kept_steps(x_t, idd, dd) if mode == "budget" else (k if mode == "autograd" else 0)
    return dict(status="measured", seconds=seconds, cpu_seconds=cpu_seconds, load1=load1, peak_bytes=peak,
                saved_bytes=live["peak"], step_saved_bytes=step_bytes, kept_steps=kept, threads=threads)


def bench_adaptive(h, q: bool, out: Path) -> tuple[list[dict], list[dict]]:
    """Rows (``adaptive_memory.csv``, ``adaptive_memory.md``) and targets of the comparison."""
    g = grid(q)
    raw = []
    for attack in ATTACKS:
        for mode in MODES:
            for batch in g["batches"]:
                direct = mode == "budget" and batch in g["direct_batches"]
                ks = list(g["fit_ks"]) + ([g["full_k"]] if direct else [])
                for k in ks:
                    try:
                        res = h.run_child("adaptive", attack=attack, mode=mode, model=g["model"], batch=batch, k=k,
                                          budget_mib_per_image=g["budget_mib_per_image"])
                    except RuntimeError as e:
                        res = dict(status=FAILED, error=str(e)[-1500:])
                    raw.append(dict(attack=attack, grad_mode=mode, batch=batch, K=k, **res))
                    print(f"  adaptive {attack} {mode} batch {batch} K={k}: " + (
                        f"{res['cpu_seconds']:.1f} CPU s ({res['seconds']:.1f} s wall), {res['peak_bytes'] / MIB:.0f} MiB peak"
                        if res["status"] == "measured" else res["status"]), flush=True)
                    if res["status"] != "measured":
                        break
                if raw[-1]["status"] != "measured":
                    break
    df = table(raw, g)
    df.to_csv(out / "adaptive_memory.csv", index=False)
    (out / "adaptive_memory.md").write_text(markdown(df, g["full_k"]) + "\n")
    return df.to_dict("records"), targets(df, g)


def table(raw: list[dict], g: dict):
    """Every measured iteration plus, per (attack, mode, batch), the row at K = ``full_k`` (measured, or
    the line through the measured K), with the per-image figures at batch 32 and the target."""
    import numpy as np
    import pandas as pd

    full_k = g["full_k"]
    rows = []
    for (attack, mode), d in pd.DataFrame(raw).groupby(["attack", "grad_mode"], sort=False):
        if (d.status != "measured").any():
            bad = d[d.status != "measured"].iloc[0]
            rows.append(dict(attack=attack, grad_mode=mode, status=bad.status, error=bad.error))
            continue
        for batch, db in d.groupby("batch"):
            db = db.sort_values("K")
            rows += [dict(r, fit_ks="") for r in db.to_dict("records")]
            if full_k in set(db.K):
                continue
            fit = {c: np.polyfit(db.K, db[c], 1) for c in ("seconds", "cpu_seconds", "peak_bytes", "saved_bytes")}
            last = db.iloc[-1].to_dict()
            rows.append(dict(last, K=full_k, status="extrapolated", fit_ks="/".join(map(str, db.K)),
                             kept_steps=full_k if mode == "autograd" else last["kept_steps"],
                             **{c: float(np.polyval(f, full_k)) for c, f in fit.items()}))
    df = pd.DataFrame(rows)
    measured = df.status.isin(["measured", "extrapolated"])
    df["budget_mib"] = np.where(measured & (df.grad_mode == "budget"), df.batch * g["budget_mib_per_image"], np.nan)
    df["cpu_seconds_per_image"] = df.cpu_seconds / df.batch
    df["peak_mib"], df["saved_mib"] = df.peak_bytes / MIB, df.saved_bytes / MIB
    df["mib_per_image"] = df.peak_mib / df.batch
    df["gib_at_batch32"] = df.mib_per_image * 32 / 1024
    df["gib_at_batch32_fit"] = np.nan
    for _, d in df[measured].groupby(["attack", "grad_mode", "K"]):
        if d.batch.nunique() > 1:
            slope, icpt = np.polyfit(d.batch, d.peak_mib, 1)
            df.loc[d.index, "gib_at_batch32_fit"] = (icpt + 32 * slope) / 1024
    df["diffbreak_stated_gb"] = DIFFBREAK_GB
    df["target_gib"] = np.where(df.grad_mode == "budget", TARGET_GIB, np.nan)
    df["meets_target"] = [("yes" if v <= TARGET_GIB else "no") if m == "budget" and s in DONE else
                          ("no" if m == "budget" else "")
                          for m, s, v in zip(df.grad_mode, df.status, df.gib_at_batch32)]
    df["memory_measure"] = MEMORY_MEASURE
    df["model"] = g["model"]
    first = ["attack", "grad_mode", "batch", "K", "status", "fit_ks", "budget_mib", "kept_steps", "seconds",
             "cpu_seconds", "cpu_seconds_per_image", "peak_mib", "saved_mib", "mib_per_image", "gib_at_batch32",
             "gib_at_batch32_fit", "diffbreak_stated_gb", "target_gib", "meets_target"]
    return df[[c for c in first if c in df] + [c for c in df if c not in first]]


def markdown(df, full_k: int) -> str:
    """The K = ``full_k`` rows (and the refused combinations) as the markdown table of docs/performance.md (wall
    seconds shown for measured rows only: a line through wall times on a shared machine extrapolates the load)."""
    txt = lambda v: "" if v is None or v != v else str(v)  # noqa: E731 - a CSV's empty cells read back as NaN
    d = df[(df.K == full_k) | ~df.status.isin(DONE)]
    lines = ["| attack | grad_mode | batch | K = %d | budget (MiB) | kept steps | CPU s / iteration (wall s) | "
             "CPU s / image | peak MiB | MiB / image | GiB at batch 32 (per image; line) | DiffBreak stated | "
             "<= %g GiB |" % (full_k, TARGET_GIB), "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d.to_dict("records"):
        if r["status"] not in DONE:
            lines.append(f"| {r['attack']} | {r['grad_mode']} | - | {r['status']} | | | | | | | | "
                         f">= {DIFFBREAK_GB:g} GB | {txt(r['meets_target']) or '-'} |")
            continue
        fit = r["gib_at_batch32_fit"]
        lines.append(" | ".join([
            f"| {r['attack']}", r["grad_mode"], str(int(r["batch"])),
            r["status"] + (f" (K = {txt(r['fit_ks'])})" if txt(r["fit_ks"]) else ""),
            "-" if r["grad_mode"] != "budget" else f"{r['budget_mib']:.4g}", str(int(r["kept_steps"])),
            f"{r['cpu_seconds']:.1f}" + (f" ({r['seconds']:.0f})" if r["status"] == "measured" else ""),
            f"{r['cpu_seconds_per_image']:.1f}", f"{r['peak_mib']:.0f}", f"{r['mib_per_image']:.0f}",
            f"{r['gib_at_batch32']:.2f}; " + ("-" if fit != fit else f"{fit:.2f}"),
            f">= {DIFFBREAK_GB:g} GB", txt(r["meets_target"]) or "-"]) + " |")
    return "\n".join(lines)


def targets(df, g: dict) -> list[dict]:
    """P9 per attack: a budget-mode iteration at K = full_k fits the target at batch 32."""
    out = []
    for attack in ATTACKS:
        d = df[(df.attack == attack) & (df.grad_mode == "budget")]
        name = (f"{attack}: one budget-mode iteration (EOT 1, K={g['full_k']}, {g['model']}) "
                f"<= {TARGET_GIB:g} GiB at batch 32")
        if d.empty or not d.status.isin(DONE).all():
            out.append(dict(comparison="adaptive", target=name, met=False,
                            measured="not run" if d.empty else d.status[~d.status.isin(DONE)].iloc[0],
                            why=(d.error.iloc[0] if not d.empty and "error" in d else "not run")))
            continue
        d = d[d.K == g["full_k"]]
        worst = d.loc[d.gib_at_batch32.idxmax()]
        out.append(dict(comparison="adaptive", target=name,
                        measured=f"{worst.gib_at_batch32:.2f} GiB (peak per image at batch {int(worst.batch)} x 32; "
                                 f"DiffBreak: >= {DIFFBREAK_GB:g} GB)", met=bool(d.gib_at_batch32.max() <= TARGET_GIB)))
    return out


if __name__ == "__main__":  # the markdown table of a written CSV: python benchmarks/adaptive_memory.py <csv>
    import sys

    import pandas as pd

    _df = pd.read_csv(sys.argv[1] if len(sys.argv) > 1 else "results/benchmarks/suite/adaptive_memory.csv")
    print(markdown(_df, int(_df.K.max())))
