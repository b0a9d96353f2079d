"""Robust-accuracy evaluation: one attack on one shard of the test set, shard merging, and
paper 1's main table."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .attacks import attack_batch, is_fixed, setting_fixed_draw, settings_randomness
from .config import threat_model
from .data import load_split, shard_slices
from .evaluation import build_defense
from .io import savez, write_parquet
from .metrics import wilson_interval, write_table

log = logging.getLogger(__name__)

ATTACKS = ("pgd", "bpda", "aa_standard", "aa_rand")
EVALUATIONS = {
    "single": "one fresh purification (one-shot)",
    "mean": "mean over eval_draws purifications (Fixed-AutoAttack score)",
    "worst": "correct under all eval_draws purifications (worst of N)",
    "vote": "majority vote of eval_draws purifications",
}


def run_attack_shard(classifier_dir, diffusion_dir, test_path, manifest, *, records, trace, paths, adv=None,
                     defense: str, threat: str, setting: str, attack: str, shard: int,
                     attacks: dict[str, Any], purification: dict[str, Any], variance_type: str,
                     seed: int, device: torch.device) -> pd.DataFrame:
    """Attack the images of one shard and write per-sample records, per-step losses and the
    perturbation paths of the tracked images (and, with ``adv``, the adversarial examples:
    ``ids`` [N], ``x_adv`` [N, C, H, W])."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
    tm = threat_model(attacks, threat)
    split = load_split(test_path, manifest).head(attacks["n_images"])
    slices = shard_slices(len(split), attacks["batch_size"], attacks["shards"], shard)
    if defense == UNDEFENDED:
        return _attack_undefended(classifier_dir, split, slices, records, trace, paths, adv, threat=threat, tm=tm,
                                  attacks=attacks, shard=shard, device=device)
    model = build_defense(classifier_dir, diffusion_dir, purification, variance_type,
                          settings_randomness(setting, seed, attacks["fixed_draw"]), device)
    log.info("%s/%s/%s/%s shard %d: %d images in %d batches, %s eps=%.4g, %d reverse steps", defense, threat,
             setting, attack, shard, sum(s.stop - s.start for s in slices), len(slices), tm["norm"], tm["eps"],
             model.purifier.num_steps)
    frames, traces, tracked, advs = [], [], None, []
    for b, sl in enumerate(tqdm(slices, desc=f"{attack} {setting} shard {shard}", mininterval=5)):
        x, y, ids = split.images[sl].to(device), split.labels[sl].to(device), split.ids[sl]
        track = attacks["track_images"] if (shard == 0 and b == 0) else 0
        if attack in ("pgd", "bpda"):
            cols, res = attack_batch(model, x, y, ids, attack=attack, setting=setting, norm=tm["norm"],
                                     eps=tm["eps"], alpha=tm["alpha"], pgd=attacks["pgd"],
                                     eval_draws=attacks["eval_draws"], track=track)
        else:
            from .autoattack import autoattack_batch

            cols, res = autoattack_batch(model, x, y, ids, version=attack.removeprefix("aa_"), setting=setting,
                                         norm=tm["norm"], eps=tm["eps"], config=attacks["autoattack"],
                                         eval_draws=attacks["eval_draws"], seed=seed)
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

    from .attacks import perturbation_norms
    from .models.classifiers import load_classifier

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


def _clean_accuracy(clean: pd.DataFrame, ids: np.ndarray, setting: str, fixed_draw: int) -> float:
    sub = clean[clean["id"].isin(ids)]
    if setting == "none":
        sub = sub[sub["setting"] == "classifier"]
    elif is_fixed(setting):  # dwbox: configuration fixed_draw; dwbox_c{k}: configuration k
        fixed = sub[sub["setting"] == "fixed"]
        pick = fixed[fixed["draw"] == setting_fixed_draw(setting, fixed_draw)]
        sub = pick if not pick.empty else fixed
    else:
        sub = sub[sub["setting"] == "random"]
    return float(sub.groupby("id")["correct"].mean().mean())


def p1_main_table(records: list[pd.DataFrame], clean: dict[str, pd.DataFrame], confidence: float = 0.95,
                  fixed_draw: int = 0) -> pd.DataFrame:
    """Clean and robust accuracy per defense x threat model x setting x attack x evaluation.

    ``clean`` maps each defense to its clean-evaluation records; the clean accuracy of a row is
    that of the attacked images under the row's randomness (fresh draws, or the fixed
    configuration of dwbox)."""
    rows = []
    for df in records:
        first = df.iloc[0]
        n = len(df)
        source = clean[first["defense"]] if first["defense"] in clean else next(iter(clean.values()))
        clean_acc = _clean_accuracy(source, df["id"].to_numpy(), first["setting"], fixed_draw)
        for ev, desc in EVALUATIONS.items():
            k = float(df[f"correct_{ev}"].sum())
            lo, hi = wilson_interval(k, n, confidence)
            rows.append({"defense": first["defense"], "threat": first["threat"], "norm": first["norm"],
                         "eps": float(first["eps"]), "setting": first["setting"], "attack": first["attack"],
                         "evaluation": ev, "n_images": n, "clean_accuracy": clean_acc,
                         "robust_accuracy": k / n, "ci_low": lo, "ci_high": hi,
                         "mean_linf": float(df["norm_linf"].mean()), "mean_l2": float(df["norm_l2"].mean())})
    return pd.DataFrame(rows)


