"""Diffusion networks: diffusers ``UNet2DModel`` + ``DDPMScheduler``, built, saved and loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler, UNet2DModel

from ..runtime import timed_load


def build_unet(image_size: int, channels: int, block_out_channels: list[int],
               layers_per_block: int = 1, attention: list[bool] | None = None,
               norm_num_groups: int = 8, dropout: float = 0.0) -> UNet2DModel:
    """A ``UNet2DModel`` for ``image_size`` x ``image_size`` images with one block per level.

    ``attention[i]`` puts self-attention in level i (down and the mirrored up block).
    """
    attention = attention or [False] * len(block_out_channels)
    if len(attention) != len(block_out_channels):
        raise ValueError("attention must have one entry per level of block_out_channels")
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        layers_per_block=layers_per_block, block_out_channels=tuple(block_out_channels),
        down_block_types=tuple(down), up_block_types=tuple(up),
        norm_num_groups=norm_num_groups, dropout=dropout,
    )


def build_scheduler(num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                    beta_end: float = 0.02, beta_schedule: str = "linear",
                    variance_type: str = "fixed_large", clip_sample: bool = True) -> DDPMScheduler:
    """The DDPM noise schedule (Ho et al. 2020: 1000 linear betas from 1e-4 to 0.02)."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                         beta_end=beta_end, beta_schedule=beta_schedule,
                         variance_type=variance_type, clip_sample=clip_sample,
                         prediction_type="epsilon")


def save_diffusion(unet: UNet2DModel, scheduler: DDPMScheduler, path: str | Path) -> None:
    """Save as a diffusers folder: ``unet/`` (safetensors) and ``scheduler/``, atomically (the
    folder appears under ``path`` only when complete; an existing folder is replaced)."""
    from ..io import atomic_dir

    with atomic_dir(path) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")


def _diffusion_layout(path: Path) -> tuple[Path, Path]:
    """``(unet_dir, scheduler_dir)`` of a local diffusers folder, checked (safetensors only).

    Two layouts: ``save_diffusion``'s (``unet/`` + ``scheduler/``) and the flat hub layout
    of ``google/ddpm-cifar10-32`` (``config.json``, ``diffusion_pytorch_model.safetensors``
    and ``scheduler_config.json`` at the root, beside ``model_index.json``).
    """
    from .verification import CheckpointError

    if (path / "unet").is_dir():
        unet_dir, sched_dir = path / "unet", path / "scheduler"
    elif (path / "config.json").is_file():
        unet_dir = sched_dir = path
    else:
        raise FileNotFoundError(f"{path} is not a diffusers folder: neither 'unet/' nor a "
                                "root 'config.json' (hub layout) inside")
    cfg = json.loads((unet_dir / "config.json").read_text()) if (unet_dir / "config.json").is_file() else {}
    if cfg.get("_class_name") not in (None, "UNet2DModel"):
        raise CheckpointError(f"{unet_dir / 'config.json'} describes a {cfg['_class_name']}, not a UNet2DModel")
    if not (unet_dir / "diffusion_pytorch_model.safetensors").is_file():
        others = sorted(p.name for p in unet_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise CheckpointError(f"{unet_dir}: no diffusion_pytorch_model.safetensors (only safetensors "
                              f"weights are loaded; found {others or 'no weights'})")
    if not (sched_dir / "scheduler_config.json").is_file():
        raise FileNotFoundError(f"{sched_dir}: no scheduler_config.json")
    return unet_dir, sched_dir


@timed_load  # counted in the job's provenance timing (dbprepro.dagprofile)
def load_diffusion(path: str | Path, scheduler_overrides: dict[str, Any] | None = None
                   ) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load ``(unet, scheduler)`` from a local diffusers folder (layout of ``save_diffusion``
    or the flat hub layout of ``google/ddpm-cifar10-32``), safetensors only, no network.  A
    family's own network folder (:func:`dbprepro.models.networks.save_network_dir`) gives its
    registered network in place of the UNet."""
    from .networks import is_network_dir, load_network_dir

    if is_network_dir(path):
        return load_network_dir(path, scheduler_overrides)
    unet_dir, sched_dir = _diffusion_layout(Path(path))
    unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(sched_dir, local_files_only=True)
    if scheduler_overrides:
        scheduler = DDPMScheduler.from_config(scheduler.config, **scheduler_overrides)
    return unet.eval(), scheduler
