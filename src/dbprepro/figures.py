"""Paper 1's and paper 2's figures from the DAG's result files (every number drawn comes from the inputs).

* :func:`fig_attack_trajectories` (Fig. 1): the defended loss along the PGD attack in the three
  settings, on the same images - the deterministic (dwbox) attack climbs steadily, the attacks
  on the stochastic purifier wander.
* :func:`fig_loss_landscape` (Fig. 2): the loss landscape under the fixed randomness on the plane
  of the dwbox direction and the whitebox_eot residual direction, with both attack paths.
* :func:`fig_robustness_bars` (Fig. 3): robust accuracy with confidence intervals per defense and
  setting, from ``p1_table_main.csv``.

Paper 2's: :func:`fig_p2_lp_distance` (Fig. 1, l_p distances and the distance along the chain),
:func:`fig_p2_randomness` (Fig. 2, correlation matrices), :func:`fig_p2_compression_spectrum`
(Fig. 5, Jacobian singular values) and :func:`fig_p2_compression_vs_robustness` (Fig. 6).

Each function writes a PNG and a PDF (PDF without a creation date, so reruns are byte-stable).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

SETTING_ORDER = ("dwbox", "whitebox_eot", "whitebox")
SETTING_LABEL = {
    "dwbox": "DW-box (fixed randomness)",
    "whitebox_eot": "white-box + EOT",
    "whitebox": "white-box (1 draw / step)",
    "none": "no purification (classifier alone)",
}
SETTING_COLOR = {"dwbox": "tab:red", "whitebox_eot": "tab:blue", "whitebox": "tab:green", "none": "tab:gray"}


def _theme() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)


def _save(fig, png, pdf) -> None:
    from .io import atomic_path

    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")
    with atomic_path(pdf) as tmp:
        fig.savefig(tmp, format="pdf", bbox_inches="tight", metadata={"CreationDate": None})
    plt.close(fig)


def _ordered(settings) -> list[str]:
    return [s for s in SETTING_ORDER if s in settings] + sorted(s for s in settings if s not in SETTING_ORDER)


def _load_npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# -- Fig. 1: attack trajectories -----------------------------------------------------------------
def trajectory_plane(dw_final: np.ndarray, others: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) of one image's trajectory view: u = the final dwbox perturbation (unit L2); v = the
    top principal direction of the other settings' iterates [S, D] after removing their
    u-components (sign chosen so the mean coordinate is >= 0).  Orthonormal."""
    d = np.asarray(dw_final, np.float64).ravel()
    D = d.size
    u = d / np.linalg.norm(d) if np.linalg.norm(d) > 1e-12 else np.eye(D)[0]
    res = [np.asarray(o, np.float64).reshape(-1, D) for o in others if np.size(o)]
    v = None
    if res:
        R = np.concatenate(res)
        R = R - np.outer(R @ u, u)
        if np.linalg.norm(R) > 1e-12:
            v = np.linalg.svd(R, full_matrices=False)[2][0]
            v = v - (v @ u) * u
            v /= np.linalg.norm(v)
            if (R @ v).mean() < 0:
                v = -v
    if v is None:  # nothing off u: any orthonormal partner
        e = np.eye(D)[int(np.argmin(np.abs(u)))]
        v = e - (e @ u) * u
        v /= np.linalg.norm(v)
    return u, v


