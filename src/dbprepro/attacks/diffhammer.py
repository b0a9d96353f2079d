"""DiffHammer (Wang, Fu, Han, Xiang, NeurIPS 2024, OpenReview ZJ2ONmSgCS): a selective attack on a
stochastic purifier by expectation-maximisation over the K purification draws of each step.

Each iteration t draws K purifications phi_i of the current iterate x + r (draw indices as
:class:`~dbprepro.attacks.pgd.PGD`'s: step s, draw k, restart r use ``(r * (steps + 1) + s) * K + k``)
and computes, in one batched forward/backward pass over the K draws, every draw's loss L_i and
its *exact* input gradient g_i = J_i^T a_i (the engine's gradient through the whole chain).

E-step (``estep``), the weight q_i of draw i - the probability that phi_i belongs to the set of
draws sharing one vulnerability (already fooled, or fooled by the shared next step):

``paper`` (Alg. 1)
    Delta~ = argmax_{Delta in the eps-ball} sum_i sigmoid(lam (L_i + Delta^T g_i)), by ``em_steps``
    alternations Delta <- eps dir(sum_i q_i g_i), q_i <- sigmoid(lam (L_i + Delta^T g_i)) from
    Delta = 0; the M-step normalises by K.
``official`` (Ka1b0/DiffHammer as coded)
    Delta is chosen among the K candidates dir(g_j) by sum_i ELU(L_i + eps dir(g_j)^T g_i);
    q_i = sigmoid(lam (L_i + dir(g_j^)^T g_i)) without the eps factor; the M-step normalises by
    sum_i q_i.  (The code's 5-step EM loop never updates its iterate: one E-step.)
``uniform``
    q_i = 1: the M-step is EOT's mean gradient, DiffHammer reduces to PGD-EOT (an ablation).

With the margin loss (``loss: cw``, max_{j != y} z_j - z_y) L_i > 0 means draw i is fooled, so an
already-fooled draw gets q_i close to 1 and a robust draw, the attack cannot reach, close to 0.

M-step: g = sum_i q_i g_i / (K or sum_i q_i), then the stepwise EM average
g_t <- t^-alpha g + (1 - t^-alpha) g_{t-1} (``em_alpha``; 0 = no averaging) and a PGD step
(sign or L2-normalised, projection, clip) of size ``threat.alpha``.

Departures, on purpose:
- **No gradient grafting.** The paper backpropagates g~ = sum_i q_i a_i once, through one chosen
  draw phi^ (``J_phi^^T g~`` instead of sum_i q_i J_i^T a_i).  That saves K - 1 chain backward
  passes, but it changes the result: a draw's Jacobian is not another's (2411.16598 App. D.1.5
  measures a relative gradient error of about 1 for the official grafted backward).  Here every
  draw's own exact gradient is used, so the cost is K defended gradients per step, like PGD-EOT.
- **Input-space linearisation.** The paper's a_i is the gradient at the purified image (cheap
  without J_i); Delta^T a_i treats the purifier as the identity.  Since g_i = J_i^T a_i is computed
  anyway, the E-step uses the exact first-order model L_i(x + r + Delta) ~ L_i + Delta^T g_i.
- **Schedule.** Constant-step PGD (``schedule: pgd``), the library's PGD update; the paper's APGD
  (step 2 eps, momentum 0.75, checkpoints) and its 3 restarts with CW/CE/DLR are not implemented.
- **Evaluation.** The final iterate is evaluated on ``eval_draws`` fresh draws the attacker never saw
  (``correct_mean`` = Avg.Rob, ``correct_worst`` = Wor.Rob per image), not in the loop: the
  official metrics take the worst over every iteration's draws (evaluate-while-optimising).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..calls import Calls, defended_grad
from .base import NORMS, Attack, AttackResult, Norm, ascent_direction, evaluation_calls, perturbation_norms, project
from .losses import LOSSES, attack_loss, margin_loss  # noqa: F401 (re-exported)
from .pgd import step_draws
from .protocols import Setting, _check_randomness, base_setting, evaluate_draws, summarise_evaluations
from .registry import register_attack

ESTEPS = ("paper", "official", "uniform")


def _dir(g: torch.Tensor, norm: Norm) -> torch.Tensor:
    """:func:`ascent_direction` of [B, K, D] gradients, per (image, draw)."""
    B, K = g.shape[:2]
    return ascent_direction(g.reshape(B * K, -1), norm).reshape(g.shape)


def estep_weights(L: torch.Tensor, g: torch.Tensor, *, variant: str, norm: Norm, eps: float,
                  lam: float = 5.0, em_steps: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """E-step weights q [B, K] of the K draws of each image from their losses ``L`` [B, K] and
    input gradients ``g`` [B, K, D], and the M-step normaliser [B] (K or sum_i q_i)."""
    B, K = L.shape
    if variant == "uniform":
        q = torch.ones_like(L)
        return q, q.sum(1)
    if variant == "paper":
        delta = torch.zeros_like(g[:, 0])  # [B, D]
        for _ in range(int(em_steps)):
            q = torch.sigmoid(lam * (L + torch.einsum("bkd,bd->bk", g, delta)))
            delta = eps * ascent_direction((q[:, :, None] * g).sum(1), norm)
        q = torch.sigmoid(lam * (L + torch.einsum("bkd,bd->bk", g, delta)))
        return q, torch.full_like(L[:, 0], float(K))
    if variant == "official":
        cand = _dir(g, norm)  # [B, K(j), D]
        score = F.elu(L[:, None, :] + eps * torch.einsum("bjd,bid->bji", cand, g)).sum(2)  # [B, j]
        best = cand[torch.arange(B), score.argmax(1)]  # [B, D]
        q = torch.sigmoid(lam * (L + torch.einsum("bkd,bd->bk", g, best)))
        return q, q.sum(1)
    raise ValueError(f"unknown E-step {variant!r}; known: {', '.join(ESTEPS)}")


@register_attack
class DiffHammer(Attack):
    """DiffHammer's EM attack (module docstring) on a :class:`DefendedClassifier` (or any module
    ``model(x, ids=, draws=)`` with a ``purifier.randomness``).

    Args:
        model, setting, norm, eps, alpha, steps, eot_chunk, track: as :class:`~dbprepro.attacks.pgd.PGD`.
        draws: K, purification draws per step (forced to 1 outside ``whitebox_eot``).
        estep: ``paper`` | ``official`` | ``uniform``; em_lam, em_steps: its sigmoid slope and
            (``paper``) alternations; em_alpha: stepwise-EM exponent (0: none).
        loss: ``cw`` (margin, the E-step's "fooled" sign) or ``ce``.
    """

    name = "diffhammer"
    config_section = "diffhammer"
    private_section = True
    waterfall_stages = (("DiffHammer", None),)
    waterfall_rank = 60

    # -- the registered attack ------------------------------------------------------------------
    @classmethod
    def settings(cls, attacks: dict[str, Any], threat: str) -> list[str]:
        return cls.section_settings(attacks, threat)

    @classmethod
    def eval_draws(cls, attacks: dict[str, Any]) -> int:
        """N of the N-evaluation: ``diffhammer.eval_draws``, else ``attacks.eval_draws``."""
        n = attacks["diffhammer"].get("eval_draws")
        return int(attacks["eval_draws"] if n is None else n)

    @classmethod
    def calls_per_image(cls, attacks: dict[str, Any], setting: str, S: int, grad_mode: str) -> tuple[Calls, bool]:
        """K defended gradients per step (the E-step reuses their losses and gradients: no extra
        forward), steps + 1 passes per restart (the last measures the final loss), then the
        N-evaluation."""
        d = attacks["diffhammer"]
        K = d["draws"] if setting == "whitebox_eot" else 1
        grad = defended_grad(S, grad_mode) * (d["restarts"] * (d["steps"] + 1) * K)
        return grad + evaluation_calls({**attacks, "eval_draws": cls.eval_draws(attacks)}, setting, S), False

    @classmethod
    def run_batch(cls, model, x, y, ids, *, setting, threat, attacks, seed, track=0):
        d = attacks["diffhammer"]
        attack = cls(model, setting, threat["norm"], threat["eps"], threat["alpha"], steps=d["steps"],
                     draws=d["draws"], estep=d["estep"], em_lam=d["em_lam"], em_steps=d["em_steps"],
                     em_alpha=d["em_alpha"], loss=d["loss"], restarts=d["restarts"],
                     eot_chunk=d.get("eot_chunk", 4096), track=track)
        res = attack(x, y, ids)
        preds = evaluate_draws(model, res.x_adv, ids, cls.eval_draws(attacks), setting)
        cols = {"id": ids.numpy(), "label": y.cpu().numpy(),
                **{f"correct_{k}": v for k, v in summarise_evaluations(preds, y.cpu().numpy()).items()},
                **{f"norm_{k}": v for k, v in perturbation_norms(res.x_adv, x).items()},
                "loss_start": res.loss[:, 0], "loss_end": res.loss[:, -1]}
        return cols, res

    # -- the attack -----------------------------------------------------------------------------
    def __init__(self, model, setting: Setting, norm: Norm = "linf", eps: float = 8 / 255,
                 alpha: float = 2 / 255, steps: int = 50, draws: int = 10, estep: str = "paper",
                 em_lam: float = 5.0, em_steps: int = 5, em_alpha: float = 0.5, loss: str = "cw",
                 restarts: int = 1, eot_chunk: int = 4096, track: int = 0):
        base = base_setting(setting)
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
        if estep not in ESTEPS or loss not in LOSSES:
            raise ValueError(f"estep must be one of {ESTEPS}, loss one of {LOSSES}")
        if eps <= 0 or alpha <= 0 or steps < 1 or draws < 1 or restarts < 1 or em_steps < 1 or em_alpha < 0:
            raise ValueError("eps, alpha > 0; steps, draws, restarts, em_steps >= 1; em_alpha >= 0")
        _check_randomness(setting, model.purifier.randomness)
        self.model, self.setting, self.norm = model, base, norm
        self.eps, self.alpha, self.steps = float(eps), float(alpha), int(steps)
        self.K = int(draws) if base == "whitebox_eot" else 1
        self.estep, self.em_lam, self.em_steps, self.em_alpha = estep, float(em_lam), int(em_steps), float(em_alpha)
        self.loss, self.restarts = loss, int(restarts)
        self.eot_chunk, self.track = int(eot_chunk), int(track)

    def draws(self, restart: int, step: int) -> torch.Tensor:
        """Draw indices [K] of ``step`` of ``restart`` (PGD's schedule, :func:`~dbprepro.attacks.pgd.step_draws`)."""
        return step_draws(self.setting, self.model.purifier.randomness.fixed_draw, restart, step, self.steps, self.K)

    def per_draw(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, draws: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Losses [B, K] and exact input gradients [B, K, D] of every (image, draw), the K draws of
        a step batched (image-major, at most ``eot_chunk`` images x draws per pass)."""
        B, K = x.shape[0], draws.numel()
        L = torch.zeros(B, K, device=x.device)
        g = torch.zeros(B, K, x[0].numel(), device=x.device)
        per = max(1, self.eot_chunk // max(B, 1))
        for k0 in range(0, K, per):
            kk = draws[k0:k0 + per]
            n = kk.numel()
            xr = x.detach().repeat_interleave(n, dim=0).requires_grad_(True)  # [B*n, ...]: own gradient per draw
            logits = self.model(xr, ids=ids.repeat_interleave(n), draws=kk.repeat(B))
            loss = attack_loss(logits, y.repeat_interleave(n), self.loss)
            (gr,) = torch.autograd.grad(loss.sum(), xr)
            L[:, k0:k0 + n] = loss.detach().view(B, n)
            g[:, k0:k0 + n] = gr.reshape(B, n, -1)
        return L, g

    def __call__(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> AttackResult:
        x, y, ids = x.detach(), y.to(x.device), torch.as_tensor(ids, dtype=torch.long).cpu()
        best_adv, best_loss, best_hist, best_track, best_q = None, None, None, None, None
        for r in range(self.restarts):
            delta = torch.zeros_like(x)
            hist = np.zeros((x.shape[0], self.steps + 1), dtype=np.float64)
            qs = np.zeros((x.shape[0], self.steps, self.K), dtype=np.float32)
            track = np.zeros((min(self.track, x.shape[0]), self.steps + 1, x[0].numel()), dtype=np.float32)
            prev = None
            for s in range(self.steps + 1):
                L, g = self.per_draw(x + delta, y, ids, self.draws(r, s))
                hist[:, s] = L.mean(1).cpu().numpy()
                if track.shape[0]:
                    track[:, s] = delta[: track.shape[0]].flatten(1).cpu().numpy()
                if s == self.steps:
                    break  # the last pass only measures the final iterate
                q, norm = estep_weights(L, g, variant=self.estep, norm=self.norm, eps=self.eps,
                                        lam=self.em_lam, em_steps=self.em_steps)
                qs[:, s] = q.cpu().numpy()
                grad = (q[:, :, None] * g).sum(1) / norm.clamp_min(1e-12)[:, None]  # M-step
                if prev is not None:  # stepwise EM, t = s + 1
                    w = float(s + 1) ** (-self.em_alpha)
                    grad = w * grad + (1 - w) * prev
                prev = grad
                delta = delta + self.alpha * ascent_direction(grad.view_as(x), self.norm)
                delta = project(delta, self.norm, self.eps)
                delta = (x + delta).clamp(0, 1) - x
            final = torch.as_tensor(hist[:, -1])
            if best_loss is None:
                best_adv, best_loss, best_hist, best_track, best_q = (x + delta).detach(), final, hist, track, qs
            else:
                better = final > best_loss
                best_adv[better] = (x + delta).detach()[better]
                best_hist[better.numpy()] = hist[better.numpy()]
                best_q[better.numpy()] = qs[better.numpy()]
                best_loss = torch.maximum(best_loss, final)
        return AttackResult(best_adv, best_hist, best_track if self.track else None, extra={"weights": best_q})
