"""Reading EDM's network pickles without executing them (issue 18).

NVlabs' ``edm-*.pkl`` is a plain ``pickle.dump`` (protocol 4) of ``{ema, loss_fn, augment_pipe,
dataset_kwargs}`` (``../shared/reference/paper-scale-networks.md`` §3.1).  Each network object is a
``torch_utils.persistence`` call ``_reconstruct_persistent_obj(meta)``, meta = {type 'class',
version 6, module_src: the defining module's source, class_name, state: the instance __dict__},
and the ordinary loader ``exec``s ``module_src``; each storage is a nested legacy ``torch.save``
blob that ``torch.storage._load_from_bytes`` hands to ``torch.load`` (§3.2).  So ``pickle.load``
runs code from the file, and ``torch.load(weights_only=True)`` rejects the protocol-4 stream (§3.3).

:class:`EDMUnpickler` is the restricted reader (§3.4): the standard unpickler (``pickle``'s Python
implementation of ``Unpickler``, so that BUILD can be restricted too) whose ``find_class`` maps a
fixed set of names to inert stand-ins and refuses any other with an :class:`UnsafePickleError`
naming it (``module.qualname``).  It imports nothing the file names (never ``dnnlib`` or
``torch_utils``) and executes nothing:

* ``torch_utils.persistence._reconstruct_persistent_obj`` -> a :class:`PersistentRecord` (class
  name among :data:`PERSISTENT_CLASSES`, state, sha256 of ``module_src``; the source is hashed and
  dropped, never executed or kept); ``torch.nn.modules.container.ModuleDict`` (NEWOBJ + BUILD) ->
  a :class:`ContainerRecord` holding the BUILD state;
* ``torch.storage._load_from_bytes`` -> a parser of the legacy blob (five protocol-2 pickles read by
  a second restricted unpickler: storage classes are its only globals, ``('storage', <class>, key,
  location, numel, None)`` its only persistent ids; then the element count and the raw bytes); any
  location (``cuda:0``) lands on the CPU;
* ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter(_with_state)`` (and
  ``torch._tensor._rebuild_from_type_v2`` of a plain tensor) -> a bounds-checked view of the storage;
* ``collections.OrderedDict`` and the builtin containers -> allowed; numpy's
  ``scalar`` / ``_reconstruct`` / ``ndarray`` / ``dtype`` (``numpy.core`` or ``numpy._core``) ->
  numeric dtypes only, scalars as Python numbers;
* persistent ids in the outer stream are refused; BUILD applies only to a ModuleDict record, a numpy
  dtype or a numeric array, so the stream cannot modify a tensor, a stand-in or a shared marker.

:func:`read_edm_pickle` reads a file, :func:`module_tensors` walks a record's ``_parameters``,
persistent ``_buffers`` and ``_modules`` into ``{dotted.path: tensor}``, :func:`ema_state_dict`
does both for the ``ema`` network.
"""


from __future__ import annotations

import builtins
import hashlib
import io
import pickle
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .verification import CheckpointError

#: the persistent classes an EDM pickle holds (training/networks.py, loss.py, augment.py)
PERSISTENT_CLASSES = frozenset({
    "EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond", "SongUNet", "DhariwalUNet", "UNetBlock",
    "Linear", "Conv2d", "GroupNorm", "PositionalEmbedding", "FourierEmbedding", "EDMLoss", "VPLoss",
    "VELoss", "AugmentPipe",
})
PERSISTENCE_VERSION = 6
_STORAGE_DTYPES = {f"{n}Storage": getattr(torch, t) for n, t in [
    ("Float", "float32"), ("Double", "float64"), ("Half", "float16"), ("BFloat16", "bfloat16"), ("Long", "int64"),
    ("Int", "int32"), ("Short", "int16"), ("Char", "int8"), ("Byte", "uint8"), ("Bool", "bool")]}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_NUMPY_NUMERIC = re.compile(r"^[<>|=]?([biufc]\d+|\?|[biufcBHILQhilqefdg])$")


class UnsafePickleError(CheckpointError):
    """The pickle needs something outside the allowlist; nothing of it was executed."""


@dataclass
class PersistentRecord:
    """An object of a ``torch_utils.persistence`` class, as data: its class name, its instance state
    and the sha256 of the module source that the ordinary loader would have executed."""

    class_name: str
    state: dict
    module_src_sha256: str
    version: int = PERSISTENCE_VERSION


