"""Attacks on diffusion-based purification, on the exact-gradient engine.

- ``protocols.py``: paper 1's threat settings (``whitebox``, ``whitebox_eot``, ``dwbox``,
  ``dwbox_c<k>``: which randomness the attacker sees) and the evaluation protocols (single / mean
  / worst-of-N / majority vote over re-purifications);
- ``base.py``: :class:`Attack`, the contract of a registered attack, and the threat-model geometry;
- ``pgd.py``: PGD with batched EOT; ``bpda.py``: BPDA; ``autoattack.py``: AutoAttack with paper 1's
  multi-evaluation (``aa_standard_dwbox``, ``aa_standard_multieval``, ``aa_rand``); ``diffattack.py``:
  DiffAttack (APGD-CE then APGD-DLR on the survivors, + deviated-reconstruction loss on the chain
  states; off by default), ``diffattack0`` the same at weight 0;
  ``surrogate.py``: Lee & Kim's PGD-EOT through a surrogate purification process (off by default);
- ``diffhammer.py``: DiffHammer's EM attack over the K draws of each step (off by default,
  ``attacks.diffhammer``), its E-step and in-loop scoring in ``diffhammer_em.py``; ``lowfreq.py``: DiffBreak-style PGD in the lowest DCT frequencies (off by
  default, ``attacks.lowfreq``);
- ``registry.py``: :data:`ATTACKS`, read by the attack grid, the DAG, the cost model, API and CLI;
- ``runner.py``: one attack on one shard of the test set (the DAG's attack stage) and the merge.

Every module of this folder is imported here, so a new attack is one new module with a class
decorated by :func:`register_attack` (plus its config section in the schema, if it has one).
"""

import importlib
import pkgutil

from .base import NORMS, Attack, AttackResult, Norm, ascent_direction, evaluation_calls, perturbation_norms, project
from .protocols import (EVAL_DRAW_OFFSET, EVALUATIONS, SELECT_DRAW_OFFSET, SETTINGS, Setting, base_setting,
                        evaluate_draws, is_fixed, setting_fixed_draw, settings_randomness, summarise_evaluations)
from .registry import ATTACKS, attack_class, attack_names, register_attack
from .pgd import PGD, attack_batch  # noqa: E402 - registered first: the grid's order is pgd, bpda, autoattack, ...
from .bpda import BPDA  # noqa: E402
from .autoattack import (AutoAttackRand, AutoAttackStandardDWBox, AutoAttackStandardMultiEval,  # noqa: E402
                         autoattack_batch)

for _m in pkgutil.iter_modules(__path__):  # a new attack module registers itself on import
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["ATTACKS", "BPDA", "EVALUATIONS", "EVAL_DRAW_OFFSET", "NORMS", "PGD", "SELECT_DRAW_OFFSET", "SETTINGS",
           "Attack", "AttackResult", "AutoAttackRand", "AutoAttackStandardDWBox", "AutoAttackStandardMultiEval", "Norm",
           "Setting", "ascent_direction", "attack_batch", "attack_class", "attack_names", "autoattack_batch", "base_setting", "evaluate_draws",
           "evaluation_calls", "is_fixed", "perturbation_norms", "project", "register_attack", "setting_fixed_draw",
           "settings_randomness", "summarise_evaluations"]
