"""Fault injection for the reliability tests (never set in a real run).

``DBPREPRO_FAULT`` names jobs of the DAG and what goes wrong in them::

    DBPREPRO_FAULT="<rule>[:<wildcard>=<value>,...]:<action>[;...]"

    DBPREPRO_FAULT="attack:shard=1:oom"              # every attack job of shard 1 runs out of memory
    DBPREPRO_FAULT="attack:setting=dwbox,shard=1:hang"
    DBPREPRO_FAULT="attack:shard=1:crash"

Actions:

``oom``
    the stage raises :class:`MemoryError` ("simulated out of memory") right after its start-up,
    like a GPU or host OOM in that one job: the job fails, Snakemake shows its log, other jobs
    continue under ``--keep-going``.
``crash``
    the job's process ends at once (``os._exit(137)``, the exit code of a SIGKILL), like a job killed by
    the kernel's out-of-memory killer: no exception, no traceback, no result.
``hang``
    the job writes its first output file (through :mod:`dbprepro.io`) and then stops making
    progress (sleeps up to :data:`HANG_SECONDS`, then fails), leaving a job that is half done, to
    be killed from outside (SIGKILL of Snakemake in ``tests/test_reliability.py``).

A selector matches a job when the rule name is equal and every given wildcard has the given
value.  :func:`arm` is called by ``pipeline.run_stage`` for every job; without the variable nothing
happens.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

ENV = "DBPREPRO_FAULT"
ACTIONS = ("oom", "hang", "crash")
HANG_SECONDS = 600.0

log = logging.getLogger(__name__)

_armed: set[str] = set()  # actions active in this process (set by arm())


def parse(spec: str) -> list[tuple[str, dict[str, str], str]]:
    """``[(rule, {wildcard: value}, action), ...]`` of a ``DBPREPRO_FAULT`` value."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or not parts[0]:
            raise ValueError(f"{ENV}={spec!r}: expected '<rule>[:<wildcard>=<value>,...]:<action>', got {item!r}")
        rule, action = parts[0], parts[-1]
        if action not in ACTIONS:
            raise ValueError(f"{ENV}={spec!r}: unknown action {action!r}; known: {', '.join(ACTIONS)}")
        wildcards = {}
        if len(parts) == 3:
            for kv in filter(None, parts[1].split(",")):
                key, sep, value = kv.partition("=")
                if not sep:
                    raise ValueError(f"{ENV}={spec!r}: expected <wildcard>=<value>, got {kv!r}")
                wildcards[key.strip()] = value.strip()
        out.append((rule, wildcards, action))
    return out


def arm(rule: str, wildcards: dict) -> None:
    """Activate the faults ``DBPREPRO_FAULT`` selects for this job; ``oom`` raises at once."""
    _armed.clear()
    spec = os.environ.get(ENV, "")
    if not spec:
        return
    wc = {k: str(v) for k, v in dict(wildcards).items()}
    for r, sel, action in parse(spec):
        if r == rule and all(wc.get(k) == v for k, v in sel.items()):
            _armed.add(action)
    if not _armed:
        return
    log.warning("%s=%r: injecting %s into this job (a test run)", ENV, spec, ", ".join(sorted(_armed)))
    if "oom" in _armed:
        raise MemoryError(f"simulated out of memory in rule {rule} {wc} ({ENV}={spec!r})")
    if "crash" in _armed:
        for h in logging.getLogger("dbprepro").handlers:
            h.flush()
        os._exit(137)


def after_write(path: Path) -> None:
    """Called by :mod:`dbprepro.io` after each committed output file."""
    if "hang" not in _armed:
        return
    _armed.discard("hang")
    log.warning("%s: %s written; hanging (a half-finished job) until killed", ENV, path)
    for h in logging.getLogger().handlers:
        h.flush()
    time.sleep(HANG_SECONDS)
    raise RuntimeError(f"{ENV}: job hung for {HANG_SECONDS} s without being killed")
