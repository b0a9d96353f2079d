"""Reliability (issue 8): atomic writes, provenance records, fault injection, and the DAG under a
SIGKILL and under a failing shard."""

import ast
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dbprepro import faults
from dbprepro.io import atomic_dir, atomic_path, remove_stale_temporaries, savez, write_parquet

SRC = Path(__file__).resolve().parents[1] / "src" / "dbprepro"


# -- atomic writes -----------------------------------------------------------------------------
def test_a_writer_that_dies_leaves_neither_a_final_nor_a_temporary_file(tmp_path):
    out = tmp_path / "sub" / "records.parquet"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"half a parquet file")
            raise RuntimeError("disk full")
    assert not out.exists() and list(out.parent.iterdir()) == []
    # an earlier complete version survives a failed rewrite untouched
    write_parquet(pd.DataFrame({"a": [1, 2]}), out)
    before = out.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"x")
            raise RuntimeError("killed")
    assert out.read_bytes() == before and [p.name for p in out.parent.iterdir()] == ["records.parquet"]


def test_atomic_dir_replaces_a_folder_only_when_complete(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").read_text() == "{}"
    with pytest.raises(ValueError):
        with atomic_dir(out) as tmp:
            (tmp / "weights").write_text("partial")
            raise ValueError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_save_diffusion_interrupted_leaves_no_model_folder(tmp_path, tiny_diffusion, monkeypatch):
    from dbprepro.models.diffusion import save_diffusion

    unet, scheduler = tiny_diffusion

    def dies(*a, **k):
        raise OSError("no space left on device")

    monkeypatch.setattr(type(scheduler), "save_pretrained", dies)  # after the UNet was written
    with pytest.raises(OSError):
        save_diffusion(unet, scheduler, tmp_path / "vanilla")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    out = tmp_path / "shard0.adv.npz"
    stale = tmp_path / ".shard0.adv.npz.4242.tmp"
    stale.write_bytes(b"partial")
    other = tmp_path / ".keep.npz.1.tmp"  # another output's temporary: not ours to remove
    other.write_bytes(b"x")
    assert remove_stale_temporaries([out]) == [stale]
    assert not stale.exists() and other.exists()
    savez(out, a=np.arange(3))
    assert np.load(out)["a"].tolist() == [0, 1, 2]


# writers that may appear outside dbprepro/io.py: their target must be the temporary of an
# atomic_path/atomic_dir block (a name starting with "tmp"), except these audited places
_WRITERS = {"to_parquet", "to_csv", "savez", "savez_compressed", "save_pretrained", "savefig", "save_file",
            "save", "write_text", "write_bytes", "to_markdown"}
_ALLOWED = {
    ("checkpoints.py", "download_url"),  # streams to a .tmp, verifies the sha256, then os.replace
    ("checkpoints.py", "download_url_unverified"),
    ("report.py", "run_estimate"),  # the CLI's optional --csv copy of a printed table, not a DAG output
    ("runtime.py", "job_logging"),  # appends to the job's log file (logs are not results)
    ("runtime.py", "peak_rss_reset"),  # writes /proc/self/clear_refs, not a file
}


def _target_name(call: ast.Call) -> str | None:
    args = list(call.args)
    if isinstance(call.func, ast.Attribute) and call.func.attr in ("write_text", "write_bytes"):
        node = call.func.value  # path.write_text(...): the path is the receiver
    elif isinstance(call.func, ast.Attribute) and call.func.attr == "save" and len(args) > 1:
        node = args[1]  # torch.save(obj, path)
    elif args:
        node = args[0]
    else:
        return None
    while isinstance(node, (ast.Call, ast.BinOp)):  # str(tmp / "x"), tmp / "unet"
        node = node.args[0] if isinstance(node, ast.Call) and node.args else getattr(node, "left", None)
    return node.id if isinstance(node, ast.Name) else None


def test_every_writer_in_the_package_writes_through_a_temporary():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "io.py":
            continue
        tree = ast.parse(path.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for call in [n for n in ast.walk(fn) if isinstance(n, ast.Call)]:
                name = call.func.attr if isinstance(call.func, ast.Attribute) else None
                if name == "open":
                    continue  # Image.open, gzip.open...: readers
                if isinstance(call.func, ast.Name) and call.func.id == "open":  # the builtin, for writing
                    mode = call.args[1] if len(call.args) > 1 else next(
                        (k.value for k in call.keywords if k.arg == "mode"), None)
                    if isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wax+"):
                        name = "open"
                if name not in _WRITERS | {"open"} or (path.name, fn.name) in _ALLOWED:
                    continue
                if name == "save" and not (isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"):
                    continue  # only torch.save among the many .save methods
                if name == "to_markdown" or (name == "savez" and isinstance(call.func.value, ast.Name)
                                             and call.func.value.id != "np"):
                    continue  # returns a string / our own io.savez
                if name == "to_csv" and not call.args and not any(k.arg == "path_or_buf" for k in call.keywords):
                    continue  # frame.to_csv(index=False): no path, returns the text
                target = _target_name(call)
                if not (target and target.startswith("tmp")):
                    offenders.append(f"{path.relative_to(SRC)}:{call.lineno} {fn.name}: {name}({target})")
    assert not offenders, "writers not going through dbprepro.io.atomic_path/atomic_dir:\n" + "\n".join(offenders)


# -- fault injection ------------------------------------------------------------------------------
def test_fault_spec_parsing_and_errors(monkeypatch):
    assert faults.parse("attack:shard=1,setting=dwbox:oom; train_addt:hang") == [
        ("attack", {"shard": "1", "setting": "dwbox"}, "oom"), ("train_addt", {}, "hang")]
    for bad, msg in (("attack:shard=1:explode", "unknown action"), ("attack", "expected"),
                     ("attack:shard:oom", "wildcard")):
        with pytest.raises(ValueError, match=msg):
            faults.parse(bad)
    monkeypatch.setenv(faults.ENV, "attack:shard=1:oom")
    faults.arm("attack", {"shard": "0"})  # another shard: nothing happens
    with pytest.raises(MemoryError, match="simulated out of memory"):
        faults.arm("attack", {"shard": 1, "defense": "vanilla"})
    monkeypatch.delenv(faults.ENV)
    faults.arm("attack", {"shard": 1})


# -- provenance of a stage run ------------------------------------------------------------------------
def _smk(rule, output, params, log=()):
    from snakemake.iocontainers import Namedlist

    class Smk:
        pass

    s = Smk()
    s.rule, s.threads = rule, 1
    s.input, s.wildcards = Namedlist(fromdict={}), Namedlist(fromdict={})
    s.output, s.params = Namedlist(fromdict=output), Namedlist(fromdict=params)
    s.log = list(log)
    return s


@pytest.fixture
def torch_state():
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(saved[0])
    torch.use_deterministic_algorithms(saved[1])


def test_stage_run_writes_a_provenance_record_beside_the_results(tmp_path, monkeypatch, torch_state):
    from dbprepro import pipeline

    monkeypatch.chdir(tmp_path)
    out = {"train": "results/data/train.npz", "test": "results/data/test.npz", "manifest": "results/data/split.json"}
    params = {"data": {"dataset": "digits", "test_fraction": 0.2, "split_seed": 5}, "seed": 11,
              "device": "cpu", "deterministic": True}
    stale = tmp_path / "results" / "data" / ".train.npz.999.tmp"  # left by a killed attempt
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    pipeline.run_stage(_smk("prepare_data", out, params))
    assert not stale.exists()
    rec_path = tmp_path / "results" / "provenance" / "prepare_data.json"
    rec = json.loads(rec_path.read_text())
    assert rec["rule"] == "prepare_data" and rec["seed"] == 11 and rec["params"]["data"]["split_seed"] == 5
    rt = rec["runtime"]
    assert rt["threads"] == 1 and rt["deterministic_algorithms"] is True and rt["tf32"] is False
    assert rt["cudnn_benchmark"] is False and rt["torch"] == torch.__version__
    assert rt["versions"]["numpy"] == np.__version__ and "snakemake" in rt["versions"]
    assert "OMP_NUM_THREADS" in rt["env"]
    from dbprepro.io import sha256_file

    for p in out.values():  # the record names the exact bytes of every output
        assert rec["outputs"][p] == sha256_file(tmp_path / p)
    # only the outputs and the record were written into results/
    written = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "results").rglob("*") if p.is_file())
    assert written == sorted([*out.values(), "results/provenance/prepare_data.json"])

    # a failing rerun removes the record (it would describe outputs that are no longer valid) and
    # logs the failure with its traceback
    monkeypatch.setenv(faults.ENV, "prepare_data:oom")
    with pytest.raises(MemoryError):
        pipeline.run_stage(_smk("prepare_data", out, params))
    assert not rec_path.exists()


def test_provenance_path_of_a_job_with_wildcards():
    from dbprepro.runtime import provenance_path

    p = provenance_path("attack", {"defense": "vanilla", "shard": 1}, ["results/attacks/x/shard1.records.parquet"])
    assert p == Path("results/provenance/attack/defense=vanilla,shard=1.json")


# -- the DAG: SIGKILL mid-way, and a failing shard -----------------------------------------------------
RUN = "results/attacks/vanilla/linf/dwbox/pgd"  # 2 shards (1 and 2 batches: dwbox_n_images 24) in the smoke config
SHARD_FILES = ("records.parquet", "trace.parquet", "paths.npz", "adv.npz")


def _without_the_attack_run(smoke_run, tmp_path) -> Path:
    """A copy of the finished smoke run (metadata included) without one attack run's outputs:
    what is left to do is its two shard jobs and their merge."""
    import shutil

    work = tmp_path / "run"
    shutil.copytree(smoke_run, work, symlinks=True)
    shutil.rmtree(work / RUN)
    for rec in (work / "results" / "provenance").glob("*attack/*setting=dwbox,attack=pgd*"):
        if "defense=vanilla,threat=linf" in rec.name:
            rec.unlink()
    return work


def _assert_same_as_uninterrupted(work, smoke_run):
    for name in ("records.parquet", "trace.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(work / RUN / name), pd.read_parquet(smoke_run / RUN / name),
                                      check_exact=True)
    for name in ("adv.npz", "paths.npz"):
        with np.load(work / RUN / name) as a, np.load(smoke_run / RUN / name) as b:
            assert sorted(a.files) == sorted(b.files)
            for k in a.files:
                assert np.array_equal(a[k], b[k]), (name, k)


def _job_processes(work: Path) -> list[int]:
    """Pids of live processes whose working directory is ``work`` (the run's jobs)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if Path(os.readlink(proc / "cwd")) == work:
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _wait_for(condition, timeout: float, what: str, proc=None, log=None) -> None:
    """Poll ``condition`` (an event in files the run writes) until true, else fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"snakemake exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:] if log else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{log.read_text()[-4000:] if log else ''}")
        time.sleep(0.2)


