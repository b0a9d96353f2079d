"""The robustness waterfall (issue 17): each defense's robust accuracy from the weakest attack to
the strongest, and the strongest known attack on it.

The stages, weakest first, are :data:`STAGE_ORDER`, read from the attack registry (each attack
class says which stage its runs are, ``waterfall_stages``, and where its stages stand,
``waterfall_rank``): BPDA -> white-box PGD -> White-box-EOT PGD -> DW-box
PGD -> AutoAttack (every ``aa_*`` protocol) -> DiffAttack -> surrogate -> DiffHammer -> low-frequency
(DiffBreak-style DCT-band PGD).  A run of the main table that no stage names (e.g. paper 2's
``dwbox_c<k>``) is left out.

:func:`waterfall_table` builds the long table, one row per defense x threat model x evaluation x
stage, for the ``single`` and ``worst`` (worst of N) evaluations apart:

* a stage without a run is absent (never filled in); a stage with several runs (the three
  AutoAttack protocols, BPDA in several settings) shows its strongest run (lowest robust
  accuracy; ties: the first in the main table's order), ``runs`` says how many it had;
* each cell carries the run's images, Wilson interval, ``steps`` (iterations per restart) and
  network calls (per image and in total, from the cost model: :func:`run_costs`);
* a ``strongest known`` row per defense x threat x evaluation: the minimum over the available
  stages (ties: the earliest stage), naming its attack, setting and stage (``from_stage``).
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from ..metrics import write_table

log = logging.getLogger(__name__)

def stage_order() -> tuple[tuple[str, tuple[tuple[str, str | None], ...]], ...]:
    """The waterfall's stages, weakest first: (label, the (attack, setting) runs it holds; setting
    None = the attack in any setting), read from the attack registry: each registered attack's
    ``waterfall_stages``, the attacks in ``waterfall_rank`` order (stages of the same label merge)."""
    from ..attacks.registry import ATTACKS

    order: dict[str, list[tuple[str, str | None]]] = {}
    for name, cls in sorted(ATTACKS.items(), key=lambda item: item[1].waterfall_rank):  # stable
        for label, setting in cls.waterfall_stages:
            order.setdefault(label, []).append((name, setting))
    return tuple((label, tuple(runs)) for label, runs in order.items())


#: the stages of the registered attacks (:func:`stage_order`)
STAGE_ORDER = stage_order()
#: stage labels in waterfall order
STAGES: tuple[str, ...] = tuple(label for label, _ in STAGE_ORDER)
#: the label of the per-defense minimum over the stages
STRONGEST = "strongest known"
#: the evaluations of ``p1_table_main`` the waterfall shows (one-shot and worst of N), kept apart
EVALUATIONS: tuple[str, ...] = ("single", "worst")

#: the run key shared by the main table and the cost rows
RUN_KEY = ["defense", "threat", "setting", "attack"]
COST_COLUMNS = ["steps", "calls_per_image", "unet_calls_per_image", "calls_upper_bound"]
COLUMNS = ["defense", "threat", "norm", "eps", "evaluation", "stage_index", "stage", "attack", "setting", "runs",
           "n_images", "clean_accuracy", "robust_accuracy", "ci_low", "ci_high", "drop_from_previous", "steps",
           "calls_per_image", "unet_calls_per_image", "network_calls", "calls_upper_bound", "from_stage"]


def stage_of(attack: str, setting: str) -> str | None:
    """The waterfall stage of a run of ``attack`` in ``setting`` (None: no stage holds it)."""
    for label, runs in STAGE_ORDER:
        for a, s in runs:
            if a == attack and (s is None or s == setting):
                return label
    return None


# ------------------------------------------------------------------------------- cost of the runs

def run_steps(attacks: dict[str, Any], attack: str) -> int:
    """Iterations (per restart) of one run of ``attack`` configured by the run's ``attacks``
    section: its own section's ``steps`` (AutoAttack: ``apgd_steps``), else PGD's ``steps``
    (BPDA, a surrogate without its own count, the undefended classifier's PGD)."""
    from ..attacks.registry import attack_class

    section = attacks.get(attack_class(attack).config_section or "", None) or {}
    for key in ("steps", "apgd_steps"):
        if section.get(key) is not None:
            return int(section[key])
    return int(attacks["pgd"]["steps"])


def run_costs(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Steps and network calls per image of every attack run of paper 1's main table under the
    validated config ``cfg`` (the cost model's count, :func:`dbprepro.cost.count.attack_run_calls`,
    on the run's own ``attacks`` section): plain dicts, the Snakefile passes them as params."""
    from ..config import Experiment
    from ..cost.count import attack_run_calls

    exp = Experiment.from_config(cfg)
    grad_mode = cfg["purification"].get("grad_mode", "exact")
    rows = []
    for run in exp.attack_runs():
        att = exp.attacks(run.defense, run.setting, run.attack)
        calls, bound = attack_run_calls({**cfg, "attacks": att}, run.defense, run.setting, run.attack,
                                        exp.purification(run.defense), grad_mode)
        c = calls.as_dict()
        rows.append({**run._asdict(), "steps": run_steps(att, run.attack),
                     "calls_per_image": float(sum(c.values())),
                     "unet_calls_per_image": float(sum(v for k, v in c.items() if k.startswith("unet"))),
                     "calls_upper_bound": bool(bound)})
    return rows


# ------------------------------------------------------------------------------- the table

def _order(values, first: list[str]) -> dict[str, int]:
    """Rank of each value: those of ``first`` in its order, then the others in order of appearance."""
    seen = [v for v in first if v in set(values)] + [v for v in dict.fromkeys(values) if v not in first]
    return {v: i for i, v in enumerate(seen)}


def waterfall_table(main: pd.DataFrame, costs: list[dict] | pd.DataFrame | None = None,
                    defenses: list[str] | None = None) -> pd.DataFrame:
    """The long waterfall table from the rows of ``p1_table_main`` (see the module docstring).

    ``costs``: :func:`run_costs`' rows (steps and calls left empty for a run without one);
    ``defenses``: the row order (vanilla, the ADDT variants, the families; any other defense of
    the table follows in its order)."""
    t = main[main["evaluation"].isin(EVALUATIONS)].copy()
    t["stage"] = [stage_of(a, s) for a, s in zip(t["attack"], t["setting"])]
    dropped = t[t["stage"].isna()]
    if len(dropped):
        log.info("waterfall: %d rows of runs no stage holds left out: %s", len(dropped),
                 sorted(set(zip(dropped["attack"], dropped["setting"]))))
    t = t[t["stage"].notna()].copy()
    cost = pd.DataFrame(costs if costs is not None else [], columns=RUN_KEY + COST_COLUMNS)
    cost = cost.drop_duplicates(RUN_KEY)
    t = t.drop(columns=[c for c in COST_COLUMNS if c in t.columns]).merge(cost, on=RUN_KEY, how="left")
    t["network_calls"] = t["calls_per_image"] * t["n_images"]
    t["stage_index"] = t["stage"].map({s: i for i, s in enumerate(STAGES)})
    t["_row"] = range(len(t))
    rank_d = _order(list(t["defense"]), list(defenses or []))
    rank_t = _order(list(t["threat"]), [])
    t["_d"], t["_t"] = t["defense"].map(rank_d), t["threat"].map(rank_t)
    t["_e"] = t["evaluation"].map({e: i for i, e in enumerate(EVALUATIONS)})
    cell = ["_d", "_t", "_e", "stage_index"]
    t = t.sort_values(cell + ["robust_accuracy", "_row"], kind="stable")
    t["runs"] = t.groupby(cell)["_row"].transform("size")
    t = t.drop_duplicates(cell, keep="first")  # the stage's strongest run
    group = ["_d", "_t", "_e"]
    t["drop_from_previous"] = 0.0 - t.groupby(group)["robust_accuracy"].diff()  # 0.0 -: no -0.0
    t["from_stage"] = t["stage"]
    best = t.sort_values(group + ["robust_accuracy", "stage_index"], kind="stable").drop_duplicates(group)
    best = best.assign(stage=STRONGEST, stage_index=len(STAGES), drop_from_previous=float("nan"))
    out = pd.concat([t, best], ignore_index=True).sort_values(group + ["stage_index"], kind="stable")
    for c in COLUMNS:
        if c not in out.columns:
            out[c] = float("nan")
    out = out[COLUMNS].reset_index(drop=True)
    for c in ("n_images", "runs", "stage_index", "steps"):
        out[c] = out[c].astype("Int64")
    return out


def write_waterfall_table(main_csv, csv_path, md_path, costs: list[dict] | None = None,
                          defenses: list[str] | None = None) -> pd.DataFrame:
    """``waterfall.csv`` (+ ``.md``) from ``p1_table_main.csv`` and the runs' costs."""
    table = waterfall_table(pd.read_csv(main_csv), costs, defenses)
    write_table(table, csv_path, md_path)
    return table
