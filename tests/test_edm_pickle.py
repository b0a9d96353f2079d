"""The safe reader of EDM's pickles (dbprepro.models.edm_pickle) and EDMSongUNet.load_state (issue 18).

The pickles are written here, without dnnlib or torch_utils, by :class:`EDMStylePickler`: the
stream EDM's ``pickle.dump`` writes (protocol 4; see ../shared/reference/paper-scale-networks.md
§3.1) -- each persistent-class object as ``torch_utils.persistence._reconstruct_persistent_obj(meta)``
(STACK_GLOBAL + REDUCE, meta = {type, version 6, module_src, class_name, state}), ``ModuleDict`` as
NEWOBJ + BUILD, numpy float64 attributes as ``numpy.core.multiarray.scalar``, and the tensors
pickled by torch itself (``_rebuild_parameter`` / ``_rebuild_tensor_v2`` around
``torch.storage._load_from_bytes`` of a legacy ``torch.save`` blob).  Every ``module_src`` written
here would leave a marker file and set a global if it ever ran.
"""

import builtins
import hashlib
import io
import math
import os
import pickle
import struct
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

from dbprepro.models.edm_net import EDMSongUNet
from dbprepro.models.edm_pickle import (
    ContainerRecord, PersistentRecord, UnsafePickleError, ema_state_dict, module_tensors, read_edm_pickle)
from dbprepro.models.verification import CheckpointError

SMALL = {"img_resolution": 8, "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]}
FLAG = "DBPREPRO_EDM_PAYLOAD_RAN"


# -- writing EDM-style pickles without EDM's packages ---------------------------------------------
class FakeGlobal:
    """A global written by name (``module.name``) without importing it."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args, **kwargs):  # pickle wants callables in reduce tuples; never called
        raise AssertionError("a FakeGlobal was called")


RECONSTRUCT = FakeGlobal("torch_utils.persistence", "_reconstruct_persistent_obj")


class Call:
    """Pickles as ``fn(*args)``."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class CallWithState(Call):
    """Pickles as ``fn(*args)`` followed by BUILD with ``state``."""

    def __init__(self, fn, args, state):
        super().__init__(fn, *args)
        self.state = state

    def __reduce__(self):
        return self.fn, self.args, self.state


class Persistent:
    """An object of a ``torch_utils.persistence`` class, as its ``__reduce__`` emits it."""

    def __init__(self, class_name, state, module_src):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name, state=self.state)
        return RECONSTRUCT, (meta,), None


class ModuleDictObj:
    def __init__(self, state):
        self.state = state


def F64(value):
    """A numpy float64 as numpy 1.x pickles it."""
    return Call(FakeGlobal("numpy.core.multiarray", "scalar"), np.dtype("float64"), struct.pack("<d", value))


class EDMStylePickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_fake_global(self, obj):
        if self.proto >= 4:
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    def _save_module_dict(self, obj):  # what object.__reduce_ex__(4) gives a ModuleDict
        self.save(FakeGlobal("torch.nn.modules.container", "ModuleDict"))
        self.save(())
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        self.save(obj.state)
        self.write(pickle.BUILD)

    dispatch[FakeGlobal] = _save_fake_global
    dispatch[ModuleDictObj] = _save_module_dict


def dumps(obj, protocol=4):
    buf = io.BytesIO()
    EDMStylePickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def payload_src(marker):
    """Module source that, if executed, leaves ``marker`` and sets builtins.<FLAG>."""
    return (f"import builtins, pathlib\nbuiltins.{FLAG} = True\npathlib.Path({str(marker)!r}).write_text('ran')\n"
            "class EDMPrecond:\n    pass\n")


_EDM_CLASS = {"EDMSongUNet": "EDMPrecond", "SongUNet": "SongUNet", "UNetBlock": "UNetBlock", "Linear": "Linear",
              "Conv2d": "Conv2d", "GroupNorm": "GroupNorm"}


def _module_state(extra=None, params=(), buffers=(), modules=()):
    state = {"training": False, "_parameters": OrderedDict(params), "_buffers": OrderedDict(buffers),
             "_non_persistent_buffers_set": set(), "_backward_hooks": OrderedDict(), "_is_full_backward_hook": None,
             "_forward_hooks": OrderedDict(), "_forward_pre_hooks": OrderedDict(), "_state_dict_hooks": OrderedDict(),
             "_load_state_dict_pre_hooks": OrderedDict(), "_load_state_dict_post_hooks": OrderedDict(),
             "_modules": OrderedDict(modules)}
    state.update(extra or {})
    return state