class ContainerRecord:
    """A ``torch.nn.ModuleDict`` as data: the NEWOBJ creates it, BUILD stores the instance state."""

    class_name = "ModuleDict"

    def __init__(self):
        self.state: dict = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise UnsafePickleError(f"ModuleDict state is a {type(state).__name__}, not a dict")
        self.state = state


@dataclass
class _Storage:
    """A storage of the blob: announced by its persistent id, then ``data`` (a flat CPU tensor)."""

    key: str
    dtype: torch.dtype
    numel: int
    location: str
    data: torch.Tensor | None = None


class _Marker:
    """A name the allowlist accepts only as an argument (a storage class, a tensor type); shared by
    all loads, and never a BUILD target."""

    def __init__(self, qualname: str, value: Any = None):
        self.qualname, self.value = qualname, value

    def __repr__(self):
        return f"<{self.qualname}>"


def _refuse(what: str) -> UnsafePickleError:
    return UnsafePickleError(f"refused {what}: not in the EDM pickle allowlist (nothing was executed)")


# -- the stand-ins --------------------------------------------------------------------------------
def _persistent_record(meta: Any) -> PersistentRecord:
    """``_reconstruct_persistent_obj(meta)`` as data: ``module_src`` is hashed, never executed."""
    if not isinstance(meta, dict) or set(meta) != {"type", "version", "module_src", "class_name", "state"}:
        keys = sorted(map(str, meta)) if isinstance(meta, dict) else type(meta).__name__
        raise UnsafePickleError(f"torch_utils.persistence record with unexpected fields {keys}")
    name = meta["class_name"]
    if meta["type"] != "class" or meta["version"] != PERSISTENCE_VERSION:
        raise UnsafePickleError(f"torch_utils.persistence record of type {meta['type']!r} version "
                                f"{meta['version']!r} (only 'class', {PERSISTENCE_VERSION}) for {name!r}")
    if not isinstance(name, str) or name not in PERSISTENT_CLASSES:
        raise _refuse(f"persistent class {name!r} (torch_utils.persistence; known: "
                      f"{', '.join(sorted(PERSISTENT_CLASSES))})")
    src, state = meta["module_src"], meta["state"]
    if not isinstance(src, str):
        raise UnsafePickleError(f"persistent class {name}: module_src is a {type(src).__name__}")
    state = {} if state is None else state
    if not isinstance(state, dict):
        raise UnsafePickleError(f"persistent class {name}: state is a {type(state).__name__}")
    return PersistentRecord(name, state, hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest())


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """A strided view of a parsed storage, after checking that it stays inside it."""
    if not isinstance(storage, _Storage) or storage.data is None:
        raise UnsafePickleError(f"_rebuild_tensor_v2 on a {type(storage).__name__}, not a storage")
    if (not isinstance(offset, int) or not isinstance(size, tuple) or not isinstance(stride, tuple)
            or len(size) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride))):
        raise UnsafePickleError(f"_rebuild_tensor_v2 with invalid geometry offset={offset!r} size={size!r} "
                                f"stride={stride!r}")
    if hooks or metadata:
        raise UnsafePickleError("_rebuild_tensor_v2 with backward hooks or metadata")
    n = storage.data.numel()
    last = offset + sum((s - 1) * st for s, st in zip(size, stride)) if all(size) else offset - 1
    if last >= n or offset > n:
        raise UnsafePickleError(f"tensor of size {size} stride {stride} offset {offset} overruns its "
                                f"storage of {n} elements")
    return torch.as_strided(storage.data, size, stride, offset)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, torch.Tensor) or hooks or state:
        raise UnsafePickleError("_rebuild_parameter of something other than a plain tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func is not _rebuild_tensor_v2 or not isinstance(new_type, _Marker) or not isinstance(args, tuple) or state:
        raise UnsafePickleError("_rebuild_from_type_v2 of anything but a plain tensor")
    return _rebuild_tensor_v2(*args)


def _numeric_dtype(spec: Any) -> np.dtype:
    if isinstance(spec, np.dtype):
        dt = spec
    elif isinstance(spec, str) and _NUMPY_NUMERIC.match(spec):
        dt = np.dtype(spec)
    else:
        raise UnsafePickleError(f"numpy dtype {spec!r}: only numeric dtypes are allowed")
    if dt.hasobject or dt.fields is not None or dt.kind not in "biufc":
        raise UnsafePickleError(f"numpy dtype {dt!r}: only numeric dtypes are allowed")
    return dt


def _numpy_dtype(spec, align=False, copy=False):
    _numeric_dtype(spec)
    return np.dtype(spec, bool(align), bool(copy))


def _numpy_scalar(dtype, data=None):
    dt = _numeric_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise UnsafePickleError(f"numpy scalar of {dt} with {type(data).__name__} data")
    return np.frombuffer(data, dtype=dt)[0].item()


class _NumericArray(np.ndarray):
    """What ``_reconstruct`` creates; its BUILD accepts numeric dtypes only."""

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) != 5:
            raise UnsafePickleError("numpy array state of an unexpected form")
        _numeric_dtype(state[2])
        if not isinstance(state[4], (bytes, bytearray)):
            raise UnsafePickleError("numpy array whose data are objects, not bytes")
        super().__setstate__(state)