@pytest.mark.slow
def test_sigkill_mid_attack_then_rerun_finishes_identically_without_redoing_shards(smoke_run, tmp_path):
    from smoke import ROOT, job_counts, snakemake, snakemake_command

    work = _without_the_attack_run(smoke_run, tmp_path)
    target = f"{RUN}/records.parquet"
    # shard 1 writes its first output, then hangs: a job killed half-way through its outputs
    cmd, env = snakemake_command(work, target)
    env[faults.ENV] = "attack:defense=vanilla,setting=dwbox,shard=1:hang"
    log = tmp_path / "snakemake.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    try:
        shard = work / RUN
        # shard 0 done (Snakemake reports its first finished step; shard 1 cannot finish) and shard 1 half-written
        _wait_for(lambda: (shard / "shard1.records.parquet").exists() and "1 of 3 steps" in log.read_text(),
                  timeout=600, what="shard 0 to finish and shard 1 to hang", proc=proc, log=log)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and its jobs, as when a node goes away
        except ProcessLookupError:  # it had exited already (the wait above failed)
            pass
        proc.wait()
    _wait_for(lambda: not _job_processes(work), timeout=30, what="the killed jobs to disappear")
    assert (shard / "shard1.records.parquet").exists() and not (shard / "shard1.adv.npz").exists()
    assert not (shard / "records.parquet").exists()
    assert not (work / "results" / "provenance" / "attack" /
                "defense=vanilla,threat=linf,setting=dwbox,attack=pgd,shard=1.json").exists()
    done = {f: (shard / f"shard0.{f}").stat().st_mtime_ns for f in SHARD_FILES}

    # shard 1's half-written output is not taken as complete: a plain rerun stops and names it ...
    r = snakemake(work, target)
    assert r.returncode != 0 and "IncompleteFilesException" in r.stderr, r.stdout[-3000:] + r.stderr[-5000:]
    assert f"{RUN}/shard1.records.parquet" in r.stderr and "--rerun-incomplete" in r.stderr
    # ... and after `--unlock` (the killed run's lock is left behind) the rerun it asks for redoes
    # shard 1 only, keeping shard 0
    r = snakemake(work, "--unlock")
    assert r.returncode == 0, r.stderr[-3000:]
    r = snakemake(work, "--rerun-incomplete", target)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    jobs = job_counts(r.stdout + r.stderr)
    assert jobs == {"attack": 1, "merge_attack": 1}, jobs
    assert {f: (shard / f"shard0.{f}").stat().st_mtime_ns for f in SHARD_FILES} == done
    _assert_same_as_uninterrupted(work, smoke_run)
    assert not list(shard.glob(".*.tmp"))
    rec = json.loads((work / "results" / "provenance" / "attack" /
                      "defense=vanilla,threat=linf,setting=dwbox,attack=pgd,shard=1.json").read_text())
    assert rec["runtime"]["threads"] == 1 and rec["runtime"]["deterministic_algorithms"] is True
    assert rec["seed"] == 0 and rec["wildcards"]["shard"] == "1"
    from dbprepro.io import sha256_file

    assert rec["outputs"][f"{RUN}/shard1.adv.npz"] == sha256_file(shard / "shard1.adv.npz")


