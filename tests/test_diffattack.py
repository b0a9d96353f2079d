"""DiffAttack (issues 17, 23): the known answers of /work/shared/reference/adaptive-attacks.md section 7 -
lambda = 0 with one CE round is PGD, one DLR round at lambda = 0 is torchattacks' APGD-DLR, the
deviation loss's gradient is exact through the chain, the clean-reference deviation vanishes at
delta = 0 - the loss itself at a known state (its weights, sign and resolution scale), the rounds
(round 2 attacks round 1's survivors only), the vote defense's forward, the attack grid (with the
lambda = 0 run diffattack0), the APGD schedule and the call count."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from dbprepro.attacks import ATTACKS, PGD, settings_randomness
from dbprepro.attacks.apgd import autoattack_checkpoints
from dbprepro.attacks.diffattack import DiffAttack, apgd_checkpoints
from dbprepro.attacks.diffattack0 import DiffAttackWeightZero
from dbprepro.config import Experiment, load_configs, validate_config
from dbprepro.models.classifiers import SmallCNN
from dbprepro.purifiers import DefendedClassifier, Purifier

ROOT = Path(__file__).resolve().parents[1]
EPS, ALPHA = 8 / 255, 2 / 255


def defended(tiny_diffusion, setting, t_star=0.1, dtype=torch.float32, grad_mode="exact"):
    torch.manual_seed(0)
    clf = SmallCNN(width=8, hidden=16).eval().to(dtype)
    unet, sched = tiny_diffusion
    if dtype != torch.float32:
        unet = copy.deepcopy(unet).to(dtype)
    p = Purifier(unet, sched, t_star=t_star, num_inference_steps=100, grad_mode=grad_mode,
                 randomness=settings_randomness(setting, seed=0))
    return DefendedClassifier(clf, p)


def data(b=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    x = torch.rand(b, 1, 8, 8, generator=g).clamp(0.05, 0.95)
    return x.to(dtype), torch.randint(0, 10, (b,), generator=g), torch.arange(100, 100 + b)


@pytest.mark.parametrize("setting", ["dwbox", "whitebox_eot"])
def test_weight_zero_is_pgd(tiny_diffusion, setting):
    """lambda = 0, one CE round and the pgd optimizer give PGD's adversarial examples and losses exactly."""
    x, y, ids = data()
    model = defended(tiny_diffusion, setting)
    ref = PGD(model, setting, "linf", EPS, ALPHA, steps=3, eot=2)(x, y, ids)
    ours = DiffAttack(model, setting, "linf", EPS, ALPHA, steps=3, eot=2, weight=0.0, optimizer="pgd",
                      rounds=["ce"])(x, y, ids)
    assert torch.equal(ours.x_adv, ref.x_adv)
    np.testing.assert_array_equal(ours.loss, ref.loss)


def test_states_path_matches_forward_and_the_chain_states(tiny_diffusion):
    """purify_states returns forward()'s output and the states trajectory() reports, in every mode."""
    x, _, ids = data()
    p = defended(tiny_diffusion, "dwbox").purifier
    d = torch.zeros_like(ids)
    with torch.no_grad():
        plain = p(x, ids, d)
        traj = p.trajectory(x, ids, d)
    reverse = [s for ph, s in zip(traj.phase, traj.states) if ph == "reverse"]
    for mode in ("exact", "autograd", "checkpoint"):
        q = p.with_grad_mode(mode)
        out, states = q.purify_states(x.clone().requires_grad_(True), ids, d, keep=[0, 2, q.num_steps - 1])
        torch.testing.assert_close(out.detach(), plain, rtol=0, atol=1e-6)
        for k, s in zip([0, 2, q.num_steps - 1], states):
            torch.testing.assert_close((s.detach() + 1) / 2, reverse[k], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="per-step gradient"):
        p.with_grad_mode("bpda").purify_states(x.clone().requires_grad_(True), ids, d, keep=[0])


