"""DiffHammer (issues 17, 23): its known reductions (reference sec. 7 - PGD on a deterministic purifier,
PGD-EOT with uniform weights, one in-loop-scored PGD step), the E-step on draws whose gradients disagree
and its underflow guard, APGD's schedule, the restarts (their losses, the threshold), the kept iterate
and the in-loop records, the network-call count, the config checks and the attack grid."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dbprepro.attacks.diffhammer as dh_module
from dbprepro.attacks import ATTACKS, PGD, EVAL_DRAW_OFFSET, attack_batch, evaluate_draws, settings_randomness
from dbprepro.attacks.diffhammer import DiffHammer
from dbprepro.attacks.diffhammer_em import KeptIterate, estep_weights, guarded_sigmoid
from dbprepro.config import ConfigError, Experiment, validate_config

EPS, ALPHA = 8 / 255, 2 / 255
PGD_LIKE = dict(schedule="pgd", losses="ce", em_alpha=0.0)  # DiffHammer's options under which it is PGD


def data(b=4):
    g = torch.Generator().manual_seed(5)
    return torch.rand(b, 1, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g), torch.arange(100, 100 + b)


@pytest.mark.parametrize("setting", ["dwbox", "whitebox"])
@pytest.mark.parametrize("estep", ["paper", "official", "uniform"])
def test_one_draw_per_step_is_pgd(defended, setting, estep):
    """K = 1 (deterministic purifier, or one fresh draw per step) and no stepwise averaging: every
    E-step weighs the single draw alone, and the iterates are PGD's, whatever the E-step."""
    x, y, ids = data()
    model = defended(setting)
    ref = PGD(model, setting, "linf", EPS, ALPHA, steps=3, eot=1, track=4)(x, y, ids)
    dh = DiffHammer(model, setting, "linf", EPS, ALPHA, steps=3, draws=1, estep=estep, track=4, **PGD_LIKE)(x, y, ids)
    np.testing.assert_allclose(dh.deltas, ref.deltas, atol=1e-6, rtol=0)  # every iterate
    np.testing.assert_allclose(dh.loss, ref.loss, rtol=1e-5, atol=1e-6)  # the same per-step CE trace
    kept = torch.as_tensor(dh.deltas[np.arange(4), dh.extra["best_iteration"]]).view_as(x)
    torch.testing.assert_close(dh.x_adv, x + kept)  # the returned iterate is one of them
    assert np.abs(dh.deltas[:, -1]).max() > 0


@pytest.mark.parametrize("norm, eps, alpha", [("linf", EPS, ALPHA), ("l2", 0.5, 0.1)])
def test_uniform_weights_are_pgd_eot(defended, norm, eps, alpha):
    """q_i = 1: the M-step is EOT's mean gradient over the same draws, so DiffHammer is PGD-EOT."""
    x, y, ids = data(3)
    model = defended("whitebox_eot")
    ref = PGD(model, "whitebox_eot", norm, eps, alpha, steps=3, eot=3, track=3)(x, y, ids)
    dh = DiffHammer(model, "whitebox_eot", norm, eps, alpha, steps=3, draws=3, estep="uniform", track=3,
                    **PGD_LIKE)(x, y, ids)
    np.testing.assert_allclose(dh.deltas, ref.deltas, atol=1e-5, rtol=0)
    assert (dh.extra["weights"] == 1).all()