def write_p1_main_table(record_paths, clean_paths, defenses, csv_path, md_path, confidence: float = 0.95,
                        fixed_draw: int = 0) -> pd.DataFrame:
    clean = {d: pd.read_parquet(p) for d, p in zip(defenses, clean_paths)}
    table = p1_main_table([pd.read_parquet(p) for p in record_paths], clean, confidence, fixed_draw)
    write_table(table, csv_path, md_path)
    return table


def write_addt_training_table(history_paths, timing_paths, csv_path, md_path, cost_path) -> pd.DataFrame:
    """``addt_training.csv``: the loss curve of every fine-tuned defense with its deterministic
    cost (UNet passes per step, relative to plain fine-tuning).  Measured seconds per step go to
    ``cost_path`` (a benchmark file: wall time is not reproducible byte for byte)."""
    hist = pd.concat([pd.read_csv(p) for p in history_paths], ignore_index=True)
    base = hist.loc[hist["defense"] == "clean_finetune", "unet_passes_per_step"]
    ref = float(base.iloc[0]) if len(base) else 1.0
    hist["cost_vs_clean_finetune"] = hist["unet_passes_per_step"] / ref
    write_table(hist, csv_path, md_path)
    timing = pd.concat([pd.read_csv(p) for p in timing_paths], ignore_index=True)
    t_ref = timing.loc[timing["defense"] == "clean_finetune", "seconds_per_step"]
    timing["measured_cost_vs_clean_finetune"] = (timing["seconds_per_step"] / float(t_ref.iloc[0])
                                                 if len(t_ref) else float("nan"))
    write_table(timing, cost_path)
    return hist


ABLATION_ORDER = ("vanilla", "clean_finetune", "cgpo_mse", "addt_no_rbgm", "addt")


def _pgd_single(main: pd.DataFrame, threat: str) -> pd.DataFrame:
    return main[(main["threat"] == threat) & (main["attack"] == "pgd") & (main["evaluation"] == "single")]


def _setting_columns(sub: pd.DataFrame, defense: str, settings=("whitebox_eot", "dwbox")) -> dict:
    """Clean and robust accuracy with its interval of ``defense`` per setting (columns suffixed
    with the setting; a setting not attacked is left out)."""
    row = {}
    for setting in settings:
        r = sub[(sub["defense"] == defense) & (sub["setting"] == setting)]
        if r.empty:
            continue
        r = r.iloc[0]
        row[f"n_images_{setting}"] = int(r["n_images"])
        row[f"clean_{setting}"] = r["clean_accuracy"]
        row[f"robust_{setting}"] = r["robust_accuracy"]
        row[f"ci_low_{setting}"] = r["ci_low"]
        row[f"ci_high_{setting}"] = r["ci_high"]
    return row


def _settings_frame(rows: list[dict]) -> pd.DataFrame:
    """The rows as a table, image counts as integers also where a setting was not attacked."""
    table = pd.DataFrame(rows)
    for c in [c for c in table.columns if c.startswith("n_images_")]:
        table[c] = table[c].astype("Int64")
    return table


def write_p1_ablation_table(main_csv, csv_path, md_path, defenses, threat,
                            families: dict[str, str] | None = None) -> pd.DataFrame:
    """``p1_table_ablation``: clean and robust accuracy (PGD; whitebox_eot and dwbox, one-shot
    evaluation) for vanilla and each fine-tuned defense, one row per defense: the ablation order
    first, then the other defenses (the purifier families) as given.  ``families`` maps a defense
    to its purifier family (a ``family`` column when given)."""
    sub = _pgd_single(pd.read_csv(main_csv), threat)
    order = [x for x in ABLATION_ORDER if x in defenses] + [x for x in defenses if x not in ABLATION_ORDER]
    rows = []
    for d in order:
        row = {"defense": d} if families is None else {"defense": d, "family": families[d]}
        row.update(_setting_columns(sub, d))
        rows.append(row)
    table = _settings_frame(rows)
    write_table(table, csv_path, md_path)
    return table


def write_p1_families_table(main_csv, csv_path, md_path, rows: list[dict], threat: str,
                            settings=("whitebox_eot", "dwbox")) -> pd.DataFrame:
    """``p1_table_families``: per purifier family, vanilla vs ADDT weights - clean and robust
    accuracy (PGD, one-shot evaluation) with Wilson intervals in each setting.  ``rows``: one dict
    per defense with keys family, weights (vanilla | addt) and defense, in table order."""
    sub = _pgd_single(pd.read_csv(main_csv), threat)
    table = _settings_frame([{"family": r["family"], "weights": r["weights"], "defense": r["defense"],
                              **_setting_columns(sub, r["defense"], settings)} for r in rows])
    write_table(table, csv_path, md_path)
    return table


