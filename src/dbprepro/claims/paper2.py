"""Paper 2's four claims (arXiv 2505.22839) from the run's per-image tables and attack records.

1. purification moves images away from the clean image (one row per norm, for the purified
   adversarial and the purified clean image);
2. the output is dominated by the internal randomness;
3. the robustness gain under fixed randomness is small (smaller than under random randomness);
4. a lower compression rate goes with robustness, per image (configurations pooled, images as
   units) and across defenses (an exact test over the handful of defenses).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import stats
from .base import Claim, RunData

DISTANCES = (("purified_adv", "||P(x_adv) - x||"), ("purified_clean", "||P(x) - x||"))


def _distance(column: str, norm: str, **kw: Any):
    def compute(data: RunData, seed: int):
        per_image = data.p2["p2_lp_distances"].groupby("id")[[f"{column}_{norm}", f"adv_{norm}"]].mean()
        va, vb = per_image[f"{column}_{norm}"].to_numpy(float), per_image[f"adv_{norm}"].to_numpy(float)
        return stats.paired_values(va, vb, seed=seed, **kw), float(va.mean()), float(vb.mean())

    return compute


def _randomness(**kw: Any):
    def compute(data: RunData, seed: int):
        t = data.p2["p2_randomness"].sort_values("id")
        va, vb = t["corr_same_randomness"].to_numpy(float), t["corr_different_randomness"].to_numpy(float)
        return stats.paired_values(va, vb, seed=seed, **kw), float(va.mean()), float(vb.mean())

    return compute


def _fixed_vs_random(threat: str, fixed_settings: list[str], n_images: int | None, **kw: Any):
    def compute(data: RunData, seed: int):
        random = data.run("vanilla", threat, "whitebox_eot")
        fixed = [data.run("vanilla", threat, s) for s in fixed_settings]
        ids = random.index
        for f in fixed:
            ids = ids.intersection(f.index)
        ids = ids.sort_values()[:n_images] if n_images is not None else ids.sort_values()
        # one unit per image: its mean robustness over the fixed configurations (the repeats)
        va = np.mean([f.loc[ids, "correct_single"].to_numpy(float) for f in fixed], axis=0)
        vb = random.loc[ids, f"correct_{data.evaluation}"].to_numpy(float)
        return stats.paired_values(va, vb, seed=seed, **kw), float(va.mean()), float(vb.mean())

    return compute


def _compression_within(defense: str, **kw: Any):
    def compute(data: RunData, seed: int):
        t = data.p2["p2_compression"]
        t = t[t["defense"] == defense].sort_values(["id", "config"])
        res = stats.clustered_spearman(t["cr"].to_numpy(float), t["robust"].to_numpy(float), t["id"].to_numpy(),
                                       seed=seed, **kw)
        return res, float(t["cr"].mean()), float(t["robust"].mean())

    return compute


def _compression_across(alpha: float):
    def compute(data: RunData, seed: int):
        t = _across_rows(data)
        res = stats.exact_spearman(t["mean_cr"].to_numpy(float), t["robust_accuracy_dwbox"].to_numpy(float),
                                   alpha=alpha)
        return res, float(t["mean_cr"].mean()), float(t["robust_accuracy_dwbox"].mean())

    return compute


def _across_rows(data: RunData):
    t = data.p2["p2_compression_models"]
    t = t[t["robust_accuracy_dwbox"].notna()]
    return t[t["config"] == t["config"].min()]


def paper2_claims(data: RunData, *, threat: str, fixed_settings: list[str], n_images: int | None,
                  alpha: float = stats.ALPHA, **kw: Any) -> list[Claim]:
    """Paper 2's claims the run can test (its analyses are on ``threat``; ``fixed_settings`` are
    the dwbox runs of the fixed configurations, ``n_images`` the analysed images)."""
    claims: list[Claim] = []
    p2 = data.p2
    if "p2_lp_distances" in p2:
        norms = [c[len("adv_"):] for c in p2["p2_lp_distances"].columns if c.startswith("adv_")]
        for norm in norms:
            for column, label in DISTANCES:
                what = "adversarial" if column == "purified_adv" else "clean"
                claims.append(Claim(
                    f"p2_claim1_{column}_{norm}", "P2", "Claim 1: distances (Fig. 1)",
                    f"purification moves the {what} image away from the clean image: "
                    f"{label} > ||x_adv - x|| ({norm})",
                    f"{label}, {norm} (mean over draws)", f"||x_adv - x||, {norm}", +1, threat,
                    _distance(column, norm, alpha=alpha, **kw)))
    if "p2_randomness" in p2:
        claims.append(Claim(
            "p2_claim2_randomness", "P2", "Claim 2: randomness (Fig. 2)",
            "the purified output is dominated by internal randomness: inputs of the eps-ball under one "
            "configuration correlate more than one input under different configurations",
            "correlation, same randomness", "correlation, different randomness", +1, threat,
            _randomness(alpha=alpha, **kw)))
    if data.has("vanilla", threat, "whitebox_eot") and fixed_settings and all(
            data.has("vanilla", threat, s) for s in fixed_settings):
        claims.append(Claim(
            "p2_claim3_fixed_randomness", "P2", "Claim 3: fixed randomness (table)",
            "the robustness gain under fixed randomness is smaller than under random randomness",
            f"vanilla: DW-box PGD robust accuracy, mean over {len(fixed_settings)} fixed configurations",
            f"vanilla: PGD-EoT robust accuracy ({data.evaluation} evaluation)", -1, threat,
            _fixed_vs_random(threat, fixed_settings, n_images, alpha=alpha, **kw),
            "the undefended classifier's robust accuracy is subtracted from both, so the difference of "
            "gains equals the difference of accuracies"))
    if "p2_compression" in p2 and (p2["p2_compression"]["defense"] == "vanilla").any():
        claims.append(Claim(
            "p2_claim4_within", "P2", "Claim 4: compression rate (Fig. 6)",
            "a lower compression rate goes with robustness, per image (vanilla; configurations pooled)",
            "compression rate", "robust under DW-box (per image and configuration)", -1, threat,
            _compression_within("vanilla", alpha=alpha, **kw)))
    if "p2_compression_models" in p2 and len(_across_rows(data)) >= 3:
        claims.append(Claim(
            "p2_claim4_across", "P2", "Claim 4: compression rate across defenses (Fig. 6)",
            "defenses with a lower mean compression rate are more robust",
            "mean compression rate", "DW-box robust accuracy", -1, threat, _compression_across(alpha),
            "a handful of defenses: an exact permutation test; no interval"))
    return claims
