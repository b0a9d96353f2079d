"""dbprepro's benchmark suite: every performance claim of the package, measured side by side.

    .venv/bin/python benchmarks/run.py                 # the full suite (~30 min on 2 CPU cores; +15 with --dag default)
    .venv/bin/python benchmarks/run.py --quick         # seconds-long smoke of every comparison (CI)
    .venv/bin/python benchmarks/run.py --only gradients,overhead
    .venv/bin/python benchmarks/run.py --only budget   # grad_mode budget at 3 budgets (benchmarks/gradient_budget.py)
    .venv/bin/python benchmarks/run.py --only adaptive # DiffAttack / DiffHammer iteration at paper scale (adaptive_memory.py)
    .venv/bin/python benchmarks/run.py --only checkpoint # EDM's pickle through the safe reader vs torch.load (checkpoint_load.py)
    .venv/bin/python benchmarks/run.py --dag smoke     # also time a cold DAG run (smoke or default)
    .venv/bin/python benchmarks/run.py --only dag-profile                  # cold default DAG, then where its time went
    .venv/bin/python benchmarks/run.py --only dag-profile --profile-dir D  # the same for a finished run in D

Writes ``results/benchmarks/suite/<comparison>.csv`` and ``results/benchmarks/suite/summary.md`` (each target,
the measured figure, met or not) plus ``scaling.png``.  Not a pass/fail test: the numbers are
measurements of this machine, medians over repetitions.  Within one comparison the contenders run
interleaved in the same process (time) or in fresh child processes of the same script (peak
memory), so their ratios hold on a loaded machine even where the absolute seconds do not.

Peak memory on the CPU is the growth of the process's peak resident set (Linux ``VmHWM``, reset
through ``/proc/self/clear_refs`` right before the measured call) in a fresh child process, so
the allocator's cache of an earlier contender cannot hide or inflate it; on a GPU it is
``torch.cuda.max_memory_allocated``.  The bytes autograd saves for the backward pass are counted
exactly as well (``torch.autograd.graph.saved_tensors_hooks``).

Models: the embedded default's digits UNet (trained weights of a finished run if
``--models`` points at one, else random weights of the same architecture) and a paper-size UNet
with ``google/ddpm-cifar10-32``'s architecture and random weights (cost does not depend on the
weights' values).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPARISONS = ("gradients", "budget", "adaptive", "randomness", "eot", "overhead", "scaling", "dag", "cost",
               "checkpoint", "dag-profile")


# --------------------------------------------------------------------------- shared pieces
def build_model(name: str, seed: int = 0):
    """(unet, scheduler, image shape) of a benchmark model."""
    import torch

    from dbprepro.models.diffusion import build_scheduler, build_unet

    torch.manual_seed(seed)
    if name == "digits":
        return build_unet(8, 1, [16, 32], attention=[False, False], norm_num_groups=8), build_scheduler(), (1, 8, 8)
    if name == "cifar":
        from dbprepro.models.hub_configs import build_ddpm_cifar10_32_unet

        return build_ddpm_cifar10_32_unet(), build_scheduler(), (3, 32, 32)
    raise ValueError(f"unknown model {name!r}")


def chain_inference_steps(k: int, t_star: float = 0.1, T: int = 1000) -> int:
    """num_inference_steps whose chain below t* has ``k`` reverse steps (k = n t* + 1)."""
    n = round((k - 1) / t_star)
    if not 1 <= n <= T:
        raise ValueError(f"no schedule gives {k} steps at t*={t_star}")
    return n


def peak_reset() -> None:
    """Start a new peak-memory window (CPU: Linux VmHWM; GPU: CUDA's peak counter)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_bytes(rss_before: int) -> int:
    """Peak memory of the window opened by :func:`peak_reset`, above ``rss_before``."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return max(0, _status_kb("VmHWM") * 1024 - rss_before)


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def run_child(kind: str, **kwargs) -> dict:
    """Run one measurement in a fresh interpreter (clean allocator, clean peak)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child-args", json.dumps(kwargs)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"child {kind} {kwargs} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# --------------------------------------------------------------------------- children
def gradient_problem(model: str, k: int, batch: int, mode: str = "exact"):
    """(purifier, step) for d(sum w * purified)/dx through a ``k``-step chain."""
    import torch

    from dbprepro.purifiers import Purifier
    from dbprepro.randomness import Randomness

    unet, sch, shape = build_model(model)
    p = Purifier(unet, sch, t_star=0.1, num_inference_steps=chain_inference_steps(k),
                 randomness=Randomness(0, "fixed"))
    set_grad_mode(p, mode)
    assert p.num_steps == k, (p.num_steps, k)
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(1))
    w = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(2))  # a generic upstream gradient
    ids = torch.arange(batch)

    def step():
        xi = x.clone().requires_grad_(True)
        (p(xi, ids) * w).sum().backward()
        return xi.grad

    step.x, step.ids = x, ids  # the problem's input, for callers that inspect the purifier on it
    return p, step