@pytest.mark.parametrize("reference,detach", [("forward", False), ("forward", True), ("clean", False)])
def test_combined_loss_gradient_is_exact_through_the_chain(tiny_diffusion, reference, detach):
    """With lambda > 0 the exact engine's gradient of CE + lambda L_dev equals plain autograd through
    every step and (reference not detached) a central finite difference (float64, one fixed draw, a
    4-step chain)."""
    x, y, ids = data(2, torch.float64)
    model = defended(tiny_diffusion, "dwbox", t_star=0.03, dtype=torch.float64)
    assert model.purifier.num_steps == 4
    delta = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.5) * 2 * EPS
    draws = torch.zeros(1, dtype=torch.long)
    grads = {}
    for mode in ("exact", "autograd"):
        m = model.with_purifier(model.purifier.with_grad_mode(mode))
        att = DiffAttack(m, "dwbox", weight=5.0, reference=reference, detach_reference=detach, step_weights="unit")
        att._clean = x
        loss, g = att.loss_and_grad(x + delta, y, ids, draws)
        grads[mode] = g
    assert att.keep == [0, 1, 2] and float(grads["exact"].abs().max()) > 0
    torch.testing.assert_close(grads["exact"], grads["autograd"], rtol=1e-9, atol=1e-12)
    # the deviation term matters: the gradient differs from the CE-only one
    ce_only = DiffAttack(model, "dwbox", weight=0.0).loss_and_grad(x + delta, y, ids, draws)[1]
    assert float((grads["exact"] - ce_only).abs().max()) > 1e-6
    if detach:  # the official DDPM branch's gradient treats x_t as a constant: not the gradient of L
        return
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    h = 1e-6
    fd = (att.loss_and_grad(x + delta + h * v, y, ids, draws)[0].sum()
          - att.loss_and_grad(x + delta - h * v, y, ids, draws)[0].sum()) / (2 * h)
    assert float(fd) == pytest.approx(float((grads["exact"] * v).sum()), rel=1e-5)


def test_clean_deviation_is_zero_at_zero_and_grows(tiny_diffusion):
    x, y, ids = data()
    model = defended(tiny_diffusion, "dwbox")
    att = DiffAttack(model, "dwbox", reference="clean")
    att._clean = x
    d = torch.zeros_like(ids)
    direction = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)).sign() * 0.5 + 0.5  # in [0, 1]

    def dev(scale):
        xa = x + scale * (direction - 0.5) * 2
        with torch.no_grad():
            _, states = model.purifier.purify_states(xa, ids, d, att.keep)
            return att.deviation(xa, ids, d, states, x)

    assert torch.equal(dev(0.0), torch.zeros(3))
    values = torch.stack([dev(s) for s in (0.0, 0.01, 0.03, 0.05)])  # [4, B]
    assert bool((values[1:] > values[:-1]).all())


