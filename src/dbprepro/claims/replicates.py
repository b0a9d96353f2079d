"""``results/tables/claims_replicates.csv``: every claim across replicate training seeds.

Each seed of ``replicates.seeds`` retrains the classifier, the DDPM and the ADDT variants and
reruns the attacks on **the same test images** (``data.split_seed`` fixes them), so its claims
table (``claims.csv``) gives one estimate per claim and seed.  The table here shows, per claim,
the estimate and the family-wise verdict of every seed, in how many seeds the claim holds, and a
combined test across the seeds with its own family-wise verdict (Holm over the rows of this table).

The combined test (:func:`combine_seeds`).  Write seed ``s``'s estimate as

    theta_s = theta + b_s + u + v_s,

``theta`` the effect of the method, ``b_s`` the training seed's effect (variance tau^2), ``u`` the
image-sampling error shared by all seeds (the same images; variance sigma_u^2) and ``v_s`` the part
of the image-sampling error particular to the seed's models (variance sigma_v^2).  The mean over
``k`` seeds has variance

    Var(mean) = sigma_u^2 + (tau^2 + sigma_v^2) / k.

Each seed's interval measures its image-sampling variance, E[SE_s^2] = sigma_u^2 + sigma_v^2
(``SE_s`` from the interval's width: width / (2 z)), and the spread of the seeds' estimates
measures the rest, E[S^2] = tau^2 + sigma_v^2 (``S^2`` their sample variance; ``u`` cancels in it).
The test uses

    V = mean_s(SE_s^2) + c_k S^2 / k,    c_k = (k - 1) / chi2_{k-1}(0.3),

the per-seed image-sampling variance plus the (equal-weight) Hartung-Knapp dispersion term S^2 / k
taken at its 70 % upper confidence bound (c_k = 2.8 for 3 seeds, 6.7 for 2), so that
E[V] >= Var(mean) + sigma_v^2 >= Var(mean), and refers ``mean / sqrt(V)`` to Student's t with the
Welch-Satterthwaite degrees of freedom of ``V`` (n - 1 for the image term, n the images of a seed;
k - 1 for the seed term): close to k - 1 when the seeds disagree, large when the images dominate.
The bound c_k is there because S^2 has only k - 1 degrees of freedom: with S^2 itself, the
Satterthwaite t rejects more than alpha of simulated nulls with 3 seeds when the seeds' spread
dominates (a small S^2 by chance both shrinks V and raises the degrees of freedom).  A
pooling that treats the seeds as independent samples (inverse-variance weights, DerSimonian-Laird /
Hartung-Knapp) uses ~ (SE^2 + tau^2) / k or S^2 / k alone and misses ``u``: under a null where the
image sample happens to favour one side, every seed inherits the same tilt and such a test rejects
far more often than ``alpha``.  tests/test_replicates.py simulates shared images with image- and
seed-level random effects: the size of this test, its power on an effect shared by all seeds, and
the failure of the independent-seeds pooling.  The price of V is the
``sigma_v^2`` it over-counts: conservative when the seeds' image errors are nearly independent.
``tau_dl`` (the square root of DerSimonian-Laird's tau^2, as if the seeds were independent) is shown as the
between-seed spread beside ``sd_seeds`` (S), in the estimate's units; neither decides the test.

What it assumes and costs (checked by an independent simulation with binary per-image outcomes and
bootstrap intervals, 2026-12-07: size at most alpha in every regime tried, 0.000-0.053):

- the estimand is the mean effect over training seeds, with the seed effect roughly normal; 2 or 3
  seeds cannot check that.  A bimodal training outcome (a seed that sometimes collapses) can make
  every seed land in the common mode, and the test then rejects for the mode rather than the mean
  (simulated size 0.10-0.13 with a 1-in-3 collapse);
- it is conservative, and with binary outcomes much less powerful than one seed's own McNemar test:
  V counts the seed x image variance twice (in the mean SE^2 and in S^2 at its upper bound).  With
  2 seeds the combined test detected a shared effect in 0.34-0.52 of simulations where one seed's
  test had 0.85-0.95; with 3 seeds in 0.64-0.89.  A combined ``not significant`` is therefore weak
  evidence of no effect;
- ``n_holds`` describes each seed on its own images, not replication: when seeds differ and the
  method has no effect on average, every seed "holds" in a sizeable share of simulations, so read the
  combined verdict, not the count.

Rows whose test has no interval (an exact rank test over a handful of defenses) are combined from
their p-values instead: twice the mean of the seeds' one-sided p-values, valid under any dependence
between them (Rueschendorf 1982; Vovk & Wang 2020), in the better-supported direction and doubled
for the two sides.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from ..metrics import write_table
from . import stats

log = logging.getLogger("dbprepro.claims")

#: the combined columns, after the per-seed ones (estimate_seed<S>, verdict_seed<S>)
COMBINED = ("n_seeds", "n_holds", "estimate", "ci_low", "ci_high", "se", "se_image", "sd_seeds", "tau_dl", "df",
            "p_value", "p_holm", "alpha", "verdict", "combined_test")
#: confidence level of the upper bound on the seeds' dispersion term in the combined variance
SEED_TERM_LEVEL = 0.7
RE_TEST = "random effects over seeds: mean SE^2 + c_k S^2/k, Satterthwaite t"
P_TEST = "2 x mean one-sided p over seeds (any dependence)"


def se_from_ci(ci_low, ci_high, confidence: float = 0.95) -> np.ndarray:
    """The standard error a two-sided ``confidence`` interval implies: width / (2 z)."""
    z = sps.norm.ppf(0.5 + confidence / 2)
    return (np.asarray(ci_high, dtype=np.float64) - np.asarray(ci_low, dtype=np.float64)) / (2 * z)


def combine_seeds(estimates, ses, n_images, *, confidence: float = 0.95) -> dict[str, np.ndarray]:
    """The random-effects test of the module docstring over the last axis (the ``k`` seeds) of
    ``estimates`` and ``ses`` (any leading shape: one claim, or many simulated ones); ``n_images``
    the images behind each seed's estimate (its degrees of freedom n - 1).  Returns arrays
    ``estimate`` (mean over seeds), ``se`` (sqrt V), ``se_image`` (sqrt of the mean SE^2),
    ``sd_seeds`` (S), ``tau_dl`` (sqrt of DerSimonian-Laird's tau^2), ``df``, ``p_value`` (two-sided), ``ci_low``, ``ci_high``.
    Where V = 0 the p-value is 1 for a zero estimate and NaN otherwise."""
    est, se = np.asarray(estimates, dtype=np.float64), np.asarray(ses, dtype=np.float64)
    k = est.shape[-1]
    if k < 2:
        raise ValueError(f"a combined test across seeds needs at least 2 seeds, got {k}")
    mean = est.mean(-1)
    a = (se**2).mean(-1)  # image-sampling variance of one seed's estimate
    s2 = est.var(-1, ddof=1)
    b = s2 / k * (k - 1) / sps.chi2.ppf(1 - SEED_TERM_LEVEL, k - 1)  # the seeds' dispersion at its upper bound
    v = a + b
    nu_a = np.maximum(np.asarray(n_images, dtype=np.float64) - 1, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = v**2 / (a**2 / nu_a + b**2 / (k - 1))
        t = mean / np.sqrt(v)
        w = 1.0 / se**2
        mw = (w * est).sum(-1) / w.sum(-1)
        q = (w * (est - mw[..., None]) ** 2).sum(-1)
        tau2 = np.maximum(0.0, (q - (k - 1)) / (w.sum(-1) - (w**2).sum(-1) / w.sum(-1)))
    df = np.where(np.isfinite(df), df, nu_a)
    p = 2 * sps.t.sf(np.abs(t), df)
    p = np.where(v > 0, p, np.where(mean == 0, 1.0, np.nan))
    half = sps.t.ppf(0.5 + confidence / 2, df) * np.sqrt(v)
    return dict(estimate=mean, se=np.sqrt(v), se_image=np.sqrt(a), sd_seeds=np.sqrt(s2), tau_dl=np.sqrt(tau2), df=df,
                p_value=p, ci_low=mean - half, ci_high=mean + half)


def combine_p_values(estimates, p_values) -> float:
    """Two-sided combination of the seeds' two-sided p-values that holds under any dependence:
    each becomes one-sided (p/2 in its estimate's direction, 1 - p/2 against it), each direction's
    combined p is twice their mean, and the smaller of the two, doubled, is returned (capped at 1)."""
    est, p = np.asarray(estimates, dtype=np.float64), np.asarray(p_values, dtype=np.float64)
    if not (np.isfinite(est).all() and np.isfinite(p).all()):
        return float("nan")
    up = np.where(est > 0, p / 2, np.where(est < 0, 1 - p / 2, 0.5))
    down = np.where(est < 0, p / 2, np.where(est > 0, 1 - p / 2, 0.5))
    return float(min(1.0, 2 * min(1.0, 2 * up.mean(), 2 * down.mean())))


def replicates_table(tables: dict[int, pd.DataFrame], *, alpha: float = stats.ALPHA,
                     confidence: float = 0.95) -> pd.DataFrame:
    """One row per claim of the seeds' claims tables (``seed -> claims.csv`` as read): the
    estimate and verdict per seed, the count of seeds where it holds, the combined test and its
    family-wise verdict (Holm over the rows)."""
    seeds = list(tables)
    if len(seeds) < 2:
        raise ValueError(f"claims across replicate seeds need at least 2 seeds, got {seeds}")
    ids = list(dict.fromkeys(c for s in seeds for c in tables[s]["claim_id"]))
    by_seed = {s: tables[s].drop_duplicates("claim_id").set_index("claim_id") for s in seeds}
    rows = []
    for cid in ids:
        present = [s for s in seeds if cid in by_seed[s].index]
        first = by_seed[present[0]].loc[cid]
        row = dict(claim_id=cid, paper=first["paper"], direction=int(first["direction"]))
        for s in seeds:
            r = by_seed[s].loc[cid] if s in present else None
            row[f"estimate_seed{s}"] = float(r["estimate"]) if r is not None else float("nan")
            row[f"verdict_seed{s}"] = r["verdict"] if r is not None else ""
        sub = pd.DataFrame([by_seed[s].loc[cid] for s in present])
        row.update(n_seeds=len(present), n_holds=int((sub["verdict"] == "holds").sum()), alpha=alpha)
        row.update(_combined(sub, confidence))
        rows.append(row)
    table = pd.DataFrame(rows)
    table["p_holm"] = stats.holm(table["p_value"].to_numpy(float))
    table["verdict"] = [stats.family_verdict(e, p, ph, d, alpha) for e, p, ph, d in
                        zip(table["estimate"], table["p_value"], table["p_holm"], table["direction"], strict=True)]
    front = ["claim_id", "paper", "direction", *(f"estimate_seed{s}" for s in seeds),
             *(f"verdict_seed{s}" for s in seeds)]
    return table[front + list(COMBINED)]


def _combined(sub: pd.DataFrame, confidence: float) -> dict:
    """The combined columns of one claim from its seeds' rows ``sub``."""
    est = sub["estimate"].to_numpy(float)
    nan = dict.fromkeys(("ci_low", "ci_high", "se", "se_image", "sd_seeds", "tau_dl", "df"), float("nan"))
    if len(sub) < 2:
        return dict(nan, estimate=float(est.mean()), p_value=float("nan"), combined_test="fewer than 2 seeds")
    se = se_from_ci(sub["ci_low"], sub["ci_high"], confidence)
    # no interval, or every interval of zero width (all seeds' images agree, or rounding): the
    # random-effects variance is 0 or undefined, so the seeds' own exact p-values are combined instead
    if not (np.isfinite(se).all() and np.isfinite(est).all()) or not (se > 0).any():
        p = combine_p_values(est, sub["p_value"].to_numpy(float))
        return dict(nan, estimate=float(est.mean()), sd_seeds=float(est.std(ddof=1)), p_value=p,
                    combined_test=P_TEST)
    res = combine_seeds(est, se, float(sub["n"].min()), confidence=confidence)
    return dict({k: float(v) for k, v in res.items()}, combined_test=RE_TEST)


def write_claims_replicates(claims: dict[int, str | Path], csv_path, md_path, *, alpha: float = stats.ALPHA,
                            confidence: float = 0.95) -> pd.DataFrame:
    """The stage: the seeds' claims tables (``seed -> path of its claims.csv``) combined, as CSV
    and Markdown."""
    table = replicates_table({int(s): pd.read_csv(p) for s, p in claims.items()}, alpha=alpha, confidence=confidence)
    out = table.copy()
    for col in ("p_value", "p_holm"):
        out[col] = out[col].map(lambda p: "" if not np.isfinite(p) else f"{p:.3g}")
    write_table(out, csv_path, md_path)
    counts = table["verdict"].value_counts().to_dict()
    log.info("%d claims over seeds %s: %s", len(table), list(claims),
             ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return table
