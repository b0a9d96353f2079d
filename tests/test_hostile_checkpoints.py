"""Hostile checkpoint files (issue 25): one crafted file per class of attack on the package's public loaders
(``read_edm_pickle``, ``EDMSongUNet.load_state``, ``DDPMpp.load_state``, ``load_state_dict``), each refused with
a named error, in bounded time and memory, with no crash; and benign files of both formats loading exactly.

Every file is loaded in a child process under ``RLIMIT_AS`` (:data:`MEMORY_LIMIT`) and a timeout, so a
regression (a segfault, a hang, a 400 MB allocation) fails its test instead of taking pytest down; a child that
dies is restarted after the case it died on.  The files are written by ``tests/hostile_files.py``.
"""

from __future__ import annotations

import hashlib
import json
import resource
import subprocess
import sys

import pytest
import torch

import hostile_files as H
from test_ddpmpp import SMALL as DDPM_SMALL, _stand_in_checkpoint
from test_edm_pickle import SMALL, edm_pickle_bytes, small_net

MEMORY_LIMIT = 2 << 30  # address space of a child: torch and the package take ~0.9 GB of it
CASE_SECONDS = 10.0  # the most any one refusal may take
RSS_GROWTH_MB = 200  # the most any one refusal may add to the child's peak resident memory
TIMEOUT = 60  # seconds of a child's start-up (imports) beyond 5 s per case

CHILD = r"""
import hashlib, json, resource, sys, time
import torch
from dbprepro.models.ddpmpp import DDPMpp
from dbprepro.models.edm_net import EDMSongUNet
from dbprepro.models.edm_pickle import ema_state_dict, read_edm_pickle
from dbprepro.models.safe_pickle import Limits
from dbprepro.models.verification import load_state_dict

def digest(sd):
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode() + str(sd[k].dtype).encode() + sd[k].detach().contiguous().numpy().tobytes())
    return h.hexdigest()

LOADERS = {
    "edm": lambda p, lim, cfg: (read_edm_pickle(p, Limits(**lim)), "read")[1],
    "edm_ema": lambda p, lim, cfg: digest(ema_state_dict(p)[0]),
    "edm_state": lambda p, lim, cfg: digest(EDMSongUNet.load_state(p, cfg).state_dict()),
    "ddpmpp": lambda p, lim, cfg: digest(DDPMpp.load_state(p, cfg).state_dict()),
    "torch_file": lambda p, lim, cfg: digest(load_state_dict(p)),
}
jobs = json.load(open(sys.argv[1]))
for n in range(int(sys.argv[2]), len(jobs)):
    job = jobs[n]
    print(json.dumps({"start": n}), flush=True)
    rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    try:
        res = {"ok": True, "digest": LOADERS[job["loader"]](job["path"], job["limits"], job["cfg"])}
    except Exception as e:
        res = {"ok": False, "types": [c.__name__ for c in type(e).__mro__], "message": str(e)[:3000]}
    res.update(case=n, seconds=time.monotonic() - t0,
               rss_growth_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
    print(json.dumps(res), flush=True)
"""