def fig_attack_trajectories(paths: Mapping[str, str | Path], traces: Mapping[str, str | Path], png, pdf,
                            max_images: int = 3) -> None:
    """Paper 1 Fig. 1: the attack paths of the tracked images projected on a per-image plane with
    the defended loss (from ``trace.parquet``: what the attacker measured at each iterate) on the
    z axis, and the loss vs iteration over all attacked images (median and inter-quartile band)."""
    if "dwbox" not in paths:
        raise ValueError("the trajectory figure needs the dwbox paths (they define the view's first axis)")
    _theme()
    settings = _ordered(paths)
    P = {s: _load_npz(paths[s]) for s in settings}
    T = {s: pd.read_parquet(traces[s]) for s in _ordered(traces)}
    ids = [int(i) for i in P["dwbox"]["ids"][:max_images]]
    for s in settings:
        missing = set(ids) - {int(i) for i in P[s]["ids"]}
        if missing:
            raise ValueError(f"{s} paths lack tracked images {sorted(missing)} (all settings must track the same)")

    k = len(ids)
    fig = plt.figure(figsize=(4.6 * (k + 1) + 1.0, 4.6))
    for j, sid in enumerate(ids):
        ax = fig.add_subplot(1, k + 1, j + 1, projection="3d")
        row = {s: int(np.flatnonzero(P[s]["ids"] == sid)[0]) for s in settings}
        deltas = {s: P[s]["deltas"][row[s]].astype(np.float64) for s in settings}
        u, v = trajectory_plane(deltas["dwbox"][-1], [deltas[s] for s in settings if s != "dwbox"])
        for s in settings:
            a, b = deltas[s] @ u, deltas[s] @ v
            tr = T.get(s)
            loss = np.full(a.size, np.nan)
            if tr is not None:
                t = tr[tr["id"] == sid].set_index("step")["loss"]
                steps = np.arange(a.size)
                loss = t.reindex(steps).to_numpy(dtype=np.float64)
            ax.plot(a, b, loss, color=SETTING_COLOR.get(s), marker="o", ms=2.5, lw=1.4,
                    label=SETTING_LABEL.get(s, s))
            ax.scatter([a[-1]], [b[-1]], [loss[-1]], color=SETTING_COLOR.get(s), marker="*", s=70)
        label = int(P["dwbox"]["labels"][row["dwbox"]])
        ax.set_title(f"image {sid} (label {label})", fontsize=10)
        ax.set_xlabel("along DW-box direction (L2)", fontsize=8, labelpad=2)
        ax.set_ylabel("top residual direction (L2)", fontsize=8, labelpad=2)
        ax.set_zlabel("defended CE loss", fontsize=8, labelpad=2)
        ax.tick_params(labelsize=7, pad=0)
        ax.view_init(elev=22, azim=-60)

    ax = fig.add_subplot(1, k + 1, k + 1)
    for s in _ordered(T):
        g = T[s].groupby("step")["loss"]
        med, lo, hi = g.median(), g.quantile(0.25), g.quantile(0.75)
        n_img = T[s]["id"].nunique()
        ax.plot(med.index, med.to_numpy(), color=SETTING_COLOR.get(s), marker="o", ms=3,
                label=f"{SETTING_LABEL.get(s, s)} (n={n_img})")
        ax.fill_between(med.index, lo.to_numpy(), hi.to_numpy(), color=SETTING_COLOR.get(s), alpha=0.2, lw=0)
    ax.set_xlabel("PGD iteration")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("defended CE loss (attacker's estimate)")
    ax.set_title("loss vs iteration: median, IQR over images", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False,
               bbox_to_anchor=(0.4, -0.04))
    fig.suptitle("Attack trajectories on the stochastic purifier (paper 1, Fig. 1): "
                 "perturbation projected on (DW-box direction, top residual direction), loss on z", fontsize=11)
    fig.subplots_adjust(wspace=0.45)
    _save(fig, png, pdf)


