"""Running the DAG from tests: one helper for every test that calls Snakemake."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = [str(ROOT / "config.yaml"), str(ROOT / "config" / "smoke.yaml")]


def snakemake(workdir, *args, configfiles=SMOKE, timeout=1800, env=None):
    """Run ``python -m snakemake`` on the repository's Snakefile in ``workdir``."""
    env = dict(os.environ if env is None else env, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", "--configfile", *configfiles, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def read_tables(workdir):
    """File name -> bytes of every table a run wrote."""
    return {p.name: p.read_bytes() for p in sorted((Path(workdir) / "results" / "tables").glob("*"))}