# name: (builder, loader, config, limits, expected error class, regex the message must match)
EDM_REFUSALS = {
    "dtype_rebuilt_after_use": (H.dtype_rebuilt_after_use, r"refused opcode BUILD on a sealed .*DtypeRecord"),
    "dtype_with_subarray": (H.dtype_with_subarray, r"refused BUILD of numpy dtype: only a byte order"),
    "setitem_into_array": (H.setitem_into_array, r"refused opcode SETITEM on .*ArrayRecord"),
    "reconstruct_without_build": (H.reconstruct_without_build, r"ArrayRecord without its BUILD"),
    "setitem_on_tensor": (H.setitem_on_tensor, r"refused opcode SETITEM on torch\.Tensor"),
    "appends_on_record": (H.appends_on_record, r"refused opcode APPENDS on .*PersistentRecord"),
    "additems_on_frozenset": (H.additems_on_frozenset, r"refused opcode ADDITEMS on builtins\.frozenset"),
    "appends_on_used_list": (H.appends_on_used_list, r"refused opcode APPEND on a sealed builtins\.list"),
    "refused_opcode_dup": (H.refused_opcode_dup, r"refused opcode DUP"),
    "bytearray_400mb": (H.bytearray_400mb, r"refused global builtins\.bytearray"),
    "list_of_bytearray": (H.list_of_bytearray, r"refused global builtins\.list"),
    "blob_reparsed": (H.blob_reparsed, r"_load_from_bytes of a storage blob already decoded"),
    "huge_bytes_header": (H.huge_bytes_header, r"bytes would allocate 1099511627776 bytes"),
    "dag_as_dict_key": (H.dag_as_dict_key, r"refused SETITEM: key/member tuple of 2"),
    "dag_in_frozenset": (H.dag_in_frozenset, r"refused FROZENSET: key/member tuple of 2"),
    "dag_as_class_name": (H.dag_as_class_name, r"refused persistent class tuple of 2"),
    "deep_tuple": (H.deep_tuple, r"nesting deeper than 100 \(Limits\.max_depth\)"),
    "deep_marks": (H.deep_marks, r"MARKs nested deeper than 100"),
    **{f"dtype_{spec}": ((lambda sp: lambda d: H.dtype_not_numpy(d, sp))(spec),
                         rf"refused numpy dtype '{spec}': only the numeric type strings of edm_pickle\.NUMPY_NUMERIC")
       for spec in ("i16", "u16", "float8", "int128", "complex8")},
}
CASES = {name: (b, "edm", None, {}, "UnsafePickleError", rx) for name, (b, rx) in EDM_REFUSALS.items()}
CASES.update({
    "shared_module_tree": (H.shared_module_tree, "edm_ema", None, {}, "UnsafePickleError",
                           r"model(\.a)+\.b: a module record reached twice"),
    "long_module_name": (H.long_module_name, "edm_ema", None, {}, "UnsafePickleError",
                         r"_modules key 'm{60}'\.\.\. makes a path of 1048576 characters"),
    "many_long_paths": (H.many_long_paths, "edm_ema", None, {}, "UnsafePickleError",
                        r"makes a path of \d+ characters, \d+ in all .*all paths 4194304 characters"),
    "limit_file_size": (lambda d: H.deep_marks(d), "edm", None, {"max_file_bytes": 1000}, "LimitExceeded",
                        r"more than Limits\.max_file_bytes = 1000"),
    "limit_objects": (lambda d: H.write(d, "many.pkl", H.wrap(H.EMPTY_LIST + H.MARK + H.i(1) * 5000 + H.APPENDS)),
                      "edm", None, {"max_objects": 1000}, "LimitExceeded", r"more than 1000 objects"),
    "many_small_values": (lambda d: H.write(d, "small_values.pkl", H.wrap(H.EMPTY_LIST + H.MARK + H.u("ab") * 1_000_000
                                                                          + H.APPENDS)),
                          "edm", None, {}, "LimitExceeded", r"would allocate \d+ bytes; the allocation bound"),
    "string_in_memory_size": (H.astral_string, "edm", None, {"alloc_ratio": 2.0, "alloc_slack": 0}, "LimitExceeded",
                              r"a string would allocate \d+ bytes; the allocation bound"),
    "limit_wall_clock": (lambda d: H.write(d, "benign_slow.pkl", edm_pickle_bytes(small_net(), "pass\n")), "edm",
                         None, {"max_seconds": 0.0}, "LimitExceeded", r"wall-clock bound of 0 s passed"),
    "limit_allocation": (lambda d: H.write(d, "benign_alloc.pkl", edm_pickle_bytes(small_net(), "pass\n")), "edm",
                         None, {"alloc_ratio": 0.5, "alloc_slack": 0}, "LimitExceeded", r"allocation bound"),
    "zip_bomb": (H.zip_bomb, "ddpmpp", DDPM_SMALL, {}, "LimitExceeded", r"zip record 'archive/data/0'.*zip bomb"),
    "zip_deep_tuple": (H.zip_deep_tuple, "ddpmpp", DDPM_SMALL, {}, "LimitExceeded", r"data\.pkl: nesting deeper"),
    "zip_dag_key": (H.zip_dag_key, "torch_file", None, {}, "UnsafePickleError", r"key/member tuple of 2"),
    "zip_storage_numel": (H.zip_storage_numel, "ddpmpp", DDPM_SMALL, {}, "UnsafePickleError",
                          r"storage '0' declares 400000000000 bytes, its record 'archive/data/0' has 4"),
    "ordered_dict_build": (H.ordered_dict_build, "torch_file", None, {}, "UnsafePickleError",
                           r"refused BUILD of an OrderedDict with dict of 1 \(only a state dict's _metadata"),
    "polyglot_legacy_zip": (H.polyglot_legacy_zip, "torch_file", None, {}, "UnsafePickleError",
                            r"not a zip by its first bytes but holding a zip end record"),
    "zip_prefixed": (H.zip_prefixed, "torch_file", None, {}, "UnsafePickleError",
                     r"central directory at \d+ of \d+ bytes does not end at the end records"),
    "zip_duplicate_name": (H.zip_duplicate_name, "torch_file", None, {}, "UnsafePickleError",
                           r"two records named 'archive/data\.pkl'"),
    "zip_many_entries": (H.zip_many_entries, "torch_file", None, {}, "LimitExceeded",
                         r"100001 zip records \(Limits\.max_zip_entries = 100000\)"),
    "zip_entries_beyond_count": (lambda d: H.zip_many_entries(d, 3, declared=1, name="zip_beyond.pth"), "torch_file",
                                 None, {}, "UnsafePickleError",
                                 r"\d+ bytes in the central directory after its 1 declared entries"),
    "legacy_key_dag": (H.legacy_key_dag, "torch_file", None, {}, "UnsafePickleError",
                       r"a storage key that is not a string \(tuple of 2\)"),
    "legacy_int_key": (H.legacy_int_key, "torch_file", None, {}, "UnsafePickleError",
                       r"a storage key that is not a string \(\d+\)"),
    "zip_dag_value": (H.zip_dag_value, "ddpmpp", DDPM_SMALL, {}, "CheckpointError",
                      r"model\['w'\] is a list, not a tensor"),
})
STATE_MESSAGES = {
    "sigma_data_nan": r"sigma_data is nan, not a valid value", "sigma_data_missing": r"has no sigma_data",
    "sigma_data_tensor": r"sigma_data is a Tensor, not a valid value", "label_dim_half": r"label_dim is 0\.5",
    "resolution_wrong": r"img_resolution 16; the config has 8", "channels_str": r"img_channels is '3'",
    "buffer_shadows_parameter": r"model\.map_layer0\.weight is both in _parameters and _buffers",
    "parameter_as_buffer": r"model\.map_layer0\.bias is a buffer in the checkpoint but a parameter",
    "dtype_float64": r"model\.map_layer0\.bias is torch\.float64 in the checkpoint, torch\.float32",
    "sigma_data_bigint": r"sigma_data is a int, not a valid value",
    "use_fp16_true": r"EDMPrecond record ema has use_fp16 True, not a valid value",
    "sigma_min_nan": r"has sigma_min nan, not a valid value",
    "sigma_max_below_min": r"sigma_max -1\.0, not above sigma_min 0",
    "endpoint_false": r"PositionalEmbedding record model\.map_noise has endpoint False",
    "max_positions_inf": r"model\.map_noise has max_positions inf",
    "skip_scale_nan": r"UNetBlock record model\.\S+ has skip_scale nan",
    "skip_scale_other": r"UNetBlock record model\.\S+ has skip_scale 1\.0; the network computes with 0\.707",
    "num_heads_other": r"UNetBlock record model\.\S+ has num_heads 7; the network computes with [01]",
    "group_norm_eps_negative": r"GroupNorm record model\.\S+ has eps -1\.0",
}
for _name, _mutate in H.EDM_STATE_CASES.items():
    CASES[_name] = ((lambda m, n: lambda d: H.edm_with(d, f"{n}.pkl", m))(_mutate, _name), "edm_state", SMALL, {},
                    "CheckpointError", STATE_MESSAGES[_name])


