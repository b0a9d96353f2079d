"""Paper 1's tables from the attack records: the main table (every defense x threat x setting x
attack x evaluation), the ADDT training table, the ablation and the purifier-family tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..threat_settings import EVALUATIONS, is_fixed, setting_fixed_draw
from ..metrics import wilson_interval, write_table


def _clean_accuracy(clean: pd.DataFrame, ids: np.ndarray, setting: str, fixed_draw: int,
                    defense: str | None = None) -> float:
    """Clean accuracy of the images ``ids`` under ``setting``'s randomness: the undefended
    classifier for ``none``, fresh draws for the stochastic settings, and for dwbox / dwbox_c{k}
    exactly the attacked fixed configuration - refused (ValueError) if that configuration was
    never clean-evaluated, rather than silently averaged over the others."""
    sub = clean[clean["id"].isin(ids)]
    if setting == "none":
        sub = sub[sub["setting"] == "classifier"]
    elif is_fixed(setting):  # dwbox: configuration fixed_draw; dwbox_c{k}: configuration k
        fixed = sub[sub["setting"] == "fixed"]
        k = setting_fixed_draw(setting, fixed_draw)
        sub = fixed[fixed["draw"] == k]
        if sub.empty:
            present = sorted(int(d) for d in clean.loc[clean["setting"] == "fixed", "draw"].unique())
            who = f" for defense {defense!r}" if defense is not None else ""
            what = "was not clean-evaluated on the attacked images" if k in present else "was never clean-evaluated"
            raise ValueError(f"setting {setting!r}: fixed randomness configuration {k} {what}{who} "
                             f"(configurations present: {present or 'none'}); evaluate it "
                             f"(evaluation.fixed_configs > {k}) or attack a configuration that was")
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
        if first["defense"] in clean:
            source = clean[first["defense"]]
        elif first["setting"] == "none":  # the classifier alone: the same under every defense's evaluation
            source = next(iter(clean.values()))
        else:
            raise ValueError(f"no clean-evaluation records of defense {first['defense']!r} (have: "
                             f"{', '.join(clean)}): its clean accuracy cannot come from another defense")
        clean_acc = _clean_accuracy(source, df["id"].to_numpy(), first["setting"], fixed_draw, first["defense"])
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

