"""Where a DAG run's wall time goes: per job, start-up against compute; the critical path; idle cores.

Read from a finished run's own files, nothing re-run:

- Snakemake's log (``.snakemake/log/*.snakemake.log``): each job's start and finish (1-s stamps), rule,
  threads, inputs and outputs.  A job depends on another when one of its inputs is (or lies inside)
  one of the other's outputs.
- the job's provenance record (``results/provenance/<rule>/...json``, :func:`dbprepro.runtime.write_job_provenance`):
  ``seconds`` of stage code, and ``timing``: ``startup_seconds`` (from the process's start or, in a
  warm worker, from the job's hand-over to the stage's code: imports, logging set-up, the provenance
  probe), ``import_seconds`` (the stage's own lazy imports: torch, diffusers, ...), ``load_seconds`` (model loaders).  In-process jobs (merges,
  tables, figures run inside Snakemake) have no start-up of their own.

Definitions (:func:`profile_run`):

``startup``        ``startup_seconds + import_seconds`` of a job: what it pays before its work, from its
                   process's creation or (a warm worker) its hand-over to the stage's first line,
                   and its lazy imports (model loads are shown apart, in ``loads``)
``outside``        a job's wall time by Snakemake's stamps minus its start-up and its stage: Snakemake's
                   own work for the job (set-up, output checks) and a process's exit
``startup share``  the sum of ``startup`` over the sum of job wall times (Snakemake's stamps)
``critical path``  the longest chain of dependent jobs, by their wall times: the run cannot be shorter
``idle``           ``cores x wall - sum(threads x job wall)`` in core-seconds, split into the head
                   (before the first attack job starts), the body and the tail (after the last attack
                   job ends)
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

_STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
_RULE = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")
_FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")


@dataclass
class Job:
    jobid: int
    rule: str
    start: float
    end: float = float("nan")
    threads: int = 1
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    wildcards: str = ""


def _when(stamp: str) -> float:
    return dt.datetime.strptime(" ".join(stamp.split()), "%a %b %d %H:%M:%S %Y").timestamp()


def parse_snakemake_log(path: str | Path) -> list[Job]:
    """The jobs of one Snakemake log, with start, end, threads, inputs, outputs."""
    jobs: dict[int, Job] = {}
    stamp: float | None = None
    current: Job | None = None
    pending: dict = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if m := _STAMP.match(line):
            stamp, current = _when(m.group(1)), None
            continue
        if (m := _RULE.match(line)) and stamp is not None:
            current, pending = None, dict(rule=m.group(1), start=stamp)
            continue
        if m := _FINISHED.match(line):
            jid = int(m.group(1))
            if jid in jobs and stamp is not None:
                jobs[jid].end = stamp
            continue
        if pending is not None and ":" in line and raw.startswith("    "):
            key, _, value = line.partition(":")
            value = value.strip()
            if key == "jobid":
                current = Job(int(value), pending["rule"], pending["start"], **{k: v for k, v in pending.items()
                                                                                 if k not in ("rule", "start")})
                jobs[current.jobid] = current
            elif key in ("input", "output"):
                items = [v.strip() for v in value.split(",") if v.strip()]
                target = current.__dict__ if current else pending
                target["inputs" if key == "input" else "outputs"] = items
            elif key == "threads":
                (current.__dict__ if current else pending)["threads"] = int(value)
            elif key == "wildcards":
                (current.__dict__ if current else pending)["wildcards"] = value
    return [j for j in jobs.values() if j.end == j.end]  # finished jobs only


def _provenance_timing(provenance_dir: Path) -> dict[str, dict]:
    """Output path -> the timing of the job that wrote it (from its provenance record)."""
    out: dict[str, dict] = {}
    if not provenance_dir.is_dir():
        return out
    for rec_path in provenance_dir.rglob("*.json"):
        rec = json.loads(rec_path.read_text())
        row = dict(stage_seconds=float(rec.get("seconds", float("nan"))),
                   in_process=bool(rec.get("in_snakemake_process")), **(rec.get("timing") or {}))
        for o in rec.get("outputs", {}):
            out[o] = row
    return out


def job_table(jobs: list[Job], provenance_dir: str | Path | None = None) -> pd.DataFrame:
    """One row per job: rule, wildcards, wall, threads, and the provenance's split of its time."""
    timing = _provenance_timing(Path(provenance_dir)) if provenance_dir else {}
    rows = []
    for j in jobs:
        t = next((timing[o] for o in j.outputs if o in timing), {})
        startup = t.get("startup_seconds", float("nan")) + t.get("import_seconds", 0.0)
        if t.get("in_process"):
            startup = 0.0
        stage = t.get("stage_seconds", float("nan"))
        outside = 0.0 if t.get("in_process") else (j.end - j.start) - t.get("startup_seconds", float("nan")) - stage
        rows.append(dict(jobid=j.jobid, rule=j.rule, wildcards=j.wildcards, start=j.start, end=j.end,
                         wall=j.end - j.start, threads=j.threads, in_process=bool(t.get("in_process", False)),
                         startup=startup, loads=t.get("load_seconds", float("nan")),
                         compute=stage - t.get("import_seconds", 0.0) - t.get("load_seconds", 0.0),
                         outside=outside))
    return pd.DataFrame(rows).sort_values("start", kind="stable").reset_index(drop=True)


