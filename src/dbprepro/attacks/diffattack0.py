"""DiffAttack with lambda = 0 (attack name ``diffattack0``): the two rounds of
:class:`~dbprepro.attacks.diffattack.DiffAttack` (APGD-CE, then APGD-DLR on the survivors) through
the exact chain gradient, without the deviation loss.

The reference notes (section 9) measured on the digits that robust accuracy rises steadily with lambda
(the clean CE saturates and the deviation term then sets the sign of the step), so the DAG runs this
attack beside the paper's lambda and the waterfall's "DiffAttack" stage holds the stronger of the two.
It is its own registered attack (its own runs, records and cost) that reads DiffAttack's section
``attacks.diffattack`` - every key but ``weight`` - and runs where DiffAttack runs when
``attacks.diffattack.also_weight_zero`` is on.  Its records' ``dev_weight`` column is 0.
"""

from __future__ import annotations

from typing import Any

from .diffattack import DiffAttack
from .registry import register_attack


@register_attack
class DiffAttackWeightZero(DiffAttack):
    """DiffAttack at lambda = 0 (see the module docstring); its section is ``attacks.diffattack``."""

    name = "diffattack0"
    config_section = "diffattack"
    private_section = True
    waterfall_stages = (("DiffAttack", None),)
    waterfall_rank = DiffAttack.waterfall_rank
    #: without the deviation loss it reads no chain states: any gradient mode serves it (read by the
    #: grad-mode check of config/validate.py where that exists)
    needs_chain_states = False

    @classmethod
    def run_weight(cls, section: dict[str, Any]) -> float:
        return 0.0

    @classmethod
    def settings(cls, attacks: dict[str, Any], threat: str) -> list[str]:
        if not (attacks.get("diffattack") or {}).get("also_weight_zero", False):
            return []
        return cls.section_settings(attacks, threat)
