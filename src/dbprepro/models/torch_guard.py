"""Torch storages and tensors as :mod:`.safe_pickle` data, and the bounds checked before ``torch.load``.

Shared by EDM's pickles (:mod:`.edm_pickle`) and the torch-file guard:

* a storage is a :class:`StorageRecord` -- its dtype (one of :data:`STORAGE_DTYPES`, from the storage class
  name), element count, key and location (any location lands on the CPU).  Its ``data`` is a flat CPU tensor
  this package allocated and filled from raw bytes (:func:`decode_storage`), or ``None`` while only the
  structure is checked;
* ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter(_with_state)`` / ``torch._tensor.
  _rebuild_from_type_v2`` (a plain tensor) give a bounds-checked strided view of such a storage (a
  :class:`TensorRecord` when the storage has no data), never anything that reaches other memory;
* EDM's ``torch.storage._load_from_bytes(blob)`` (:func:`blob_reader`): a legacy ``torch.save`` of one storage,
  its header read by safe readers, its data copied into a new tensor -- a large blob straight from the file
  (:func:`large_blob_reader`, :class:`StorageBlob`) -- and each blob decoded once.

:func:`guard_torch_file` is run before every ``torch.load(weights_only=True)`` of a third-party file (Score SDE's
checkpoint, classifier files; the package's own resumable training checkpoints are not third-party): the file
size; the format decided as torch decides it (a zip starts with a local header; a legacy file that also holds a
zip end record is refused); for the zip format the layout :mod:`.zip_layout` checks (no prefix, no duplicate
name, no bytes outside records; the record count bounded from the end record before any entry is parsed), every
record's declared size
(their sum bounded like any allocation: a deflated record that would expand past it -- a zip bomb -- is refused
before anything is inflated; a stored record's sizes must agree) and ``data.pkl`` read by the safe reader with
torch's tensor globals only (depth, object count, atoms as keys, no cycles), each storage's ``numel`` x item size
equal to its record's size; for the legacy format the same pickle checks, the storage keys strings (checked before any hash or
comparison) naming exactly the storages of the object, and the storage bytes that follow
matching the declared storages exactly.  So ``torch.load`` then builds a bounded structure from a file whose
allocation is bounded by its size.
"""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .safe_pickle import DEFAULT_LIMITS, Budget, Global, Limits, LimitExceeded, Record, SafeUnpickler
from .safe_pickle import UnsafePickleError, summary
from .zip_layout import LOCAL, check_zip_layout

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_BLOB_START = b"\x80\x02\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little")  # the magic number, pickled
STORAGE_DTYPES = {f"{n}Storage": getattr(torch, t) for n, t in [
    ("Float", "float32"), ("Double", "float64"), ("Half", "float16"), ("BFloat16", "bfloat16"), ("Long", "int64"),
    ("Int", "int32"), ("Short", "int16"), ("Char", "int8"), ("Byte", "uint8"), ("Bool", "bool")]}
MAX_NDIM = 16


@dataclass(eq=False)
class StorageRecord(Record):
    """One storage: announced by its persistent id; ``data`` a flat CPU tensor once decoded."""

    key: str
    dtype: torch.dtype
    numel: int
    location: str
    data: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(eq=False)
class TensorRecord(Record):
    """A tensor whose storage holds no data (structure checks only)."""

    storage: StorageRecord
    size: tuple
    stride: tuple
    offset: int


def storage_pid(pid: Any) -> StorageRecord:
    """The persistent id torch writes for a storage: ``('storage', <storage class>, key, location, numel)``
    (legacy blobs add ``None``)."""
    ok = (type(pid) is tuple and len(pid) in (5, 6) and pid[0] == "storage" and isinstance(pid[1], Global)
          and isinstance(pid[1].value, torch.dtype) and type(pid[2]) is str and len(pid[2]) <= 64
          and type(pid[3]) is str and pid[3].split(":")[0] in ("cpu", "cuda") and type(pid[4]) is int
          and 0 <= pid[4] < 1 << 48 and (len(pid) == 5 or pid[5] is None))
    if not ok:
        raise UnsafePickleError(f"refused persistent id {summary(pid)} (only ('storage', <storage class>, key, "
                                "location, numel))")
    return StorageRecord(pid[2], pid[1].value, pid[4], pid[3])


