"""APGD's step-size control (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", Alg. 1), for any per-sample loss and gradient.

torchattacks' APGD takes neither a loss on the purifier's chain states, nor per-sample draw indices,
nor an EM-weighted gradient, so the schedule is implemented here, once, for every attack that steps
with it (DiffAttack, DiffHammer): initial step 2 eps, momentum 0.75 (none on the first step), the
step halved at a checkpoint where condition 1 (too few of the recent steps increased the loss) or
condition 2 (the step was not halved at the previous checkpoint and the best loss has not improved
since it) holds, and the iterate then reset to the best point (the iterate with the highest loss,
which :func:`apgd` returns).  Two rules (``rule``):

``paper`` (the paper's Sec. 3.2)
    checkpoints w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
    (:func:`apgd_checkpoints`); condition 1: fewer than rho = 75 % of the steps since the last
    checkpoint increased the loss (the first compared with the start point's loss); condition 2 at
    w_1 compares with w_0 = 0; after a reset the next step has no momentum.
``autoattack`` (the official AutoAttack code, which DiffAttack's official code and torchattacks' ``APGD``
    inherit)
    checkpoints every k iterations, k = max(int(0.22 N), 1) shrinking by max(int(0.03 N), 1) down to
    max(int(0.06 N), 1) after each (:func:`autoattack_checkpoints`; equal to the paper's for N = 100);
    condition 1: at most rho k of the last k steps increased the loss, where the first window's
    first step is compared with 0 (the code reads the not yet written end of its loss buffer),
    not with the start point's loss; condition 2 never holds at the first checkpoint; after a reset
    the momentum term keeps the iterate before the reset (x_best - x_{s-1}), and the increases are
    counted on the raw losses.  With the same start point, loss and deterministic model, :func:`apgd`
    under this rule returns torchattacks' ``APGD.attack_single_run`` best point (tests/test_diffattack.py).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .base import Norm, ascent_direction

APGD_MOMENTUM, APGD_RHO = 0.75, 0.75
APGD_RULES = ("paper", "autoattack")


def apgd_checkpoints(steps: int) -> list[int]:
    """APGD's checkpoints w_j = ceil(p_j * steps) (Sec. 3.2), w_0 = 0 excluded."""
    p, out = [0.0, 0.22], []
    while p[-1] < 1:
        w = math.ceil(p[-1] * steps - 1e-9)  # 0.41 * 100 is 41.000000000000007 in floating point
        if 0 < w < steps and (not out or w > out[-1]):
            out.append(w)
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return out


def autoattack_checkpoints(steps: int) -> list[int]:
    """The official AutoAttack code's checkpoints (iterates after which the step size is checked):
    every k iterations, k = max(int(0.22 N), 1), then k <- max(k - max(int(0.03 N), 1), max(int(0.06 N), 1))."""
    k, k_min, decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    out, s = [], k
    while s <= steps:
        out.append(s)
        k = max(k - decr, k_min)
        s += k
    return out


def apgd(loss_and_grad: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
         delta: torch.Tensor, *, eps: float, norm: Norm, steps: int,
         project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], rule: str = "paper"
         ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Run APGD from the perturbation ``delta`` of ``x``: ``loss_and_grad(s, delta)`` returns the
    per-sample loss [B] the schedule controls and the ascent gradient at iterate s (s = 0..steps; the
    last only measures), ``project(x, delta)`` maps a perturbation into the threat model.

    Returns the best perturbation, its loss [B] and the losses of every iterate (steps + 1 of [B])."""
    if rule not in APGD_RULES:
        raise ValueError(f"unknown APGD rule {rule!r}; known: {', '.join(APGD_RULES)}")
    official = rule == "autoattack"
    B, view = x.shape[0], (-1, *([1] * (x.ndim - 1)))
    checkpoints = set(autoattack_checkpoints(steps) if official else apgd_checkpoints(steps))
    eta = torch.full((B,), 2 * eps, device=x.device, dtype=x.dtype)
    hist: list[torch.Tensor] = []
    prev = delta
    for s in range(steps + 1):
        loss, grad = loss_and_grad(s, delta)
        loss = loss.detach()
        hist.append(loss)
        if s == 0:
            best, best_delta, best_grad = loss.clone(), delta.clone(), grad.clone()
            ck_best, ck_last, increases = best.clone(), 0, torch.zeros(B, device=x.device)
            # condition 2 needs an unchanged step since the previous checkpoint (paper: w_0 = 0 counts;
            # the official code starts as if the step had just been halved)
            halved_last = torch.full((B,), official, dtype=torch.bool, device=x.device)
        else:
            # the official code compares the first window's first step with 0, not with the start's loss
            before = torch.zeros_like(loss) if (official and s == 1) else last_loss
            increases += (loss > before).float()
            up = loss > best
            best = torch.where(up, loss, best)
            best_delta[up], best_grad[up] = delta[up], grad[up]
        last_loss = loss
        if s == steps:
            break
        if s in checkpoints:
            window = s - ck_last
            few = increases <= APGD_RHO * window if official else increases < APGD_RHO * window
            reduce = few | (~halved_last & (best <= ck_best))
            eta = torch.where(reduce, eta / 2, eta)
            r = reduce.view(view)  # reset to the best point
            delta, grad = torch.where(r, best_delta, delta), torch.where(r, best_grad, grad)
            if not official:  # the paper's reading: the step after a reset has no momentum
                prev = torch.where(r, best_delta, prev)
                last_loss = torch.where(reduce, best, last_loss)
            ck_best, ck_last, increases, halved_last = best.clone(), s, torch.zeros_like(increases), reduce
        z = project(x, delta + eta.view(view) * ascent_direction(grad, norm))
        if s > 0:
            a = APGD_MOMENTUM
            z = project(x, delta + a * (z - delta) + (1 - a) * (delta - prev))
        prev, delta = delta, z
    return best_delta, best, hist
