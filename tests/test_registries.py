"""The purifier and attack registries: one registered class per family / attack, read by the schema,
the factory, the attack grid, the cost model, the API, the CLI and the DAG (issue 15)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dbprepro import api
from dbprepro.attacks import ATTACKS, settings_randomness
from dbprepro.cli import main
from dbprepro.config import SCHEMA_PATH, Experiment, load_configs, validate_config
from dbprepro.purifiers import PURIFIERS, DefendedClassifier, load_purifier, samplers
from dbprepro.randomness import Randomness

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _schema():
    return yaml.safe_load(SCHEMA_PATH.read_text())["properties"]


def test_schema_enums_are_the_registries():
    """The schema's sampler enums name exactly the registered families (a family is registered
    and described in the schema, or neither), and own_addt exactly those with a loss of their own."""
    s = _schema()
    assert set(s["purification"]["properties"]["sampler"]["enum"]) == set(PURIFIERS)
    assert set(s["families"]["properties"]["names"]["items"]["enum"]) == set(PURIFIERS)
    own = {n for n, cls in PURIFIERS.items() if cls.loss_family != "ddpm"}
    assert set(s["families"]["properties"]["own_addt"]["items"]["enum"]) == own
    for name, cls in PURIFIERS.items():  # a family with a section of its own has it in the schema
        if cls.config_section:
            assert cls.config_section in s["purification"]["properties"], name


@pytest.mark.parametrize("sampler", sorted(PURIFIERS))
def test_every_family_from_the_config_counts_its_own_calls(sampler, tiny_diffusion):
    """from_config builds the registered class, and its config-side network count is what it calls."""
    cfg = validate_config({"name": "t", "purification": {"sampler": sampler, "num_inference_steps": 100,
                                                         "vpsde": {"steps": 3}, "edm": {"steps": 2}}})
    cls = PURIFIERS[sampler]
    p = cls.from_config(*tiny_diffusion, cfg["purification"], Randomness(0, "fixed"))
    assert type(p) is cls and p.sampler == sampler
    calls = []
    handle = p.unet.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        p(torch.rand(2, 1, 8, 8))
    handle.remove()
    assert len(calls) == cls.network_calls(cfg["purification"]) == p.num_network_calls


def test_with_randomness_leaves_the_original_alone(tiny_diffusion):
    p = PURIFIERS["ddpm"](*tiny_diffusion, num_inference_steps=100, randomness=Randomness(0, "random"))
    q = p.with_randomness(Randomness(0, "fixed", fixed_draw=3))
    assert p.randomness.mode == "random" and q.randomness.mode == "fixed" and q.unet is p.unet
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(q(x), q(x))  # the copy is the deterministic purifier of configuration 3
        assert not torch.equal(p(x), p(x))  # the original still draws fresh noise on every call
    assert p.randomness is not q.randomness and p.randomness.mode == "random"


# -- every registered sampler through the API and the CLI -------------------------------------------
@pytest.mark.parametrize("sampler", sorted(PURIFIERS))
def test_api_load_purifier_accepts_every_sampler(sampler, stage_inputs):
    p = api.load_purifier(stage_inputs["diffusion"], sampler=sampler, num_inference_steps=100,
                          settings={"vpsde": {"steps": 2}, "edm": {"steps": 2}})
    assert type(p) is PURIFIERS[sampler]
    out = api.purify(p, torch.rand(2, 1, 8, 8), seed=0, mode="fixed")
    assert out.shape == (2, 1, 8, 8) and 0 <= float(out.min()) and float(out.max()) <= 1


def _dag_config(tmp_path, **purification):
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["purification"].update(purification)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, validate_config(cfg)


@pytest.mark.parametrize("defense", ["vanilla", "vpsde", "edm"])
@pytest.mark.parametrize("mode, draw", [("random", 2), ("fixed", 1)])
def test_cli_purify_with_the_config_is_the_dags_purification(defense, mode, draw, stage_inputs, tmp_path):
    """``dbprepro purify --config`` gives, bit for bit, what the DAG's purifier of that defense
    (the factory the stages use, with the typed experiment's purification section) gives for the
    image with that id and draw."""
    path, cfg = _dag_config(tmp_path)
    exp = Experiment.from_config(cfg)
    split = np.load(stage_inputs["test"])
    x = torch.from_numpy(split["images"][5:6].astype(np.float32))
    image_id = int(split["ids"][5])
    np.save(tmp_path / "in.npy", x[0].numpy())
    pur = exp.purification(defense)
    args = ["purify", str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), "--config", str(path),
            "--model", stage_inputs["diffusion"], "--id", str(image_id), "--mode", mode, "--draw", str(draw),
            "--device", "cpu"]
    if defense != "vanilla":
        args += ["--sampler", pur["sampler"]]
    assert main(args) == 0
    randomness = Randomness(cfg["seed"], mode, fixed_draw=draw if mode == "fixed" else 0)
    dag = load_purifier(stage_inputs["diffusion"], pur, cfg["diffusion"]["schedule"]["variance_type"], randomness,
                        torch.device("cpu"))
    with torch.no_grad():
        ref = dag(x, ids=torch.tensor([image_id]), draws=torch.tensor([draw]))[0]
    got = torch.from_numpy(np.load(tmp_path / "out.npy"))
    assert got.dtype == ref.dtype and torch.equal(got, ref)
    # the DAG purifies in batches (evaluation.batch_size): the image's row of a batch has the same noise
    # (keyed by id and draw), so it differs only by the batched kernels' float summation order
    batch = torch.from_numpy(split["images"][:16].astype(np.float32))
    with torch.no_grad():
        rows = dag(batch, ids=torch.from_numpy(split["ids"][:16]).long(), draws=torch.full((16,), draw))
    assert torch.allclose(rows[5], got, rtol=0, atol=1e-5)
    assert not torch.allclose(rows[4], got, rtol=0, atol=1e-2)  # (another image's row is far away)
    # and the config's settings really matter: another t* gives another image
    other = str(tmp_path / "other.npy")
    assert main([*args[:2], other, *args[3:], "--t-star", "0.2", "--steps", "50"]) == 0
    assert not torch.equal(torch.from_numpy(np.load(other)), got)


@pytest.mark.parametrize("sampler", sorted(PURIFIERS))
def test_cli_evaluate_accepts_every_sampler(sampler, stage_inputs, tmp_path, capsys):
    path, _ = _dag_config(tmp_path)
    overlay = tmp_path / "small.yaml"
    overlay.write_text(yaml.safe_dump({"attacks": {"pgd": {"steps": 2}, "eval_draws": 2},
                                       "evaluation": {"random_draws": 1, "fixed_configs": 1}}))
    rc = main(["evaluate", "--config", str(path), str(overlay), "--classifier", stage_inputs["classifier"],
               "--diffusion", stage_inputs["diffusion"], "--data", str(Path(stage_inputs["test"]).parent),
               "--n-images", "2", "--sampler", sampler, "--device", "cpu", "--threads", "1"])
    assert rc == 0
    assert "pgd-2" in capsys.readouterr().out


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, stage_inputs):
    assert main(["purify", "/missing.png", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "/missing.png" in err and "Traceback" not in err
    assert main(["purify", "/missing.png", str(tmp_path / "o.png"), "--model", str(tmp_path / "nomodel")]) == 2
    assert "/missing.png" in capsys.readouterr().err  # the input is checked before the model is loaded
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    assert main(["purify", str(bad), str(tmp_path / "o.png"), "--model", str(tmp_path / "nomodel")]) == 2
    assert "nomodel" in capsys.readouterr().err
    model = ["--model", stage_inputs["diffusion"]]
    assert main(["purify", str(bad), str(tmp_path / "o.png"), *model]) == 2
    assert "not an image file" in capsys.readouterr().err
    (tmp_path / "empty.npy").write_bytes(b"")
    assert main(["purify", str(tmp_path / "empty.npy"), str(tmp_path / "o.npy"), *model]) == 2
    err = capsys.readouterr().err
    assert "not a readable .npy" in err and err.count("\n") == 1
    assert main(["validate-config", "/missing.yaml"]) == 2
    assert "/missing.yaml" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    assert main(["validate-config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml" in err and err.count("\n") == 1
    r = subprocess.run([str(VENV_BIN / "dbprepro"), "purify", "/missing.png", "out.png"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


# -- a throw-away attack in one file -------------------------------------------------------------------
FGSM = '''"""FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps, a throw-away attack."""
from dbprepro.attacks.base import Attack
from dbprepro.attacks.pgd import PGD, attack_batch
from dbprepro.attacks.registry import register_attack


@register_attack
class FGSM(Attack):
    name = "fgsm"

    @classmethod
    def settings(cls, attacks, threat):
        return ["dwbox"]

    @classmethod
    def calls_per_image(cls, attacks, setting, S, grad_mode):
        one = {**attacks, "pgd": {**attacks["pgd"], "steps": 1, "eot": 1, "restarts": 1}}
        return PGD.calls_per_image(one, setting, S, grad_mode)

    @classmethod
    def run_batch(cls, model, x, y, ids, *, setting, threat, attacks, seed, track=0):
        pgd = {**attacks["pgd"], "steps": 1, "eot": 1, "restarts": 1, "random_start": False}
        return attack_batch(model, x, y, ids, attack="pgd", setting=setting, norm=threat["norm"], eps=threat["eps"],
                            alpha=threat["eps"], pgd=pgd, eval_draws=attacks["eval_draws"], track=track)
'''

PROBE = '''
import json, sys
from dbprepro.attacks import ATTACKS
from dbprepro.config import load_configs, attack_runs
from dbprepro.cost import count_calls
from dbprepro.cli import build_parser
cfg = load_configs(["config.yaml"])
runs = [tuple(r) for r in attack_runs(cfg) if r.attack == "fgsm"]
jobs = [j.job for j in count_calls(cfg) if j.job.endswith("/fgsm")]
build_parser().parse_args(["evaluate", "--attack", "fgsm"])
print(json.dumps({"registered": list(ATTACKS), "runs": runs, "jobs": jobs}))
'''


@pytest.fixture(scope="module")
def fgsm_tree(tmp_path_factory):
    """A copy of the package with one new file, src/dbprepro/attacks/fgsm.py, and nothing else changed."""
    root = tmp_path_factory.mktemp("fgsm")
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / "src/dbprepro/attacks/fgsm.py").write_text(FGSM)
    return root


def _env(tree):
    return {**os.environ, "PYTHONPATH": str(tree / "src"), "PYTHONWARNINGS": "ignore"}


def test_a_new_attack_is_one_file_grid_cost_cli_and_dag(fgsm_tree):
    """Dropping one module into attacks/ adds the attack to the attack grid, the cost model, the CLI's
    choices and the Snakemake DAG (its wildcard constraint and targets), with no other edit."""
    import json

    r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=_env(fgsm_tree), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # the folder's other modules register in file-name order, after paper 1's attacks
    assert "fgsm" in out["registered"][5:] and out["registered"][:5] == ["pgd", "bpda", "aa_standard_dwbox",
                                                                         "aa_standard_multieval", "aa_rand"]
    assert out["runs"] == [["vanilla", "linf", "dwbox", "fgsm"]]
    assert out["jobs"] == ["attack/vanilla/linf/dwbox/fgsm"]
    r = subprocess.run([str(VENV_BIN / "snakemake"), "-n", "--quiet", "rules", "--cores", "1"], cwd=ROOT,
                       env=_env(fgsm_tree), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(VENV_BIN / "snakemake"), "-n", "--cores", "1",
                        "results/attacks/vanilla/linf/dwbox/fgsm/records.parquet"], cwd=ROOT, env=_env(fgsm_tree),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wildcards: defense=vanilla, threat=linf, setting=dwbox, attack=fgsm, shard=0" in r.stdout
    # without the file, the same target is not a known attack
    r = subprocess.run([str(VENV_BIN / "snakemake"), "-n", "--cores", "1",
                        "results/attacks/vanilla/linf/dwbox/fgsm/records.parquet"], cwd=ROOT,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True)
    assert r.returncode != 0 and "MissingRuleException" in r.stdout + r.stderr


def test_the_throwaway_fgsm_reduces_to_one_pgd_step(fgsm_tree, stage_inputs):
    """Loaded from its one file, FGSM is PGD with one step of size eps (its known reduction)."""
    import importlib.util

    from dbprepro.attacks.registry import ATTACKS as REG
    from dbprepro.models.classifiers import load_classifier

    spec = importlib.util.spec_from_file_location("fgsm_probe", fgsm_tree / "src/dbprepro/attacks/fgsm.py")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        pur = load_purifier(stage_inputs["diffusion"], {"t_star": 0.1, "num_inference_steps": 100}, "fixed_large",
                            settings_randomness("dwbox", 0), torch.device("cpu"))
        model = DefendedClassifier(load_classifier(stage_inputs["classifier"]), pur)
        split = np.load(stage_inputs["test"])
        x, y = torch.from_numpy(split["images"][:4]).float(), torch.from_numpy(split["labels"][:4]).long()
        ids = torch.from_numpy(split["ids"][:4]).long()
        attacks = validate_config({"name": "t"})["attacks"]
        tm = {"name": "linf", "norm": "linf", "eps": 0.2, "alpha": 0.05}
        cols, res = REG["fgsm"].run_batch(model, x, y, ids, setting="dwbox", threat=tm, attacks=attacks, seed=0)
        # the outside reference: torchattacks' FGSM on the deterministic (dwbox) purifier, same ids and draws
        import torchattacks

        with model.bind(ids=ids, draws=torch.zeros_like(ids)):
            ref = torchattacks.FGSM(model, eps=0.2)(x, y)
        assert torch.allclose(res.x_adv, ref, atol=1e-6)
        assert float((res.x_adv - x).abs().max()) <= 0.2 + 1e-6 and float((res.x_adv - x).abs().max()) > 0.1
        assert set(cols) >= {"id", "correct_single", "correct_worst", "norm_linf"}
    finally:
        REG.pop("fgsm", None)
    assert "fgsm" not in ATTACKS


def test_registered_attacks_read_their_own_sections():
    cfg = load_configs([ROOT / "config.yaml"])
    att = cfg["attacks"]
    assert ATTACKS["pgd"].settings(att, "linf") == att["settings"]
    assert ATTACKS["bpda"].settings(att, "linf") == att["bpda"]["settings"]
    assert ATTACKS["aa_standard_dwbox"].settings(att, "linf") == ["dwbox"]
    assert ATTACKS["aa_standard_multieval"].settings(att, "linf") == ["whitebox"]
    assert ATTACKS["aa_rand"].settings(att, "linf") == ["whitebox_eot"]
    off = {**att, "autoattack": {**att["autoattack"], "protocols": ["rand"]}, "bpda": {**att["bpda"], "enabled": False}}
    assert ATTACKS["aa_standard_dwbox"].settings(off, "linf") == [] and ATTACKS["bpda"].settings(off, "linf") == []
    assert ATTACKS["aa_standard_multieval"].settings(off, "linf") == []
    assert samplers()[:2] == ("ddpm", "ddim")
