"""Paper 2's figures from the DAG's result files (every number drawn comes from the inputs).

:func:`fig_p2_lp_distance` (Fig. 1, l_p distances and the distance along the chain),
:func:`fig_p2_randomness` (Fig. 2, correlation matrices), :func:`fig_p2_compression_spectrum`
(Fig. 5, Jacobian singular values) and :func:`fig_p2_compression_vs_robustness` (Fig. 6).

Each function writes a PNG and a PDF through :func:`dbprepro.plotting.save`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns

from ..plotting import load_npz, plt, save, theme  # pyplot from plotting: loaded after the Agg backend is set

P2_PAIR_LABEL = {
    "adv": "||x_adv - x|| (attack)",
    "purified_adv": "||P(x_adv) - x||",
    "purified_clean": "||P(x) - x||",
    "purified_adv_vs_clean": "||P(x_adv) - P(x)|| (same draw)",
}
P2_PAIR_COLOR = {"adv": "tab:gray", "purified_adv": "tab:red", "purified_clean": "tab:blue",
                 "purified_adv_vs_clean": "tab:purple"}


def fig_p2_lp_distance(per_image_csv, chain_parquet, png, pdf) -> None:
    """Paper 2, Fig. 1: distributions of the four distances (l2, l-inf) over images x draws, and the
    distance to the clean image along the chain (median and IQR over images), from x and x_adv."""
    theme()
    d = pd.read_csv(per_image_csv)
    ch = pd.read_parquet(chain_parquet)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.4))
    for c, norm in enumerate(("l2", "linf")):
        ax = axes[0, c]
        vals = [d[f"{p}_{norm}"].to_numpy() for p in P2_PAIR_LABEL]
        hi = max(float(np.max(v)) for v in vals)
        bins = np.linspace(0, hi * 1.02 + 1e-9, 40)
        for p, v in zip(P2_PAIR_LABEL, vals):
            ax.hist(v, bins=bins, alpha=0.55, color=P2_PAIR_COLOR[p], label=f"{P2_PAIR_LABEL[p]}: mean {v.mean():.3f}")
        ax.set(xlabel=f"{norm} distance ([0, 1] pixel units)", ylabel="images x draws",
               title=f"{norm}: distances to the clean image x (n={len(d)})")
        ax.legend(fontsize=7.5)
        ax = axes[1, c]
        for start, color, name in (("clean", "tab:blue", "purifying x"), ("adv", "tab:red", "purifying x_adv")):
            sub = ch[ch["start"] == start]
            g = sub.groupby("step")[norm]
            med, lo, hi_ = g.median(), g.quantile(0.25), g.quantile(0.75)
            ax.plot(med.index, med.to_numpy(), color=color, marker="o", ms=3, label=f"{name} (median, IQR)")
            ax.fill_between(med.index, lo.to_numpy(), hi_.to_numpy(), color=color, alpha=0.2, lw=0)
        steps = ch.drop_duplicates("step").sort_values("step")
        t_star_step = int(steps.loc[steps["phase"] == "forward", "step"].max())
        ax.axvline(t_star_step, color="black", ls="--", lw=1)
        ax.annotate(f"t* = {int(steps.loc[steps['step'] == t_star_step, 't'].iloc[0])}", (t_star_step, 0),
                    xycoords=("data", "axes fraction"), xytext=(3, 4), textcoords="offset points", fontsize=8)
        ax.axhline(float(d[f"adv_{norm}"].mean()), color="tab:gray", ls=":", lw=1.2, label="mean ||x_adv - x||")
        ax.set_xticks(steps["step"].to_numpy()[::2], [f"{t}" for t in steps["t"].to_numpy()[::2]])
        ax.set(xlabel="chain state: forward diffusion to t*, then reverse steps (label = timestep)",
               ylabel=f"{norm} distance to clean x", title=f"{norm} distance along the purification chain")
        ax.legend(fontsize=8)
    fig.suptitle("Purification moves images further from the clean image (paper 2, Fig. 1)", fontsize=12)
    fig.tight_layout()
    save(fig, png, pdf)


def fig_p2_randomness(per_image_csv, example_npz, png, pdf) -> None:
    """Paper 2, Fig. 2: the correlation matrices of the purified-minus-clean vectors of one image,
    (a) M inputs in the eps-ball under one configuration, (b) one input under M configurations,
    and the distribution over images of the mean off-diagonal correlation of each."""
    theme()
    d = pd.read_csv(per_image_csv)
    z = load_npz(example_npz)
    fig, axes = plt.subplots(1, 3, figsize=(15.5, 4.6), gridspec_kw={"width_ratios": [1, 1, 1.15]})
    for ax, key, title in ((axes[0], "corr_same", "(a) inputs in the eps-ball, same randomness"),
                           (axes[1], "corr_different", "(b) same input, different randomness")):
        c = z[key]
        im = ax.imshow(c, vmin=-1, vmax=1, cmap="RdBu_r")
        off = c[~np.eye(c.shape[0], dtype=bool)].mean()
        ax.set(title=f"{title}\nmean off-diagonal {off:.3f}", xlabel="sample m", ylabel="sample m'")
        ax.grid(False)
        fig.colorbar(im, ax=ax, shrink=0.8, label="Pearson correlation")
    ax = axes[2]
    bins = np.linspace(min(-0.2, float(d[["corr_same_randomness", "corr_different_randomness"]].min().min())), 1, 41)
    for col, color, name in (("corr_same_randomness", "tab:red", "(a) same randomness"),
                             ("corr_different_randomness", "tab:blue", "(b) different randomness")):
        ax.hist(d[col], bins=bins, alpha=0.6, color=color, label=f"{name}: mean {d[col].mean():.3f}")
    ax.set(xlabel="mean off-diagonal correlation (per image)", ylabel="images",
           title=f"{len(d)} images, M = {int(d['samples'].iloc[0])} samples each")
    ax.legend(fontsize=8)
    fig.suptitle(f"Randomness dominates the purified image (paper 2, Fig. 2); example image {int(z['id'])} "
                 f"(label {int(z['label'])})", fontsize=12)
    fig.tight_layout()
    save(fig, png, pdf)


def fig_p2_compression_spectrum(npz_by_defense: Mapping[str, str | Path], png, pdf) -> None:
    """Paper 2, Fig. 5c: singular values of the Jacobian of P_xi at x (fixed randomness), per image
    for the first defense and the mean spectrum of every defense; 1 = no compression."""
    theme()
    J = {d: load_npz(p) for d, p in npz_by_defense.items()}
    first = next(iter(J))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    sv = J[first]["singular_values"]
    for j in range(sv.shape[0]):
        ax1.plot(np.arange(1, sv.shape[1] + 1), sv[j], lw=1.2,
                 label=f"image {int(J[first]['ids'][j])} (label {int(J[first]['labels'][j])})")
    ax1.axhline(1.0, color="black", ls="--", lw=1, label="identity map")
    ax1.set_yscale("log")
    ax1.set(xlabel="index (descending)", ylabel="singular value of dP/dx",
            title=f"{first}: Jacobian spectra, configuration {int(J[first]['config'])}")
    ax1.legend(fontsize=7)
    palette = sns.color_palette("tab10", len(J))
    for c, (d, z) in zip(palette, J.items()):
        s = z["singular_values"]
        if s.size == 0:
            continue
        ax2.plot(np.arange(1, s.shape[1] + 1), s.mean(0), color=c, lw=1.6,
                 label=f"{d} (n={s.shape[0]}; share < 1: {(s < 1).mean():.2f})")
    ax2.axhline(1.0, color="black", ls="--", lw=1)
    ax2.set_yscale("log")
    ax2.set(xlabel="index (descending)", ylabel="mean singular value", title="mean spectrum per defense")
    ax2.legend(fontsize=8)
    fig.suptitle("Compression within a randomness configuration: Jacobian of the purifier (paper 2, Fig. 5)",
                 fontsize=12)
    fig.tight_layout()
    save(fig, png, pdf)


def fig_p2_compression_vs_robustness(per_image_csv, summary_csv, models_csv, png, pdf) -> None:
    """Paper 2, Fig. 6: per-image compression rate by robust / non-robust outcome of the dwbox
    attack on the same configuration (with the AUC and Spearman rho), and mean CR against dwbox
    robust accuracy across defenses."""
    theme()
    d = pd.read_csv(per_image_csv)
    s = pd.read_csv(summary_csv).set_index("scope")
    m = pd.read_csv(models_csv)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    d = d.assign(outcome=np.where(d["robust"] > 0.5, "robust", "not robust"))
    order = [o for o in ("robust", "not robust") if o in set(d["outcome"])]
    sns.boxplot(data=d, x="outcome", y="cr", order=order, ax=ax1, color="white", width=0.5, fliersize=0)
    state = np.random.get_state()  # seaborn jitters with numpy's global generator: seed it, so the figure
    np.random.seed(0)              # is byte-reproducible, and leave the caller's state as it was
    try:
        sns.stripplot(data=d, x="outcome", y="cr", order=order, ax=ax1, hue="config", palette="viridis", size=3.5,
                      alpha=0.75, jitter=0.25)
    finally:
        np.random.set_state(state)
    a = s.loc["all"]
    ax1.set(xlabel="outcome of the dwbox attack on the same configuration", ylabel="compression rate CR (lower = more)",
            title=f"per image x configuration (n={int(a['n'])}): AUC(low CR -> robust) = {a['auc_low_cr_robust']:.2f}, "
                  f"Spearman = {a['spearman_rho']:.2f}")
    ax1.title.set_fontsize(9)
    ax1.legend(title="configuration", fontsize=7, title_fontsize=8)
    ax2.scatter(m["mean_cr"], m["robust_accuracy_dwbox"], s=60, color="tab:red", zorder=3)
    for _, r in m.iterrows():
        ax2.annotate(r["defense"], (r["mean_cr"], r["robust_accuracy_dwbox"]), xytext=(5, 3),
                     textcoords="offset points", fontsize=8)
    rho = m["spearman_across_defenses"].iloc[0]
    ax2.set(xlabel="mean compression rate", ylabel="robust accuracy under fixed randomness (dwbox)",
            title=f"across defenses (n={len(m)}): Spearman = {rho:.2f}" if np.isfinite(rho) else
            f"across defenses (n={len(m)})")
    fig.suptitle("Compression rate vs robustness under fixed randomness (paper 2, Fig. 6)", fontsize=12)
    fig.tight_layout()
    save(fig, png, pdf)