def _numpy_reconstruct(subtype, shape, dtype_code):
    if not (isinstance(subtype, _Marker) and subtype.value is np.ndarray):
        raise UnsafePickleError(f"numpy _reconstruct of {subtype!r}")
    return np.ndarray.__new__(_NumericArray, shape, np.uint8)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("torch.nn.modules.container", "ModuleDict"): ContainerRecord,
    ("torch.storage", "_load_from_bytes"): None,  # filled below (needs the inner parser)
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._tensor", "Tensor"): _Marker("torch._tensor.Tensor"),
    ("torch", "Tensor"): _Marker("torch.Tensor"),
    ("collections", "OrderedDict"): OrderedDict,
    **{("builtins", n): getattr(builtins, n)
       for n in ("set", "frozenset", "list", "tuple", "dict", "bytearray", "complex")},
    **{(m, "scalar"): _numpy_scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_reconstruct"): _numpy_reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): _Marker("numpy.ndarray", np.ndarray),
    ("numpy", "dtype"): _numpy_dtype,
}
_STORAGE_CLASSES = {("torch", n): _Marker(f"torch.{n}", dt) for n, dt in _STORAGE_DTYPES.items()}


# -- the unpicklers -------------------------------------------------------------------------------
class _RestrictedUnpickler(pickle._Unpickler):
    """``pickle``'s Python implementation of ``Unpickler`` (the C one cannot be restricted per
    opcode), with BUILD -- which calls ``__setstate__`` or sets attributes on the object below it --
    allowed only on the types in ``build_types``."""

    build_types: tuple[type, ...] = ()
    dispatch = dict(pickle._Unpickler.dispatch)

    def _load_build(self):
        inst = self.stack[-2] if len(self.stack) >= 2 else None
        if not isinstance(inst, self.build_types):
            kind = type(inst)
            raise _refuse(f"BUILD on {kind.__module__}.{kind.__qualname__}")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build


class _StorageBlobUnpickler(_RestrictedUnpickler):
    """The pickles inside one ``_load_from_bytes`` blob: storage classes are the only globals,
    ``('storage', ...)`` the only persistent ids, no BUILD."""

    def __init__(self, file, pending: list):
        super().__init__(file)
        self._pending = pending

    def find_class(self, module, name):
        marker = _STORAGE_CLASSES.get((module, name))
        if marker is None:
            raise _refuse(f"global {module}.{name} inside a storage blob")
        return marker

    def persistent_load(self, pid):
        ok = (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
              and isinstance(pid[1], _Marker) and isinstance(pid[1].value, torch.dtype)
              and isinstance(pid[2], str) and isinstance(pid[3], str) and pid[3].split(":")[0] in ("cpu", "cuda")
              and isinstance(pid[4], int) and pid[4] >= 0 and (len(pid) == 5 or pid[5] is None))
        if not ok:
            raise _refuse(f"persistent id {pid!r} inside a storage blob (only ('storage', <class>, key, "
                          "location, numel, None))")
        self._pending.append(_Storage(pid[2], pid[1].value, pid[4], pid[3]))
        return self._pending[-1]


