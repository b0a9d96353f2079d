"""``docs/results.md``, generated from the tables of a run (never typed by hand).

:func:`render_results` turns ``results/tables/*.csv`` into Markdown, table by table, and stamps the
document with the DVC hash of the ``results/tables`` it was made from (the hash ``dvc.lock``
records), and keeps a copy of those tables in ``docs/results_tables/`` (~100 kB of CSV and
Markdown).  So a test can check, on any clean clone, that the copy is the recorded run's tables
(its DVC hash, :func:`tables_hash`, equals ``dvc.lock``'s) and that the document is exactly what
they render to: a number typed into the document, or a table edited, fails.  Regenerate both after
``dvc commit`` of a new run with ``dbprepro results-doc`` (after ``dbprepro pull`` elsewhere).
Verdicts on the papers' claims are the rows of ``claims.csv`` (:mod:`dbprepro.claims`), shown as
they are: no verdict is typed here.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import yaml

from .io import atomic_path

#: the robustness waterfall's columns shown (the stage, its runs, alone and with every stage before it, cost)
WATERFALL_COLUMNS = ("defense", "threat", "stage", "runs", "n_images", "stage_robust_accuracy",
                     "ensemble_robust_accuracy", "ci_low", "ci_high", "removed", "steps", "calls_per_image",
                     "ensemble_network_calls")
#: the headline: each waterfall defense's robust accuracy against all attacks (the waterfall's last point)
#: beside the strongest single run on the same images
ALL_ATTACKS_COLUMNS = ("defense", "threat", "evaluation", "n_images", "n_runs", "ensemble_robust_accuracy", "ci_low",
                       "ci_high", "strongest_run", "strongest_robust_accuracy", "strongest_ci_low",
                       "strongest_ci_high", "images_dropped")

#: claims.csv's columns shown
CLAIM_COLUMNS = ("claim_id", "claim", "threat", "value_a", "value_b", "estimate", "ci_low", "ci_high", "test", "p_value",
                 "p_holm", "n", "mde", "verdict", "verdict_raw")
#: the order of the verdict levels in the document's lead (dbprepro.claims.stats.VERDICTS)
VERDICT_ORDER = ("holds", "contradicted", "suggestive", "not significant")
#: the ``where`` of the claims on ADDT's gain under the adaptive attacks (dbprepro.claims.adaptive)
ADAPTIVE_WHERE = ("ADDT under adaptive attacks (issue 17)", "ADDT under the strongest known attack (issue 17)")
#: the ``where`` of the claims on the competing defenses (dbprepro.claims.competitors)
COMPETITOR_WHERE = ("ADDT, ADBM and GDMP under the worst case (issue 27)",
                    "GDMP under exact gradients (issue 27; Lee & Kim 2023)")

#: sanity.csv's columns shown (the sanity battery, :mod:`dbprepro.sanity`)
SANITY_COLUMNS = ("defense", "threat", "check", "compared", "setting", "n_images", "value", "reference", "estimate",
                  "ci_low", "ci_high", "outcome", "detail")

#: (heading, table file, columns shown (None: all), row filter: None, the ``evaluation`` to keep,
#: {column: the values to keep}, or "by verdict" (every row, ordered by :data:`VERDICT_ORDER`))
SECTIONS: tuple[tuple[str, str, tuple[str, ...] | None, str | dict | None], ...] = (
    ("Every testable claim of both papers, by family-wise verdict", "claims.csv", CLAIM_COLUMNS, "by verdict"),
    ("Robust accuracy against all attacks (per image: robust only if it survives every attack run; beside it the "
     "strongest single run on the same images)", "waterfall.csv", ALL_ATTACKS_COLUMNS, {"stage": ("all attacks",)}),
    ("Does ADDT's gain over vanilla survive the strongest attacks? (the claims on the shared adaptive attacks)",
     "claims.csv", CLAIM_COLUMNS, {"where": ADAPTIVE_WHERE}),
    ("How ADDT, ADBM and GDMP compare under the worst case (per image, every attack both defenses of a pair were run "
     "with; paired by image), and GDMP under BPDA against exact gradients", "claims.csv", CLAIM_COLUMNS,
     {"where": COMPETITOR_WHERE}),
    ("Paper 1: robust accuracy of every attack run (one-shot evaluation)", "p1_table_main.csv",
     ("defense", "threat", "setting", "attack", "n_images", "clean_accuracy", "robust_accuracy", "ci_low", "ci_high"),
     "single"),
    ("Paper 1: the same runs, worst of `eval_draws` purifications", "p1_table_main.csv",
     ("defense", "threat", "setting", "attack", "n_images", "robust_accuracy", "ci_low", "ci_high"), "worst"),
    ("Robustness waterfall: robust against every attack so far, weakest first (one-shot evaluation)", "waterfall.csv",
     WATERFALL_COLUMNS, "single"),
    ("Robustness waterfall: worst of `eval_draws` purifications", "waterfall.csv", WATERFALL_COLUMNS, "worst"),
    ("Paper 1: ADDT and its ablation", "p1_table_ablation.csv", None, None),
    ("Paper 1: purifier families, vanilla vs ADDT weights", "p1_table_families.csv", None, None),
    ("Clean accuracy (classifier alone; purified under random and fixed randomness)", "clean_accuracy.csv",
     ("defense", "setting", "n_images", "draws_per_image", "accuracy", "ci_low", "ci_high"), None),
    ("Paper 2, claim 1: distances to the clean image", "p2_lp_distances_summary.csv", None, None),
    ("Paper 2, claim 2: randomness dominance", "p2_randomness_summary.csv", None, None),
    ("Paper 2, claim 3: robustness under fixed randomness", "p2_table_fixed_randomness.csv",
     ("row", "defense", "attack_setting", "n_images", "robust_accuracy", "ci_low", "ci_high", "gain_points",
      "gain_share_of_random"), None),
    ("Paper 2, claim 4: compression rate and robustness, per image", "p2_compression_summary.csv", None, None),
    ("Paper 2, claim 4: compression rate and robustness, across defenses", "p2_compression_models.csv", None, None),
    ("The papers' numbers beside the reproduced ones", "paper_vs_reproduced.csv", None, None),
    ("Sanity battery: checks that flag a weak evaluation (a flag is a finding, dbprepro.sanity)", "sanity.csv",
     SANITY_COLUMNS, None),
)

#: sections shown only when their table is in the run, after the first (claims.csv) section:
#: claims_replicates.csv exists when the run had replicates.seeds (dbprepro.claims.replicates)
OPTIONAL_SECTIONS: tuple[tuple[str, str, tuple[str, ...] | None, str | dict | None], ...] = (
    ("Every claim across replicate training seeds (per seed, and a combined test across the seeds)",
     "claims_replicates.csv", None, None),
)

STAMP = re.compile(r"results/tables` DVC hash `([0-9a-f]{32}\.dir)`")


def recorded_tables_hash(lock_path: str | Path = "dvc.lock") -> str:
    """The md5 that ``dvc.lock`` records for ``results/tables``."""
    lock = yaml.safe_load(Path(lock_path).read_text())
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] == "results/tables":
                return out["md5"]
    raise ValueError(f"{lock_path}: no out results/tables recorded")


def stamped_hash(markdown: str) -> str | None:
    """The ``results/tables`` hash a generated document was made from (None: not generated)."""
    m = STAMP.search(markdown)
    return m.group(1) if m else None


def render_results(tables_dir: str | Path, tables_hash: str, reproduction: str | Path | None = None,
                   replicates: str | Path | None = None) -> str:
    """The Markdown of every table of :data:`SECTIONS` found in ``tables_dir`` (a missing table is
    named as missing, never filled in) and of :data:`OPTIONAL_SECTIONS` present there, stamped with
    ``tables_hash``; then the kept reproduction check in ``reproduction`` (:func:`reproduction_section`).
    An optional table missing from ``tables_dir`` is read from ``replicates`` (``docs/replicates``: the
    replicate seeds' run kept beside the recorded one, :func:`kept_replicates`)."""
    tables_dir = Path(tables_dir)
    lines = ["# Results on the embedded default", "",
             "> **Generated - do not edit by hand.**  `dbprepro results-doc` wrote this file from the tables of the run",
             f"> recorded in [`dvc.lock`](../dvc.lock) (`results/tables` DVC hash `{tables_hash}`; `dbprepro pull` fetches",
             "> them; a copy is in [`results_tables/`](results_tables/)).  Every number and verdict is a cell of those CSV",
             "> files (the verdicts: `dbprepro.claims`).",
             ""]
    lines += verdict_lead(tables_dir / "claims.csv")
    kept = kept_replicates(Path(replicates), tables_hash) if replicates is not None else {}
    optional = [s for s in OPTIONAL_SECTIONS if (tables_dir / s[1]).is_file() or s[1] in kept]
    for heading, name, columns, keep in [*SECTIONS[:1], *optional, *SECTIONS[1:]]:
        lines += [f"## {heading}", "", f"`results/tables/{name}`", ""]
        path = tables_dir / name
        if not path.is_file() and name in kept:
            path = kept[name]
            about = json.loads((path.parent / "about.json").read_text())
            lines += [f"Kept in `docs/replicates/` from `{about['command']}` on top of the recorded run (seed "
                      f"{about['main_seed']} is that run; the other seeds took {about['wall_seconds']} s of wall "
                      f"time on {about['cores']} cores{'; ' + about['note'] if about.get('note') else ''}).", ""]
            lines += _earlier_run_notice(about, tables_hash, tables_dir / "claims.csv", path)
        if not path.is_file():
            lines += ["(not in this run)", ""]
            continue
        df = pd.read_csv(path, dtype=str, keep_default_na=False)  # the cells exactly as the CSV has them
        if keep == "by verdict":
            df, keep = _by_verdict(df), None
        for column, values in ({} if keep is None else {"evaluation": (keep,)} if isinstance(keep, str)
                               else keep).items():
            df = df[df[column].isin(values)]
        if columns is not None:
            df = df[[c for c in columns if c in df.columns]]
        if df.empty:
            lines += ["(no such rows in this run)", ""]
            continue
        lines += [df.to_markdown(index=False, disable_numparse=True), ""]
    if reproduction is not None:
        lines += reproduction_section(Path(reproduction), tables_hash)
    return "\n".join(lines)


def kept_replicates(folder: Path, tables_hash: str) -> dict[str, Path]:
    """The optional tables kept in ``folder`` (``docs/replicates``) with an ``about.json`` naming the recorded
    run the replicate seeds extended: the run ``dvc.lock`` records (``tables_hash``) or an earlier one, which
    the section then says (:func:`_earlier_run_notice`)."""
    about = folder / "about.json"
    if not about.is_file() or not json.loads(about.read_text()).get("recorded_tables_hash"):
        return {}
    return {name: folder / name for _, name, _, _ in OPTIONAL_SECTIONS if (folder / name).is_file()}


def _earlier_run_notice(about: dict, tables_hash: str, claims: Path, replicate_table: Path) -> list[str]:
    """Nothing when the replicate seeds extended the recorded run; otherwise which run they extended and the
    recorded run's claims the replicate table lacks (computed from both tables' claim ids)."""
    if about["recorded_tables_hash"] == tables_hash:
        return []
    have = set(pd.read_csv(replicate_table, usecols=["claim_id"])["claim_id"])
    now = list(pd.read_csv(claims, usecols=["claim_id"])["claim_id"]) if claims.is_file() else []
    missing = [c for c in now if c not in have]
    return [f"**These replicate seeds extended an earlier recorded run** (commit {about.get('commit', '?')}, "
            f"`results/tables` hash `{about['recorded_tables_hash']}`), not the run this page shows: the rows below "
            "are that run's claims over three training seeds, not a re-test of this run.  "
            + (f"Claims of this run not in the replicate table ({len(missing)}): "
               + ", ".join(f"`{c}`" for c in missing) + "." if missing else
               "Every claim of this run has a row below."), ""]


def reproduction_section(folder: Path, tables_hash: str) -> list[str]:
    """``dbprepro compare-runs --describe`` kept in ``folder`` (``docs/reproduction``): the recorded run
    against another run of the same code, shown verbatim, only while its recorded side is the run
    ``dvc.lock`` records (``about.json``'s tables hash)."""
    about_path, report = folder / "about.json", folder / "compare.md"
    lines = ["## Reproduction: the recorded run against another run of the same code", ""]
    if not (about_path.is_file() and report.is_file()):
        return lines + ["(no comparison kept in `docs/reproduction/`)", ""]
    about = json.loads(about_path.read_text())
    if about.get("recorded_tables_hash") != tables_hash:
        return lines + ["(the comparison in `docs/reproduction/` is of another recorded run: run "
                        "`dbprepro compare-runs RECORDED NEW` again)", ""]
    return lines + ["`dbprepro compare-runs RECORDED NEW` (tolerances: [design.md](design.md#reproduction)): "
                    f"the recorded run "
                    f"against {about['new_run']} (its tables: DVC hash `{about['new_tables_hash']}`). "
                    f"Verdict: **{about['verdict']}**.", "", report.read_text().rstrip(), ""]


def _by_verdict(claims: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered by verdict level, the table's order kept within a level."""
    rank = claims["verdict"].map({v: i for i, v in enumerate(VERDICT_ORDER)}).fillna(len(VERDICT_ORDER))
    return claims.assign(_rank=rank).sort_values("_rank", kind="stable").drop(columns="_rank")


def verdict_lead(claims_csv: Path) -> list[str]:
    """The document's lead: how many claims reach each family-wise verdict level, counted from
    ``claims.csv`` (the family: every row of the table, Holm-adjusted), and the claims that hold
    or are contradicted."""
    if not claims_csv.is_file():
        return []
    claims = pd.read_csv(claims_csv, dtype=str, keep_default_na=False)
    counts = pd.DataFrame({"verdict": VERDICT_ORDER,
                           "claims": [int((claims["verdict"] == v).sum()) for v in VERDICT_ORDER]})
    lines = ["## Verdicts at the family-wise level", "",
             f"The family is every row of `claims.csv` ({len(claims)} tests): `holds` / `contradicted` mean Holm's "
             "adjusted p < alpha in the claimed direction / against it, `suggestive` the test's own p < alpha only, "
             "`not significant` neither (its `mde` says what the test could have seen). "
             "`verdict_raw` is the per-test verdict at the test's own p.", "",
             counts.to_markdown(index=False), ""]
    firm = claims[claims["verdict"].isin(("holds", "contradicted"))]
    if len(firm):
        shown = [c for c in ("claim_id", "claim", "estimate", "ci_low", "ci_high", "p_holm", "verdict")
                 if c in firm.columns]
        lines += [_by_verdict(firm)[shown].to_markdown(index=False, disable_numparse=True), ""]
    return lines


def tables_hash(folder: str | Path) -> str:
    """The DVC (3.x, md5) hash of a folder: md5 of the sorted JSON list of its files' relative
    paths and md5s, suffixed ``.dir`` - what ``dvc.lock`` records for ``results/tables``."""
    folder = Path(folder)
    entries = sorted(({"md5": hashlib.md5(p.read_bytes()).hexdigest(), "relpath": p.relative_to(folder).as_posix()}
                      for p in folder.rglob("*") if p.is_file()), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def write_results_doc(tables_dir: str | Path, lock_path: str | Path, out: str | Path,
                      snapshot: str | Path | None = None, reproduction: str | Path | None = None,
                      replicates: str | Path | None = None) -> str:
    """Render the tables of ``tables_dir`` with the hash ``lock_path`` records and write ``out``;
    with ``snapshot``, first check that ``tables_dir`` is the recorded run's tables (its hash) and
    copy them there, replacing what was there."""
    recorded = recorded_tables_hash(lock_path)
    if snapshot is not None:
        found = tables_hash(tables_dir)
        if found != recorded:
            raise ValueError(f"{tables_dir} (DVC hash {found}) are not the tables {lock_path} records ({recorded}): "
                             "dvc commit the run first, or dbprepro pull the recorded one")
        snapshot = Path(snapshot)
        if snapshot.exists():
            shutil.rmtree(snapshot)
        shutil.copytree(tables_dir, snapshot)
    text = render_results(tables_dir, recorded, reproduction, replicates)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return text