def edm_tree(module, src):
    """EDM's pickled form of one of our modules: persistent records with EDM's class names and
    instance states (Parameters with requires_grad False, as in the EMA copy)."""
    if isinstance(module, torch.nn.ModuleDict):
        return ModuleDictObj(_module_state(modules=[(n, edm_tree(c, src)) for n, c in module.named_children()]))
    name = _EDM_CLASS[type(module).__name__]
    params = [(n, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
              for n, p in module.named_parameters(recurse=False)]
    buffers = [(n, b.detach().clone()) for n, b in module.named_buffers(recurse=False)]
    modules = [(n, edm_tree(c, src)) for n, c in module.named_children()]
    extra = {"_init_args": (), "_init_kwargs": {}}
    if name == "Conv2d" and not buffers:
        buffers = [("resample_filter", None)]  # EDM registers None when the conv does not resample
    if name == "UNetBlock":
        extra.update(skip_scale=F64(math.sqrt(0.5)), adaptive_scale=False, dropout=0.13,
                     _init_kwargs={"init_attn": {"init_mode": "xavier_uniform", "init_weight": F64(math.sqrt(0.2))},
                                   "resample_filter": [1, 1]})
    if name == "SongUNet":
        noise = Persistent("PositionalEmbedding", _module_state({"num_channels": 8, "max_positions": 10000,
                                                                 "endpoint": True}), src)
        modules = [("map_noise", noise), *modules]
        extra.update(label_dropout=0, map_label=None)
    if name == "EDMPrecond":
        extra.update(img_resolution=8, img_channels=3, label_dim=0, use_fp16=False, sigma_min=0,
                     sigma_max=float("inf"), sigma_data=0.5,
                     _init_kwargs={"model_type": "SongUNet", "augment_dim": 9, "channel_mult": [1, 2]})
    return Persistent(name, _module_state(extra, params, buffers, modules), src)


def edm_pickle_bytes(net, src, ema_class="EDMPrecond", sigma_data=0.5):
    ema = edm_tree(net, src)
    ema.class_name = ema_class
    ema.state["sigma_data"] = sigma_data
    return dumps({
        "ema": ema,
        "loss_fn": Persistent("EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5, "_init_args": (),
                                          "_init_kwargs": {}}, src),
        "augment_pipe": Persistent("AugmentPipe", {"p": 0.12, "xflip": 100000000.0, "yflip": 1, "scale": 1,
                                                   "rotate_frac": 0, "aniso": 1, "translate_frac": 1,
                                                   "_init_args": (), "_init_kwargs": {}}, src),
        "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "datasets/cifar10-32x32.zip",
                           "use_labels": False, "xflip": False, "cache": True, "resolution": 8, "max_size": 50000},
    })


def small_net(seed=0):
    torch.manual_seed(seed)
    net = EDMSongUNet.from_config(SMALL)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return net