def decode_storage(record: StorageRecord, raw: bytes, offset: int, budget: Budget) -> None:
    """Fill ``record.data`` with a new CPU tensor copied from ``raw[offset:]``, which must hold exactly
    ``numel`` elements."""
    n = record.nbytes
    if len(raw) - offset != n:
        raise UnsafePickleError(f"storage {summary(record.key)}: {len(raw) - offset} data bytes for {record.numel} "
                                f"{record.dtype} elements ({n} bytes)")
    budget.check_time()
    budget.charge(n, f"storage {summary(record.key)}")
    if not n:
        record.data = torch.empty(0, dtype=record.dtype)
        return
    with warnings.catch_warnings():  # frombuffer warns that bytes are read-only; the clone below owns its memory
        warnings.simplefilter("ignore")
        record.data = torch.frombuffer(raw, dtype=record.dtype, count=record.numel, offset=offset).clone()


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """A strided view of a storage, after checking that every element it reaches lies inside it."""
    if not isinstance(storage, StorageRecord):
        raise UnsafePickleError(f"refused _rebuild_tensor_v2 on {summary(storage)}, not a storage")
    if (type(offset) is not int or type(size) is not tuple or type(stride) is not tuple or len(size) != len(stride)
            or len(size) > MAX_NDIM or not all(type(v) is int and 0 <= v < 1 << 48 for v in (offset, *size, *stride))
            or type(requires_grad) is not bool):
        raise UnsafePickleError(f"refused _rebuild_tensor_v2 with invalid geometry (offset {summary(offset)}, "
                                f"size {summary(size)}, stride {summary(stride)})")
    if hooks or metadata:
        raise UnsafePickleError("refused _rebuild_tensor_v2 with backward hooks or metadata")
    last = offset + sum((s - 1) * st for s, st in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.numel or offset > storage.numel:
        raise UnsafePickleError(f"refused tensor of size {size} stride {stride} offset {offset}: it overruns its "
                                f"storage of {storage.numel} elements")
    if storage.data is None:
        return TensorRecord(storage, size, stride, offset)
    return torch.as_strided(storage.data, size, stride, offset)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, (torch.Tensor, TensorRecord)) or hooks or state:
        raise UnsafePickleError("refused _rebuild_parameter of something other than a plain tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if (not isinstance(func, Global) or func.fn is not _rebuild_tensor_v2 or not isinstance(new_type, Global)
            or new_type.value != "tensor" or type(args) is not tuple or state):
        raise UnsafePickleError("refused _rebuild_from_type_v2 of anything but a plain tensor")
    return _rebuild_tensor_v2(*args)


def _ordered_dict(*args):
    if args:
        raise UnsafePickleError("refused collections.OrderedDict with arguments (only an empty one, then SETITEMS)")
    from collections import OrderedDict

    return OrderedDict()


def _set_of(kind):
    def make(items=()):
        if type(items) is not list or not all(type(x) in (str, bytes, int, float, bool, type(None)) for x in items):
            raise UnsafePickleError(f"refused builtins.{kind.__name__} of {summary(items)}: only a list of atoms")
        return kind(items)

    return make


def _size(dims=()):
    if type(dims) is not tuple or len(dims) > MAX_NDIM or not all(type(d) is int and 0 <= d < 1 << 48 for d in dims):
        raise UnsafePickleError(f"refused torch.Size of {summary(dims)}")
    return torch.Size(dims)


def _device(kind, index=None):
    if kind not in ("cpu", "cuda", "mps", "meta") or not (index is None or (type(index) is int and 0 <= index < 1024)):
        raise UnsafePickleError(f"refused torch.device({summary(kind)}, {summary(index)})")
    return torch.device(kind, index) if index is not None else torch.device(kind)


#: storage classes: arguments of persistent ids only
STORAGE_GLOBALS = {("torch", n): Global(f"torch.{n}", value=dt) for n, dt in STORAGE_DTYPES.items()}
#: what torch pickles around tensors and state dicts
TENSOR_GLOBALS = {
    **STORAGE_GLOBALS,
    ("torch._utils", "_rebuild_tensor_v2"): Global("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): Global("torch._utils._rebuild_parameter", _rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): Global("torch._utils._rebuild_parameter_with_state",
                                                              _rebuild_parameter),
    ("torch._tensor", "_rebuild_from_type_v2"): Global("torch._tensor._rebuild_from_type_v2", _rebuild_from_type_v2),
    ("torch._tensor", "Tensor"): Global("torch._tensor.Tensor", value="tensor"),
    ("torch", "Tensor"): Global("torch.Tensor", value="tensor"),
    ("collections", "OrderedDict"): Global("collections.OrderedDict", _ordered_dict, fresh=True),
    # what else torch's weights-only loader accepts in a checkpoint: sets, sizes, devices, dtypes (inert values)
    **{(m, k.__name__): Global(f"builtins.{k.__name__}", _set_of(k))
       for m in ("builtins", "__builtin__") for k in (set, frozenset)},  # protocol 2 writes __builtin__
    ("torch", "Size"): Global("torch.Size", _size),
    ("torch", "device"): Global("torch.device", _device),
    **{("torch", n): Global(f"torch.{n}", value=getattr(torch, n)) for n in (
        "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
        "complex64", "complex128")},
}