@pytest.mark.slow
def test_a_shard_out_of_memory_fails_loudly_others_continue_and_rerun_completes_only_it(smoke_run, tmp_path):
    from smoke import job_counts, snakemake

    work = _without_the_attack_run(smoke_run, tmp_path)
    target = f"{RUN}/records.parquet"
    env = dict(os.environ, **{faults.ENV: "attack:defense=vanilla,setting=dwbox,shard=1:oom"})
    r = snakemake(work, "--keep-going", target, env=env)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    # loud: the failing job is named and its log is shown, with the error and its traceback
    assert "Error in rule attack" in out and "shard1.log" in out
    assert "simulated out of memory" in out and "Traceback" in out and "FAILED" in out
    shard = work / RUN
    assert all((shard / f"shard0.{f}").exists() for f in SHARD_FILES)  # the other shard went on
    assert not any((shard / f"shard1.{f}").exists() for f in SHARD_FILES)
    assert not (shard / "records.parquet").exists()
    done = {f: (shard / f"shard0.{f}").stat().st_mtime_ns for f in SHARD_FILES}

    r = snakemake(work, target)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert job_counts(r.stdout + r.stderr) == {"attack": 1, "merge_attack": 1}
    assert {f: (shard / f"shard0.{f}").stat().st_mtime_ns for f in SHARD_FILES} == done
    _assert_same_as_uninterrupted(work, smoke_run)
