"""benchmarks/run.py --only dag-profile: where the cold default DAG's wall time goes (issue 26's measurement).

    .venv/bin/python benchmarks/run.py --only dag-profile                  # run the cold default, then profile it
    .venv/bin/python benchmarks/run.py --only dag-profile --profile-dir D  # profile a finished run in D

Writes ``dag_profile.csv`` (the run's summary), ``dag_profile_rules.csv`` (per rule) and ``dag_profile_jobs.csv``
(per job) beside the suite's other CSVs; the analysis is :mod:`dbprepro.dagprofile`.
"""

from __future__ import annotations

from pathlib import Path


def bench_dag_profile(suite, q: bool, out: Path, workdir: str | None, profile_dir: str | None):
    """Where the cold default DAG's time goes (:mod:`dbprepro.dagprofile`): per rule start-up against
    compute, the start-up share, the critical path and idle core-seconds.  Runs the cold default first
    (in ``workdir`` or a temporary directory) unless ``profile_dir`` names a finished run; in quick
    mode without ``profile_dir``, nothing (a cold default run takes minutes)."""
    import pandas as pd

    from dbprepro.dagprofile import by_rule, profile_run

    if profile_dir is None:
        if q:
            return [], []
        rows, _ = suite.bench_dag(q, out, "default", workdir)
        profile_dir = rows[0]["workdir"]
    jobs, summary = profile_run(profile_dir, cores=2)
    jobs.to_csv(out / "dag_profile_jobs.csv", index=False)
    by_rule(jobs).to_csv(out / "dag_profile_rules.csv", index=False)
    pd.DataFrame([dict(summary, workdir=str(profile_dir))]).to_csv(out / "dag_profile.csv", index=False)
    share = summary["startup_share"]
    print(f"  dag-profile: wall {summary['wall_seconds']:.0f} s, job time {summary['job_seconds']:.0f} s, start-up "
          f"{100 * share:.1f} %, critical path {summary['critical_path_seconds']:.0f} s, idle "
          f"{summary['idle_core_seconds']:.0f} core-s", flush=True)
    return [summary], [
        dict(comparison="dag-profile", target="start-up <= 10 % of the default DAG's job time",
             measured=f"{100 * share:.1f} % ({summary['startup_seconds']:.0f} s of {summary['job_seconds']:.0f} s; "
                      f"model loads {summary['load_seconds']:.0f} s apart)", met=bool(share <= 0.10),
             why=f"{summary['process_jobs']} jobs start their own Python process"),
        dict(comparison="dag-profile", target="cold default DAG <= 10 min on 2 cores",
             measured=f"{summary['wall_seconds'] / 60:.1f} min wall; critical path "
                      f"{summary['critical_path_seconds'] / 60:.1f} min; idle {summary['idle_core_seconds']:.0f} "
                      f"core-s (head {summary['idle_head']:.0f}, body {summary['idle_body']:.0f}, tail "
                      f"{summary['idle_tail']:.0f})", met=bool(summary["wall_seconds"] <= 600),
             why=f"critical path: {summary['critical_path']}"),
    ]
