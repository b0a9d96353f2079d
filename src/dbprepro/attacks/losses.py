"""Per-sample classification losses an attacker maximises (on logits ``z`` and labels ``y``):

``ce``   cross-entropy;
``cw``   Carlini-Wagner margin max_{j != y} z_j - z_y (> 0: misclassified);
``dlr``  Croce & Hein's (2020) difference of logits ratio -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3), with
         z_pi1 >= z_pi2 >= ... the sorted logits: shift- and scale-invariant (needs >= 3 classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "cw", "dlr")
DLR_EPS = 1e-12  #: Croce & Hein's guard of the DLR denominator


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin max_{j != y} z_j - z_y per sample (> 0: misclassified)."""
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DLR per sample: the margin divided by the gap between the largest and the third-largest logit."""
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
    top = logits.sort(dim=1, descending=True).values
    return margin_loss(logits, y) / (top[:, 0] - top[:, 2] + DLR_EPS)


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample attack loss ``loss`` (one of :data:`LOSSES`)."""
    if loss == "cw":
        return margin_loss(logits, y)
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "dlr":
        return dlr_loss(logits, y)
    raise ValueError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