def set_grad_mode(p, mode: str) -> None:
    """Set a purifier's gradient mode from a benchmark label: a grad_mode, or ``budget:<MiB>``."""
    if mode.startswith("budget:"):
        p.grad_mode, p.activation_budget_mb = "budget", float(mode.split(":", 1)[1])
    else:
        p.grad_mode = mode


@contextlib.contextmanager
def count_saved(*modules):
    """Count the bytes autograd saves for backward passes inside the block, while autograd holds
    them (freed with their graph): yields ``{"now", "peak"}``, ``peak`` the most alive at once.
    Tensors sharing a storage of ``modules``' weights (frozen, saved by reference) count 0."""
    import torch

    from dbprepro.purifiers.base import frozen_storages, saved_nbytes

    live = {"now": 0, "peak": 0}
    frozen = frozen_storages(*modules)

    class Saved:  # a saved tensor, counted while autograd holds it
        def __init__(self, t):
            self.t, self.n = t, saved_nbytes(t, frozen)
            live["now"] += self.n
            live["peak"] = max(live["peak"], live["now"])

        def __del__(self):
            live["now"] -= self.n

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda s: s.t):
        yield live


def child_gradient(model: str, k: int, mode: str, batch: int, grad_file: str) -> dict:
    """Peak memory and live saved-activation bytes of one gradient, in a fresh process."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    p, step = gradient_problem(model, k, batch, mode)
    # the first call is the measured one (a warm-up would leave allocator caches behind)
    rss0 = rss_bytes()
    peak_reset()
    with count_saved(p) as live:
        g = step()
    peak = peak_bytes(rss0)
    np.save(grad_file, g.numpy())
    return {"peak_bytes": peak, "saved_bytes": live["peak"]}


def time_gradient_modes(model: str, k: int, batch: int, reps: int, modes=("exact", "autograd", "checkpoint")
                        ) -> dict[str, float]:
    """Median seconds per gradient of each mode, the modes interleaved in this process so that a
    change of the machine's load hits them alike."""
    import torch

    torch.set_num_threads(1)
    p, step = gradient_problem(model, k, batch)
    times: dict[str, list[float]] = {m: [] for m in modes}
    if reps > 1:  # warm-up (skipped for the slow paper-size cases, where it is negligible)
        for m in modes:
            set_grad_mode(p, m)
            step()
    for _ in range(reps):
        for m in modes:
            set_grad_mode(p, m)
            times[m].append(median_time(step, 1))
    return {m: statistics.median(v) for m, v in times.items()}


def child_noise(approach: str, T: int, B: int, shape: list[int], steps: int) -> dict:
    """Peak memory of fixing the randomness of a batch: a stored [T, B, C, H, W] tensor (paper 1's
    official code) vs dbprepro's replayable noise, regenerated one step at a time."""
    import torch

    from dbprepro.randomness import Randomness, Stream

    torch.set_num_threads(1)
    ids = torch.arange(B)
    draws = torch.zeros(B, dtype=torch.long)
    r = Randomness(0, "fixed")
    # one small draw first: Randomness imports diffusers' randn_tensor on first use, and the peak below
    # is meant to count the noise, not a library import (as when the import happened with the module)
    r.normal(ids[:1], draws[:1], Stream.FORWARD, 0, shape)
    rss0 = rss_bytes()
    peak_reset()
    t0 = time.perf_counter()
    if approach == "stored":
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(T, B, *shape, generator=g)  # kept for the whole attack
        checksum = float(noise[:steps].sum())
    else:
        checksum = 0.0
        for t in range(steps):  # what one purification (and its backward pass) asks for
            checksum += float(r.normal(ids, draws, Stream.REVERSE, t, shape).sum())
    seconds = time.perf_counter() - t0
    return {"peak_bytes": peak_bytes(rss0), "seconds": seconds, "checksum": checksum}


