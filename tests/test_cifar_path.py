"""The paper-scale (CIFAR-10) loading path, exercised offline on small stand-ins.

Only the network is faked (``hf_hub_download`` copies from a local stand-in repo); the
verification, layout detection, decoding and weight loading are the real code.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dbprepro.data import load_split, prepare_split
from dbprepro.data.cifar10 import download_cifar10, load_cifar10_parts
from dbprepro.io import sha256_file
from dbprepro.models import checkpoints
from dbprepro.models.checkpoints import download_hf
from dbprepro.models.classifiers import build_classifier
from dbprepro.models.diffusion import build_scheduler, build_unet, load_diffusion
from dbprepro.models.verification import CheckpointError, load_state_dict, load_weights_into
from dbprepro.models.wideresnet import WideResNet

torch.set_num_threads(1)
REV = "89abcdef0123456789abcdef0123456789abcdef"


def fake_hub(source, calls):
    def download(*, repo_id, filename, revision, repo_type, local_dir, **_):
        calls.append((repo_id, filename, revision, repo_type))
        target = os.path.join(local_dir, filename)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(os.path.join(source, filename), "rb") as src, open(target, "wb") as dst:
            dst.write(src.read())
        return target
    return download


def offline(**_):
    raise OSError("no network in this test")


# ---------------------------------------------------------------- google/ddpm-cifar10-32 hub layout

def make_hub_standin(root):
    """A tiny UNet2DModel + DDPMScheduler saved flat, as in google/ddpm-cifar10-32."""
    torch.manual_seed(0)
    unet = build_unet(image_size=8, channels=3, block_out_channels=[8, 16], attention=[False, True],
                      norm_num_groups=4)
    scheduler = build_scheduler(variance_type="fixed_small")
    unet.save_pretrained(root, safe_serialization=True)  # config.json + diffusion_pytorch_model.safetensors
    scheduler.save_pretrained(root)  # scheduler_config.json
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
         "unet": ["diffusers", "UNet2DModel"]}))
    return unet, scheduler


HUB_FILES = ["config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"]


def test_ddpm_hub_layout_through_download_hf_and_load_diffusion(tmp_path, monkeypatch):
    src = tmp_path / "hub"
    src.mkdir()
    unet, scheduler = make_hub_standin(src)
    pins = {name: sha256_file(src / name) for name in HUB_FILES}
    calls = []
    monkeypatch.setattr(checkpoints, "hf_hub_download", fake_hub(str(src), calls))
    dest = tmp_path / "models" / "ddpm-cifar10-32"
    paths = download_hf("google/ddpm-cifar10-32", REV, pins, dest)
    assert sorted(calls) == sorted(("google/ddpm-cifar10-32", n, REV, "model") for n in HUB_FILES)
    assert {n: p.parent for n, p in paths.items()} == {n: dest for n in HUB_FILES}
    assert not (dest / "unet").exists()  # flat hub layout, not save_diffusion's

    got_unet, got_sched = load_diffusion(dest)
    ref = unet.state_dict()
    got = got_unet.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert got_sched.config.variance_type == "fixed_small"
    assert torch.equal(got_sched.betas, scheduler.betas)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    with torch.no_grad():
        # identical weights (checked above); the outputs agree to float rounding (the loaded
        # tensors' memory layout can pick another kernel: differences ~1e-7 are seen)
        assert torch.allclose(got_unet(x, t).sample, unet.eval()(x, t).sample, atol=1e-5)

    # offline re-run: every file present and verified, nothing fetched
    monkeypatch.setattr(checkpoints, "hf_hub_download", offline)
    assert download_hf("google/ddpm-cifar10-32", REV, pins, dest) == paths


def test_hub_layout_with_only_bin_weights_is_refused(tmp_path):
    make_hub_standin(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").rename(tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"safetensors.*diffusion_pytorch_model\.bin"):
        load_diffusion(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a diffusers folder"):
        load_diffusion(tmp_path / "elsewhere")


def test_tampered_hub_weights_are_rejected(tmp_path, monkeypatch):
    src = tmp_path / "hub"
    src.mkdir()
    make_hub_standin(src)
    pins = {name: sha256_file(src / name) for name in HUB_FILES}
    data = bytearray((src / "diffusion_pytorch_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (src / "diffusion_pytorch_model.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(checkpoints, "hf_hub_download", fake_hub(str(src), []))
    with pytest.raises(CheckpointError) as e:
        download_hf("google/ddpm-cifar10-32", REV, pins, tmp_path / "dest")
    assert "diffusion_pytorch_model.safetensors" in str(e.value)
    assert pins["diffusion_pytorch_model.safetensors"] in str(e.value)


# ---------------------------------------------------------------- RobustBench Standard (WRN-28-10)

# Names and shapes of RobustBench's CIFAR-10 `Standard` checkpoint (WideResNet(depth=28,
# widen_factor=10) in robustbench/model_zoo: block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2},
# convShortcut in the first block of each group, top-level bn1 and fc).
STANDARD_KEYS = {
    "conv1.weight": (16, 3, 3, 3),
    "block1.layer.0.bn1.weight": (16,),
    "block1.layer.0.conv1.weight": (160, 16, 3, 3),
    "block1.layer.0.convShortcut.weight": (160, 16, 1, 1),
    "block1.layer.3.conv2.weight": (160, 160, 3, 3),
    "block2.layer.0.convShortcut.weight": (320, 160, 1, 1),
    "block2.layer.0.bn2.running_var": (320,),
    "block3.layer.0.conv1.weight": (640, 320, 3, 3),
    "block3.layer.3.bn2.num_batches_tracked": (),
    "bn1.running_mean": (640,),
    "fc.weight": (10, 640),
    "fc.bias": (10,),
}


def test_standard_checkpoint_names_and_round_trip_into_fresh_wrn(tmp_path):
    model = build_classifier("wrn-28-10")  # the fresh model the checkpoint goes into
    assert isinstance(model, WideResNet)
    sd = model.state_dict()
    assert {k: tuple(sd[k].shape) for k in STANDARD_KEYS} == STANDARD_KEYS
    assert not any(k.startswith("block1.layer.1.convShortcut") for k in sd)
    assert len(sd) == 155 and sum(p.numel() for p in model.parameters()) == 36_479_194

    # a stand-in checkpoint, stored the way RobustBench's are ({"state_dict": {"module." + k}},
    # legacy torch serialisation); every value differs from the fresh model's
    g = torch.Generator().manual_seed(1)
    standin = {}
    for k, v in sd.items():
        if v.dim() >= 2:
            standin[k] = torch.roll(v.flatten(), 1).view_as(v)
        elif v.is_floating_point():
            standin[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            standin[k] = v + 7
    path = tmp_path / "Standard.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in standin.items()}}, path,
               _use_new_zipfile_serialization=False)
    assert not torch.equal(model.fc.weight, standin["fc.weight"])

    load_weights_into(model, load_state_dict(path))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], standin[k]) for k in standin)
    with torch.no_grad():
        out = model.eval()(torch.rand(2, 3, 32, 32, generator=g))
    assert out.shape == (2, 10) and torch.isfinite(out).all()

    with pytest.raises(CheckpointError, match=r"fc.weight is \(10, 640\) in the checkpoint, \(100, 640\)"):
        load_weights_into(WideResNet(depth=10, widen_factor=10, num_classes=100), standin)


def test_wrn_rejects_bad_depth():
    with pytest.raises(ValueError, match="6n"):
        WideResNet(depth=27)


# ---------------------------------------------------------------- uoft-cs/cifar10 parquet

def write_standin_split(path, n, seed):
    """Parquet like the HF ``datasets`` export: img = struct<bytes, path> (PNG), label int64."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    cells = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(pixels[i]).save(buf, format="PNG")
        cells.append({"bytes": buf.getvalue(), "path": None})
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"img": pa.array(cells, type=img_type), "label": pa.array(labels, pa.int64())})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return pixels, labels


