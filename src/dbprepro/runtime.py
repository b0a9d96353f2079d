"""Run-time set-up shared by every stage: device, threads, determinism, logging, provenance."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger("dbprepro")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no GPU (set device: auto or cpu)")
    return torch.device(device)


def configure_torch(threads: int | None = None, deterministic: bool = True) -> None:
    """Thread count and determinism flags (recorded by :func:`provenance`)."""
    if threads:
        torch.set_num_threads(int(threads))
    torch.use_deterministic_algorithms(bool(deterministic), warn_only=False)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if deterministic:
        # needed by cuBLAS for deterministic matmuls on GPUs (no effect on CPU)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


class _Loads:
    """Seconds this process spent in the model loaders decorated with :func:`timed_load` (outermost
    calls only), for the DAG profile's split of a job's time (:mod:`dbprepro.dagprofile`)."""

    def __init__(self):
        self.seconds, self.depth = 0.0, 0


LOADS = _Loads()


class _Imports:
    """Seconds this process spent in import statements outside the model loaders, counted from
    :meth:`install` on (outermost imports only; an import of a module already loaded costs
    microseconds), for the DAG profile (:mod:`dbprepro.dagprofile`): a job's stage code imports
    torch, diffusers and the rest lazily, so its own clock would count them as compute."""

    def __init__(self):
        self.seconds, self.depth, self.installed = 0.0, 0, False

    def install(self) -> None:
        import builtins
        import time

        if self.installed:
            return
        original = builtins.__import__

        def timed_import(*args, **kwargs):
            if self.depth or LOADS.depth:
                return original(*args, **kwargs)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1
                self.seconds += time.perf_counter() - t0

        builtins.__import__ = timed_import
        self.installed = True


IMPORTS = _Imports()


def timed_load(fn):
    """Count the wall time of ``fn`` (a model loader) in :data:`LOADS`."""
    import functools
    import time

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        LOADS.depth += 1
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            LOADS.depth -= 1
            if LOADS.depth == 0:
                LOADS.seconds += time.perf_counter() - t0

    return wrapper


@contextlib.contextmanager
def job_logging(logfile: str | Path | None = None, level: int = logging.INFO) -> Iterator[None]:
    """During one job: the package's log records (time, level, logger, message) go to ``logfile`` (or
    stderr), and so does ``sys.stderr`` itself, so tqdm progress bars, warnings and tracebacks land in
    the rule's log.  Everything is restored afterwards: a warm worker or a Snakemake process runs
    many jobs (:mod:`dbprepro.pipeline.workers`)."""
    saved_stderr = sys.stderr
    stream = saved_stderr
    if logfile:
        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
        stream = open(logfile, "a", buffering=1)  # noqa: SIM115 - closed below
        sys.stderr = stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    pkg = logging.getLogger("dbprepro")
    saved = pkg.level, pkg.propagate
    pkg.addHandler(handler)
    pkg.setLevel(level)
    pkg.propagate = False
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(saved[0])
        pkg.propagate = saved[1]
        sys.stderr = saved_stderr
        if stream is not saved_stderr:
            stream.close()


def peak_rss_reset() -> None:
    """Reset this process's peak resident memory (Linux: VmHWM), so :func:`peak_rss_mib` measures one job."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process since :func:`peak_rss_reset` in MiB (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


# libraries whose versions can change numbers (recorded in every provenance record)
VERSIONED = ("dbprepro", "numpy", "pandas", "scipy", "diffusers", "safetensors", "huggingface_hub", "torchattacks",
             "pyarrow", "scikit-learn", "snakemake")
# environment variables that change threads or kernels (recorded verbatim, None when unset)
DETERMINISM_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG",
                   "CUDA_VISIBLE_DEVICES", "PYTHONHASHSEED")


def provenance() -> dict[str, Any]:
    """Versions, thread counts and determinism flags of this process, and the environment lock's sha256
    with whether the installed versions match it (``environment_lock``)."""
    from importlib.metadata import PackageNotFoundError, version

    import diffusers
    import numpy

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": numpy.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    versions = {}
    for dist in VERSIONED:
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    info["dbprepro"] = versions["dbprepro"]
    info["versions"] = versions
    info["env"] = {k: os.environ.get(k) for k in DETERMINISM_ENV}
    info["environment_lock"] = _lock_summary()
    return info


