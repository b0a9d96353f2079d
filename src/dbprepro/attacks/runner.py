"""The DAG's attack stage: one registered attack on one shard of the test set (shards are unions of
whole fixed batches, so results do not depend on their number); the merge of the shards is
:func:`dbprepro.shards.merge_shards`, re-exported here."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..config.experiment import threat_model
from ..data import load_split, shard_slices
from ..io import savez, write_parquet
from ..purifiers import load_defense
from ..shards import merge_shards  # noqa: F401 - the merge, re-exported (it needs no torch)
from .base import perturbation_norms
from .protocols import settings_randomness
from .registry import attack_class

log = logging.getLogger("dbprepro.attacks.runner")

def run_attack_shard(classifier_dir, diffusion_dir, test_path, manifest, *, records, trace, paths, adv=None,
                     defense: str, threat: str, setting: str, attack: str, shard: int,
                     attacks: dict[str, Any], purification: dict[str, Any], variance_type: str,
                     seed: int, device: torch.device) -> pd.DataFrame:
    """Attack the images of one shard and write per-sample records, per-step losses and the
    perturbation paths of the tracked images (and, with ``adv``, the adversarial examples:
    ``ids`` [N], ``x_adv`` [N, C, H, W])."""
    cls = attack_class(attack)  # refuses an unknown name, listing the registered ones
    tm = threat_model(attacks, threat)
    split = load_split(test_path, manifest).head(attacks["n_images"])
    slices = shard_slices(len(split), attacks["batch_size"], attacks["shards"], shard)
    if defense == UNDEFENDED:
        return _attack_undefended(classifier_dir, split, slices, records, trace, paths, adv, threat=threat, tm=tm,
                                  attacks=attacks, shard=shard, device=device)
    model = load_defense(classifier_dir, diffusion_dir, purification, variance_type,
                         settings_randomness(setting, seed, attacks["fixed_draw"]), device)
    log.info("%s/%s/%s/%s shard %d: %d images in %d batches, %s eps=%.4g, %d reverse steps", defense, threat,
             setting, attack, shard, sum(s.stop - s.start for s in slices), len(slices), tm["norm"], tm["eps"],
             model.purifier.num_steps)
    frames, traces, tracked, advs = [], [], None, []
    for b, sl in enumerate(tqdm(slices, desc=f"{attack} {setting} shard {shard}", mininterval=5)):
        x, y, ids = split.images[sl].to(device), split.labels[sl].to(device), split.ids[sl]
        track = attacks["track_images"] if (shard == 0 and b == 0) else 0
        cols, res = cls.run_batch(model, x, y, ids, setting=setting, threat=tm, attacks=attacks, seed=seed,
                                  track=track)
        frames.append(pd.DataFrame(cols))
        advs.append(res.x_adv.detach().cpu().numpy().astype(np.float32))
        if res.loss is not None:
            steps = res.loss.shape[1]
            traces.append(pd.DataFrame({"id": np.repeat(ids.numpy(), steps), "step": np.tile(np.arange(steps), len(ids)),
                                        "loss": res.loss.reshape(-1)}))
        if track and res.deltas is not None:
            n = res.deltas.shape[0]
            tracked = dict(ids=ids[:n].numpy(), labels=y[:n].cpu().numpy(), x=x[:n].flatten(1).cpu().numpy(),
                           deltas=res.deltas)
    df = pd.concat(frames, ignore_index=True)
    for k, v in (("attack", attack), ("setting", setting), ("threat", threat), ("defense", defense)):
        df.insert(0, k, v)
    df.insert(4, "norm", tm["norm"])
    df.insert(5, "eps", float(tm["eps"]))
    df["shard"] = shard
    write_parquet(df, records)
    write_parquet(pd.concat(traces, ignore_index=True) if traces else
                  pd.DataFrame({"id": pd.Series(dtype="int64"), "step": pd.Series(dtype="int64"),
                                "loss": pd.Series(dtype="float64")}), trace)
    empty = dict(ids=np.zeros(0, np.int64), labels=np.zeros(0, np.int64), x=np.zeros((0, 0), np.float32),
                 deltas=np.zeros((0, 0, 0), np.float32))
    savez(paths, **(tracked or empty))
    if adv is not None:
        savez(adv, ids=df["id"].to_numpy(), x_adv=np.concatenate(advs))
    log.info("robust accuracy (single draw) on this shard: %.4f", float(df["correct_single"].mean()))
    return df


UNDEFENDED = "undefended"


def _attack_undefended(classifier_dir, split, slices, records, trace, paths, adv, *, threat, tm, attacks, shard,
                       device) -> pd.DataFrame:
    """The classifier alone under torchattacks' PGD (its attack classes fit a deterministic model):
    the reference every defense's gain is measured against."""
    import torchattacks

    from ..models.classifiers import load_classifier

    clf = load_classifier(classifier_dir).to(device)
    steps = attacks["pgd"]["steps"]
    cls = torchattacks.PGD if tm["norm"] == "linf" else torchattacks.PGDL2
    frames, advs = [], []
    for sl in slices:
        x, y, ids = split.images[sl].to(device), split.labels[sl].to(device), split.ids[sl]
        x_adv = cls(clf, eps=tm["eps"], alpha=tm["alpha"], steps=steps, random_start=attacks["pgd"]["random_start"])(x, y)
        with torch.no_grad():
            ok = (clf(x_adv).argmax(1) == y).cpu().numpy().astype(np.float64)
            ce0 = torch.nn.functional.cross_entropy(clf(x), y, reduction="none").cpu().numpy()
            ce1 = torch.nn.functional.cross_entropy(clf(x_adv), y, reduction="none").cpu().numpy()
        advs.append(x_adv.cpu().numpy().astype(np.float32))
        frames.append(pd.DataFrame({"id": ids.numpy(), "label": y.cpu().numpy(), "correct_single": ok,
                                    "correct_mean": ok, "correct_worst": ok, "correct_vote": ok,
                                    **{f"norm_{k}": v for k, v in perturbation_norms(x_adv, x).items()},
                                    "loss_start": ce0, "loss_end": ce1}))
    df = pd.concat(frames, ignore_index=True)
    for k, v in (("attack", "pgd"), ("setting", "none"), ("threat", threat), ("defense", UNDEFENDED)):
        df.insert(0, k, v)
    df.insert(4, "norm", tm["norm"])
    df.insert(5, "eps", float(tm["eps"]))
    df["shard"] = shard
    write_parquet(df, records)
    write_parquet(pd.DataFrame({"id": pd.Series(dtype="int64"), "step": pd.Series(dtype="int64"),
                                "loss": pd.Series(dtype="float64")}), trace)
    savez(paths, ids=np.zeros(0, np.int64), labels=np.zeros(0, np.int64), x=np.zeros((0, 0), np.float32),
          deltas=np.zeros((0, 0, 0), np.float32))
    if adv is not None:
        savez(adv, ids=df["id"].to_numpy(), x_adv=np.concatenate(advs))
    log.info("undefended robust accuracy on this shard: %.4f", float(df["correct_single"].mean()))
    return df
