"""The robustness waterfall (issue 23): each defense's robust accuracy against the union of its
attacks, per image, from the weakest attack to the strongest.

The stages, weakest first, are :data:`STAGE_ORDER`, read from the attack registry (each attack
class says which stage its runs are, ``waterfall_stages``, and where its stages stand,
``waterfall_rank``): BPDA -> white-box PGD -> White-box-EOT PGD -> DW-box PGD -> AutoAttack (every
``aa_*`` protocol) -> DiffAttack -> surrogate -> DiffHammer -> low-frequency (DiffBreak-style
DCT-band PGD).  A run that no stage names (e.g. paper 2's ``dwbox_c<k>``) is left out.  The DAG reads
the registry in the Snakemake process and hands the order to the table stage as a param
(``stages``), so the table, a light stage, imports no attack and no torch (tests/test_light_stages.py);
:data:`STAGE_ORDER` and :data:`STAGES` read the registry on first use.

:func:`waterfall_table` builds the long table from the runs' per-image records, one row per defense
x threat model x evaluation (``single``: ``correct_single``; ``worst``: ``correct_worst``, robust
under every one of the ``eval_draws`` purifications) x stage:

* **one image set** per defense x threat model: the ids every one of its runs attacked (the
  intersection; DW-box PGD attacks ``attacks.dwbox_n_images`` images, the others fewer).
  ``n_images`` is its size, ``images_dropped`` how many images some run attacked outside it and
  ``trimmed_runs`` which runs had them (also logged);
* ``stage_robust_accuracy``: the stage alone on those images; a stage with several runs (the
  AutoAttack protocols, PGD in several settings) counts an image robust only if it survives all
  of them (``runs`` names them, ``attack``/``setting`` the stage's strongest run);
* ``ensemble_robust_accuracy``: robust against the UNION of every stage up to this one, per image
  (:mod:`dbprepro.claims.ensemble`, which the ensemble claims share), so it never rises;
  ``removed``: the images this stage removed from the ensemble (the first stage: from all images,
  so the clean errors count there); ``ci_low``/``ci_high``: percentile bootstrap over the images
  (``claims.resamples`` draws, seeded; the stage-alone interval ``stage_ci_*`` from the same draws);
* a last row per defense x threat model x evaluation: :data:`ALL_ATTACKS` for a defense attacked
  beyond PGD (``adaptive``: the waterfall's defenses - every defense some adaptive attack's
  ``defenses`` lists), :data:`PGD_ONLY` for one with PGD runs only (the families, the vote
  defense, the undefended classifier: its last point is no claim about every attack), holding the
  ensemble, and the **single strongest run** on the same images (``strongest_run``,
  ``strongest_robust_accuracy`` with its bootstrap interval);
* cost: ``steps`` (iterations per restart; the largest of the stage's runs), ``calls_per_image``
  (network calls per image, summed over the stage's runs, from the cost model: :func:`run_costs`),
  ``network_calls`` (each run's calls x its own images, summed) and ``ensemble_network_calls``
  (cumulative; the last row: every run).
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import numpy as np
import pandas as pd

from ..claims.ensemble import bootstrap_intervals, cumulative_survival, outcomes, shared_ids
from ..metrics import write_table

log = logging.getLogger(__name__)

StageOrder = tuple[tuple[str, tuple[tuple[str, str | None], ...]], ...]


def stage_order() -> StageOrder:
    """The waterfall's stages, weakest first: (label, the (attack, setting) runs it holds; setting
    None = the attack in any setting), read from the attack registry: each registered attack's
    ``waterfall_stages``, the attacks in ``waterfall_rank`` order (stages of the same label merge)."""
    from ..attacks.registry import ATTACKS

    order: dict[str, list[tuple[str, str | None]]] = {}
    for name, cls in sorted(ATTACKS.items(), key=lambda item: item[1].waterfall_rank):  # stable
        for label, setting in cls.waterfall_stages:
            order.setdefault(label, []).append((name, setting))
    return tuple((label, tuple(runs)) for label, runs in order.items())


def as_stage_order(stages) -> StageOrder:
    """A stage order as :func:`stage_order` gives it, from its plain form (lists, e.g. a Snakemake
    param read back from JSON); None: the registry's (:func:`stage_order`)."""
    if stages is None:
        return stage_order()
    return tuple((str(label), tuple((str(a), None if s is None else str(s)) for a, s in runs)) for label, runs in stages)


def __getattr__(name: str):
    """:data:`STAGE_ORDER` (the stages of the registered attacks, :func:`stage_order`) and :data:`STAGES`
    (their labels in waterfall order), read from the attack registry on first use."""
    if name == "STAGE_ORDER":
        return stage_order()
    if name == "STAGES":
        return tuple(label for label, _ in stage_order())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: the last row of a defense attacked beyond PGD: the ensemble of every attack
ALL_ATTACKS = "all attacks"
#: the last row of a defense with PGD runs only
PGD_ONLY = "all PGD runs"
#: the evaluations the waterfall shows (one-shot and worst of N), kept apart: the records' column
EVALUATIONS: dict[str, str] = {"single": "correct_single", "worst": "correct_worst"}

