"""DVC as the storage layer under the Snakemake DAG: pull the recorded artifacts and let Snakemake adopt them.

Snakemake is the only orchestrator.  ``dvc.yaml`` wraps the whole DAG in one stage (``paper``) whose outs are
the artifact directories under ``results/``; ``dvc.lock`` records their hashes after a run (``dvc commit -f
paper``), ``dvc push`` / ``dvc pull`` move them through a remote.

The catch is modification times.  ``dvc pull`` writes every file with the time of the pull, in no particular
order, so a freshly pulled ``results/data/train.npz`` may be newer than the classifier trained on it and
Snakemake would retrain (its checksum shortcut for small files needs ``.snakemake/metadata``, which a fresh
clone does not have).  :func:`pull` therefore

1. checks that dvc, a ``dvc.lock`` and a remote are there (clear errors otherwise),
2. runs ``dvc pull``,
3. checks with ``dvc status`` that the workspace is exactly what ``dvc.lock`` records, including the stage's
   dependencies (workflow, package, config): artifacts recorded for other code are refused unless ``force``,
4. runs ``snakemake --touch``: no job runs; every job Snakemake would rerun only gets its outputs' mtimes set,
   in DAG order (directory outputs through their ``.snakemake_timestamp``), and its metadata recorded,
5. dry-runs Snakemake and reports whether anything is left to do (e.g. outputs that were not pulled).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

STAGE = "paper"
NOTHING_TO_DO = "Nothing to be done"


class ArtifactError(RuntimeError):
    """A DVC / Snakemake step of the artifact round trip failed; the message says what to do."""


def dvc_command() -> list[str]:
    """How to call dvc: the module in this interpreter, else a ``dvc`` next to it or on PATH."""
    if importlib.util.find_spec("dvc") is not None:
        return [sys.executable, "-m", "dvc"]
    exe = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")
    if exe:
        return [exe]
    raise ArtifactError("dvc is not installed in this environment: run `bash scripts/setup.sh` "
                        "(installs dvc into .venv) or `pip install 'dvc>=3.50'`")


def _env() -> dict[str, str]:
    return dict(os.environ, DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")


def run_dvc(repo: str | Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``dvc <args>`` in ``repo``; on failure raise :class:`ArtifactError` with dvc's own message."""
    r = subprocess.run([*dvc_command(), *args], cwd=repo, capture_output=True, text=True, env=_env())
    if check and r.returncode != 0:
        raise ArtifactError(f"`dvc {' '.join(args)}` failed (exit {r.returncode}) in {repo}:\n"
                            f"{(r.stderr or r.stdout).strip()}")
    return r


def check_repo(repo: str | Path) -> Path:
    """The repository root, after checking it is a DVC project with recorded artifacts."""
    repo = Path(repo).resolve()
    if not (repo / ".dvc").is_dir():
        raise ArtifactError(f"{repo} is not a DVC project (no .dvc/): run this from the repository root")
    if not (repo / "dvc.yaml").is_file():
        raise ArtifactError(f"{repo}/dvc.yaml is missing")
    if not (repo / "dvc.lock").is_file():
        raise ArtifactError(f"{repo}/dvc.lock is missing: no artifacts have been recorded yet (after a run: "
                            f"`dvc commit -f {STAGE}`, then `dvc push`; see docs/dvc.md)")
    return repo


def remotes(repo: str | Path) -> tuple[dict[str, str], str | None]:
    """(name -> url of every configured remote, name of the default remote or None).

    Read from ``dvc config --list`` (every level in order, later ones override; dvc prints relative
    local urls already resolved), not from ``dvc remote list``, whose table wraps long paths."""
    settings: dict[str, str] = {}
    for line in run_dvc(repo, "config", "--list").stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            settings[key.strip()] = value.strip()
    urls = {k[len("remote."):-len(".url")]: v for k, v in settings.items()
            if k.startswith("remote.") and k.endswith(".url")}
    return urls, settings.get("core.remote") or None


def check_remote(repo: str | Path, remote: str | None = None) -> tuple[str, str]:
    """(name, url) of the remote a pull would use; errors name the fix."""
    urls, default = remotes(repo)
    name = remote or default
    if name is None:
        raise ArtifactError("no DVC remote configured: `dvc remote add -d <name> <url>` (see docs/dvc.md)")
    if name not in urls:
        raise ArtifactError(f"DVC remote {name!r} is not configured (configured: {', '.join(urls) or 'none'})")
    url = urls[name]
    if "://" not in url and not Path(url).is_dir():
        raise ArtifactError(
            f"DVC remote {name!r} points to {url}, which does not exist on this machine: point it to the store "
            f"that holds the artifacts, e.g. `dvc remote modify --local {name} url /path/to/dvc-store` "
            f"(see docs/dvc.md)")
    return name, url


