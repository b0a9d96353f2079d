"""Paper 2, claim 4: the compression rate of the purifier under fixed randomness, a
gradient-free indicator of robustness.

Paper 2 says that within one randomness configuration xi the purifier P_xi "compresses" the
eps-ball around x toward its anchor P_xi(x), and that the remaining robustness correlates with a
compression rate measured without gradients.  Its exact formula is not public; this module uses

    CR(x; xi) = (1 / M) sum_m ||P_xi(x + delta_m) - P_xi(x)|| / ||delta_m||          (lower = more compression)

* delta_m, m = 1..M (``analysis.compression.probes``), are random perturbations of radius eps
  (``analysis.radius``, default the threat model's eps) drawn by :func:`sample_perturbations`:
  ``uniform_linf`` = uniform in the L-inf ball [-eps, eps]^D; ``sphere_l2`` = uniformly random
  direction on the L2 sphere of radius eps (``analysis.distribution``).  Probes are keyed by
  (seed, image id, probe index) through :class:`~dbprepro.randomness.Randomness` (stream PROBE),
  so they are the same in every run and for every defense.
* x + delta_m is clipped to [0, 1] (the purifier's domain); the denominator is the norm of the
  perturbation actually applied, (x + delta_m).clip(0, 1) - x.
* ||.|| is the L2 norm by default (``analysis.compression.norm``; ``linf`` is available), over the
  whole image in [0, 1] units.
* Every probe and the anchor use the same configuration xi (draw ``k`` of the fixed key space);
  the identity map has CR = 1 and the linear map x -> c x has CR = c exactly.

The Jacobian view (paper 2's Fig. 5c): :func:`jacobian` computes the full D x D Jacobian of
x -> P_xi(x) at x (one batched forward + backward pass with D copies of x, each seeded with one
row of the identity as output gradient: exact reverse-mode, no finite differences) and
:func:`singular_values` its spectrum; the map includes the output clamp to [0, 1], so clamped
output pixels give zero rows.  Cheap for 8 x 8 digits (D = 64); D = 3072 on CIFAR-10 is chunked.

Relation to robustness: per image, CR under configuration k against the outcome of the dwbox
attack on that same configuration (robust = still correctly classified), summarised by the
Spearman rank correlation and by the ROC AUC of -CR as a score for "robust" (:func:`rank_auc`,
the Mann-Whitney statistic; AUC > 0.5 means lower CR goes with robustness).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats

from ..randomness import Randomness, Stream

log = logging.getLogger(__name__)

DISTRIBUTIONS = ("uniform_linf", "sphere_l2")
PROBE_INDEX = {"randomness": 1, "compression": 2}  # the ``index`` key of each analysis' probes

PurifyFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sample_perturbations(seed: int, ids, m: int, shape, distribution: str, radius: float, analysis: str,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """Random perturbations [B, m, *shape] of radius ``radius`` (module docstring), row (b, j) a
    pure function of (seed, ids[b], j, analysis)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; known: {', '.join(DISTRIBUTIONS)}")
    if radius <= 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    r = Randomness(seed, "fixed")
    idr, dr = ids.repeat_interleave(m), torch.arange(m).repeat(ids.numel())
    if distribution == "uniform_linf":
        d = (r.uniform(idr, dr, Stream.PROBE, PROBE_INDEX[analysis], shape) * 2 - 1) * radius
    else:
        g = r.normal(idr, dr, Stream.PROBE, PROBE_INDEX[analysis], shape).double()
        d = (g / g.flatten(1).norm(dim=1).view(-1, *([1] * len(shape))) * radius).float()
    return d.view(ids.numel(), m, *shape).to(device or "cpu")


def _norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    v = v.double().flatten(1)
    if norm == "l2":
        return v.norm(dim=1)
    if norm == "linf":
        return v.abs().amax(1)
    raise ValueError(f"unknown norm {norm!r}; known: l2, linf")


@torch.no_grad()
def compression_rate(purify: PurifyFn, x: torch.Tensor, ids: torch.Tensor, draw: int, deltas: torch.Tensor,
                     norm: str = "l2", batch_size: int = 256, clip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """CR of every image of ``x`` [B, C, H, W] under configuration ``draw``, from the probes
    ``deltas`` [B, M, C, H, W]: returns (CR [B], ratios [B, M]).

    ``purify(x, ids, draws)`` is the purifier (any map of a batch; per-sample ids and draws
    select the randomness).  Probes whose applied perturbation is zero (all clipped away) give
    NaN ratios and are left out of the mean.
    """
    B, M = deltas.shape[:2]
    if tuple(deltas.shape[2:]) != tuple(x.shape[1:]) or deltas.shape[0] != x.shape[0]:
        raise ValueError(f"deltas {tuple(deltas.shape)} do not fit the images {tuple(x.shape)}")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    # inputs: the B anchors first, then the B*M probes (image-major), purified in fixed chunks
    probes = x[:, None] + deltas
    if clip:
        probes = probes.clamp(0, 1)
    applied = (probes - x[:, None]).flatten(0, 1)
    inputs = torch.cat([x, probes.flatten(0, 1)])
    in_ids = torch.cat([ids, ids.repeat_interleave(M)])
    draws = torch.full_like(in_ids, int(draw))
    outs = torch.cat([purify(inputs[i:i + batch_size], in_ids[i:i + batch_size], draws[i:i + batch_size])
                      for i in range(0, inputs.shape[0], batch_size)])
    anchor, moved = outs[:B], outs[B:]
    num = _norm(moved - anchor.repeat_interleave(M, dim=0), norm)
    den = _norm(applied, norm)
    ratio = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))
    ratio = ratio.view(B, M).cpu().numpy()
    valid = np.isfinite(ratio)
    cr = np.where(valid.any(1), np.where(valid, ratio, 0).sum(1) / np.maximum(valid.sum(1), 1), np.nan)
    return cr, ratio