def dependencies(jobs: list[Job]) -> dict[int, set[int]]:
    """jobid -> the jobids whose outputs it reads."""
    producer = {o.rstrip("/"): j.jobid for j in jobs for o in j.outputs}
    deps: dict[int, set[int]] = {}
    for j in jobs:
        found = set()
        for i in j.inputs:
            path = i.rstrip("/")
            while path:
                if path in producer and producer[path] != j.jobid:
                    found.add(producer[path])
                    break
                path = path.rpartition("/")[0]
        deps[j.jobid] = found
    return deps


def critical_path(jobs: list[Job]) -> tuple[float, list[int]]:
    """The longest chain of dependent jobs by wall time: (its length in seconds, its jobids)."""
    deps = dependencies(jobs)
    by_id = {j.jobid: j for j in jobs}
    best: dict[int, tuple[float, list[int]]] = {}
    for j in sorted(jobs, key=lambda j: j.end):
        prev = max((best[d] for d in deps[j.jobid] if d in best), default=(0.0, []), key=lambda b: b[0])
        best[j.jobid] = (prev[0] + (j.end - j.start), [*prev[1], j.jobid])
    if not best:
        return 0.0, []
    length, chain = max(best.values(), key=lambda b: b[0])
    return length, [by_id[i].jobid for i in chain]


def idle_core_seconds(table: pd.DataFrame, cores: int, split_rule: str = "attack") -> dict[str, float]:
    """Idle core-seconds of the run, total and in its head / body / tail around ``split_rule``'s jobs,
    on a 1-s grid (the log's resolution)."""
    t0, t1 = table["start"].min(), table["end"].max()
    grid = pd.RangeIndex(int(t0), int(t1))
    busy = pd.Series(0.0, index=grid)
    for r in table.itertuples():
        busy.loc[int(r.start):int(r.end) - 1] += r.threads
    idle = (cores - busy).clip(lower=0)
    split = table[table["rule"] == split_rule]
    a = int(split["start"].min()) if len(split) else int(t1)
    b = int(split["end"].max()) if len(split) else int(t1)
    return dict(total=float(idle.sum()), head=float(idle.loc[:a - 1].sum()), body=float(idle.loc[a:b - 1].sum()),
                tail=float(idle.loc[b:].sum()), wall=float(t1 - t0))


def latest_log(workdir: str | Path) -> Path:
    logs = sorted((Path(workdir) / ".snakemake" / "log").glob("*.snakemake.log"))
    if not logs:
        raise FileNotFoundError(f"{workdir}: no .snakemake/log/*.snakemake.log")
    return logs[-1]


def profile_run(workdir: str | Path, cores: int = 2, log: str | Path | None = None) -> tuple[pd.DataFrame, dict]:
    """The job table and the run's summary (wall, job time, start-up share, critical path, idle) of the
    run in ``workdir`` (its latest Snakemake log unless ``log`` is given)."""
    jobs = parse_snakemake_log(log or latest_log(workdir))
    table = job_table(jobs, Path(workdir) / "results" / "provenance")
    length, chain = critical_path(jobs)
    idle = idle_core_seconds(table, cores)
    own = table[~table["in_process"]]
    startup = float(own["startup"].sum(min_count=1))  # NaN: the run's provenance has no timing
    summary = dict(jobs=len(table), process_jobs=len(own), wall_seconds=idle["wall"],
                   job_seconds=float(table["wall"].sum()), startup_seconds=startup,
                   outside_seconds=float(own["outside"].sum(min_count=1)),
                   compute_seconds=float(table["compute"].sum(min_count=1)),
                   load_seconds=float(own["loads"].sum(min_count=1)),
                   startup_share=startup / float(table["wall"].sum()) if table["wall"].sum() else float("nan"),
                   critical_path_seconds=length,
                   critical_path=" > ".join(f"{table.set_index('jobid').loc[i, 'rule']}" for i in chain),
                   idle_core_seconds=idle["total"], idle_head=idle["head"], idle_body=idle["body"],
                   idle_tail=idle["tail"], cores=cores)
    return table, summary


def by_rule(table: pd.DataFrame) -> pd.DataFrame:
    """Per rule: jobs, wall, start-up, loads and compute seconds (sums), start-up share."""
    g = table.groupby("rule").agg(jobs=("jobid", "size"), wall=("wall", "sum"), startup=("startup", "sum"),
                                  loads=("loads", "sum"), compute=("compute", "sum"))
    g["startup_share"] = g["startup"] / g["wall"].where(g["wall"] > 0)
    return g.sort_values("wall", ascending=False).reset_index()


def profile_markdown(runs: dict[str, dict]) -> str:
    """A Markdown table of run summaries (:func:`profile_run`), one row per labelled run.  Its last column,
    job time over cores, is the wall time the same jobs would take with no core ever idle: no schedule of
    that work on those cores can be shorter."""
    head = ("| run | wall (min) | jobs (heavy) | job time (s) | start-up (s, share of job time) | stage compute (s) | "
            "outside the stage (s) | critical path (s) | idle core-s | job time / cores (s) |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for label, s in runs.items():
        rows.append(f"| {label} | {s['wall_seconds'] / 60:.1f} | {int(s['jobs'])} ({int(s['process_jobs'])}) | "
                    f"{s['job_seconds']:.0f} | {s['startup_seconds']:.0f} ({100 * s['startup_share']:.1f} %) | "
                    f"{s['compute_seconds']:.0f} | "
                    f"{s['outside_seconds']:.0f} | {s['critical_path_seconds']:.0f} | {s['idle_core_seconds']:.0f} | "
                    f"{s['job_seconds'] / s['cores']:.0f} |")
    return head + "\n".join(rows) + "\n"
