"""Loss landscapes of the defended classifier around an image (paper 1, Fig. 2).

With the purifier's randomness fixed (a configuration xi), the defended cross-entropy
L_xi(x') = CE(f(P_xi(x')), y) is a deterministic function of the input, so it can be drawn on a
plane through the clean image:

    grid[i, j] = L_xi(clip(x + a_i u + b_j v, 0, 1)),   a_i, b_j in [-extent, extent]

For each tracked image the plane is spanned by

* ``u``: the final dwbox perturbation (the attack on this very xi), normalised to unit L2;
* ``v``: the final whitebox_eot perturbation with its u-component removed, normalised
  (paper 1's "residual direction": what EOT over fresh randomness does that the deterministic
  attack does not).

Both attack paths (all PGD iterates) are projected onto (u, v) and the deterministic loss L_xi
is evaluated at each actual iterate; the norm of each iterate's off-plane component is stored
so a figure can say how much of the path the plane shows.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..purifiers import DefendedClassifier

log = logging.getLogger(__name__)

_TINY = 1e-12


def _fixed_draw(model: DefendedClassifier) -> int:
    rnd = model.purifier.randomness
    if rnd.mode != "fixed":
        raise ValueError("a loss landscape needs the purifier's randomness in 'fixed' mode "
                         f"(a deterministic loss), it is {rnd.mode!r}")
    return rnd.fixed_draw


@torch.no_grad()
def defended_loss(model: DefendedClassifier, images: torch.Tensor, y: int, sample_id: int,
                  batch_size: int = 256) -> np.ndarray:
    """Cross-entropy of ``model`` on ``images`` [N, C, H, W] (all views of one sample, clipped to
    [0, 1]) under the fixed randomness configuration, in batches; returns [N] float64."""
    draw = _fixed_draw(model)
    out = np.empty(images.shape[0], dtype=np.float64)
    for s in range(0, images.shape[0], batch_size):
        xb = images[s:s + batch_size].clamp(0, 1)
        ids = torch.full((xb.shape[0],), int(sample_id), dtype=torch.long)
        draws = torch.full_like(ids, draw)
        logits = model(xb, ids=ids, draws=draws)
        target = torch.full((xb.shape[0],), int(y), dtype=torch.long, device=logits.device)
        out[s:s + xb.shape[0]] = F.cross_entropy(logits, target, reduction="none").double().cpu().numpy()
    return out


def grid_axis(extent: float, n: int) -> np.ndarray:
    """The ``n`` grid coordinates in [-extent, extent] (the centre is on the grid when n is odd)."""
    if n < 2:
        raise ValueError(f"a landscape grid needs n >= 2 points per axis, got {n}")
    if not extent > 0:
        raise ValueError(f"extent must be > 0, got {extent}")
    return np.linspace(-float(extent), float(extent), int(n))


@torch.no_grad()
def loss_landscape(model: DefendedClassifier, x: torch.Tensor, y: int, ids: int, u: torch.Tensor,
                   v: torch.Tensor, extent: float, n: int, batch_size: int = 256) -> np.ndarray:
    """Defended cross-entropy at ``x + a u + b v`` on an n x n grid over [-extent, extent]^2.

    Args:
        model: a :class:`DefendedClassifier` whose purifier randomness is in fixed mode.
        x: the image, [C, H, W] or [1, C, H, W], in [0, 1].
        y: its label; ``ids``: its sample id (keys the replayable purifier noise).
        u, v: directions of the image's shape (or flattened), usually orthonormal.
        extent, n: the grid :func:`grid_axis` ``(extent, n)`` on both axes.
    Returns:
        ``[n, n]`` float64 array; ``out[i, j]`` is the loss at ``a = axis[i]``, ``b = axis[j]``.
    """
    _fixed_draw(model)
    x = x.reshape(1, *x.shape[-3:]) if x.ndim == 4 else x.unsqueeze(0)
    shape = x.shape[1:]
    u = torch.as_tensor(u, dtype=x.dtype, device=x.device).reshape(shape)
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device).reshape(shape)
    axis = torch.as_tensor(grid_axis(extent, n), dtype=x.dtype, device=x.device)
    a, b = torch.meshgrid(axis, axis, indexing="ij")
    a, b = a.reshape(-1, 1, 1, 1), b.reshape(-1, 1, 1, 1)
    out = np.empty(n * n, dtype=np.float64)
    for s in range(0, n * n, batch_size):  # build the batch lazily: n*n images may not fit at once
        pts = x + a[s:s + batch_size] * u + b[s:s + batch_size] * v
        out[s:s + pts.shape[0]] = defended_loss(model, pts, y, ids, batch_size)
    return out.reshape(n, n)


def plane_directions(d_dw: np.ndarray, d_eot: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal (u, v) from the final dwbox and whitebox_eot perturbations (flattened, float64).

    u = d_dw / |d_dw|; v = the part of d_eot orthogonal to u, normalised.  Degenerate cases
    (a zero dwbox perturbation, an EOT perturbation parallel to u) fall back to the other
    direction, then to a seeded random direction, so the result is always orthonormal.
    """
    d_dw, d_eot = np.asarray(d_dw, np.float64).ravel(), np.asarray(d_eot, np.float64).ravel()
    rng = np.random.default_rng(seed)

    def unit(w):
        nrm = np.linalg.norm(w)
        return w / nrm if nrm > _TINY else None

    u = unit(d_dw)
    if u is None:
        u = unit(d_eot)
        if u is None:
            u = unit(rng.standard_normal(d_dw.size))
        log.warning("dwbox final perturbation is zero; u falls back to another direction")
    v = unit(d_eot - (d_eot @ u) * u)
    while v is None:
        log.warning("whitebox_eot final perturbation has no component off u; v is a random direction")
        r = rng.standard_normal(u.size)
        v = unit(r - (r @ u) * u)
    return u, v


