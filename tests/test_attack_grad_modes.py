"""Every registered attack in every gradient mode (issue 23): each (attack, grad_mode) that
validate-config accepts runs one tiny attack batch through the DAG's entry point
(``run_batch`` of the registered class, on the config's own sections); each one that cannot work is
refused by validate-config before any job, with a message naming the attack, the defense, its family
and the mode."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from dbprepro.attacks import ATTACKS, settings_randomness
from dbprepro.config import ConfigError, Experiment, deep_merge, load_yaml, validate_config
from dbprepro.config.experiment import threat_model
from dbprepro.models.classifiers import SmallCNN
from dbprepro.purifiers import DefendedClassifier, build_purifier

ROOT = Path(__file__).resolve().parents[1]
MODES = ("exact", "autograd", "checkpoint", "budget", "adjoint")
#: the only combinations that cannot work -> the attack the refusal names: DiffAttack reads the chain states, the
#: adjoint has no per-step gradient; diffattack0 runs where DiffAttack runs, so its config is refused with it
REFUSED = {("diffattack", "adjoint"): "diffattack", ("diffattack0", "adjoint"): "diffattack"}
OPTIONAL = {"bpda": {"enabled": False}, "diffattack": {"enabled": False}, "surrogate": {"enabled": False},
            "diffhammer": {"enabled": False}, "lowfreq": {"enabled": False}, "autoattack": {"protocols": []}}
#: the overlay of ``attacks`` that switches each registered attack on, at toy budgets
ON = {"pgd": {},
      "bpda": {"bpda": {"enabled": True}},
      "aa_standard_dwbox": {"autoattack": {"protocols": ["standard_dwbox"]}},
      "aa_standard_multieval": {"autoattack": {"protocols": ["standard_multieval"]}},
      "aa_rand": {"autoattack": {"protocols": ["rand"]}},
      "diffattack": {"diffattack": {"enabled": True, "steps": 1, "eot": 2, "step_interval": 2}},
      "diffattack0": {"diffattack": {"enabled": True, "also_weight_zero": True, "steps": 1, "eot": 2}},
      "diffhammer": {"diffhammer": {"enabled": True, "steps": 1, "draws": 2}},
      "lowfreq": {"lowfreq": {"enabled": True, "steps": 1, "eot": 2}},
      "surrogate": {"surrogate": {"enabled": True, "coarsen": 5, "steps": 1, "eot": 2}}}  # 2 steps


def config(attack: str, mode: str, **purification) -> dict:
    """config.yaml with tiny budgets, only ``attack`` on (with PGD, always on), the main purifier in
    ``mode`` (the VP-SDE for the adjoint, the only family that offers it; else DDPM) and a budget that
    keeps part of the chain; no families, no vote, no competitors."""
    sampler = "vpsde" if mode == "adjoint" else "ddpm"
    over = {"purification": {"sampler": sampler, "grad_mode": mode, "num_inference_steps": 50,  # 6 steps
                             "vpsde": {"steps": 4}, **purification},
            "families": {"names": [], "n_images": None}, "vote": {"enabled": False, "n_images": None},
            "competitors": {"names": []},
            "analysis": {"n_images": None}, "sanity": {"enabled": False},
            "attacks": deep_merge({**OPTIONAL, "n_images": 2, "dwbox_n_images": None, "batch_size": 2, "shards": 1,
                                   "eval_draws": 2,
                                   "pgd": {"steps": 1, "eot": 2},
                                   "autoattack": {"n_eval": 1, "apgd_steps": 1, "eot_iter": 1, "fab_steps": 1,
                                                  "square_queries": 2, "n_target_classes": 1}}, ON[attack])}
    if mode == "budget":
        over["purification"].setdefault("activation_budget_mb", 1.2)  # ~0.13 MiB per image and step
    if sampler == "vpsde":  # DiffAttack's forward reference needs a DDPM/DDIM chain (its own refusal, tested below):
        over["attacks"]["diffattack"] = {**over["attacks"].get("diffattack", {}), "reference": "clean"}  # the mode's
    return deep_merge(load_yaml(ROOT / "config.yaml"), over)


def test_every_registered_attack_is_covered():
    assert set(ON) == set(ATTACKS)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attack", list(ON))
def test_attack_runs_in_every_mode_validate_config_accepts(tiny_diffusion, attack, mode):
    cfg = config(attack, mode)
    if (attack, mode) in REFUSED:
        with pytest.raises(ConfigError) as e:
            validate_config(cfg)
        for word in (f"attack {REFUSED[attack, mode]} ", "defense 'vanilla'", f"family '{cfg['purification']['sampler']}'",
                     f"grad_mode '{mode}'"):
            assert word in str(e.value)
        return
    cfg = validate_config(cfg)
    exp, att = Experiment.from_config(cfg), cfg["attacks"]
    cls = ATTACKS[attack]
    runs = [r for r in exp.attack_runs() if r.attack == attack and r.defense == "vanilla"]
    assert runs, f"{attack} has no run in the grid"
    setting = runs[0].setting
    pur = exp.purification("vanilla")
    torch.manual_seed(0)
    clf = SmallCNN(width=8, hidden=16).eval()
    p = build_purifier(*tiny_diffusion, pur, randomness=settings_randomness(setting, cfg["seed"], att["fixed_draw"]))
    assert p.grad_mode == mode
    if mode == "budget":  # part of the chain kept, part recomputed, at the attacks' batch of 2 images x 2 draws
        x4 = torch.zeros(4, 1, 8, 8)
        ids4, draws4 = torch.arange(4), torch.zeros(4, dtype=torch.long)
        assert 0 < p.budget_kept_steps(p.diffuse(x4, ids4, draws4), ids4, draws4) < p.num_steps
    model = DefendedClassifier(clf, p, pur)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 1, 8, 8, generator=g).clamp(0.05, 0.95)
    y, ids = torch.tensor([3, 7]), torch.tensor([100, 101])
    tm = threat_model(att, runs[0].threat)
    cols, res = cls.run_batch(model, x, y, ids, setting=setting, threat=tm, attacks=exp.attacks("vanilla", setting, attack),
                              seed=cfg["seed"])
    assert cols["id"].tolist() == [100, 101] and set(np.unique(cols["correct_single"])) <= {0.0, 1.0}
    assert bool(torch.isfinite(res.x_adv).all()) and res.x_adv.shape == x.shape
    assert float((res.x_adv - x).abs().max()) <= tm["eps"] + 1e-6 and 0 <= float(res.x_adv.min())
    assert float(res.x_adv.max()) <= 1


def test_refusals_name_the_attack_the_defense_its_family_and_the_mode():
    """The other ways a grad mode cannot work, refused before any job: a family defense whose
    family does not offer the main mode, and the surrogate's own process."""
    cfg = deep_merge(config("pgd", "adjoint"), {"families": {"names": ["ddpm"]}})
    with pytest.raises(ConfigError, match="purification.grad_mode: 'adjoint' is not offered by defense 'ddpm' "
                                          "\\(families.names\\) \\(family 'ddpm'"):
        validate_config(cfg)
    cfg = config("surrogate", "exact")
    with pytest.raises(ConfigError, match="surrogate process of attack surrogate on defense 'vanilla' "
                                          "\\(family 'ddpm' offers"):
        validate_config(deep_merge(cfg, {"attacks": {"surrogate": {"purification": {"grad_mode": "adjoint"}}}}))
    with pytest.raises(ConfigError, match="attacks.surrogate.purification.activation_budget_mb: grad_mode budget of "
                                          "the surrogate process of attack surrogate on defense 'vanilla'"):
        validate_config(deep_merge(cfg, {"attacks": {"surrogate": {"purification": {"grad_mode": "budget"}}}}))
    ok = {"attacks": {"surrogate": {"purification": {"grad_mode": "budget", "activation_budget_mb": 1}}}}
    assert validate_config(deep_merge(cfg, ok))["attacks"]["surrogate"]["purification"]["grad_mode"] == "budget"
    # DiffAttack off, or on a defense its mode serves: the adjoint config runs
    assert validate_config(config("pgd", "adjoint"))["purification"]["grad_mode"] == "adjoint"