CHILDREN = {"gradient": child_gradient, "noise": child_noise,
            "adaptive": lambda **kw: __import__("adaptive_memory").child_adaptive(sys.modules[__name__], **kw)}


# --------------------------------------------------------------------------- comparisons
def bench_gradients(q: bool, out: Path) -> tuple[list[dict], list[dict]]:
    import numpy as np
    import pandas as pd

    # (model, batch, chain lengths, timing repetitions): the paper-size UNet takes ~1 min per
    # gradient at K = 101 on one CPU core, so it is timed once per mode (interleaved)
    cases = [("digits", 8 if q else 32, [11] if q else [11, 51, 101], 1 if q else 3)]
    if not q:
        cases.append(("cifar", 1, [11, 101], 1))
    rows = []
    for model, batch, ks, reps in cases:
        for k in ks:
            grads = {}
            secs = time_gradient_modes(model, k, batch, reps=reps)
            for mode in ("exact", "autograd", "checkpoint"):
                gf = str(out / f"_grad_{model}_{k}_{mode}.npy")
                res = run_child("gradient", model=model, k=k, mode=mode, batch=batch, grad_file=gf)
                grads[mode] = np.load(gf)
                os.remove(gf)
                rows.append(dict(model=model, batch=batch, steps=k, mode=mode, seconds=secs[mode], **res))
            for row in rows[-3:]:
                row["max_abs_grad_diff_vs_autograd"] = float(np.abs(grads[row["mode"]] - grads["autograd"]).max())
                row["grad_scale"] = float(np.abs(grads["autograd"]).max())
            print(f"  gradients {model} K={k}: " + ", ".join(
                f"{r['mode']} {r['seconds']:.2f}s {r['peak_bytes'] / 2**20:.0f}MiB" for r in rows[-3:]), flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "gradients.csv", index=False)
    targets = []
    for model in df.model.unique():
        d = df[df.model == model]
        kmax = d.steps.max()
        at = d[d.steps == kmax].set_index("mode")
        mem_ratio = at.loc["exact", "peak_bytes"] / at.loc["autograd", "peak_bytes"]
        time_ratio = at.loc["exact", "seconds"] / at.loc["autograd", "seconds"]
        diff = d.max_abs_grad_diff_vs_autograd.max() / max(d.grad_scale.max(), 1e-30)
        targets += [
            dict(comparison="gradients", target=f"{model}: exact peak memory at K={kmax} <= 0.15x plain autograd",
                 measured=f"{mem_ratio:.3f}x ({at.loc['exact', 'peak_bytes'] / 2**20:.0f} vs "
                          f"{at.loc['autograd', 'peak_bytes'] / 2**20:.0f} MiB)", met=bool(mem_ratio <= 0.15)),
            dict(comparison="gradients", target=f"{model}: exact peak memory at K={kmax} <= per-call checkpoint's",
                 measured=f"{at.loc['exact', 'peak_bytes'] / 2**20:.0f} vs "
                          f"{at.loc['checkpoint', 'peak_bytes'] / 2**20:.0f} MiB",
                 met=bool(at.loc["exact", "peak_bytes"] <= at.loc["checkpoint", "peak_bytes"] * 1.02)),
            dict(comparison="gradients", target=f"{model}: exact time at K={kmax} <= 1.4x plain autograd",
                 measured=f"{time_ratio:.2f}x", met=bool(time_ratio <= 1.4),
                 why="the purifier's weights are frozen, so a backward pass computes input gradients only (B ~ F) and "
                     "recomputing every forward costs (2F + B) / (F + B) ~ 1.5x; on a small UNet Python overhead "
                     "adds to that. Meeting 1.4x would need keeping >= 20 % of the steps' activations, more memory "
                     "than the 0.15x target allows"),
            dict(comparison="gradients", target=f"{model}: gradients equal across the three modes",
                 measured=f"max relative difference {diff:.1e}", met=bool(diff <= 1e-4)),
        ]
    return rows, targets