#: the run key shared by the records and the cost rows
RUN_KEY = ["defense", "threat", "setting", "attack"]
COST_COLUMNS = ["steps", "calls_per_image", "unet_calls_per_image", "calls_upper_bound"]
COLUMNS = ["defense", "threat", "norm", "eps", "evaluation", "adaptive", "stage_index", "stage", "runs", "n_runs",
           "attack", "setting", "n_images", "images_dropped", "trimmed_runs", "stage_robust_accuracy", "stage_ci_low",
           "stage_ci_high", "ensemble_robust_accuracy", "ci_low", "ci_high", "removed", "strongest_run",
           "strongest_robust_accuracy", "strongest_ci_low", "strongest_ci_high", "steps", "calls_per_image",
           "unet_calls_per_image", "network_calls", "ensemble_network_calls", "calls_upper_bound"]


def stage_of(attack: str, setting: str, order: StageOrder | None = None) -> str | None:
    """The waterfall stage of a run of ``attack`` in ``setting`` in ``order`` (default: the registry's,
    :func:`stage_order`); None: no stage holds it."""
    for label, runs in (stage_order() if order is None else order):
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

def _order(values, first: list[str]) -> list[str]:
    """The distinct ``values``: those of ``first`` in its order, then the others in order of appearance."""
    present = set(values)
    return [v for v in first if v in present] + [v for v in dict.fromkeys(values) if v not in first]


def run_label(setting: str, attack: str) -> str:
    """How the table names a run: ``attack/setting``."""
    return f"{attack}/{setting}"


def _costs(costs, defense: str, threat: str, runs: list[tuple[str, str]], n: dict) -> dict[str, Any]:
    """Cost of running ``runs`` (each on its own ``n`` images): steps (the largest), calls per image
    (summed), network calls (calls x images, summed); empty when a run has no cost row."""
    rows = [costs.get((defense, threat, s, a)) for s, a in runs]
    if not rows or any(r is None for r in rows):
        return dict(steps=pd.NA, calls_per_image=np.nan, unet_calls_per_image=np.nan, network_calls=np.nan,
                    calls_upper_bound=pd.NA)
    return dict(steps=max(int(r["steps"]) for r in rows),
                calls_per_image=float(sum(r["calls_per_image"] for r in rows)),
                unet_calls_per_image=float(sum(r["unet_calls_per_image"] for r in rows)),
                network_calls=float(sum(r["calls_per_image"] * n[run] for r, run in zip(rows, runs))),
                calls_upper_bound=any(bool(r["calls_upper_bound"]) for r in rows))


def _seed(seed: int, *key: str) -> int:
    """A cell's bootstrap seed: from ``seed`` and the cell, so no cell moves when others change."""
    return int(seed) * 1_000_003 + zlib.crc32("/".join(key).encode())


def _defense_rows(frames: dict[tuple[str, str], pd.DataFrame], defense: str, threat: str, costs: dict,
                  confidence: float, resamples: int, seed: int, order: StageOrder) -> list[dict[str, Any]]:
    """The rows of one defense x threat model (``frames``: its staged runs' records by (setting,
    attack), indexed by id, in stage ``order``)."""
    runs = list(frames)
    labels = [label for label, _ in order]
    stage_idx = [labels.index(stage_of(a, s, order)) for s, a in runs]
    ids = shared_ids(frames.values())
    every = frames[runs[0]].index
    for f in frames.values():
        every = every.union(f.index)
    trimmed = [run_label(*r) for r, f in frames.items() if len(f.index.difference(ids))]
    if len(ids) == 0:
        log.warning("waterfall %s/%s: no image every run attacked; left out (runs: %s)", defense, threat,
                    ", ".join(run_label(*r) for r in runs))
        return []
    if trimmed:
        log.info("waterfall %s/%s: %d shared images; %d images dropped, attacked only by some runs (those of %s)",
                 defense, threat, len(ids), len(every) - len(ids), ", ".join(trimmed))
    n_run = {r: len(f) for r, f in frames.items()}
    adaptive = any(a != "pgd" for _, a in runs)
    first = next(iter(frames.values()))
    base = dict(defense=defense, threat=threat, norm=first["norm"].iloc[0] if "norm" in first else np.nan,
                eps=float(first["eps"].iloc[0]) if "eps" in first else np.nan, adaptive=adaptive,
                n_images=len(ids), images_dropped=len(every) - len(ids), trimmed_runs=";".join(trimmed))
    stages = list(dict.fromkeys(stage_idx))
    members = [[j for j, k in enumerate(stage_idx) if k == st] for st in stages]
    out = []
    for ev, column in EVALUATIONS.items():
        m = outcomes(frames.values(), column, ids)  # runs x images
        alone = np.vstack([m[js].min(axis=0) for js in members])
        ens = cumulative_survival(alone)
        best = int(np.argmin(m.mean(axis=1)))  # the strongest single run (ties: the earliest stage)
        lo, hi = bootstrap_intervals(np.vstack([alone, ens, m[best]]), confidence=confidence, resamples=resamples,
                                     seed=_seed(seed, defense, threat, ev))
        k = len(stages)
        robust_before, spent = float(len(ids)), 0.0
        for i, (st, js) in enumerate(zip(stages, members)):
            strongest = js[int(np.argmin(m[js].mean(axis=1)))]
            cost = _costs(costs, defense, threat, [runs[j] for j in js], n_run)
            spent += cost["network_calls"]
            out.append({**base, **cost, "evaluation": ev, "stage_index": st, "stage": labels[st],
                        "runs": ";".join(run_label(*runs[j]) for j in js), "n_runs": len(js),
                        "setting": runs[strongest][0], "attack": runs[strongest][1],
                        "stage_robust_accuracy": alone[i].mean(), "stage_ci_low": lo[i], "stage_ci_high": hi[i],
                        "ensemble_robust_accuracy": ens[i].mean(), "ci_low": lo[k + i], "ci_high": hi[k + i],
                        "removed": int(round(robust_before - ens[i].sum())), "ensemble_network_calls": spent})
            robust_before = float(ens[i].sum())
        cost = _costs(costs, defense, threat, runs, n_run)
        out.append({**base, **cost, "evaluation": ev, "stage_index": len(labels),
                    "stage": ALL_ATTACKS if adaptive else PGD_ONLY, "runs": ";".join(run_label(*r) for r in runs),
                    "n_runs": len(runs), "stage_robust_accuracy": ens[-1].mean(), "stage_ci_low": lo[2 * k - 1],
                    "stage_ci_high": hi[2 * k - 1], "ensemble_robust_accuracy": ens[-1].mean(), "ci_low": lo[2 * k - 1],
                    "ci_high": hi[2 * k - 1], "removed": int(round(len(ids) - ens[-1].sum())),
                    "strongest_run": run_label(*runs[best]), "strongest_robust_accuracy": m[best].mean(),
                    "strongest_ci_low": lo[-1], "strongest_ci_high": hi[-1], "ensemble_network_calls": spent})
    return out