def _digest(sd) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode() + str(sd[k].dtype).encode() + sd[k].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _benign(d):
    """Positive controls: (name, path, loader, cfg, expected digest)."""
    net = small_net()
    edm = H.write(d, "benign_edm.pkl", edm_pickle_bytes(net, "pass\n"))
    sde = d / "benign_checkpoint_8.pth"
    model, shadow = _stand_in_checkpoint(sde, DDPM_SMALL)
    from dbprepro.models.ddpmpp import DDPMpp

    ref = DDPMpp.from_config(DDPM_SMALL)
    state = {k[len("module."):]: v for k, v in model.items()}
    state.update(zip([n for n, _ in ref.named_parameters()], shadow))
    legacy, zipped = H.state_dict_file(d, "legacy.pt", True), H.state_dict_file(d, "zipped.pt", False)
    return [("benign_edm_ema", edm, "edm_ema", None, _digest(net.state_dict())),
            ("benign_edm_load_state", edm, "edm_state", SMALL, _digest(net.state_dict())),
            ("benign_score_sde", sde, "ddpmpp", DDPM_SMALL, _digest(state)),
            *[(f"benign_{p.stem}_state_dict", p, "torch_file", None,
               _digest(torch.load(p, weights_only=True)["state_dict"])) for p in (legacy, zipped)]]


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_cases(tmp_path_factory.mktemp("hostile"))