def project_path(deltas: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates [S, 2] of the iterates ``deltas`` [S, D] on (u, v) and the L2 norm [S] of
    their components off the plane."""
    deltas = np.asarray(deltas, np.float64).reshape(deltas.shape[0], -1)
    coords = np.stack([deltas @ u, deltas @ v], axis=1)
    off = deltas - coords[:, :1] * u - coords[:, 1:] * v
    return coords, np.linalg.norm(off, axis=1)


def landscape_for_image(model: DefendedClassifier, x: np.ndarray, y: int, sample_id: int,
                        dw_deltas: np.ndarray, eot_deltas: np.ndarray, shape: tuple[int, ...],
                        grid: int, extent_factor: float = 1.5, seed: int = 0,
                        device: torch.device | str = "cpu", batch_size: int = 256) -> dict[str, Any]:
    """Landscape, directions and both projected attack paths of one image.

    ``x`` [D] is the clean image flattened; ``dw_deltas``/``eot_deltas`` [steps + 1, D] the
    perturbation at every PGD iterate of the dwbox / whitebox_eot attacks on it.
    """
    u, v = plane_directions(dw_deltas[-1], eot_deltas[-1], seed=seed + int(sample_id))
    extent = extent_factor * max(float(np.linalg.norm(dw_deltas[-1])), float(np.linalg.norm(eot_deltas[-1])))
    if not extent > _TINY:
        extent = extent_factor * 1e-3  # both attacks stayed at x: a tiny window, still a valid grid
    xt = torch.as_tensor(np.asarray(x, np.float32).reshape(shape), device=device)
    ut = torch.as_tensor(u.astype(np.float32), device=device)
    vt = torch.as_tensor(v.astype(np.float32), device=device)
    grid_loss = loss_landscape(model, xt, y, sample_id, ut, vt, extent, grid, batch_size=batch_size)
    out: dict[str, Any] = dict(u=u, v=v, extent=extent, axis=grid_axis(extent, grid), loss=grid_loss)
    for name, deltas in (("dwbox", dw_deltas), ("eot", eot_deltas)):
        coords, off = project_path(deltas, u, v)
        pts = torch.as_tensor((np.asarray(x, np.float32)[None] + np.asarray(deltas, np.float32))
                              .reshape(-1, *shape), device=device)
        out[f"{name}_path"] = coords
        out[f"{name}_offplane"] = off
        out[f"{name}_path_loss"] = defended_loss(model, pts, y, sample_id, batch_size)
    out["clean_loss"] = float(defended_loss(model, xt[None], y, sample_id)[0])
    return out


def _image_shape(model: DefendedClassifier, dim: int) -> tuple[int, int, int]:
    c = int(model.purifier.unet.config.in_channels)
    side = int(round(math.sqrt(dim / c)))
    if c * side * side != dim:
        raise ValueError(f"cannot reshape flattened images of size {dim} to {c} x H x H")
    return c, side, side


def _load_paths(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def compute_landscapes(classifier_dir, diffusion_dir, dwbox_paths, eot_paths, out_npz, *,
                       purification: dict[str, Any], variance_type: str, seed: int, fixed_draw: int,
                       n_images: int, grid: int, device: torch.device | str = "cpu",
                       extent_factor: float = 1.5, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Landscapes of the first ``n_images`` tracked images (see the module docstring) -> ``out_npz``.

    ``dwbox_paths``/``eot_paths`` are the ``paths.npz`` of the dwbox and whitebox_eot attacks
    (same images, same order).  The defended classifier uses the dwbox attack's randomness
    (``seed``, ``fixed_draw``).  Keys written (m images, S = steps + 1, n = grid):
    ``ids, labels [m]; extent [m]; axis [m, n]; loss [m, n, n]; u, v [m, D];
    {dwbox,eot}_path [m, S, 2]; {dwbox,eot}_path_loss, {dwbox,eot}_offplane [m, S]; clean_loss [m];
    seed, fixed_draw, extent_factor`` (scalars).
    """
    from ..attacks import settings_randomness
    from ..purifiers import load_defense as build_defense
    from ..io import savez

    dw, eot = _load_paths(dwbox_paths), _load_paths(eot_paths)
    if dw["ids"].size == 0 or eot["ids"].size == 0:
        raise ValueError("no tracked attack paths: set attacks.track_images >= 1")
    m = min(int(n_images), dw["ids"].size, eot["ids"].size)
    if m < n_images:
        log.warning("only %d tracked images available (asked for %d)", m, n_images)
    if not np.array_equal(dw["ids"][:m], eot["ids"][:m]):
        raise ValueError(f"dwbox and whitebox_eot tracked different images: {dw['ids'][:m]} vs {eot['ids'][:m]}")
    if not np.allclose(dw["x"][:m], eot["x"][:m]):
        raise ValueError("dwbox and whitebox_eot paths.npz hold different clean images for the same ids")
    model = build_defense(classifier_dir, diffusion_dir, purification, variance_type,
                          settings_randomness("dwbox", seed, fixed_draw), device)
    shape = _image_shape(model, dw["x"].shape[1])
    results = []
    for i in range(m):
        sid, y = int(dw["ids"][i]), int(dw["labels"][i])
        res = landscape_for_image(model, dw["x"][i], y, sid, dw["deltas"][i], eot["deltas"][i], shape, grid,
                                  extent_factor=extent_factor, seed=seed, device=device, batch_size=batch_size)
        log.info("image %d (label %d): extent %.4g, clean loss %.4g, landscape loss in [%.4g, %.4g], "
                 "final loss dwbox %.4g / whitebox_eot %.4g (fixed randomness)", sid, y, res["extent"],
                 res["clean_loss"], res["loss"].min(), res["loss"].max(), res["dwbox_path_loss"][-1],
                 res["eot_path_loss"][-1])
        results.append(res)
    arrays = {k: np.stack([np.asarray(r[k]) for r in results]) for k in results[0]}
    arrays.update(ids=dw["ids"][:m].astype(np.int64), labels=dw["labels"][:m].astype(np.int64),
                  seed=np.int64(seed), fixed_draw=np.int64(fixed_draw), extent_factor=np.float64(extent_factor))
    savez(Path(out_npz), **arrays)
    return arrays