def waterfall_table(records: pd.DataFrame, costs: list[dict] | pd.DataFrame | None = None,
                    defenses: list[str] | None = None, *, confidence: float = 0.95, resamples: int = 2000,
                    seed: int = 0, stages=None) -> pd.DataFrame:
    """The long waterfall table from the runs' per-image records (one frame with the ``defense``,
    ``threat``, ``setting``, ``attack``, ``id`` and ``correct_*`` columns; see the module docstring).

    ``costs``: :func:`run_costs`' rows (steps and calls left empty for a run without one);
    ``defenses``: the row order (any other defense of the records follows in its order);
    ``stages``: the stage order (:func:`as_stage_order`; None: the attack registry's)."""
    order = as_stage_order(stages)
    labels = [label for label, _ in order]
    staged = [stage_of(a, s, order) is not None for a, s in zip(records["attack"], records["setting"])]
    left = records.loc[[not s for s in staged], ["attack", "setting"]].drop_duplicates()
    if len(left):
        log.info("waterfall: runs no stage holds left out: %s", sorted(map(tuple, left.to_numpy())))
    records = records[staged]
    cost = {} if costs is None else {tuple(r[k] for k in RUN_KEY): r for r in
                                     (costs.to_dict("records") if isinstance(costs, pd.DataFrame) else costs)}
    rows = []
    for d in _order(list(records["defense"]), list(defenses or [])):
        rd = records[records["defense"] == d]
        for tm in _order(list(rd["threat"]), []):
            sub = rd[rd["threat"] == tm]
            runs = sorted(dict.fromkeys(zip(sub["setting"], sub["attack"])),
                          key=lambda r: labels.index(stage_of(r[1], r[0], order)))  # stable: records order within a stage
            frames = {r: sub[(sub["setting"] == r[0]) & (sub["attack"] == r[1])].set_index("id").sort_index()
                      for r in runs}
            rows += _defense_rows(frames, d, tm, cost, confidence, resamples, seed, order)
    out = pd.DataFrame(rows, columns=COLUMNS)
    for c in ("n_images", "n_runs", "stage_index", "steps", "removed", "images_dropped"):
        out[c] = out[c].astype("Int64")
    return out


def load_records(paths) -> pd.DataFrame:
    """The runs' per-image records (``records.parquet`` files) as one frame."""
    frames = [pd.read_parquet(p) for p in dict.fromkeys(map(str, paths))]
    if not frames:
        raise ValueError("the waterfall needs the attack runs' records; none given")
    return pd.concat(frames, ignore_index=True)


def write_waterfall_table(records, csv_path, md_path, costs: list[dict] | None = None,
                          defenses: list[str] | None = None, *, confidence: float = 0.95, resamples: int = 2000,
                          seed: int = 0, stages=None) -> pd.DataFrame:
    """``waterfall.csv`` (+ ``.md``) from the runs' ``records.parquet`` files, their costs and the stage
    order (``stages``, see :func:`waterfall_table`)."""
    table = waterfall_table(load_records(records), costs, defenses, confidence=confidence, resamples=resamples,
                            seed=seed, stages=stages)
    write_table(table, csv_path, md_path)
    return table