def storage_blob(values, location="cpu", pid=None, storage_class=FakeGlobal("torch", "FloatStorage")):
    """A legacy torch.save of one storage, as torch 1.12's TypedStorage.__reduce__ writes it."""
    buf, target = io.BytesIO(), object()
    for obj in (0x1950A86A20F9469CFC6C, 1001,
                {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        EDMStylePickler(buf, protocol=2).dump(obj)

    class WithPid(EDMStylePickler):
        def persistent_id(self, obj):
            if obj is target:
                return pid or ("storage", storage_class, "94102410283552", location, values.numel(), None)
            return None

    WithPid(buf, protocol=2).dump(target)
    EDMStylePickler(buf, protocol=2).dump(["94102410283552"])
    buf.write(struct.pack("<q", values.numel()) + values.numpy().tobytes())
    return buf.getvalue()


def tensor_call(blob, size, stride=None, offset=0):
    stride = stride or tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    storage = Call(FakeGlobal("torch.storage", "_load_from_bytes"), blob)
    return Call(FakeGlobal("torch._utils", "_rebuild_tensor_v2"), storage, offset, tuple(size), stride, False,
                OrderedDict())


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "payload-ran.txt"
    yield path
    assert not path.exists(), "a payload ran"
    assert not hasattr(builtins, FLAG), "a payload ran"
    assert "dnnlib" not in sys.modules and "torch_utils" not in sys.modules
    assert not any(m.startswith(("dnnlib.", "torch_utils.", "_imported_module_")) for m in sys.modules)


def write(tmp_path, data, name="edm.pkl"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn, make_args, named", [
    (os.system, lambda m: (f"touch {m}",), f"{os.system.__module__}.system"),
    (builtins.eval, lambda m: (f"__import__('pathlib').Path({str(m)!r}).write_text('x')",), "builtins.eval"),
    (builtins.exec, lambda m: (f"import builtins, pathlib; builtins.{FLAG} = True; "
                               f"pathlib.Path({str(m)!r}).write_text('x')",), "builtins.exec"),
    (subprocess.Popen, lambda m: (["touch", str(m)],), "subprocess.Popen"),
    (getattr, lambda m: ("x", "upper"), "builtins.getattr"),
])
def test_code_is_refused_by_name(tmp_path, marker, fn, make_args, named):
    """A reduce whose call would run code is refused with the global's name, anywhere in the stream
    (at the top and inside a persistent record's state); it never runs."""
    args = make_args(marker)
    for obj in ({"ema": Call(fn, *args)},
                {"ema": Persistent("EDMPrecond", _module_state({"x": Call(fn, *args)}), "pass\n")}):
        with pytest.raises(UnsafePickleError, match=named.replace(".", r"\.")):
            read_edm_pickle(write(tmp_path, dumps(obj)))


def test_other_unknown_globals_are_refused_by_name(tmp_path, marker):
    for fn, named in [(FakeGlobal("dnnlib.util", "EasyDict"), "dnnlib.util.EasyDict"),
                      (FakeGlobal("torch_utils.persistence", "_src_to_module"),
                       "torch_utils.persistence._src_to_module"),
                      (FakeGlobal("copyreg", "_reconstructor"), "copyreg._reconstructor"),
                      (FakeGlobal("torch", "load"), "torch.load"),
                      (FakeGlobal("tests.evil", "Anything"), "tests.evil.Anything")]:
        with pytest.raises(UnsafePickleError, match=named.replace(".", r"\.")):
            read_edm_pickle(write(tmp_path, dumps({"ema": Call(fn, "x")})))


def test_build_only_fills_records_and_numpy(tmp_path, marker):
    """BUILD (``__setstate__`` / attribute setting) on anything but a ModuleDict record, a numpy dtype
    or array is refused: the stream cannot modify a tensor, a container or a stand-in."""
    blob = storage_blob(torch.arange(4, dtype=torch.float32))
    storage = Call(FakeGlobal("torch.storage", "_load_from_bytes"), blob)
    rebuild = FakeGlobal("torch._utils", "_rebuild_tensor_v2")
    for obj, message in [(CallWithState(OrderedDict, (), {"a": 1}), r"BUILD of an OrderedDict with dict of 1"),
                         (CallWithState(rebuild, (storage, 0, (4,), (1,), False, OrderedDict()), (True, None, None)),
                          r"BUILD on torch\.Tensor")]:
        with pytest.raises(UnsafePickleError, match=message):
            read_edm_pickle(write(tmp_path, dumps({"x": obj})))


def test_persistence_payload_is_parsed_as_data_never_executed(tmp_path, marker):
    """A persistence record whose module_src would leave a marker file and set a global when executed
    (what torch_utils.persistence does on load): read as data, the source hashed, nothing run."""
    src = payload_src(marker)
    record = Persistent("EDMPrecond", _module_state({"sigma_data": 0.5}), src)
    data = read_edm_pickle(write(tmp_path, dumps({"ema": record})))
    rec = data["ema"]
    assert isinstance(rec, PersistentRecord) and rec.class_name == "EDMPrecond" and rec.version == 6
    assert rec.module_src_sha256 == hashlib.sha256(src.encode()).hexdigest()
    assert rec.state["sigma_data"] == 0.5 and src not in repr(rec)


@pytest.mark.parametrize("change, message", [
    ({"class_name": "EvilClass"}, "EvilClass"),
    ({"version": 5}, "version 5"),
    ({"type": "function"}, "'function'"),
    ({"module_src": b"bytes"}, "module_src"),
    ({"state": [1, 2]}, "state is list of 2"),
    ({"extra": 1}, "unexpected fields"),
])
def test_malformed_persistence_records_are_refused(tmp_path, marker, change, message):
    meta = dict(type="class", version=6, module_src=payload_src(marker), class_name="EDMPrecond", state={})
    meta.update(change)
    with pytest.raises(UnsafePickleError, match=message):
        read_edm_pickle(write(tmp_path, dumps({"ema": Call(RECONSTRUCT, meta)})))


def test_storage_blob_refusals(tmp_path, marker):
    vals = torch.arange(6, dtype=torch.float32)
    cases = [
        (storage_blob(vals, pid=("module", FakeGlobal("torch", "FloatStorage"), "k", "cpu", 6, None)), "persistent id"),
        (storage_blob(vals, storage_class=FakeGlobal("builtins", "eval")), r"storage blob: refused global builtins\.eval"),
        (storage_blob(vals, storage_class=FakeGlobal("os", "system")), r"os\.system"),
        (storage_blob(vals)[:-4], "data bytes"),
        (b"\x80\x02K\x01.", "storage blob"),
    ]
    for blob, message in cases:
        with pytest.raises(UnsafePickleError, match=message):
            read_edm_pickle(write(tmp_path, dumps({"t": tensor_call(blob, (6,))})))
    with pytest.raises(UnsafePickleError, match="overruns"):  # a view past the end of its storage
        read_edm_pickle(write(tmp_path, dumps({"t": tensor_call(storage_blob(vals), (2, 3), (4, 1))})))

    class OuterPid(EDMStylePickler):
        def persistent_id(self, obj):
            return ("storage", "x") if isinstance(obj, list) else None

    buf = io.BytesIO()
    OuterPid(buf, protocol=4).dump({"ema": [1]})
    with pytest.raises(UnsafePickleError, match="persistent id"):  # the outer stream has none
        read_edm_pickle(write(tmp_path, buf.getvalue()))


def test_numpy_object_arrays_are_refused_numeric_ones_read(tmp_path, marker):
    with pytest.raises(UnsafePickleError, match="numpy dtype"):
        read_edm_pickle(write(tmp_path, pickle.dumps({"a": np.array([1, "x"], dtype=object)}, protocol=4)))
    data = read_edm_pickle(write(tmp_path, pickle.dumps({"a": np.arange(6.0).reshape(2, 3), "s": np.float64(0.25),
                                                         "i": np.int64(7)}, protocol=4)))
    assert np.array_equal(np.asarray(data["a"]), np.arange(6.0).reshape(2, 3))
    assert data["s"] == 0.25 and isinstance(data["s"], float) and data["i"] == 7


# -- the benign stream ---------------------------------------------------------------------------
def test_storages_are_read_onto_the_cpu_exactly(tmp_path, marker):
    vals = torch.randn(12, dtype=torch.float32)
    data = read_edm_pickle(write(tmp_path, dumps({"cpu": tensor_call(storage_blob(vals), (3, 4)),
                                                  "cuda": tensor_call(storage_blob(vals, location="cuda:0"), (3, 4)),
                                                  "view": tensor_call(storage_blob(vals), (2, 2), (4, 1), offset=5)})))
    assert data["cpu"].device.type == "cpu" and data["cuda"].device.type == "cpu"
    assert torch.equal(data["cpu"], vals.reshape(3, 4)) and torch.equal(data["cuda"], vals.reshape(3, 4))
    assert torch.equal(data["view"], vals.as_strided((2, 2), (4, 1), 5))
    doubles = torch.randn(5, dtype=torch.float64)
    blob = storage_blob(doubles, storage_class=FakeGlobal("torch", "DoubleStorage"))
    assert torch.equal(read_edm_pickle(write(tmp_path, dumps({"d": tensor_call(blob, (5,))})))["d"], doubles)


def test_edm_structured_pickle_is_recovered_exactly(tmp_path, marker):
    """A pickle with EDM's structure (§3.1: protocol 4, persistent records, ModuleDict, numpy float64
    attributes, torch-pickled parameters): every tensor comes back exactly under its state-dict key."""
    net = small_net()
    raw = edm_pickle_bytes(net, payload_src(marker))
    assert raw[:3] == b"\x80\x04\x95"  # PROTO 4, FRAME: what pickle.dump wrote in Python 3.8
    assert b"_reconstruct_persistent_obj" in raw and b"_load_from_bytes" in raw and b"ModuleDict" in raw
    data = read_edm_pickle(write(tmp_path, raw))
    assert set(data) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"}
    assert [data[k].class_name for k in ("ema", "loss_fn", "augment_pipe")] == ["EDMPrecond", "EDMLoss", "AugmentPipe"]
    assert data["dataset_kwargs"]["resolution"] == 8 and data["loss_fn"].state["P_std"] == 1.2
    song = data["ema"].state["_modules"]["model"]
    assert isinstance(song.state["_modules"]["enc"], ContainerRecord)
    block = song.state["_modules"]["enc"].state["_modules"]["4x4_block0"]
    assert block.state["skip_scale"] == math.sqrt(0.5)
    state, attrs = ema_state_dict(data)
    own = net.state_dict()
    assert list(state) == list(own)  # the same keys, in the same order
    for key, value in own.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    assert attrs["sigma_data"] == 0.5 and attrs["label_dim"] == 0
    walked = module_tensors(song, "model.")
    assert list(walked) == list(state) and all(walked[k] is state[k] for k in state)


def test_load_state_into_a_small_songunet(tmp_path, marker):
    net = small_net()
    path = write(tmp_path, edm_pickle_bytes(net, payload_src(marker)))
    loaded = EDMSongUNet.load_state(path, SMALL)
    assert not loaded.training
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded.eps(x, 0.4), net.eps(x, 0.4))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    EDMSongUNet.load_state(path, SMALL, sha256=sha)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        EDMSongUNet.load_state(path, SMALL, sha256="0" * 64)