# -- Fig. 2: loss landscape --------------------------------------------------------------------
def fig_loss_landscape(npz_by_defense: Mapping[str, str | Path], png, pdf, max_images: int = 2) -> None:
    """Paper 1 Fig. 2: filled contours of the defended loss under the fixed randomness, one column
    per defense and one row per image, with the dwbox (red) and whitebox_eot (blue) paths."""
    if not npz_by_defense:
        raise ValueError("no landscape files")
    _theme()
    L = {d: _load_npz(p) for d, p in npz_by_defense.items()}
    defenses = list(L)
    rows = min(max_images, min(L[d]["ids"].size for d in defenses))
    if rows == 0:
        raise ValueError("the landscape files hold no images")
    fig, axes = plt.subplots(rows, len(defenses), figsize=(5.2 * len(defenses), 4.4 * rows), squeeze=False)
    for r in range(rows):
        # log10 colour scale shared by the row's defenses (the loss spans orders of magnitude)
        logs = {d: np.log10(np.maximum(L[d]["loss"][r], 1e-12)) for d in defenses}
        lo, hi = min(float(g.min()) for g in logs.values()), max(float(g.max()) for g in logs.values())
        levels = np.linspace(lo, max(hi, lo + 1e-3), 21)
        for c, d in enumerate(defenses):
            z, ax = L[d], axes[r, c]
            axis = z["axis"][r]
            cf = ax.contourf(axis, axis, logs[d].T, levels=levels, cmap="viridis")  # [i, j]: a=axis[i], b=axis[j]
            ax.contour(axis, axis, logs[d].T, levels=levels[::2], colors="white", linewidths=0.4, alpha=0.5)
            cb = fig.colorbar(cf, ax=ax, shrink=0.9, format="%.2f")
            cb.set_label("log10 defended CE loss (fixed randomness)")
            for key, color, name in (("dwbox", "red", "DW-box"), ("eot", "blue", "white-box + EOT")):
                path, pl = z[f"{key}_path"][r], z[f"{key}_path_loss"][r]
                ax.plot(path[:, 0], path[:, 1], color=color, marker="o", ms=3, lw=1.6,
                        label=f"{name} path (final loss {pl[-1]:.3g})")
                ax.plot(path[-1, 0], path[-1, 1], color=color, marker="*", ms=12, mec="white", mew=0.6)
            ax.plot(0, 0, marker="X", color="black", ms=8, mec="white", mew=0.6,
                    label=f"clean image (loss {float(z['clean_loss'][r]):.3g})")
            ext = float(z["extent"][r])
            ax.set_xlim(-ext, ext)
            ax.set_ylim(-ext, ext)
            ax.set_aspect("equal")
            ax.set_xlabel("u: DW-box final direction (L2)")
            ax.set_ylabel("v: EOT residual direction (L2)")
            ax.set_title(f"{d}: image {int(z['ids'][r])} (label {int(z['labels'][r])})", fontsize=10)
            ax.legend(fontsize=7, loc="lower left", framealpha=0.8)
    fig.suptitle("Loss landscape of the defended classifier under fixed randomness (paper 1, Fig. 2)",
                 fontsize=12)
    fig.tight_layout()
    _save(fig, png, pdf)