def _lock_summary() -> dict[str, Any]:
    """envs/requirements.lock's sha256, whether the installed versions match it, and where torch came
    from (:func:`dbprepro.envlock.lock_status`; reads files and package metadata, runs no pip)."""
    from .envlock import lock_status

    try:
        s = lock_status()
    except (OSError, ValueError) as e:  # an unreadable lock is recorded, not raised, in every job
        return {"lock_sha256": None, "matches": None, "error": str(e)}
    return {k: s[k] for k in ("lock", "lock_sha256", "matches", "mismatches", "not_in_lock", "torch_source",
                              "torch_spec", "installed_from_sha256")}


def _git_state() -> dict[str, Any] | None:
    """Commit of the checkout the package runs from and whether its code differs from it."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", "src", "workflow",
                                "Snakefile"], capture_output=True, timeout=10).returncode == 1
    except (OSError, subprocess.SubprocessError):  # pragma: no cover - git missing or hung
        return None
    return {"commit": commit or None, "code_differs_from_commit": dirty}


def _digest(path: Path) -> str | dict[str, str] | None:
    from .io import sha256_file

    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
    return None


def provenance_path(rule: str, wildcards: dict, outputs) -> Path:
    """Where the provenance record of a job goes: ``<results>/provenance/<rule>[/<k=v,...>].json``
    with ``<results>`` the first component of the job's first (relative) output path, or
    ``<results>/replicates/seed<S>`` for a replicate seed's job (workflow/rules/replicates.smk)."""
    first = Path(str(list(outputs)[0])) if len(outputs) else Path("results/x")
    root = Path(first.parts[0]) if not first.is_absolute() else first.parent
    if not first.is_absolute() and len(first.parts) > 3 and first.parts[1] == "replicates":
        root = Path(*first.parts[:3])
    wc = ",".join(f"{k}={v}" for k, v in dict(wildcards).items())
    return root / "provenance" / rule / f"{wc}.json" if wc else root / "provenance" / f"{rule}.json"


def _names(items) -> dict[str, list]:
    """A Snakemake Namedlist's names, ``{name: [start, end or None]}``, to rebuild it; ``{}`` for a plain list."""
    get = getattr(items, "_get_names", None)
    return {name: list(span) for name, span in get()} if get else {}


def write_job_provenance(path: Path, *, rule: str, wildcards: dict, params, inputs, outputs, started: float,
                         seconds: float, in_process: bool, timing: dict | None = None) -> dict[str, Any]:
    """Write (atomically) the provenance record of a finished job: what ran (rule, wildcards,
    params incl. seed), with what (versions, threads, determinism flags and environment, git
    commit), when and where, and the sha256 of every output it wrote.  It sits in its own folder
    beside the results and is not part of any compared table."""
    import datetime
    import json

    from .io import write_text

    record = {
        "rule": rule,
        "wildcards": {k: str(v) for k, v in dict(wildcards).items()},
        "seed": params.get("seed"),
        "deterministic_requested": params.get("deterministic"),
        "in_snakemake_process": in_process,
        "started_utc": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "timing": timing or {},  # start-up before the stage, model loads within it (dbprepro.dagprofile)
        "host": platform.node(),
        "pid": os.getpid(),
        "argv": sys.argv,
        "git": _git_state(),
        "runtime": provenance(),
        "params": {k: v for k, v in params.items()},
        "inputs": [str(p) for p in inputs],
        "outputs": {str(p): _digest(Path(str(p))) for p in outputs},
        "input_names": _names(inputs),  # the rule's names of its inputs and outputs: {name: [start, end]}
        "output_names": _names(outputs),
        "output_order": [str(o) for o in outputs],  # the rule's order of its outputs
    }
    # keys keep their order (no sort_keys): a stage may depend on the order of a params dict (the claims
    # table lists defenses in config order), and a job re-run from its record must see the same order
    write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    return record
