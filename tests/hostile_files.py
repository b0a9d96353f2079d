"""Crafted checkpoint files for tests/test_hostile_checkpoints.py (issue 25): one builder per class of attack
on the package's loaders, written byte by byte (opcodes) or with the EDM-style pickler of test_edm_pickle.py.
Each builder takes a folder and returns the file it wrote."""

from __future__ import annotations

import io
import math
import struct
import zipfile

import torch
from test_edm_pickle import (Call, FakeGlobal, Persistent, _module_state, dumps, edm_tree, small_net, storage_blob,
                             tensor_call)

PROTO, STOP, MARK = b"\x80\x04", b".", b"("
EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE, NONE = b"}", b"]", b")", b"N"
TUPLE, TUPLE1, TUPLE2, TUPLE3 = b"t", b"\x85", b"\x86", b"\x87"
REDUCE, BUILD, SETITEM, APPEND, APPENDS, ADDITEMS = b"R", b"b", b"s", b"a", b"e", b"\x90"
NEWTRUE, NEWFALSE, FROZENSET = b"\x88", b"\x89", b"\x91"


def u(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b if len(b) < 256 else b"X" + struct.pack("<I", len(b)) + b


def ux(s: str) -> bytes:
    """BINUNICODE: what torch's weights-only unpickler reads (it has no SHORT_BINUNICODE)."""
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def g(module: str, name: str) -> bytes:
    return u(module) + u(name) + b"\x93"


def i(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def by(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


def put(k: int) -> bytes:
    return b"r" + struct.pack("<I", 100_000 + k)


def get(k: int) -> bytes:
    return b"j" + struct.pack("<I", 100_000 + k)


def wrap(body: bytes) -> bytes:
    """``{"x": <body>}`` as a protocol-4 stream."""
    return PROTO + EMPTY_DICT + u("x") + body + SETITEM + STOP


def body(obj) -> bytes:
    """``obj`` pickled (protocol 3: no frames) without PROTO and STOP, to splice into a stream."""
    return dumps(obj, protocol=3)[2:-1]


def write(folder, name, data: bytes):
    path = folder / name
    path.write_bytes(data)
    return path


# -- numpy -------------------------------------------------------------------------------------------------
DTYPE = g("numpy", "dtype") + u("f8") + NEWFALSE + NEWTRUE + TUPLE3 + REDUCE
DTYPE_STATE = MARK + i(3) + u("<") + NONE + NONE + NONE + i(-1) + i(-1) + i(0) + TUPLE
ARRAY = (g("numpy.core.multiarray", "_reconstruct") + g("numpy", "ndarray") + i(0) + TUPLE1 + b"C\x01b" + TUPLE3
         + REDUCE)


def _array(dtype_ref: bytes) -> bytes:
    return ARRAY + put(1) + MARK + i(1) + i(2) + TUPLE1 + dtype_ref + NEWFALSE + by(b"\0" * 16) + TUPLE + BUILD


def dtype_rebuilt_after_use(d):
    """The dtype passes the numeric check, an array uses it, then a second BUILD re-shapes it."""
    evil_state = MARK + i(3) + u("<") + NONE + NONE + NONE + i(4096) + i(1) + i(0) + TUPLE
    return write(d, "dtype_rebuild.pkl", wrap(EMPTY_LIST + MARK + DTYPE + put(0) + DTYPE_STATE + BUILD
                                              + _array(get(0)) + get(0) + evil_state + BUILD + APPENDS))


def dtype_with_subarray(d):
    """A dtype state with a sub-array (reads past the buffer under numpy's own BUILD)."""
    sub = MARK + i(3) + u("<") + DTYPE + i(100_000) + TUPLE1 + TUPLE2 + NONE + NONE + i(-1) + i(-1) + i(0) + TUPLE
    return write(d, "dtype_subarray.pkl", wrap(DTYPE + sub + BUILD))


def setitem_into_array(d):
    """SETITEM on an array: attacker bytes at an attacker offset of its buffer."""
    return write(d, "setitem_array.pkl", wrap(EMPTY_LIST + MARK + DTYPE + put(0) + DTYPE_STATE + BUILD
                                              + _array(get(0)) + i(1 << 20) + by(b"\xff" * 8) + SETITEM + APPENDS))


def reconstruct_without_build(d):
    """``_reconstruct`` without BUILD: an array over uninitialised heap memory."""
    return write(d, "reconstruct_nobuild.pkl", wrap(ARRAY))


# -- opcodes on objects the reader did not create ------------------------------------------------------------
def _tensor() -> bytes:
    return body(tensor_call(storage_blob(torch.arange(4, dtype=torch.float32)), (4,)))


def setitem_on_tensor(d):
    return write(d, "setitem_tensor.pkl", wrap(_tensor() + i(0) + i(7) + SETITEM))


def appends_on_record(d):
    record = body(Persistent("Linear", _module_state(), "pass\n"))
    return write(d, "appends_record.pkl", wrap(record + MARK + i(1) + APPENDS))


def additems_on_frozenset(d):
    return write(d, "additems_frozenset.pkl", wrap(MARK + i(1) + FROZENSET + MARK + i(2) + ADDITEMS))


def appends_on_used_list(d):
    """A list mutated after it became part of a tuple (and a list appended to itself: a cycle)."""
    return write(d, "appends_sealed.pkl", wrap(EMPTY_LIST + put(0) + TUPLE1 + get(0) + get(0) + APPEND))


def refused_opcode_dup(d):
    return write(d, "dup.pkl", wrap(EMPTY_LIST + b"2" + APPEND))


# -- memory amplification --------------------------------------------------------------------------------------
def bytearray_400mb(d):
    return write(d, "bytearray.pkl", wrap(g("builtins", "bytearray") + i(400_000_000) + TUPLE1 + REDUCE))


def list_of_bytearray(d):
    inner = g("builtins", "bytearray") + i(50_000_000) + TUPLE1 + REDUCE
    return write(d, "list_bytearray.pkl", wrap(g("builtins", "list") + inner + TUPLE1 + REDUCE))


def blob_reparsed(d):
    """One memoised 1 MB storage blob decoded on each of 400 references."""
    blob = storage_blob(torch.zeros(1 << 18, dtype=torch.float32))
    fn = g("torch.storage", "_load_from_bytes") + put(0)
    calls = get(0) + by(blob) + put(1) + TUPLE1 + REDUCE + (get(0) + get(1) + TUPLE1 + REDUCE) * 400
    return write(d, "blob_reparsed.pkl", wrap(fn + POP + EMPTY_LIST + MARK + calls + APPENDS))


POP = b"0"


def huge_bytes_header(d):
    """A 14-byte stream announcing a 1 TB bytes object."""
    return write(d, "huge_bytes.pkl", PROTO + b"\x8e" + struct.pack("<Q", 1 << 40) + STOP)


# -- exponential time ------------------------------------------------------------------------------------------
def _dag(levels: int) -> bytes:
    """Pushes t_levels, t_0 = (), t_k = (t_k-1, t_k-1): 2^levels tuples along its paths, levels + 1 objects."""
    out = EMPTY_TUPLE + put(0) + POP
    for k in range(1, levels + 1):
        out += get(k - 1) + get(k - 1) + TUPLE2 + put(k) + POP
    return out + get(levels)


def dag_as_dict_key(d):
    """A memo-shared tuple DAG whose hash visits 2^60 tuples."""
    return write(d, "dag_key.pkl", wrap(EMPTY_DICT + _dag(60) + i(1) + SETITEM))


def dag_in_frozenset(d):
    return write(d, "dag_frozenset.pkl", wrap(MARK + _dag(60) + FROZENSET))


def dag_as_class_name(d):
    """A persistence record whose class name is a tuple DAG: an error message that repr()s it never ends."""
    meta = (EMPTY_DICT + MARK + u("type") + u("class") + u("version") + i(6) + u("module_src") + u("")
            + u("class_name") + _dag(60) + u("state") + EMPTY_DICT + b"u")
    return write(d, "dag_class_name.pkl", wrap(g("torch_utils.persistence", "_reconstruct_persistent_obj")
                                               + meta + TUPLE1 + REDUCE))


LEVELS = 18  # as deep as Limits.max_depth lets module records nest


def shared_module_tree(d):
    """Module records whose two children are the same record, LEVELS levels: 2^LEVELS paths."""
    rec = Persistent("Linear", _module_state(), "pass\n")
    for _ in range(LEVELS):
        rec = Persistent("UNetBlock", _module_state(modules=[("a", rec), ("b", rec)]), "pass\n")
    ema = Persistent("EDMPrecond", _module_state({"sigma_data": 0.5, "label_dim": 0, "img_resolution": 8,
                                                  "img_channels": 3}, modules=[("model", rec)]), "pass\n")
    return write(d, "shared_tree.pkl", dumps({"ema": ema}))


# -- crashes -------------------------------------------------------------------------------------------------
def deep_tuple(d):
    return write(d, "deep_tuple.pkl", wrap(EMPTY_TUPLE + TUPLE1 * 1_000_000))


def deep_marks(d):
    return write(d, "deep_marks.pkl", PROTO + MARK * 1_000_000 + STOP)


# -- the torch (Score SDE / classifier) path ----------------------------------------------------------------
def torch_zip(d, name, data_pkl: bytes, extra: dict | None = None, deflate: dict | None = None):
    path = d / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/version", b"3\n")
        for k, v in (extra or {}).items():
            zf.writestr(f"archive/{k}", v)
        for k, size in (deflate or {}).items():
            info = zipfile.ZipInfo(f"archive/{k}")
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                chunk = b"\0" * (1 << 20)
                for _ in range(size >> 20):
                    f.write(chunk)
    return path


def zip_bomb(d):
    """A torch zip whose one deflated record expands ~1000x (194 MB from ~190 KB)."""
    pkl = b"\x80\x02" + EMPTY_DICT + STOP
    return torch_zip(d, "zip_bomb.pth", pkl, deflate={"data/0": 194 << 20})


def zip_deep_tuple(d):
    return torch_zip(d, "zip_deep.pth", b"\x80\x02" + EMPTY_TUPLE + TUPLE1 * 1_000_000 + STOP)


def zip_dag_key(d):
    return torch_zip(d, "zip_dag.pth", b"\x80\x02" + EMPTY_DICT + _dag(60) + i(1) + SETITEM + STOP)


def zip_storage_numel(d):
    """A storage id announcing 10^11 floats over a 4-byte record (torch allocates from the id)."""
    pid = MARK + u("storage") + b"ctorch\nFloatStorage\n" + u("0") + u("cpu") + b"\x8a\x05" + (10 ** 11).to_bytes(
        5, "little") + TUPLE + b"Q"
    rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n" + MARK + pid + i(0) + i(1) + TUPLE1 + i(1) + TUPLE1 + NEWFALSE \
        + b"ccollections\nOrderedDict\n" + EMPTY_TUPLE + REDUCE + TUPLE + REDUCE
    return torch_zip(d, "zip_numel.pth", b"\x80\x02" + EMPTY_DICT + u("model") + EMPTY_DICT + u("w") + rebuild
                     + SETITEM + SETITEM + STOP, extra={"data/0": b"\0" * 4})


def zip_dag_value(d):
    """A Score SDE dict whose 'model' entry holds tuple DAGs (allowed by the guard as values, and by torch): the
    refusal names its type, never its repr (2^60 tuples)."""
    dag = EMPTY_TUPLE + put(0) + b"".join(get(k - 1) + get(k - 1) + TUPLE2 + put(k) for k in range(1, 61))
    dag = EMPTY_LIST + MARK + dag + APPENDS  # a list of t_0 ... t_60 (torch's reader has no POP)
    return torch_zip(d, "zip_dag_value.pth", b"\x80\x02" + EMPTY_DICT + ux("model") + EMPTY_DICT + ux("w") + dag
                     + SETITEM + SETITEM + STOP)


# -- load_state: wrong values ----------------------------------------------------------------------------------
def edm_with(d, name, mutate):
    ema = edm_tree(small_net(), "pass\n")
    mutate(ema)
    return write(d, name, dumps({"ema": ema}))


def _linear(ema):
    return ema.state["_modules"]["model"].state["_modules"]["map_layer0"].state


def _first(ema, cls):
    """The state of the first record of class ``cls`` under ``ema`` (depth first)."""
    stack = [ema]
    while stack:
        rec = stack.pop()
        if getattr(rec, "class_name", None) == cls:
            return rec.state
        stack += [c for c in (rec.state.get("_modules") or {}).values() if hasattr(c, "state")][::-1]
    raise AssertionError(f"no {cls} record")


EDM_STATE_CASES = {
    "sigma_data_bigint": lambda e: e.state.update(sigma_data=2 ** 2000),
    "use_fp16_true": lambda e: e.state.update(use_fp16=True),
    "sigma_min_nan": lambda e: e.state.update(sigma_min=math.nan),
    "sigma_max_below_min": lambda e: e.state.update(sigma_max=-1.0),
    "endpoint_false": lambda e: _first(e, "PositionalEmbedding").update(endpoint=False),
    "max_positions_inf": lambda e: _first(e, "PositionalEmbedding").update(max_positions=math.inf),
    "skip_scale_nan": lambda e: _first(e, "UNetBlock").update(skip_scale=math.nan),
    "skip_scale_other": lambda e: _first(e, "UNetBlock").update(skip_scale=1.0),
    "num_heads_other": lambda e: _first(e, "UNetBlock").update(num_heads=7),
    "group_norm_eps_negative": lambda e: _first(e, "GroupNorm").update(eps=-1.0),
    "sigma_data_nan": lambda e: e.state.update(sigma_data=math.nan),
    "sigma_data_missing": lambda e: e.state.pop("sigma_data"),
    "sigma_data_tensor": lambda e: e.state.update(sigma_data=Call(FakeGlobal("torch._utils", "_rebuild_tensor_v2"),
                                                                  Call(FakeGlobal("torch.storage", "_load_from_bytes"),
                                                                       storage_blob(torch.ones(1))), 0, (), (),
                                                                  False, None)),
    "label_dim_half": lambda e: e.state.update(label_dim=0.5),
    "resolution_wrong": lambda e: e.state.update(img_resolution=16),
    "channels_str": lambda e: e.state.update(img_channels="3"),
    "buffer_shadows_parameter": lambda e: _linear(e)["_buffers"].update(weight=_linear(e)["_parameters"]["weight"]),
    "parameter_as_buffer": lambda e: _linear(e)["_buffers"].update(bias=_linear(e)["_parameters"].pop("bias")),
    "dtype_float64": lambda e: _linear(e)["_parameters"].update(bias=_linear(e)["_parameters"]["bias"].double()),
}


def state_dict_file(d, name, legacy: bool):
    """A module's ``state_dict()`` (an OrderedDict with ``_metadata``, float32 and float64 tensors), saved as a
    classifier file is: the legacy format or the zip format."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    net[1].double()
    path = d / name
    torch.save({"state_dict": net.state_dict()}, path, _use_new_zipfile_serialization=not legacy)
    return path


def ordered_dict_build(d):
    """An OrderedDict given attributes other than a state dict's _metadata."""
    od = b"ccollections\nOrderedDict\n" + EMPTY_TUPLE + REDUCE
    return torch_zip(d, "od_build.pth", b"\x80\x02" + od + EMPTY_DICT + ux("__class__") + i(1) + SETITEM + BUILD
                     + STOP)


def bytes_of(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# -- files Python's zip reader and torch's read differently (issue 25 review) ----------------------------------
def _legacy(obj: bytes, keys: bytes) -> bytes:
    """torch's legacy format around a hand-written object pickle and storage-key pickle."""
    import pickle

    head = b"".join(pickle.dumps(x, 2) for x in (0x1950A86A20F9469CFC6C, 1001, {
        "protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    return head + obj + keys


def polyglot_legacy_zip(d):
    """A legacy stream (a deep tuple: torch's reader recurses into a segfault) with a benign torch zip appended:
    a zip to Python's ``is_zipfile``, a legacy file to torch, which decides by the first bytes."""
    obj = b"\x80\x02" + EMPTY_DICT + ux("model") + EMPTY_DICT + SETITEM + NONE + TUPLE1 * 1_000_000 + NONE + SETITEM
    return write(d, "polyglot.pth", _legacy(obj + STOP, b"\x80\x02" + EMPTY_LIST + STOP) + bytes_of({"model": {}}))


def _zip_bytes(records: list) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a duplicate name
            for name, data in records:
                zf.writestr(name, data)
    return out.getvalue()


HOSTILE_PKL = b"\x80\x02" + EMPTY_DICT + ux("model") + EMPTY_DICT + SETITEM + NONE + TUPLE1 * 1_000_000 + NONE \
    + SETITEM + STOP
BENIGN_PKL = b"\x80\x02" + EMPTY_DICT + ux("model") + EMPTY_DICT + SETITEM + STOP


def zip_prefixed(d):
    """A hostile archive followed by a benign one padded so that both central directories sit at the same
    absolute offset: Python's reader (prefix tolerant) reads the benign one, miniz (absolute offsets) the hostile."""
    def build(pkl, pad):
        return _zip_bytes([("archive/data.pkl", pkl), ("archive/version", b"3\n"), ("archive/pad", b"\0" * pad)])

    def cd(raw):
        return struct.unpack("<L", raw[-6:-2])[0]

    hostile = build(HOSTILE_PKL, 0)
    benign = build(BENIGN_PKL, cd(hostile) - cd(build(BENIGN_PKL, 0)))
    assert cd(benign) == cd(hostile)
    return write(d, "zip_prefixed.pth", hostile + benign)


def zip_duplicate_name(d):
    """Two ``data.pkl`` records: Python's reader keeps the last (benign), another reader may take the first."""
    return write(d, "zip_dup.pth", _zip_bytes([("archive/data.pkl", HOSTILE_PKL), ("archive/data.pkl", BENIGN_PKL),
                                               ("archive/version", b"3\n")]))


def zip_many_entries(d, n=100_001, declared=None, name="zip_many.pth"):
    """More records than ``Limits.max_zip_entries``: refused from the end record, before any entry is parsed
    (``declared``: the count the end records give, if not ``n``)."""
    local, central, pos = [], [], 0
    for k in range(n):
        rec_name = b"archive/%06d" % k
        local.append(b"PK\x03\x04" + struct.pack("<5H3L2H", 20, 0, 0, 0, 0, 0, 0, 0, len(rec_name), 0) + rec_name)
        central.append(b"PK\x01\x02" + struct.pack("<6H3L5H2L", 20, 20, 0, 0, 0, 0, 0, 0, 0, len(rec_name), 0, 0, 0,
                                                   0, 0, pos) + rec_name)
        pos += len(local[-1])
    cd = b"".join(central)
    n = n if declared is None else declared
    eocd = b"PK\x05\x06" + struct.pack("<4H2LH", 0, 0, 0xFFFF, 0xFFFF, len(cd), pos, 0)
    loc = b"PK\x06\x07" + struct.pack("<LQL", 0, pos + len(cd), 1)
    rec = b"PK\x06\x06" + struct.pack("<Q2H2L4Q", 44, 45, 45, 0, 0, n, n, len(cd), pos)
    return write(d, name, b"".join(local) + cd + rec + loc + eocd)


def legacy_key_dag(d):
    """A legacy file whose storage-key list holds a memo-shared tuple DAG (2^60 tuples to hash or print)."""
    return write(d, "legacy_key_dag.pth", _legacy(b"\x80\x02" + EMPTY_DICT + STOP,
                                                  b"\x80\x02" + EMPTY_LIST + MARK + _dag(60) + APPENDS + STOP))


def legacy_int_key(d):
    """A legacy file whose storage key is the int of its (string) persistent-id key: torch's lookup fails."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    import pickle

    f = io.BytesIO(raw)
    for _ in range(4):
        _SkipUnpickler(f).load()
    start = f.tell()
    key = _SkipUnpickler(f).load()[0]
    return write(d, "legacy_intkey.pth", raw[:start] + pickle.dumps([int(key)], 2) + raw[f.tell():])


class _SkipUnpickler(__import__("pickle").Unpickler):
    def persistent_load(self, pid):
        return None

    def find_class(self, module, name):
        return lambda *a, **k: None


def long_module_name(d, n=2000, length=1 << 20):
    """A 1 MB module name over a child with ``n`` parameters, all one memoised tensor: n paths of 1 MB each."""
    t = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    child = Persistent("Linear", _module_state(params=[(f"p{k}", t) for k in range(n)]), "pass\n")
    ema = Persistent("EDMPrecond", _module_state({"sigma_data": 0.5, "label_dim": 0, "img_resolution": 8,
                                                  "img_channels": 3}, modules=[("m" * length, child)]), "pass\n")
    return write(d, "long_name.pkl", dumps({"ema": ema}))


def many_long_paths(d, n=4000, depth=8):
    """Names under the per-name bound, nested ``depth`` deep, over ``n`` memoised tensors: the sum of the paths
    is bounded too."""
    t = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    rec = Persistent("Linear", _module_state(params=[(f"p{k}", t) for k in range(n)]), "pass\n")
    for k in range(depth):
        rec = Persistent("UNetBlock", _module_state(modules=[(f"{k}" + "n" * 250, rec)]), "pass\n")
    ema = Persistent("EDMPrecond", _module_state({"sigma_data": 0.5, "label_dim": 0, "img_resolution": 8,
                                                  "img_channels": 3}, modules=[("model", rec)]), "pass\n")
    return write(d, "long_paths.pkl", dumps({"ema": ema}))


def dtype_not_numpy(d, spec="i16"):
    """A numpy array whose dtype string looks numeric but names no numpy type."""
    dt = g("numpy", "dtype") + u(spec) + NEWFALSE + NEWTRUE + TUPLE3 + REDUCE + DTYPE_STATE + BUILD
    return write(d, f"dtype_{spec}.pkl", wrap(ARRAY + MARK + i(1) + i(2) + TUPLE1 + dt + NEWFALSE + by(b"\0" * 32)
                                              + TUPLE + BUILD))


def astral_string(d, n=1 << 20):
    """One string of ``n`` UTF-8 bytes, all ASCII but one astral character: ~n characters of 4 bytes in memory."""
    return write(d, "astral.pkl", wrap(ux("a" * (n - 4) + "\U0001F600")))
