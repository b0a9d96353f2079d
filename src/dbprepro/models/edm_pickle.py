"""Reading EDM's network pickles as data: nothing executed, nothing built from the stream's own state.

NVlabs' ``edm-*.pkl`` is a plain ``pickle.dump`` (protocol 4) of ``{ema, loss_fn, augment_pipe,
dataset_kwargs}`` (``../shared/reference/paper-scale-networks.md`` §3.1).  Each network object is a
``torch_utils.persistence`` call ``_reconstruct_persistent_obj(meta)``, meta = {type 'class', version 6,
module_src: the defining module's source, class_name, state: the instance __dict__}, and the ordinary loader
``exec``s ``module_src``; each storage is a nested legacy ``torch.save`` blob that
``torch.storage._load_from_bytes`` hands to ``torch.load`` (§3.2).  So ``pickle.load`` runs code from the file,
and ``torch.load(weights_only=True)`` rejects the protocol-4 stream (§3.3).

Design: :func:`read_edm_pickle` runs :class:`.safe_pickle.SafeUnpickler` (an opcode interpreter of its own:
listed opcodes only; mutation only of containers it created, while open; atoms as keys; bounded depth, object
count, allocation and time -- see that module) with this table of globals, each of which returns an inert
record or memory this reader allocated:

* ``torch_utils.persistence._reconstruct_persistent_obj`` -> a :class:`PersistentRecord` (class name among
  :data:`PERSISTENT_CLASSES`, state, sha256 of ``module_src``; the source is hashed and dropped, never executed);
  ``torch.nn.modules.container.ModuleDict`` (NEWOBJ + one BUILD) -> a :class:`ContainerRecord`;
* ``torch.storage._load_from_bytes`` -> the legacy blob parsed by a second safe reader (storage classes its
  only globals, ``('storage', <class>, key, location, numel, None)`` its only persistent id), its raw bytes
  copied into a new CPU tensor of the announced dtype and size -- a large blob straight from the file as the
  outer reader meets it (:class:`.torch_guard.StorageBlob`), a small one from its bytes
  (:func:`.torch_guard.decode_storage`);
  each blob is decoded at most once; torch's rebuild functions -> bounds-checked views (:mod:`.torch_guard`);
* numpy: ``dtype(spec)`` -> a :class:`DtypeRecord` for a whitelisted numeric type string, whose BUILD may only
  set the byte order; ``_reconstruct`` + BUILD -> an :class:`ArrayRecord` whose array is decoded from the
  state's raw bytes with that type string (``_reconstruct`` without BUILD is refused); ``scalar`` -> a Python
  number.  No numpy dtype or array object is ever built from the stream's state;
* ``collections.OrderedDict()`` (empty, filled by SETITEMS).

Guarantees (``tests/test_edm_pickle.py``, ``tests/test_hostile_checkpoints.py``): no code runs and no module is
imported; every value the stream can reach is a plain container, an atom, one of these records, or a tensor
whose memory this reader allocated (views checked to stay inside it); the stream can modify only containers it
created, before they are used, so never a tensor, a record after its BUILD, or memory it did not allocate; the
load allocates at most ``Limits.alloc_ratio`` x file size (+ slack), nests at most ``Limits.max_depth``, pushes
at most ``Limits.max_objects`` and stops after ``Limits.max_seconds``; every refusal names the opcode, global
or key, with stream values shown by type and size only.

:func:`module_parts` walks a record's ``_parameters``, persistent ``_buffers`` and ``_modules`` into
parameters and buffers (each record once: a shared or shadowing entry is refused; names and paths bounded), :func:`ema_state_dict`
reads the ``ema`` network.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bounds import CheckpointError
from .edm_attrs import real
from .safe_pickle import DEFAULT_LIMITS, Budget, Global, Limits, LimitExceeded, Record, SafeUnpickler
from .safe_pickle import UnsafePickleError, summary
from .torch_guard import TENSOR_GLOBALS, StorageBlob, blob_reader, check_file_size, large_blob_reader

__all__ = ["ArrayRecord", "ContainerRecord", "DtypeRecord", "StorageBlob", "LimitExceeded", "Limits", "PersistentRecord",
           "UnsafePickleError", "ema_parts", "ema_state_dict", "module_parts", "module_tensors", "read_edm_pickle"]

#: the persistent classes an EDM pickle holds (training/networks.py, loss.py, augment.py)
PERSISTENT_CLASSES = frozenset({
    "EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond", "SongUNet", "DhariwalUNet", "UNetBlock",
    "Linear", "Conv2d", "GroupNorm", "PositionalEmbedding", "FourierEmbedding", "EDMLoss", "VPLoss",
    "VELoss", "AugmentPipe",
})
PERSISTENCE_VERSION = 6
#: the numeric numpy type strings read (no byte order: that comes from BUILD), a fixed list of what numpy
#: accepts on every platform (no long double, no string, object or void types)
NUMPY_NUMERIC = frozenset({
    "?", "bool", "b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64",
    "complex64", "complex128"})


@dataclass(eq=False)
class PersistentRecord(Record):
    """An object of a ``torch_utils.persistence`` class, as data: its class name, its instance state
    and the sha256 of the module source that the ordinary loader would have executed."""

    class_name: str
    state: dict
    module_src_sha256: str
    version: int = PERSISTENCE_VERSION


class ContainerRecord(Record):
    """A ``torch.nn.ModuleDict`` as data: the NEWOBJ creates it, its one BUILD stores the instance state."""

    class_name = "ModuleDict"
    needs_build = True

    def __init__(self, *args):
        if args:
            raise UnsafePickleError("refused ModuleDict NEWOBJ with arguments")
        self.state: dict = {}

    def _build(self, state):
        if type(state) is not dict:
            raise UnsafePickleError(f"refused BUILD of ModuleDict with {summary(state)}, not a dict")
        self.state, self.needs_build = state, False


class DtypeRecord(Record):
    """A numpy dtype as data: a whitelisted numeric type string and the byte order its BUILD names."""

    def __init__(self, spec, align=False, copy=False):
        if type(spec) is not str or spec not in NUMPY_NUMERIC:
            raise UnsafePickleError(f"refused numpy dtype {summary(spec)}: only the numeric type strings of "
                                    "edm_pickle.NUMPY_NUMERIC are read")
        self.spec, self.order = spec, "<"

    def _build(self, state):
        ok = (type(state) is tuple and len(state) in (8, 9) and state[1] in ("<", ">", "|", "=")
              and state[2] is None and state[3] is None and state[4] is None)
        if not ok:
            raise UnsafePickleError("refused BUILD of numpy dtype: only a byte order, no fields or sub-arrays")
        self.order = {"=": "<", "|": "|"}.get(state[1], state[1])

    def dtype(self) -> np.dtype:
        dt = np.dtype(self.spec)
        return dt.newbyteorder(self.order) if self.order != "|" else dt


class ArrayRecord(Record):
    """A numeric numpy array as data: ``_reconstruct`` makes it empty, its BUILD decodes the raw bytes."""

    needs_build = True

    def __init__(self, budget: Budget):
        self._budget, self.array = budget, None

    def _build(self, state):
        ok = (type(state) is tuple and len(state) == 5 and type(state[1]) is tuple and len(state[1]) <= 32
              and all(type(s) is int and 0 <= s < 1 << 48 for s in state[1]) and isinstance(state[2], DtypeRecord)
              and type(state[3]) is bool and type(state[4]) is bytes)
        if not ok:
            raise UnsafePickleError("refused BUILD of numpy array: only (version, shape, numeric dtype, "
                                    "fortran flag, raw bytes)")
        dt = state[2].dtype()
        count = math.prod(state[1])
        if count * dt.itemsize != len(state[4]):
            raise UnsafePickleError(f"refused numpy array of shape {state[1]} {dt}: {len(state[4])} data bytes "
                                    f"for {count * dt.itemsize}")
        self._budget.charge(len(state[4]), "a numpy array")
        flat = np.frombuffer(state[4], dtype=dt).copy()
        self.array, self.needs_build = flat.reshape(state[1], order="F" if state[3] else "C"), False

    def __array__(self, dtype=None, copy=None):
        return self.array if dtype is None else self.array.astype(dtype)


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, DtypeRecord) or type(data) is not bytes:
        raise UnsafePickleError(f"refused numpy scalar of {summary(dtype)} with {summary(data)} data")
    dt = dtype.dtype()
    if len(data) != dt.itemsize:
        raise UnsafePickleError(f"refused numpy scalar of {dt} with {len(data)} data bytes")
    return np.frombuffer(data, dtype=dt)[0].item()


def _persistent_record(meta: Any) -> PersistentRecord:
    """``_reconstruct_persistent_obj(meta)`` as data: ``module_src`` is hashed, never executed."""
    fields = {"type", "version", "module_src", "class_name", "state"}
    if type(meta) is not dict or set(meta) != fields:
        extra = sorted(summary(k) for k in meta)[:8] if type(meta) is dict else summary(meta)
        raise UnsafePickleError(f"torch_utils.persistence record with unexpected fields {extra}")
    name = meta["class_name"]
    if meta["type"] != "class" or meta["version"] != PERSISTENCE_VERSION:
        raise UnsafePickleError(f"torch_utils.persistence record of type {summary(meta['type'])} version "
                                f"{summary(meta['version'])} (only 'class', {PERSISTENCE_VERSION}) for {summary(name)}")
    if type(name) is not str or name not in PERSISTENT_CLASSES:
        raise UnsafePickleError(f"refused persistent class {summary(name)} (torch_utils.persistence; known: "
                                f"{', '.join(sorted(PERSISTENT_CLASSES))})")
    src, state = meta["module_src"], meta["state"]
    if type(src) is not str:
        raise UnsafePickleError(f"persistent class {name}: module_src is {summary(src)}")
    state = {} if state is None else state
    if type(state) is not dict:
        raise UnsafePickleError(f"persistent class {name}: state is {summary(state)}, not a dict")
    h = hashlib.sha256()
    for k in range(0, len(src), 1 << 16):  # encoded a slice at a time: no second copy of the whole source
        h.update(src[k:k + (1 << 16)].encode("utf-8", "surrogatepass"))
    return PersistentRecord(name, state, h.hexdigest())


def _globals(budget: Budget, limits: Limits) -> dict[tuple[str, str], Global]:
    numpy = {}
    for m in ("numpy.core.multiarray", "numpy._core.multiarray"):
        numpy[(m, "scalar")] = Global(f"{m}.scalar", _numpy_scalar)
        numpy[(m, "_reconstruct")] = Global(f"{m}._reconstruct", lambda *a: _reconstruct(budget, *a), buildable=True)
    return {
        **TENSOR_GLOBALS, **numpy,
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): Global(
            "torch_utils.persistence._reconstruct_persistent_obj", _persistent_record),
        ("torch.nn.modules.container", "ModuleDict"): Global("torch.nn.modules.container.ModuleDict",
                                                             ContainerRecord, buildable=True),
        ("torch.storage", "_load_from_bytes"): Global("torch.storage._load_from_bytes", blob_reader(budget, limits)),
        ("numpy", "ndarray"): Global("numpy.ndarray", value="ndarray"),
        ("numpy", "dtype"): Global("numpy.dtype", DtypeRecord, buildable=True),
    }


def _reconstruct(budget, subtype, shape, typecode):
    if not (isinstance(subtype, Global) and subtype.value == "ndarray"):
        raise UnsafePickleError(f"refused numpy _reconstruct of {summary(subtype)}")
    return ArrayRecord(budget)


def read_edm_pickle(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> Any:
    """The contents of EDM pickle ``path`` as data (records, tensors, plain containers, atoms); an
    :class:`UnsafePickleError` (:class:`LimitExceeded` for a bound) names whatever is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: EDM pickle is missing")
    budget = limits.budget(check_file_size(path, limits))
    try:
        with open(path, "rb") as f:
            data = SafeUnpickler(f, _globals(budget, limits), budget, limits, where=str(path),
                                 large_bytes=large_blob_reader(budget, limits)).load()
            if f.read(1):
                raise UnsafePickleError(f"{path}: bytes after the pickle's STOP")
            return data
    except UnsafePickleError as e:
        msg = str(e)
        raise type(e)(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    except (ValueError, TypeError, struct.error, UnicodeDecodeError, OverflowError, RuntimeError, MemoryError) as e:
        raise CheckpointError(f"{path}: not a readable EDM pickle ({type(e).__name__}); nothing executed") from None


def module_parts(record: PersistentRecord | ContainerRecord,
                 prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``({dotted.path: parameter}, {dotted.path: persistent buffer})`` of a module record: its
    ``_parameters`` and ``_buffers`` (None entries and ``_non_persistent_buffers_set`` names skipped), then its
    ``_modules`` recursively.  Refused: a record reached twice (a shared child), a name that is both a parameter
    and a buffer or a child module (shadowing), a non-tensor entry, a name or dotted path longer than
    :data:`MAX_NAME` / :data:`MAX_PATH` characters, paths adding up to more than :data:`MAX_TOTAL_PATHS` (so
    tensors shared under many names cannot multiply a long prefix), each checked before its path is built."""
    params, buffers, _ = _parts(record, prefix)
    return params, buffers


#: the longest module, parameter or buffer name, the longest dotted path and the sum of all paths' lengths a
#: walk accepts (EDM's longest paths have ~50 characters, its networks a few hundred tensors)
MAX_NAME, MAX_PATH, MAX_TOTAL_PATHS = 256, 2048, 1 << 22


def module_tensors(record: PersistentRecord | ContainerRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{dotted.path: tensor}`` of a module record (:func:`module_parts`, parameters and buffers together) in
    ``state_dict()`` order: each module's parameters, then its buffers, then its children."""
    return _parts(record, prefix)[2]


def _parts(record, prefix):
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    both: dict[str, torch.Tensor] = {}
    _walk(record, prefix, params, buffers, both, set(), [len(prefix)])
    return params, buffers, both


def _walk(record, prefix, params, buffers, both, seen, total) -> None:
    """``total[0]``: the characters of every path made so far, bounded before each path is built."""
    where = prefix[:-1] or "the root"
    if not isinstance(record, (PersistentRecord, ContainerRecord)):
        raise UnsafePickleError(f"{where} is {summary(record)}, not a module record")
    if id(record) in seen:
        raise UnsafePickleError(f"{where}: a module record reached twice (shared children are refused)")
    seen.add(id(record))
    state = record.state
    skip = state.get("_non_persistent_buffers_set") or set()
    if not isinstance(skip, (set, frozenset)):
        raise UnsafePickleError(f"{where}: _non_persistent_buffers_set is {summary(skip)}")
    names: dict[str, str] = {}
    for kind, out in (("_parameters", params), ("_buffers", buffers), ("_modules", None)):
        entries = state.get(kind) or {}
        if not isinstance(entries, dict):
            raise UnsafePickleError(f"{where}: {kind} is {summary(entries)}, not a dict")
        for name, value in entries.items():
            if type(name) is not str:
                raise UnsafePickleError(f"{where}: {kind} key {summary(name)} is not a string")
            total[0] += len(prefix) + len(name)
            if len(name) > MAX_NAME or len(prefix) + len(name) > MAX_PATH or total[0] > MAX_TOTAL_PATHS:
                raise UnsafePickleError(f"{where}: {kind} key {summary(name)} makes a path of "
                                        f"{len(prefix) + len(name)} characters, {total[0]} in all (names are at most "
                                        f"{MAX_NAME}, paths {MAX_PATH}, all paths {MAX_TOTAL_PATHS} characters)")
            if name in names:
                raise UnsafePickleError(f"{prefix}{name} is both in {names[name]} and {kind} of {record.class_name} "
                                        "(a shadowing entry)")
            names[name] = kind
            if value is None or (kind == "_buffers" and name in skip):
                continue
            if out is None:
                _walk(value, f"{prefix}{name}.", params, buffers, both, seen, total)
                continue
            if not isinstance(value, torch.Tensor):
                raise UnsafePickleError(f"{prefix}{name} ({record.class_name}.{kind}) is {summary(value)}")
            out[f"{prefix}{name}"] = both[f"{prefix}{name}"] = value


def _ema(source, expected_class, limits: Limits) -> PersistentRecord:
    data = read_edm_pickle(source, limits) if not isinstance(source, dict) else source
    where = "the pickle" if isinstance(source, dict) else str(source)
    if not isinstance(data, dict) or "ema" not in data:
        found = sorted(summary(k) for k in data)[:8] if isinstance(data, dict) else summary(data)
        raise CheckpointError(f"{where}: no 'ema' network (found {found})")
    ema = data["ema"]
    name = ema.class_name if isinstance(ema, (PersistentRecord, ContainerRecord)) else summary(ema)
    if not isinstance(ema, PersistentRecord) or name != expected_class:
        raise CheckpointError(f"{where}: the 'ema' network is {name}, not {expected_class}; this file needs "
                              f"the network class of its own preconditioning (read from the pickle, not its name)")
    return ema


def _attrs(ema: PersistentRecord) -> dict:
    return {k: v for k, v in ema.state.items() if type(k) is str and not k.startswith("_")}


def ema_state_dict(source: str | Path | dict, expected_class: str = "EDMPrecond",
                   limits: Limits = DEFAULT_LIMITS) -> tuple[dict[str, torch.Tensor], dict]:
    """The ``ema`` network of an EDM pickle (a path, or what :func:`read_edm_pickle` returned): its state dict
    and its plain attributes (``sigma_data``, ``label_dim``, ...).  Its class must be ``expected_class`` (read
    from the pickle, whatever the file is called).  :func:`ema_parts` keeps parameters and buffers apart."""
    ema = _ema(source, expected_class, limits)
    return module_tensors(ema), _attrs(ema)


def ema_parts(source: str | Path | dict, expected_class: str = "EDMPrecond", limits: Limits = DEFAULT_LIMITS):
    """``(parameters, buffers, attributes)`` of the ``ema`` network (:func:`ema_state_dict`)."""
    ema = _ema(source, expected_class, limits)
    params, buffers = module_parts(ema)
    return params, buffers, _attrs(ema)


def check_precond_attrs(attrs: dict, sigma_data: float, img_resolution: int, img_channels: int,
                        where: str | Path) -> None:
    """The preconditioning's scalar hyper-parameters, each present with its type, finite and in range, and
    equal to the network's: ``sigma_data`` (a finite float > 0), ``label_dim`` (an int >= 0; 0: unconditional),
    ``img_resolution`` and ``img_channels`` (ints >= 1).  The first that fails is named."""
    def number(key, kinds, ok):
        if key not in attrs:
            raise CheckpointError(f"{where}: the EDMPrecond has no {key}")
        v = attrs[key]
        if type(v) not in kinds or not ok(v):
            raise CheckpointError(f"{where}: the EDMPrecond's {key} is {summary(v)}, not a valid value")
        return v

    sd = number("sigma_data", (float, int), lambda v: real(v) is not None and v > 0)  # no int -> float overflow
    if abs(float(sd) - sigma_data) > 1e-12:
        raise CheckpointError(f"{where}: the EDMPrecond has sigma_data {sd!r}; the config has {sigma_data}")
    if number("label_dim", (int,), lambda v: v >= 0) != 0:
        raise CheckpointError(f"{where}: the EDMPrecond is class-conditional (label_dim {attrs['label_dim']}); "
                              "this network is unconditional")
    for key, want in (("img_resolution", img_resolution), ("img_channels", img_channels)):
        if number(key, (int,), lambda v: v >= 1) != want:
            raise CheckpointError(f"{where}: the EDMPrecond has {key} {attrs[key]}; the config has {want}")
