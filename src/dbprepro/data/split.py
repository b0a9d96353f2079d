"""Fixed, hashed splits: writing, loading (hash-checked) and cutting into batches and shards.

A split is stored as one ``.npz`` per part (``images`` float32 [N, C, H, W] in [0, 1],
``labels`` int64 [N], ``ids`` int64 [N]: the sample ids that key the replayable randomness)
with the sha256 of each file recorded in a JSON manifest beside it.  Every later stage
reads the split through :func:`load_split`, which checks the hash.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io import savez, sha256_file, write_text
from .digits import make_digits_split

log = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10")


@dataclass
class Split:
    """One part of a data split, as tensors."""

    images: torch.Tensor  # float32 [N, C, H, W] in [0, 1]
    labels: torch.Tensor  # int64 [N]
    ids: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int | None) -> "Split":
        """The first ``n`` samples (all when ``n`` is None)."""
        if n is None:
            return self
        if n > len(self):
            raise ValueError(f"asked for {n} samples, the split has {len(self)}")
        return Split(self.images[:n], self.labels[:n], self.ids[:n])


def write_split(parts: dict[str, tuple[np.ndarray, ...]], out: dict[str, str | Path],
                manifest: str | Path, meta: dict | None = None) -> dict:
    """Write each part to its ``.npz`` (deterministic bytes) and a manifest with sha256s."""
    record = {"parts": {}, **(meta or {})}
    for name, (images, labels, ids) in parts.items():
        path = Path(out[name])
        savez(path, images=images.astype(np.float32), labels=labels.astype(np.int64), ids=ids.astype(np.int64))
        record["parts"][name] = {
            "file": path.name, "n": int(len(labels)), "shape": list(images.shape[1:]),
            "sha256": sha256_file(path),
            "class_counts": np.bincount(labels, minlength=int(labels.max()) + 1).tolist(),
        }
    write_text(manifest, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def prepare_split(dataset: str, out: dict[str, str | Path], manifest: str | Path,
                  test_fraction: float = 0.2, seed: int = 0, source_dir: str | Path | None = None
                  ) -> dict:
    """Build and write the split of ``dataset`` (the DAG's first rule)."""
    if dataset == "digits":
        parts = make_digits_split(test_fraction, seed)
        meta = {"dataset": "digits", "source": "sklearn.datasets.load_digits",
                "test_fraction": test_fraction, "seed": seed}
    elif dataset == "cifar10":
        from .cifar10 import load_cifar10_parts

        parts = load_cifar10_parts(source_dir)
        meta = {"dataset": "cifar10", "source": str(source_dir)}
    else:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    record = write_split(parts, out, manifest, meta)
    for name, part in record["parts"].items():
        log.info("%s: %d images of shape %s, sha256 %s", name, part["n"], part["shape"], part["sha256"])
    return record


def load_split(path: str | Path, manifest: str | Path | None = None) -> Split:
    """Load one part; with ``manifest`` the file's sha256 must match the recorded one."""
    path = Path(path)
    if manifest is not None:
        rec = json.loads(Path(manifest).read_text())
        expected = {p["file"]: p["sha256"] for p in rec["parts"].values()}.get(path.name)
        if expected is None:
            raise ValueError(f"{path.name} is not listed in the manifest {manifest}")
        actual = sha256_file(path)
        if actual != expected:
            raise ValueError(f"{path}: sha256 {actual} does not match the manifest's {expected}")
    with np.load(path, allow_pickle=False) as z:
        return Split(torch.from_numpy(z["images"].copy()), torch.from_numpy(z["labels"].copy()),
                     torch.from_numpy(z["ids"].copy()))


def batches(n: int, batch_size: int) -> list[slice]:
    """Fixed consecutive batches [0, b), [b, 2b), ... covering ``n`` items."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def shard_slices(n: int, batch_size: int, n_shards: int, shard: int) -> list[slice]:
    """The fixed batches of shard ``shard`` of ``n_shards``: contiguous runs of whole batches.

    Every item always lands in the same batch with the same batch-mates, whatever the number
    of shards, so per-sample results cannot depend on how the work is split.
    """
    all_batches = batches(n, batch_size)
    if not 1 <= n_shards <= len(all_batches):
        raise ValueError(f"cannot split {len(all_batches)} batches of {batch_size} into {n_shards} shards")
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard must lie in [0, {n_shards}), got {shard}")
    lo = shard * len(all_batches) // n_shards
    hi = (shard + 1) * len(all_batches) // n_shards
    return all_batches[lo:hi]
