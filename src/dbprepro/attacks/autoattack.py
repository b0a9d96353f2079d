"""AutoAttack on diffusion-based purification with paper 1's multi-evaluation.

Sub-attacks are torchattacks' (3.5.x) implementations:

``standard``  APGD-CE, APGD-T (targeted DLR), FAB-T (``FAB(multi_targeted=True)``), Square;
``rand``      APGD-CE and APGD-DLR with EOT (``eot_iter``), AutoAttack's version for stochastic
              models (Square and FAB assume a deterministic forward pass).

Three protocols (:data:`PROTOCOLS`, config ``attacks.autoattack.protocols``), each a registered attack:

``aa_standard_dwbox``      ``standard`` on the deterministic DW-box purifier (setting ``dwbox``): the
                           re-evaluation of a candidate repeats one deterministic purification;
``aa_standard_multieval``  paper 1's Fixed-AutoAttack: ``standard`` on the *stochastic* purifier
                           (setting ``whitebox``: a fresh purification draw per forward pass, no
                           EOT), every candidate re-evaluated ``n_eval`` times with fresh draws;
``aa_rand``                ``rand`` on the stochastic purifier with EOT (setting ``whitebox_eot``).

Multi-evaluation (paper 1's "Fixed-AutoAttack")
-----------------------------------------------
AutoAttack counts a sample as broken as soon as one forward pass misclassifies it, which on a
stochastic defense is luck, not robustness.  Here the clean input is the initial candidate of
each sample; after every sub-attack, each candidate it returns is re-purified and classified
``n_eval`` times (:func:`~dbprepro.attacks.protocols.evaluate_draws`: fresh evaluation draws in the
stochastic settings, the fixed configuration in ``dwbox``), its score is the mean correctness,
and it replaces the stored example only if its score is strictly lower.  Only samples whose
stored score is still > 0 are attacked by later sub-attacks.  The reported columns come from
the final stored examples evaluated with ``eval_draws`` draws, like
:func:`~dbprepro.attacks.pgd.attack_batch`.

Sample ids inside torchattacks
------------------------------
torchattacks calls ``model(x)`` with images only, and inside every sub-attack on *subsets* of
the batch it was given (APGD/APGD-T/FAB attack only the samples their own first forward pass
classifies correctly, Square only the ones not yet fooled), so a static ``bind(ids=...)`` of
the batch would not match the batch size.  :class:`IdTracker` therefore resolves the ids of
every call: the whole batch keeps its ids (torchattacks never reorders), a subset is matched to
the reference images by the order-preserving assignment of minimum total distance (torchattacks
always subsets with sorted indices, and every query lies near its own clean image), and the call
runs under ``model.bind(ids=...)``.  The reported scores never depend on this matching: they are
computed by :func:`evaluate_draws` with the true ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..calls import Calls, defended_forward, defended_grad
from ..purifiers import DefendedClassifier
from .base import NORMS, Attack, AttackResult, Norm, evaluation_calls, perturbation_norms, project
from .protocols import (EVAL_DRAW_OFFSET, SELECT_DRAW_OFFSET, Setting, _check_randomness, evaluate_draws, is_fixed,
                        summarise_evaluations)
from .registry import ATTACKS, register_attack

log = logging.getLogger("dbprepro.autoattack")

VERSIONS = ("standard", "rand")
#: protocol (config ``attacks.autoattack.protocols``) -> (sub-attack version, setting it runs in)
PROTOCOLS: dict[str, tuple[str, str]] = {"standard_dwbox": ("standard", "dwbox"),
                                         "standard_multieval": ("standard", "whitebox"),
                                         "rand": ("rand", "whitebox_eot")}
TA_NORM = {"linf": "Linf", "l2": "L2"}
DEFAULTS: dict[str, Any] = dict(n_eval=20, apgd_steps=100, eot_iter=20, n_restarts=1, fab_steps=100,
                                square_queries=5000, n_target_classes=9)

SubAttack = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], np.ndarray]


# -- sample ids inside torchattacks ------------------------------------------------------------
def monotone_assignment(dist: np.ndarray) -> np.ndarray:
    """Strictly increasing column per row (``dist`` is [m, B], m <= B) minimising the total distance."""
    m, B = dist.shape
    if m > B:
        raise ValueError(f"cannot assign {m} queries to {B} reference images")
    nearest = dist.argmin(1)
    if m == 1 or (np.diff(nearest) > 0).all():
        return nearest  # the usual case: every query is nearest to its own image
    f = np.empty((m, B))
    back = np.zeros((m, B), dtype=np.int64)
    f[0] = dist[0]
    cols = np.arange(B)
    for i in range(1, m):
        prev = f[i - 1]
        run_min = np.minimum.accumulate(prev)
        run_arg = np.maximum.accumulate(np.where(prev == run_min, cols, 0))
        best = np.concatenate(([np.inf], run_min[:-1]))  # best predecessor strictly left of j
        f[i] = dist[i] + best
        back[i, 1:] = run_arg[:-1]
    out = np.zeros(m, dtype=np.int64)
    out[-1] = int(np.argmin(f[-1]))
    for i in range(m - 1, 0, -1):
        out[i - 1] = back[i, out[i]]
    return out


class IdTracker(nn.Module):
    """``model(x)`` for torchattacks with the sample ids of every call resolved (module docstring).

    Args:
        model: the defended classifier.
        x_ref: the clean images handed to the sub-attack, [B, C, H, W].
        ids: their sample ids [B].
        norm: distance used to match subsets to reference images.
    """

    def __init__(self, model: DefendedClassifier, x_ref: torch.Tensor, ids: torch.Tensor, norm: Norm = "linf"):
        super().__init__()
        self.model = model
        self.x_ref = x_ref.detach().flatten(1)
        self.ids = torch.as_tensor(ids, dtype=torch.long).cpu()
        self.p = float("inf") if norm == "linf" else 2.0
        self.calls = 0
        self.subset_calls = 0
        # torchattacks calls model.train() after an attack on a model found in training mode
        # (nn.Module's default): keep the tracker, hence the defended classifier, in eval mode
        self.eval()

    def resolve(self, x: torch.Tensor) -> torch.Tensor:
        """Ids of the rows of ``x`` (the whole batch, or an order-preserving subset of it)."""
        if x.shape[0] == self.x_ref.shape[0]:
            return self.ids
        with torch.no_grad():
            d = torch.cdist(x.detach().flatten(1).to(self.x_ref.dtype), self.x_ref, p=self.p)
        return self.ids[torch.as_tensor(monotone_assignment(d.cpu().double().numpy()))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.resolve(x)
        self.calls += 1
        self.subset_calls += int(x.shape[0] != self.x_ref.shape[0])
        with self.model.bind(ids=ids):
            return self.model(x)


# -- the sub-attacks ---------------------------------------------------------------------------
def build_subattacks(model: DefendedClassifier, *, version: str, setting: Setting, norm: Norm, eps: float,
                     config: dict[str, Any], seed: int, num_classes: int) -> list[tuple[str, SubAttack]]:
    """The torchattacks sub-attacks of ``version``, each as ``fn(x, y, ids) -> candidates``."""
    import torchattacks

    ta_norm = TA_NORM[norm]
    restarts = int(config["n_restarts"])
    # torchattacks' APGDT / FAB(multi_targeted) attack the n_classes - 1 most likely wrong classes
    n_targets = max(1, min(int(config["n_target_classes"]), num_classes - 1))
    # EOT over a deterministic (dwbox) purifier averages identical gradients: one pass is the same
    eot = int(config["eot_iter"]) if setting == "whitebox_eot" else 1

    def make(name: str, factory: Callable[[nn.Module], Any]) -> tuple[str, SubAttack]:
        def run(x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            tracker = IdTracker(model, x, ids, norm)
            atk = factory(tracker)
            out = atk(x, y)
            log.debug("%s: %d model calls (%d on subsets)", name, tracker.calls, tracker.subset_calls)
            return out.detach()

        return name, run

    if version == "standard":
        return [
            make("apgd-ce", lambda m: torchattacks.APGD(m, norm=ta_norm, eps=eps, steps=int(config["apgd_steps"]),
                                                        n_restarts=restarts, seed=seed, loss="ce", eot_iter=1)),
            make("apgd-t", lambda m: torchattacks.APGDT(m, norm=ta_norm, eps=eps, steps=int(config["apgd_steps"]),
                                                        n_restarts=restarts, seed=seed, eot_iter=1,
                                                        n_classes=n_targets + 1)),
            make("fab-t", lambda m: torchattacks.FAB(m, norm=ta_norm, eps=eps, steps=int(config["fab_steps"]),
                                                     n_restarts=restarts, seed=seed, multi_targeted=True,
                                                     n_classes=n_targets + 1)),
            make("square", lambda m: torchattacks.Square(m, norm=ta_norm, eps=eps,
                                                         n_queries=int(config["square_queries"]),
                                                         n_restarts=restarts, seed=seed)),
        ]
    if version == "rand":
        return [
            make("apgd-ce", lambda m: torchattacks.APGD(m, norm=ta_norm, eps=eps, steps=int(config["apgd_steps"]),
                                                        n_restarts=restarts, seed=seed, loss="ce", eot_iter=eot)),
            make("apgd-dlr", lambda m: torchattacks.APGD(m, norm=ta_norm, eps=eps, steps=int(config["apgd_steps"]),
                                                         n_restarts=restarts, seed=seed, loss="dlr", eot_iter=eot)),
        ]
    raise ValueError(f"unknown AutoAttack version {version!r}; known: {', '.join(VERSIONS)}")


# -- the multi-evaluation ----------------------------------------------------------------------
def run_multi_evaluation(x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor,
                         subattacks: Sequence[tuple[str, SubAttack]], score_fn: ScoreFn,
                         constrain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, np.ndarray, list[dict[str, Any]]]:
    """Keep, per sample, the candidate with the lowest multi-evaluation score.

    ``score_fn(x, y, ids)`` gives the per-sample score (mean correctness over the evaluations);
    ``constrain(cand, x)`` maps candidates back into the threat model.  Returns the stored
    examples, their scores and one record per stage (``clean`` then each sub-attack).
    """
    x_best = x.detach().clone()
    score = np.asarray(score_fn(x_best, y, ids), dtype=np.float64).copy()
    records = [dict(name="clean", n_attacked=0, n_replaced=0, mean_score=float(score.mean()), seconds=0.0)]
    log.info("clean: mean score %.4f over %d samples", score.mean(), len(score))
    for name, attack in subattacks:
        t0 = time.perf_counter()
        active = np.flatnonzero(score > 0)
        n_replaced = 0
        if active.size:
            sel = torch.as_tensor(active, device=x.device)
            xs, ys, ids_s = x[sel], y[sel], ids[torch.as_tensor(active)]
            cand = attack(xs, ys, ids_s).detach().to(x.dtype)
            if constrain is not None:
                cand = constrain(cand, xs)
            cand_score = np.asarray(score_fn(cand, ys, ids_s), dtype=np.float64)
            better = cand_score < score[active]
            if better.any():
                rows = active[better]
                x_best[torch.as_tensor(rows, device=x.device)] = cand[torch.as_tensor(np.flatnonzero(better),
                                                                                      device=x.device)]
                score[rows] = cand_score[better]
            n_replaced = int(better.sum())
        dt = time.perf_counter() - t0
        records.append(dict(name=name, n_attacked=int(active.size), n_replaced=n_replaced,
                            mean_score=float(score.mean()), seconds=dt))
        log.info("%s: attacked %d/%d, replaced %d, mean score %.4f (%.1f s)", name, active.size, len(score),
                 n_replaced, score.mean(), dt)
    return x_best, score, records


def autoattack_batch(model: DefendedClassifier, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, *,
                     version: str, setting: Setting, norm: Norm, eps: float, config: dict[str, Any],
                     eval_draws: int, seed: int, multieval: bool = False
                     ) -> tuple[dict[str, np.ndarray], AttackResult]:
    """AutoAttack (``standard`` | ``rand``) with multi-evaluation on one batch (module docstring).

    ``multieval`` marks paper 1's Fixed-AutoAttack protocol (``standard`` on the stochastic
    purifier, :class:`AutoAttackStandardMultiEval`): the warning against ``standard`` on a
    stochastic purifier is then not given, as it is the intended protocol there.

    ``model``'s purifier randomness must match ``setting`` (fixed for ``dwbox``, random
    otherwise); its random-mode counters are reset first, so a call is replayable whatever ran
    before.  Returns the per-sample columns of :func:`~dbprepro.attacks.pgd.attack_batch` (losses
    are NaN: torchattacks does not expose them) and an :class:`AttackResult` whose
    ``extra["per_subattack"]`` lists the mean score after each stage.
    """
    if version not in VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; known: {', '.join(VERSIONS)}")
    fixed = is_fixed(setting)  # raises on an unknown setting; dwbox_c{k} is dwbox
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    randomness = model.purifier.randomness
    _check_randomness(setting, randomness)
    cfg = {**DEFAULTS, **(config or {})}
    n_eval = int(cfg["n_eval"])
    if version == "standard" and not fixed and not multieval:
        log.warning("AutoAttack-standard (FAB, Square) on a stochastic purifier (%s): use 'rand' there, or the "
                    "multi-evaluation protocol aa_standard_multieval", setting)
    if multieval and (fixed or n_eval < 2):
        log.warning("AutoAttack multi-evaluation with %s: re-evaluating a candidate does nothing here (%s)",
                    "a deterministic purifier" if fixed else "n_eval = 1", setting)
    x, ids = x.detach(), torch.as_tensor(ids, dtype=torch.long).cpu()
    y = y.to(x.device)
    randomness.reset()  # replayable: the attacker's random-mode draws start at 0 for every sample

    # number of classes (for the target classes), with an evaluation draw: no counter moves
    with torch.no_grad():
        d0 = torch.full((1,), randomness.fixed_draw if fixed else EVAL_DRAW_OFFSET)
        num_classes = int(model(x[:1], ids=ids[:1], draws=d0).shape[1])

    def score_fn(xc, yc, idc):
        # selection draws are disjoint from the final evaluation draws, so the reported
        # accuracies are not biased by the selection (paper 1 reports the selection score
        # itself; it is kept as the column selection_score)
        preds = evaluate_draws(model, xc, idc, n_eval, setting, offset=SELECT_DRAW_OFFSET)
        return (preds == yc.cpu().numpy()[:, None]).mean(1)

    def constrain(cand, xs):
        return (xs + project(cand - xs, norm, eps)).clamp(0, 1)

    subattacks = build_subattacks(model, version=version, setting=setting, norm=norm, eps=float(eps), config=cfg,
                                  seed=int(seed), num_classes=num_classes)
    # torchattacks quirks: it calls model.train() after an attack on a model found in training
    # mode (nn.Module's default, which DefendedClassifier keeps; see IdTracker), FAB's backward()
    # fills the classifier's .grad, and every sub-attack reseeds the global torch RNG
    training = {m: m.training for m in model.modules()}
    requires = [(p, p.requires_grad) for p in model.parameters()]
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        model.eval()
        for p, _ in requires:
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=devices):
            x_adv, score, records = run_multi_evaluation(x, y, ids, subattacks, score_fn, constrain)
    finally:
        for m, flag in training.items():
            m.training = flag
        for p, flag in requires:
            p.requires_grad_(flag)

    preds = evaluate_draws(model, x_adv, ids, eval_draws, setting)
    labels = y.cpu().numpy()
    nan = np.full(len(ids), np.nan)
    cols = {"id": ids.numpy(), "label": labels,
            **{f"correct_{k}": v for k, v in summarise_evaluations(preds, labels).items()},
            **{f"norm_{k}": v for k, v in perturbation_norms(x_adv, x).items()},
            "loss_start": nan, "loss_end": nan.copy(), "selection_score": np.asarray(score, dtype=np.float64)}
    log.info("AutoAttack-%s (%s, %s eps=%.4g): robust accuracy %.4f single / %.4f mean over %d draws", version,
             setting, norm, eps, cols["correct_single"].mean(), cols["correct_mean"].mean(), eval_draws)
    extra = {"per_subattack": records, "score": score, "n_eval": n_eval, "version": version}
    return cols, AttackResult(x_adv, loss=None, deltas=None, extra=extra)


@register_attack
class AutoAttackStandardDWBox(Attack):
    """``aa_standard_dwbox``: AutoAttack's standard sub-attacks (APGD-CE, APGD-T, FAB-T, Square) with
    multi-evaluation, on the deterministic purifier (``dwbox``), where a re-evaluation repeats the
    one fixed purification (in effect ``n_eval`` = 1); config ``attacks.autoattack``, protocol
    ``standard_dwbox``.  Was ``aa_standard`` (still accepted by name, deprecated)."""

    name = "aa_standard_dwbox"
    config_section = "autoattack"
    waterfall_stages = (("AutoAttack", None),)  # every protocol (the subclasses inherit it)
    waterfall_rank = 30
    protocol = "standard_dwbox"
    version, setting = PROTOCOLS[protocol]
    multieval = False

    @classmethod
    def settings(cls, attacks: dict[str, Any], threat: str) -> list[str]:
        aa = attacks["autoattack"]
        run = aa["enabled"] and cls.protocol in aa["protocols"] and threat in aa["threat_models"]
        return [cls.setting] if run else []

    @classmethod
    def calls_per_image(cls, attacks: dict[str, Any], setting: str, S: int, grad_mode: str) -> tuple[Calls, bool]:
        """An upper bound: every image through every sub-attack (AutoAttack stops attacking an
        image once it is broken), and the multi-evaluation after each sub-attack (``n_eval``
        defended forwards per stage in the stochastic settings, one in the fixed ones)."""
        aa = attacks["autoattack"]
        R, n_eval = aa["n_restarts"], (1 if is_fixed(setting) else aa["n_eval"])
        select = defended_forward(S) * n_eval
        g = defended_grad(S, grad_mode)
        T = aa["n_target_classes"]
        apgd_ce = g * (R * (aa["apgd_steps"] + 1))
        apgd_t = g * (T * R * (aa["apgd_steps"] + 1))
        fab_t = (g + defended_forward(S)) * (T * R * aa["fab_steps"])
        square = defended_forward(S) * aa["square_queries"]
        return apgd_ce + apgd_t + fab_t + square + select * 4 + evaluation_calls(attacks, setting, S), True

    @classmethod
    def run_batch(cls, model, x, y, ids, *, setting, threat, attacks, seed, track=0):
        return autoattack_batch(model, x, y, ids, version=cls.version, setting=setting, norm=threat["norm"],
                                eps=threat["eps"], config=attacks["autoattack"], eval_draws=attacks["eval_draws"],
                                seed=seed, multieval=cls.multieval)


@register_attack
class AutoAttackStandardMultiEval(AutoAttackStandardDWBox):
    """``aa_standard_multieval``: paper 1's Fixed-AutoAttack - the standard sub-attacks on the
    *stochastic* purifier, every candidate re-purified and classified ``n_eval`` times with fresh
    draws, the candidate with the lowest mean correctness kept (protocol ``standard_multieval``).

    The setting is ``whitebox``, not ``whitebox_eot``: AutoAttack-standard has no EOT, and every
    forward pass torchattacks makes (a gradient of APGD/FAB, a query of Square) is one fresh
    purification draw - exactly ``whitebox``'s "one fresh draw per attack step, fresh draws for
    the evaluation" (:mod:`~dbprepro.attacks.protocols`).  ``dwbox`` would fix the draw, making the
    re-evaluation a repetition (that is :class:`AutoAttackStandardDWBox`)."""

    name = "aa_standard_multieval"
    protocol = "standard_multieval"
    version, setting = PROTOCOLS[protocol]
    multieval = True


@register_attack
class AutoAttackRand(AutoAttackStandardDWBox):
    """``aa_rand``: AutoAttack's version for stochastic defenses (APGD-CE and APGD-DLR with EOT),
    with multi-evaluation, on the stochastic purifier (``whitebox_eot``); protocol ``rand``."""

    name = "aa_rand"
    protocol = "rand"
    version, setting = PROTOCOLS[protocol]

    @classmethod
    def calls_per_image(cls, attacks: dict[str, Any], setting: str, S: int, grad_mode: str) -> tuple[Calls, bool]:
        aa = attacks["autoattack"]
        R, n_eval = aa["n_restarts"], (1 if is_fixed(setting) else aa["n_eval"])
        apgd = defended_grad(S, grad_mode) * (R * (aa["apgd_steps"] + 1) * aa["eot_iter"])
        select = defended_forward(S) * n_eval
        return apgd * 2 + select * 2 + evaluation_calls(attacks, setting, S), True


ATTACKS.alias("aa_standard", AutoAttackStandardDWBox.name)
