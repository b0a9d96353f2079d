"""Warm workers (dbprepro.pipeline.workers): a job run in a reused process starts from a fresh process's
state and writes the same bytes; a worker that dies fails its own job only."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from snakemake.iocontainers import Namedlist

from dbprepro import pipeline
from dbprepro.pipeline import run as run_mod
from dbprepro.pipeline import workers

PARAMS = {"data": {"dataset": "digits", "test_fraction": 0.2, "split_seed": 5}, "seed": 11, "device": "cpu",
          "deterministic": True}


def _outputs(root):
    return {"train": f"{root}/data/train.npz", "test": f"{root}/data/test.npz", "manifest": f"{root}/data/split.json"}


def _args(root, log=None):
    return ("prepare_data", Namedlist(fromdict={}), Namedlist(fromdict=_outputs(root)), Namedlist(fromdict=PARAMS),
            Namedlist(fromdict={}), log, 1)


@pytest.fixture
def torch_state():
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.get_rng_state()
    yield
    torch.set_num_threads(saved[0])
    torch.use_deterministic_algorithms(saved[1])
    torch.set_rng_state(saved[2])


def test_a_job_restores_stderr_and_the_package_logger_and_logs_to_its_file(tmp_path, monkeypatch, torch_state):
    def stage(input, output, params, wildcards):
        logging.getLogger("dbprepro.test").info("logged")
        print("to stderr", file=sys.stderr)

    monkeypatch.setitem(pipeline.STAGES, "prepare_data", stage)
    monkeypatch.chdir(tmp_path)
    stderr, handlers = sys.stderr, list(logging.getLogger("dbprepro").handlers)
    run_mod.run_stage_here(*_args("r", log=str(tmp_path / "job.log")), started=0.0)
    assert sys.stderr is stderr and logging.getLogger("dbprepro").handlers == handlers
    text = (tmp_path / "job.log").read_text()
    assert "logged" in text and "to stderr" in text and "start-up" in text


def test_a_new_interpreter_seeds_torchs_generator_at_random():
    """Why a worker need not reset the global generator: no byte-identical output can depend on it."""
    draw = [subprocess.run([sys.executable, "-c", "import torch; print(torch.initial_seed())"], capture_output=True,
                           text=True, check=True).stdout for _ in range(2)]
    assert draw[0] != draw[1]


def test_a_warm_worker_serves_jobs_in_one_process_with_the_bytes_of_a_fresh_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pool = workers.Pool(1)
    pool.warm()  # the worker starts before the first job (Snakemake's onstart) and serves it
    try:
        pids = [pool.run(*_args(f"w{k}", log=str(tmp_path / f"w{k}.log"))) for k in range(2)]
    finally:
        pool.shutdown()
    fresh = workers.Pool(1, fresh=True)
    try:
        fresh_pid = fresh.run(*_args("f", log=str(tmp_path / "f.log")))
    finally:
        fresh.shutdown()
    assert pids[0] == pids[1] != fresh_pid  # one process served both jobs
    for name in ("train.npz", "test.npz", "split.json"):
        blobs = {(tmp_path / root / "data" / name).read_bytes() for root in ("w0", "w1", "f")}
        assert len(blobs) == 1, name
    rec = json.loads((tmp_path / "w1" / "provenance" / "prepare_data.json").read_text())
    assert rec["timing"]["worker_pid"] == pids[1] and rec["timing"]["peak_rss_mib"] > 0


def test_a_worker_that_dies_fails_its_own_job_and_the_next_job_gets_a_new_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DBPREPRO_FAULT", "prepare_data:crash")
    pool = workers.Pool(1)
    try:
        with pytest.raises(workers.WorkerDied, match="ended without a result"):
            pool.run(*_args("dead", log=str(tmp_path / "dead.log")))
        monkeypatch.delenv("DBPREPRO_FAULT")  # the new worker's environment has no fault
        pool.run(*_args("alive", log=str(tmp_path / "alive.log")))
    finally:
        pool.shutdown()
    assert not (tmp_path / "dead" / "data" / "split.json").exists()
    assert (tmp_path / "alive" / "data" / "split.json").exists()


def test_unknown_worker_mode_is_refused(monkeypatch):
    monkeypatch.setenv(workers.ENV, "threads")
    with pytest.raises(ValueError, match="DBPREPRO_WORKERS"):
        workers.mode()
