"""Paper 2's robustness under fixed randomness: the classifier alone, DBP under random
randomness and DBP under each fixed configuration, with the gain each keeps."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..metrics import wilson_interval, write_table

log = logging.getLogger("dbprepro.paper2.fixed_randomness")

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
