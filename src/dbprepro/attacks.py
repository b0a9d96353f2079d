"""Attacks on diffusion-based purification, in paper 1's three threat settings.

Settings (paper 1, Sec. 3; the names are the paper's)
----------------------------------------------------
``whitebox``
    the attacker differentiates through the stochastic purifier with one fresh randomness
    draw per attack step (no EOT); evaluation uses fresh draws.
``whitebox_eot``
    K fresh draws per step, gradients summed before the sign (EOT); evaluation uses fresh draws.
``dwbox``
    deterministic white-box: the randomness is fixed per sample (a fixed configuration known to
    the attacker), the purifier is a deterministic function P_xi, and the adversarial example
    is evaluated with the same xi.  Plain ``dwbox`` uses the configuration ``attacks.fixed_draw``;
``dwbox_c{k}``
    ``dwbox`` against fixed randomness configuration ``k`` (paper 2's robustness "under fixed
    randomness", averaged over several configurations k = 0, 1, ...).  Everything that holds
    for ``dwbox`` holds for it (:func:`base_setting` maps it to ``dwbox``); only the
    configuration differs (:func:`setting_fixed_draw`).

Every draw the attacker uses is an explicit index of the purifier's replayable
:class:`~dbprepro.randomness.Randomness`: step s, EOT sample k, restart r of a random-mode attack
uses draw ``(r * steps + s) * K + k``; evaluation draws start at :data:`EVAL_DRAW_OFFSET`, so the
attacker never sees the noise it is evaluated with (except in ``dwbox``, by definition).

:class:`PGD` runs the K EOT samples of a step as one batched forward/backward pass (torchattacks'
``EOTPGD`` loops over them one call at a time and cannot pass per-sample draw indices); the
update is paper 1's: zero start, sign (L-inf) or L2-normalised gradient of the cross-entropy on
the classifier's logits after purification, projection on the epsilon-ball, clip to [0, 1].
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .purifiers import DefendedClassifier
from .randomness import Randomness, Stream

Setting = Literal["whitebox", "whitebox_eot", "dwbox"]
Norm = Literal["linf", "l2"]
SETTINGS: tuple[str, ...] = ("whitebox", "whitebox_eot", "dwbox")
NORMS: tuple[str, ...] = ("linf", "l2")
EVAL_DRAW_OFFSET = 1 << 40  # evaluation draws never overlap the attacker's draws
SELECT_DRAW_OFFSET = 1 << 41  # draws of AutoAttack's candidate selection (multi-evaluation)


@dataclass
class AttackResult:
    """Outcome of an attack on one batch."""

    x_adv: torch.Tensor  # [B, C, H, W] in [0, 1]
    loss: np.ndarray  # [B, steps + 1]: defended loss (mean over the step's draws) at each iterate
    deltas: np.ndarray | None = None  # [n_track, steps + 1, D]: perturbation at each iterate
    extra: dict = field(default_factory=dict)


_DWBOX_CONFIG = re.compile(r"dwbox_c(0|[1-9][0-9]*)")


def base_setting(setting: str) -> Setting:
    """The threat setting of a setting name: ``dwbox_c{k}`` -> ``dwbox``; known names unchanged."""
    if setting in SETTINGS:
        return setting  # type: ignore[return-value]
    if _DWBOX_CONFIG.fullmatch(str(setting)):
        return "dwbox"
    raise ValueError(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}, dwbox_c<k> (k = 0, 1, ...)")


def is_fixed(setting: str) -> bool:
    """True for the deterministic settings (``dwbox`` and ``dwbox_c{k}``)."""
    return base_setting(setting) == "dwbox"


def setting_fixed_draw(setting: str, default: int = 0) -> int | None:
    """The fixed randomness configuration of a setting: ``k`` for ``dwbox_c{k}``, ``default`` for
    ``dwbox``, None for the stochastic settings."""
    if not is_fixed(setting):
        return None
    m = _DWBOX_CONFIG.fullmatch(setting)
    return int(m.group(1)) if m else int(default)


def settings_randomness(setting: str, seed: int, fixed_draw: int = 0) -> Randomness:
    """The purifier randomness an attack setting runs against (``fixed_draw`` is the
    configuration of plain ``dwbox``; ``dwbox_c{k}`` uses configuration ``k``)."""
    k = setting_fixed_draw(setting, fixed_draw)
    if k is not None:
        return Randomness(seed, "fixed", fixed_draw=k)
    return Randomness(seed, "random")


def _check_randomness(setting: str, randomness: Randomness) -> None:
    """Refuse a purifier whose randomness does not fit ``setting`` (mode, and the configuration
    of ``dwbox_c{k}``)."""
    fixed = is_fixed(setting)
    if fixed != (randomness.mode == "fixed"):
        raise ValueError(f"setting {setting!r} needs the purifier's randomness in "
                         f"{'fixed' if fixed else 'random'} mode, it is {randomness.mode!r}")
    k = setting_fixed_draw(setting, randomness.fixed_draw)
    if fixed and k != randomness.fixed_draw:
        raise ValueError(f"setting {setting!r} attacks fixed configuration {k}, the purifier uses "
                         f"configuration {randomness.fixed_draw}")


def project(delta: torch.Tensor, norm: Norm, eps: float) -> torch.Tensor:
    """Project perturbations onto the eps-ball of ``norm`` (per sample)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    flat = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / flat).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.ndim - 1)))