def bench_randomness(q: bool, out: Path) -> tuple[list[dict], list[dict]]:
    import pandas as pd

    T, B, shape = (1000, 256, [3, 32, 32]) if not q else (100, 16, [3, 32, 32])
    rows = []
    for approach, steps in (("stored", 101), ("replayable", 101)):
        res = run_child("noise", approach=approach, T=T, B=B, shape=shape, steps=steps)
        rows.append(dict(approach=approach, T=T, B=B, shape="x".join(map(str, shape)), steps_used=steps, **res))
    df = pd.DataFrame(rows).set_index("approach")
    df.reset_index().to_csv(out / "randomness.csv", index=False)
    ratio = df.loc["replayable", "peak_bytes"] / df.loc["stored", "peak_bytes"]
    print(f"  randomness: stored {df.loc['stored', 'peak_bytes'] / 2**20:.0f} MiB, replayable "
          f"{df.loc['replayable', 'peak_bytes'] / 2**20:.1f} MiB", flush=True)
    return rows, [dict(comparison="randomness",
                       target=f"replayable fixed randomness <= 1% of a stored [{T},{B},{','.join(map(str, shape))}] tensor",
                       measured=f"{100 * ratio:.2f}% ({df.loc['replayable', 'peak_bytes'] / 2**20:.1f} vs "
                                f"{df.loc['stored', 'peak_bytes'] / 2**20:.0f} MiB peak)", met=bool(ratio <= 0.01))]


def bench_eot(q: bool, out: Path, models: Path) -> tuple[list[dict], list[dict]]:
    import pandas as pd
    import torch
    import torchattacks

    from dbprepro.attacks import PGD, settings_randomness
    from dbprepro.models.classifiers import SmallCNN, load_classifier
    from dbprepro.models.diffusion import load_diffusion
    from dbprepro.purifiers import DefendedClassifier, Purifier

    torch.set_num_threads(1)
    if (models / "diffusion" / "vanilla").exists():
        unet, sch = load_diffusion(models / "diffusion" / "vanilla")
        clf, source = load_classifier(models / "classifier"), str(models)
    else:
        unet, sch, _ = build_model("digits")
        clf, source = SmallCNN(), "random weights"
    n, eot, reps = (8, 4, 1) if q else (32, 10, 5)
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(1))
    ids = torch.arange(n)
    model = DefendedClassifier(clf, Purifier(unet, sch, 0.1, 100, randomness=settings_randomness("whitebox_eot", 0)))
    ours = PGD(model, "whitebox_eot", "linf", 0.2, 0.05, steps=1, eot=eot)
    ta = torchattacks.EOTPGD(model, eps=0.2, alpha=0.05, steps=1, eot_iter=eot, random_start=False)
    t_ours, t_ta = [], []
    for _ in range(reps):  # interleaved
        t = time.perf_counter()
        _, grad = ours.loss_and_grad(x, y, ids, ours.draws(0, 0))
        t_ours.append(time.perf_counter() - t)
        model.purifier.randomness.reset()  # torchattacks' K calls then use draws 0..K-1, as ours
        t = time.perf_counter()
        with model.bind(ids=ids):
            adv_ta = ta(x, y)
        t_ta.append(time.perf_counter() - t)
    diff = float(((x + 0.05 * grad.sign()).clamp(0, 1) - adv_ta).abs().max())
    row = dict(models=source, images=n, eot=eot, reps=reps, batched_seconds=statistics.median(t_ours),
               sequential_seconds=statistics.median(t_ta), max_abs_adv_diff=diff)
    row["speedup"] = row["sequential_seconds"] / row["batched_seconds"]
    pd.DataFrame([row]).to_csv(out / "eot.csv", index=False)
    print(f"  eot: batched {row['batched_seconds']:.2f}s vs sequential {row['sequential_seconds']:.2f}s", flush=True)
    return [row], [
        dict(comparison="eot", target=f"batched EOT >= 1.5x faster than torchattacks' EOTPGD (K={eot})",
             measured=f"{row['speedup']:.2f}x", met=bool(row["speedup"] >= 1.5)),
        dict(comparison="eot", target="batched and sequential EOT give the same adversarial examples",
             measured=f"max |difference| {diff:.1e}", met=bool(diff <= 1e-6)),
    ]


