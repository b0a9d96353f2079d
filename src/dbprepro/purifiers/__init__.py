"""Purifier families: diffuse to t*, then a reverse chain back to 0, with replayable randomness
and exact gradients.

- ``base.py``: :class:`ReverseChain` (the chain, its gradient modes, draws normalisation) and the
  class-level contract every family fulfils; ``recompute.py``: the chain differentiated by per-step
  recomputation, and its intermediate states with gradients in every exact mode;
- ``ddpm.py``: DDPM (ancestral) and DDIM; ``vpsde.py``: DiffPure's VP-SDE; ``edm.py``: EDM's Heun
  sampler with churn; ``continuous.py``: what VP-SDE and EDM share;
- ``registry.py``: :data:`PURIFIERS`, the factory :func:`build_purifier` and :func:`load_defense`;
- ``defended.py``: :class:`DefendedClassifier`, classifier after purifier; ``vote.py``: its
  majority vote over V purifications (:class:`VoteDefense`);
- ``gradients.py``: the gradient modes compared on one input (``gradient_modes.csv``).

Every module of this folder is imported here, so a new family is one new module with a class
decorated by :func:`register_purifier` (plus its section in the config schema).
"""

import importlib
import pkgutil

from .base import GRAD_MODES, ReverseChain, Trajectory, check_images, default_ids, start_timestep
from .continuous import T_EPS, TIMESTEP_MAPS, ContinuousPurifier, NoiseLevelMap, edm_sigma
from .ddpm import SAMPLERS, DDIMPurifier, Purifier, chain_length
from .defended import DefendedClassifier
from .edm import EDMPurifier, edm_sigmas
from .registry import (PURIFIERS, build_purifier, load_defense, load_purifier, make_purifier, purifier_class, register_purifier,
                       samplers)
from .vpsde import VPSDEPurifier, adjoint_agreement

for _m in pkgutil.iter_modules(__path__):  # a new family module registers itself on import
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["GRAD_MODES", "PURIFIERS", "SAMPLERS", "T_EPS", "TIMESTEP_MAPS", "ContinuousPurifier", "DDIMPurifier",
           "DefendedClassifier", "EDMPurifier", "NoiseLevelMap", "Purifier", "ReverseChain", "Trajectory",
           "VPSDEPurifier", "adjoint_agreement", "build_purifier", "chain_length", "check_images", "default_ids",
           "edm_sigma", "edm_sigmas", "load_defense", "load_purifier", "make_purifier", "purifier_class", "register_purifier", "samplers",
           "start_timestep"]