# -- EDM's storage blobs (torch.storage._load_from_bytes) ------------------------------------------------
class StorageBlob(Record):
    """A large storage blob (``BINBYTES`` of at least :data:`.safe_pickle.LARGE_BYTES`) read in place: its header
    parsed and its data read from the file straight into a new tensor (one copy, as ``torch.load`` makes).  It
    stands for the bytes only as the argument of ``_load_from_bytes``, once."""

    def __init__(self, storage: StorageRecord):
        self.storage, self.used = storage, False


def _blob_header(f, budget: Budget, limits: Limits) -> StorageRecord:
    """The five pickles of a legacy ``torch.save`` of one storage and its element count, read from ``f`` by
    safe readers (storage classes the only globals, a storage id the only persistent id)."""
    pending: list[StorageRecord] = []

    def pid(p):
        pending.append(storage_pid(p))
        return pending[-1]

    reader = SafeUnpickler(f, STORAGE_GLOBALS, budget, limits, pid, "storage blob")
    magic, version, info, obj, keys = (reader.load() for _ in range(5))
    if magic != _LEGACY_MAGIC or version != _LEGACY_PROTOCOL:
        raise UnsafePickleError(f"storage blob with magic {summary(magic)}, protocol {summary(version)}")
    if type(info) is not dict or info.get("little_endian") is not True:
        raise UnsafePickleError("storage blob sys_info is not little-endian (only little-endian is read)")
    if not isinstance(obj, StorageRecord) or len(pending) != 1 or keys != [obj.key]:
        raise UnsafePickleError("storage blob does not hold exactly one storage")
    head = f.read(8)
    if len(head) != 8 or struct.unpack("<q", head)[0] != obj.numel:
        raise UnsafePickleError(f"storage blob element count does not match numel {obj.numel}")
    return obj


def large_blob_reader(budget: Budget, limits: Limits):
    """The ``large_bytes`` hook of the outer reader: a payload that starts like a legacy storage blob is read
    in place (:class:`StorageBlob`), any other is left to be read as plain bytes."""

    def read(f, n: int):
        start = f.tell()
        if f.read(len(_BLOB_START)) != _BLOB_START:
            f.seek(start)
            return None
        f.seek(start)
        storage = _blob_header(f, budget, limits)
        if f.tell() - start + storage.nbytes != n:
            raise UnsafePickleError(f"storage blob of {n} bytes: header and {storage.numel} {storage.dtype} "
                                    f"elements take {f.tell() - start + storage.nbytes}")
        budget.check_time()
        budget.charge(storage.nbytes, f"storage {summary(storage.key)}")
        data = torch.empty(storage.numel, dtype=storage.dtype)
        if storage.nbytes and f.readinto(memoryview(data.view(torch.uint8).numpy())) != storage.nbytes:
            raise UnsafePickleError(f"storage blob {summary(storage.key)} runs past the end of the file")
        storage.data = data
        return StorageBlob(storage)

    return read


def blob_reader(budget: Budget, limits: Limits):
    """``torch.storage._load_from_bytes`` of one load: each blob decoded once (a memo reference to the same
    blob decoded again is refused); a small blob (bytes) parsed and its data copied into a new tensor."""
    seen: set[int] = set()
    again = ("refused _load_from_bytes of a storage blob already decoded (a memo reference re-parsed: memory "
             "amplification)")

    def load_from_bytes(blob):
        if isinstance(blob, StorageBlob):
            if blob.used:
                raise UnsafePickleError(again)
            blob.used = True
            return blob.storage
        if type(blob) is not bytes:
            raise UnsafePickleError(f"refused _load_from_bytes of {summary(blob)}")
        if id(blob) in seen:
            raise UnsafePickleError(again)
        seen.add(id(blob))
        f = io.BytesIO(blob)
        obj = _blob_header(f, budget, limits)
        decode_storage(obj, blob, f.tell(), budget)
        return obj

    return load_from_bytes


# -- the guard of torch files ------------------------------------------------------------------------------
def check_file_size(path: Path, limits: Limits) -> int:
    if not path.is_file():
        raise UnsafePickleError(f"{path}: file is missing")
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise LimitExceeded(f"{path}: {size} bytes, more than Limits.max_file_bytes = {limits.max_file_bytes}")
    return size