def make_cifar_standin(root):
    train = write_standin_split(root / "plain_text" / "train-00000-of-00001.parquet", 5, seed=1)
    test = write_standin_split(root / "plain_text" / "test-00000-of-00001.parquet", 3, seed=2)
    return {"train": train, "test": test}


def test_load_cifar10_parts_decodes_pngs(tmp_path):
    truth = make_cifar_standin(tmp_path)
    parts = load_cifar10_parts(tmp_path)
    assert set(parts) == {"train", "test"}
    for split, (pixels, labels) in truth.items():
        images, got_labels, ids = parts[split]
        assert images.dtype == np.float32 and images.shape == (len(labels), 3, 32, 32)
        assert 0.0 <= images.min() and images.max() <= 1.0
        np.testing.assert_array_equal(np.rint(images * 255).astype(np.uint8), pixels.transpose(0, 3, 1, 2))
        assert got_labels.dtype == np.int64 and got_labels.tolist() == labels.tolist()
        assert ids.dtype == np.int64 and ids.tolist() == list(range(len(labels)))


def test_cifar10_download_and_prepare_split(tmp_path, monkeypatch):
    src = tmp_path / "hub"
    truth = make_cifar_standin(src)
    files = {f"plain_text/{s}-00000-of-00001.parquet": sha256_file(src / "plain_text" / f"{s}-00000-of-00001.parquet")
             for s in ("train", "test")}
    calls = []
    monkeypatch.setattr(checkpoints, "hf_hub_download", fake_hub(str(src), calls))
    dest = tmp_path / "data" / "cifar10"
    download_cifar10(dest, REV, files)
    assert {c[3] for c in calls} == {"dataset"} and {c[0] for c in calls} == {"uoft-cs/cifar10"}

    out = {"train": tmp_path / "split" / "train.npz", "test": tmp_path / "split" / "test.npz"}
    record = prepare_split("cifar10", out, tmp_path / "split" / "manifest.json", source_dir=dest)
    assert record["parts"]["test"]["n"] == 3 and record["parts"]["train"]["shape"] == [3, 32, 32]
    test = load_split(out["test"], manifest=tmp_path / "split" / "manifest.json")
    assert test.labels.tolist() == truth["test"][1].tolist()
    assert torch.equal((test.images * 255).round().to(torch.uint8),
                       torch.from_numpy(truth["test"][0]).permute(0, 3, 1, 2))


def test_cifar_loader_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="needs source_dir"):
        load_cifar10_parts(None)
    write_standin_split(tmp_path / "plain_text" / "train-00000-of-00001.parquet", 2, seed=3)
    with pytest.raises(FileNotFoundError, match="split 'test'"):
        load_cifar10_parts(tmp_path)
    bad = tmp_path / "plain_text" / "test-00000-of-00001.parquet"
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format="PNG")
    pq.write_table(pa.table({"img": [{"bytes": buf.getvalue(), "path": None}], "label": [3]}), bad)
    with pytest.raises(ValueError, match="not 32x32"):
        load_cifar10_parts(tmp_path)