def _load_storage_blob(blob: Any) -> _Storage:
    """Parse one legacy ``torch.save`` of a single storage (§3.1) into a CPU tensor."""
    if not isinstance(blob, (bytes, bytearray)):
        raise UnsafePickleError(f"_load_from_bytes of a {type(blob).__name__}")
    f, pending = io.BytesIO(bytes(blob)), []

    def read():
        return _StorageBlobUnpickler(f, pending).load()

    try:
        magic, version, info, obj, keys = read(), read(), read(), read(), read()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or malformed: not a storage blob
        raise UnsafePickleError(f"storage blob is not a legacy torch.save of one storage ({e})") from None
    if magic != _LEGACY_MAGIC or version != _LEGACY_PROTOCOL:
        raise UnsafePickleError(f"storage blob with magic {magic!r}, protocol {version!r}")
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise UnsafePickleError(f"storage blob sys_info {info!r} (only little-endian is read)")
    if not isinstance(obj, _Storage) or len(pending) != 1 or keys != [obj.key]:
        raise UnsafePickleError("storage blob does not hold exactly one storage")
    head = f.read(8)
    if len(head) != 8 or struct.unpack("<q", head)[0] != obj.numel:
        raise UnsafePickleError(f"storage blob element count does not match numel {obj.numel}")
    nbytes = obj.numel * torch.empty((), dtype=obj.dtype).element_size()
    raw = f.read(nbytes)
    if len(raw) != nbytes or f.read(1):
        raise UnsafePickleError(f"storage blob has {len(raw)} data bytes for {nbytes} expected, or trailing bytes")
    obj.data = torch.frombuffer(bytearray(raw), dtype=obj.dtype) if nbytes else torch.empty(0, dtype=obj.dtype)
    return obj


_ALLOWED[("torch.storage", "_load_from_bytes")] = _load_storage_blob


# -- the outer stream -----------------------------------------------------------------------------
class EDMUnpickler(_RestrictedUnpickler):
    """The restricted unpickler of EDM's pickles (module docstring): allowlisted names map to inert
    stand-ins; any other global is refused by name; no module is imported, nothing is executed.
    BUILD only fills a ``ModuleDict`` record, a numpy dtype or a numeric numpy array."""

    build_types = (ContainerRecord, np.dtype, _NumericArray)

    def find_class(self, module, name):
        target = _ALLOWED.get((module, name), _STORAGE_CLASSES.get((module, name)))
        if target is None:
            raise _refuse(f"global {module}.{name}")
        return target

    def persistent_load(self, pid):
        raise _refuse(f"persistent id {pid!r} in the outer stream")


def read_edm_pickle(path: str | Path) -> Any:
    """The contents of EDM pickle ``path`` as data (records, tensors, plain containers); an
    :class:`UnsafePickleError` names whatever the allowlist refuses."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: EDM pickle is missing")
    try:
        with open(path, "rb") as f:
            return EDMUnpickler(f).load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            struct.error, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable EDM pickle ({type(e).__name__}: {e}); "
                              "nothing executed") from None


def module_tensors(record: PersistentRecord | ContainerRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{dotted.path: tensor}`` of a module record: its ``_parameters`` and persistent ``_buffers``
    (None entries and ``_non_persistent_buffers_set`` names skipped), then its ``_modules``
    recursively -- the keys ``state_dict()`` of the original module would have."""
    if not isinstance(record, (PersistentRecord, ContainerRecord)):
        raise UnsafePickleError(f"{prefix or 'the root'} is a {type(record).__name__}, not a module record")
    state, out = record.state, {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        for name, value in (state.get(kind) or {}).items():
            if value is None or (kind == "_buffers" and name in skip):
                continue
            if not isinstance(value, torch.Tensor):
                raise UnsafePickleError(f"{prefix}{name} ({record.class_name}.{kind}) is a {type(value).__name__}")
            out[f"{prefix}{name}"] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        for key, value in module_tensors(child, f"{prefix}{name}.").items():
            if key in out:
                raise UnsafePickleError(f"{key} appears twice in the module tree")
            out[key] = value
    return out


def ema_state_dict(source: str | Path | dict,
                   expected_class: str = "EDMPrecond") -> tuple[dict[str, torch.Tensor], dict]:
    """The ``ema`` network of an EDM pickle (a path, or what :func:`read_edm_pickle` returned):
    its state dict and its plain attributes (``sigma_data``, ``label_dim``, ...).  Its class must be
    ``expected_class`` (read from the pickle, whatever the file is called)."""
    data = read_edm_pickle(source) if not isinstance(source, dict) else source
    where = "the pickle" if isinstance(source, dict) else str(source)
    if not isinstance(data, dict) or "ema" not in data:
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{where}: no 'ema' network (found {keys})")
    ema = data["ema"]
    name = getattr(ema, "class_name", type(ema).__name__)
    if not isinstance(ema, PersistentRecord) or name != expected_class:
        raise CheckpointError(f"{where}: the 'ema' network is {name}, not {expected_class}; this file needs "
                              f"the network class of its own preconditioning (read from the pickle, not its name)")
    attrs = {k: v for k, v in ema.state.items() if not k.startswith("_") and not isinstance(v, torch.Tensor)}
    return module_tensors(ema), attrs