def status(repo: str | Path, *targets: str) -> dict:
    """``dvc status --json``: {} when the workspace (outs and deps) matches dvc.lock."""
    r = run_dvc(repo, "status", "--json", *targets)
    text = r.stdout.strip()
    return json.loads(text) if text else {}


def format_status(st: dict) -> str:
    lines = []
    for stage, changes in st.items():
        for change in changes if isinstance(changes, list) else [changes]:
            if isinstance(change, dict):
                for kind, paths in change.items():
                    items = paths.items() if isinstance(paths, dict) else [(paths, "")]
                    lines += [f"{stage}: {kind}: {p} {what}".rstrip() for p, what in items]
            else:
                lines.append(f"{stage}: {change}")
    return "\n".join(lines)


def snakemake_command(configfiles: Sequence[str] = (), cores: int = 1, snakefile: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores)]
    if snakefile:
        cmd += ["--snakefile", str(snakefile)]
    if configfiles:
        cmd += ["--configfile", *map(str, configfiles)]
    return cmd


def _snakemake(repo: Path, cmd: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, *args], cwd=repo, capture_output=True, text=True, env=_env())


def job_stats(dry_run: str) -> str:
    """The 'Job stats' table of a Snakemake dry run (what it would still run), or ''."""
    if "Job stats:" not in dry_run:
        return ""
    lines = dry_run[dry_run.index("Job stats:"):].splitlines()
    end = next((i for i, line in enumerate(lines) if line.split()[:1] == ["total"]), len(lines) - 1)
    return "\n".join(lines[:end + 1])


@dataclass
class PullReport:
    remote: str
    url: str
    status: dict = field(default_factory=dict)
    touched: list[str] = field(default_factory=list)
    up_to_date: bool = False
    dry_run: str = ""


def adopt(repo: str | Path, configfiles: Sequence[str] = (), snakefile: str | None = None) -> tuple[list[str], bool, str]:
    """``snakemake --touch`` then ``snakemake -n``: returns (touched rule names, nothing left to do, dry run).

    ``--touch`` only acts on jobs Snakemake would rerun: it sets their outputs' mtimes in DAG order and
    records their metadata, so the artifacts present are adopted as up to date.  It never runs a job.
    """
    repo = Path(repo).resolve()
    cmd = snakemake_command(configfiles, 1, snakefile)
    # --rerun-incomplete: outputs a killed run (or a failed touch) left marked incomplete have just been
    # replaced by the verified, recorded versions
    t = _snakemake(repo, cmd, "--touch", "--rerun-incomplete")
    if t.returncode != 0:
        raise ArtifactError(f"`snakemake --touch` failed in {repo}:\n{(t.stderr or t.stdout)[-3000:]}")
    log = t.stdout + t.stderr
    touched = sorted({line.split()[-1].rstrip(":") for line in log.splitlines()
                      if line.strip().startswith(("rule ", "localrule "))})
    d = _snakemake(repo, cmd, "-n")
    if d.returncode != 0:
        raise ArtifactError(f"`snakemake -n` failed in {repo}:\n{(d.stderr or d.stdout)[-3000:]}")
    out = d.stdout + d.stderr
    return touched, NOTHING_TO_DO in out, out


def pull(repo: str | Path = ".", remote: str | None = None, targets: Sequence[str] = (),
         configfiles: Sequence[str] = (), snakefile: str | None = None, force: bool = False,
         touch: bool = True) -> PullReport:
    """``dvc pull`` the recorded artifacts, check them against dvc.lock, let Snakemake adopt them."""
    repo = check_repo(repo)
    name, url = check_remote(repo, remote)
    args = ["pull", *(["-r", remote] if remote else []), *targets]
    run_dvc(repo, *args)
    st = status(repo, *targets)
    if st and not force:
        raise ArtifactError(
            "after the pull the workspace does not match dvc.lock, so the artifacts are not the ones recorded for "
            "this commit's workflow, package and config; not adopting them (rerun the DAG with `snakemake`, or "
            f"pass --force to adopt them anyway):\n{format_status(st)}")
    report = PullReport(remote=name, url=url, status=st)
    if touch:
        report.touched, report.up_to_date, report.dry_run = adopt(repo, configfiles, snakefile)
    return report
