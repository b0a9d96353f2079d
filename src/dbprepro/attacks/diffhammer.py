"""DiffHammer (Wang, Fu, Han, Xiang, NeurIPS 2024, OpenReview ZJ2ONmSgCS): a selective attack on a
stochastic purifier by expectation-maximisation over the K purification draws of each step, run as
the paper and its code (Ka1b0/DiffHammer, ``attacker.py``, ``config.py``) run it.

Each scored iterate x + r draws K purifications phi_i (draw indices as
:class:`~dbprepro.attacks.pgd.PGD`'s: iterate s, draw k, restart r use ``(r * (steps + 1) + s) * K + k``)
and computes, in one batched forward/backward pass over the K draws, every draw's loss L_i, its
*exact* input gradient g_i = J_i^T a_i (the engine's gradient through the whole chain) and its
predicted label.  These K draws also score the iterate (the in-loop N-evaluation, N = K).

E-step (``estep``, :func:`~dbprepro.attacks.diffhammer_em.estep_weights`, with its underflow guard),
the weight q_i of draw i - the probability that phi_i belongs to the set of draws sharing one
vulnerability (already fooled, or fooled by the shared next step):

``paper`` (Alg. 1)
    Delta~ = argmax_{Delta in the eps-ball} sum_i sigmoid(lam (L_i + Delta^T g_i)), by ``em_steps``
    alternations Delta <- eps dir(sum_i q_i g_i), q_i <- sigmoid(lam (L_i + Delta^T g_i)) from
    Delta = 0; the M-step normalises by K.
``official`` (the code)
    Delta is chosen among the K candidates dir(g_j) by sum_i ELU(L_i + eps dir(g_j)^T g_i);
    q_i = sigmoid(lam (L_i + dir(g_j^)^T g_i)) without the eps factor; the M-step normalises by
    sum_i q_i.  (The code's 5-step EM loop never updates its iterate: one E-step.)
``uniform``
    q_i = 1: the M-step is EOT's mean gradient, DiffHammer reduces to PGD-EOT (an ablation).

With the margin loss (``cw``, max_{j != y} z_j - z_y) L_i > 0 means draw i is fooled, so an
already-fooled draw gets q_i close to 1 and a robust draw, the attack cannot reach, close to 0; the
restarts with ``ce`` and ``dlr`` weigh their own losses the same way, as the code does.

M-step: g = sum_i q_i g_i / (K or sum_i q_i), then the stepwise EM average
g_t <- t^-alpha g + (1 - t^-alpha) g_{t-1} (``em_alpha``; 0 = no averaging) and a step:

``schedule: apgd`` (the paper's and the code's)
    :func:`~dbprepro.attacks.apgd.apgd` (step 2 eps, momentum 0.75, checkpoints) whose checkpoint
    loss is the maximum of L_i over the K draws (the code's ``update_params``).
``schedule: pgd``
    constant step ``threat.alpha`` (sign or L2-normalised), projection, clip.

Restarts (``losses``, ``restart_threshold``; the code's N_ITERS, LOSS_NAMES, RESTART_THR): restart r
runs ``steps`` iterations from zero with the loss ``losses[r]`` and fresh draws, on the images
whose in-loop attack success rate so far (the largest fooled fraction of any scored iterate) is at
most ``restart_threshold``; restart 0 runs on every image.

Protocol (``protocol``), the per-image records ``correct_single/mean/worst/vote``:

``inloop`` (the code's ``update_batch_metrics``)
    per-metric minima over every scored iterate (the clean image first) of every restart, each
    scored by its own K draws (:class:`~dbprepro.attacks.diffhammer_em.InLoopRecord`):
    ``correct_mean`` = Avg.Rob, ``correct_worst`` = Wor.Rob (no draw of any iterate fooled),
    ``correct_single`` = the same rule on the first draw of every iterate, ``correct_vote`` on
    every iterate's majority vote.  The scoring draws are the attacker's own draws
    (evaluate-while-optimising, andrekassis/DiffBreak#1).
``final``
    the returned iterate evaluated on ``eval_draws`` fresh draws the attacker never saw.

The returned iterate (both protocols; :class:`~dbprepro.attacks.diffhammer_em.KeptIterate`, the
code's ``x_adv_best``): per restart, the first iterate where some draw is fooled, replaced by any
later iterate with a larger mean loss over its draws; across restarts a restart's iterate
replaces the earlier one where its own draws scored it lower (``worst``, then ``mean``).

Departures, on purpose (each named in the records or here):
- **No gradient grafting.** The paper backpropagates g~ = sum_i q_i a_i once, through one chosen
  draw phi^ (``J_phi^^T g~`` instead of sum_i q_i J_i^T a_i).  That saves K - 1 chain backward
  passes, but it changes the result (2411.16598 App. D.1.5: relative gradient error about 1 for
  the official grafted backward).  Here every draw's own exact gradient is used: K defended
  gradients per iterate, like PGD-EOT.
- **Input-space linearisation.** The paper's a_i is the gradient at the purified image; Delta^T a_i
  treats the purifier as the identity.  Since g_i = J_i^T a_i is computed anyway, the E-step uses
  the exact first-order model L_i(x + r + Delta) ~ L_i + Delta^T g_i.
- **Zero start.** The code starts uniformly in the eps-ball (and scores the clean image first);
  every restart here starts at the clean image, which is also the first scored iterate.
- **APGD's reset point** at a checkpoint is :func:`~dbprepro.attacks.apgd.apgd`'s best point (the
  highest checkpoint loss), not the code's ``x_adv_best``; and across restarts the returned
  iterate is chosen by the scores above (the code compares mean losses of different loss
  functions across restarts).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..calls import Calls, defended_grad
from .apgd import apgd
from .base import NORMS, Attack, AttackResult, Norm, ascent_direction, evaluation_calls, perturbation_norms, project
from .diffhammer_em import ESTEPS, InLoopRecord, KeptIterate, estep_weights, guarded_sigmoid  # noqa: F401
from .losses import LOSSES, attack_loss, margin_loss  # noqa: F401 (re-exported)
from .pgd import step_draws
from .protocols import Setting, _check_randomness, base_setting, evaluate_draws, summarise_evaluations
from .registry import register_attack

SCHEDULES = ("apgd", "pgd")
PROTOCOLS = ("inloop", "final")


@register_attack
class DiffHammer(Attack):
    """DiffHammer's EM attack (module docstring) on a :class:`DefendedClassifier` (or any module
    ``model(x, ids=, draws=)`` with a ``purifier.randomness``).

    Args:
        model, setting, norm, eps, alpha, steps, eot_chunk, track: as :class:`~dbprepro.attacks.pgd.PGD`
            (``alpha`` is the step of ``schedule="pgd"`` only; ``steps`` per restart).
        draws: K, purification draws per iterate (forced to 1 outside ``whitebox_eot``).
        estep: ``paper`` | ``official`` | ``uniform``; em_lam, em_steps: its sigmoid slope and
            (``paper``) alternations; em_alpha: stepwise-EM exponent (0: none).
        losses: one attack loss per restart (``cw``, ``ce``, ``dlr``; the E-step's L_i).
        schedule: ``apgd`` | ``pgd``.
        restart_threshold: restart r > 0 runs on the images whose in-loop attack success rate is at most this.
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
    def eval_draws(cls, attacks: dict[str, Any]) -> int | None:
        """N of the ``final`` protocol's fresh-draw evaluation (``diffhammer.eval_draws``, else
        ``attacks.eval_draws``); None in the ``inloop`` protocol, where each iterate's K draws score it."""
        d = attacks["diffhammer"]
        if d.get("protocol", "inloop") != "final":
            return None
        n = d.get("eval_draws")
        return int(attacks["eval_draws"] if n is None else n)

    @classmethod
    def calls_per_image(cls, attacks: dict[str, Any], setting: str, S: int, grad_mode: str) -> tuple[Calls, bool]:
        """K defended gradients per scored iterate, steps + 1 iterates per restart, every restart
        (the E-step and the in-loop scoring reuse their losses, gradients and predictions: no extra
        forward), plus the fresh-draw evaluation of the ``final`` protocol.  An upper bound when
        there are restarts after the first: they run on the images below the threshold only."""
        d = attacks["diffhammer"]
        K = d["draws"] if base_setting(setting) == "whitebox_eot" else 1
        R = len(d["losses"])
        calls = defended_grad(S, grad_mode) * (R * (d["steps"] + 1) * K)
        n = cls.eval_draws(attacks)
        if n is not None:
            calls = calls + evaluation_calls({**attacks, "eval_draws": n}, setting, S)
        return calls, R > 1

    @classmethod
    def run_batch(cls, model, x, y, ids, *, setting, threat, attacks, seed, track=0):
        d = attacks["diffhammer"]
        attack = cls(model, setting, threat["norm"], threat["eps"], threat["alpha"], steps=d["steps"],
                     draws=d["draws"], estep=d["estep"], em_lam=d["em_lam"], em_steps=d["em_steps"],
                     em_alpha=d["em_alpha"], losses=d["losses"], schedule=d["schedule"],
                     restart_threshold=d["restart_threshold"], eot_chunk=d.get("eot_chunk", 4096), track=track)
        res = attack(x, y, ids)
        n = cls.eval_draws(attacks)
        if n is None:
            correct, n = res.extra["inloop"], attack.K
        else:
            correct = summarise_evaluations(evaluate_draws(model, res.x_adv, ids, n, setting), y.cpu().numpy())
        B = x.shape[0]
        cols = {"id": ids.numpy(), "label": y.cpu().numpy(), **{f"correct_{k}": v for k, v in correct.items()},
                **{f"norm_{k}": v for k, v in perturbation_norms(res.x_adv, x).items()},
                "loss_start": res.loss[:, 0], "loss_end": res.loss[:, -1],
                "eval_protocol": np.full(B, d["protocol"]), "scoring_draws": np.full(B, int(n)),
                "step_rule": np.full(B, d["schedule"]), "restart_losses": np.full(B, ",".join(d["losses"])),
                **{k: res.extra[k] for k in ("restarts_run", "best_restart", "best_iteration", "estep_guarded")}}
        return cols, res

    # -- the attack -----------------------------------------------------------------------------
    def __init__(self, model, setting: Setting, norm: Norm = "linf", eps: float = 8 / 255,
                 alpha: float = 2 / 255, steps: int = 50, draws: int = 10, estep: str = "paper",
                 em_lam: float = 5.0, em_steps: int = 5, em_alpha: float = 0.5,
                 losses: Sequence[str] | str = ("cw", "ce", "dlr"), schedule: str = "apgd",
                 restart_threshold: float = 0.5, eot_chunk: int = 4096, track: int = 0):
        base = base_setting(setting)
        losses = [losses] if isinstance(losses, str) else list(losses)
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
        if estep not in ESTEPS or schedule not in SCHEDULES or not losses or any(v not in LOSSES for v in losses):
            raise ValueError(f"estep must be one of {ESTEPS}, schedule one of {SCHEDULES}, losses a non-empty "
                             f"list of {LOSSES}")
        if eps <= 0 or alpha <= 0 or steps < 1 or draws < 1 or em_steps < 1 or em_alpha < 0:
            raise ValueError("eps, alpha > 0; steps, draws, em_steps >= 1; em_alpha >= 0")
        if not 0 <= restart_threshold <= 1:
            raise ValueError(f"restart_threshold must be in [0, 1], got {restart_threshold}")
        _check_randomness(setting, model.purifier.randomness)
        self.model, self.setting, self.norm = model, base, norm
        self.eps, self.alpha, self.steps = float(eps), float(alpha), int(steps)
        self.K = int(draws) if base == "whitebox_eot" else 1
        self.estep, self.em_lam, self.em_steps, self.em_alpha = estep, float(em_lam), int(em_steps), float(em_alpha)
        self.losses, self.schedule, self.restart_threshold = losses, schedule, float(restart_threshold)
        self.eot_chunk, self.track = int(eot_chunk), int(track)

    def draws(self, restart: int, step: int) -> torch.Tensor:
        """Draw indices [K] of iterate ``step`` of ``restart`` (PGD's, :func:`~dbprepro.attacks.pgd.step_draws`)."""
        return step_draws(self.setting, self.model.purifier.randomness.fixed_draw, restart, step, self.steps, self.K)

    def per_draw(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, draws: torch.Tensor, loss: str = "cw"
                 ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Losses ``loss`` [B, K], exact input gradients [B, K, D] and predicted labels [B, K] of every
        (image, draw), the K draws batched (image-major, at most ``eot_chunk`` images x draws per pass)."""
        B, K = x.shape[0], draws.numel()
        L = torch.zeros(B, K, device=x.device)
        g = torch.zeros(B, K, x[0].numel(), device=x.device)
        pred = np.zeros((B, K), dtype=np.int64)
        per = max(1, self.eot_chunk // max(B, 1))
        for k0 in range(0, K, per):
            kk = draws[k0:k0 + per]
            n = kk.numel()
            xr = x.detach().repeat_interleave(n, dim=0).requires_grad_(True)  # [B*n, ...]: own gradient per draw
            logits = self.model(xr, ids=ids.repeat_interleave(n), draws=kk.repeat(B))
            lv = attack_loss(logits, y.repeat_interleave(n), loss)
            (gr,) = torch.autograd.grad(lv.sum(), xr)
            L[:, k0:k0 + n] = lv.detach().view(B, n)
            g[:, k0:k0 + n] = gr.reshape(B, n, -1)
            pred[:, k0:k0 + n] = logits.detach().argmax(1).view(B, n).cpu().numpy()
        return L, g, pred

    def m_step(self, L: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The E-step's weights q [B, K] and guard mask [B], and the weighted gradient [B, D]."""
        q, norm, guarded = estep_weights(L, g, variant=self.estep, norm=self.norm, eps=self.eps,
                                         lam=self.em_lam, em_steps=self.em_steps)
        return q, guarded, (q[:, :, None] * g).sum(1) / norm[:, None]

    def _project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Projection onto the eps-ball, then x + delta clipped to [0, 1]."""
        return (x + project(delta, self.norm, self.eps)).clamp(0, 1) - x

    def _restart(self, r: int, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, record: InLoopRecord,
                 idx: np.ndarray, n_track: int) -> dict[str, Any]:
        """Restart ``r`` on the images ``idx`` (``x``, ``y``, ``ids`` are theirs): every scored
        iterate updates ``record`` and the restart's kept iterate."""
        B, labels, loss = x.shape[0], y.cpu().numpy(), self.losses[r]
        out = {"hist": np.zeros((B, self.steps + 1)), "weights": np.zeros((B, self.steps, self.K), np.float32),
               "track": np.zeros((n_track, self.steps + 1, x[0].numel()), np.float32),
               "guarded": np.zeros(B, np.int64), "kept": KeptIterate(torch.zeros_like(x))}
        prev: list[torch.Tensor] = []

        def loss_and_grad(s: int, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            L, g, pred = self.per_draw(x + delta, y, ids, self.draws(r, s), loss)
            scores = summarise_evaluations(pred, labels)  # the in-loop N-evaluation of iterate s
            record.update(idx, scores)
            mean = L.mean(1).cpu().numpy()
            out["kept"].update(s, delta, (pred != labels[:, None]).any(1), mean, scores)
            out["hist"][:, s] = mean
            if n_track:
                out["track"][:, s] = delta[:n_track].flatten(1).cpu().numpy()
            if s == self.steps:  # the last iterate is only scored
                return L.amax(1), torch.zeros_like(x)
            q, guarded, grad = self.m_step(L, g)
            out["weights"][:, s], out["guarded"] = q.cpu().numpy(), out["guarded"] + guarded.cpu().numpy()
            if prev:  # stepwise EM, t = s + 1
                w = float(s + 1) ** (-self.em_alpha)
                grad = w * grad + (1 - w) * prev[0]
            prev[:] = [grad]
            return L.amax(1), grad.view_as(x)  # APGD's checkpoint loss: the maximum over the K draws

        if self.schedule == "apgd":
            apgd(loss_and_grad, x, torch.zeros_like(x), eps=self.eps, norm=self.norm, steps=self.steps,
                 project=self._project)
        else:
            delta = torch.zeros_like(x)
            for s in range(self.steps + 1):
                _, grad = loss_and_grad(s, delta)
                if s < self.steps:
                    delta = self._project(x, delta + self.alpha * ascent_direction(grad, self.norm))
        return out

    def __call__(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> AttackResult:
        """Run every restart; ``extra``: ``inloop`` (the in-loop records), ``weights`` [B, steps, K]
        (restart 0's E-step weights), ``restarts_run``, ``best_restart``, ``best_iteration`` and
        ``estep_guarded`` (E-steps whose weights the underflow guard rescaled) per image.  The loss
        trace is restart 0's (``losses[0]``, mean over the draws) at every iterate."""
        x, y, ids = x.detach(), y.to(x.device), torch.as_tensor(ids, dtype=torch.long).cpu()
        B = x.shape[0]
        record = InLoopRecord(B)
        delta = torch.zeros_like(x)
        best_restart, best_iteration = np.zeros(B, np.int64), np.zeros(B, np.int64)
        worst, mean = np.ones(B), np.ones(B)
        restarts_run, guarded = np.zeros(B, np.int64), np.zeros(B, np.int64)
        first: dict[str, Any] = {}
        for r in range(len(self.losses)):
            idx = np.arange(B) if r == 0 else np.flatnonzero(record.attack_success_rate() <= self.restart_threshold)
            if idx.size == 0:
                break
            sel = torch.as_tensor(idx, device=x.device)
            out = self._restart(r, x[sel], y[sel], ids[torch.as_tensor(idx)], record, idx,
                                min(self.track, B) if r == 0 else 0)
            first = first or out
            kept = out["kept"]
            restarts_run[idx] += 1
            guarded[idx] += out["guarded"]
            better = (kept.scores["worst"] < worst[idx]) | ((kept.scores["worst"] == worst[idx]) &
                                                            (kept.scores["mean"] < mean[idx]))
            better |= r == 0
            bi = idx[better]
            delta[torch.as_tensor(bi, device=x.device)] = kept.delta[torch.as_tensor(better, device=x.device)]
            best_restart[bi], best_iteration[bi] = r, kept.iteration[better]
            worst[bi], mean[bi] = kept.scores["worst"][better], kept.scores["mean"][better]
        extra = {"inloop": record.correct, "weights": first["weights"], "restarts_run": restarts_run,
                 "best_restart": best_restart, "best_iteration": best_iteration, "estep_guarded": guarded}
        return AttackResult((x + delta).detach(), first["hist"], first["track"] if self.track else None, extra=extra)
