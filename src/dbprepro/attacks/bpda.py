"""BPDA (Athalye et al. 2018): PGD whose backward pass skips the purifier (identity), the weak
baseline paper 1 compares against.  The forward pass is the real purification."""

from __future__ import annotations

from typing import Any

from ..calls import Calls, bpda_grad
from .pgd import PGD
from .registry import register_attack


@register_attack
class BPDA(PGD):
    """PGD through the purifier with the identity as its gradient (``grad_mode="bpda"`` for the
    duration of the attack); config section ``attacks.bpda`` says where it runs, ``attacks.pgd``
    how (steps, EOT)."""

    name = "bpda"
    config_section = "bpda"
    waterfall_stages = (("BPDA", None),)
    waterfall_rank = 10

    @classmethod
    def settings(cls, attacks: dict[str, Any], threat: str) -> list[str]:
        return cls.section_settings(attacks, threat)

    @classmethod
    def gradient_calls(cls, S: int, grad_mode: str) -> Calls:
        return bpda_grad(S)
