"""The library face (dbprepro.api) and its runnable example docs/api_example.py."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dbprepro import api
from dbprepro.models.classifiers import SmallCNN
from dbprepro.models.diffusion import save_diffusion

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def purifier(tiny_diffusion):
    unet, scheduler = tiny_diffusion
    return api.Purifier(unet, scheduler, t_star=0.1, num_inference_steps=100)


def test_the_readme_example_runs_as_written(tmp_path):
    # from a folder without results/: the example builds its own tiny models
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "api_example.py")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    for line in ("fixed mode replays exactly", "whitebox:", "whitebox_eot:", "dwbox:", "refused: images must lie"):
        assert line in r.stdout, r.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran


BAD = [
    (torch.full((2, 1, 8, 8), float("nan")), "NaN or Inf"),
    (torch.full((2, 1, 8, 8), float("inf")), "NaN or Inf"),
    (torch.full((2, 1, 8, 8), 1.5), r"\[0, 1\]"),
    (-torch.ones(2, 1, 8, 8), r"\[0, 1\]"),
    (torch.rand(2, 3, 8, 8), "1 channel"),
    (torch.rand(2, 1, 16, 16), "8x8"),
    (torch.rand(0, 1, 8, 8), "empty batch"),
    (torch.rand(1, 8, 8), r"\[B, C, H, W\]"),
]


@pytest.mark.parametrize("bad, msg", BAD, ids=["nan", "inf", "above1", "negative", "channels", "size", "empty",
                                               "3d"])
def test_bad_images_are_refused_by_purify_and_attack(purifier, bad, msg):
    with pytest.raises(ValueError, match=msg):
        api.purify(purifier, bad, seed=0, mode="fixed")
    model = api.defend(SmallCNN(width=4, hidden=8), purifier)
    with pytest.raises(ValueError, match=msg):
        api.attack(model, bad, torch.zeros(bad.shape[0] if bad.ndim else 0, dtype=torch.long), steps=1)


def test_purify_modes_and_the_purifier_randomness_is_restored(purifier):
    x = torch.rand(3, 1, 8, 8)
    a = api.purify(purifier, x, seed=1, mode="fixed")
    assert torch.equal(a, api.purify(purifier, x, seed=1, mode="fixed"))
    assert not torch.equal(a, api.purify(purifier, x, seed=2, mode="fixed"))
    assert torch.equal(api.purify(purifier, x, seed=1, mode="random"), api.purify(purifier, x, seed=1, mode="random"))
    assert purifier.randomness.mode == "random" and purifier.randomness.seed == 0


def test_attack_settings_and_refusals(purifier):
    model = api.defend(SmallCNN(width=4, hidden=8), purifier)
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([1, 2])
    rep = api.attack(model, x, y, setting="dwbox", eps=0.1, alpha=0.05, steps=1, eval_draws=2)
    assert rep.loss.shape == (2, 2) and (rep.x_adv - x).abs().max() <= 0.1 + 1e-6
    assert 0 <= rep.robust_accuracy("worst") <= rep.robust_accuracy("mean") <= 1
    for kwargs, msg in (({"setting": "blackbox"}, "unknown setting"), ({"eps": 8}, "did you mean"),
                        ({"eps": -0.1}, "must be > 0"), ({"norm": "l1"}, "unknown norm"),
                        ({"eval_draws": 0}, "eval_draws")):
        with pytest.raises(ValueError, match=msg):
            api.attack(model, x, y, steps=1, **kwargs)
    with pytest.raises(ValueError, match="labels"):
        api.attack(model, x, torch.tensor([0.5, 1.0]), steps=1)
    with pytest.raises(TypeError, match="DefendedClassifier"):
        api.attack(SmallCNN(), x, y)


def test_load_purifier_refuses_unpinned_hub_ids_and_broken_folders(tmp_path, tiny_diffusion):
    with pytest.raises(api.CheckpointError, match="revision="):
        api.load_purifier("google/ddpm-cifar10-32")
    with pytest.raises(FileNotFoundError, match="no such diffusers folder"):
        api.load_purifier(tmp_path / "missing" / "x" / "y")
    save_diffusion(*tiny_diffusion, tmp_path / "m")
    weights = tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated copy
    with pytest.raises(api.CheckpointError, match="could not load the diffusion model"):
        api.load_purifier(tmp_path / "m")
    (tmp_path / "clf").mkdir()
    (tmp_path / "clf" / "config.json").write_text('{"arch": "small_cnn", "kwargs": {}}')
    (tmp_path / "clf" / "model.safetensors").write_bytes(b"<!doctype html><html>quota exceeded</html>")
    with pytest.raises(api.CheckpointError, match="clf"):
        api.load_classifier(tmp_path / "clf")


def _python_block(doc: str, heading: str) -> str:
    """The first ```python block after ``heading`` in ``doc`` (a path relative to the repository root)."""
    import re

    text = (ROOT / doc).read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def pipeline_models(tmp_path, monkeypatch):
    """Stand-in models saved where the pipeline saves its own (results/models/...), cwd = their root."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from api_example import tiny_models
    finally:
        sys.path.remove(str(ROOT / "docs"))
    diffusion, classifier = tiny_models(tmp_path)
    (tmp_path / "results" / "models" / "diffusion").mkdir(parents=True)
    diffusion.rename(tmp_path / "results" / "models" / "diffusion" / "vanilla")
    classifier.rename(tmp_path / "results" / "models" / "classifier")
    monkeypatch.chdir(tmp_path)


def test_the_readme_library_block_runs_as_written(pipeline_models):
    """README's "Use it as a library" code block, executed verbatim against stand-in models saved
    where the pipeline saves its own (results/models/...)."""
    block = _python_block("README.md", "## Use it as a library")
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["x_pur"].shape == scope["images"].shape
    assert torch.equal(scope["x_pur"], api.purify(scope["purifier"], scope["images"], seed=0, mode="fixed"))
    assert 0.0 <= scope["report"].robust_accuracy("single") <= 1.0


def test_the_design_doc_purifier_block_runs_as_written(pipeline_models):
    """docs/design.md's lower-level example (Purifier, DefendedClassifier, Randomness), executed verbatim:
    under fixed randomness the logits are the same on every call, as its comment says."""
    block = _python_block("docs/design.md", "## Purification and exact gradients")
    scope: dict = {}
    exec(compile(block, "docs/design.md", "exec"), scope)
    model, x = scope["model"], scope["x"]
    assert scope["logits"].shape == (4, 10)
    with model.bind(ids=torch.arange(4)):
        assert torch.equal(model(x), scope["logits"])