def test_smoke_config_runs_diffattack_and_diffhammer_in_budget_mode_on_part_of_the_chain(tmp_path):
    """config/smoke.yaml validates with grad_mode budget; its DAG (dry run) holds the DiffAttack and
    DiffHammer runs, and at their batch (batch_size x EOT draws) on the smoke UNet the budget keeps
    some of the chain's steps and recomputes the others."""
    from smoke import snakemake

    from dbprepro.models.diffusion import build_scheduler, build_unet
    from dbprepro.randomness import Randomness

    cfg = validate_config(deep_merge(load_yaml(ROOT / "config.yaml"), load_yaml(ROOT / "config" / "smoke.yaml")))
    pur, att, u = cfg["purification"], cfg["attacks"], cfg["diffusion"]["unet"]
    assert pur["grad_mode"] == "budget"
    runs = {r.attack: r for r in Experiment.from_config(cfg).attack_runs() if r.setting == "whitebox_eot"}
    assert {"diffattack", "diffhammer"} <= set(runs)
    torch.manual_seed(0)
    unet = build_unet(8, 1, u["block_out_channels"], layers_per_block=u["layers_per_block"], attention=u["attention"],
                      norm_num_groups=u["norm_num_groups"])
    p = build_purifier(unet, build_scheduler(**cfg["diffusion"]["schedule"]), Experiment.from_config(cfg).purification(
        "vanilla"), randomness=Randomness(0, "fixed"))
    for batch in (att["batch_size"] * att["diffattack"]["eot"], att["batch_size"] * att["diffhammer"]["draws"]):
        x, ids = torch.zeros(batch, 1, 8, 8), torch.arange(batch)
        draws = torch.zeros(batch, dtype=torch.long)
        assert 0 < p.budget_kept_steps(p.diffuse(x, ids, draws), ids, draws) < p.num_steps
    r = snakemake(tmp_path, "-n")
    assert r.returncode == 0, r.stderr[-3000:]
    for attack in ("diffattack", "diffhammer"):
        for defense in att[attack]["defenses"]:
            assert f"results/attacks/{defense}/linf/whitebox_eot/{attack}/" in r.stdout + r.stderr, (attack, defense)