# -- Fig. 3: robustness bars -------------------------------------------------------------------
def fig_robustness_bars(table_csv, png, pdf, threat: str = "linf", attack: str = "pgd",
                        evaluation: str = "single", confidence: float | None = None) -> None:
    """Robust accuracy (Wilson CI error bars) per defense, one bar per setting; the clean accuracy
    of each row (under the setting's randomness) is drawn as a black tick above its bar."""
    _theme()
    t = pd.read_csv(table_csv)
    sub = t[(t["threat"] == threat) & (t["attack"] == attack) & (t["evaluation"] == evaluation)]
    if sub.empty:
        raise ValueError(f"{table_csv}: no rows for threat={threat!r}, attack={attack!r}, evaluation={evaluation!r}")
    defenses = list(dict.fromkeys(sub["defense"]))
    groups = {d: _ordered(set(sub.loc[sub["defense"] == d, "setting"])) for d in defenses}
    width = 0.8 / max(len(g) for g in groups.values())
    fig, ax = plt.subplots(figsize=(max(5.0, 0.75 * sum(len(g) for g in groups.values()) + 3.5), 4.2))
    x0 = np.arange(len(defenses))
    seen: set[str] = set()
    for gx, d in zip(x0, defenses):  # each defense's bars centred on its tick
        for k, s in enumerate(groups[d]):
            row = sub[(sub["defense"] == d) & (sub["setting"] == s)].iloc[0]
            acc = float(row["robust_accuracy"])
            err = [[acc - float(row["ci_low"])], [float(row["ci_high"]) - acc]]
            x = gx + width * (k - (len(groups[d]) - 1) / 2)
            ax.bar(x, acc, width * 0.92, color=SETTING_COLOR.get(s, "grey"), alpha=0.85,
                   label=None if s in seen else SETTING_LABEL.get(s, s), yerr=err, capsize=4,
                   error_kw=dict(lw=1, ecolor="black"))
            ax.hlines(float(row["clean_accuracy"]), x - width * 0.45, x + width * 0.45, colors="black", lw=2,
                      label=None if seen else "clean accuracy")
            ax.annotate(f"{acc:.2f}", (x, 0.01), ha="center", va="bottom", fontsize=8, color="white",
                        fontweight="bold")
            seen.add(s)
    ax.set_xticks(x0, defenses)
    ax.set_xlabel("defense")
    ax.set_ylabel(f"robust accuracy ({evaluation} evaluation)")
    ax.set_ylim(0, 1.05)
    r0 = sub.iloc[0]
    ci = f"{confidence:.0%}" if confidence is not None else "table's"
    ns = sorted({int(v) for v in sub["n_images"]})  # the families may attack fewer images than the main grid
    n_txt = f"n={ns[0]} images" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]} images per defense"
    ax.set_title(f"{attack.upper()} on DBP, {r0['norm']} eps={float(r0['eps']):.4g}, {n_txt} (paper 1, Fig. 3)\n"
                 f"bars: robust accuracy, {ci} Wilson CI; ticks: clean accuracy", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save(fig, png, pdf)


def fig_rbgm(npz, png, pdf) -> None:
    """Paper 1 Fig. 5: a CGPO perturbation before RBGM (the accumulated classifier gradient,
    standardised) and after it, against the standard normal (histogram and Q-Q plot)."""
    from scipy import stats

    _theme()
    z = _load_npz(npz)
    grad, delta = np.asarray(z["gradient"]), np.asarray(z["delta"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    lim = float(np.quantile(np.abs(grad), 0.995))
    bins = np.linspace(-max(lim, 4), max(lim, 4), 81)
    ax1.hist(grad, bins=bins, density=True, alpha=0.55, color="tab:orange", label="CGPO gradient G (standardised)")
    ax1.hist(delta, bins=bins, density=True, alpha=0.55, color="tab:blue", label="RBGM(G)")
    xs = np.linspace(bins[0], bins[-1], 400)
    ax1.plot(xs, stats.norm.pdf(xs), "k--", lw=1.2, label="N(0, 1)")
    ax1.set(xlabel="value", ylabel="density", title="distribution before and after RBGM")
    ax1.legend(fontsize=8)
    q = np.linspace(0.001, 0.999, 300)
    theo = stats.norm.ppf(q)
    ax2.plot(theo, np.quantile(grad, q), color="tab:orange", label=f"G: KS p = {stats.kstest(grad, 'norm').pvalue:.2g}")
    ax2.plot(theo, np.quantile(delta, q), color="tab:blue", label=f"RBGM(G): KS p = {stats.kstest(delta, 'norm').pvalue:.2g}")
    ax2.plot(theo, theo, "k--", lw=1)
    ax2.set(xlabel="standard normal quantile", ylabel="sample quantile", title="Q-Q plot against N(0, 1)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"RBGM (paper 1, Fig. 5): {int(z['n_images'])} images, t = {int(z['t'])}, "
                 f"lambda_t = {float(z['lambda']):.3f}", fontsize=11)
    _save(fig, png, pdf)


# -- paper 2 ---------------------------------------------------------------------------------------
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
    _theme()
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
    _save(fig, png, pdf)


def fig_p2_randomness(per_image_csv, example_npz, png, pdf) -> None:
    """Paper 2, Fig. 2: the correlation matrices of the purified-minus-clean vectors of one image,
    (a) M inputs in the eps-ball under one configuration, (b) one input under M configurations,
    and the distribution over images of the mean off-diagonal correlation of each."""
    _theme()
    d = pd.read_csv(per_image_csv)
    z = _load_npz(example_npz)
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
    _save(fig, png, pdf)


def fig_p2_compression_spectrum(npz_by_defense: Mapping[str, str | Path], png, pdf) -> None:
    """Paper 2, Fig. 5c: singular values of the Jacobian of P_xi at x (fixed randomness), per image
    for the first defense and the mean spectrum of every defense; 1 = no compression."""
    _theme()
    J = {d: _load_npz(p) for d, p in npz_by_defense.items()}
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
    _save(fig, png, pdf)


def fig_p2_compression_vs_robustness(per_image_csv, summary_csv, models_csv, png, pdf) -> None:
    """Paper 2, Fig. 6: per-image compression rate by robust / non-robust outcome of the dwbox
    attack on the same configuration (with the AUC and Spearman rho), and mean CR against dwbox
    robust accuracy across defenses."""
    _theme()
    d = pd.read_csv(per_image_csv)
    s = pd.read_csv(summary_csv).set_index("scope")
    m = pd.read_csv(models_csv)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    d = d.assign(outcome=np.where(d["robust"] > 0.5, "robust", "not robust"))
    order = [o for o in ("robust", "not robust") if o in set(d["outcome"])]
    sns.boxplot(data=d, x="outcome", y="cr", order=order, ax=ax1, color="white", width=0.5, fliersize=0)
    sns.stripplot(data=d, x="outcome", y="cr", order=order, ax=ax1, hue="config", palette="viridis", size=3.5,
                  alpha=0.75, jitter=0.25)
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
    _save(fig, png, pdf)
