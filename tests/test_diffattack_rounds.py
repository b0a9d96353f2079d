"""DiffAttack's loss pinned at a known state (issue 23): CE + lambda (D / D_ref) sum_k alpha_k MSE_k computed
independently from the chain states (so a flipped sign, weights 1 instead of 1 / |S| or a lost scale
fail), its resolution scale (exactly the paper's loss at CIFAR-10 size), the loss and gradient through
a vote defense's own forward, one DLR round at lambda = 0 against torchattacks' APGD-DLR bit for bit,
and the rounds: round 2 attacks round 1's survivors only, an image fooled in round 1 keeps its example."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchattacks

from dbprepro.attacks import PGD, settings_randomness
from dbprepro.attacks.diffattack import PAPER_DIM, DiffAttack
from dbprepro.models.classifiers import SmallCNN
from dbprepro.models.diffusion import build_scheduler, build_unet
from dbprepro.purifiers import DefendedClassifier, Purifier
from dbprepro.purifiers.vote import vote_defense
from dbprepro.randomness import Stream


def data(b=3, c=1, size=8, dtype=torch.float32, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, size, size, generator=g).clamp(0.05, 0.95)
    return x.to(dtype), torch.randint(0, 10, (b,), generator=g), torch.arange(100, 100 + b)


def model_of(unet, setting, channels=1, size=8, t_star=0.1, dtype=torch.float32):
    torch.manual_seed(0)
    clf = SmallCNN(in_channels=channels, image_size=size, width=8, hidden=16).eval().to(dtype)
    p = Purifier(copy.deepcopy(unet).to(dtype), build_scheduler(), t_star=t_star, num_inference_steps=100,
                 randomness=settings_randomness(setting, seed=0))
    return DefendedClassifier(clf, p)


def expected_loss(model, x, y, ids, draws, weight, keep, reference_dim, alphas=None):
    """CE of the defense's logits + weight * (D / reference_dim) * sum_k alpha_k MSE(x_t_k, x'_k), the
    reference built here from the scheduler and the purification's own forward noise."""
    p = model.purifier
    with torch.no_grad():
        out, states = p.purify_states(x, ids, draws, keep)
        ce = F.cross_entropy(model.classifier(out), y, reduction="none")
        eps = p.randomness.normal(ids, draws, Stream.FORWARD, p.t_start, x.shape[1:], dtype=x.dtype)
        alphas = alphas or [1 / len(keep)] * len(keep)
        dev = torch.zeros_like(ce)
        for a, k, s in zip(alphas, keep, states):
            abar = float(p.scheduler.alphas_cumprod[p.timesteps[k + 1]])
            ref = abar ** 0.5 * (2 * x - 1) + (1 - abar) ** 0.5 * eps
            dev += a * ((s - ref) ** 2).mean(dim=(1, 2, 3))
        scale = 1.0 if reference_dim is None else x[0].numel() / reference_dim
    return ce + weight * scale * dev


@pytest.mark.parametrize("reference_dim", [PAPER_DIM, None])
def test_loss_is_ce_plus_the_weighted_deviation_at_a_known_state(tiny_diffusion, reference_dim):
    x, y, ids = data()
    model = model_of(tiny_diffusion[0], "dwbox")
    att = DiffAttack(model, "dwbox", weight=3.0, reference_dim=reference_dim)
    assert att.keep == list(range(model.purifier.num_steps - 1)) and len(att.keep) > 1
    draws = torch.zeros(1, dtype=torch.long)
    loss, _ = att.loss_and_grad(x, y, ids, draws)
    d = torch.zeros_like(ids)
    want = expected_loss(model, x, y, ids, d, 3.0, att.keep, reference_dim)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    ce_only = expected_loss(model, x, y, ids, d, 0.0, att.keep, reference_dim)
    assert float((want - ce_only).min()) > 1e-4 * float(ce_only.max())  # the deviation term is not negligible here
    # the digits' scale: 64 / 3072 of the per-pixel mean
    if reference_dim is None:
        scaled = DiffAttack(model, "dwbox", weight=3.0).loss_and_grad(x, y, ids, draws)[0]
        torch.testing.assert_close(scaled - ce_only, (loss - ce_only) * 64 / 3072, rtol=1e-4, atol=1e-8)