@pytest.mark.parametrize("votes", [1, 3])
def test_defenses_deliver_the_chain_states_of_their_purifications(tiny_diffusion, votes):
    """forward_states gives forward's logits (a vote defense's log mean softmax over its V draws) and
    the chain states of the batch it purifies (V rows per image, with their ids and draws), with forward's input
    gradient plus the states' (grad_mode budget, half of the chain kept)."""
    from dbprepro.purifiers.vote import VoteDefense

    torch.manual_seed(0)
    clf = SmallCNN(width=8, hidden=16).eval().to(torch.float64)
    unet = copy.deepcopy(tiny_diffusion[0]).to(torch.float64)
    p = build_purifier(unet, tiny_diffusion[1], {"t_star": 0.1, "num_inference_steps": 50, "grad_mode": "budget"},
                       randomness=settings_randomness("whitebox_eot", 0))
    model = VoteDefense(clf, p, votes=votes)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ids, draws, y = torch.tensor([4, 9]), torch.tensor([0, 5]), torch.tensor([3, 7])
    with torch.no_grad():
        f0 = model.forward_states(x, ids, draws, [1])
    idr, dr = f0.ids, f0.draws
    xr = x.repeat_interleave(votes, dim=0)
    assert f0.copies == votes and idr.numel() == dr.numel() == 2 * votes and idr.tolist()[:votes] == [4] * votes
    step = p.step_activation_bytes(p.diffuse(xr, idr, dr), idr, dr)
    model.purifier.activation_budget_mb = 3 * step / 2**20  # 3 of the 6 steps kept
    keep = [1, 4]
    xx = x.clone().requires_grad_(True)
    logits, states, *_ = model.forward_states(xx, ids, draws, keep)
    assert len(states) == 2 and states[0].shape == xr.shape
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    (g_ce,) = torch.autograd.grad(ce, xx, retain_graph=True)
    (g_all,) = torch.autograd.grad(ce + states[0].square().sum() + states[1].sum(), xx)
    ref = x.clone().requires_grad_(True)
    ref_logits = model(ref, ids, draws)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-12)
    (g_ref,) = torch.autograd.grad(torch.nn.functional.cross_entropy(ref_logits, y, reduction="sum"), ref)
    torch.testing.assert_close(g_ce, g_ref, rtol=1e-10, atol=1e-13)
    with torch.no_grad():
        _, plain = p.purify_states(xr, idr, dr, keep)
    assert all(torch.equal(a.detach(), b) for a, b in zip(states, plain))
    assert float((g_all - g_ce).abs().max()) > 1e-6  # the states' loss reaches the input


def test_validate_config_asks_every_run_whether_it_can_run():
    """A run the attack itself would refuse in its job (DiffAttack's forward reference on a VP-SDE defense; a
    duplicate lambda = 0 run) is refused by validate-config first, naming the attack, the defense and the key."""
    from dbprepro.config import load_configs, validate_config
    from dbprepro.errors import ConfigError

    base = load_configs(["config.yaml"])
    cfg = copy.deepcopy(base)
    cfg["attacks"]["diffattack"].update(defenses=["vanilla", "vpsde"], reference="forward", weight=1.0)
    with pytest.raises(ConfigError, match=r"attacks\.diffattack: attack diffattack on defense 'vpsde'.*'forward'"):
        validate_config(cfg)
    cfg["attacks"]["diffattack"]["reference"] = "clean"
    validate_config(cfg)  # the clean reference runs on any family
    cfg = copy.deepcopy(base)
    cfg["attacks"]["diffattack"].update(weight=0.0, also_weight_zero=True)
    with pytest.raises(ConfigError, match="twice"):
        validate_config(cfg)
