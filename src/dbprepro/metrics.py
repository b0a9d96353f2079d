"""Accuracies with confidence intervals, and the tables built from per-sample records."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import binomtest


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion.

    ``successes`` may be fractional: the sum over images of each image's mean correctness over
    several draws.  Per-image scores s_i in [0, 1] have Var(s) <= p(1 - p), so the interval
    computed as if they were single Bernoulli trials is conservative.
    """
    if n <= 0:
        raise ValueError("no samples: cannot compute an accuracy")
    k = int(round(successes))
    if abs(k - successes) < 1e-9:
        ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
        return float(ci.low), float(ci.high)
    # fractional successes: the same Wilson formula, written out (binomtest takes integers)
    from scipy.stats import norm

    z = norm.ppf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def accuracy_summary(records: pd.DataFrame, confidence: float = 0.95) -> dict[str, float]:
    """Accuracy of one setting from per-(image, draw) records with columns ``id``, ``draw``, ``correct``.

    Accuracy = mean over images of the image's mean correctness over its draws; the interval is
    a Wilson interval over images; the spread of accuracy across draws is reported beside it.
    """
    per_image = records.groupby("id")["correct"].mean()
    per_draw = records.groupby("draw")["correct"].mean()
    n = int(per_image.shape[0])
    acc = float(per_image.mean())
    lo, hi = wilson_interval(float(per_image.sum()), n, confidence)
    return {
        "n_images": n,
        "draws_per_image": int(records.groupby("id").size().max()),
        "accuracy": acc,
        "ci_low": lo,
        "ci_high": hi,
        "accuracy_min_draw": float(per_draw.min()),
        "accuracy_max_draw": float(per_draw.max()),
    }


def round_table(df: pd.DataFrame, decimals: int = 4) -> pd.DataFrame:
    """Round float columns so that tables are stable text across runs and platforms."""
    out = df.copy()
    for c in out.columns:
        if pd.api.types.is_float_dtype(out[c]):
            out[c] = out[c].round(decimals)
    return out


def write_table(df: pd.DataFrame, csv_path, md_path=None, decimals: int = 4) -> None:
    """Write a table as CSV (and optionally Markdown) with rounded floats, atomically."""
    from .io import atomic_path, write_text

    df = round_table(df, decimals)
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False, float_format=f"%.{decimals}f", lineterminator="\n")
    if md_path is not None:
        write_text(md_path, df.to_markdown(index=False, floatfmt=f".{decimals}f") + "\n")
