"""The statistics behind the claims table, each fitted to a design of the experiment.

Every function returns a :class:`Result`: the estimate, its confidence interval, the test, its
two-sided p-value and the smallest effect the test could detect (``mde``).  Designs:

``paired_binary``      two 0/1 outcomes on the same images (robust accuracy of two runs):
                       exact McNemar test (a binomial test on the discordant pairs), paired
                       bootstrap over images for the interval of the accuracy difference.
``paired_values``      two real values per image (a distance, a correlation, or a per-image mean
                       over repeats: configurations, draws): sign-flip permutation test of the
                       mean difference, bootstrap over images.  Passing per-image means is how
                       repeated measurements of one image stay one unit.
``clustered_spearman`` a rank correlation over (image, repeat) rows: the pooled Spearman rho,
                       an interval from a bootstrap that resamples whole images, and a
                       permutation test that moves whole images (an image's repeats keep
                       their order), so that repeats never count as independent evidence.
``exact_spearman``     a rank correlation over a handful of units (defenses): the exact
                       permutation distribution over all n! orderings.

``mde`` is the smallest true effect the test detects with probability ``power`` at ``alpha``,
from the normal approximation with the bootstrap standard error: (z_{1-alpha/2} + z_power) x SE
(for McNemar at least k/n, k the fewest one-way discordant pairs the exact test can reject on:
6 at alpha = 0.05); for the exact rank test, the smallest |rho| whose exact p-value is below ``alpha`` (NaN when no
ordering of n units reaches it).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class Result:
    """One comparison: ``estimate`` (difference a - b, or rho) with its interval, the test's
    name, statistic and two-sided p-value, the number of independent units ``n`` and ``mde``."""

    estimate: float
    ci_low: float
    ci_high: float
    test: str
    statistic: float
    p_value: float
    n: int
    mde: float


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))


def _percentile_ci(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return float("nan"), float("nan")
    q = (1 - confidence) / 2
    return float(np.quantile(boot, q)), float(np.quantile(boot, 1 - q))


def _mde(se: float, alpha: float, power: float) -> float:
    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * se)


def _check_paired(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples need equal 1-d shapes, got {a.shape} and {b.shape}")
    if a.size < 2:
        raise ValueError(f"a paired comparison needs at least 2 units, got {a.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired samples contain NaN or infinite values")
    return a, b


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Discordant counts (a right / b wrong, a wrong / b right) and the exact two-sided McNemar
    p-value: the binomial test of the first count among the discordant pairs at 1/2."""
    a, b = (np.asarray(v).astype(bool) for v in (a, b))
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if n10 + n01 == 0 else float(stats.binomtest(n10, n10 + n01, 0.5).pvalue)
    return n10, n01, p


def paired_binary(a, b, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0,
                  alpha: float = ALPHA, power: float = POWER) -> Result:
    """mean(a) - mean(b) for 0/1 outcomes on the same images: exact McNemar, paired bootstrap."""
    a, b = _check_paired(a, b)
    if not np.isin(np.concatenate([a, b]), (0.0, 1.0)).all():
        raise ValueError("paired_binary needs 0/1 outcomes; use paired_values for scores")
    n10, n01, p = mcnemar_exact(a, b)
    d = a - b
    idx = _rng(seed).integers(0, d.size, size=(resamples, d.size))
    boot = d[idx].mean(1)
    lo, hi = _percentile_ci(boot, confidence)
    # the exact test needs k_min discordant pairs, all one way, before it can reject at all
    k_min = next(k for k in range(1, 10_000) if 2 * 0.5 ** k < alpha)
    mde = max(_mde(float(boot.std(ddof=1)), alpha, power), k_min / d.size)
    return Result(float(d.mean()), lo, hi, "exact McNemar", float(n10 - n01), p, int(d.size), mde)


