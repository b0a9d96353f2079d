"""How a stage runs: logging, torch set-up, stale temporaries, fault injection and provenance
around the stage function, in a job's own process (:func:`run_stage`) or inside Snakemake's
(:func:`run_stage_inline`, the light stages).

Heavy stages run through :func:`run_stage_here` (from :mod:`dbprepro.pipeline.workers`), or
:func:`run_stage` for a ``script:`` rule of one's own workflow (Snakemake's ``snakemake`` object); the
rule's name selects the stage.  Stages read settings only from ``params`` (never from the whole
config), so Snakemake's params trigger reruns exactly the jobs a changed setting affects.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("dbprepro.pipeline")

STAGES: dict[str, Callable[..., None]] = {}


def stage(fn: Callable[..., None]) -> Callable[..., None]:
    STAGES[fn.__name__] = fn
    return fn


def stage_name(rule: str) -> str:
    """The stage of a rule: a replicate seed's copy of a rule (``replicate_seed<S>__<rule>``,
    workflow/rules/replicates.smk) runs the stage of ``<rule>``."""
    head, sep, tail = rule.partition("__")
    return tail if sep and head.startswith("replicate_seed") else rule


def run_stage(smk: Any) -> None:
    """Run the stage of a ``script:`` rule (a script that calls ``run_stage(snakemake)``): this process is
    the job's own; its start-up counts from the process's creation."""
    created = time.time() - process_age()
    run_stage_here(smk.rule, smk.input, smk.output, smk.params, smk.wildcards, smk.log[0] if smk.log else None,
                   smk.threads, started=created)


def run_stage_here(rule: str, input, output, params, wildcards, logfile, threads, started: float,
                   worker: int | None = None) -> None:
    """Run a heavy stage in this process as a job of its own: logging to ``logfile``, the job's torch
    threads and determinism flags, then the stage.

    Around every stage (also the in-process light ones, :func:`run_stage_inline`): temporaries that a
    killed earlier attempt left beside the outputs are removed, a failure is logged with its
    traceback before it propagates (Snakemake shows the log), and on success a provenance record
    is written to ``results/provenance/<rule>/<wildcards>.json`` (see
    :func:`dbprepro.runtime.write_job_provenance`).  ``started``: when the job's process was created
    or (a warm worker, :mod:`dbprepro.pipeline.workers`) the job was handed to it; everything until
    the stage's first line is the job's start-up."""
    from ..runtime import IMPORTS, configure_torch, job_logging, peak_rss_reset, provenance

    name = stage_name(rule)
    if name not in STAGES:
        raise KeyError(f"no dbprepro stage for rule {name!r}; known: {', '.join(sorted(STAGES))}")
    with job_logging(logfile):
        configure_torch(threads=threads, deterministic=params.get("deterministic", True))
        where = f" (warm worker pid {worker})" if worker else ""
        log.info("stage %s: wildcards %s%s", name, dict(wildcards), where)
        log.info("provenance %s", json.dumps(provenance(), sort_keys=True))
        IMPORTS.install()  # the stage's own (lazy) imports are timed apart from its compute
        peak_rss_reset()
        startup = max(0.0, time.time() - started)
        log.info("start-up %.2f s to the stage's code", startup)
        _run_job(name, input, output, params, wildcards, in_process=False, startup=startup, worker=worker)


#: modules whose import dominates a job's start-up (recorded per job: which ones the job imported)
HEAVY_MODULES = ("torch", "torch._dynamo", "diffusers", "scipy.stats", "sklearn", "matplotlib", "seaborn", "pandas",
                 "pyarrow", "torchattacks")


def process_age() -> float:
    """Seconds since this process started (Linux: psutil's create time)."""
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())


def _run_job(name: str, input, output, params, wildcards, in_process: bool, startup: float = 0.0,
             worker: int | None = None) -> None:
    from .. import faults
    from ..io import remove_stale_temporaries
    from ..runtime import IMPORTS, LOADS, peak_rss_mib, provenance_path, write_job_provenance

    record = provenance_path(name, wildcards, output)
    record.unlink(missing_ok=True)  # a record present always describes the outputs present
    for stale in remove_stale_temporaries(list(output)):
        log.info("removed %s, left by an interrupted earlier attempt", stale)
    loads_before, imports_before = LOADS.seconds, IMPORTS.seconds
    started, t0 = time.time(), time.perf_counter()
    try:
        faults.arm(name, dict(wildcards))  # test-only fault injection (DBPREPRO_FAULT), else nothing
        STAGES[name](input, output, params, wildcards)
    except BaseException as e:
        log.exception("stage %s FAILED after %.1f s (wildcards %s): %s: %s", name, time.perf_counter() - t0,
                      dict(wildcards), type(e).__name__, e)
        raise
    seconds = time.perf_counter() - t0
    timing = dict(startup_seconds=round(startup, 3), load_seconds=round(LOADS.seconds - loads_before, 3),
                  import_seconds=round(IMPORTS.seconds - imports_before, 3) if IMPORTS.installed else 0.0,
                  heavy_modules=[m for m in HEAVY_MODULES if m in sys.modules] if not in_process else [])
    if not in_process:
        timing.update(worker_pid=worker, peak_rss_mib=peak_rss_mib())
    write_job_provenance(record, rule=name, wildcards=wildcards, params=params, inputs=input, outputs=output,
                         started=started, seconds=seconds, in_process=in_process, timing=timing)
    log.info("stage %s finished in %.1f s; provenance in %s", name, seconds, record)


def stage_device(params) -> "torch.device":  # noqa: F821
    from ..runtime import resolve_device

    return resolve_device(params.get("device", "auto"))


# Light stages (merges, tables, figures) run in the Snakemake process itself when Snakemake runs
# `run:` jobs in threads (profiles/default sets force-use-threads; without it Snakemake spawns a
# fresh `python -m snakemake` per `run:` job, ~10 s of start-up and imports for ~1 s of work).
# One lock serialises them: pyplot's figure registry and the shared "dbprepro" log handler are
# process-wide, and every light stage takes a second or two.
_INLINE_LOCK = threading.Lock()


def run_stage_inline(name: str, input, output, params, wildcards, logfiles) -> None:
    """Run a light stage in the calling (Snakemake) process, logging to the rule's log file
    without touching the process-wide logging or torch settings; one at a time (see
    ``_INLINE_LOCK``)."""
    name = stage_name(name)
    if name not in STAGES:
        raise KeyError(f"no dbprepro stage for rule {name!r}")
    with _INLINE_LOCK:
        _run_inline(name, input, output, params, wildcards, logfiles)


def _run_inline(name: str, input, output, params, wildcards, logfiles) -> None:
    logfile = logfiles[0] if logfiles else None
    handler = logging.FileHandler(logfile, mode="a") if logfile else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("dbprepro")
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.INFO)
    try:
        log.info("stage %s (in-process): wildcards %s", name, dict(wildcards))
        _run_job(name, input, output, params, wildcards, in_process=True)
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
        handler.close()
