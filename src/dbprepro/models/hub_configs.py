"""Known configurations of the hub models the paper-scale path downloads.

``google/ddpm-cifar10-32`` (Ho et al. 2020's CIFAR-10 DDPM, converted to diffusers) ships two
small JSON files next to its weights.  Their sha256 is not known offline, so besides the
trust-on-first-use record (:mod:`dbprepro.models.checkpoints`) their *content* is checked here against
the architecture the package expects: a file that differs in any architecture-defining key is
refused.  The weights themselves are pinned by sha256 in ``config/cifar10.yaml``, and strict
loading checks every parameter name and shape.  :mod:`dbprepro.cost` builds a randomly
initialised UNet from :data:`DDPM_CIFAR10_32_UNET` to measure the cost of a call offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DDPM_CIFAR10_32 = "google/ddpm-cifar10-32"

# UNet2DModel config of google/ddpm-cifar10-32 (architecture-defining keys): the 35.7M-parameter
# DDPM of Ho et al. (2020), ch 128, ch_mult (1, 2, 2, 2), 2 res blocks, attention at 16x16.
DDPM_CIFAR10_32_UNET: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 0,
    "act_fn": "silu",
    "attention_head_dim": None,
    "norm_num_groups": 32,
    "norm_eps": 1e-06,
}

# DDPMScheduler config of the same repository (the keys that define the noise schedule; the
# reverse variance_type is taken from the dbprepro config instead).
DDPM_CIFAR10_32_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": True,
}

KNOWN = {DDPM_CIFAR10_32: {"config.json": DDPM_CIFAR10_32_UNET,
                           "scheduler_config.json": DDPM_CIFAR10_32_SCHEDULER}}


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
        except (TypeError, ValueError):
            return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_known_configs(repo_id: str, folder: str | Path) -> list[str]:
    """Compare the JSON config files of a downloaded ``repo_id`` in ``folder`` with the known
    ones; raise :class:`~dbprepro.models.verification.CheckpointError` naming every differing key.
    Returns the file names checked (none for a repository without known configs)."""
    from .verification import CheckpointError

    checked = []
    for name, expected in KNOWN.get(repo_id, {}).items():
        path = Path(folder) / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (expected the {name} of {repo_id})")
        try:
            got = json.loads(path.read_text())
        except ValueError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from e
        bad = [f"{k}: expected {v!r}, found {got.get(k, '<missing>')!r}" for k, v in expected.items()
               if k not in got or not _same(got[k], v)]
        if bad:
            raise CheckpointError(f"{path}: not the known {name} of {repo_id}: " + "; ".join(bad))
        checked.append(name)
    return checked


def build_ddpm_cifar10_32_unet(**overrides):
    """A randomly initialised ``UNet2DModel`` with google/ddpm-cifar10-32's architecture."""
    from diffusers import UNet2DModel

    return UNet2DModel(**{**DDPM_CIFAR10_32_UNET, **overrides})
