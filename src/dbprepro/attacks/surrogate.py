"""Lee & Kim (ICCV 2023, arXiv 2303.09051): PGD-EOT through a *surrogate* purification process.

The defense purifies with its own process P_def (its ``purification`` section); the attacker
differentiates through another process P_att of the same network, typically the same t* with a
coarser step grid (Lee & Kim: DiffPure's defense at dt 0.001 = 100 steps, the attack at dt 0.005 =
20 steps; DDPM/DDIM with fewer denoising steps), because the full chain is too expensive to
backpropagate through.  The adversarial examples are then evaluated on P_def, never on P_att.

P_att is the defense's section overlaid with ``attacks.surrogate.purification`` (any of the
``purification`` keys; the nested ``vpsde``/``edm`` sections are merged key by key), and, where the
overlay leaves a family's step count open, that count divided by ``attacks.surrogate.coarsen``
(:func:`surrogate_purification`).  With an empty overlay and ``coarsen`` 1 the attack *is* PGD-EOT
on the defense (the known answer of tests/test_surrogate.py).

Randomness: the surrogate purifier shares the defense's replayable
:class:`~dbprepro.randomness.Randomness` (seed and mode) and PGD's draw schedule (step s, EOT
sample k: draw ``s * K + k``), so its noise is replayable per image even where its shapes differ
from the defense's (another number of reverse steps); the evaluation draws stay
:data:`~dbprepro.attacks.protocols.EVAL_DRAW_OFFSET` onwards on the defense.

The records are PGD's columns (:func:`~dbprepro.attacks.pgd.attack_batch`: ``correct_*`` on the
defense, norms, and ``loss_start``/``loss_end``, which are the *surrogate's* losses, the objective
the attacker climbs), plus ``surrogate``: a short description of P_att.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..calls import Calls, defended_grad
from ..purifiers.registry import build_purifier, purifier_class
from .base import Attack, evaluation_calls
from .pgd import attack_batch, pgd_section as _pgd_section
from .registry import register_attack

#: the step-count keys ``coarsen`` divides: top-level key or (family section, key)
STEP_KEYS: tuple[tuple[str, ...], ...] = (("num_inference_steps",), ("vpsde", "steps"), ("edm", "steps"))


def _overlay(section: dict[str, Any] | None) -> dict[str, Any]:
    """The overlay without its unset (null) keys, nested sections included."""
    out: dict[str, Any] = {}
    for k, v in (section or {}).items():
        if isinstance(v, dict):
            v = {kk: vv for kk, vv in v.items() if vv is not None}
            if v:
                out[k] = v
        elif v is not None:
            out[k] = v
    return out


def surrogate_purification(purification: dict[str, Any], surrogate: dict[str, Any]) -> dict[str, Any]:
    """The attacker's ``purification`` section: the defense's ``purification`` overlaid with
    ``surrogate["purification"]``, then each step count the overlay leaves open (``num_inference_steps``,
    ``vpsde.steps``, ``edm.steps``, where the defense's section has it) divided by
    ``surrogate["coarsen"]`` (integer division, at least 1)."""
    over = _overlay(surrogate.get("purification"))
    pur = dict(purification)
    for k, v in over.items():
        pur[k] = {**(pur.get(k) or {}), **v} if isinstance(v, dict) else v
    f = int(surrogate.get("coarsen", 1) or 1)
    if f > 1:
        for key in STEP_KEYS:
            if len(key) == 1:
                if key[0] not in over and key[0] in pur:
                    pur[key[0]] = max(1, int(pur[key[0]]) // f)
            elif key[1] not in over.get(key[0], {}) and key[1] in (pur.get(key[0]) or {}):
                pur[key[0]] = {**pur[key[0]], key[1]: max(1, int(pur[key[0]][key[1]]) // f)}
    return pur


def describe(purification: dict[str, Any], network_calls: int) -> str:
    """A short description of a purification process (the records' ``surrogate`` column)."""
    sampler = purification.get("sampler", "ddpm")
    grid = {"ddpm": "num_inference_steps", "ddim": "num_inference_steps"}.get(sampler)
    detail = f" N={purification[grid]}" if grid and grid in purification else ""
    if sampler == "ddim":
        detail += f" eta={purification.get('eta', 0.0):g}"
    return f"{sampler} t*={purification.get('t_star', 0.1):g}{detail}: {network_calls} network calls"


def pgd_section(attacks: dict[str, Any]) -> dict[str, Any]:
    """``attacks.pgd`` with the surrogate's own ``steps`` and ``eot`` where set."""
    return _pgd_section(attacks, "surrogate")


@register_attack
class Surrogate(Attack):
    """PGD-EOT whose gradient runs through a surrogate purification process (Lee & Kim 2023),
    evaluated on the defense's own process.  Config section ``attacks.surrogate``: where it runs
    (``enabled``, ``settings``, ``threat_models``), the surrogate process (``purification`` overlay,
    ``coarsen``) and PGD's ``steps``/``eot`` (null: ``attacks.pgd``'s)."""

    name = "surrogate"
    config_section = "surrogate"
    private_section = True
    waterfall_stages = (("surrogate", None),)
    waterfall_rank = 50

    @classmethod
    def settings(cls, attacks: dict[str, Any], threat: str) -> list[str]:
        return cls.section_settings(attacks, threat)

    @classmethod
    def calls_per_image(cls, attacks: dict[str, Any], setting: str, S: int, grad_mode: str,
                        surrogate_S: int | None = None) -> tuple[Calls, bool]:
        """The surrogate's gradients (``surrogate_S`` network calls per purification, default
        ``S``; its own ``grad_mode`` where the overlay sets one) at every PGD pass, then the
        defense's evaluation on its chain of ``S`` calls."""
        pgd = pgd_section(attacks)
        K = pgd["eot"] if setting == "whitebox_eot" else 1
        gm = _overlay((attacks.get("surrogate") or {}).get("purification")).get("grad_mode", grad_mode)
        S_att = S if surrogate_S is None else surrogate_S
        grad = defended_grad(S_att, gm) * (pgd["restarts"] * (pgd["steps"] + 1) * K)
        return grad + evaluation_calls(attacks, setting, S), False

    @classmethod
    def run_calls(cls, attacks: dict[str, Any], setting: str, purification: dict[str, Any], grad_mode: str,
                  num_train_timesteps: int = 1000) -> tuple[Calls, bool]:
        def chain(p: dict[str, Any]) -> int:
            return purifier_class(p.get("sampler", "ddpm")).network_calls(p, num_train_timesteps)

        att = surrogate_purification(purification, attacks.get("surrogate") or {})
        return cls.calls_per_image(attacks, setting, chain(purification), grad_mode, surrogate_S=chain(att))

    @classmethod
    def surrogate_model(cls, model, attacks: dict[str, Any]):
        """The defended ``model``'s classifier and diffusion network behind the surrogate purifier
        (same randomness), and the surrogate's ``purification`` section."""
        if getattr(model, "purification", None) is None:
            raise ValueError("the surrogate attack overlays the defense's purification section: build the model "
                             "with load_defense or DefendedClassifier(classifier, purifier, purification)")
        pur = surrogate_purification(model.purification, attacks.get("surrogate") or {})
        p = model.purifier
        try:
            purifier = build_purifier(p.unet, p.scheduler, pur, randomness=p.randomness)
        except ValueError as e:
            raise ValueError(f"attacks.surrogate: the surrogate purification {_overlay(pur)} is invalid: {e}") from e
        return model.with_purifier(purifier, pur), pur

    @classmethod
    def run_batch(cls, model, x, y, ids, *, setting, threat, attacks, seed, track=0):
        attacked, pur = cls.surrogate_model(model, attacks)
        cols, res = attack_batch(model, x, y, ids, attack="pgd", setting=setting, norm=threat["norm"],
                                 eps=threat["eps"], alpha=threat["alpha"], pgd=pgd_section(attacks),
                                 eval_draws=attacks["eval_draws"], track=track, attacked=attacked)
        cols["surrogate"] = np.full(len(cols["id"]), describe(pur, attacked.purifier.num_network_calls), dtype=object)
        res.extra["surrogate"] = pur
        return cols, res
