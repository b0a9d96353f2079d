"""Running the DAG from tests: one helper for every test that calls Snakemake."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = [str(ROOT / "config.yaml"), str(ROOT / "config" / "smoke.yaml")]


def snakemake_command(workdir, *args, configfiles=SMOKE, env=None):
    """``(argv, environment)`` of a ``python -m snakemake`` run on the repository's Snakefile in
    ``workdir`` (for tests that start it themselves, e.g. to kill it)."""
    env = dict(os.environ if env is None else env, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               OMP_NUM_THREADS="1")
    # args (targets too) before --configfile, whose list would swallow a target after it
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args, "--configfile", *configfiles]
    return cmd, env


def snakemake(workdir, *args, configfiles=SMOKE, timeout=1800, env=None):
    """Run ``python -m snakemake`` on the repository's Snakefile in ``workdir``."""
    cmd, env = snakemake_command(workdir, *args, configfiles=configfiles, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def job_counts(output: str) -> dict[str, int]:
    """Rule -> job count from Snakemake's 'Job stats' table (of the last run in ``output``)."""
    lines = output[output.rindex("Job stats"):].splitlines()[3:]
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def read_tables(workdir):
    """File name -> bytes of every table a run wrote."""
    return {p.name: p.read_bytes() for p in sorted((Path(workdir) / "results" / "tables").glob("*"))}
