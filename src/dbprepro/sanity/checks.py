"""The battery's decisions: pure functions of per-image 0/1 arrays (1 = the image is still
classified correctly after the attack), each returning one :class:`Check` with a ``pass`` /
``flag`` outcome.

Every comparison is paired by image: ``estimate`` is the mean per-image difference *in the
direction that would reveal a weak evaluation* (a rise of robust accuracy with a larger budget, or
an attack that should be weaker leaving less), with a percentile bootstrap interval over images
(:func:`paired_excess`).  A paired comparison flags when the whole interval lies above 0
(:func:`beyond_ci`): a difference within the noise of the images passes.  The thresholds
(``max_final_accuracy``, the unbounded attack's 0 %) are compared with the point estimate.
The checks are those of Carlini et al. 2019 (arXiv 1902.06705, Sec. 5-6) and Tramer et al. 2020.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

PASS, FLAG = "pass", "flag"
#: the checks, in the table's order
CHECKS = ("eps_sweep", "iterations", "gradient_free", "transfer", "unbounded")


@dataclass(frozen=True)
class Check:
    """One row of the sanity table (before its defense / threat columns).

    ``value``: robust accuracy under the checked attack; ``reference``: what it is compared with;
    ``estimate`` / ``ci_low`` / ``ci_high``: the paired excess in the flagging direction and its
    interval (NaN for a threshold check); ``threshold``: the accuracy limit of a threshold check."""

    check: str
    compared: str
    setting: str
    n_images: int
    value: float
    reference: float
    estimate: float
    ci_low: float
    ci_high: float
    threshold: float
    outcome: str
    detail: str

    def row(self) -> dict:
        return asdict(self)


def _binary(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 1 or not np.isin(a, (0.0, 1.0)).all():
        raise ValueError("a check needs a 1-d array of 0/1 outcomes per image")
    return a


def paired_excess(a, b, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
                  ) -> tuple[float, float, float]:
    """mean(a - b) over images and its percentile bootstrap interval (images resampled with
    replacement, the pairs kept together)."""
    a, b = _binary(a), _binary(b)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired outcomes need equal, non-empty shapes, got {a.shape} and {b.shape}")
    d = a - b
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5A7E]))
    boot = d[rng.integers(0, d.size, size=(int(resamples), d.size))].mean(1)
    q = (1 - confidence) / 2
    return float(d.mean()), float(np.quantile(boot, q)), float(np.quantile(boot, 1 - q))


def beyond_ci(ci_low: float) -> bool:
    """A paired excess counts when its whole interval lies above 0."""
    return bool(ci_low > 0)


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def sweep_check(factors: Sequence[float], correct: Sequence, *, max_final_accuracy: float, setting: str = "",
                confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> Check:
    """epsilon sweep: robust accuracy at eps x ``factors`` (ascending; ``correct[i]`` the
    per-image outcomes at ``factors[i]``, the same images) must not rise from one factor to the next
    beyond the interval, and must be at most ``max_final_accuracy`` at the largest factor."""
    factors = [float(f) for f in factors]
    if len(factors) < 2 or sorted(factors) != factors or len(set(factors)) != len(factors):
        raise ValueError(f"the sweep needs at least 2 ascending distinct factors, got {factors}")
    rows = [_binary(c) for c in correct]
    if len(rows) != len(factors):
        raise ValueError(f"{len(factors)} factors but {len(rows)} outcome arrays")
    accs = [float(r.mean()) for r in rows]
    rises = [paired_excess(rows[i + 1], rows[i], confidence=confidence, resamples=resamples, seed=seed + i)
             for i in range(len(rows) - 1)]
    worst = max(range(len(rises)), key=lambda i: (rises[i][1], rises[i][0]))
    est, lo, hi = rises[worst]
    rising = [f"x{factors[i]:g} -> x{factors[i + 1]:g}" for i, r in enumerate(rises) if beyond_ci(r[1])]
    final_ok = accs[-1] <= max_final_accuracy
    outcome = PASS if final_ok and not rising else FLAG
    why = []
    if rising:
        why.append("accuracy rises " + ", ".join(rising))
    if not final_ok:
        why.append(f"accuracy {_fmt(accs[-1])} > {max_final_accuracy:g} at x{factors[-1]:g}")
    detail = "; ".join([", ".join(f"x{f:g}: {_fmt(a)}" for f, a in zip(factors, accs)),
                        f"largest rise x{factors[worst]:g} -> x{factors[worst + 1]:g}", *why])
    return Check("eps_sweep", f"PGD at eps x {factors[-1]:g} (largest rise between neighbours)", setting,
                 rows[0].size, accs[-1], accs[worst], est, lo, hi, float(max_final_accuracy), outcome, detail)


def iterations_check(default, longer, *, factor: int, setting: str = "", confidence: float = 0.95,
                     resamples: int = 2000, seed: int = 0) -> Check:
    """Iterations: PGD with ``factor`` x the steps must not leave more robust accuracy than the
    default PGD beyond the interval (paired by image)."""
    a, b = _binary(longer), _binary(default)
    est, lo, hi = paired_excess(a, b, confidence=confidence, resamples=resamples, seed=seed)
    outcome = FLAG if beyond_ci(lo) else PASS
    detail = f"{factor}x steps {_fmt(a.mean())} vs default {_fmt(b.mean())}"
    return Check("iterations", f"PGD {factor}x steps vs default PGD", setting, a.size, float(a.mean()),
                 float(b.mean()), est, lo, hi, math.nan, outcome, detail)


def not_stronger_check(check: str, compared: str, attack, reference, *, setting: str = "",
                       confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> Check:
    """Gradient-free and transfer checks: ``attack`` (an attack that should be weaker than the
    white-box ones) must not leave less robust accuracy than ``reference`` (the per-image
    ensemble of the white-box gradient attacks) beyond the interval; if it does, the gradients
    are masked."""
    a, ref = _binary(attack), _binary(reference)
    est, lo, hi = paired_excess(ref, a, confidence=confidence, resamples=resamples, seed=seed)
    outcome = FLAG if beyond_ci(lo) else PASS
    n10 = int(((ref == 1) & (a == 0)).sum())
    detail = (f"{_fmt(a.mean())} vs best gradient ensemble {_fmt(ref.mean())}; broken only by it: {n10}, "
              f"only by the ensemble: {int(((ref == 0) & (a == 1)).sum())}")
    return Check(check, compared, setting, a.size, float(a.mean()), float(ref.mean()), est, lo, hi, math.nan,
                 outcome, detail)


def unbounded_check(correct, *, eps: float, setting: str = "") -> Check:
    """Unbounded attack: PGD with eps = ``eps`` (L-inf on [0, 1] images: any image reachable at
    eps 1) must leave 0 % robust accuracy."""
    a = _binary(correct)
    acc = float(a.mean())
    outcome = PASS if acc == 0 else FLAG
    detail = f"{int(a.sum())} of {a.size} images still classified correctly"
    return Check("unbounded", f"PGD L-inf eps {eps:g}", setting, a.size, acc, math.nan, math.nan, math.nan,
                 math.nan, 0.0, outcome, detail)