def run_cases(d, cases=None, benign=True):
    """Write every case's file into ``d``, load them in child processes (a child that dies or hangs is
    restarted after the case it was on, which is recorded as a crash); ``(results by name, expected
    digests of the benign files)``."""
    cases = CASES if cases is None else cases
    jobs = [{"name": n, "path": str(b(d)), "loader": loader, "cfg": cfg, "limits": lim}
            for n, (b, loader, cfg, lim, _, _) in cases.items()]
    expected = {}
    for n, path, loader, cfg, dig in (_benign(d) if benign else []):
        jobs.append({"name": n, "path": str(path), "loader": loader, "cfg": cfg, "limits": {}})
        expected[n] = dig
    (d / "jobs.json").write_text(json.dumps(jobs))
    results, start = {}, 0
    while start < len(jobs):
        try:
            proc = subprocess.run([sys.executable, "-c", CHILD, str(d / "jobs.json"), str(start)], capture_output=True,
                                  text=True, timeout=TIMEOUT + 5 * (len(jobs) - start), preexec_fn=_limit)
            out, err, code = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out, err, code = (e.stdout or b"").decode(), "timeout", "timeout"
        lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        for r in lines:
            if "case" in r:
                results[jobs[r["case"]]["name"]] = r
        started = [r["start"] for r in lines if "start" in r]
        if started and jobs[started[-1]]["name"] not in results:  # the child died on this case
            results[jobs[started[-1]]["name"]] = {"ok": None, "crash": f"child ended ({code}): {err[-2000:]}"}
        elif not started:
            pytest.fail(f"the child process did not start ({code}): {err[-3000:]}")
        start = max(started) + 1
    return results, expected


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_file_is_refused_by_name_in_bounded_time_and_memory(outcomes, name):
    import re

    results, _ = outcomes
    r = results[name]
    assert r.get("ok") is False, f"{name}: not refused: {r}"
    _, _, _, _, kind, rx = CASES[name]
    assert kind in r["types"], f"{name}: {r['types'][0]}: {r['message']}"
    assert re.search(rx, r["message"]), f"{name}: {r['message']}"
    assert r["seconds"] < CASE_SECONDS and r["rss_growth_mb"] < RSS_GROWTH_MB, r


@pytest.mark.parametrize("name", ["benign_edm_ema", "benign_edm_load_state", "benign_score_sde",
                                  "benign_legacy_state_dict", "benign_zipped_state_dict"])
def test_benign_files_load_exactly_under_the_same_limits(outcomes, name):
    results, expected = outcomes
    assert results[name].get("ok") is True, results[name]
    assert results[name]["digest"] == expected[name]


def test_every_case_reads_a_file_the_issue_names():
    """The classes of issue 25, each with at least one file here."""
    classes = {"memory corruption": ["dtype_rebuilt_after_use", "dtype_with_subarray", "setitem_into_array"],
               "opcodes on any object": ["setitem_on_tensor", "appends_on_record", "additems_on_frozenset"],
               "uninitialised memory": ["reconstruct_without_build"],
               "memory amplification": ["bytearray_400mb", "list_of_bytearray", "blob_reparsed", "zip_storage_numel",
                                        "many_small_values", "huge_bytes_header"],
               "exponential time": ["dag_as_dict_key", "dag_as_class_name", "zip_dag_value", "shared_module_tree"],
               "crashes": ["deep_tuple", "zip_deep_tuple"], "zip bomb": ["zip_bomb"],
               "silent wrong values": ["sigma_data_nan", "label_dim_half", "buffer_shadows_parameter"]}
    assert all(n in CASES for names in classes.values() for n in names)


