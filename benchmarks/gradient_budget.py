"""The ``budget`` comparison of the benchmark suite (``benchmarks/run.py --only budget``):
``grad_mode: budget`` at three activation budgets between the ``exact`` and ``autograd`` modes,
beside those two, on the paper-size UNet at K = 101 (``--quick``: the digits UNet at K = 11).

The budgets keep about 1/4, 1/2 and 3/4 of the chain's steps: ``fraction x K x`` one step's
saved bytes (measured as the mode measures it, :meth:`~dbprepro.purifiers.ReverseChain.step_activation_bytes`).
Time: the five contenders interleaved in one process (:func:`run.time_gradient_modes`); peak memory
and live saved-activation bytes: one fresh child process each (:func:`run.child_gradient`), as the
``gradients`` comparison does.  The helpers come from ``run.py``, passed in as ``h`` (this module
does not import it: ``run.py`` is the script that imports this one).
"""

from __future__ import annotations

import os
from pathlib import Path

#: fractions of the chain's steps whose activations the three budgets hold
FRACTIONS = (0.25, 0.5, 0.75)


def budget_cases(q: bool) -> tuple[str, int, int]:
    """(model, batch, K): the paper-size UNet at K = 101 (batch 1, ~1 min per gradient on one CPU
    core), or in quick mode the digits UNet at K = 11."""
    return ("digits", 8, 11) if q else ("cifar", 1, 101)


def bench_budget(h, q: bool, out: Path) -> tuple[list[dict], list[dict]]:
    """Rows (``budget.csv``) and targets of the comparison; ``h`` is the ``run`` module."""
    import numpy as np
    import pandas as pd
    import torch

    from dbprepro.purifiers.base import MIB

    model, batch, k = budget_cases(q)
    torch.set_num_threads(1)
    p, step = h.gradient_problem(model, k, batch)
    draws = p.randomness.next_draws(step.ids)
    x_t = p.diffuse(step.x, step.ids, draws)
    per_step = p.step_activation_bytes(x_t, step.ids, draws)
    budgets = [f * k * per_step / MIB for f in FRACTIONS]
    modes = ["exact", *[f"budget:{b:.6g}" for b in budgets], "autograd"]
    kept = {"exact": 0, "autograd": k}
    for m in modes[1:-1]:
        h.set_grad_mode(p, m)
        kept[m] = p.budget_kept_steps(x_t, step.ids, draws)
    del p, step
    secs = h.time_gradient_modes(model, k, batch, reps=1, modes=modes)
    rows, grads = [], {}
    for m in modes:
        gf = str(out / f"_grad_budget_{model}_{k}_{len(rows)}.npy")
        res = h.run_child("gradient", model=model, k=k, mode=m, batch=batch, grad_file=gf)
        grads[m] = np.load(gf)
        os.remove(gf)
        rows.append(dict(model=model, batch=batch, steps=k, mode=m.split(":")[0],
                         budget_mb=float(m.split(":")[1]) if ":" in m else None, kept_steps=kept[m],
                         step_saved_bytes=per_step, seconds=secs[m], **res))
    scale = max(float(np.abs(grads["exact"]).max()), 1e-30)
    for row, m in zip(rows, modes):
        row["max_abs_grad_diff_vs_exact"] = float(np.abs(grads[m] - grads["exact"]).max())
        row["grad_scale"] = scale
    df = pd.DataFrame(rows)
    df.to_csv(out / "budget.csv", index=False)
    print(f"  budget {model} K={k}: " + ", ".join(
        f"{r['mode']}{'' if r['budget_mb'] is None else ' %.0fMiB' % r['budget_mb']} ({r['kept_steps']} kept) "
        f"{r['seconds']:.2f}s {r['peak_bytes'] / 2**20:.0f}MiB" for r in rows), flush=True)
    return rows, targets(df, model, k)


def targets(df, model: str, k: int) -> list[dict]:
    """The comparison's targets: the budget mode's memory between exact's and autograd's, growing
    with the budget and within it; its time between theirs; its gradient exact's."""
    peak, saved, secs = list(df.peak_bytes), list(df.saved_bytes), list(df.seconds)
    bud = df[df["mode"] == "budget"]
    exact_saved = int(df.saved_bytes.iloc[0])
    within = all(s <= exact_saved + b * 2**20 for s, b in zip(bud.saved_bytes, bud.budget_mb))
    diff = float(df.max_abs_grad_diff_vs_exact.max() / df.grad_scale.iloc[0])
    name = f"{model} K={k}"
    mib = " / ".join(f"{v / 2**20:.0f}" for v in peak)
    return [
        dict(comparison="budget", target=f"{name}: budget-mode saved activations <= exact's + the budget",
             measured=" / ".join(f"{(s - exact_saved) / 2**20:.0f} of {b:.0f} MiB"
                                 for s, b in zip(bud.saved_bytes, bud.budget_mb)), met=bool(within)),
        dict(comparison="budget", target=f"{name}: peak memory grows with the budget, from exact's to autograd's",
             measured=f"{mib} MiB (exact, 3 budgets, autograd)",
             met=bool(all(a <= b * 1.02 for a, b in zip(peak, peak[1:])) and
                      all(a <= b for a, b in zip(saved, saved[1:])))),
        dict(comparison="budget", target=f"{name}: budget-mode time between autograd's and exact's",
             measured=" / ".join(f"{s:.2f}" for s in secs) + " s (exact, 3 budgets, autograd)",
             met=bool(all(secs[-1] * 0.95 <= s <= secs[0] * 1.05 for s in secs[1:-1])),
             why="timed once per contender on a shared machine: expect noise of a few per cent"),
        dict(comparison="budget", target=f"{name}: budget-mode gradients equal exact's",
             measured=f"max relative difference {diff:.1e}", met=bool(diff <= 1e-4)),
    ]
