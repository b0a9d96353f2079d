"""PGD with batched EOT on the exact-gradient engine (paper 1's attack in all three settings).

Every draw the attacker uses is an explicit index of the purifier's replayable
:class:`~dbprepro.randomness.Randomness`: step s, EOT sample k, restart r of a random-mode attack
uses draw ``(r * (steps + 1) + s) * K + k`` (:func:`step_draws`); evaluation draws start at
:data:`~dbprepro.attacks.protocols.EVAL_DRAW_OFFSET`, so the attacker never sees the noise it is
evaluated with (except in ``dwbox``, by definition).

:class:`PGD` runs the K EOT samples of a step as one batched forward/backward pass (torchattacks'
``EOTPGD`` loops over them one call at a time and cannot pass per-sample draw indices); the
update is paper 1's: zero start, sign (L-inf) or L2-normalised gradient of the cross-entropy on
the classifier's logits after purification, projection on the epsilon-ball, clip to [0, 1].
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..calls import Calls, defended_grad
from ..randomness import Stream
from .base import NORMS, Attack, AttackResult, Norm, ascent_direction, evaluation_calls, perturbation_norms, project
from .protocols import Setting, _check_randomness, base_setting, evaluate_draws, summarise_evaluations
from .registry import register_attack


def step_draws(setting: str, fixed_draw: int, restart: int, step: int, steps: int, K: int) -> torch.Tensor:
    """Draw indices an attacker uses at ``step`` of ``restart`` (``steps`` steps, ``K`` draws a step):
    in ``dwbox`` (``setting`` is the base setting) the one fixed configuration ``fixed_draw``, a
    tensor of one; otherwise ``(restart * (steps + 1) + step) * K + k`` for k < K, so every step of
    every restart, including the pass that measures the final iterate (step = steps), has draws of
    its own.  :class:`PGD` (and its subclasses) and :class:`~dbprepro.attacks.diffhammer.DiffHammer`
    key their draws here, so the same step of either attack replays the same noise."""
    if setting == "dwbox":
        return torch.full((1,), fixed_draw, dtype=torch.long)
    base = (restart * (steps + 1) + step) * K
    return torch.arange(base, base + K, dtype=torch.long)


@register_attack
class PGD(Attack):
    """Projected gradient descent with batched EOT on a :class:`DefendedClassifier`.

    Args:
        model: classifier after purifier; its purifier's randomness must match ``setting``
            (see :func:`settings_randomness`); use ``grad_mode="bpda"`` on the purifier for BPDA.
        setting: ``whitebox`` | ``whitebox_eot`` | ``dwbox`` | ``dwbox_c{k}``.
        norm, eps, alpha, steps: threat model and step schedule, in [0, 1] pixel units.
        eot: gradient samples per step (forced to 1 for ``whitebox`` and ``dwbox``).
        random_start: start uniformly in the ball (seeded from the purifier seed) instead of at 0.
        restarts: independent runs; the one with the highest final loss is kept per sample.
        eot_chunk: at most this many images x EOT samples per forward pass (memory bound).
        track: number of leading samples whose full perturbation path is recorded.
    """

    name = "pgd"
    config_section = "pgd"
    # the undefended classifier's PGD (setting none) is white-box
    waterfall_stages = (("white-box", "whitebox"), ("white-box", "none"), ("White-box-EOT", "whitebox_eot"),
                        ("DW-box", "dwbox"))
    waterfall_rank = 20

    # -- the registered attack ------------------------------------------------------------------
    @classmethod
    def settings(cls, attacks: dict[str, Any], threat: str) -> list[str]:
        return list(attacks["settings"])  # paper 1's grid: every setting, every threat model

    @classmethod
    def gradient_calls(cls, S: int, grad_mode: str) -> Calls:
        """Network calls of one attack gradient per image and draw."""
        return defended_grad(S, grad_mode)

    @classmethod
    def calls_per_image(cls, attacks: dict[str, Any], setting: str, S: int, grad_mode: str) -> tuple[Calls, bool]:
        pgd = attacks["pgd"]
        K = pgd["eot"] if setting == "whitebox_eot" else 1
        # steps + 1 passes per restart: the last one measures the final iterate's loss
        grad = cls.gradient_calls(S, grad_mode) * (pgd["restarts"] * (pgd["steps"] + 1) * K)
        return grad + evaluation_calls(attacks, setting, S), False

    @classmethod
    def run_batch(cls, model, x, y, ids, *, setting, threat, attacks, seed, track=0):
        return attack_batch(model, x, y, ids, attack=cls.name, setting=setting, norm=threat["norm"],
                            eps=threat["eps"], alpha=threat["alpha"], pgd=attacks["pgd"],
                            eval_draws=attacks["eval_draws"], track=track)

    # -- the attack -----------------------------------------------------------------------------

    def __init__(self, model, setting: Setting, norm: Norm = "linf",
                 eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 20, eot: int = 10,
                 random_start: bool = False, restarts: int = 1, eot_chunk: int = 4096, track: int = 0):
        base = base_setting(setting)
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
        if eps <= 0 or alpha <= 0 or steps < 1 or eot < 1 or restarts < 1:
            raise ValueError("eps and alpha must be > 0; steps, eot and restarts >= 1")
        _check_randomness(setting, model.purifier.randomness)
        self.model, self.setting, self.norm = model, base, norm
        self.setting_name = setting
        self.eps, self.alpha, self.steps = float(eps), float(alpha), int(steps)
        self.eot = int(eot) if base == "whitebox_eot" else 1
        self.random_start, self.restarts = bool(random_start), int(restarts)
        self.eot_chunk, self.track = int(eot_chunk), int(track)

    def draws(self, restart: int, step: int) -> torch.Tensor:
        """Draw indices [eot] used at ``step`` of ``restart``."""
        return step_draws(self.setting, self.model.purifier.randomness.fixed_draw, restart, step, self.steps, self.eot)

    def loss_and_grad(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, draws: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample loss (mean over the draws) and the gradient of its sum over the draws."""
        B, K = x.shape[0], draws.numel()
        x = x.detach().requires_grad_(True)
        losses = torch.zeros(B, device=x.device)
        grad = torch.zeros_like(x)
        # EOT samples per pass; a vote defense purifies ``votes`` times per sample
        per = max(1, self.eot_chunk // max(B * getattr(self.model, "votes", 1), 1))
        for k0 in range(0, K, per):
            kk = draws[k0:k0 + per]
            xr = x.repeat_interleave(kk.numel(), dim=0)  # [B*k, ...] (image-major)
            idr = ids.repeat_interleave(kk.numel())
            dr = kk.repeat(B)
            logits = self.model(xr, ids=idr, draws=dr)
            ce = F.cross_entropy(logits, y.repeat_interleave(kk.numel()), reduction="none")
            (g,) = torch.autograd.grad(ce.sum(), x)
            grad += g
            losses += ce.detach().view(B, -1).sum(1)
        return losses / K, grad

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        """The ascent direction of a step from the gradient: sign (L-inf) or L2-normalised."""
        return ascent_direction(grad, self.norm)

    def _project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The feasible perturbation after a step (or the random start): projected onto the
        eps-ball, then x + delta clipped to [0, 1].  A subclass that restricts the perturbation
        further (:class:`~dbprepro.attacks.lowfreq.LowFreq`) overrides this and :meth:`_direction`."""
        delta = project(delta, self.norm, self.eps)
        return (x + delta).clamp(0, 1) - x

    def __call__(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> AttackResult:
        x, y, ids = x.detach(), y.to(x.device), torch.as_tensor(ids, dtype=torch.long).cpu()
        best_adv, best_loss, best_hist, best_track = None, None, None, None
        for r in range(self.restarts):
            delta = torch.zeros_like(x)
            if self.random_start:  # per-sample, replayable: keyed by (seed, id, restart)
                u = self.model.purifier.randomness.uniform(ids, torch.full_like(ids, r), Stream.ATTACK, 0,
                                                           x.shape[1:], device=x.device) * 2 - 1
                delta = self._project(x, u * self.eps)
            hist = np.zeros((x.shape[0], self.steps + 1), dtype=np.float64)
            track = np.zeros((min(self.track, x.shape[0]), self.steps + 1, x[0].numel()), dtype=np.float32)
            for s in range(self.steps + 1):
                loss, grad = self.loss_and_grad(x + delta, y, ids, self.draws(r, s))
                hist[:, s] = loss.cpu().numpy()
                if track.shape[0]:
                    track[:, s] = delta[: track.shape[0]].flatten(1).cpu().numpy()
                if s == self.steps:
                    break  # the last pass only measures the final iterate
                delta = self._project(x, delta + self.alpha * self._direction(grad))
            final = torch.as_tensor(hist[:, -1])
            if best_loss is None:
                best_adv, best_loss, best_hist, best_track = (x + delta).detach(), final, hist, track
            else:
                better = final > best_loss
                best_adv[better] = (x + delta).detach()[better]
                best_hist[better.numpy()] = hist[better.numpy()]
                best_loss = torch.maximum(best_loss, final)
        return AttackResult(best_adv, best_hist, best_track if self.track else None)


def attack_batch(model, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, *,
                 attack: str, setting: Setting, norm: Norm, eps: float, alpha: float, pgd: dict,
                 eval_draws: int, track: int = 0, attacked=None) -> tuple[dict[str, np.ndarray], AttackResult]:
    """Run one attack on one batch and evaluate the result on ``model``; returns per-sample columns.
    ``attacked``: the model the gradients come from, if not ``model`` (a surrogate process)."""
    if attack not in ("pgd", "bpda"):
        raise ValueError(f"unknown attack {attack!r}")
    if attacked is None:
        # BPDA attacks a copy of the defense whose purifier has the identity backward; nothing is swapped in place
        attacked = model.with_purifier(model.purifier.with_grad_mode("bpda")) if attack == "bpda" else model
    elif attack == "bpda":
        attacked = attacked.with_purifier(attacked.purifier.with_grad_mode("bpda"))
    pgd_attack = PGD(attacked, setting, norm, eps, alpha, steps=pgd["steps"], eot=pgd["eot"],
                     random_start=pgd["random_start"], restarts=pgd["restarts"], eot_chunk=pgd.get("eot_chunk", 4096),
                     track=track)
    res = pgd_attack(x, y, ids)
    return result_columns(model, x, y, ids, res, setting, eval_draws), res


def result_columns(model, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, res: AttackResult, setting: Setting,
                   eval_draws: int) -> dict[str, np.ndarray]:
    """PGD's per-sample columns of an attack's result ``res`` on the batch ``x``: the evaluation of
    ``res.x_adv`` on ``model`` (``eval_draws`` draws, :func:`evaluate_draws`), the perturbation's
    norms and the first and last losses of ``res.loss``."""
    preds = evaluate_draws(model, res.x_adv, ids, eval_draws, setting)
    return {"id": ids.numpy(), "label": y.cpu().numpy(), **{f"correct_{k}": v for k, v in
                                                          summarise_evaluations(preds, y.cpu().numpy()).items()},
            **{f"norm_{k}": v for k, v in perturbation_norms(res.x_adv, x).items()},
            "loss_start": res.loss[:, 0], "loss_end": res.loss[:, -1]}


def pgd_section(attacks: dict[str, Any], section: str) -> dict[str, Any]:
    """``attacks.pgd`` with the ``steps`` and ``eot`` of the attack section ``attacks[section]``
    where they are set (not null): the PGD settings of an attack that runs PGD's update on a
    budget of its own (the surrogate, the low-frequency attack)."""
    own = attacks.get(section) or {}
    return {**attacks["pgd"], **{k: own[k] for k in ("steps", "eot") if own.get(k) is not None}}
