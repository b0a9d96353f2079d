"""CIFAR-10 from the parquet files of the Hugging Face dataset ``uoft-cs/cifar10``.

Layout of the dataset repository (config ``plain_text``)::

    plain_text/train-00000-of-00001.parquet   50 000 rows
    plain_text/test-00000-of-00001.parquet    10 000 rows

with columns ``img`` (the ``datasets`` Image feature: a struct of PNG ``bytes`` and a
``path``) and ``label`` (int class 0-9: airplane, automobile, bird, cat, deer, dog, frog,
horse, ship, truck).  Rows keep the order of the original CIFAR-10 batches, so a row's
index within its split is used as the sample id.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from ..models.checkpoints import download_hf

log = logging.getLogger(__name__)

HF_REPO = "uoft-cs/cifar10"
SPLITS = ("train", "test")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _split_files(source_dir: Path, split: str) -> list[Path]:
    for pattern in (f"plain_text/{split}-*.parquet", f"{split}-*.parquet"):
        files = sorted(source_dir.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(
        f"{source_dir}: no parquet file for split {split!r} (looked for "
        f"plain_text/{split}-*.parquet, the layout of {HF_REPO}, and {split}-*.parquet)")


def _png_bytes(cell) -> bytes:
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    if not isinstance(cell, (bytes, bytearray)) or not cell:
        raise ValueError("image cell carries no encoded bytes")
    return bytes(cell)


def _read_split(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq
    from PIL import Image

    images, labels = [], []
    for path in files:
        table = pq.read_table(path)
        missing = {"img", "label"} - set(table.column_names)
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; has {table.column_names}")
        for row, (cell, label) in enumerate(zip(table.column("img").to_pylist(),
                                                table.column("label").to_pylist())):
            try:
                with Image.open(io.BytesIO(_png_bytes(cell))) as im:
                    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except Exception as e:
                raise ValueError(f"{path}: row {row}: cannot decode the image: {e}") from e
            if arr.shape != (32, 32, 3):
                raise ValueError(f"{path}: row {row}: image is {arr.shape[1]}x{arr.shape[0]}, not 32x32")
            if label is None or not 0 <= int(label) < len(CLASSES):
                raise ValueError(f"{path}: row {row}: label {label!r} is not a class index 0-9")
            images.append(arr.transpose(2, 0, 1))
            labels.append(int(label))
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_cifar10_parts(source_dir: str | Path | None) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{"train": (images, labels, ids), "test": (...)}`` from the parquet files in ``source_dir``.

    images: float32 [N, 3, 32, 32] in [0, 1] (uint8 / 255); labels: int64 [N];
    ids: int64 [N], the row index within the split (files of a split read in name order).
    """
    if source_dir is None:
        raise ValueError(f"cifar10 needs source_dir: a folder holding the parquet files of {HF_REPO}")
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"{source_dir}: no such folder (expected the parquet files of {HF_REPO})")
    parts = {}
    for split in SPLITS:
        files = _split_files(source_dir, split)
        images_u8, labels = _read_split(files)
        images = images_u8.astype(np.float32) / np.float32(255.0)
        parts[split] = (images, labels, np.arange(len(labels), dtype=np.int64))
        log.info("cifar10 %s: %d images from %s", split, len(labels), ", ".join(f.name for f in files))
    return parts


def download_cifar10(dest_dir: str | Path, revision: str | None, files: dict[str, str | None],
                     allow_unpinned: bool = False) -> dict[str, Path]:
    """Fetch the parquet ``files`` (repo path -> sha256) of ``uoft-cs/cifar10`` at commit
    ``revision`` into ``dest_dir`` (verified; present files are only re-verified), ready
    for :func:`load_cifar10_parts`.  ``None`` pins need ``allow_unpinned`` (trust on first use,
    see :func:`dbprepro.models.checkpoints.download_hf`)."""
    return download_hf(HF_REPO, revision, files, dest_dir, repo_type="dataset", allow_unpinned=allow_unpinned)
