"""The robustness waterfall figure from ``waterfall.csv`` (:mod:`dbprepro.paper1.waterfall`): one
panel per defense x threat model, the stages it was attacked in on the x axis, weakest first.

Per evaluation (``single`` blue, ``worst`` of N red): the ensemble - robust against every stage so
far, per image - as a falling staircase with its bootstrap band; each stage alone as a faint point
behind it; beside each step, the images that stage removed from the ensemble ("−k"); and, dashed,
the single strongest run on the same images.  A defense with PGD runs only says so in its title."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..plotting import plt, save, theme  # pyplot from plotting: loaded after the Agg backend is set
from .waterfall import ALL_ATTACKS, EVALUATIONS, PGD_ONLY

SERIES = {"single": ("tab:blue", "one-shot (single)"), "worst": ("tab:red", "worst of N")}
LAST = (ALL_ATTACKS, PGD_ONLY)


def _steps(x: np.ndarray, *ys: np.ndarray) -> tuple[np.ndarray, ...]:
    """A staircase through levels ``ys`` at ``x``: each level spans x - 0.5 .. x + 0.5, the drops vertical."""
    edges = np.repeat(x, 2) + np.tile([-0.5, 0.5], len(x))
    return (edges, *(np.repeat(y, 2) for y in ys))


def _panel(ax, sub: pd.DataFrame) -> None:
    """One defense x threat model: the stages it has on the x axis, a staircase per evaluation."""
    staged = sub[~sub["stage"].isin(LAST)]  # the stages in waterfall order: the table's stage_index
    stages = list(dict.fromkeys(staged.sort_values("stage_index", kind="stable")["stage"]))
    x_of = {s: i for i, s in enumerate(stages)}
    for k, ev in enumerate(EVALUATIONS):
        rows = sub[(sub["evaluation"] == ev) & ~sub["stage"].isin(LAST)]
        if rows.empty:
            continue
        color, label = SERIES.get(ev, ("grey", ev))
        x = np.array([x_of[s] for s in rows["stage"]], dtype=float)
        y, lo, hi = (rows[c].to_numpy(float) for c in ("ensemble_robust_accuracy", "ci_low", "ci_high"))
        ax.scatter(x + (k - 0.5) * 0.16, rows["stage_robust_accuracy"].to_numpy(float), s=14, color=color, alpha=0.3,
                   marker="D", lw=0, label=f"{label}: stage alone")
        edges, ys, los, his = _steps(x, y, lo, hi)
        ax.fill_between(edges, los, his, color=color, alpha=0.15, lw=0)
        ax.plot(edges, ys, color=color, lw=1.6, label=f"{label}: every stage so far")
        ax.plot(x, y, "o", ms=3.5, color=color)
        for xi, yi, removed in zip(x, y, rows["removed"]):
            if pd.notna(removed) and int(removed) > 0:
                ax.annotate(f"\u2212{int(removed)}", (xi, yi), xytext=(4, 3 if k == 0 else -8),
                            textcoords="offset points", fontsize=6, color=color)
        last = sub[(sub["evaluation"] == ev) & sub["stage"].isin(LAST)]
        if not last.empty and pd.notna(last.iloc[0]["strongest_robust_accuracy"]):
            b = last.iloc[0]
            ax.axhline(float(b["strongest_robust_accuracy"]), color=color, ls="--", lw=0.8, alpha=0.6)
            ax.text(0.98, 0.97 - 0.07 * k, f"{ev}: all {float(b['ensemble_robust_accuracy']):.2f}, best single "
                    f"{float(b['strongest_robust_accuracy']):.2f} ({b['strongest_run']})", transform=ax.transAxes,
                    ha="right", va="top", fontsize=6, color=color)
    ax.set_xticks(range(len(stages)), stages, rotation=30, ha="right")
    ax.set_xlim(-0.7, len(stages) - 0.3)
    ax.set_ylim(0, 1.05)


def fig_waterfall(table_csv, png, pdf, confidence: float | None = None) -> None:
    """The waterfall figure: a panel per defense x threat model of ``table_csv`` (``waterfall.csv``),
    in the table's order, written as PNG and PDF."""
    theme()
    t = pd.read_csv(table_csv)
    if t.empty:
        raise ValueError(f"{table_csv}: no rows to draw")
    panels = list(dict.fromkeys(zip(t["defense"], t["threat"])))
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.2 * nrows + 0.6), squeeze=False, sharey=True)
    for ax, (d, tm) in zip(axes.flat, panels):
        sub = t[(t["defense"] == d) & (t["threat"] == tm)]
        _panel(ax, sub)
        pgd_only = (sub["stage"] == PGD_ONLY).any()
        ax.set_title(f"{d} ({tm}, n={int(sub['n_images'].iloc[0])}){' - PGD runs only' if pgd_only else ''}",
                     fontsize=9)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("robust accuracy")
    ci = f"{confidence:.0%}" if confidence is not None else "the table's"
    handles, labels = axes.flat[0].get_legend_handles_labels()
    height = 3.2 * nrows + 0.6
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle("Robustness waterfall: robust against every attack so far, per image\n"
                 f"(bands: {ci} bootstrap CI over images; faint: each stage alone; \u2212k: images the stage removed; "
                 "dashed: the strongest single run on the same images)", fontsize=9)
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1))  # the suptitle: tight_layout makes room for it
    save(fig, png, pdf)