def sign_flip_p(d: np.ndarray, resamples: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of mean(d) = 0 by flipping the signs of the per-unit differences (exact
    enumeration up to 2^16 sign patterns, Monte Carlo beyond, with the +1 correction)."""
    d = np.asarray(d, dtype=np.float64)
    obs = abs(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).max(initial=0.0)))
    if d.size <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        null = np.abs(signs @ d / d.size)
        return float((null >= obs - tol).mean())
    signs = _rng(seed + 1).choice((-1.0, 1.0), size=(resamples, d.size))
    null = np.abs(signs @ d / d.size)
    return float((1 + (null >= obs - tol).sum()) / (1 + resamples))


def paired_values(a, b, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0,
                  alpha: float = ALPHA, power: float = POWER) -> Result:
    """mean(a - b) for real values per image: sign-flip permutation test, bootstrap over images."""
    a, b = _check_paired(a, b)
    d = a - b
    p = sign_flip_p(d, resamples=max(resamples, 5000), seed=seed)
    idx = _rng(seed).integers(0, d.size, size=(resamples, d.size))
    boot = d[idx].mean(1)
    lo, hi = _percentile_ci(boot, confidence)
    return Result(float(d.mean()), lo, hi, "sign-flip permutation (paired, by image)", float(d.mean()), p,
                  int(d.size), _mde(float(boot.std(ddof=1)), alpha, power))


def _rank_rows(m: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank), for 2-d ``m``."""
    return stats.rankdata(m, axis=-1)


def _pearson_rows(rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(-1) / den


def clustered_spearman(x, y, groups, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0,
                       alpha: float = ALPHA, power: float = POWER, permutations: int | None = None) -> Result:
    """Pooled Spearman rho of (x, y) over rows that belong to units ``groups`` (images).

    The interval resamples whole units; the p-value permutes y between units, moving each unit's
    rows together, which needs every unit to have the same number of rows (its repeats, in a
    fixed order).  ``permutations``: random permutations of the test (default max(resamples, 5000))."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    groups = np.asarray(groups)
    order = np.argsort(groups, kind="stable")
    x, y, groups = x[order], y[order], groups[order]
    units, counts = np.unique(groups, return_counts=True)
    if len(units) < 3:
        raise ValueError(f"a rank correlation needs at least 3 units, got {len(units)}")
    if (counts != counts[0]).any():
        raise ValueError("clustered_spearman needs the same number of rows per unit")
    k = int(counts[0])
    X, Y = x.reshape(len(units), k), y.reshape(len(units), k)
    rho = float(stats.spearmanr(x, y).statistic)
    rng = _rng(seed)
    idx = rng.integers(0, len(units), size=(resamples, len(units)))
    boot = _pearson_rows(_rank_rows(X[idx].reshape(resamples, -1)), _rank_rows(Y[idx].reshape(resamples, -1)))
    lo, hi = _percentile_ci(boot, confidence)
    n_perm = int(permutations) if permutations else max(resamples, 5000)
    perm = np.argsort(rng.random((n_perm, len(units))), axis=1)
    rx = np.broadcast_to(_rank_rows(x[None]), (n_perm, x.size))
    null = _pearson_rows(rx, _rank_rows(Y[perm].reshape(n_perm, -1)))
    p = float((1 + (np.abs(null) >= abs(rho) - 1e-12).sum()) / (1 + n_perm)) if np.isfinite(rho) else float("nan")
    se = float(np.nanstd(boot, ddof=1))
    return Result(rho, lo, hi, "Spearman; permutation and bootstrap by image", rho, p, len(units),
                  _mde(se, alpha, power))


def exact_spearman(x, y, *, alpha: float = ALPHA) -> Result:
    """Spearman rho over n <= 8 units with its exact two-sided permutation p-value (all n!
    orderings; no interval: a handful of units supports none, so ci_low/ci_high are NaN)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = x.size
    if n != y.size or n < 3:
        raise ValueError(f"exact_spearman needs two samples of equal size >= 3, got {x.size} and {y.size}")
    if n > 8:
        raise ValueError(f"exact_spearman enumerates n! orderings; n = {n} > 8: use clustered_spearman")
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    perms = np.array(list(itertools.permutations(range(n))))
    null = _pearson_rows(np.broadcast_to(rx, perms.shape), ry[perms])
    rho = float(_pearson_rows(rx[None], ry[None])[0])
    p = float((np.abs(null) >= abs(rho) - 1e-12).mean()) if np.isfinite(rho) else float("nan")
    # the smallest |rho| whose exact p-value is below alpha
    levels = np.unique(np.round(np.abs(null), 12))
    reach = [r for r in levels if (np.abs(null) >= r - 1e-12).mean() < alpha]
    mde = float(min(reach)) if reach else float("nan")
    return Result(rho, float("nan"), float("nan"), f"Spearman, exact permutation over {math.factorial(n)} orderings",
                  rho, p, n, mde)


VERDICTS = ("holds", "contradicted", "suggestive", "not significant")


def verdict(result: Result, direction: int, alpha: float = ALPHA) -> str:
    """The unadjusted verdict of one test: ``holds`` (p < ``alpha`` in the claimed ``direction``:
    +1 a > b / rho > 0, -1 a < b / rho < 0), ``contradicted`` (p < ``alpha`` the other way) or
    ``not significant``.  The claims table keeps it as ``verdict_raw``; its ``verdict`` is
    :func:`family_verdict`."""
    if direction not in (-1, 1):
        raise ValueError(f"direction is +1 or -1, got {direction}")
    if not np.isfinite(result.p_value) or result.p_value >= alpha or result.estimate == 0:
        return "not significant"
    return "holds" if np.sign(result.estimate) == direction else "contradicted"


def family_verdict(estimate: float, p_value: float, p_holm: float, direction: int, alpha: float = ALPHA) -> str:
    """The verdict of one claim in a family of tests (one of :data:`VERDICTS`):

    ``holds`` / ``contradicted``  Holm-adjusted p < ``alpha``, with the estimate in the claimed
                                  ``direction`` / against it: the family-wise error rate over the
                                  whole table is at most ``alpha``;
    ``suggestive``                the test's own p < ``alpha`` but Holm's p is not (either direction;
                                  about ``alpha`` x the number of true nulls such rows are expected by
                                  chance alone);
    ``not significant``           otherwise (the row's ``mde`` says what the test could have seen).
    """
    if direction not in (-1, 1):
        raise ValueError(f"direction is +1 or -1, got {direction}")
    if not np.isfinite(p_value) or p_value >= alpha or estimate == 0 or not np.isfinite(estimate):
        return "not significant"
    if not (np.isfinite(p_holm) and p_holm < alpha):
        return "suggestive"
    return "holds" if np.sign(estimate) == direction else "contradicted"


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (NaN stays NaN)."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out