def test_every_public_loader_takes_its_limits(tmp_path):
    """The bounds are per call: each public loader passes its ``limits`` to the reader or the guard."""
    from dbprepro.models.ddpmpp import DDPMpp
    from dbprepro.models.edm_net import EDMSongUNet
    from dbprepro.models.safe_pickle import LimitExceeded, Limits
    from dbprepro.models.verification import load_state_dict

    tiny = Limits(max_file_bytes=100)
    edm = H.write(tmp_path, "edm.pkl", edm_pickle_bytes(small_net(), "pass\n"))
    sde = tmp_path / "checkpoint_8.pth"
    _stand_in_checkpoint(sde, DDPM_SMALL)
    for load in (lambda: EDMSongUNet.load_state(edm, SMALL, limits=tiny),
                 lambda: DDPMpp.load_state(sde, DDPM_SMALL, limits=tiny), lambda: load_state_dict(sde, tiny)):
        with pytest.raises(LimitExceeded, match="max_file_bytes = 100"):
            load()
    assert isinstance(EDMSongUNet.load_state(edm, SMALL, limits=Limits()), EDMSongUNet)


@pytest.mark.parametrize("legacy", [False, True])
def test_the_guard_passes_what_torchs_weights_only_loader_reads(tmp_path, legacy):
    """No false refusal of a benign checkpoint: a state dict with _metadata, torch.Size, torch.device, a dtype
    and a set, in both formats, pass the guard and load as torch loads them."""
    from dbprepro.models.torch_guard import guard_torch_file
    from dbprepro.models.verification import load_state_dict

    sd = torch.nn.Linear(3, 2).state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": sd, "size": torch.Size([2, 3]), "device": torch.device("cuda", 0),
                "dtype": torch.float16, "tags": {1, 2}, "betas": (0.9, 0.999)}, path,
               _use_new_zipfile_serialization=not legacy)
    guard_torch_file(path)
    loaded = load_state_dict(path)
    assert list(loaded) == list(sd) and all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_the_zip_entry_count_is_refused_before_any_entry_is_parsed(tmp_path, monkeypatch):
    """The end record's count is bounded before :class:`zipfile.ZipFile` reads the central directory."""
    import zipfile

    from dbprepro.models import zip_layout
    from dbprepro.models.safe_pickle import LimitExceeded, Limits
    from dbprepro.models.torch_guard import guard_torch_file

    path = H.zip_many_entries(tmp_path, n=11)

    def no_zipfile(*a, **k):
        raise AssertionError("ZipFile constructed before the entry count was checked")

    monkeypatch.setattr(zip_layout.zipfile, "ZipFile", no_zipfile)
    with pytest.raises(LimitExceeded, match=r"11 zip records \(Limits\.max_zip_entries = 10\)"):
        guard_torch_file(path, Limits(max_zip_entries=10))
    monkeypatch.undo()
    assert zip_layout.zipfile.ZipFile is zipfile.ZipFile
    with pytest.raises(Exception, match="data.pkl records"):  # within the bound the layout is read and checked
        guard_torch_file(path, Limits(max_zip_entries=11))


def test_a_type_error_inside_an_allowed_function_is_not_reported_as_an_argument_count():
    """``with N arguments`` only when the call does not bind; a value the function cannot read is named so."""
    import io

    from dbprepro.models.safe_pickle import Global, Limits, SafeUnpickler, UnsafePickleError

    def two(a, b):
        raise TypeError("inside")

    table = {("m", "two"): Global("m.two", two)}
    for args, said in ((H.i(1) + H.i(2) + H.TUPLE2, r"m\.two of arguments it does not read \(tuple of 2\)"),
                       (H.i(1) + H.TUPLE1, r"m\.two with 1 arguments")):
        stream = H.PROTO + H.g("m", "two") + args + H.REDUCE + H.STOP
        with pytest.raises(UnsafePickleError, match=said):
            SafeUnpickler(io.BytesIO(stream), table, Limits().budget(1 << 20)).load()
