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
Spearman rank correlation and by the ROC AUC of -CR as a score for "robust": the tables of
:mod:`dbprepro.paper2.compression_stats` (no torch), whose names this module re-exports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..randomness import Randomness, Stream
from .compression_stats import (association, compression_models_table, compression_table,  # noqa: F401
                                rank_auc)

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