def test_inloop_protocol_with_one_draw_and_one_step_is_a_pgd_step_scored_once(defended):
    """Deterministic purifier, one draw, one iteration: the in-loop records score the clean image and
    PGD's one step, each once - correct iff correct at both."""
    x, y, ids = data(8)
    model = defended("dwbox")
    with torch.no_grad():  # the untrained classifier predicts 1 everywhere; a near-tie with class 6 makes it fallible
        model.classifier.head[3].bias[6] += 0.07
    y = torch.as_tensor(evaluate_draws(model, x, ids, 1, "dwbox")[:, 0])  # every clean image correct ...
    y[:2] = (y[:2] + 1) % 10  # ... but two
    alpha = 0.03
    att = _attacks(steps=1, draws=1, schedule="pgd", em_alpha=0.0, losses=["ce"])
    tm = {"name": "linf", "norm": "linf", "eps": alpha, "alpha": alpha}
    cols, res = ATTACKS["diffhammer"].run_batch(model, x, y, ids, setting="dwbox", threat=tm, attacks=att, seed=0,
                                                track=8)
    pgd_cols, ref = attack_batch(model, x, y, ids, attack="pgd", setting="dwbox", norm="linf", eps=alpha, alpha=alpha,
                                 pgd=att["pgd"] | {"steps": 1, "eot": 1, "restarts": 1, "random_start": False},
                                 eval_draws=1, track=8)
    np.testing.assert_allclose(res.deltas[:, 1], (ref.x_adv - x).flatten(1).numpy(), atol=1e-6, rtol=0)
    clean = np.ones(8)
    clean[:2] = 0
    expected = np.minimum(clean, pgd_cols["correct_single"])
    assert 0 < expected.sum() < clean.sum()  # the step fooled some clean-correct image, not all
    for k in ("single", "mean", "worst", "vote"):
        np.testing.assert_array_equal(cols[f"correct_{k}"], expected)
    assert set(cols["eval_protocol"]) == {"inloop"} and set(cols["step_rule"]) == {"pgd"}
    assert (cols["scoring_draws"] == 1).all()


# -- the E-step on classifiers we control --------------------------------------------------------------
class DrawDefense(torch.nn.Module):
    """Stand-in: label 0 against class 1 with margin L = a[id] + m[d] + w_d.x, where d is the draw
    (mod len(m)) and w_d = c[d] w (m[d] > 0 and a = 0: draw d is already fooled); class 2 never competes."""

    def __init__(self, offsets, setting="whitebox_eot", slopes=None, image_offsets=None, w=None):
        super().__init__()
        self.purifier = SimpleNamespace(randomness=settings_randomness(setting, seed=0))
        self.m = torch.as_tensor(offsets, dtype=torch.float32)
        self.c = torch.ones(len(offsets)) if slopes is None else torch.as_tensor(slopes, dtype=torch.float32)
        self.a = image_offsets or {}
        self.w = torch.linspace(-0.01, 0.02, 64) if w is None else w
        self.calls = []

    def forward(self, x, ids=None, draws=None):
        d = torch.as_tensor(draws) % len(self.m)
        self.calls.append((torch.is_grad_enabled(), torch.as_tensor(ids).tolist(), torch.as_tensor(draws).tolist()))
        a = torch.tensor([float(self.a.get(int(i), 0.0)) for i in torch.as_tensor(ids)])
        margin = a + self.m[d] + self.c[d] * (x.flatten(1) @ self.w)
        return torch.stack([torch.zeros_like(margin), margin, torch.full_like(margin, -100.0)], 1)


OFFSETS = [3.0, 0.5, -0.5, -4.0]  # fooled, barely fooled, barely robust, robust


def _weights(estep, lam=5.0):
    model = DrawDefense(OFFSETS)
    x, _, ids = data(2)
    y = torch.zeros(2, dtype=torch.long)
    attack = DiffHammer(model, "whitebox_eot", "linf", EPS, ALPHA, steps=1, draws=4, estep=estep, em_lam=lam)
    L, g, pred = attack.per_draw(x, y, ids, torch.arange(4))
    base = torch.as_tensor(OFFSETS)[None] + (x.flatten(1) @ model.w)[:, None]
    torch.testing.assert_close(L, base)  # the draw-dependent margins
    torch.testing.assert_close(g, model.w.expand(2, 4, 64))  # every draw's gradient is w
    np.testing.assert_array_equal(pred, (base > 0).long().numpy())  # fooled draws predict class 1
    q, norm, guarded = estep_weights(L, g, variant=estep, norm="linf", eps=EPS, lam=lam)
    assert not guarded.any()
    return q, norm, base, model.w.abs().sum()


