"""dbprepro.dagprofile on a planted Snakemake log and provenance records with known answers."""

import json
from pathlib import Path

import pytest

from dbprepro.dagprofile import by_rule, critical_path, parse_snakemake_log, profile_run

ROOT = Path(__file__).resolve().parents[1]

LOG = """Select jobs to execute...
[Mon Dec  7 01:00:00 2026]
localrule prepare:
    output: results/data/a.npz
    log: logs/prepare.log
    jobid: 1
    reason: Missing output files: results/data/a.npz
    resources: tmpdir=/tmp
[Mon Dec  7 01:00:10 2026]
Finished jobid: 1 (Rule: prepare)
1 of 4 steps (25%) done
[Mon Dec  7 01:00:10 2026]
localrule train:
    input: results/data/a.npz
    output: results/models/m
    jobid: 2
    threads: 2
    resources: tmpdir=/tmp
[Mon Dec  7 01:01:00 2026]
Finished jobid: 2 (Rule: train)
[Mon Dec  7 01:01:00 2026]
localrule attack:
    input: results/models/m/weights.pt, results/data/a.npz
    output: results/attacks/x/shard0.parquet
    jobid: 3
    wildcards: defense=vanilla
    resources: tmpdir=/tmp
[Mon Dec  7 01:01:00 2026]
localrule side:
    input: results/data/a.npz
    output: results/tables/side.csv
    jobid: 4
    resources: tmpdir=/tmp
[Mon Dec  7 01:01:20 2026]
Finished jobid: 4 (Rule: side)
[Mon Dec  7 01:01:40 2026]
Finished jobid: 3 (Rule: attack)
"""


def _record(tmp_path, name, output, seconds, startup, imports, loads, in_process=False):
    d = tmp_path / "results" / "provenance" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "r.json").write_text(json.dumps(dict(seconds=seconds, in_snakemake_process=in_process, outputs={output: "x"},
                                              timing=dict(startup_seconds=startup, import_seconds=imports,
                                                          load_seconds=loads))))


def test_the_profile_of_a_planted_run(tmp_path):
    log = tmp_path / ".snakemake" / "log" / "2026-12-07T010000.snakemake.log"
    log.parent.mkdir(parents=True)
    log.write_text(LOG)
    jobs = {j.jobid: j for j in parse_snakemake_log(log)}
    assert jobs[2].threads == 2 and jobs[3].wildcards == "defense=vanilla"
    assert jobs[3].inputs == ["results/models/m/weights.pt", "results/data/a.npz"]
    # prepare 10 s > train 50 s > attack 40 s (an input inside train's output folder); side (20 s) is off the path
    length, chain = critical_path(list(jobs.values()))
    assert length == 100 and chain == [1, 2, 3]
    _record(tmp_path, "prepare", "results/data/a.npz", 4.0, 5.0, 0.5, 0.0)
    _record(tmp_path, "train", "results/models/m", 40.0, 6.0, 3.0, 1.0)
    _record(tmp_path, "attack", "results/attacks/x/shard0.parquet", 30.0, 6.0, 3.0, 2.0)
    _record(tmp_path, "side", "results/tables/side.csv", 1.0, 0.0, 0.0, 0.0, in_process=True)
    table, s = profile_run(tmp_path, cores=2)
    assert s["wall_seconds"] == 100 and s["job_seconds"] == 120 and s["critical_path_seconds"] == 100
    assert s["critical_path"] == "prepare > train > attack"
    assert s["startup_seconds"] == pytest.approx(5.5 + 9 + 9) and s["load_seconds"] == pytest.approx(3)
    assert s["startup_share"] == pytest.approx(23.5 / 120)
    # idle: 1 core for the first 10 s (head: before the attack starts), 0 while train holds both cores,
    # 0 for 20 s (attack + side), then 1 core for the attack's last 20 s (body)
    assert (s["idle_head"], s["idle_body"], s["idle_tail"]) == (10, 20, 0)
    rules = by_rule(table).set_index("rule")
    assert rules.loc["train", "compute"] == pytest.approx(40 - 3 - 1) and rules.loc["side", "startup"] == 0


def test_the_performance_docs_profile_table_is_generated_from_the_kept_profiles():
    """docs/performance.md's dag-profile table is `python benchmarks/dag_profile.py doc` of docs/performance/."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dag_profile", ROOT / "benchmarks" / "dag_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.KEPT.exists(), "no kept profile: python benchmarks/dag_profile.py keep LABEL RUN_DIR --note ..."
    assert mod.rendered() in mod.DOC.read_text()
