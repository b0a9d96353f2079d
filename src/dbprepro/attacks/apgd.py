"""APGD's step-size control (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", Alg. 1), for any per-sample loss and gradient.

torchattacks' APGD takes neither a loss on the purifier's chain states, nor per-sample draw indices,
nor an EM-weighted gradient, so the schedule is implemented here from the paper, once, for every
attack that steps with it (DiffAttack, DiffHammer): initial step 2 eps, momentum 0.75, checkpoints
p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); at a checkpoint the step is
halved (and the iterate reset to the best point, without momentum) where fewer than rho = 75 % of the
steps since the last checkpoint increased the loss, or where neither the step nor the best loss
changed since it.  The best point is the iterate with the highest loss.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .base import Norm, ascent_direction

APGD_MOMENTUM, APGD_RHO = 0.75, 0.75


def apgd_checkpoints(steps: int) -> list[int]:
    """APGD's checkpoints w_j = ceil(p_j * steps) (Sec. 3.2), w_0 = 0 excluded."""
    p, out = [0.0, 0.22], []
    while p[-1] < 1:
        w = math.ceil(p[-1] * steps - 1e-9)  # 0.41 * 100 is 41.000000000000007 in floating point
        if 0 < w < steps and (not out or w > out[-1]):
            out.append(w)
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return out


def apgd(loss_and_grad: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
         delta: torch.Tensor, *, eps: float, norm: Norm, steps: int,
         project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
         ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Run APGD from the perturbation ``delta`` of ``x``: ``loss_and_grad(s, delta)`` returns the
    per-sample loss [B] the schedule controls and the ascent gradient at iterate s (s = 0..steps; the
    last only measures), ``project(x, delta)`` maps a perturbation into the threat model.

    Returns the best perturbation, its loss [B] and the losses of every iterate (steps + 1 of [B])."""
    B, view = x.shape[0], (-1, *([1] * (x.ndim - 1)))
    checkpoints = set(apgd_checkpoints(steps))
    eta = torch.full((B,), 2 * eps, device=x.device, dtype=x.dtype)
    hist: list[torch.Tensor] = []
    prev = delta
    for s in range(steps + 1):
        loss, grad = loss_and_grad(s, delta)
        loss = loss.detach()
        hist.append(loss)
        if s == 0:
            best, best_delta, best_grad = loss.clone(), delta.clone(), grad.clone()
            ck_eta, ck_best, ck_last, increases = eta.clone(), best.clone(), 0, torch.zeros(B, device=x.device)
        else:
            increases += (loss > last_loss).float()
            up = loss > best
            best = torch.where(up, loss, best)
            best_delta[up], best_grad[up] = delta[up], grad[up]
        last_loss = loss
        if s == steps:
            break
        if s in checkpoints:
            reduce = (increases < APGD_RHO * (s - ck_last)) | ((eta == ck_eta) & (best == ck_best))
            eta = torch.where(reduce, eta / 2, eta)
            r = reduce.view(view)  # restart from the best point, without momentum
            delta, prev, grad = torch.where(r, best_delta, delta), torch.where(r, best_delta, prev), \
                torch.where(r, best_grad, grad)
            last_loss = torch.where(reduce, best, last_loss)
            ck_eta, ck_best, ck_last, increases = eta.clone(), best.clone(), s, torch.zeros_like(increases)
        z = project(x, delta + eta.view(view) * ascent_direction(grad, norm))
        if s > 0:
            a = APGD_MOMENTUM
            z = project(x, delta + a * (z - delta) + (1 - a) * (delta - prev))
        prev, delta = delta, z
    return best_delta, best, hist
