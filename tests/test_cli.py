import numpy as np
import pytest
import torch
from PIL import Image

from dbprepro.cli import main
from dbprepro.models.diffusion import save_diffusion


@pytest.fixture
def model_dir(tmp_path, tiny_diffusion):
    save_diffusion(*tiny_diffusion, tmp_path / "model")
    return tmp_path / "model"


def test_purify_writes_a_replayable_image(tmp_path, model_dir, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / "in.png")
    outs = []
    for name in ("a.png", "b.png"):
        assert main(["purify", str(tmp_path / "in.png"), str(tmp_path / name), "--model", str(model_dir),
                     "--mode", "fixed", "--seed", "3"]) == 0
        outs.append(np.asarray(Image.open(tmp_path / name)))
    assert outs[0].shape == (8, 8)
    assert np.array_equal(outs[0], outs[1])  # fixed mode, same seed: the same purification
    assert main(["purify", str(tmp_path / "in.png"), str(tmp_path / "c.png"), "--model", str(model_dir),
                 "--mode", "fixed", "--seed", "4"]) == 0
    assert not np.array_equal(outs[0], np.asarray(Image.open(tmp_path / "c.png")))
    assert "11 reverse steps" in capsys.readouterr().out


def test_purify_refuses_an_image_of_the_wrong_size(tmp_path, model_dir):
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(SystemExit, match="8x8"):
        main(["purify", str(tmp_path / "big.png"), str(tmp_path / "o.png"), "--model", str(model_dir)])


def test_validate_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nevaluation:\n  random_draws: 0\n")
    assert main(["validate-config", str(bad)]) == 2
    assert "evaluation.random_draws" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text("name: x\n")
    assert main(["validate-config", str(good), "--show"]) == 0
    assert '"t_star": 0.1' in capsys.readouterr().out


def test_doctor_reports_versions(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out and "torchattacks" in out


def test_every_command_has_help(capsys):
    for cmd in ("purify", "validate-config", "doctor"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    assert "usage" in capsys.readouterr().out
