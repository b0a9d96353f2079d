from pathlib import Path

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


def test_purify_refuses_an_image_of_the_wrong_size(tmp_path, model_dir, capsys):
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "big.png")
    assert main(["purify", str(tmp_path / "big.png"), str(tmp_path / "o.png"), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "8x8" in err and "16x16" in err and err.count("\n") == 1


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
    from dbprepro.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = sorted(sub.choices)
    assert {"purify", "validate-config", "doctor", "evaluate", "estimate-cost", "sha256"} <= set(commands)
    for cmd in commands:  # every registered command, also ones added later
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: dbprepro {cmd}" in out, out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(cmd in out for cmd in commands), out


SMOKE = [str(Path(__file__).resolve().parents[1] / f) for f in ("config.yaml", "config/smoke.yaml")]


@pytest.fixture
def tiny_models(tmp_path, tiny_diffusion):
    from dbprepro.models.classifiers import SmallCNN, save_classifier

    save_diffusion(*tiny_diffusion, tmp_path / "dif")
    torch.manual_seed(0)
    save_classifier(SmallCNN(width=8, hidden=16), "small_cnn", {"width": 8, "hidden": 16}, tmp_path / "clf")
    return tmp_path / "clf", tmp_path / "dif"


def test_evaluate_one_configuration_prints_a_table(tmp_path, tiny_models, capsys, monkeypatch):
    clf, dif = tiny_models
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    args = ["evaluate", "--config", *SMOKE, "--classifier", str(clf), "--diffusion", str(dif), "--data",
            str(tmp_path / "no_results"), "--n-images", "4", "--threads", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for cell in ("classifier", "random", "fixed", "dwbox", "single", "worst", "pgd-3 linf eps=0.2"):
        assert cell in out, out
    assert sorted(tmp_path.rglob("*")) == before  # nothing written without --csv
    assert main([*args, "--csv", str(tmp_path / "t.csv")]) == 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "t.csv")
    assert len(table) == 7 and table["accuracy"].between(0, 1).all() and set(table["n_images"]) == {4}


def test_evaluate_refuses_bad_input_clearly_and_writes_nothing(tmp_path, tiny_models, capsys, monkeypatch):
    clf, dif = tiny_models
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("attacks:\n  pgd:\n    eot: 0\n")
    base = ["evaluate", "--classifier", str(clf), "--diffusion", str(dif), "--data", str(tmp_path / "none"),
            "--csv", str(tmp_path / "out.csv")]
    cases = [
        (["--config", *SMOKE, str(bad)], "attacks.pgd.eot"),
        (["--config", *SMOKE, "--n-images", "0"], "--n-images"),
        (["--config", *SMOKE, "--threat", "l7"], "no threat model named 'l7'"),
        (["--config", *SMOKE, "--diffusion", str(tmp_path / "missing")], "no such diffusers folder"),
        (["--config", *SMOKE, "--classifier", str(dif)], "could not load the classifier"),
    ]
    for extra, msg in cases:
        assert main([*base, *extra]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "out.csv").exists()