def jacobian(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Jacobian [D_out, D_in] of ``fn`` (a batched map [k, *shape] -> [k, *out_shape] acting on
    each sample independently) at one input ``x`` [*shape], by reverse mode: row i is the
    gradient of output component i, all rows of a chunk in one batched backward pass."""
    x = x.detach()
    d_in = x.numel()
    with torch.no_grad():
        d_out = int(fn(x[None]).numel())
    rows = []
    for i0 in range(0, d_out, chunk):
        k = min(chunk, d_out - i0)
        xr = x.expand(k, *x.shape).clone().requires_grad_(True)
        with torch.enable_grad():
            out = fn(xr).reshape(k, d_out)
            seed = torch.zeros_like(out)
            seed[torch.arange(k), torch.arange(i0, i0 + k)] = 1.0
            (g,) = torch.autograd.grad(out, xr, seed)
        rows.append(g.reshape(k, d_in).detach())
    return torch.cat(rows)


def singular_values(J: torch.Tensor) -> np.ndarray:
    """Singular values of a Jacobian, descending (float64)."""
    return torch.linalg.svdvals(J.double()).cpu().numpy()


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


# -- the stages ----------------------------------------------------------------------------------
def run_compression(classifier_dir, diffusion_dir, test_path, manifest, *, records_out, jacobian_out,
                    defense: str, configs: list[int], n_images: int, probes: int, norm: str, distribution: str,
                    radius: float, jacobian_images: int, batch_size: int, purification: dict[str, Any],
                    variance_type: str, seed: int, device: torch.device) -> pd.DataFrame:
    """CR of the first ``n_images`` test images under each fixed configuration of ``configs``
    (rows id, label, config, cr, cr_std, clean_correct = the classifier is right on P_xi(x)),
    and the Jacobian singular values of the first ``jacobian_images`` under ``configs[0]``."""
    from ..data import batches, load_split
    from ..purifiers import load_defense as build_defense
    from ..io import savez, write_parquet

    split = load_split(test_path, manifest).head(n_images)
    model = build_defense(classifier_dir, diffusion_dir, purification, variance_type,
                          Randomness(seed, "fixed", fixed_draw=configs[0]), device)
    pur = model.purifier
    x, ids, labels = split.images.to(device), split.ids, split.labels
    deltas = sample_perturbations(seed, ids, probes, x.shape[1:], distribution, radius, "compression", device)

    def purify(xb, idb, db):
        return pur(xb, ids=idb, draws=db)

    frames = []
    for k in configs:
        cr, ratios = compression_rate(purify, x, ids, k, deltas, norm=norm, batch_size=batch_size)
        with torch.no_grad():
            pred = torch.cat([model(x[sl], ids=ids[sl], draws=torch.full_like(ids[sl], k)).argmax(1).cpu()
                              for sl in batches(len(ids), batch_size)])
        frames.append(pd.DataFrame({"defense": defense, "id": ids.numpy(), "label": labels.numpy(), "config": k,
                                    "cr": cr, "cr_std": np.nanstd(ratios, axis=1),
                                    "clean_correct": (pred == labels).numpy().astype(np.int8)}))
        log.info("%s configuration %d: CR mean %.4f (median %.4f, range %.4f-%.4f), clean accuracy %.4f", defense, k,
                 np.nanmean(cr), np.nanmedian(cr), np.nanmin(cr), np.nanmax(cr), frames[-1]["clean_correct"].mean())
    df = pd.concat(frames, ignore_index=True)
    write_parquet(df, records_out)

    m = min(jacobian_images, len(ids))
    svals, k0 = [], configs[0]
    for j in range(m):
        sid = ids[j:j + 1]

        def fn(xb, sid=sid):
            n = xb.shape[0]
            return pur(xb, ids=sid.expand(n), draws=torch.full((n,), k0, dtype=torch.long))

        svals.append(singular_values(jacobian(fn, x[j], chunk=batch_size)))
    savez(jacobian_out, ids=ids[:m].numpy(), labels=labels[:m].numpy(), config=np.int64(k0),
          singular_values=np.stack(svals) if svals else np.zeros((0, x[0].numel())), defense=np.array(defense))
    if svals:
        sv = np.stack(svals)
        log.info("%s Jacobian (configuration %d, %d images): top singular value %.4f, median %.4f, "
                 "share below 1: %.3f", defense, k0, m, sv[:, 0].mean(), np.median(sv), (sv < 1).mean())
    return df


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
