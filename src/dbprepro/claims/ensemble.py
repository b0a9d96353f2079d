"""The per-image worst case over several attack runs: an image is robust only if it survives every
run.  The robustness waterfall (:mod:`dbprepro.paper1.waterfall`) and the ensemble claims
(:mod:`.adaptive`) share it.

Every function takes the runs' per-image records indexed by image ``id`` (``RunData.run``'s
frames) and compares them on one shared image set, the ids every run attacked
(:func:`shared_ids`): runs that attacked different numbers of images (DW-box PGD's
``attacks.dwbox_n_images``) are cut to the images all of them have.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from .stats import _rng


def shared_ids(runs: Iterable[pd.DataFrame | pd.Index]) -> pd.Index:
    """The ids every run attacked, sorted (the runs' frames indexed by id, or their indexes);
    an empty index for no run."""
    ids = None
    for run in runs:
        idx = run if isinstance(run, pd.Index) else run.index
        ids = idx if ids is None else ids.intersection(idx)
    return ids.sort_values() if ids is not None else pd.Index([])


def outcomes(runs: Iterable[pd.DataFrame], column: str, ids: pd.Index) -> np.ndarray:
    """Runs x images: ``column`` (0/1, e.g. ``correct_single``) of each run on the images ``ids``."""
    rows = [run.loc[ids, column].to_numpy(float) for run in runs]
    return np.vstack(rows) if rows else np.ones((0, len(ids)))


def survives_all(runs: Iterable[pd.DataFrame], column: str, ids: pd.Index) -> np.ndarray:
    """Per image of ``ids``: 1 if it is robust (``column`` 1) in every run, else 0 (all ones for
    no run: no attack has removed an image)."""
    m = outcomes(runs, column, ids)
    return m.min(axis=0) if len(m) else np.ones(len(ids))


def cumulative_survival(stages: np.ndarray) -> np.ndarray:
    """Stages x images (each stage's own survival): row k = robust under every stage up to k."""
    return np.minimum.accumulate(np.asarray(stages, dtype=float), axis=0)


def bootstrap_intervals(values: np.ndarray, *, confidence: float = 0.95, resamples: int = 2000,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap over images of the mean of each row of ``values`` (rows x images),
    every row resampled with the same draws of images (so rows that never rise across the
    images' order give bounds that never rise either)."""
    values = np.atleast_2d(np.asarray(values, dtype=float))
    n = values.shape[1]
    if n == 0:
        nan = np.full(len(values), np.nan)
        return nan, nan.copy()
    idx = _rng(seed).integers(0, n, size=(int(resamples), n))
    q = (1 - confidence) / 2
    boot = [row[idx].mean(axis=1) for row in values]  # one row at a time: resamples x images each
    return (np.array([np.quantile(b, q) for b in boot]), np.array([np.quantile(b, 1 - q) for b in boot]))