def bench_overhead(q: bool, out: Path) -> tuple[list[dict], list[dict]]:
    """A full purification vs the bare UNet calls it contains (same inputs and timesteps)."""
    import pandas as pd
    import torch

    from dbprepro.purifiers import Purifier
    from dbprepro.randomness import Randomness

    torch.set_num_threads(1)
    rows, targets = [], []
    for model, batch in ([("digits", 32)] if q else [("digits", 128), ("cifar", 4)]):
        unet, sch, shape = build_model(model)
        p = Purifier(unet, sch, t_star=0.1, num_inference_steps=100, randomness=Randomness(0, "random"))
        x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0))
        ids = torch.arange(batch)
        xt = torch.randn(batch, *shape)
        ts = [torch.full((batch,), t, dtype=torch.long) for t in p.timesteps]

        @torch.inference_mode()
        def purify():
            p(x, ids)

        @torch.inference_mode()
        def bare():
            for t in ts:
                unet(xt, t)

        purify(), bare()  # warm-up
        reps = 2 if q else 7
        tp, tb = [], []
        for _ in range(reps):  # interleaved
            tp.append(median_time(purify, 1))
            tb.append(median_time(bare, 1))
        row = dict(model=model, batch=batch, unet_calls=p.num_steps, purify_seconds=statistics.median(tp),
                   bare_unet_seconds=statistics.median(tb))
        row["overhead"] = row["purify_seconds"] / row["bare_unet_seconds"]
        rows.append(row)
        print(f"  overhead {model}: {row['overhead']:.3f}x", flush=True)
        targets.append(dict(comparison="overhead", target=f"{model}: purification <= 1.10x its bare UNet calls",
                            measured=f"{row['overhead']:.3f}x", met=bool(row["overhead"] <= 1.10),
                            why="a fixed cost per step beside the UNet: the replayable per-image noise (one "
                                "generator per image) and the scheduler arithmetic, which weigh most next to a "
                                "small UNet"))
    pd.DataFrame(rows).to_csv(out / "overhead.csv", index=False)
    return rows, targets


def bench_scaling(q: bool, out: Path) -> tuple[list[dict], list[dict]]:
    """Purification and exact-gradient cost vs chain length and batch size (digits UNet)."""
    import numpy as np
    import pandas as pd

    ks = [6, 11] if q else [6, 11, 21, 51, 101]
    batches = [8] if q else [8, 32, 128]
    rows = []
    for k in ks:
        for b in batches:
            secs = time_gradient_modes("digits", k, b, reps=1 if q else 3, modes=("exact", "autograd"))
            for mode in ("exact", "autograd"):
                gf = str(out / "_grad_scaling.npy")
                res = run_child("gradient", model="digits", k=k, mode=mode, batch=b, grad_file=gf)
                os.remove(gf)
                rows.append(dict(mode=mode, steps=k, batch=b, seconds=secs[mode], **res))
    df = pd.DataFrame(rows)
    df.to_csv(out / "scaling.csv", index=False)
    plot_scaling(df, out / "scaling.png")
    ex = df[(df["mode"] == "exact") & (df.batch == max(batches))].sort_values("steps")
    slope, intercept = np.polyfit(ex.steps, ex.seconds, 1)
    resid = float(np.max(np.abs(ex.seconds - (slope * ex.steps + intercept)) / ex.seconds))
    grow = ex.peak_bytes.iloc[-1] / max(ex.peak_bytes.iloc[0], 1)
    sgrow = ex.saved_bytes.iloc[-1] / max(ex.saved_bytes.iloc[0], 1)
    per_step = ex.seconds / ex.steps
    print(f"  scaling: exact time linear within {100 * resid:.0f}%, memory x{grow:.2f} from K={ks[0]} to {ks[-1]}",
          flush=True)
    return rows, [
        dict(comparison="scaling", target="exact-gradient time linear in the number of steps",
             measured=f"largest deviation from a straight line {100 * resid:.0f}%", met=bool(resid <= 0.15),
             why=f"the relative residual is set by the shortest chain (K={ks[0]}), where the per-purification "
                 f"costs outside the steps weigh most; time per step {per_step.min():.3f}-{per_step.max():.3f} s "
                 f"across K"),
        dict(comparison="scaling", target="exact-gradient memory flat in the number of steps",
             measured=f"peak x{grow:.2f}, saved activations x{sgrow:.2f} from K={ks[0]} to K={ks[-1]}",
             met=bool(sgrow <= 1.05 and grow <= 1.5)),
    ]


