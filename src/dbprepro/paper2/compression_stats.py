"""Paper 2, claim 4's tables: the compression rate (:mod:`dbprepro.paper2.compression`) against the
robust outcome of the dwbox attack on the same configuration, per image and per defense.

The association is the Spearman rank correlation and the ROC AUC of -CR as a score for "robust"
(:func:`rank_auc`, the Mann-Whitney statistic; AUC > 0.5 means lower CR goes with robustness).
Numpy, pandas and scipy only: the tables are light stages, run in Snakemake's process, and import
no torch (tests/test_light_stages.py); :mod:`dbprepro.paper2.compression` re-exports every name.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


def rank_auc(scores, positive) -> float:
    """ROC AUC of ``scores`` for the binary labels ``positive``: P(score of a positive > score of
    a negative), ties counted 1/2 (the Mann-Whitney U statistic / (n_pos n_neg)); NaN when one
    class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(s)  # average ranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def association(cr, robust, groups=None, seed: int = 0) -> dict[str, float]:
    """Spearman rho (and p-value) of CR vs the robust outcome, and the AUC of low CR for robust.

    With ``groups`` (the image of each row, when an image has a row per configuration) the rows
    are not independent: the p-value is then the permutation test that moves whole images
    (:func:`dbprepro.claims.stats.clustered_spearman`), NaN when images have unequal row counts;
    ``n`` stays the row count and ``n_images`` counts the images."""
    from ..claims.stats import clustered_spearman

    cr, robust = np.asarray(cr, np.float64), np.asarray(robust, np.float64)
    ok = np.isfinite(cr) & np.isfinite(robust)
    cr, robust = cr[ok], robust[ok]
    g = np.asarray(groups)[ok] if groups is not None else np.arange(cr.size)
    out = {"n": int(cr.size), "n_images": int(np.unique(g).size), "n_robust": int((robust > 0.5).sum()),
           "spearman_rho": float("nan"), "spearman_p": float("nan"), "auc_low_cr_robust": rank_auc(-cr, robust > 0.5)}
    if cr.size > 2 and np.ptp(cr) > 0 and np.ptp(robust) > 0:
        res = stats.spearmanr(cr, robust)
        out["spearman_rho"] = float(res.statistic)
        if groups is None:
            out["spearman_p"] = float(res.pvalue)
        elif np.unique(np.unique(g, return_counts=True)[1]).size == 1 and out["n_images"] >= 3:
            out["spearman_p"] = clustered_spearman(cr, robust, g, resamples=100, seed=seed).p_value
    return out


def _robust_outcomes(records: pd.DataFrame, column: str = "correct_single") -> pd.Series:
    return records.set_index("id")[column].astype(np.float64)


def compression_table(cr: pd.DataFrame, dwbox: dict[int, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-image table (CR of configuration k beside the outcome of the dwbox attack on k) and the
    summary: association over all rows, over the images clean-correct under P_xi, and per k."""
    rows = []
    for k, rec in dwbox.items():
        sub = cr[cr["config"] == k].copy()
        outcome = _robust_outcomes(rec)
        sub["robust"] = sub["id"].map(outcome)
        rows.append(sub)
    per_image = pd.concat(rows, ignore_index=True)
    missing = per_image["robust"].isna().sum()
    if missing:
        raise ValueError(f"{missing} (image, configuration) pairs lack a dwbox outcome")
    summary = []
    scopes = [("all", per_image), ("clean_correct", per_image[per_image["clean_correct"] == 1])]
    scopes += [(f"config_{k}", per_image[per_image["config"] == k]) for k in dwbox]
    for scope, sub in scopes:
        pooled = sub["config"].nunique() > 1  # an image has several rows: images are the units
        summary.append({"scope": scope, **association(sub["cr"], sub["robust"], sub["id"] if pooled else None),
                        "mean_cr_robust": float(sub.loc[sub["robust"] > 0.5, "cr"].mean()),
                        "mean_cr_not_robust": float(sub.loc[sub["robust"] <= 0.5, "cr"].mean())})
    return per_image, pd.DataFrame(summary)


def compression_models_table(cr_by_defense: dict[str, pd.DataFrame], dwbox_by_defense: dict[str, pd.DataFrame],
                             whitebox_eot_by_defense: dict[str, pd.DataFrame] | None = None,
                             evaluation: str = "single") -> pd.DataFrame:
    """One row per defense: mean CR (configuration of its dwbox run) against its dwbox robust
    accuracy on the same images, the within-defense association, and the Spearman rank
    correlation of mean CR vs robust accuracy across the defenses (same value on every row)."""
    rows = []
    for d, cr in cr_by_defense.items():
        rec = dwbox_by_defense[d]
        outcome = _robust_outcomes(rec)
        sub = cr.assign(robust=cr["id"].map(outcome)).dropna(subset=["robust"])
        row = {"defense": d, "config": int(sub["config"].iloc[0]), "n_images": len(sub),
               "mean_cr": float(sub["cr"].mean()), "median_cr": float(sub["cr"].median()),
               "std_cr": float(sub["cr"].std(ddof=1)), "clean_accuracy_fixed": float(sub["clean_correct"].mean()),
               "robust_accuracy_dwbox": float(sub["robust"].mean())}
        if whitebox_eot_by_defense and d in whitebox_eot_by_defense:
            eot = _robust_outcomes(whitebox_eot_by_defense[d], f"correct_{evaluation}")
            row["robust_accuracy_whitebox_eot"] = float(sub["id"].map(eot).mean())
        a = association(sub["cr"], sub["robust"])
        row["spearman_within"], row["auc_within"] = a["spearman_rho"], a["auc_low_cr_robust"]
        rows.append(row)
    table = pd.DataFrame(rows)
    rho = float("nan")
    if len(table) > 2 and np.ptp(table["mean_cr"]) > 0 and np.ptp(table["robust_accuracy_dwbox"]) > 0:
        rho = float(stats.spearmanr(table["mean_cr"], table["robust_accuracy_dwbox"]).statistic)
    table["spearman_across_defenses"] = rho
    return table