def guard_torch_file(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> None:
    """Refuse a torch file whose load would not be bounded (module docstring); nothing is built."""
    path = Path(path)
    budget = limits.budget(check_file_size(path, limits))
    try:
        with open(path, "rb") as f:
            if f.read(4) == LOCAL:  # torch's own rule for the zip format
                _guard_zip(f, path, limits, budget)
            else:
                if zipfile.is_zipfile(f):
                    raise UnsafePickleError(f"{path}: not a zip by its first bytes but holding a zip end record "
                                            "(a legacy stream with an archive appended: the readers disagree)")
                f.seek(0)
                _guard_legacy(f, limits, budget, path)
    except UnsafePickleError as e:
        msg = str(e).replace(f"{path}: ", "")
        raise type(e)(f"{path}: not a readable PyTorch checkpoint, or outside the weights-only format (refused "
                      f"before torch.load, nothing executed): {msg}") from None
    except (ValueError, TypeError, OverflowError, struct.error, UnicodeDecodeError, OSError, EOFError,
            zipfile.BadZipFile, zlib.error) as e:
        raise UnsafePickleError(f"{path}: not a readable PyTorch checkpoint (refused before torch.load, nothing "
                                f"executed): {type(e).__name__}") from None


def _guard_zip(f, path: Path, limits: Limits, budget: Budget) -> None:
    try:
        zf = check_zip_layout(f, path, limits)
    except UnsafePickleError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, struct.error) as e:
        raise UnsafePickleError(f"{path}: unreadable zip ({type(e).__name__})") from None
    with zf:
        infos = zf.infolist()
        for i in infos:
            if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or (
                    i.compress_type == zipfile.ZIP_STORED and i.file_size != i.compress_size):
                raise UnsafePickleError(f"{path}: zip record {summary(i.filename)} with compression "
                                        f"{i.compress_type} and sizes {i.compress_size}/{i.file_size}")
            budget.charge(i.file_size, f"zip record {summary(i.filename)} (decompressed; a zip bomb?)")
        sizes = {i.filename: i.file_size for i in infos}
        pkl = [n for n in sizes if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise UnsafePickleError(f"{path}: {len(pkl)} data.pkl records (a torch zip file has one)")
        prefix = pkl[0][:-len("data.pkl")]
        with zf.open(pkl[0]) as f:
            raw = f.read(sizes[pkl[0]] + 1)
    storages: list[StorageRecord] = []
    _scan(raw, limits, budget, storages, "data.pkl")
    for s in storages:
        name = f"{prefix}data/{s.key}"
        if sizes.get(name) != s.nbytes:
            raise UnsafePickleError(f"{path}: storage {summary(s.key)} declares {s.nbytes} bytes, its record "
                                    f"{summary(name)} has {sizes.get(name)}")


def _scan(raw: bytes, limits: Limits, budget: Budget, storages: list, where: str):
    def pid(p):
        storages.append(storage_pid(p))
        return storages[-1]

    f = io.BytesIO(raw)
    obj = SafeUnpickler(f, TENSOR_GLOBALS, budget, limits, persistent=pid, where=where).load()
    if f.read(1):
        raise UnsafePickleError(f"{where}: bytes after the pickle's STOP")
    return obj


def _guard_legacy(f, limits: Limits, budget: Budget, path: Path) -> None:
    """torch's legacy format: magic, protocol, sys_info, the object, the storage keys, then per storage its
    element count (8 bytes) and data."""
    storages: list[StorageRecord] = []

    def pid(p):
        storages.append(storage_pid(p))
        return storages[-1]

    where = "legacy torch file"
    if f.read(2) != b"\x80\x02":
        raise UnsafePickleError(f"{where}: does not start with torch's protocol-2 magic number pickle")
    f.seek(0)
    head = [SafeUnpickler(f, {}, budget, limits, where=where).load() for _ in range(3)]
    if head[0] != _LEGACY_MAGIC or head[1] != _LEGACY_PROTOCOL:
        raise UnsafePickleError(f"{where}: not a torch file (magic {summary(head[0])}, protocol {summary(head[1])})")
    SafeUnpickler(f, TENSOR_GLOBALS, budget, limits, persistent=pid, where=where).load()
    keys = SafeUnpickler(f, {}, budget, limits, where=where).load()
    by_key = {s.key: s for s in storages}
    if type(keys) is not list or not all(type(k) is str for k in keys):  # atoms before any hash or comparison
        bad = summary(keys) if type(keys) is not list else summary(next(k for k in keys if type(k) is not str))
        raise UnsafePickleError(f"{where}: a storage key that is not a string ({bad}); torch reads storages by "
                                "their string keys")
    if len(keys) != len(by_key) or set(keys) != set(by_key):
        raise UnsafePickleError(f"{where}: the storage keys do not match the storages of the object")
    for key in keys:
        head = f.read(8)
        if len(head) != 8 or struct.unpack("<q", head)[0] != by_key[key].numel:
            raise UnsafePickleError(f"{where}: storage {summary(key)} element count does not match its id")
        f.seek(by_key[key].nbytes, io.SEEK_CUR)
    if f.tell() != path.stat().st_size:
        raise UnsafePickleError(f"{where}: the storage data do not fill the file exactly")
