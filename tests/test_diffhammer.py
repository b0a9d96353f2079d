"""DiffHammer (issue 17): its known reductions (reference sec. 7 - PGD on a deterministic purifier,
PGD-EOT with uniform weights), the E-step weights on a classifier whose prediction depends on the
draw, the N-evaluation columns, the network-call count and the attack grid."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dbprepro.attacks import ATTACKS, PGD, EVAL_DRAW_OFFSET, attack_batch, settings_randomness
from dbprepro.attacks.diffhammer import DiffHammer, estep_weights
from dbprepro.config import Experiment, validate_config
from dbprepro.models.classifiers import SmallCNN
from dbprepro.purifiers import DefendedClassifier, Purifier

EPS, ALPHA = 8 / 255, 2 / 255


def defended(tiny_diffusion, setting):
    torch.manual_seed(0)
    clf = SmallCNN(width=8, hidden=16).eval()
    p = Purifier(*tiny_diffusion, t_star=0.1, num_inference_steps=100,
                 randomness=settings_randomness(setting, seed=0))
    return DefendedClassifier(clf, p)


def data(b=4):
    g = torch.Generator().manual_seed(5)
    return torch.rand(b, 1, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g), torch.arange(100, 100 + b)


@pytest.mark.parametrize("setting", ["dwbox", "whitebox"])
@pytest.mark.parametrize("estep", ["paper", "official", "uniform"])
def test_one_draw_per_step_is_pgd(tiny_diffusion, setting, estep):
    """K = 1 (deterministic purifier, or one fresh draw per step) and no stepwise averaging: every
    E-step weighs the single draw alone, and the iterates are PGD's, whatever the E-step."""
    x, y, ids = data()
    model = defended(tiny_diffusion, setting)
    ref = PGD(model, setting, "linf", EPS, ALPHA, steps=3, eot=1)(x, y, ids)
    dh = DiffHammer(model, setting, "linf", EPS, ALPHA, steps=3, draws=1, estep=estep, loss="ce",
                    em_alpha=0.0)(x, y, ids)
    torch.testing.assert_close(dh.x_adv, ref.x_adv, atol=1e-6, rtol=0)
    np.testing.assert_allclose(dh.loss, ref.loss, rtol=1e-5, atol=1e-6)  # the same per-step CE trace
    assert (dh.x_adv - x).abs().max() > 0


@pytest.mark.parametrize("norm, eps, alpha", [("linf", EPS, ALPHA), ("l2", 0.5, 0.1)])
def test_uniform_weights_are_pgd_eot(tiny_diffusion, norm, eps, alpha):
    """q_i = 1: the M-step is EOT's mean gradient over the same draws, so DiffHammer is PGD-EOT."""
    x, y, ids = data(3)
    model = defended(tiny_diffusion, "whitebox_eot")
    ref = PGD(model, "whitebox_eot", norm, eps, alpha, steps=3, eot=3)(x, y, ids)
    dh = DiffHammer(model, "whitebox_eot", norm, eps, alpha, steps=3, draws=3, estep="uniform", loss="ce",
                    em_alpha=0.0)(x, y, ids)
    torch.testing.assert_close(dh.x_adv, ref.x_adv, atol=1e-5, rtol=0)
    assert (dh.extra["weights"] == 1).all()


# -- the E-step on a classifier we control -------------------------------------------------------------
class DrawDefense(torch.nn.Module):
    """Stand-in: label 0 against class 1 with margin L_d(x) = m[d] + w.x, where d is the draw
    (m[d] > 0: draw d is already fooled); class 2 never competes.  Every draw's input gradient
    is w."""

    def __init__(self, offsets, setting="whitebox_eot"):
        super().__init__()
        self.purifier = SimpleNamespace(randomness=settings_randomness(setting, seed=0))
        self.m = torch.as_tensor(offsets, dtype=torch.float32)
        self.w = torch.linspace(-0.01, 0.02, 64)

    def forward(self, x, ids=None, draws=None):
        margin = self.m[torch.as_tensor(draws) % len(self.m)] + x.flatten(1) @ self.w
        return torch.stack([torch.zeros_like(margin), margin, torch.full_like(margin, -100.0)], 1)


OFFSETS = [3.0, 0.5, -0.5, -4.0]  # fooled, barely fooled, barely robust, robust


