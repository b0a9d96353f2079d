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
* ``load_state(path, cfg, sha256, limits)``: the official weights file (checked against ``sha256``
  when given) read safely under :class:`.bounds.Limits` (never by executing code) into an
  instance, through a documented key map where the official names differ;
* ``eps(x_vp, sigma)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..registry import Registry
from ..runtime import timed_load

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
    def load_state(cls, path: str | Path, cfg: dict[str, Any] | None = None,
                   sha256: str | None = None, limits=None) -> "EpsNetwork":
        raise NotImplementedError

    @property
    def image_shape(self) -> tuple[int, int]:
        """(channels, side) of the images the network takes."""
        raise NotImplementedError

    @property
    def config(self):
        """``in_channels`` and ``sample_size``, named as diffusers' ``UNet2DModel.config`` names them
        (what the CLI and the landscape read for the image shape)."""
        from types import SimpleNamespace

        c, side = self.image_shape
        return SimpleNamespace(in_channels=c, sample_size=side)

    def eps(self, x_vp: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """The noise prediction at the VP state ``x_vp`` (= x_edm / sqrt(1 + sigma^2), [-1, 1] data
        scale) of EDM noise level ``sigma`` (a float or one value per sample)."""
        raise NotImplementedError


def network_names(family: str | None = None) -> tuple[str, ...]:
    """Registered network names (of one purifier ``family``, if given)."""
    return tuple(n for n, c in NETWORKS.items() if family is None or c.family == family)


#: the file that marks a family's own network folder and says what it holds
NETWORK_FILE = "network.json"


def save_network_dir(path: str | Path, name: str, config: dict[str, Any], weights: str | Path,
                     sha256: str, scheduler, pinned: bool = True) -> None:
    """The model folder of a family's own network (rule download_network): ``network.json``
    (registered ``name``, its ``config`` overrides, the official ``weights`` file - left where it
    was downloaded, never converted: its licence forbids redistributing derived tensors - and
    that file's ``sha256``, and whether the config pinned it or it was trusted on first use:
    ``sha256_pinned``) and ``scheduler/``, the DDPM noise schedule the continuous purifiers
    map noise levels with.  Written atomically."""
    from ..io import atomic_dir

    network_class(name)  # a ValueError naming the registered ones
    rel = os.path.relpath(Path(weights).resolve(), Path(path).resolve())  # the folder moves with results/
    with atomic_dir(path) as tmp:
        spec = {"network": name, "config": dict(config), "weights": rel, "sha256": sha256,
                "sha256_pinned": bool(pinned)}  # false: trusted on first use, recorded here to be pinned
        (tmp / NETWORK_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        scheduler.save_pretrained(tmp / "scheduler")


def is_network_dir(path: str | Path) -> bool:
    """Whether ``path`` is a family's own network folder (:func:`save_network_dir`)."""
    return (Path(path) / NETWORK_FILE).is_file()


@timed_load  # counted in the job's provenance timing (dbprepro.dagprofile)
def load_network_dir(path: str | Path, scheduler_overrides: dict[str, Any] | None = None):
    """``(network, scheduler)`` of a :func:`save_network_dir` folder: the weights file checked
    against the recorded sha256, then read by the network's own safe loader (``load_state``)."""
    from diffusers import DDPMScheduler

    from .verification import verify_file

    path = Path(path)
    spec = json.loads((path / NETWORK_FILE).read_text())
    weights = (path / spec["weights"]).resolve()
    verify_file(weights, spec["sha256"])
    net = network_class(spec["network"]).load_state(weights, spec["config"])
    scheduler = DDPMScheduler.from_pretrained(path / "scheduler", local_files_only=True)
    if scheduler_overrides:
        scheduler = DDPMScheduler.from_config(scheduler.config, **scheduler_overrides)
    return net.eval(), scheduler
