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

    @classmethod
    def settings(cls, attacks: dict[str, Any], threat: str) -> list[str]:
        b = attacks["bpda"]
        names = [tm["name"] for tm in attacks["threat_models"]]
        return list(b["settings"]) if b["enabled"] and threat in (b["threat_models"] or names) else []

    @classmethod
    def gradient_calls(cls, S: int, grad_mode: str) -> Calls:
        return bpda_grad(S)
