"""Paper 1's figures from the DAG's result files (every number drawn comes from the inputs).

* :func:`fig_attack_trajectories` (Fig. 1): the defended loss along the PGD attack in the three
  settings, on the same images - the deterministic (dwbox) attack climbs steadily, the attacks
  on the stochastic purifier wander.
* :func:`fig_loss_landscape` (Fig. 2): the loss landscape under the fixed randomness on the plane
  of the dwbox direction and the whitebox_eot residual direction, with both attack paths.
* :func:`fig_robustness_bars` (Fig. 3): robust accuracy with confidence intervals per defense and
  setting, from ``p1_table_main.csv``.

Each function writes a PNG and a PDF through :func:`dbprepro.plotting.save`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib.ticker
import numpy as np
import pandas as pd

from ..plotting import load_npz, plt, save, theme  # pyplot from plotting: loaded after the Agg backend is set

SETTING_ORDER = ("dwbox", "whitebox_eot", "whitebox")
SETTING_LABEL = {
    "dwbox": "DW-box (fixed randomness)",
    "whitebox_eot": "white-box + EOT",
    "whitebox": "white-box (1 draw / step)",
    "none": "no purification (classifier alone)",
}
SETTING_COLOR = {"dwbox": "tab:red", "whitebox_eot": "tab:blue", "whitebox": "tab:green", "none": "tab:gray"}


def _ordered(settings) -> list[str]:
    return [s for s in SETTING_ORDER if s in settings] + sorted(s for s in settings if s not in SETTING_ORDER)


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


def common_image_traces(traces: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The traces restricted to the images every one of them covers: the loss panel compares the
    settings on the same images (the DW-box run may attack more, ``attacks.dwbox_n_images``)."""
    if not traces:
        return {}
    common = set.intersection(*({int(i) for i in t["id"].unique()} for t in traces.values()))
    return {s: t[t["id"].isin(common)] for s, t in traces.items()}


def fig_attack_trajectories(paths: Mapping[str, str | Path], traces: Mapping[str, str | Path], png, pdf,
                            max_images: int = 3) -> None:
    """Paper 1 Fig. 1: the attack paths of the tracked images projected on a per-image plane with
    the defended loss (from ``trace.parquet``: what the attacker measured at each iterate) on the
    z axis, and the loss vs iteration over all attacked images (median and inter-quartile band)."""
    if "dwbox" not in paths:
        raise ValueError("the trajectory figure needs the dwbox paths (they define the view's first axis)")
    theme()
    settings = _ordered(paths)
    P = {s: load_npz(paths[s]) for s in settings}
    T = {s: pd.read_parquet(traces[s]) for s in _ordered(traces)}
    T = common_image_traces(T)
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
    save(fig, png, pdf)


# -- Fig. 2: loss landscape --------------------------------------------------------------------
def fig_loss_landscape(npz_by_defense: Mapping[str, str | Path], png, pdf, max_images: int = 2) -> None:
    """Paper 1 Fig. 2: filled contours of the defended loss under the fixed randomness, one column
    per defense and one row per image, with the dwbox (red) and whitebox_eot (blue) paths."""
    if not npz_by_defense:
        raise ValueError("no landscape files")
    theme()
    L = {d: load_npz(p) for d, p in npz_by_defense.items()}
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
    save(fig, png, pdf)


# -- Fig. 3: robustness bars -------------------------------------------------------------------
def fig_robustness_bars(table_csv, png, pdf, threat: str = "linf", attack: str = "pgd",
                        evaluation: str = "single", confidence: float | None = None) -> None:
    """Robust accuracy (Wilson CI error bars) per defense, one bar per setting; the clean accuracy
    of each row (under the setting's randomness) is drawn as a black tick above its bar."""
    theme()
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
    save(fig, png, pdf)


def fig_rbgm(npz, png, pdf) -> None:
    """Paper 1 Fig. 5: a CGPO perturbation before RBGM (the accumulated classifier gradient,
    standardised) and after it, against the standard normal (histogram and Q-Q plot)."""
    from scipy import stats

    theme()
    z = load_npz(npz)
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
    save(fig, png, pdf)
