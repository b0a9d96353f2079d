"""Trust on first use of an unpinned network file (issue 25): its sha256 is printed and recorded before the
file is parsed, the rule's output (network.json) says it was not pinned, and a file with neither pin nor record
is never read."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from dbprepro.io import sha256_file
from dbprepro.models.checkpoints import UNPINNED_RECORD, trusted_sha256
from dbprepro.models.diffusion import save_diffusion
from dbprepro.models.networks import NETWORK_FILE
from dbprepro.models.verification import CheckpointError
from test_edm_pickle import SMALL, edm_pickle_bytes, small_net


def _edm_section(url, sha256=None):
    return {"network": "edm_songunet", "config": SMALL,
            "download": {"url": url, "sha256": sha256, "filename": "edm.pkl", "allow_unpinned": True}}


def test_an_unpinned_pickle_is_read_only_under_its_recorded_hash(tiny_diffusion, tmp_path, capsys):
    from dbprepro.pipeline.models import download_network

    official = tmp_path / "mirror" / "edm.pkl"
    official.parent.mkdir()
    official.write_bytes(edm_pickle_bytes(small_net(), "pass\n"))
    base, out = tmp_path / "vanilla", tmp_path / "models" / "edm_songunet"
    save_diffusion(*tiny_diffusion, base)
    downloads = tmp_path / "downloads"
    download_network(SimpleNamespace(base=str(base)), SimpleNamespace(model=str(out)),
                     SimpleNamespace(network=_edm_section(official.as_uri()), downloads=str(downloads)),
                     SimpleNamespace())
    digest = sha256_file(official)
    printed = capsys.readouterr().out
    assert "TRUST ON FIRST USE" in printed and digest in printed
    assert json.loads((downloads / UNPINNED_RECORD).read_text())["files"]["edm.pkl"] == digest
    spec = json.loads((out / NETWORK_FILE).read_text())
    assert spec["sha256"] == digest and spec["sha256_pinned"] is False
    assert trusted_sha256(downloads / "edm.pkl", None) == digest


def test_a_file_with_neither_pin_nor_record_is_refused(tmp_path):
    path = tmp_path / "edm.pkl"
    path.write_bytes(b"\x80\x04N.")
    with pytest.raises(CheckpointError, match="neither pinned nor recorded"):
        trusted_sha256(path, None)
    assert trusted_sha256(path, "AB" * 32) == "ab" * 32


def test_a_file_changed_after_its_record_is_refused_before_parsing(tiny_diffusion, tmp_path):
    """The record pins the file: the same rule run again on a swapped file stops at the hash check."""
    from dbprepro.pipeline.models import download_network

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "edm.pkl").write_bytes(edm_pickle_bytes(small_net(), "pass\n"))
    (downloads / UNPINNED_RECORD).write_text(json.dumps({"files": {"edm.pkl": "0" * 64}}))
    base = tmp_path / "vanilla"
    save_diffusion(*tiny_diffusion, base)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        download_network(SimpleNamespace(base=str(base)), SimpleNamespace(model=str(tmp_path / "out")),
                         SimpleNamespace(network=_edm_section("file:///nonexistent"), downloads=str(downloads)),
                         SimpleNamespace())


def test_download_classifier_keeps_the_trusted_hash_in_its_declared_output(tmp_path):
    """Rule download_classifier: the file lands at the rule's ``raw`` output, and the sha256 an unpinned first
    use trusted is recorded in the model folder (a declared output), not only beside the download."""
    import hashlib
    import json
    from types import SimpleNamespace

    import torch

    from dbprepro.models.classifiers import SmallCNN, load_classifier
    from dbprepro.pipeline.models import download_classifier

    torch.manual_seed(0)
    src = tmp_path / "mirror" / "weights.pt"
    src.parent.mkdir()
    net = SmallCNN()
    torch.save(net.state_dict(), src)
    dl = {"url": src.as_uri(), "sha256": None, "filename": "weights.pt", "allow_unpinned": True}
    output = SimpleNamespace(model=str(tmp_path / "classifier"), raw=str(tmp_path / "downloads" / "weights.pt"))
    download_classifier(None, output, SimpleNamespace(classifier={"arch": "small_cnn", "kwargs": {}, "download": dl}),
                        None)
    source = json.loads((tmp_path / "classifier" / "config.json").read_text())["source"]
    assert source == {"url": src.as_uri(), "filename": "weights.pt", "sha256_pinned": False,
                      "sha256": hashlib.sha256(src.read_bytes()).hexdigest()}
    loaded = load_classifier(tmp_path / "classifier").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
