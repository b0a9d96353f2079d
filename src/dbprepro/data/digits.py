"""scikit-learn's handwritten digits (shipped with scikit-learn): the embedded default data set."""

from __future__ import annotations

import numpy as np


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits (1797 8x8 images, shipped with the package) in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    return images, d.target.astype(np.int64)


def make_digits_split(test_fraction: float, seed: int) -> dict[str, tuple[np.ndarray, ...]]:
    """A seeded, stratified train/test split of the digits; ids are indices into the data set."""
    from sklearn.model_selection import train_test_split

    images, labels = load_digits_arrays()
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    tr, te = np.sort(tr), np.sort(te)
    return {
        "train": (images[tr], labels[tr], tr.astype(np.int64)),
        "test": (images[te], labels[te], te.astype(np.int64)),
    }