def p2_fixed_randomness_table(undefended: pd.DataFrame, random: pd.DataFrame, fixed: dict[int, pd.DataFrame],
                              n_images: int | None = None, evaluation: str = "single",
                              confidence: float = 0.95) -> pd.DataFrame:
    """Paper 2's fixed-randomness evaluation: robust accuracy of the classifier alone
    (``undefended``), of DBP under random randomness (``random``: the whitebox_eot PGD records,
    ``evaluation`` = how its adversarial examples are scored) and of DBP under each fixed
    configuration k (``fixed[k]``: the records of the dwbox PGD attack on configuration k), on
    the first ``n_images`` ids (all by default).  Rows: undefended, random, fixed_c{k} per k,
    fixed_mean (the mean over configurations, with their spread).  ``gain_points`` = robust
    accuracy minus the undefended one, in percentage points; on ``fixed_mean`` the per-
    configuration gains' std, min and max are reported beside it."""
    if not fixed:
        raise ValueError("no fixed-configuration records")
    ids = np.sort(undefended["id"].to_numpy())
    if n_images is not None:
        ids = ids[:n_images]

    def acc(df: pd.DataFrame, column: str) -> tuple[float, int]:
        sub = df[df["id"].isin(ids)]
        if len(sub) != len(ids):
            raise ValueError(f"records of {df['defense'].iloc[0]}/{df['setting'].iloc[0]} cover {len(sub)} of the "
                             f"{len(ids)} images")
        return float(sub[column].mean()), len(sub)

    rows = []

    def add(name, desc, df, column, config=None):
        a, n = acc(df, column)
        lo, hi = wilson_interval(a * n, n, confidence)
        rows.append({"row": name, "description": desc, "defense": df["defense"].iloc[0],
                     "attack_setting": df["setting"].iloc[0], "config": config, "n_images": n,
                     "robust_accuracy": a, "ci_low": lo, "ci_high": hi})

    add("undefended", "classifier alone, PGD", undefended, "correct_single")
    add("random", f"DBP, random randomness: whitebox_eot PGD-EOT, {evaluation} evaluation", random,
        f"correct_{evaluation}")
    for k in sorted(fixed):
        add(f"fixed_c{k}", f"DBP, fixed randomness configuration {k}: dwbox PGD", fixed[k], "correct_single", k)
    table = pd.DataFrame(rows)
    base = float(table["robust_accuracy"].iloc[0])
    table["gain_points"] = 100 * (table["robust_accuracy"] - base)
    per_config = table[table["row"].str.startswith("fixed_c")]
    gains = per_config["gain_points"].to_numpy()
    mean_row = {"row": "fixed_mean", "description": f"DBP, fixed randomness: mean over {len(gains)} configurations",
                "defense": per_config["defense"].iloc[0], "attack_setting": "dwbox_c*", "config": None,
                "n_images": int(per_config["n_images"].iloc[0]),
                "robust_accuracy": float(per_config["robust_accuracy"].mean()),
                "ci_low": float("nan"), "ci_high": float("nan"), "gain_points": float(gains.mean()),
                "gain_std_configs": float(gains.std(ddof=1)) if gains.size > 1 else 0.0,
                "gain_min_configs": float(gains.min()), "gain_max_configs": float(gains.max())}
    # interval over images of each image's mean outcome across configurations (fractional successes,
    # conservative: see metrics.wilson_interval)
    pooled = float(per_config["robust_accuracy"].mean()) * mean_row["n_images"]
    mean_row["ci_low"], mean_row["ci_high"] = wilson_interval(pooled, mean_row["n_images"], confidence)
    table = pd.concat([table, pd.DataFrame([mean_row])], ignore_index=True)
    gain_random = float(table.loc[table["row"] == "random", "gain_points"].iloc[0])
    table["gain_share_of_random"] = table["gain_points"] / gain_random if gain_random else float("nan")
    table["config"] = table["config"].astype("Int64")
    return table


def write_p2_fixed_randomness_table(undefended, random, fixed_paths, configs, csv_path, md_path, *,
                                    n_images=None, evaluation="single", confidence=0.95) -> pd.DataFrame:
    fixed = {int(k): pd.read_parquet(p) for k, p in zip(configs, fixed_paths)}
    table = p2_fixed_randomness_table(pd.read_parquet(undefended), pd.read_parquet(random), fixed,
                                      n_images=n_images, evaluation=evaluation, confidence=confidence)
    write_table(table, csv_path, md_path)
    for _, r in table.iterrows():
        log.info("%-10s robust accuracy %.4f (gain %+.1f points)", r["row"], r["robust_accuracy"], r["gain_points"])
    return table