def test_apgd_checkpoints_are_the_papers():
    """Croce & Hein 2020: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_autoattack_checkpoints_are_the_official_codes():
    """Every k iterations, k = max(int(0.22 N), 1) shrinking by max(int(0.03 N), 1) to max(int(0.06 N), 1):
    the paper's at N = 100, every iteration from the second at N = 10."""
    assert autoattack_checkpoints(100) == apgd_checkpoints(100)
    assert autoattack_checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert autoattack_checkpoints(50) == [11, 21, 30, 38, 45]


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.5)])
@pytest.mark.parametrize("reference,rule", [("forward", "autoattack"), ("clean", "paper")])
def test_apgd_variant_stays_in_the_ball_and_keeps_its_best_point(tiny_diffusion, norm, eps, reference, rule):
    x, y, ids = data()
    model = defended(tiny_diffusion, "dwbox")
    res = DiffAttack(model, "dwbox", norm, eps, eps / 4, steps=6, reference=reference, optimizer="apgd",
                     random_start=True, rounds=["ce"], apgd_rule=rule)(x, y, ids)
    d = (res.x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert bool((size <= eps + 1e-6).all()) and 0 <= float(res.x_adv.min()) and float(res.x_adv.max()) <= 1
    assert float(size.max()) > 0
    best = res.extra["loss_adv"]
    np.testing.assert_array_equal(best, res.loss.max(1))  # the deterministic purifier: the best iterate's loss
    assert (best > res.loss[:, 0]).any()


@pytest.mark.parametrize("attack", ["diffattack", "diffattack0"])
def test_run_batch_records_its_columns_and_counts_its_calls(tiny_diffusion, attack):
    """The columns are PGD's plus the rounds, the round each image fell in and the weight; with one round
    the UNet images the run passes through its network equal calls_per_image (grad: the chain forward +
    per-step recomputation; clean: one chain per draw; the survivor check; the evaluation), with two rounds
    they are at most its upper bound."""
    x, y, ids = data()
    for rounds in (["ce"], ["ce", "dlr"]):
        cfg = validate_config({"name": "t", "attacks": {"eval_draws": 2, "diffattack": {
            "enabled": True, "steps": 2, "eot": 2, "reference": "clean", "step_interval": 3, "rounds": rounds,
            "also_weight_zero": True}}})
        att, tm = cfg["attacks"], cfg["attacks"]["threat_models"][0]
        cls = ATTACKS[attack]
        for setting in ("whitebox_eot", "dwbox"):
            model = defended(tiny_diffusion, setting)
            seen = []
            hook = model.purifier.unet.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
            try:
                cols, res = cls.run_batch(model, x, y, ids, setting=setting, threat=tm, attacks=att, seed=0)
            finally:
                hook.remove()
            ref, _ = PGD.run_batch(model, x, y, ids, setting=setting, threat=tm, attacks=att, seed=0)
            assert set(cols) == set(ref) | {"rounds", "round_fooled", "dev_weight"}
            assert list(cols["rounds"]) == [",".join(rounds)] * 3
            assert list(cols["dev_weight"]) == [0.0 if attack == "diffattack0" else 1.0] * 3
            assert set(cols["round_fooled"]) <= set(range(len(rounds) + 1))
            calls, bound = cls.calls_per_image(att, setting, model.purifier.num_steps, "exact")
            assert bound == (len(rounds) > 1)
            S, eot = model.purifier.num_steps, (2 if setting == "whitebox_eot" else 1)
            passes = 3 * eot  # (steps + 1) x EOT
            clean = (passes if setting == "whitebox_eot" else 1) * (attack == "diffattack")  # dwbox: one chain
            per_round = (S * (passes + clean + 1), S * passes)  # + 1: the survivor check
            evaluation = S * (2 if setting == "whitebox_eot" else 1)
            assert (calls.unet_fwd, calls.unet_grad) == (len(rounds) * per_round[0] + evaluation,
                                                         len(rounds) * per_round[1])
            if len(rounds) == 1:
                assert sum(seen) == len(ids) * (calls.unet_fwd + calls.unet_grad)
            else:
                assert sum(seen) <= len(ids) * (calls.unet_fwd + calls.unet_grad)


def test_grid_only_when_enabled():
    """Off in the schema; enabled, it runs on vanilla in its settings (and on its ``defenses``)."""
    assert not [r for r in Experiment.from_config(validate_config({"name": "t"})).attack_runs()
                if r.attack == "diffattack"]
    for overlay in ([], ["config/cifar10.yaml"]):  # the default and paper scale: vanilla, ADDT and the competitors
        cfg = load_configs([ROOT / "config.yaml", *[ROOT / p for p in overlay]])
        runs = {(r.defense, r.threat, r.setting) for r in Experiment.from_config(cfg).attack_runs()
                if r.attack == "diffattack"}
        assert {("vanilla", "linf", "whitebox_eot"), ("addt", "linf", "dwbox")} <= runs
        assert {d for d, _, _ in runs} == {"vanilla", "addt", "adbm", "gdmp"}
        zero = {(r.defense, r.threat, r.setting) for r in Experiment.from_config(cfg).attack_runs()
                if r.attack == "diffattack0"}
        assert zero == runs  # also_weight_zero: the lambda = 0 run beside every DiffAttack run
    cfg = validate_config({"name": "t", "attacks": {"diffattack": {"enabled": True}}})
    runs = [r for r in Experiment.from_config(cfg).attack_runs() if r.attack == "diffattack"]
    assert [(r.defense, r.threat, r.setting) for r in runs] == [("vanilla", "linf", "whitebox_eot"),
                                                                ("vanilla", "linf", "dwbox")]
    assert not [r for r in Experiment.from_config(cfg).attack_runs() if r.attack == "diffattack0"]  # off
    cfg = validate_config({"name": "t", "attacks": {"diffattack": {"enabled": True, "threat_models": ["l2"]}}})
    assert not [r for r in Experiment.from_config(cfg).attack_runs() if r.attack == "diffattack"]


def test_apgd_paper_rule_condition_two_needs_an_unhalved_step():
    """The paper's condition 2 halves the step only if it was not halved at the previous checkpoint: with
    a scripted loss that rises at almost every step but stays below the start's (the best never improves),
    the step is halved and the iterate reset at w_1 = 22 (condition 2), not again at w_2 = 41."""
    from dbprepro.attacks.apgd import apgd

    x, seen = torch.zeros(1, 1), {}

    def loss_and_grad(s, d):
        seen[s] = float(d)
        return torch.tensor([10.0 if s == 0 else 0.01 * s]), torch.ones(1, 1)

    apgd(loss_and_grad, x, torch.zeros(1, 1), eps=1.0, norm="linf", steps=100, project=lambda x, d: d)
    assert seen[23] == pytest.approx(0.375 * 2.0)  # reset to the start, step halved to eps, no momentum
    assert seen[42] - seen[41] == pytest.approx(1.0)  # the same step eps, no reset at 41