def plot_scaling(df, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    d = df.assign(peak_mib=df.peak_bytes / 2**20, batch=df.batch.astype(str))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    sns.lineplot(d, x="steps", y="seconds", hue="batch", style="mode", markers=True, ax=axes[0])
    axes[0].set(xlabel="reverse steps K", ylabel="seconds per forward + backward", title="time: linear in K")
    sns.lineplot(d, x="steps", y="peak_mib", hue="batch", style="mode", markers=True, ax=axes[1])
    axes[1].set(xlabel="reverse steps K", ylabel="peak memory above baseline (MiB)",
                title="memory: flat in K for exact, growing for autograd")
    fig.suptitle("digits UNet, exact gradient of the purification (measured)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_dag(q: bool, out: Path, which: str | None, workdir: str | None = None) -> tuple[list[dict], list[dict]]:
    """Wall time of a cold DAG run in a fresh directory (``workdir``: one without results/ or
    .snakemake/, e.g. a fresh clone, whose results DVC can then record; default a new temporary
    directory), and per-rule times from its benchmark files."""
    import tempfile

    import pandas as pd

    if not which:
        return [], []
    configs = [str(ROOT / "config.yaml")] + ([str(ROOT / "config" / "smoke.yaml")] if which == "smoke" else [])
    if workdir:
        work = Path(workdir).resolve()
        stale = [d for d in ("results", ".snakemake") if (work / d).exists()]
        if stale:
            raise RuntimeError(f"--dag-workdir {work} is not cold: it has {', '.join(stale)}")
    else:
        work = Path(tempfile.mkdtemp(prefix=f"dbprepro-dag-{which}-"))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work),
           "--cores", "2", "--configfile", *configs]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"DAG run failed:\n{r.stderr[-3000:]}")
    rules = aggregate_rule_benchmarks(work / "results" / "benchmarks")
    rules.to_csv(out / f"dag_{which}_rules.csv", index=False)
    # job_seconds (the sum of the jobs' wall times) bounds the run from below: wall >= job_seconds / cores.
    # cpu_seconds is psutil's sampled CPU time of the job processes, an undercount for short jobs.
    row = dict(config=which, wall_seconds=wall, job_seconds=float(rules.s.sum()), cpu_seconds=float(rules.cpu_time.sum()),
               jobs=len(rules), workdir=str(work))
    pd.DataFrame([row]).to_csv(out / f"dag_{which}.csv", index=False)
    print(f"  dag {which}: {wall / 60:.1f} min wall", flush=True)
    budget = 15 * 60 if which == "default" else 10 * 60
    return [row], [dict(comparison="dag", target=f"cold {which} DAG on 2 cores <= {budget // 60} min",
                        measured=f"{wall / 60:.1f} min wall; its {len(rules)} compute jobs take "
                                 f"{row['job_seconds'] / 60:.1f} min of job time",
                        met=bool(wall <= budget),
                        why=f"the compute jobs alone need {row['job_seconds'] / 60:.1f} min of job time, at least "
                            f"{row['job_seconds'] / 120:.1f} min on 2 cores; dag_{which}_rules.csv lists them")]


def aggregate_rule_benchmarks(folder: Path):
    """One row per job from Snakemake's ``benchmark:`` TSV files below ``folder``."""
    import pandas as pd

    frames = []
    for f in sorted(folder.rglob("*.tsv")):
        d = pd.read_csv(f, sep="\t")
        d.insert(0, "job", str(f.relative_to(folder).with_suffix("")))
        frames.append(d)
    if not frames:
        return pd.DataFrame(columns=["job", "s", "cpu_time"])
    return pd.concat(frames, ignore_index=True).sort_values("s", ascending=False)


