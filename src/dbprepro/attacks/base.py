"""The small base every attack stands on: the result of an attack, the threat-model geometry,
and :class:`Attack`, the class-level contract of a registered attack (torchattacks' style: one
attack, one class)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from ..calls import Calls, defended_forward
from .protocols import is_fixed

Norm = Literal["linf", "l2"]
NORMS: tuple[str, ...] = ("linf", "l2")


@dataclass
class AttackResult:
    """Outcome of an attack on one batch."""

    x_adv: torch.Tensor  # [B, C, H, W] in [0, 1]
    loss: np.ndarray  # [B, steps + 1]: defended loss (mean over the step's draws) at each iterate
    deltas: np.ndarray | None = None  # [n_track, steps + 1, D]: perturbation at each iterate
    extra: dict = field(default_factory=dict)



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



def perturbation_norms(x_adv: torch.Tensor, x: torch.Tensor) -> dict[str, np.ndarray]:
    d = (x_adv - x).flatten(1)
    return {"l2": d.norm(dim=1).cpu().numpy(), "linf": d.abs().amax(1).cpu().numpy()}



def evaluation_calls(attacks: dict[str, Any], setting: str, S: int) -> Calls:
    """Network calls per image of the final evaluation: ``eval_draws`` defended forwards (one in
    the fixed settings, where every draw is the same configuration)."""
    return defended_forward(S) * (1 if is_fixed(setting) else attacks["eval_draws"])


class Attack:
    """A registered attack (:func:`dbprepro.attacks.registry.register_attack`): one class that owns
    its name, its config section under ``attacks``, the runs it adds to the grid, its network
    calls and how it attacks one batch.  The attack grid (:meth:`dbprepro.config.Experiment.attack_runs`),
    the Snakefile's wildcard constraints, the attack stage, the cost model, the API and the CLI
    all read the registry."""

    #: registry key: the ``{attack}`` wildcard and the ``attack`` column of every table
    name: ClassVar[str]
    #: its own section under ``attacks`` in the config (None: no settings of its own)
    config_section: ClassVar[str | None] = None
    #: whether only this attack's own runs receive its section in their params (an attack added
    #: after the DAG's first runs: its section then changes no other run's params)
    private_section: ClassVar[bool] = False
    #: its runs' stages in the robustness waterfall (:mod:`dbprepro.paper1.waterfall`): (label, the
    #: setting it holds; None = every setting), weakest first; () = not in the waterfall
    waterfall_stages: ClassVar[tuple[tuple[str, str | None], ...]] = ()
    #: where its stages stand among the attacks' (ascending: the weaker evaluations first)
    waterfall_rank: ClassVar[int] = 1000
    #: whether it reads the chain's intermediate states with gradients (``purifier.purify_states``)
    needs_chain_states: ClassVar[bool] = False

    @classmethod
    def settings(cls, attacks: dict[str, Any], threat: str) -> list[str]:
        """The settings this attack runs in against the main defense on threat model ``threat``
        (``attacks`` is the validated config section; [] = not run)."""
        return []

    @classmethod
    def section_settings(cls, attacks: dict[str, Any], threat: str) -> list[str]:
        """:meth:`settings` of an attack whose own section has ``enabled``, ``settings`` and
        ``threat_models`` (null: every threat model): its settings when enabled on ``threat``."""
        sec = attacks.get(cls.config_section) or {}
        names = [tm["name"] for tm in attacks["threat_models"]]
        run = sec.get("enabled", False) and threat in (sec.get("threat_models") or names)
        return list(sec["settings"]) if run else []

    @classmethod
    def defenses(cls, attacks: dict[str, Any]) -> list[str]:
        """The defenses this attack runs on in :meth:`settings`' settings: ``vanilla`` (paper 1's
        main table); an attack whose own section has ``defenses`` reads it from there."""
        sec = attacks.get(cls.config_section) or {} if cls.config_section else {}
        return list(sec.get("defenses") or ["vanilla"])

    @classmethod
    def n_images(cls, attacks: dict[str, Any]) -> int | None:
        """Images this attack's runs attack (its own section's ``n_images``; None: the defense's)."""
        sec = attacks.get(cls.config_section) or {} if cls.config_section else {}
        return sec.get("n_images")

    @classmethod
    def run_problem(cls, attacks: dict[str, Any], purification: dict[str, Any]) -> str | None:
        """Why a run of this attack, configured by the validated ``attacks`` section, cannot run against
        a defense purifying with ``purification`` (None: it can).  ``dbprepro validate-config`` asks
        every run of the grid before any job starts."""
        return None

    @classmethod
    def calls_per_image(cls, attacks: dict[str, Any], setting: str, S: int, grad_mode: str) -> tuple[Calls, bool]:
        """Network calls per attacked image of one run on a chain of ``S`` network calls, and
        whether the count is an upper bound."""
        raise NotImplementedError

    @classmethod
    def run_calls(cls, attacks: dict[str, Any], setting: str, purification: dict[str, Any], grad_mode: str,
                  num_train_timesteps: int = 1000) -> tuple[Calls, bool]:
        """Network calls per attacked image of one run against a defense purifying with the
        ``purification`` section (the cost model's entry): :meth:`calls_per_image` on its chain
        length; an attack with a purification process of its own overrides it."""
        from ..purifiers.registry import purifier_class

        S = purifier_class(purification.get("sampler", "ddpm")).network_calls(purification, num_train_timesteps)
        return cls.calls_per_image(attacks, setting, S, grad_mode)

    @classmethod
    def run_batch(cls, model, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, *, setting: str,
                  threat: dict[str, Any], attacks: dict[str, Any], seed: int, track: int = 0
                  ) -> tuple[dict[str, np.ndarray], AttackResult]:
        """Attack one batch of the defended ``model`` (its purifier's randomness matches
        ``setting``) and evaluate the result: per-sample columns (``id``, ``label``,
        ``correct_<evaluation>``, ``norm_l2``, ``norm_linf``, ``loss_start``, ``loss_end``) and the
        :class:`AttackResult`.  ``threat`` is one entry of ``attacks.threat_models``."""
        raise NotImplementedError
