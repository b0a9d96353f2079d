"""Classifiers that take images in [0, 1] (any input normalisation lives inside the model)."""

from __future__ import annotations

import torch
from torch import nn

from ..runtime import timed_load


class SmallCNN(nn.Module):
    """A small CNN for low-resolution grey-scale images (the embedded digits default).

    conv(c->w) - ReLU - conv(w->2w) - ReLU - maxpool(2) - fc(hidden) - ReLU - fc(classes).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10,
                 width: int = 32, hidden: int = 128):
        super().__init__()
        if image_size % 2:
            raise ValueError(f"image_size must be even, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * (image_size // 2) ** 2, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_classifier(arch: str, **kwargs) -> nn.Module:
    """A classifier by architecture name: ``small_cnn`` or ``wrn-28-10`` (RobustBench ``Standard``)."""
    if arch == "small_cnn":
        return SmallCNN(**kwargs)
    if arch == "wrn-28-10":
        from .wideresnet import WideResNet

        return WideResNet(depth=28, widen_factor=10, **kwargs)
    raise ValueError(f"unknown classifier arch {arch!r}; known: small_cnn, wrn-28-10")


def save_classifier(model: nn.Module, arch: str, kwargs: dict, path, source: dict | None = None) -> None:
    """Save to a folder: ``config.json`` (arch + constructor arguments, and ``source``: where downloaded
    weights came from and their sha256, when given) and ``model.safetensors``, atomically (the folder appears
    under ``path`` only when complete)."""
    import json

    from safetensors.torch import save_file

    from ..io import atomic_dir

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / "model.safetensors"))
        spec = {"arch": arch, "kwargs": kwargs, **({"source": source} if source is not None else {})}
        (tmp / "config.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


@timed_load  # counted in the job's provenance timing (dbprepro.dagprofile)
def load_classifier(path) -> nn.Module:
    """Load a folder written by :func:`save_classifier` (safetensors only, strict keys)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    model = build_classifier(cfg["arch"], **cfg.get("kwargs", {}))
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.eval()
