"""``sanity.png`` (+ ``.pdf``): per battery job (a column of panels), the epsilon sweep's robust
accuracy with Wilson intervals (top) and every compared run beside its reference (bottom),
flagged checks in red."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..metrics import wilson_interval
from ..plotting import plt, save, theme  # pyplot from plotting: loaded after the Agg backend is set
from .checks import FLAG

COLORS = {"pass": "#4C72B0", "flag": "#C44E52"}


def _sweep_panel(ax, rec: pd.DataFrame, row: pd.Series, confidence: float) -> None:
    sweep = rec[rec["kind"] == "eps_sweep"]
    g = sweep.groupby("eps_factor")["correct"]
    f, acc, n = g.mean().index.to_numpy(), g.mean().to_numpy(), g.size().to_numpy()
    lo, hi = np.array([wilson_interval(a * k, k, confidence) for a, k in zip(acc, n)]).T
    color = COLORS[row["outcome"]]
    ax.fill_between(f, lo, hi, color=color, alpha=0.2, lw=0)
    ax.plot(f, acc, "o-", color=color, label=f"PGD ({row['setting']})")
    ax.axhline(row["threshold"], color="0.4", ls="--", lw=1, label=f"limit {row['threshold']:g}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(f, [f"{v:g}" for v in f])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("eps factor (x the threat model's eps)")
    ax.set_title(f"{rec['defense'].iloc[0]} / {rec['threat'].iloc[0]}: eps sweep {row['outcome']}")


def _runs_panel(ax, rows: pd.DataFrame) -> None:
    rows = rows.reset_index(drop=True)
    y = np.arange(len(rows))[::-1]
    ax.barh(y, rows["value"], color=[COLORS[o] for o in rows["outcome"]], height=0.6)
    ref = rows["reference"].to_numpy(dtype=float)
    ok = np.isfinite(ref)
    ax.scatter(ref[ok], y[ok], marker="|", s=300, color="k", zorder=3, label="reference")
    labels = [f"{c.split(' vs ')[0]} ({s})" for c, s in zip(rows["compared"], rows["setting"])]
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("robust accuracy (bar) vs reference (|)")


def fig_sanity(table: pd.DataFrame, records: list[pd.DataFrame], png, pdf, confidence: float = 0.95) -> None:
    """The figure of the sanity table and the battery's records (one DataFrame per job)."""
    theme()
    n = len(records)
    fig, axes = plt.subplots(2, n, figsize=(5.2 * n, 7.5), squeeze=False,
                             gridspec_kw=dict(height_ratios=[1, 1.2]))
    for j, rec in enumerate(records):
        d, t = rec["defense"].iloc[0], rec["threat"].iloc[0]
        rows = table[(table["defense"] == d) & (table["threat"] == t)]
        _sweep_panel(axes[0, j], rec, rows[rows["check"] == "eps_sweep"].iloc[0], confidence)
        _runs_panel(axes[1, j], rows[rows["check"] != "eps_sweep"])
        if j == 0:
            axes[0, j].set_ylabel("robust accuracy")
            axes[0, j].legend(loc="upper right", fontsize=7)
    n_flags = int((table["outcome"] == FLAG).sum())
    fig.suptitle(f"Sanity battery: {n_flags} of {len(table)} checks flagged (red)")
    fig.tight_layout()
    save(fig, png, pdf)


def write_sanity_figure(table_csv, record_paths, png, pdf, confidence: float = 0.95) -> None:
    fig_sanity(pd.read_csv(table_csv), [pd.read_parquet(p) for p in record_paths], png, pdf, confidence)