def test_paper_estep_weights_the_draws_by_their_fooled_probability_after_the_shared_step():
    q, norm, base, w1 = _weights("paper")
    # Delta~ = eps sign(w) maximises sum_i sigmoid(lam (L_i + Delta.w)); q_i = sigmoid(lam (L_i + eps |w|_1))
    torch.testing.assert_close(q, torch.sigmoid(5.0 * (base + EPS * w1)))
    assert (q[:, 0] > 0.999).all() and (q[:, 3] < 1e-6).all()  # the fooled draw counts fully, the robust one not
    assert (q[:, :2] > 0.5).all() and (q[:, 2:] < 0.5).all()  # the sign of L_i decides (eps |w|_1 is small here)
    torch.testing.assert_close(norm, torch.full((2,), 4.0))  # the paper's M-step divides by K


def test_official_estep_drops_the_eps_factor_and_normalises_by_the_weights():
    q, norm, base, w1 = _weights("official")
    torch.testing.assert_close(q, torch.sigmoid(5.0 * (base + w1)))  # sign(w).w = |w|_1, no eps
    torch.testing.assert_close(norm, q.sum(1))
    assert (q[:, 0] > 0.999).all() and (q[:, 3] < 1e-6).all()


def test_official_estep_picks_the_candidate_direction_most_draws_share():
    """Two draws share direction +e0, one goes -e0: the chosen Delta is sign(+e0) and the odd draw
    (robust under that step) gets the low weight."""
    L = torch.zeros(1, 3)
    g = torch.zeros(1, 3, 2)
    g[0, :2, 0], g[0, 2, 0] = 1.0, -1.0
    q, _, _ = estep_weights(L, g, variant="official", norm="linf", eps=0.5, lam=1.0)
    # candidate +e0 (ties on the zero coordinate resolved by sign(0) = 0): q = sigmoid(+-1)
    torch.testing.assert_close(q, torch.sigmoid(torch.tensor([[1.0, 1.0, -1.0]])))


E1 = torch.zeros(64)
E1[0] = 1.0


@pytest.mark.parametrize("estep, em_steps", [("paper", 1), ("paper", 2), ("paper", 5), ("official", 5)])
@pytest.mark.parametrize("case", ["fooled_vs_robust", "reachable_vs_near"])
def test_the_update_follows_the_draw_the_shared_step_fools(estep, em_steps, case):
    """Two draws whose gradients disagree on pixel 0.  fooled_vs_robust: draw 0 is fooled (L = 2.5,
    gradient +e1), draw 1 far from it (L = -30.5, gradient -e1) - the selective step follows draw 0
    (EOT's mean gradient is 0 there).  reachable_vs_near: both robust, draw 0 (L = -0.2, gradient
    +10 e1) is fooled by the shared step eps sign(e1), draw 1 (L = -0.1, gradient -5 e1) would be by
    the opposite step but less surely - the E-step's linearised L_i + Delta.g_i decides, not L_i.
    Delta = +eps e1 is the fixed point of the paper's alternation, so any number of them agrees."""
    x = torch.full((1, 1, 8, 8), 0.5)
    offsets, slopes = ([2.0, -30.0], [1.0, -1.0]) if case == "fooled_vs_robust" else ([-5.2, 2.4], [10.0, -5.0])
    model = DrawDefense(offsets, slopes=slopes, w=E1)
    y, ids = torch.zeros(1, dtype=torch.long), torch.arange(1)
    L, _, _ = DiffHammer(model, "whitebox_eot", "linf", 0.1, 0.1, draws=2).per_draw(x, y, ids, torch.arange(2))
    expected_L = [[2.5, -30.5]] if case == "fooled_vs_robust" else [[-0.2, -0.1]]
    torch.testing.assert_close(L, torch.tensor(expected_L))
    res = DiffHammer(model, "whitebox_eot", "linf", 0.1, 0.1, steps=1, draws=2, estep=estep, em_steps=em_steps,
                     schedule="pgd", losses="cw", track=1)(x, y, ids)
    assert res.deltas[0, 1, 0] == pytest.approx(0.1)  # towards draw 0 (+e1), a full step
    if case == "fooled_vs_robust":  # uniform weights (EOT) cancel
        eot = DiffHammer(model, "whitebox_eot", "linf", 0.1, 0.1, steps=1, draws=2, estep="uniform", schedule="pgd",
                         losses="cw", track=1)(x, y, ids)
        assert eot.deltas[0, 1, 0] == 0


