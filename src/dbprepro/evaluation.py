"""Clean evaluation of the classifier alone and of the defended classifier under random and
fixed randomness (the settings both papers contrast), and its table.

The table (:func:`write_clean_accuracy_table`) is a light stage, run in Snakemake's process: this
module imports torch and the networks only inside the functions that evaluate
(tests/test_light_stages.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .io import write_parquet
from .metrics import accuracy_summary, write_table

if TYPE_CHECKING:
    import torch

    from .data import Split

log = logging.getLogger(__name__)

SETTINGS = {
    "classifier": "classifier alone, no purification",
    "random": "purified, fresh randomness per evaluation (mean over draws)",
    "fixed": "purified, fixed randomness configuration (mean over configurations)",
}


def predict(model, split: Split, batch_size: int, device: torch.device, draws: int | None = None,
            desc: str = "predict") -> torch.Tensor:
    """Predicted labels for every image of ``split`` in fixed batches (without gradients).

    ``model(x, ids=..., draws=...)`` is called for a defended classifier (``draws`` given);
    ``model(x)`` for a plain classifier.
    """
    import torch
    from tqdm.auto import tqdm

    from .data import batches
    from .purifiers.defended import predict_labels

    preds = []
    with torch.no_grad():
        for sl in tqdm(batches(len(split), batch_size), desc=desc, mininterval=5, leave=False):
            x = split.images[sl].to(device)
            if draws is None:
                pred = model(x).argmax(1)
            else:  # a defended classifier's predict (a vote defense votes)
                ids = split.ids[sl]
                pred = predict_labels(model, x, ids, torch.full_like(ids, draws))
            preds.append(pred.cpu())
    return torch.cat(preds)


def evaluate_clean(classifier_dir, diffusion_dir, test_path, manifest, out_path, *, n_test: int,
                   purification: dict[str, Any], variance_type: str, evaluation: dict[str, Any],
                   seed: int, device: torch.device) -> pd.DataFrame:
    """Per-(image, draw) predictions on the first ``n_test`` clean test images for the settings
    of :data:`SETTINGS`; written to ``out_path`` (parquet) and returned."""
    from .data import load_split
    from .models.classifiers import load_classifier
    from .purifiers import load_defense
    from .randomness import Randomness

    split = load_split(test_path, manifest).head(n_test)
    bs = evaluation["batch_size"]
    frames = []

    def record(setting: str, draw: int, preds: torch.Tensor) -> None:
        frames.append(pd.DataFrame({
            "setting": setting, "draw": draw, "id": split.ids.numpy(), "label": split.labels.numpy(),
            "pred": preds.numpy(), "correct": (preds == split.labels).numpy().astype("int8"),
        }))
        log.info("%s draw %d: accuracy %.4f", setting, draw, float((preds == split.labels).float().mean()))

    classifier = load_classifier(classifier_dir).to(device)
    record("classifier", 0, predict(classifier, split, bs, device, desc="classifier"))

    rnd = load_defense(classifier_dir, diffusion_dir, purification, variance_type,
                       Randomness(seed, "random"), device)
    log.info("purifier: t*=%s (timestep %d), %s sampler, %d reverse steps", purification["t_star"],
             rnd.purifier.t_start, purification["sampler"], rnd.purifier.num_steps)
    for k in range(evaluation["random_draws"]):
        record("random", k, predict(rnd, split, bs, device, draws=k, desc=f"random draw {k}"))
    for k in range(evaluation["fixed_configs"]):
        fixed = rnd.with_randomness(Randomness(seed, "fixed", fixed_draw=k))
        record("fixed", k, predict(fixed, split, bs, device, draws=k, desc=f"fixed config {k}"))

    df = pd.concat(frames, ignore_index=True)
    write_parquet(df, out_path)
    return df


def clean_accuracy_table(records: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """One row per setting: accuracy, Wilson CI over images, spread over draws."""
    rows = []
    for setting, desc in SETTINGS.items():
        sub = records[records["setting"] == setting]
        if sub.empty:
            continue
        rows.append({"setting": setting, "description": desc, **accuracy_summary(sub, confidence),
                     "confidence": confidence})
    return pd.DataFrame(rows)


def write_clean_accuracy_table(record_paths: list[str | Path], csv_path, md_path,
                               confidence: float = 0.95, defenses: list[str] | None = None) -> pd.DataFrame:
    """Combine per-defense records into ``clean_accuracy.csv`` (+ ``.md``)."""
    tables = []
    for i, path in enumerate(record_paths):
        t = clean_accuracy_table(pd.read_parquet(path), confidence)
        t.insert(0, "defense", defenses[i] if defenses else Path(path).parent.name)
        tables.append(t)
    table = pd.concat(tables, ignore_index=True)
    write_table(table, csv_path, md_path)
    return table


#: the names of the defense builders before 0.2 -> their names in :mod:`dbprepro.purifiers`
_OLD_NAMES = {"build_defense": "load_defense", "build_purifier": "load_purifier", "load_defense": "load_defense"}


def __getattr__(name: str):
    """The purifier builders once imported here (``build_defense``, ``build_purifier``, ``load_defense``),
    from :mod:`dbprepro.purifiers` on first use: the table stage of this module needs no network code."""
    if name in _OLD_NAMES:
        from . import purifiers

        return getattr(purifiers, _OLD_NAMES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
