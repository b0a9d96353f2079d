"""The robustness waterfall figure (issue 17) from ``waterfall.csv``
(:mod:`dbprepro.paper1.waterfall`): one panel per defense x threat model, robust accuracy as a
step line across the stages present, weakest attack first, with its confidence interval; the
``single`` and ``worst`` evaluations as two series, each one's strongest known level a dashed
line labelled with the attack that reached it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..plotting import plt, save, theme  # pyplot from plotting: loaded after the Agg backend is set
from .waterfall import EVALUATIONS, STAGES, STRONGEST

SERIES = {"single": ("tab:blue", "one-shot (single)"), "worst": ("tab:red", "worst of N")}


def _panel(ax, sub: pd.DataFrame) -> None:
    """One defense x threat: the stages it has on the x axis, a staircase per evaluation (a
    level per stage, joined by the drop to the next), the strongest known level dashed."""
    stages = [s for s in STAGES if s in set(sub["stage"])]
    x_of = {s: i for i, s in enumerate(stages)}
    for k, ev in enumerate(EVALUATIONS):
        rows = sub[(sub["evaluation"] == ev) & (sub["stage"] != STRONGEST)]
        if rows.empty:
            continue
        color, label = SERIES.get(ev, ("grey", ev))
        x = np.array([x_of[s] for s in rows["stage"]], dtype=float) + (k - 0.5) * 0.12
        y = rows["robust_accuracy"].to_numpy(float)
        err = np.vstack([y - rows["ci_low"].to_numpy(float), rows["ci_high"].to_numpy(float) - y])
        ax.plot(np.repeat(x, 2) + np.tile([-0.5, 0.5], len(x)), np.repeat(y, 2), color=color, lw=1.5, label=label)
        ax.errorbar(x, y, yerr=err, fmt="o", ms=4, color=color, capsize=3, lw=1)
        best = sub[(sub["evaluation"] == ev) & (sub["stage"] == STRONGEST)]
        if not best.empty:
            b = best.iloc[0]
            ax.axhline(float(b["robust_accuracy"]), color=color, ls="--", lw=1, alpha=0.7)
            ax.text(0.02, 0.97 - 0.08 * k, f"{ev}: {float(b['robust_accuracy']):.2f} by {b['attack']} ({b['setting']})",
                    transform=ax.transAxes, ha="left", va="top", fontsize=7, color=color)
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
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.0 * nrows), squeeze=False, sharey=True)
    for ax, (d, tm) in zip(axes.flat, panels):
        sub = t[(t["defense"] == d) & (t["threat"] == tm)]
        _panel(ax, sub)
        ns = sorted({int(v) for v in sub["n_images"]})
        n_txt = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]}"
        ax.set_title(f"{d} ({tm}, {n_txt})", fontsize=9)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("robust accuracy")
    ci = f"{confidence:.0%}" if confidence is not None else "the table's"
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle("Robustness waterfall: weakest to strongest attack per defense "
                 f"(error bars: {ci} Wilson CI; dashed: strongest known)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    save(fig, png, pdf)