def test_underflow_guard_keeps_representable_weights_and_revives_vanished_ones():
    z = 5.0 * torch.tensor([[-30.0, -40.0], [-10.0, -40.0]])  # image 0: both draws far from fooled
    assert (torch.sigmoid(z[0]) == 0).all()  # the premise: float32 underflow
    q, dead = guarded_sigmoid(z)
    assert dead.tolist() == [True, False]
    torch.testing.assert_close(q[1], torch.sigmoid(z[1]), rtol=0, atol=0)  # representable: the paper's weights
    torch.testing.assert_close(q[0], torch.exp(torch.tensor([0.0, -50.0])))  # ratio exp(lam (z0 - z1)), max 1
    # through the E-step: the nearer draw's direction wins, for both M-step normalisations
    L = torch.tensor([[-30.0, -40.0]])
    g = torch.stack([E1[:2], -E1[:2]])[None]
    for variant in ("paper", "official"):
        q, norm, guarded = estep_weights(L, g, variant=variant, norm="linf", eps=0.1)
        assert guarded.tolist() == [True]
        assert ((q[:, :, None] * g).sum(1) / norm[:, None])[0, 0] > 0, variant


def test_an_image_far_from_every_fooled_draw_still_moves():
    x, _, ids = data(2)
    y = torch.zeros(2, dtype=torch.long)
    model = DrawDefense([-40.0, -50.0])
    res = DiffHammer(model, "whitebox_eot", "linf", EPS, ALPHA, steps=2, draws=2, schedule="pgd", losses="cw")(
        x, y, ids)
    assert ((res.x_adv - x).abs().flatten(1).amax(1) > 0).all()
    assert (res.extra["estep_guarded"] == 2).all()  # both E-steps of both images


# -- the schedule, the restarts, the kept iterate ------------------------------------------------------
@pytest.mark.parametrize("schedule, first", [("apgd", 2 * EPS), ("pgd", ALPHA)])
def test_apgd_schedule_takes_a_first_step_of_two_eps(defended, schedule, first):
    x, y, ids = data()
    attack = DiffHammer(defended("whitebox_eot"), "whitebox_eot", "linf", EPS, ALPHA, steps=2, draws=2,
                        schedule=schedule, losses="cw")
    seen, proj = [], attack._project

    def spy(x, delta):
        seen.append(delta.abs().amax().item())
        return proj(x, delta)

    attack._project = spy
    res = attack(x, y, ids)
    assert seen[0] == pytest.approx(first)  # before projection
    assert (res.x_adv - x).abs().max() <= EPS + 1e-6


def test_each_restart_runs_its_own_loss(monkeypatch):
    seen = []
    loss = dh_module.attack_loss

    def spy(logits, y, name):
        seen.append(name)
        return loss(logits, y, name)

    monkeypatch.setattr(dh_module, "attack_loss", spy)
    x, _, ids = data(2)
    model = DrawDefense([-4.0])  # never fooled: every image is restarted
    res = DiffHammer(model, "whitebox_eot", "linf", EPS, ALPHA, steps=2, draws=1, losses=["cw", "ce", "dlr"])(
        x, torch.zeros(2, dtype=torch.long), ids)
    assert seen == ["cw"] * 3 + ["ce"] * 3 + ["dlr"] * 3  # steps + 1 scored iterates per restart
    assert (res.extra["restarts_run"] == 3).all()


