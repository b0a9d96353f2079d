"""DiffAttack (Kang, Song, Li, NeurIPS 2023, arXiv 2311.16124): PGD / APGD with EOT on the
classifier's cross-entropy plus a deviated-reconstruction loss on the reverse chain's states.

    L(x) = CE(f(P(x)), y) + lambda * sum_{k in S} alpha_k * MSE(r_k, x'_k)

x'_k is the chain state after reverse step k (model space) of the attacked input, obtained with
gradients from :meth:`~dbprepro.purifiers.base.ReverseChain.purify_states` (our per-step
recomputation plays the role of DiffAttack's segment-wise forward/backward: the gradient of each
kept state joins the running vector when the backward pass reaches its step).  Every term is
evaluated on the same draw, so the states and their references share the noise.

The reference r_k (``attacks.diffattack.reference``):

``forward`` (default, the paper's definition)
    the forward-diffusion point of the attacked input at the state's timestep, with the
    purification's own forward noise: x_t = sqrt(abar_t) u + sqrt(1 - abar_t) eps.  The gradient
    flows through it unless ``detach_reference`` (the official DDPM branch treats it as a constant;
    its score branch and the paper's equation do not).  DDPM/DDIM purifiers only.
``clean``
    the clean input's chain state after the same step under the same draw (forward only, no
    gradient): zero at delta = 0 and growing with the perturbation.  Any purifier family.

S (``step_interval``): the states after reverse steps 0, n, 2n, ... (0-based), the output excluded
(its loss is the CE); n = 1 is the paper's uniform S over the chain, n = 10 the official code's on
its 100-step chain.  alpha_k (``step_weights``): ``uniform`` = 1/|S| (paper, App. D.2) or ``unit`` = 1
(official DDPM code, about |S| times stronger).  The official code's classifier gradient at the raw
(unclipped, [-1, 1]) chain output is not reproduced (likely a bug, see
/work/shared/reference/adaptive-attacks.md section 1): the CE is the defended classifier's.

Optimizers (``optimizer``): ``pgd`` is :class:`~dbprepro.attacks.pgd.PGD`'s update on L (with
lambda = 0 the attack *is* PGD); ``apgd`` is APGD (Croce & Hein 2020), the paper's optimizer.
torchattacks' APGD takes neither a custom loss on the chain states nor per-sample draw indices, so
the step-size schedule is implemented here from the paper: initial step 2 eps, momentum 0.75,
checkpoints p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), the step halved
(and the iterate reset to the best point) at a checkpoint where fewer than 75 % of the steps since
the last one increased the loss, or where neither the step nor the best loss changed.  APGD
returns its best point (highest EOT-mean loss); PGD its last iterate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..calls import Calls, defended_grad, purify
from ..randomness import Stream
from .apgd import apgd, apgd_checkpoints  # noqa: F401 (apgd_checkpoints: re-exported)
from .base import AttackResult, evaluation_calls, perturbation_norms
from .pgd import PGD
from .protocols import evaluate_draws, is_fixed, summarise_evaluations
from .registry import register_attack

REFERENCES = ("forward", "clean")
STEP_WEIGHTS = ("uniform", "unit")
OPTIMIZERS = ("pgd", "apgd")


@register_attack
class DiffAttack(PGD):
    """DiffAttack on a :class:`DefendedClassifier` (see the module docstring for the loss).

    Args (beyond :class:`PGD`'s, without restarts):
        weight: lambda, the deviation loss's weight (0: plain CE, the attack is PGD / APGD-CE).
        step_interval, step_weights, reference, detach_reference: the deviation loss.
        optimizer: ``pgd`` or ``apgd``.
    """

    name = "diffattack"
    config_section = "diffattack"
    private_section = True
    waterfall_stages = (("DiffAttack", None),)
    waterfall_rank = 40
    needs_chain_states = True

    # -- the registered attack ------------------------------------------------------------------
    @classmethod
    def settings(cls, attacks: dict[str, Any], threat: str) -> list[str]:
        return cls.section_settings(attacks, threat)

    @classmethod
    def calls_per_image(cls, attacks: dict[str, Any], setting: str, S: int, grad_mode: str) -> tuple[Calls, bool]:
        d = attacks["diffattack"]
        passes = (d["steps"] + 1) * (d["eot"] if setting == "whitebox_eot" else 1)  # +1: the final iterate's loss
        calls = defended_grad(S, grad_mode) * passes
        if d["weight"] > 0 and d["reference"] == "clean":  # the clean chain once per draw (one in dwbox), forward only
            calls = calls + purify(S) * (1 if is_fixed(setting) else passes)
        return calls + evaluation_calls(attacks, setting, S), False

    @classmethod
    def run_batch(cls, model, x, y, ids, *, setting, threat, attacks, seed, track=0):
        d = attacks["diffattack"]
        attack = cls(model, setting, threat["norm"], threat["eps"], threat["alpha"], steps=d["steps"], eot=d["eot"],
                     random_start=d["random_start"], eot_chunk=d["eot_chunk"], track=track, weight=d["weight"],
                     step_interval=d["step_interval"], step_weights=d["step_weights"], reference=d["reference"],
                     detach_reference=d["detach_reference"], optimizer=d["optimizer"])
        res = attack(x, y, ids)
        preds = evaluate_draws(model, res.x_adv, ids, attacks["eval_draws"], setting)
        cols = {"id": ids.numpy(), "label": y.cpu().numpy(),
                **{f"correct_{k}": v for k, v in summarise_evaluations(preds, y.cpu().numpy()).items()},
                **{f"norm_{k}": v for k, v in perturbation_norms(res.x_adv, x).items()},
                "loss_start": res.loss[:, 0], "loss_end": res.extra.get("loss_adv", res.loss[:, -1])}
        return cols, res

    # -- the attack -----------------------------------------------------------------------------
    def __init__(self, model, setting, norm="linf", eps=8 / 255, alpha=2 / 255, steps=100, eot=20,
                 random_start=False, eot_chunk=4096, track=0, *, weight: float = 1.0, step_interval: int = 1,
                 step_weights: str = "uniform", reference: str = "forward", detach_reference: bool = False,
                 optimizer: str = "apgd"):
        super().__init__(model, setting, norm, eps, alpha, steps=steps, eot=eot, random_start=random_start,
                         restarts=1, eot_chunk=eot_chunk, track=track)
        for key, val, known in (("reference", reference, REFERENCES), ("step_weights", step_weights, STEP_WEIGHTS),
                                ("optimizer", optimizer, OPTIMIZERS)):
            if val not in known:
                raise ValueError(f"unknown {key} {val!r}; known: {', '.join(known)}")
        if weight < 0 or step_interval < 1:
            raise ValueError("weight must be >= 0 and step_interval >= 1")
        p = model.purifier
        if weight > 0 and reference == "forward" and getattr(p, "sampler", None) not in ("ddpm", "ddim"):
            raise ValueError(f"reference 'forward' needs a DDPM/DDIM purifier (got {type(p).__name__}); "
                             "use reference 'clean'")
        self.weight, self.reference, self.detach_reference = float(weight), reference, bool(detach_reference)
        self.optimizer = optimizer
        self.keep = list(range(0, p.num_steps - 1, int(step_interval)))  # the output state is excluded
        self.alphas = [1.0 / max(len(self.keep), 1) if step_weights == "uniform" else 1.0] * len(self.keep)
        self._clean: torch.Tensor | None = None
        self._clean_states: dict[tuple, list[torch.Tensor]] = {}

    @property
    def deviates(self) -> bool:
        return self.weight > 0 and bool(self.keep)

    def _state_time(self, k: int) -> int:
        """Diffusion timestep of the state after reverse step k (DDPM/DDIM grid)."""
        ts = self.model.purifier.timesteps
        return int(ts[k + 1]) if k + 1 < len(ts) else 0

    def deviation(self, xr, idr, dr, states, clean_r=None) -> torch.Tensor:
        """Per-sample sum_k alpha_k MSE(r_k, x'_k) of the chain ``states`` of inputs ``xr``."""
        p = self.model.purifier
        if self.reference == "clean":
            key = (tuple(idr.tolist()), tuple(dr.tolist()))
            if key not in self._clean_states:  # forward only; reused while the draw is (dwbox: always)
                with torch.no_grad():
                    self._clean_states = {key: p.purify_states(clean_r, idr, dr, self.keep)[1]}
            refs = self._clean_states[key]
        else:
            src = xr.detach() if self.detach_reference else xr
            refs = [p.diffuse(src, idr, dr, self._state_time(k)) for k in self.keep]
        dev = torch.zeros(xr.shape[0], device=xr.device, dtype=xr.dtype)
        for a, s, r in zip(self.alphas, states, refs):
            dev = dev + a * (s - r).flatten(1).pow(2).mean(1)
        return dev

    def loss_and_grad(self, x, y, ids, draws):
        """Per-sample L (mean over the draws) and the gradient of its sum over the draws."""
        if not self.deviates:
            return super().loss_and_grad(x, y, ids, draws)  # lambda = 0 or S empty: PGD's pass, bit for bit
        B, K = x.shape[0], draws.numel()
        x = x.detach().requires_grad_(True)
        losses, grad = torch.zeros(B, device=x.device, dtype=x.dtype), torch.zeros_like(x)
        per = max(1, self.eot_chunk // max(B, 1))
        for k0 in range(0, K, per):
            kk = draws[k0:k0 + per]
            xr, idr, dr = x.repeat_interleave(kk.numel(), dim=0), ids.repeat_interleave(kk.numel()), kk.repeat(B)
            out, states = self.model.purifier.purify_states(xr, idr, dr, self.keep)
            ce = F.cross_entropy(self.model.classifier(out), y.repeat_interleave(kk.numel()), reduction="none")
            clean_r = self._clean.repeat_interleave(kk.numel(), dim=0) if self.reference == "clean" else None
            loss = ce + self.weight * self.deviation(xr, idr, dr, states, clean_r)
            (g,) = torch.autograd.grad(loss.sum(), x)
            grad += g
            losses += loss.detach().view(B, -1).sum(1)
        return losses / K, grad

    def __call__(self, x, y, ids) -> AttackResult:
        x, y, ids = x.detach(), y.to(x.device), torch.as_tensor(ids, dtype=torch.long).cpu()
        self._clean, self._clean_states = x, {}
        try:
            if self.optimizer == "pgd":
                return super().__call__(x, y, ids)
            return self._apgd(x, y, ids)
        finally:
            self._clean, self._clean_states = None, {}

    def _apgd(self, x, y, ids) -> AttackResult:
        """APGD (:func:`~dbprepro.attacks.apgd.apgd`) on L, one draw set per iterate as PGD's schedule."""
        delta = torch.zeros_like(x)
        if self.random_start:  # as PGD's: keyed by (seed, id, restart 0)
            u = self.model.purifier.randomness.uniform(ids, torch.zeros_like(ids), Stream.ATTACK, 0, x.shape[1:],
                                                       device=x.device) * 2 - 1
            delta = self._project(x, u * self.eps)
        track = np.zeros((min(self.track, x.shape[0]), self.steps + 1, x[0].numel()), dtype=np.float32)

        def loss_and_grad(s, d):
            if track.shape[0]:
                track[:, s] = d[: track.shape[0]].flatten(1).cpu().numpy()
            return self.loss_and_grad(x + d, y, ids, self.draws(0, s))

        best_delta, best, hist = apgd(loss_and_grad, x, delta, eps=self.eps, norm=self.norm, steps=self.steps,
                                      project=self._project)
        hist = torch.stack(hist, 1).cpu().numpy().astype(np.float64)
        return AttackResult((x + best_delta).detach(), hist, track if self.track else None,
                            extra={"loss_adv": best.cpu().numpy()})