def test_at_cifar_resolution_the_default_scale_is_the_papers_loss_exactly():
    """On 3 x 32 x 32 images reference_dim 3072 multiplies by exactly 1: the plain per-pixel mean."""
    torch.manual_seed(0)
    unet = build_unet(32, 3, [8, 16], attention=[False, False], norm_num_groups=4).eval()
    model = model_of(unet, "dwbox", channels=3, size=32, t_star=0.03)
    x, y, ids = data(2, c=3, size=32)
    draws = torch.zeros(1, dtype=torch.long)
    paper, g_paper = DiffAttack(model, "dwbox", weight=1.0).loss_and_grad(x, y, ids, draws)
    plain, g_plain = DiffAttack(model, "dwbox", weight=1.0, reference_dim=None).loss_and_grad(x, y, ids, draws)
    assert torch.equal(paper, plain) and torch.equal(g_paper, g_plain)
    att = DiffAttack(model, "dwbox", weight=1.0)
    want = expected_loss(model, x, y, ids, torch.zeros_like(ids), 1.0, att.keep, None)
    torch.testing.assert_close(paper, want, rtol=1e-5, atol=1e-7)


def test_on_a_vote_defense_the_loss_is_its_forwards_ce_plus_the_mean_deviation(tiny_diffusion):
    """Through VoteDefense.forward_states: the logits are the defense's forward (log mean softmax of
    its V purifications), the deviation the mean over the same V purifications; at weight 0 the
    gradient is PGD's on the vote defense."""
    V = 3
    x, y, ids = data(2)
    vote = vote_defense(model_of(tiny_diffusion[0], "whitebox_eot"), V)
    draws = torch.tensor([4, 7])
    att = DiffAttack(vote, "whitebox_eot", weight=2.0, eot=2)
    loss, grad = att.loss_and_grad(x, y, ids, draws)
    want = torch.zeros_like(loss)
    for d in draws.tolist():
        dd = torch.full_like(ids, d)
        with torch.no_grad():
            ce = F.cross_entropy(vote(x, ids, dd), y, reduction="none")
        pdraws = dd[:, None] * V + torch.arange(V)  # the vote's purifier draws
        dev = torch.stack([expected_loss(vote, x, y, ids, pdraws[:, v], 2.0, att.keep, PAPER_DIM)
                           - expected_loss(vote, x, y, ids, pdraws[:, v], 0.0, att.keep, PAPER_DIM)
                           for v in range(V)], 1).mean(1)
        want += (ce + dev) / len(draws)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    fwd = vote.forward_states(x, ids, torch.full_like(ids, 4), att.keep)
    assert fwd.copies == V and fwd.states[0].shape[0] == 2 * V
    torch.testing.assert_close(fwd.logits, vote(x, ids, torch.full_like(ids, 4)), rtol=0, atol=1e-6)
    zero = DiffAttack(vote, "whitebox_eot", weight=0.0, eot=2).loss_and_grad(x, y, ids, draws)
    ref = PGD(vote, "whitebox_eot", eot=2).loss_and_grad(x, y, ids, draws)
    assert torch.equal(zero[0], ref[0]) and torch.equal(zero[1], ref[1])


@pytest.mark.parametrize("loss", ["dlr", "ce"])
def test_one_round_at_weight_zero_is_torchattacks_apgd(tiny_diffusion, loss):
    """lambda = 0, rounds [loss], apgd_rule autoattack, DW-box (a deterministic defended model), float64,
    torchattacks' start point: DiffAttack's best point and loss are torchattacks' APGD (n_restarts 1,
    eot_iter 1) ``attack_single_run`` best point and best loss bit for bit.  torchattacks' step size is
    float32 (``torch.Tensor([2.0])``), so eps is a power of two (2 eps exact in float32); its start is
    x + eps t / max|t| with t = 2 u - 1 after ``torch.manual_seed(seed)``, which the test hands to
    DiffAttack.  (torchattacks' ``perturb`` returns the last misclassified iterate and attacks only
    clean-correct images; its ``attack_single_run`` best point is the comparable quantity.)"""
    x, y, ids = data(4, dtype=torch.float64)
    model = model_of(tiny_diffusion[0], "dwbox", t_star=0.03, dtype=torch.float64)
    eps, steps = 1 / 32, 10
    ta = torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=0, loss=loss, eot_iter=1)
    with model.bind(ids):
        torch.manual_seed(0)
        x_best, _, loss_best, _ = ta.attack_single_run(x, y)
    torch.manual_seed(0)
    t = 2 * torch.rand(x.shape) - 1
    start = (x + eps * t / t.flatten(1).abs().amax(1).view(-1, 1, 1, 1)).clamp(0, 1)
    att = DiffAttack(model, "dwbox", "linf", eps, eps / 4, steps=steps, weight=0.0, rounds=[loss])
    att.start = lambda xx, ii: start - xx
    res = att(x, y, ids)
    assert torch.equal(res.x_adv, x_best)
    np.testing.assert_array_equal(res.extra["loss_adv"], loss_best.numpy())
    assert not np.array_equal(res.loss[:, 0], res.extra["loss_adv"])  # the attack moved


