"""Paper 2, claim 2: the purified image is dominated by the diffusion model's randomness.

For one clean image x (paper 2's Fig. 2a/b, 100 x 100 matrices; here M = ``analysis.randomness.samples``):

(a) *same randomness*: M inputs x + delta_m inside the eps-ball (random perturbations of
    :func:`~dbprepro.paper2.compression.sample_perturbations`), all purified with the same fixed
    randomness configuration xi;
(b) *different randomness*: x itself purified with M different configurations xi_1..xi_M.

In both cases the "purified vectors" v_m = P(.) - x (purified minus the clean original, flattened)
are correlated pairwise (Pearson, ``np.corrcoef``: an M x M matrix).  The summary of one image is
the mean off-diagonal correlation.  Paper 2 reports 0.9954 for (a) and 0.2368 for (b) on CIFAR-10:
the randomness, not the input perturbation, decides where the purification goes.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import torch

from .compression import sample_perturbations

log = logging.getLogger(__name__)


def correlation_matrix(vectors) -> np.ndarray:
    """Pearson correlation matrix [M, M] of M vectors (rows), via ``np.corrcoef``."""
    v = np.asarray(vectors, dtype=np.float64).reshape(len(vectors), -1)
    return np.corrcoef(v)


def mean_off_diagonal(c: np.ndarray) -> float:
    """Mean of the off-diagonal entries of a square matrix (NaN entries, e.g. of constant
    vectors, are left out)."""
    c = np.asarray(c, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 2:
        raise ValueError(f"need a square matrix of size >= 2, got shape {c.shape}")
    return float(np.nanmean(c[~np.eye(c.shape[0], dtype=bool)]))


@torch.no_grad()
def purified_vectors(purifier, x: torch.Tensor, sid: int, *, samples: int, same_draw: int, distribution: str,
                     radius: float, seed: int, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The M purified-minus-clean vectors of one image [C, H, W] in settings (a) and (b):
    (a) x + delta_m clipped to [0, 1], all under configuration ``same_draw``; (b) x under
    configurations 0..M-1.  Each [M, D] float64."""
    ids = torch.full((samples,), int(sid), dtype=torch.long)
    deltas = sample_perturbations(seed, ids[:1], samples, x.shape, distribution, radius, "randomness",
                                  x.device)[0]
    inputs_a = (x[None] + deltas).clamp(0, 1)
    inputs_b = x[None].expand(samples, *x.shape)
    draws_a = torch.full((samples,), int(same_draw), dtype=torch.long)
    draws_b = torch.arange(samples, dtype=torch.long)

    def run(inputs, draws):
        return torch.cat([purifier(inputs[i:i + batch_size], ids=ids[i:i + batch_size], draws=draws[i:i + batch_size])
                          for i in range(0, samples, batch_size)])

    va = (run(inputs_a, draws_a) - x[None]).flatten(1).double().cpu().numpy()
    vb = (run(inputs_b, draws_b) - x[None]).flatten(1).double().cpu().numpy()
    return va, vb


def run_randomness(diffusion_dir, test_path, manifest, *, per_image_csv, summary_csv, example_out, n_images: int,
                   samples: int, same_draw: int, distribution: str, radius: float, batch_size: int,
                   purification: dict[str, Any], variance_type: str, seed: int, device: torch.device) -> pd.DataFrame:
    """The stage: per image, the mean off-diagonal correlation in settings (a) and (b), the mean
    norm of the purified vectors; the two matrices of the first image go to ``example_out``."""
    from ..data import load_split
    from ..purifiers import load_purifier as build_purifier
    from ..io import savez
    from ..metrics import write_table
    from ..randomness import Randomness

    split = load_split(test_path, manifest).head(n_images)
    purifier = build_purifier(diffusion_dir, purification, variance_type, Randomness(seed, "fixed"), device)
    rows, example = [], None
    for j in range(len(split)):
        sid = int(split.ids[j])
        va, vb = purified_vectors(purifier, split.images[j].to(device), sid, samples=samples, same_draw=same_draw,
                                  distribution=distribution, radius=radius, seed=seed, batch_size=batch_size)
        ca, cb = correlation_matrix(va), correlation_matrix(vb)
        rows.append({"id": sid, "label": int(split.labels[j]), "samples": samples,
                     "corr_same_randomness": mean_off_diagonal(ca), "corr_different_randomness": mean_off_diagonal(cb),
                     "norm_same_randomness": float(np.linalg.norm(va, axis=1).mean()),
                     "norm_different_randomness": float(np.linalg.norm(vb, axis=1).mean())})
        if example is None:
            example = dict(id=np.int64(sid), label=np.int64(split.labels[j]), corr_same=ca, corr_different=cb,
                           image=split.images[j].numpy())
    per_image = pd.DataFrame(rows)
    write_table(per_image, per_image_csv, decimals=6)
    summary = pd.DataFrame([{"setting": s, "description": desc, "n_images": len(per_image), "samples": samples,
                             "mean": float(per_image[f"corr_{s}"].mean()),
                             "std": float(per_image[f"corr_{s}"].std(ddof=1)) if len(per_image) > 1 else 0.0,
                             "min": float(per_image[f"corr_{s}"].min()), "max": float(per_image[f"corr_{s}"].max())}
                            for s, desc in (("same_randomness", "(a) M inputs in the eps-ball, one configuration"),
                                            ("different_randomness", "(b) one input, M configurations"))])
    write_table(summary, summary_csv)
    savez(example_out, **example)
    log.info("mean off-diagonal correlation: same randomness %.4f, different randomness %.4f (%d images, M=%d)",
             summary["mean"].iloc[0], summary["mean"].iloc[1], len(per_image), samples)
    return per_image