def ascent_direction(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Steepest-ascent direction of unit ``norm``-step: sign (L-inf) or L2-normalised gradient."""
    if norm == "linf":
        return grad.sign()
    g = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return grad / g.view(-1, *([1] * (grad.ndim - 1)))


class PGD:
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

    def __init__(self, model: DefendedClassifier, setting: Setting, norm: Norm = "linf",
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
        if self.setting == "dwbox":
            return torch.full((1,), self.model.purifier.randomness.fixed_draw, dtype=torch.long)
        base = (restart * (self.steps + 1) + step) * self.eot
        return torch.arange(base, base + self.eot, dtype=torch.long)

    def loss_and_grad(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, draws: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample loss (mean over the draws) and the gradient of its sum over the draws."""
        B, K = x.shape[0], draws.numel()
        x = x.detach().requires_grad_(True)
        losses = torch.zeros(B, device=x.device)
        grad = torch.zeros_like(x)
        per = max(1, self.eot_chunk // max(B, 1))  # EOT samples per pass
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

    def __call__(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> AttackResult:
        x, y, ids = x.detach(), y.to(x.device), torch.as_tensor(ids, dtype=torch.long).cpu()
        best_adv, best_loss, best_hist, best_track = None, None, None, None
        for r in range(self.restarts):
            delta = torch.zeros_like(x)
            if self.random_start:  # per-sample, replayable: keyed by (seed, id, restart)
                u = self.model.purifier.randomness.uniform(ids, torch.full_like(ids, r), Stream.ATTACK, 0,
                                                           x.shape[1:], device=x.device) * 2 - 1
                delta = project(u * self.eps, self.norm, self.eps)
                delta = (x + delta).clamp(0, 1) - x
            hist = np.zeros((x.shape[0], self.steps + 1), dtype=np.float64)
            track = np.zeros((min(self.track, x.shape[0]), self.steps + 1, x[0].numel()), dtype=np.float32)
            for s in range(self.steps + 1):
                loss, grad = self.loss_and_grad(x + delta, y, ids, self.draws(r, s))
                hist[:, s] = loss.cpu().numpy()
                if track.shape[0]:
                    track[:, s] = delta[: track.shape[0]].flatten(1).cpu().numpy()
                if s == self.steps:
                    break  # the last pass only measures the final iterate
                delta = delta + self.alpha * ascent_direction(grad, self.norm)
                delta = project(delta, self.norm, self.eps)
                delta = (x + delta).clamp(0, 1) - x
            final = torch.as_tensor(hist[:, -1])
            if best_loss is None:
                best_adv, best_loss, best_hist, best_track = (x + delta).detach(), final, hist, track
            else:
                better = final > best_loss
                best_adv[better] = (x + delta).detach()[better]
                best_hist[better.numpy()] = hist[better.numpy()]
                best_loss = torch.maximum(best_loss, final)
        return AttackResult(best_adv, best_hist, best_track if self.track else None)


@torch.no_grad()
def evaluate_draws(model: DefendedClassifier, x: torch.Tensor, ids: torch.Tensor, n: int,
                   setting: Setting, offset: int = EVAL_DRAW_OFFSET) -> np.ndarray:
    """Predicted labels [B, n] of ``x`` under ``n`` evaluation draws.

    ``dwbox`` and ``dwbox_c{k}`` evaluate with the attacker's fixed configuration (one
    deterministic purification, repeated; for ``dwbox_c{k}`` configuration k, which the
    purifier must use); the stochastic settings use fresh draws the attacker never saw.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).cpu()
    k = setting_fixed_draw(setting, model.purifier.randomness.fixed_draw)
    if k is not None:
        _check_randomness(setting, model.purifier.randomness)
        d = torch.full_like(ids, k)
        pred = model(x, ids=ids, draws=d).argmax(1).cpu().numpy()
        return np.repeat(pred[:, None], n, axis=1)
    out = np.zeros((x.shape[0], n), dtype=np.int64)
    for k in range(n):
        d = torch.full_like(ids, offset + k)
        out[:, k] = model(x, ids=ids, draws=d).argmax(1).cpu().numpy()
    return out


def summarise_evaluations(preds: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample correctness under the evaluation protocols of the literature.

    ``single``: the first evaluation draw (one-shot evaluation, what most papers report);
    ``mean``: fraction of draws classified correctly (paper 1's Fixed-AutoAttack score);
    ``worst``: correct under every draw (DiffHammer's N-evaluation / resubmission risk);
    ``vote``: the majority (most frequent, ties to the lowest label) prediction is correct.
    """
    labels = np.asarray(labels).reshape(-1, 1)
    correct = preds == labels
    n_classes = int(max(preds.max(), labels.max())) + 1
    counts = np.stack([(preds == c).sum(1) for c in range(n_classes)], axis=1)
    vote = counts.argmax(1)
    return {
        "single": correct[:, 0].astype(np.float64),
        "mean": correct.mean(1),
        "worst": correct.all(1).astype(np.float64),
        "vote": (vote == labels[:, 0]).astype(np.float64),
    }


def perturbation_norms(x_adv: torch.Tensor, x: torch.Tensor) -> dict[str, np.ndarray]:
    d = (x_adv - x).flatten(1)
    return {"l2": d.norm(dim=1).cpu().numpy(), "linf": d.abs().amax(1).cpu().numpy()}


def attack_batch(model: DefendedClassifier, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, *,
                 attack: str, setting: Setting, norm: Norm, eps: float, alpha: float, pgd: dict,
                 eval_draws: int, track: int = 0) -> tuple[dict[str, np.ndarray], AttackResult]:
    """Run one attack on one batch and evaluate the result; returns per-sample columns."""
    if attack not in ("pgd", "bpda"):
        raise ValueError(f"unknown attack {attack!r}")
    purifier = model.purifier
    saved = purifier.grad_mode
    purifier.grad_mode = "bpda" if attack == "bpda" else saved
    try:
        pgd_attack = PGD(model, setting, norm, eps, alpha, steps=pgd["steps"], eot=pgd["eot"],
                         random_start=pgd["random_start"], restarts=pgd["restarts"],
                         eot_chunk=pgd.get("eot_chunk", 4096), track=track)
        res = pgd_attack(x, y, ids)
    finally:
        purifier.grad_mode = saved
    preds = evaluate_draws(model, res.x_adv, ids, eval_draws, setting)
    cols = {"id": ids.numpy(), "label": y.cpu().numpy(), **{f"correct_{k}": v for k, v in
                                                          summarise_evaluations(preds, y.cpu().numpy()).items()},
            **{f"norm_{k}": v for k, v in perturbation_norms(res.x_adv, x).items()},
            "loss_start": res.loss[:, 0], "loss_end": res.loss[:, -1]}
    return cols, res
