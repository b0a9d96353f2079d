"""Warm workers: the heavy stages of a local run in long-lived processes instead of one process per job.

A heavy job run through Snakemake's ``script:`` directive paid, before its first line of stage code,
Snakemake's script set-up, a new interpreter that unpickles Snakemake's job object, the imports of
torch and diffusers (diffusers imports ``torch._dynamo`` at module level) and the first call of the
provenance probe; and after its last line, the process's exit.  ``docs/performance.md`` gives the
measured share.  Here the Snakemake process that schedules a local run hands each heavy job to one
of ``cores`` worker processes that imported all of that once (:func:`run_heavy`).  Every job is still
its own Snakemake target with its own log, provenance record and resources, and Snakemake still
decides what runs when.

Each job starts from the state that a fresh process would give its outputs:

- torch's default generator: a new interpreter seeds it at random (torch 2.13), so no stage's output
  can depend on it, and a worker leaves it as the previous job left it;
- threads and determinism flags come from the job (:func:`dbprepro.runtime.configure_torch`);
- logging and ``sys.stderr`` go to the job's log and are restored afterwards;
- fault injection (``DBPREPRO_FAULT``) is armed per job, as in a job's own process.

The outputs are byte-identical with one process per job: ``tests/test_slurm.py`` compares the smoke
DAG run locally (warm workers) with every kind of its heavy jobs submitted job by job through sbatch.

Where: only in the Snakemake process that schedules a local run.  A cluster job (``slurm``) is a
Snakemake process of its own on its node and runs its stage in that process; so does a ``run:`` job
that Snakemake spawns as a subprocess (no ``force-use-threads``).  ``DBPREPRO_WORKERS=fresh`` gives
each heavy job a new worker process (one process per job, as without the pool); ``off`` runs it in
the calling process.

Each worker is a one-process pool of its own, so a worker that dies (killed, out of memory) fails its
own job only; the next job gets a new worker.  A worker exits when the Snakemake process that
started it is gone.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import queue
import threading
import time

ENV = "DBPREPRO_WORKERS"
MODES = ("warm", "fresh", "off")


def mode() -> str:
    value = os.environ.get(ENV, "warm").strip().lower() or "warm"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


class WorkerDied(RuntimeError):
    """The worker process running a job ended without a result (killed, out of memory)."""


def _watch_parent(parent: int) -> None:
    while True:  # reparented: the Snakemake process that started this worker is gone
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(1.0)


def _initialise(parent: int) -> None:
    """A worker's start: the heavy imports once, and the parent watch."""
    import diffusers  # noqa: F401 - the import every job would pay (torch._dynamo)

    from .. import runtime  # noqa: F401
    from . import STAGES  # noqa: F401 - registers every stage

    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="parent-watch").start()


def _job(name: str, input, output, params, wildcards, logfile, threads: int, submitted: float) -> int:
    """Run one job in a worker (:func:`dbprepro.pipeline.run.run_stage_here`: the state of a fresh
    process, the stage, logging restored), then give the freed heap back."""
    from .run import run_stage_here

    try:
        run_stage_here(name, input, output, params, wildcards, logfile, threads, started=submitted,
                       worker=os.getpid())
    finally:
        _trim_heap()
    return os.getpid()


def _trim_heap() -> None:
    """Give freed heap back to the system after a job (glibc only), so a worker's resident
    memory between jobs stays near its imports' and does not carry one job's peak into the next."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Pool:
    """``size`` single-process pools, one per concurrently running heavy job."""

    def __init__(self, size: int, fresh: bool = False):
        self.size, self.fresh = max(1, int(size)), fresh
        # last in, first out: a job takes the worker that finished last, a started one before an empty slot
        self._free: queue.LifoQueue = queue.LifoQueue()
        for _ in range(self.size):
            self._free.put(None)  # a slot; its worker starts on first use (or on warm())
        self._context = multiprocessing.get_context("spawn")

    def warm(self) -> None:
        """Start every slot's worker now, in the background (their imports overlap Snakemake's start)."""
        slots = [self._free.get() for _ in range(self.size)]
        for k, executor in enumerate(slots):
            if executor is None:
                executor = slots[k] = self._new()
                executor.submit(int)  # spawns the process and runs its initializer
        for executor in slots:
            self._free.put(executor)

    def _new(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(max_workers=1, mp_context=self._context, initializer=_initialise,
                                      initargs=(os.getpid(),), max_tasks_per_child=1 if self.fresh else None)

    def run(self, *args) -> int:
        executor = self._free.get()  # Snakemake runs at most `cores` jobs, so a slot is free
        if executor is None:
            executor = self._new()
        try:
            return executor.submit(_job, *args, time.time()).result()
        except cf.process.BrokenProcessPool as e:
            executor.shutdown(wait=False, cancel_futures=True)
            executor = None
            raise WorkerDied(f"the worker process running stage {args[0]} ended without a result (killed or out of "
                             f"memory); see its log {args[5]}") from e
        finally:
            self._free.put(executor)

    def shutdown(self) -> None:
        while True:
            try:
                executor = self._free.get_nowait()
            except queue.Empty:
                return
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)


_POOL: Pool | None = None
_POOL_LOCK = threading.Lock()


def pool(size: int) -> Pool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = Pool(size, fresh=mode() == "fresh")
        return _POOL


def warm(cores: int | None, local_scheduler: bool) -> None:
    """Start the warm workers before the first job (Snakemake's ``onstart``) in the process that
    schedules a local run; elsewhere nothing."""
    if local_scheduler and mode() != "off":
        pool(cores or os.cpu_count() or 1).warm()


def run_heavy(name: str, input, output, params, wildcards, logfiles, threads: int, cores: int | None,
              local_scheduler: bool) -> None:
    """Run a heavy stage for a Snakemake ``run:`` job.  ``local_scheduler``: this is the Snakemake
    process that schedules a local run (warm workers); otherwise (a cluster job, a spawned
    ``run:`` subprocess) the stage runs here, in the job's own process."""
    from snakemake.iocontainers import Namedlist

    logfile = logfiles[0] if logfiles else None
    plain = (Namedlist(toclone=input, plainstr=True), Namedlist(toclone=output, plainstr=True),
             Namedlist(toclone=params), Namedlist(toclone=wildcards))
    if not local_scheduler or mode() == "off":
        from .run import run_stage_here

        run_stage_here(name, *plain, logfile, threads, started=time.time())
        return
    pool(cores or os.cpu_count() or 1).run(name, *plain, logfile, int(threads))
