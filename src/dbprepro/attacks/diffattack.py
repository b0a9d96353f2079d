"""DiffAttack (Kang, Song, Li, NeurIPS 2023, arXiv 2311.16124): APGD with EOT on a classification
loss plus a deviated-reconstruction loss on the reverse chain's states, in the official evaluation's
two rounds.

    L_r(x) = l_r(f(P(x)), y) + lambda * (D / D_ref) * sum_{k in S} alpha_k * MSE(r_k, x'_k)

Rounds (``attacks.diffattack.rounds``, default ``[ce, dlr]``): the official code's ``--attack_version
rand`` runs APGD-CE, then APGD-DLR on the images still robust, as AutoAttack's
``run_standard_evaluation``.  Round 1 attacks every image with l = CE; after it, one fresh forward pass
of the defense (its own prediction, :func:`~dbprepro.purifiers.defended.predict_labels`: a vote
defense votes) on the round's adversarial example decides which images survived (the official rule;
in ``dwbox`` the fixed configuration, otherwise a draw no attack step uses); round 2 attacks only
those with l = DLR (fresh draws of its own, its own random start).  An image fooled in a round keeps
that round's adversarial example; an image that survives every round carries its last round's best
point (the official code returns the clean image and counts it robust by its flag; our final
evaluation re-evaluates the returned example with fresh draws, so it gets the attack's best point).
Each round keeps its best point (the iterate with the highest EOT-mean L_r).  The records name the
rounds (``rounds``), the round whose check found each image misclassified (``round_fooled``, 0:
none) and lambda (``dev_weight``); ``loss_start`` is round 1's L at the start, ``loss_end`` the best
L of the last round that attacked the image; the trace holds every round's iterates (NaN where a round
did not attack the image).  ``rounds: [ce]`` is the one-round attack, a named departure.

x'_k is the chain state after reverse step k (model space) of the attacked input, from the defense's
own forward (:meth:`~dbprepro.purifiers.defended.DefendedClassifier.forward_states`: the logits the
defense returns, a vote defense's log mean softmax over its V purifications, and the states of the
same purifications; the deviation of a vote is the mean over its V purifications).  Its gradient
comes from :meth:`~dbprepro.purifiers.base.ReverseChain.purify_states` (per-step recomputation: each
kept state's gradient joins the running vector when the backward pass reaches its step, DiffAttack's
segment-wise backward).  Every term is evaluated on the same draw, so the states and their
references share the noise.

The reference r_k (``reference``): ``forward`` (default, the paper's definition) - the
forward-diffusion point of the attacked input at the state's timestep, with the purification's own
forward noise, x_t = sqrt(abar_t) u + sqrt(1 - abar_t) eps, the gradient flowing through it unless
``detach_reference`` (the official DDPM branch treats it as a constant; its score branch and the
paper's equation do not), purifiers with a forward path (``forward_path``: DDPM, DDIM, GDMP, ADBM)
only; ``clean`` - the clean input's chain state after the same step under the same draw (forward only;
zero at delta = 0), any purifier family.

S (``step_interval``): the states after reverse steps 0, n, 2n, ... (0-based), the output excluded;
n = 1 the paper's uniform S, n = 10 the official code's on its 100-step chain.  alpha_k
(``step_weights``): ``uniform`` 1/|S| (paper, App. D.2) or ``unit`` 1 (official DDPM code).

Scale (``reference_dim``, default 3072 = 3 x 32 x 32): MSE is a per-pixel mean, so the same lambda
weighs a pixel of a D-pixel image 3072 / D times more than a CIFAR-10 pixel in the paper's loss; the
deviation is multiplied by D / reference_dim so that a pixel weighs what it weighs in the paper
(exactly the paper's loss at CIFAR-10 resolution; null: the plain per-pixel mean at every resolution).

Optimizer (``optimizer``): ``apgd`` (the paper's) steps with :func:`~dbprepro.attacks.apgd.apgd` under
``apgd_rule`` (``autoattack``: the official code's schedule, default; ``paper``); ``pgd`` is
:class:`~dbprepro.attacks.pgd.PGD`'s fixed-step update on L (its last iterate).  With lambda = 0,
``rounds: [ce]`` and ``pgd`` the attack *is* PGD.  The official code's classifier gradient at the raw
(unclipped, [-1, 1]) chain output is not reproduced (likely a bug, reference notes section 1).

:class:`DiffAttackWeightZero` (``diffattack0``, :mod:`dbprepro.attacks.diffattack0`) is the same
attack with lambda = 0, run beside it (``also_weight_zero``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..calls import Calls, defended_forward, defended_grad, purify
from ..purifiers.defended import predict_labels
from ..randomness import Stream
from .apgd import APGD_RULES, apgd, apgd_checkpoints  # noqa: F401 (apgd_checkpoints: re-exported)
from .base import AttackResult, evaluation_calls, perturbation_norms
from .losses import LOSSES, attack_loss
from .pgd import PGD, step_draws
from .protocols import evaluate_draws, is_fixed, summarise_evaluations
from .registry import register_attack

REFERENCES = ("forward", "clean")
STEP_WEIGHTS = ("uniform", "unit")
OPTIMIZERS = ("pgd", "apgd")
#: pixels of a CIFAR-10 image, the paper's scale of the deviation loss
PAPER_DIM = 3 * 32 * 32


@register_attack
class DiffAttack(PGD):
    """DiffAttack on a :class:`DefendedClassifier` (see the module docstring).

    Args (beyond :class:`PGD`'s, without restarts):
        weight: lambda, the deviation loss's weight (0: the classification loss alone).
        rounds: the classification loss of each round (``ce``, ``dlr``, ``cw``); round r > 1 attacks
            the survivors of round r - 1.
        step_interval, step_weights, reference, detach_reference, reference_dim: the deviation loss.
        optimizer: ``apgd`` or ``pgd``; apgd_rule: ``autoattack`` or ``paper``.
    """

    name = "diffattack"
    config_section = "diffattack"
    private_section = True
    waterfall_stages = (("DiffAttack", None),)
    waterfall_rank = 40
    needs_chain_states = True

    # -- the registered attack ------------------------------------------------------------------
    @classmethod
    def run_problem(cls, attacks: dict[str, Any], purification: dict[str, Any]) -> str | None:
        d = attacks["diffattack"]
        from ..purifiers import purifier_class

        forward_path = purifier_class(purification["sampler"]).forward_path
        if cls.run_weight(d) > 0 and d["reference"] == "forward" and not forward_path:
            return (f"reference 'forward' (attacks.diffattack.reference) needs a purifier with a forward path "
                    f"(DDPM, DDIM, GDMP, ADBM), not "
                    f"{purification['sampler']!r}; use reference 'clean'")
        if cls.name == "diffattack" and d.get("also_weight_zero") and cls.run_weight(d) == 0:
            return "weight 0 with also_weight_zero runs the same lambda = 0 attack twice; switch one of them off"
        return None

    @classmethod
    def run_weight(cls, section: dict[str, Any]) -> float:
        """lambda of this attack's runs (``attacks.diffattack.weight``)."""
        return float(section["weight"])

    @classmethod
    def settings(cls, attacks: dict[str, Any], threat: str) -> list[str]:
        return cls.section_settings(attacks, threat)

    @classmethod
    def calls_per_image(cls, attacks: dict[str, Any], setting: str, S: int, grad_mode: str) -> tuple[Calls, bool]:
        """Every round priced as if it attacked every image (round r > 1 attacks the survivors only:
        an upper bound when there are several rounds), plus one survivor check per round."""
        d = attacks["diffattack"]
        R = len(d["rounds"])
        passes = (d["steps"] + 1) * (d["eot"] if setting == "whitebox_eot" else 1)  # +1: the final iterate's loss
        calls = defended_grad(S, grad_mode) * (passes * R) + defended_forward(S) * R
        if cls.run_weight(d) > 0 and d["reference"] == "clean":  # the clean chain per draw (one in dwbox)
            calls = calls + purify(S) * ((1 if is_fixed(setting) else passes) * R)
        return calls + evaluation_calls(attacks, setting, S), R > 1

    @classmethod
    def from_section(cls, model, setting: str, threat: dict[str, Any], d: dict[str, Any], track: int = 0
                     ) -> "DiffAttack":
        """The attack of one run from its ``attacks.diffattack`` section ``d``."""
        return cls(model, setting, threat["norm"], threat["eps"], threat["alpha"], steps=d["steps"], eot=d["eot"],
                   random_start=d["random_start"], eot_chunk=d["eot_chunk"], track=track, weight=cls.run_weight(d),
                   rounds=d["rounds"], step_interval=d["step_interval"], step_weights=d["step_weights"],
                   reference=d["reference"], detach_reference=d["detach_reference"],
                   reference_dim=d["reference_dim"], optimizer=d["optimizer"], apgd_rule=d["apgd_rule"])

    @classmethod
    def run_batch(cls, model, x, y, ids, *, setting, threat, attacks, seed, track=0):
        attack = cls.from_section(model, setting, threat, attacks["diffattack"], track)
        res = attack(x, y, ids)
        preds = evaluate_draws(model, res.x_adv, ids, attacks["eval_draws"], setting)
        cols = {"id": ids.numpy(), "label": y.cpu().numpy(),
                **{f"correct_{k}": v for k, v in summarise_evaluations(preds, y.cpu().numpy()).items()},
                **{f"norm_{k}": v for k, v in perturbation_norms(res.x_adv, x).items()},
                "loss_start": res.loss[:, 0], "loss_end": res.extra["loss_adv"],
                "rounds": np.full(len(ids), ",".join(attack.rounds)), "round_fooled": res.extra["round_fooled"],
                "dev_weight": np.full(len(ids), attack.weight)}
        return cols, res

    # -- the attack -----------------------------------------------------------------------------
    def __init__(self, model, setting, norm="linf", eps=8 / 255, alpha=2 / 255, steps=100, eot=20,
                 random_start=False, eot_chunk=4096, track=0, *, weight: float = 1.0,
                 rounds: tuple[str, ...] | list[str] = ("ce", "dlr"), step_interval: int = 1,
                 step_weights: str = "uniform", reference: str = "forward", detach_reference: bool = False,
                 reference_dim: int | None = PAPER_DIM, optimizer: str = "apgd", apgd_rule: str = "autoattack"):
        super().__init__(model, setting, norm, eps, alpha, steps=steps, eot=eot, random_start=random_start,
                         restarts=1, eot_chunk=eot_chunk, track=track)
        for key, val, known in (("reference", reference, REFERENCES), ("step_weights", step_weights, STEP_WEIGHTS),
                                ("optimizer", optimizer, OPTIMIZERS), ("apgd_rule", apgd_rule, APGD_RULES)):
            if val not in known:
                raise ValueError(f"unknown {key} {val!r}; known: {', '.join(known)}")
        bad = [r for r in rounds if r not in LOSSES]
        if not rounds or bad:
            raise ValueError(f"rounds must be a non-empty list of {', '.join(LOSSES)}; got {list(rounds)}")
        if weight < 0 or step_interval < 1 or (reference_dim is not None and reference_dim < 1):
            raise ValueError("weight must be >= 0, step_interval >= 1 and reference_dim >= 1 (or None)")
        p = model.purifier
        if weight > 0 and reference == "forward" and not getattr(p, "forward_path", False):
            raise ValueError(f"reference 'forward' needs a purifier with a forward path (DDPM, DDIM, GDMP, ADBM; "
                             f"got {type(p).__name__}); "
                             "use reference 'clean'")
        self.weight, self.reference, self.detach_reference = float(weight), reference, bool(detach_reference)
        self.rounds, self.reference_dim = tuple(rounds), reference_dim
        self.optimizer, self.apgd_rule = optimizer, apgd_rule
        self.keep = list(range(0, p.num_steps - 1, int(step_interval)))  # the output state is excluded
        self.alphas = [1.0 / max(len(self.keep), 1) if step_weights == "uniform" else 1.0] * len(self.keep)
        self._round, self._loss = 0, self.rounds[0]
        self._clean: torch.Tensor | None = None
        self._clean_states: dict[tuple, list[torch.Tensor]] = {}
        self.attacked: list[int] = []  # images each round of the last call attacked

    @property
    def deviates(self) -> bool:
        return self.weight > 0 and bool(self.keep)

    def draws(self, restart: int, step: int) -> torch.Tensor:
        """Draw indices of ``step``: round r uses restart block r of :func:`step_draws`."""
        return super().draws(restart + self._round, step)

    def check_draws(self, n: int) -> torch.Tensor:
        """The draw [n] of the survivor check after the current round: the fixed configuration in
        ``dwbox``, else the first draw of block (rounds + round), which no step of any round uses."""
        d = step_draws(self.setting, self.model.purifier.randomness.fixed_draw, len(self.rounds) + self._round, 0,
                       self.steps, self.eot)[0]
        return torch.full((n,), int(d), dtype=torch.long)

    def _state_time(self, k: int) -> int:
        """Diffusion timestep (step key) of the state after reverse step k (the purifier's grid)."""
        ts = self.model.purifier.timesteps
        return int(ts[k + 1]) if k + 1 < len(ts) else 0

    def deviation(self, xr, idr, dr, states, clean_r=None) -> torch.Tensor:
        """Per-purification (D / reference_dim) * sum_k alpha_k MSE(r_k, x'_k) of the chain ``states``
        of inputs ``xr`` (purifier ids ``idr``, draws ``dr``)."""
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
        if self.reference_dim is not None:
            dev = dev * (xr[0].numel() / self.reference_dim)
        return dev

    def loss_and_grad(self, x, y, ids, draws):
        """Per-sample L of the current round (mean over the draws) and the gradient of its sum over
        the draws, through the defense's :meth:`forward_states` (its ``forward`` when lambda = 0)."""
        B, K = x.shape[0], draws.numel()
        x = x.detach().requires_grad_(True)
        losses, grad = torch.zeros(B, device=x.device, dtype=x.dtype), torch.zeros_like(x)
        keep = self.keep if self.deviates else ()
        per = max(1, self.eot_chunk // max(B * getattr(self.model, "votes", 1), 1))
        for k0 in range(0, K, per):
            kk = draws[k0:k0 + per]
            xr, idr, dr = x.repeat_interleave(kk.numel(), dim=0), ids.repeat_interleave(kk.numel()), kk.repeat(B)
            fwd = self.model.forward_states(xr, idr, dr, keep)
            loss = attack_loss(fwd.logits, y.repeat_interleave(kk.numel()), self._loss)
            if keep:
                c = fwd.copies
                clean_r = self._clean.repeat_interleave(kk.numel() * c, dim=0) if self.reference == "clean" else None
                dev = self.deviation(xr.repeat_interleave(c, dim=0), fwd.ids, fwd.draws, fwd.states, clean_r)
                loss = loss + self.weight * dev.view(-1, c).mean(1)
            (g,) = torch.autograd.grad(loss.sum(), x)
            grad += g
            losses += loss.detach().view(B, -1).sum(1)
        return losses / K, grad

    def __call__(self, x, y, ids) -> AttackResult:
        """Every round on the images the previous rounds left robust (see the module docstring)."""
        x, y, ids = x.detach(), y.to(x.device), torch.as_tensor(ids, dtype=torch.long).cpu()
        B, n = x.shape[0], self.steps + 1
        x_adv, hist = x.clone(), np.full((B, n * len(self.rounds)), np.nan)
        loss_adv, fooled, track = np.full(B, np.nan), np.zeros(B, dtype=np.int64), None
        active = torch.arange(B)
        self.attacked = []
        try:
            for r, loss in enumerate(self.rounds):
                if not active.numel():
                    break
                self._round, self._loss = r, loss
                self.attacked.append(int(active.numel()))
                res = self._attack_round(x[active], y[active], ids[active])
                x_adv[active] = res.x_adv
                hist[active.numpy(), r * n:(r + 1) * n] = res.loss
                loss_adv[active.numpy()] = res.extra.get("loss_adv", res.loss[:, -1])
                track = res.deltas if r == 0 else track
                with torch.no_grad():
                    pred = predict_labels(self.model, res.x_adv, ids[active], self.check_draws(int(active.numel())))
                wrong = (pred.to(y.device) != y[active]).cpu()
                fooled[active[wrong].numpy()] = r + 1
                active = active[~wrong]
        finally:
            self._round, self._loss = 0, self.rounds[0]
        return AttackResult(x_adv, hist, track, extra={"loss_adv": loss_adv, "round_fooled": fooled})

    def _attack_round(self, x, y, ids) -> AttackResult:
        self._clean, self._clean_states = x, {}
        try:
            if self.optimizer == "pgd":
                return super().__call__(x, y, ids)
            return self._apgd(x, y, ids)
        finally:
            self._clean, self._clean_states = None, {}

    def start(self, x, ids) -> torch.Tensor:
        """APGD's start perturbation: 0, or (``random_start``) uniform in the ball keyed as PGD's by
        (seed, id, round)."""
        if not self.random_start:
            return torch.zeros_like(x)
        u = self.model.purifier.randomness.uniform(ids, torch.full_like(ids, self._round), Stream.ATTACK, 0,
                                                   x.shape[1:], device=x.device) * 2 - 1
        return self._project(x, u * self.eps)

    def _apgd(self, x, y, ids) -> AttackResult:
        """APGD (:func:`~dbprepro.attacks.apgd.apgd`) on L, one draw set per iterate as PGD's schedule."""
        track = np.zeros((min(self.track, x.shape[0]), self.steps + 1, x[0].numel()), dtype=np.float32)

        def loss_and_grad(s, d):
            if track.shape[0]:
                track[:, s] = d[: track.shape[0]].flatten(1).cpu().numpy()
            return self.loss_and_grad(x + d, y, ids, self.draws(0, s))

        best_delta, best, hist = apgd(loss_and_grad, x, self.start(x, ids), eps=self.eps, norm=self.norm,
                                      steps=self.steps, project=self._project, rule=self.apgd_rule)
        hist = torch.stack(hist, 1).cpu().numpy().astype(np.float64)
        return AttackResult((x + best_delta).detach(), hist, track if self.track else None,
                            extra={"loss_adv": best.cpu().numpy()})