def test_load_state_reads_the_class_and_names_mismatches(tmp_path, marker):
    net, src = small_net(), payload_src(marker)
    with pytest.raises(CheckpointError, match="VPPrecond"):  # the class recorded in the pickle decides
        EDMSongUNet.load_state(write(tmp_path, edm_pickle_bytes(net, src, ema_class="VPPrecond")), SMALL)
    with pytest.raises(CheckpointError, match="sigma_data"):
        EDMSongUNet.load_state(write(tmp_path, edm_pickle_bytes(net, src, sigma_data=1.0)), SMALL)
    path = write(tmp_path, edm_pickle_bytes(net, src))
    with pytest.raises(CheckpointError, match=r"shape mismatch: model\.map_augment\.weight is \(8, 9\)"):
        EDMSongUNet.load_state(path, {**SMALL, "augment_dim": 10})
    with pytest.raises(CheckpointError, match=r"not in the model: model\.map_augment\.weight"):
        EDMSongUNet.load_state(path, {**SMALL, "augment_dim": 0})
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: model\.enc\.8x8_block1"):
        EDMSongUNet.load_state(path, {**SMALL, "num_blocks": 2})


def test_the_payload_is_live_under_the_ordinary_loader(tmp_path, marker):
    """Positive control: with a stand-in ``torch_utils.persistence`` that does what the real one does
    on load (exec module_src), a plain ``pickle.load`` of the test pickle runs the payload (in a
    subprocess) -- so the stream really carries code, and the restricted reader's refusal to run it is
    what keeps the marker absent."""
    control = tmp_path / "control-ran.txt"
    pkg = tmp_path / "site" / "torch_utils"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "persistence.py").write_text(
        "import types\n"
        "def _reconstruct_persistent_obj(meta):\n"
        "    module = types.ModuleType('_imported_module_control')\n"
        "    exec(meta['module_src'], module.__dict__)\n"
        "    return meta['class_name']\n")
    path = write(tmp_path, edm_pickle_bytes(small_net(), payload_src(control)))
    code = f"import pickle; pickle.load(open({str(path)!r}, 'rb'))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert control.exists()
    control.unlink()
    read_edm_pickle(path)  # the same bytes through the restricted reader: nothing runs
    assert not control.exists() and "torch_utils" not in sys.modules and not hasattr(builtins, FLAG)


def test_large_storage_blobs_are_read_in_place_and_checked(tmp_path, marker):
    """A blob of at least LARGE_BYTES is read straight from the file into the tensor (StorageBlob): the same
    values, and the same refusals as a small one."""
    vals = torch.randn(3000, dtype=torch.float32)
    data = read_edm_pickle(write(tmp_path, dumps({"t": tensor_call(storage_blob(vals), (30, 100))})))
    assert torch.equal(data["t"], vals.reshape(30, 100))
    for blob, message in [
        (storage_blob(vals)[:-4], r"storage blob of \d+ bytes: header and 3000 torch.float32 elements take \d+"),
        (storage_blob(vals, pid=("module", FakeGlobal("torch", "FloatStorage"), "k", "cpu", 3000, None)),
         "refused persistent id"),
        (storage_blob(vals, storage_class=FakeGlobal("os", "system")), r"storage blob: refused global os\.system"),
    ]:
        with pytest.raises(UnsafePickleError, match=message):
            read_edm_pickle(write(tmp_path, dumps({"t": tensor_call(blob, (3000,))})))
