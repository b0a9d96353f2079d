"""The registry of paper-scale diffusion-network architectures (issue 18): ``name`` -> class.

The embedded default and the DDPM/DDIM families purify with diffusers' ``UNet2DModel`` (an epsilon
network called at a DDPM timestep, :mod:`dbprepro.models.diffusion`).  Paper 1's VP-SDE and EDM rows
use networks that no maintained package has: Score SDE's DDPM++ (DiffPure's checkpoint) and EDM's
SongUNet behind its preconditioning.  Each is one class here, registered with :func:`register_network`
under its ``name`` and with the purifier ``family`` it belongs to.  The continuous purifiers
(:mod:`dbprepro.purifiers.continuous`) call every network the same way: :meth:`EpsNetwork.eps`, the
noise prediction at the VP state ``x_vp`` of EDM noise level ``sigma``.

A registered class owns:

* ``name`` (the registry key, the config's ``families.networks`` value) and ``family``;
* ``from_config(cfg)``: the architecture from its hyper-parameters (the paper-scale defaults when
  ``cfg`` is empty);
* ``load_state(path)``: the official weights file read safely (never by executing code) into an
  instance, through a documented key map where the official names differ;
* ``eps(x_vp, sigma)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..registry import Registry

#: network name -> class, in registration order
NETWORKS: Registry = Registry("network", key="name")
#: class decorator: register a network under its ``name``
register_network = NETWORKS.register
#: the registered network ``name``, or a ValueError listing the known ones
network_class = NETWORKS.get_class


class EpsNetwork(nn.Module):
    """A paper-scale diffusion network as the continuous purifiers call it (see the module docstring)."""

    #: registry key
    name: ClassVar[str]
    #: the purifier family whose paper rows use it (``vpsde``, ``edm``)
    family: ClassVar[str]
    #: the parameter count of the official architecture at the paper-scale config, and its source
    official_parameters: ClassVar[int | None] = None

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | None = None) -> "EpsNetwork":
        raise NotImplementedError

    @classmethod
    def load_state(cls, path: str | Path, cfg: dict[str, Any] | None = None) -> "EpsNetwork":
        raise NotImplementedError

    def eps(self, x_vp: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """The noise prediction at the VP state ``x_vp`` (= x_edm / sqrt(1 + sigma^2), [-1, 1] data
        scale) of EDM noise level ``sigma`` (a float or one value per sample)."""
        raise NotImplementedError


def network_names(family: str | None = None) -> tuple[str, ...]:
    """Registered network names (of one purifier ``family``, if given)."""
    return tuple(n for n, c in NETWORKS.items() if family is None or c.family == family)
