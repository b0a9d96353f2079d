"""Network calls, counted in images: the unit of the cost model (:mod:`dbprepro.cost`).

Torch-free building blocks that the cost model and every registered attack (its
``calls_per_image``) share.  A purification chain makes ``S`` network calls; a defended forward is
``S unet_fwd + 1 clf_fwd``; its exact gradient (``grad_mode`` exact or checkpoint) is the forward
chain, then per step a recomputation + backward: ``S unet_fwd + S unet_grad + 1 clf_grad``
(``autograd``: ``S unet_grad + 1 clf_grad``).
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("unet_fwd", "unet_grad", "unet_train", "clf_fwd", "clf_grad", "clf_train")


@dataclass
class Calls:
    """Network calls (in images) of one kind each."""

    unet_fwd: float = 0.0
    unet_grad: float = 0.0
    unet_train: float = 0.0
    clf_fwd: float = 0.0
    clf_grad: float = 0.0
    clf_train: float = 0.0

    def __add__(self, other: "Calls") -> "Calls":
        return Calls(**{k: getattr(self, k) + getattr(other, k) for k in KINDS})

    def __mul__(self, n: float) -> "Calls":
        return Calls(**{k: getattr(self, k) * n for k in KINDS})

    __rmul__ = __mul__

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in KINDS}


def purify(S: int) -> Calls:
    return Calls(unet_fwd=S)


def defended_forward(S: int) -> Calls:
    return Calls(unet_fwd=S, clf_fwd=1)


def purify_grad(S: int, grad_mode: str = "exact") -> Calls:
    """Gradient of the purified image w.r.t. the input (a vector-Jacobian product)."""
    if grad_mode == "autograd":
        return Calls(unet_grad=S)
    # exact / checkpoint: forward chain, then recompute + backward; budget: the same at most (its kept
    # steps skip the recomputation, how many depends on the batch's measured activations)
    return Calls(unet_fwd=S, unet_grad=S)


def defended_grad(S: int, grad_mode: str = "exact") -> Calls:
    return purify_grad(S, grad_mode) + Calls(clf_grad=1)


def bpda_grad(S: int) -> Calls:
    """BPDA: the chain runs forward only, the backward pass skips it (identity)."""
    return Calls(unet_fwd=S, clf_grad=1)