def test_only_images_at_most_threshold_fooled_are_restarted():
    """Image 100 is fooled by every draw, 101 by half of them (the code restarts at <= 50 %), 102 by none."""
    x, _, ids = data(3)
    model = DrawDefense([3.0, -3.0], image_offsets={100: 10.0, 102: -10.0})
    att = _attacks(steps=2, draws=2, losses=["cw", "ce"])
    tm = att["threat_models"][0]
    cols, _ = ATTACKS["diffhammer"].run_batch(model, x, torch.zeros(3, dtype=torch.long), ids, setting="whitebox_eot",
                                              threat=tm, attacks=att, seed=0)
    restart1 = {i for grad, ii, dd in model.calls for i, d in zip(ii, dd) if d >= 3 * 2}  # draws of restart 1
    assert restart1 == {101, 102}
    np.testing.assert_array_equal(cols["restarts_run"], [1, 2, 2])
    np.testing.assert_array_equal(cols["correct_mean"], [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(cols["correct_worst"], [0.0, 0.0, 1.0])


def test_kept_iterate_is_the_first_fooled_then_the_highest_mean_loss():
    """The code's x_adv_best: an update at the first iterate where a draw is fooled and at every new
    maximum of the mean loss (ties keep the earlier iterate)."""
    mean = np.array([[0.1, 0.1, 0.1], [0.5, 0.5, 0.5], [0.3, 0.3, 0.3], [0.4, 0.6, 0.5]])  # [t, image]
    fooled = np.array([[0, 0, 0], [0, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=bool)
    kept = KeptIterate(torch.zeros(3, 1))
    for t in range(4):
        scores = {k: 1.0 - fooled[t].astype(float) for k in ("single", "mean", "worst", "vote")}
        kept.update(t, torch.full((3, 1), float(t)), fooled[t], mean[t], scores)
    np.testing.assert_array_equal(kept.iteration, [2, 3, 1])  # first fooled; then a higher mean; never fooled
    np.testing.assert_array_equal(kept.delta[:, 0], [2.0, 3.0, 1.0])
    np.testing.assert_array_equal(kept.scores["worst"], [0.0, 0.0, 1.0])


# -- records, calls, config, grid ----------------------------------------------------------------------
def _attacks(**dh):
    att = validate_config({"name": "t"})["attacks"]
    att["diffhammer"].update(dh)
    return att


def test_inloop_records_are_minima_over_the_iterates_own_draws_with_no_evaluation_pass():
    model = DrawDefense(OFFSETS)
    x, _, ids = data(3)
    y = torch.zeros(3, dtype=torch.long)
    att = _attacks(enabled=True, steps=2, draws=4, losses=["cw"])
    tm = att["threat_models"][0]
    cols, res = ATTACKS["diffhammer"].run_batch(model, x, y, ids, setting="whitebox_eot", threat=tm, attacks=att,
                                                seed=0, track=3)
    assert all(grad for grad, _, _ in model.calls)  # no forward outside the attack's own gradient passes
    assert {d for _, _, dd in model.calls for d in dd} == set(range(12))  # (steps + 1) x K attack draws
    # every iterate: draws 0, 1 fooled (2 of 4), draw 0 first; the vote ties (2 - 2) to label 0
    np.testing.assert_array_equal(cols["correct_mean"], 0.5)
    np.testing.assert_array_equal(cols["correct_worst"], 0.0)
    np.testing.assert_array_equal(cols["correct_single"], 0.0)
    np.testing.assert_array_equal(cols["correct_vote"], 1.0)
    assert (cols["scoring_draws"] == 4).all() and set(cols["eval_protocol"]) == {"inloop"}
    assert set(cols["step_rule"]) == {"apgd"} and set(cols["restart_losses"]) == {"cw"}
    # already fooled at the clean image: kept is the first iterate of the largest mean loss, and returned
    np.testing.assert_array_equal(cols["best_iteration"], res.loss.argmax(1))
    assert (res.loss.max(1) > res.loss[:, 0]).all()
    torch.testing.assert_close(res.x_adv, x + torch.as_tensor(res.deltas[np.arange(3), cols["best_iteration"]]
                                                             ).view_as(x))
    assert res.extra["weights"].shape == (3, 2, 4) and res.loss.shape == (3, 3)


def test_final_protocol_evaluates_the_returned_iterate_on_fresh_draws():
    model = DrawDefense(OFFSETS)
    x, _, ids = data(3)
    att = _attacks(enabled=True, steps=2, draws=4, losses=["cw"], protocol="final", eval_draws=6)
    cols, _ = ATTACKS["diffhammer"].run_batch(model, x, torch.zeros(3, dtype=torch.long), ids,
                                              setting="whitebox_eot", threat=att["threat_models"][0], attacks=att,
                                              seed=0)
    evaluation = [d for grad, _, d in model.calls if not grad]
    assert evaluation == [[EVAL_DRAW_OFFSET + k] * 3 for k in range(6)]  # N = diffhammer.eval_draws, unseen draws
    np.testing.assert_array_equal(cols["correct_mean"], 2 / 6)  # fresh draws 0..5 are 0, 1, 2, 3, 0, 1 mod 4
    assert (cols["scoring_draws"] == 6).all() and set(cols["eval_protocol"]) == {"final"}


def test_calls_per_image_are_k_gradients_per_iterate_per_restart_plus_the_final_evaluation():
    att = _attacks(steps=7, draws=5, losses=["cw"])
    pgd_like = {**att, "pgd": {**att["pgd"], "steps": 7, "eot": 5, "restarts": 1}}
    inloop, bound = ATTACKS["diffhammer"].calls_per_image(att, "whitebox_eot", 10, "exact")
    pgd = PGD.calls_per_image(pgd_like, "whitebox_eot", 10, "exact")[0]
    assert not bound and inloop.unet_grad == pgd.unet_grad == 10 * 5 * 8
    assert inloop.unet_fwd == pgd.unet_fwd - 10 * att["eval_draws"]  # the in-loop scoring costs no forward
    final, _ = ATTACKS["diffhammer"].calls_per_image(_attacks(steps=7, draws=5, losses=["cw"], protocol="final",
                                                              eval_draws=3), "whitebox_eot", 10, "exact")
    assert final.unet_fwd - inloop.unet_fwd == 10 * 3
    three, bound = ATTACKS["diffhammer"].calls_per_image(_attacks(steps=7, draws=5), "whitebox_eot", 10, "exact")
    assert bound and three.unet_grad == 3 * inloop.unet_grad  # restarts 2-3 run on a subset: an upper bound


def test_config_refuses_meaningless_combinations():
    with pytest.raises(ConfigError, match=r"attacks.diffhammer.restarts: 3 restarts .* names 1"):
        validate_config({"name": "t", "attacks": {"diffhammer": {"restarts": 3, "losses": ["cw"]}}})
    with pytest.raises(ConfigError, match=r"attacks.diffhammer.eval_draws: .*final protocol only"):
        validate_config({"name": "t", "attacks": {"diffhammer": {"eval_draws": 10}}})
    ok = validate_config({"name": "t", "attacks": {"diffhammer": {"restarts": 3, "protocol": "final",
                                                                  "eval_draws": 10}}})
    assert ok["attacks"]["diffhammer"]["losses"] == ["cw", "ce", "dlr"]
    with pytest.raises(ConfigError, match="loss"):  # the single-loss key is gone: one loss per restart
        validate_config({"name": "t", "attacks": {"diffhammer": {"loss": "ce"}}})


def test_grid_has_diffhammer_only_when_enabled():
    cfg = validate_config({"name": "t"})
    assert cfg["attacks"]["diffhammer"]["enabled"] is False
    assert not [r for r in Experiment.from_config(cfg).attack_runs() if r.attack == "diffhammer"]
    cfg["attacks"]["diffhammer"]["enabled"] = True
    runs = [tuple(r) for r in Experiment.from_config(cfg).attack_runs() if r.attack == "diffhammer"]
    assert runs == [("vanilla", tm["name"], "whitebox_eot", "diffhammer") for tm in cfg["attacks"]["threat_models"]]
