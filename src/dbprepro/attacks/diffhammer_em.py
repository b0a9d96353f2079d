"""DiffHammer's E-step and its in-loop N-evaluation (the parts of :mod:`dbprepro.attacks.diffhammer`
that act on the losses, gradients and predictions of one iterate's K draws, not on the network).

E-step (:func:`estep_weights`): the weight q_i of draw i, the probability that phi_i belongs to the
set of draws sharing one vulnerability (already fooled, or fooled by the shared next step); the
variants ``paper`` / ``official`` / ``uniform`` are described in :mod:`~dbprepro.attacks.diffhammer`.

**Underflow guard** (:func:`guarded_sigmoid`).  q_i = sigmoid(lam z_i) is exactly 0 in float32 once
lam z_i < -88.7 (measured on this CPU; margin z_i < -17.7 at lam = 5): when every draw of an image
is that far from being fooled, all its weights vanish, the M-step gradient is 0 and the image
stalls.  Where at least one weight of an image is representable the weights are the paper's,
unchanged; where all of them underflow they are the paper's up to one common factor,
q_i = exp(log sigmoid(lam z_i) - max_j log sigmoid(lam z_j)) (the draw nearest to being fooled gets
1), so the weighted gradient keeps the direction exact arithmetic gives it.  (The ``official``
M-step divides by sum_i q_i, so its result is then exact; the ``paper`` one divides by K, so its
magnitude - which only the stepwise-EM average sees - is that of the rescaled weights.)

**In-loop N-evaluation** (Ka1b0/DiffHammer ``attacker.py``, ``update_batch_metrics``): the K draws
that give an iterate's gradients also score it (the first scored iterate is the clean image);
the records are per-metric minima over every scored iterate of every restart (:class:`InLoopRecord`):
Avg.Rob = 1 - max_t (fooled fraction of iterate t's draws), Wor.Rob = 1 - [any draw of any
iterate fooled].  The two minima need not come from one iterate.  The iterate the attack returns
(:class:`KeptIterate`, the code's ``x_adv_best``) is updated at the first iterate where some draw
is fooled and at every iterate whose mean loss over the draws exceeds all earlier ones.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import Norm, ascent_direction

ESTEPS = ("paper", "official", "uniform")
METRICS = ("single", "mean", "worst", "vote")


def _dir(g: torch.Tensor, norm: Norm) -> torch.Tensor:
    """:func:`ascent_direction` of [B, K, D] gradients, per (image, draw)."""
    B, K = g.shape[:2]
    return ascent_direction(g.reshape(B * K, -1), norm).reshape(g.shape)


def guarded_sigmoid(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sigmoid(z) of [B, K] logits, and a [B] mask of the images whose K weights all underflowed
    to 0; those get exp(log sigmoid(z_i) - max_j log sigmoid(z_j)) instead (the module docstring)."""
    q = torch.sigmoid(z)
    dead = ~(q > 0).any(1)
    if dead.any():
        ls = F.logsigmoid(z[dead])
        q = q.clone()
        q[dead] = torch.exp(ls - ls.amax(1, keepdim=True))
    return q, dead


def estep_weights(L: torch.Tensor, g: torch.Tensor, *, variant: str, norm: Norm, eps: float,
                  lam: float = 5.0, em_steps: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E-step weights q [B, K] of the K draws of each image from their losses ``L`` [B, K] and
    input gradients ``g`` [B, K, D], the M-step normaliser [B] (K or sum_i q_i) and the [B] mask
    of the images whose final weights the underflow guard rescaled."""
    B, K = L.shape
    if variant == "uniform":
        q = torch.ones_like(L)
        return q, q.sum(1), torch.zeros(B, dtype=torch.bool, device=L.device)
    if variant == "paper":
        delta = torch.zeros_like(g[:, 0])  # [B, D]
        for _ in range(int(em_steps)):
            q, _ = guarded_sigmoid(lam * (L + torch.einsum("bkd,bd->bk", g, delta)))
            delta = eps * ascent_direction((q[:, :, None] * g).sum(1), norm)
        q, dead = guarded_sigmoid(lam * (L + torch.einsum("bkd,bd->bk", g, delta)))
        return q, torch.full_like(L[:, 0], float(K)), dead
    if variant == "official":
        cand = _dir(g, norm)  # [B, K(j), D]
        score = F.elu(L[:, None, :] + eps * torch.einsum("bjd,bid->bji", cand, g)).sum(2)  # [B, j]
        best = cand[torch.arange(B), score.argmax(1)]  # [B, D]
        q, dead = guarded_sigmoid(lam * (L + torch.einsum("bkd,bd->bk", g, best)))
        return q, q.sum(1), dead
    raise ValueError(f"unknown E-step {variant!r}; known: {', '.join(ESTEPS)}")


class InLoopRecord:
    """Per-image minima over the scored iterates of the N-evaluation metrics (``single``, ``mean``,
    ``worst``, ``vote``), the official in-loop records: a restart updates the images it runs on."""

    def __init__(self, B: int):
        self.correct = {k: np.ones(B, dtype=np.float64) for k in METRICS}

    def update(self, idx: np.ndarray, scores: dict[str, np.ndarray]) -> None:
        for k in METRICS:
            self.correct[k][idx] = np.minimum(self.correct[k][idx], scores[k])

    def attack_success_rate(self) -> np.ndarray:
        """The code's per-image ``adv_asr_avg``: the largest fooled fraction of any scored iterate."""
        return 1.0 - self.correct["mean"]


class KeptIterate:
    """The iterate one restart returns per image (the code's ``x_adv_best``): updated at the first
    scored iterate where some draw is fooled, and at every scored iterate whose mean loss over its
    draws is larger than every earlier one's (strictly: on ties the earlier iterate stays)."""

    def __init__(self, delta0: torch.Tensor):
        B = delta0.shape[0]
        self.delta = delta0.detach().clone()
        self.iteration = np.full(B, -1, dtype=np.int64)
        self.fooled = np.zeros(B, dtype=bool)
        self.mean_loss = np.full(B, -np.inf)
        self.scores = {k: np.ones(B, dtype=np.float64) for k in METRICS}

    def update(self, t: int, delta: torch.Tensor, fooled_any: np.ndarray, mean_loss: np.ndarray,
               scores: dict[str, np.ndarray]) -> np.ndarray:
        """Offer scored iterate ``t`` (perturbation ``delta`` [B, ...]); returns the [B] mask it was kept for."""
        keep = (fooled_any & ~self.fooled) | (mean_loss > self.mean_loss)
        self.fooled |= fooled_any
        self.mean_loss = np.maximum(self.mean_loss, mean_loss)
        self.iteration[keep] = t
        kt = torch.as_tensor(keep, device=delta.device)
        self.delta[kt] = delta.detach()[kt]
        for k in METRICS:
            self.scores[k][keep] = scores[k][keep]
        return keep