def _weights(estep, lam=5.0):
    model = DrawDefense(OFFSETS)
    x, _, ids = data(2)
    y = torch.zeros(2, dtype=torch.long)
    attack = DiffHammer(model, "whitebox_eot", "linf", EPS, ALPHA, steps=1, draws=4, estep=estep, em_lam=lam)
    L, g = attack.per_draw(x, y, ids, torch.arange(4))
    base = torch.as_tensor(OFFSETS)[None] + (x.flatten(1) @ model.w)[:, None]
    torch.testing.assert_close(L, base)  # the draw-dependent margins
    torch.testing.assert_close(g, model.w.expand(2, 4, 64))  # every draw's gradient is w
    q, norm = estep_weights(L, g, variant=estep, norm="linf", eps=EPS, lam=lam)
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
    q, _ = estep_weights(L, g, variant="official", norm="linf", eps=0.5, lam=1.0)
    # candidate +e0 (ties on the zero coordinate resolved by sign(0) = 0): q = sigmoid(+-1)
    torch.testing.assert_close(q, torch.sigmoid(torch.tensor([[1.0, 1.0, -1.0]])))


def test_selective_mstep_follows_the_reachable_draws():
    """Draw 1 (a half of the draws) pulls the other way but is out of reach (L << 0): the weighted
    gradient follows draw 0's direction, where the uniform mean cancels."""
    L = torch.tensor([[0.0, -10.0]])
    g = torch.tensor([[[1.0, 1.0], [-1.0, -1.0]]])
    for variant in ("paper", "official"):
        q, norm = estep_weights(L, g, variant=variant, norm="linf", eps=0.1)
        m = (q[:, :, None] * g).sum(1) / norm[:, None]
        assert (m > 0).all(), variant
    q, norm = estep_weights(L, g, variant="uniform", norm="linf", eps=0.1)
    assert ((q[:, :, None] * g).sum(1) == 0).all()


# -- records, calls, grid ------------------------------------------------------------------------------
def _attacks(**dh):
    att = validate_config({"name": "t"})["attacks"]
    att["diffhammer"].update(dh)
    return att


def test_records_carry_the_n_evaluation_with_diffhammers_own_n():
    model = DrawDefense(OFFSETS)
    x, _, ids = data(3)
    y = torch.zeros(3, dtype=torch.long)
    calls = []
    fwd = model.forward

    def spy(x, ids=None, draws=None):  # records, per call, whether gradients were on and every image's draw
        calls.append((torch.is_grad_enabled(), torch.as_tensor(draws).tolist()))
        return fwd(x, ids, draws)

    model.forward = spy
    att = _attacks(enabled=True, steps=2, draws=4, eval_draws=6)
    tm = att["threat_models"][0]
    cols, res = ATTACKS["diffhammer"].run_batch(model, x, y, ids, setting="whitebox_eot", threat=tm, attacks=att,
                                                seed=0)
    pgd_cols, _ = attack_batch(DrawDefense(OFFSETS), x, y, ids, attack="pgd", setting="whitebox_eot", norm="linf",
                               eps=tm["eps"], alpha=tm["alpha"], pgd=att["pgd"] | {"steps": 1}, eval_draws=2)
    assert set(cols) == set(pgd_cols)  # PGD's columns: the merge and the tables work unchanged
    evaluation = [d for grad, d in calls if not grad]
    assert evaluation == [[EVAL_DRAW_OFFSET + k] * 3 for k in range(6)]  # N = diffhammer.eval_draws, unseen draws
    assert {v for grad, d in calls if grad for v in d} == set(range(12))  # (steps + 1) x K attack draws
    assert (cols["correct_worst"] <= cols["correct_mean"]).all()
    assert res.extra["weights"].shape == (3, 2, 4) and res.loss.shape == (3, 3)


def test_calls_per_image_are_k_gradients_per_step_and_the_n_evaluation():
    att = _attacks(steps=7, draws=5, eval_draws=None)
    pgd_like = {**att, "pgd": {**att["pgd"], "steps": 7, "eot": 5, "restarts": 1}}
    dh, bound = ATTACKS["diffhammer"].calls_per_image(att, "whitebox_eot", 10, "exact")
    assert not bound and dh == PGD.calls_per_image(pgd_like, "whitebox_eot", 10, "exact")[0]
    own, _ = ATTACKS["diffhammer"].calls_per_image(_attacks(steps=7, draws=5, eval_draws=3), "whitebox_eot", 10,
                                                   "exact")
    assert dh.unet_fwd - own.unet_fwd == 10 * (att["eval_draws"] - 3)  # N - N' fewer evaluation forwards
    assert dh.unet_grad == own.unet_grad == 10 * 5 * 8


def test_grid_has_diffhammer_only_when_enabled():
    cfg = validate_config({"name": "t"})
    assert cfg["attacks"]["diffhammer"]["enabled"] is False
    assert not [r for r in Experiment.from_config(cfg).attack_runs() if r.attack == "diffhammer"]
    cfg["attacks"]["diffhammer"]["enabled"] = True
    runs = [tuple(r) for r in Experiment.from_config(cfg).attack_runs() if r.attack == "diffhammer"]
    assert runs == [("vanilla", tm["name"], "whitebox_eot", "diffhammer") for tm in cfg["attacks"]["threat_models"]]