def test_round_two_attacks_only_round_ones_survivors(tiny_diffusion):
    """Round 2 sees exactly the images the fresh forward pass finds robust after round 1; an image fooled in
    round 1 keeps round 1's example (the one-round attack's), and round_fooled says where each fell."""
    x, y, ids = data(6, seed=11)
    model = model_of(tiny_diffusion[0], "dwbox")
    with torch.no_grad():  # the untrained classifier predicts one class; half the labels agree with it
        pred = model(x, ids).argmax(1)
    y = torch.where(torch.arange(6) % 2 == 0, pred, (pred + 1) % 10)
    kw = dict(norm="linf", eps=0.12, alpha=0.03, steps=3, weight=1.0)
    one = DiffAttack(model, "dwbox", rounds=["ce"], **kw)(x, y, ids)
    two_attack = DiffAttack(model, "dwbox", rounds=["ce", "dlr"], **kw)
    seen = []
    inner = two_attack._attack_round
    two_attack._attack_round = lambda xx, yy, ii: (seen.append(ii.clone()), inner(xx, yy, ii))[1]
    two = two_attack(x, y, ids)
    with torch.no_grad():
        fooled1 = (model(one.x_adv, ids).argmax(1) != y)
    assert 0 < int(fooled1.sum()) < len(ids)  # both kinds present: the test can see the difference
    assert torch.equal(seen[0], ids) and torch.equal(seen[1], ids[~fooled1])
    assert two_attack.attacked == [len(ids), int((~fooled1).sum())]
    assert torch.equal(two.x_adv[fooled1], one.x_adv[fooled1])
    assert (two.extra["round_fooled"][fooled1.numpy()] == 1).all()
    assert (two.extra["round_fooled"][~fooled1.numpy()] != 1).all()
    assert np.isnan(two.loss[fooled1.numpy(), 4:]).all() and not np.isnan(two.loss[~fooled1.numpy()]).any()
    with torch.no_grad():
        fooled2 = model(two.x_adv, ids).argmax(1) != y
    assert np.array_equal(two.extra["round_fooled"] > 0, fooled2.numpy())


def test_the_attack_stage_records_the_weight_zero_run(attack_stage):
    """The DAG's attack stage runs diffattack0 from DiffAttack's section (private to the two DiffAttack
    attacks) and writes the rounds, the round each image fell in and the weight 0; the waterfall's
    DiffAttack stage holds both attacks."""
    from dbprepro.config import Experiment, validate_config
    from dbprepro.paper1.waterfall import stage_of

    cfg = validate_config({"name": "t", "data": {"n_test": 64}, "purification": {"num_inference_steps": 50},
                           "attacks": {"n_images": 4, "batch_size": 2, "shards": 1, "track_images": 1,
                                       "eval_draws": 2, "diffattack": {"enabled": True, "steps": 2, "eot": 2,
                                                                       "also_weight_zero": True}}})
    exp = Experiment.from_config(cfg)
    params = exp.attacks("vanilla", "dwbox", "diffattack0")
    assert params["diffattack"]["rounds"] == ["ce", "dlr"] and "diffattack" not in exp.attacks(
        "vanilla", "dwbox", "pgd")
    rec = attack_stage("diffattack0", "dwbox", params, cfg["purification"])
    assert len(rec) == 4 and set(rec["rounds"]) == {"ce,dlr"} and set(rec["dev_weight"]) == {0.0}
    assert set(rec["round_fooled"]) <= {0, 1, 2}
    assert stage_of("diffattack0", "dwbox") == stage_of("diffattack", "whitebox_eot") == "DiffAttack"
