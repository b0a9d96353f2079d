"""Issue 17: Lee & Kim's surrogate-process attack (dbprepro.attacks.surrogate).

Known answers (docs reference, adaptive attacks §7.3): with the defense's own process as the
surrogate it is PGD-EOT; with another process the gradient is PGD's on that process while the
evaluation stays on the defense's.  Plus its config (off by default: the grid and the other runs'
params do not change) and its network calls."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch

import dbprepro.attacks.pgd as pgd_module
from dbprepro.attacks import PGD, attack_class, evaluate_draws, settings_randomness, summarise_evaluations
from dbprepro.attacks.base import evaluation_calls
from dbprepro.attacks.surrogate import Surrogate, describe, surrogate_purification
from dbprepro.calls import defended_grad
from dbprepro.config import Experiment, load_configs, validate_config
from dbprepro.models.classifiers import SmallCNN
from dbprepro.purifiers import DefendedClassifier, Purifier

EPS, ALPHA = 8 / 255, 2 / 255
PUR = {"t_star": 0.1, "sampler": "ddpm", "num_inference_steps": 50, "eta": 0.0, "clip_output": True,
       "grad_mode": "exact"}  # the defense: 6 reverse steps from t = 100
THREAT = {"name": "linf", "norm": "linf", "eps": EPS, "alpha": ALPHA}
SETTING = "whitebox_eot"


def attacks(**surrogate):
    att = validate_config({"name": "t", "attacks": {"pgd": {"steps": 2, "eot": 2}, "eval_draws": 3}})["attacks"]
    att["surrogate"] = {**att["surrogate"], **surrogate}
    return att


def defended(tiny_diffusion, purification=PUR, setting=SETTING):
    torch.manual_seed(0)
    clf = SmallCNN(width=8, hidden=16).eval()
    p = Purifier(*tiny_diffusion, t_star=purification["t_star"], num_inference_steps=purification["num_inference_steps"],
                 randomness=settings_randomness(setting, seed=0))
    return DefendedClassifier(clf, p, purification)


def data(b=2):
    g = torch.Generator().manual_seed(5)
    return torch.rand(b, 1, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g), torch.arange(100, 100 + b)


def test_the_surrogate_section_overlays_the_defenses_and_coarsens_the_open_step_counts():
    full = {**PUR, "vpsde": {"steps": 100, "corrector": False}, "edm": {"steps": 50, "s_churn": 6.0}}
    assert surrogate_purification(full, {"coarsen": 1, "purification": {}}) == full
    five = surrogate_purification(full, {"coarsen": 5, "purification": {}})
    assert (five["num_inference_steps"], five["vpsde"], five["edm"]) == (10, {"steps": 20, "corrector": False},
                                                                         {"steps": 10, "s_churn": 6.0})
    # keys the overlay sets win over coarsen; null keys are the defense's; nested sections merge key by key
    over = surrogate_purification(full, {"coarsen": 5, "purification": {"sampler": "ddim", "num_inference_steps": 20,
                                                                         "t_star": None, "vpsde": {"corrector": True}}})
    assert (over["sampler"], over["num_inference_steps"], over["t_star"]) == ("ddim", 20, 0.1)
    assert over["vpsde"] == {"steps": 20, "corrector": True} and over["edm"]["steps"] == 10
    assert full["num_inference_steps"] == 50 and full["vpsde"]["steps"] == 100  # the defense's section is untouched
    assert describe(five, 2) == "ddpm t*=0.1 N=10: 2 network calls"


def test_with_the_defenses_own_process_it_is_pgd_eot(tiny_diffusion):
    """§7.3: K_att = K_def, the same sampler and replayed noise -> exact-gradient PGD-EOT."""
    x, y, ids = data()
    att = attacks(coarsen=1, purification={})
    model = defended(tiny_diffusion)
    cols, res = Surrogate.run_batch(model, x, y, ids, setting=SETTING, threat=THREAT, attacks=att, seed=0)
    ref_cols, ref = PGD.run_batch(model, x, y, ids, setting=SETTING, threat=THREAT, attacks=att, seed=0)
    assert torch.equal(res.x_adv, ref.x_adv) and float((res.x_adv - x).abs().max()) > 0
    np.testing.assert_array_equal(res.loss, ref.loss)
    assert set(cols) == set(ref_cols) | {"surrogate"}
    for k, v in ref_cols.items():
        np.testing.assert_array_equal(cols[k], v, err_msg=k)
    assert set(cols["surrogate"]) == {"ddpm t*=0.1 N=50: 6 network calls"}


def test_the_gradient_is_the_surrogates_and_the_evaluation_the_defenses(tiny_diffusion, monkeypatch):
    x, y, ids = data()
    att = attacks(coarsen=5)  # N = 50 -> 10: 2 reverse steps instead of the defense's 6
    model = defended(tiny_diffusion)
    evaluated, defense_calls = [], []
    real = pgd_module.evaluate_draws

    def spy(m, *a, **k):
        evaluated.append(m.purifier)
        return real(m, *a, **k)

    monkeypatch.setattr(pgd_module, "evaluate_draws", spy)
    model.purifier.register_forward_hook(lambda mod, inp, out: defense_calls.append(torch.is_grad_enabled()))
    cols, res = Surrogate.run_batch(model, x, y, ids, setting=SETTING, threat=THREAT, attacks=att, seed=0)

    # the evaluation: the defense's own purifier, eval_draws forward passes without gradients, nothing else
    assert evaluated == [model.purifier] and defense_calls == [False] * att["eval_draws"]
    preds = real(model, res.x_adv, ids, att["eval_draws"], SETTING)
    for k, v in summarise_evaluations(preds, y.numpy()).items():
        np.testing.assert_array_equal(cols[f"correct_{k}"], v)
    # the gradient: PGD-EOT run directly on a model built with the surrogate's section (same draws)
    sur = defended(tiny_diffusion, {**PUR, "num_inference_steps": 10})
    assert sur.purifier.num_steps == 2 and model.purifier.num_steps == 6
    direct = PGD(sur, SETTING, "linf", EPS, ALPHA, steps=2, eot=2)(x, y, ids)
    assert torch.equal(res.x_adv, direct.x_adv)
    np.testing.assert_array_equal(res.loss, direct.loss)  # loss_start / loss_end are the surrogate's
    on_defense = PGD(model, SETTING, "linf", EPS, ALPHA, steps=2, eot=2)(x, y, ids)
    assert not torch.equal(res.x_adv, on_defense.x_adv)  # ... and not the defense's
    assert set(cols["surrogate"]) == {"ddpm t*=0.1 N=10: 2 network calls"}
    assert res.extra["surrogate"]["num_inference_steps"] == 10


def test_the_surrogate_needs_the_defenses_section(tiny_diffusion):
    x, y, ids = data()
    model = defended(tiny_diffusion)
    bare = DefendedClassifier(model.classifier, model.purifier)
    with pytest.raises(ValueError, match="purification section"):
        Surrogate.run_batch(bare, x, y, ids, setting=SETTING, threat=THREAT, attacks=attacks(), seed=0)
    off_grid = attacks(coarsen=1, purification={"num_inference_steps": 30})  # step 33 does not divide t = 100
    with pytest.raises(ValueError, match="attacks.surrogate"):
        Surrogate.run_batch(model, x, y, ids, setting=SETTING, threat=THREAT, attacks=off_grid, seed=0)


def _enabled(cfg, **surrogate):
    cfg = copy.deepcopy(cfg)
    cfg["attacks"]["surrogate"] = {**cfg["attacks"]["surrogate"], "enabled": True, **surrogate}
    return validate_config(cfg)


def _disabled(cfg):
    cfg = copy.deepcopy(cfg)
    cfg["attacks"]["surrogate"] = {**cfg["attacks"]["surrogate"], "enabled": False, "defenses": ["vanilla"]}
    return validate_config(cfg)


def test_off_in_the_schema_and_on_the_vanilla_grid_when_enabled():
    assert validate_config({"name": "t"})["attacks"]["surrogate"]["enabled"] is False
    assert attack_class("surrogate") is Surrogate
    cfg = _disabled(load_configs(["config.yaml"]))  # config.yaml runs it (on vanilla and ADDT)
    exp = Experiment.from_config(cfg)
    assert [r for r in exp.attack_runs(fixed_configs=True) if r.attack == "surrogate"] == []
    # the section is in no other run's params, so the default DAG is unchanged by it
    assert all("surrogate" not in exp.attacks(r.defense, r.setting, r.attack) for r in exp.attack_runs())
    on = Experiment.from_config(_enabled(cfg))
    runs = [r for r in on.attack_runs() if r.attack == "surrogate"]
    assert [tuple(r) for r in runs] == [("vanilla", tm["name"], "whitebox_eot", "surrogate")
                                        for tm in cfg["attacks"]["threat_models"]]
    assert on.attacks("vanilla", "whitebox_eot", "surrogate")["surrogate"]["coarsen"] == 5
    assert [r for r in on.attack_runs() if r.attack != "surrogate"] == exp.attack_runs()
    picked = Experiment.from_config(_enabled(cfg, settings=["dwbox", "whitebox"], threat_models=["nope"]))
    assert [r for r in picked.attack_runs() if r.attack == "surrogate"] == []


def test_calls_are_the_surrogates_gradients_plus_the_defenses_evaluation():
    cfg = _enabled(load_configs(["config.yaml"]))
    att, pur, gm = cfg["attacks"], cfg["purification"], cfg["purification"]["grad_mode"]
    pgd = att["pgd"]
    calls, bound = Surrogate.run_calls(att, SETTING, pur, gm)
    assert not bound and pur["num_inference_steps"] == 50  # 6 steps; the surrogate's N = 10: 2 steps
    passes = pgd["restarts"] * (pgd["steps"] + 1) * pgd["eot"]
    assert calls == defended_grad(2, gm) * passes + evaluation_calls(att, SETTING, 6)
    own = {**att, "surrogate": {**att["surrogate"], "coarsen": 1}}
    assert Surrogate.run_calls(own, SETTING, pur, gm) == PGD.run_calls(own, SETTING, pur, gm)
    from dbprepro.cost import count_calls

    jobs = {j.job: j for j in count_calls(cfg)}
    n = att["n_images"]
    assert jobs["attack/vanilla/linf/whitebox_eot/surrogate"].calls == calls * n


def test_the_attack_stage_records_say_which_process_and_the_table_reads_them(attack_stage):
    from dbprepro.paper1.tables import p1_main_table

    cfg = validate_config({"name": "t", "data": {"n_test": 64}, "purification": {"num_inference_steps": 50},
                           "attacks": {"n_images": 4, "batch_size": 2, "shards": 1, "track_images": 1,
                                       "pgd": {"steps": 1, "eot": 2}, "eval_draws": 2,
                                       "surrogate": {"enabled": True}}})
    rec = attack_stage("surrogate", SETTING, cfg["attacks"], cfg["purification"])
    assert len(rec) == 4 and set(rec["attack"]) == {"surrogate"}
    assert set(rec["surrogate"]) == {"ddpm t*=0.1 N=10: 2 network calls"}
    clean = pd.DataFrame({"id": rec["id"], "setting": "random", "draw": 0, "correct": 1.0})
    table = p1_main_table([rec], {"vanilla": clean})
    assert set(table["attack"]) == {"surrogate"} and table["robust_accuracy"].between(0, 1).all()


def test_an_enabled_surrogate_off_the_grid_is_a_config_error():
    from dbprepro.errors import ConfigError

    cfg = load_configs(["config.yaml"])  # N = 50 at t* = 0.1
    with pytest.raises(ConfigError, match="attacks.surrogate.*num_inference_steps"):
        _enabled(cfg, coarsen=3)  # 50 // 3 = 16: step 62 does not divide t = 100
    assert _enabled(cfg, coarsen=5)["attacks"]["surrogate"]["coarsen"] == 5
    off = copy.deepcopy(cfg)
    off["attacks"]["surrogate"].update(enabled=False, coarsen=3)  # not checked while disabled
    assert validate_config(off)["attacks"]["surrogate"]["enabled"] is False
