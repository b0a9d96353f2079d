"""DVC round trip on the smoke run: record (dvc commit), push, fresh clone, pull, adopt, nothing to rebuild.

No job runs here: the artifacts come from the shared ``smoke_run`` fixture, and adoption is
``snakemake --touch`` (the test checks that a dry run afterwards has nothing to do).
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from dbprepro.artifacts import ArtifactError, pull, run_dvc, status
from dbprepro.cli import main
from smoke import ROOT, snakemake

pytestmark = pytest.mark.slow

# the DVC set-up of the project (also before it is committed)
DVC_FILES = ["dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore"]
SMOKE_CONFIGS = ["config.yaml", "config/smoke.yaml"]
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org", "-c", "init.defaultBranch=main",
       "-c", "commit.gpgsign=false"]


def git(repo, *args):
    r = subprocess.run([*GIT, *args], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def dvc_outs():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["paper"]
    return {next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]}


def artifact_files(repo):
    """Relative path -> bytes of every file in the dvc.yaml outs (Snakemake's timestamps excluded)."""
    return {str(p.relative_to(repo)): p.read_bytes() for out in sorted(dvc_outs())
            for p in sorted((Path(repo) / out).rglob("*")) if p.is_file() and p.name != ".snakemake_timestamp"}


def dry_run(repo):
    r = snakemake(repo, "-n", configfiles=[str(Path(repo) / c) for c in SMOKE_CONFIGS])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def origin(smoke_run, tmp_path_factory):
    """A git + DVC repository holding the project's workflow and the smoke run's artifacts, recorded in
    dvc.lock (`dvc commit`) and pushed to the default remote (dvc-store/ inside the repository)."""
    repo = tmp_path_factory.mktemp("dvc") / "origin"
    repo.mkdir()
    # the project as the smoke run saw it: the working tree's files that git tracks or does not ignore,
    # plus the DVC set-up.  Snakemake needs more than the stage's deps, e.g. envs/ to record job metadata.
    tracked = git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for name in sorted({*filter(None, tracked), *DVC_FILES}):
        src, dst = ROOT / name, repo / name
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    shutil.copytree(smoke_run / "results", repo / "results", ignore=shutil.ignore_patterns(".snakemake_timestamp"))
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "workflow")
    run_dvc(repo, "commit", "-f", "paper")  # what the lead runs after the default DAG
    assert status(repo) == {}  # dvc status is clean after a run + commit
    git(repo, "add", "dvc.lock")
    git(repo, "commit", "-q", "-m", "dvc.lock")
    run_dvc(repo, "push")
    return repo


def test_every_results_directory_is_a_dvc_out(smoke_run):
    """A directory the DAG writes but dvc.yaml does not version would be missing after a pull, and
    Snakemake would rebuild it: new result folders must be added to dvc.yaml."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["paper"]
    outs = dvc_outs()
    written = {f"results/{p.name}" for p in (smoke_run / "results").iterdir() if p.is_dir()}
    assert written - outs <= {"results/checkpoints"}, "add to dvc.yaml: " + ", ".join(sorted(written - outs))
    assert all(isinstance(o, dict) and all(v and v.get("persist") for v in o.values()) for o in stage["outs"]), \
        "every out needs persist: true (dvc repro would otherwise delete it before running Snakemake)"


def test_lock_records_every_artifact_directory(origin):
    lock = (origin / "dvc.lock").read_text()
    for out in ("results/data", "results/models", "results/attacks", "results/tables"):
        assert f"path: {out}\n" in lock
    assert "md5: " in lock and ".dir" in lock  # directory outs: hash of the listing of file hashes
    store = origin / "dvc-store" / "files" / "md5"  # default remote: the repository's own dvc-store/
    assert store.is_dir() and sum(1 for p in store.rglob("*") if p.is_file()) > 10


def test_pull_into_a_fresh_clone_rebuilds_nothing(origin, tmp_path, capsys):
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(origin), str(clone))
    assert not (clone / "results").exists() and not (clone / ".snakemake").exists()

    # the committed default remote is repository-relative: in the clone it names the clone's own (empty)
    # store, and the command says how to point it at the real one
    with pytest.raises(ArtifactError, match="dvc remote modify --local localstore url"):
        pull(clone, configfiles=SMOKE_CONFIGS)
    run_dvc(clone, "remote", "modify", "--local", "localstore", "url", str(origin / "dvc-store"))

    # a plain dvc pull leaves fresh mtimes in arbitrary order; make the worst case explicit: the data split
    # newer than everything trained on it.  Snakemake would then retrain the models.
    pull(clone, touch=False)
    later = time.time() + 5
    for f in (clone / "results" / "data").iterdir():
        os.utime(f, (later, later))
    assert "train_classifier" in dry_run(clone)

    # the command: dvc pull + dvc status + snakemake --touch + dry run
    assert main(["pull", "--repo", str(clone), "--configfile", *SMOKE_CONFIGS]) == 0
    out = capsys.readouterr().out
    assert "artifacts match dvc.lock" in out and "nothing to be done" in out
    assert "Nothing to be done" in dry_run(clone)  # no retraining after a pull
    assert status(clone) == {}  # the touch changed mtimes only; .snakemake_timestamp is dvc-ignored
    pulled = artifact_files(clone)
    assert len(pulled) > 50 and pulled == artifact_files(origin)  # byte-identical

    # negative checks: the verification can fail
    cfg = clone / "config.yaml"
    original = cfg.read_text()
    cfg.write_text(original + "\n# edited\n")  # a stage dependency changed since dvc.lock was recorded
    with pytest.raises(ArtifactError, match="config.yaml"):
        pull(clone, configfiles=SMOKE_CONFIGS)
    cfg.write_text(original)
    assert status(clone) == {}

    model = next(p for p in sorted((clone / "results" / "models").rglob("*.safetensors")))
    model.write_bytes(model.read_bytes() + b"\0")  # a corrupted artifact
    st = status(clone)
    assert "results/models" in str(st) and "modified" in str(st), st


def test_clear_errors_without_lock_or_remote(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    run_dvc(repo, "init", "-q")
    (repo / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(ArtifactError, match="dvc.lock is missing"):
        pull(repo)
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    with pytest.raises(ArtifactError, match="no DVC remote configured"):
        pull(repo)
    with pytest.raises(ArtifactError, match="not a DVC project"):
        pull(tmp_path)
    assert main(["pull", "--repo", str(repo)]) == 2


def test_status_and_job_stats_formatting():
    from dbprepro.artifacts import format_status, job_stats

    st = {"paper": [{"changed deps": {"config.yaml": "modified"}}, {"changed outs": {"results/models": "modified"}}]}
    assert format_status(st) == "paper: changed deps: config.yaml modified\npaper: changed outs: results/models modified"
    dry = "Building DAG of jobs...\nJob stats:\njob      count\n-----  -------\nall          1\ntotal        1\n\nReasons:\n"
    assert job_stats(dry).splitlines()[-1].split() == ["total", "1"] and "Reasons" not in job_stats(dry)
    assert job_stats("Nothing to be done (all requested files are present and up to date).") == ""
