"""dbprepro.models.checkpoints and .verification: verification, pinned downloads (local HTTP server), safe loading."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shlex
import threading
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dbprepro.models import checkpoints
from dbprepro.models.checkpoints import download_hf, download_url
from dbprepro.models.verification import CheckpointError, load_state_dict, load_weights_into, verify_file

torch.set_num_threads(1)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- verify_file

def test_verify_file_accepts_the_pinned_file(tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"\x80\x02weights" * 100)
    assert verify_file(p, sha(p.read_bytes()).upper()) == p  # hex case does not matter


def test_verify_file_refuses_missing_and_empty(tmp_path):
    good = "ab" * 32
    with pytest.raises(CheckpointError, match=r"missing.*" + good):
        verify_file(tmp_path / "nope.pt", good)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pt: file is empty"):
        verify_file(tmp_path / "empty.pt", good)


@pytest.mark.parametrize("page", [b"<!DOCTYPE html><html><body>Google Drive - quota</body></html>",
                                  b"\n \t<HTML><head></head></html>"])
def test_verify_file_refuses_html_even_if_hash_matches(tmp_path, page):
    p = tmp_path / "Standard.pt"
    p.write_bytes(page)
    with pytest.raises(CheckpointError, match="HTML page") as e:
        verify_file(p, sha(page))  # the sniff runs before (and regardless of) the hash
    assert "Standard.pt" in str(e.value) and sha(page) in str(e.value)


def test_verify_file_refuses_lfs_pointer(tmp_path):
    p = tmp_path / "diffusion_pytorch_model.safetensors"
    p.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 1\n")
    with pytest.raises(CheckpointError, match="Git LFS pointer"):
        verify_file(p, "0" * 64)


def test_verify_file_mismatch_names_file_expected_and_found(tmp_path):
    full = os.urandom(4096)
    p = tmp_path / "model.safetensors"
    p.write_bytes(full[:1000])  # truncated
    expected = sha(full)
    with pytest.raises(CheckpointError) as e:
        verify_file(p, expected)
    msg = str(e.value)
    assert "model.safetensors" in msg and "mismatch" in msg
    assert expected in msg and sha(full[:1000]) in msg and "1000 bytes" in msg


def test_verify_file_rejects_malformed_pin(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not 64 hex"):
        verify_file(p, "deadbeef")


# ---------------------------------------------------------------- download_url (real local HTTP server)

@pytest.fixture
def http_root(tmp_path):
    """Serve tmp_path/'srv' on 127.0.0.1:<ephemeral>; yields (base_url, root, request log)."""
    root = tmp_path / "srv"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_download_url_good_file_then_offline_rerun(http_root, tmp_path):
    base, root, requests = http_root
    data = os.urandom(200_000)
    (root / "Standard.pt").write_bytes(data)
    dest = tmp_path / "models" / "Standard.pt"
    assert download_url(f"{base}/Standard.pt", sha(data), dest) == dest
    assert dest.read_bytes() == data
    assert not dest.with_name("Standard.pt.tmp").exists()
    assert requests == ["/Standard.pt"]
    # present and verified: not fetched again, even from an unreachable address
    assert download_url("http://127.0.0.1:9/unreachable", sha(data), dest) == dest
    assert requests == ["/Standard.pt"]


def test_download_url_refuses_html_page(http_root, tmp_path):
    base, root, _ = http_root
    (root / "Standard.pt").write_bytes(b"  <!doctype html>\n<html><title>Google Drive - Virus scan warning</title></html>")
    dest = tmp_path / "Standard.pt"
    with pytest.raises(CheckpointError, match="HTML page"):
        download_url(f"{base}/Standard.pt", "1" * 64, dest)
    assert not dest.exists() and not dest.with_name("Standard.pt.tmp").exists()


def test_download_url_refuses_truncated_file(http_root, tmp_path):
    base, root, _ = http_root
    full = os.urandom(100_000)
    (root / "Standard.pt").write_bytes(full[:60_000])
    dest = tmp_path / "Standard.pt"
    with pytest.raises(CheckpointError) as e:
        download_url(f"{base}/Standard.pt", sha(full), dest)
    assert "sha256 mismatch" in str(e.value) and sha(full) in str(e.value) and "Standard.pt" in str(e.value)
    assert not dest.exists() and not dest.with_name("Standard.pt.tmp").exists()


def test_download_url_http_error_and_hand_placed_wrong_file(http_root, tmp_path):
    base, _, requests = http_root
    with pytest.raises(CheckpointError, match="could not download"):
        download_url(f"{base}/missing.pt", "2" * 64, tmp_path / "missing.pt")
    placed = tmp_path / "placed.pt"
    placed.write_bytes(b"the user's own file")
    with pytest.raises(CheckpointError, match="mismatch"):
        download_url(f"{base}/placed.pt", "3" * 64, placed)
    assert placed.read_bytes() == b"the user's own file"  # untouched
    assert "/placed.pt" not in requests  # and nothing fetched over it


# ---------------------------------------------------------------- download_hf (pinning, verification)

REV = "0123456789abcdef0123456789abcdef01234567"


def fake_hub(source, calls):
    """An hf_hub_download stand-in copying from a local folder (only the network is faked)."""
    def download(*, repo_id, filename, revision, repo_type, local_dir, **_):
        calls.append((repo_id, filename, revision, repo_type))
        target = os.path.join(local_dir, filename)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(os.path.join(source, filename), "rb") as src, open(target, "wb") as dst:
            dst.write(src.read())
        return target
    return download


@pytest.mark.parametrize("rev", ["main", "v1.0", "267b167", REV + "0", "g" * 40])
def test_download_hf_requires_pinned_commit(tmp_path, rev, monkeypatch):
    monkeypatch.setattr(checkpoints, "hf_hub_download", lambda **kw: pytest.fail("must not download"))
    with pytest.raises(CheckpointError, match="40-hex commit"):
        download_hf("org/repo", rev, {"a.json": "0" * 64}, tmp_path)


def test_download_hf_bad_download_removed_hand_placed_kept(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.safetensors").write_bytes(b"tampered bytes")
    calls = []
    monkeypatch.setattr(checkpoints, "hf_hub_download", fake_hub(str(src), calls))
    dest = tmp_path / "dest"
    with pytest.raises(CheckpointError) as e:
        download_hf("org/repo", REV, {"w.safetensors": "4" * 64}, dest)
    assert "w.safetensors" in str(e.value) and "4" * 64 in str(e.value) and "removed" in str(e.value)
    assert not (dest / "w.safetensors").exists()
    assert calls == [("org/repo", "w.safetensors", REV, "model")]
    # a file the user placed by hand that does not verify: error, file kept, no download
    (dest / "w.safetensors").write_bytes(b"hand placed")
    with pytest.raises(CheckpointError, match="mismatch"):
        download_hf("org/repo", REV, {"w.safetensors": "4" * 64}, dest)
    assert (dest / "w.safetensors").read_bytes() == b"hand placed" and len(calls) == 1


# ---------------------------------------------------------------- load_state_dict

def tiny_state():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    return net, OrderedDict((k, v.clone()) for k, v in net.state_dict().items())


@pytest.mark.parametrize("suffix,wrap", [
    (".pt", lambda sd: sd),
    (".pth", lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 200}),
    (".t7", lambda sd: {"net": sd, "acc": 95.1}),
    (".bin", lambda sd: {"model": {"state_dict": sd}, "optimizer": {"lr": 0.1}}),
])
def test_load_state_dict_unwraps_containers(tmp_path, suffix, wrap):
    _, sd = tiny_state()
    p = tmp_path / f"ckpt{suffix}"
    torch.save(wrap(sd), p)
    got = load_state_dict(p)
    assert list(got) == list(sd)
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_load_state_dict_safetensors(tmp_path):
    _, sd = tiny_state()
    p = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    got = load_state_dict(p)
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


class Payload:
    """Pickles as a call to os.system: a stand-in for a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def test_pickle_with_code_payload_is_refused_not_executed(tmp_path):
    _, sd = tiny_state()
    marker = tmp_path / "PWNED"
    evil = tmp_path / "Standard.pt"
    torch.save({"state_dict": sd, "meta": Payload(marker)}, evil)
    with pytest.raises(CheckpointError) as e:
        load_state_dict(evil)
    assert "refused" in str(e.value) and "system" in str(e.value) and "not executed" in str(e.value)
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_load_state_dict_refuses_html_garbage_and_unknown_types(tmp_path):
    html = tmp_path / "Standard.pt"
    html.write_bytes(b"<!DOCTYPE html><html></html>")
    with pytest.raises(CheckpointError, match="HTML page"):
        load_state_dict(html)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match=r"junk.pt: not a readable PyTorch checkpoint"):
        load_state_dict(junk)
    other = tmp_path / "weights.npz"
    other.write_bytes(b"PK\x03\x04")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        load_state_dict(other)
    with pytest.raises(CheckpointError, match="missing"):
        load_state_dict(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------- load_weights_into

def test_load_weights_into_round_trip_and_old_bn_counters():
    net, sd = tiny_state()
    for v in sd.values():
        if v.is_floating_point():
            v.add_(1.0)
    del sd["1.num_batches_tracked"]  # checkpoints from old PyTorch lack it
    fresh = tiny_state()[0]
    load_weights_into(fresh, sd)
    assert torch.equal(fresh[0].weight, sd["0.weight"]) and torch.equal(fresh[1].running_var, sd["1.running_var"])


def test_wrong_architecture_names_parameters_and_shapes():
    _, sd = tiny_state()
    wide = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(CheckpointError) as e:
        load_weights_into(wide, sd)
    msg = str(e.value)
    assert "0.weight is (4, 3, 3, 3) in the checkpoint, (8, 3, 3, 3) in the model" in msg
    assert "3.weight is (2, 4) in the checkpoint, (2, 8) in the model" in msg
    renamed = {("features." + k): v for k, v in sd.items()}
    with pytest.raises(CheckpointError) as e:
        load_weights_into(tiny_state()[0], renamed)
    msg = str(e.value)
    assert "missing from the checkpoint: 0.weight (4, 3, 3, 3)" in msg
    assert "not in the model: features.0.weight (4, 3, 3, 3)" in msg