def bench_cost(q: bool, out: Path) -> tuple[list[dict], list[dict]]:
    """The paper-scale cost model (``dbprepro estimate-cost``): network calls counted per job of
    config/cifar10.yaml, seconds per call measured here with random networks of its architectures."""
    import pandas as pd

    from dbprepro.config import load_configs
    from dbprepro.cost import run_estimate

    cfg = load_configs([ROOT / "config.yaml", ROOT / "config" / "cifar10.yaml"])
    csv = out / "cost_cifar10.csv"
    # on a CPU the paper-size UNet is compute-bound (seconds per image flat in the batch size), and a
    # training step at the attacks' batch (32 x EOT 10 = 320) takes minutes: measure at 16 there
    import torch

    batch = 2 if q else (None if torch.cuda.is_available() else 16)
    print(run_estimate(cfg, batch_size=batch, repeats=1 if q else 3, csv=str(csv)), flush=True)
    df = pd.read_csv(csv)
    hours = float(df.loc[df.job == "TOTAL", "device_hours"].iloc[0])
    return df.to_dict("records"), [dict(comparison="cost", target="paper-scale cost estimate from measured per-call costs",
                                        measured=f"{hours:,.0f} device-hours on {df['measured_on'].iloc[0]} (see cost_cifar10.csv)",
                                        met=True)]


# --------------------------------------------------------------------------- driver
def write_summary(targets: list[dict], out: Path, args) -> None:
    import pandas as pd
    import torch

    lines = ["# dbprepro benchmark summary", "",
             f"Mode: {'quick (smoke of the suite, not the reference numbers)' if args.quick else 'full'}; "
             f"torch {torch.__version__}, {os.cpu_count()} CPU core(s), "
             f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}; "
             f"{time.strftime('%Y-%m-%d %H:%M')}.", ""]
    if targets:
        t = pd.DataFrame(targets)
        if "why" in t:  # the reason is shown for a missed target only
            t["why"] = [w if (isinstance(w, str) and not m) else "" for w, m in zip(t["why"], t["met"])]
        t["met"] = t["met"].map({True: "yes", False: "**no**"})
        lines.append(t.to_markdown(index=False))
    lines += ["", "CSV files beside this summary hold every measurement; `scaling.png` plots growth."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the suite runs, in seconds")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(COMPARISONS)}")
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "suite"))
    ap.add_argument("--models", default=str(ROOT / "results" / "models"), help="trained digits models, if any")
    ap.add_argument("--dag", choices=["smoke", "default"], help="also time a cold DAG run of this config")
    ap.add_argument("--dag-workdir", help="run the cold DAG there (no results/ or .snakemake/ yet) instead of a "
                                          "temporary directory")
    ap.add_argument("--profile-dir", help="dag-profile: profile this finished run (its .snakemake/log and "
                                          "results/provenance) instead of running the cold default")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-args", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](**json.loads(args.child_args))))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = [c for c in args.only.split(",") if c] or list(COMPARISONS)
    unknown = set(only) - set(COMPARISONS)
    if unknown:
        ap.error(f"unknown comparison(s) {sorted(unknown)}; choose from {COMPARISONS}")
    targets = []
    runners = {
        "gradients": lambda: bench_gradients(args.quick, out),
        "budget": lambda: __import__("gradient_budget").bench_budget(sys.modules[__name__], args.quick, out),
        "adaptive": lambda: __import__("adaptive_memory").bench_adaptive(sys.modules[__name__], args.quick, out),
        "randomness": lambda: bench_randomness(args.quick, out),
        "eot": lambda: bench_eot(args.quick, out, Path(args.models)),
        "overhead": lambda: bench_overhead(args.quick, out),
        "scaling": lambda: bench_scaling(args.quick, out),
        "dag": lambda: bench_dag(args.quick, out, args.dag, args.dag_workdir),
        "cost": lambda: bench_cost(args.quick, out),
        "checkpoint": lambda: __import__("checkpoint_load").bench_checkpoint(sys.modules[__name__], args.quick, out),
        "dag-profile": lambda: __import__("dag_profile").bench_dag_profile(sys.modules[__name__], args.quick, out,
                                                                           args.dag_workdir, args.profile_dir),
    }
    for name in only:
        print(f"[{name}]", flush=True)
        t = time.perf_counter()
        _, tg = runners[name]()
        targets += tg
        print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)
        write_summary(targets, out, args)  # after every comparison: an interrupted run keeps what it measured
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
