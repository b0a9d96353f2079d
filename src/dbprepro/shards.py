"""The merge of an attack run's shards into the run's files (numpy and pandas only: the merge is a
light stage, run in Snakemake's process, and imports no torch; tests/test_light_stages.py).

A shard (:func:`dbprepro.attacks.runner.run_attack_shard`) writes per-image records, per-step
losses, the perturbation paths of its tracked images and, optionally, its adversarial examples.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .io import savez, write_parquet


def merge_shards(record_paths, trace_paths, path_paths, records_out, trace_out, paths_out,
                 adv_paths=None, adv_out=None) -> None:
    """Concatenate shard outputs (sorted by sample id); paths come from the shard that tracked."""
    if adv_paths:
        loaded = [np.load(p) for p in adv_paths]
        ids = np.concatenate([z["ids"] for z in loaded])
        x_adv = np.concatenate([z["x_adv"] for z in loaded])
        order = np.argsort(ids, kind="stable")
        savez(adv_out, ids=ids[order], x_adv=x_adv[order])
    recs = pd.concat([pd.read_parquet(p) for p in record_paths], ignore_index=True).sort_values("id")
    write_parquet(recs.reset_index(drop=True), records_out)
    tr = pd.concat([pd.read_parquet(p) for p in trace_paths], ignore_index=True)
    write_parquet(tr.sort_values(["id", "step"]).reset_index(drop=True), trace_out)
    chosen = None
    for p in path_paths:
        with np.load(p) as z:
            if z["ids"].size and chosen is None:
                chosen = {k: z[k] for k in z.files}
    savez(paths_out, **(chosen or {k: np.zeros(0) for k in ("ids", "labels", "x", "deltas")}))
