from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchattacks

from dbprepro.attacks import (PGD, EVAL_DRAW_OFFSET, attack_batch, evaluate_draws, project,
                              settings_randomness, summarise_evaluations)

EPS, ALPHA = 8 / 255, 2 / 255


def data(b=4):
    g = torch.Generator().manual_seed(5)
    return torch.rand(b, 1, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g), torch.arange(100, 100 + b)


def test_dwbox_model_is_deterministic_whitebox_model_is_not(defended):
    x, _, ids = data()
    dw = defended("dwbox")
    with dw.bind(ids=ids):
        assert torch.equal(dw(x), dw(x))
    wb = defended("whitebox")
    with wb.bind(ids=ids):
        assert not torch.equal(wb(x), wb(x))


def test_setting_must_match_the_purifier_randomness(defended):
    with pytest.raises(ValueError, match="fixed"):
        PGD(defended("whitebox"), "dwbox")
    with pytest.raises(ValueError, match="random"):
        PGD(defended("dwbox"), "whitebox_eot")


def test_draw_schedule_of_each_setting(defended):
    wb = PGD(defended("whitebox"), "whitebox", steps=3, eot=10)
    assert wb.eot == 1 and [wb.draws(0, s).tolist() for s in range(3)] == [[0], [1], [2]]
    eot = PGD(defended("whitebox_eot"), "whitebox_eot", steps=3, eot=2)
    assert [eot.draws(0, s).tolist() for s in range(2)] == [[0, 1], [2, 3]]
    dw = PGD(defended("dwbox", fixed_draw=3), "dwbox", steps=3, eot=10)
    assert dw.eot == 1 and dw.draws(0, 0).tolist() == dw.draws(0, 2).tolist() == [3]


def test_dwbox_pgd_equals_torchattacks_pgd_on_the_fixed_purifier(defended):
    x, y, ids = data()
    model = defended("dwbox")
    ours = PGD(model, "dwbox", "linf", EPS, ALPHA, steps=3)(x, y, ids).x_adv
    with model.bind(ids=ids):
        ref = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=3, random_start=False)(x, y)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_batched_eot_gradient_equals_the_sequential_sum(defended):
    x, y, ids = data(3)
    attack = PGD(defended("whitebox_eot"), "whitebox_eot", steps=1, eot=4)
    draws = torch.arange(4)
    loss, grad = attack.loss_and_grad(x, y, ids, draws)
    seq_grad, seq_loss = torch.zeros_like(x), torch.zeros(3)
    for d in draws:
        l, g = attack.loss_and_grad(x, y, ids, d.view(1))
        seq_grad += g
        seq_loss += l
    torch.testing.assert_close(grad, seq_grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, seq_loss / 4, atol=1e-5, rtol=1e-5)
    attack.eot_chunk = 3  # chunked passes give the same result
    _, grad2 = attack.loss_and_grad(x, y, ids, draws)
    torch.testing.assert_close(grad, grad2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm, eps, alpha", [("linf", EPS, ALPHA), ("l2", 0.5, 0.1)])
def test_pgd_stays_in_the_ball_and_raises_the_dwbox_loss(defended, norm, eps, alpha):
    x, y, ids = data(4)
    res = PGD(defended("dwbox"), "dwbox", norm, eps, alpha, steps=4, track=2)(x, y, ids)
    d = (res.x_adv - x).flatten(1)
    bound = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (bound <= eps + 1e-6).all() and res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert (res.loss[:, -1] > res.loss[:, 0]).mean() >= 0.75  # the deterministic loss climbs
    assert res.deltas.shape == (2, 5, 64) and np.all(res.deltas[:, 0] == 0)  # zero start recorded


def test_projection():
    d = torch.tensor([[[[3.0, -4.0]]]])
    assert torch.allclose(project(d, "l2", 1.0).flatten(), torch.tensor([0.6, -0.8]))
    assert torch.equal(project(d, "linf", 1.0).flatten(), torch.tensor([1.0, -1.0]))


def test_evaluation_bookkeeping():
    preds = np.array([[1, 1, 1, 1],   # always right
                      [1, 2, 2, 1],   # half right, tie -> lowest label (1) -> vote right
                      [2, 2, 1, 2],   # mostly wrong
                      [0, 1, 1, 1]])  # first draw wrong, rest right
    s = summarise_evaluations(preds, np.array([1, 1, 1, 1]))
    assert s["single"].tolist() == [1, 1, 0, 0]
    assert s["mean"].tolist() == [1, 0.5, 0.25, 0.75]
    assert s["worst"].tolist() == [1, 0, 0, 0]
    assert s["vote"].tolist() == [1, 1, 0, 1]


def test_evaluation_draws_are_unseen_in_stochastic_settings_and_fixed_in_dwbox(defended):
    x, _, ids = data(2)
    wb = defended("whitebox")
    seen = []
    real = wb.purifier.randomness.generators
    wb.purifier.randomness.generators = lambda i, d, s, t: seen.append(np.asarray(d).tolist()) or real(i, d, s, t)
    evaluate_draws(wb, x, ids, 3, "whitebox")
    assert {v for row in seen for v in row} == {EVAL_DRAW_OFFSET, EVAL_DRAW_OFFSET + 1, EVAL_DRAW_OFFSET + 2}
    dw = defended("dwbox")
    p = evaluate_draws(dw, x, ids, 3, "dwbox")
    with dw.bind(ids=ids):
        assert (p == dw(x).argmax(1).numpy()[:, None]).all()


def test_attack_batch_columns(defended):
    x, y, ids = data(2)
    cols, res = attack_batch(defended("whitebox_eot"), x, y, ids, attack="bpda",
                             setting="whitebox_eot", norm="linf", eps=EPS, alpha=ALPHA,
                             pgd={"steps": 2, "eot": 2, "random_start": False, "restarts": 1}, eval_draws=3)
    assert set(cols) >= {"id", "correct_single", "correct_mean", "correct_worst", "correct_vote", "norm_linf"}
    assert (cols["norm_linf"] <= EPS + 1e-6).all() and cols["norm_linf"].max() > 0


# -- issue 16: the draws themselves, and the projection when it binds ------------------------------

class SpyDefense(torch.nn.Module):
    """A defended-classifier stand-in: a linear classifier (gradient the same at every x) that
    records, per call, whether gradients were on and the draw index of every image."""

    def __init__(self, setting, fixed_draw=0):
        super().__init__()
        self.purifier = SimpleNamespace(randomness=settings_randomness(setting, seed=0, fixed_draw=fixed_draw))
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(64, 10)
        self.calls = []

    def forward(self, x, ids=None, draws=None):
        self.calls.append((torch.is_grad_enabled(), None if draws is None else torch.as_tensor(draws).tolist()))
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("setting, fixed_draw, expected", [("dwbox", 3, 3), ("dwbox_c2", 2, 2)])
def test_dwbox_evaluation_and_attack_use_only_the_fixed_configurations_draw(setting, fixed_draw, expected):
    x, y, ids = data(3)
    spy = SpyDefense(setting, fixed_draw)
    evaluate_draws(spy, x, ids, 5, setting)
    assert spy.calls and all(d == [expected] * 3 for _, d in spy.calls)
    spy.calls.clear()
    attack_batch(spy, x, y, ids, attack="pgd", setting=setting, norm="linf", eps=EPS, alpha=ALPHA,
                 pgd={"steps": 2, "eot": 4, "random_start": False, "restarts": 1}, eval_draws=5)
    attack = [d for grad, d in spy.calls if grad]
    evaluation = [d for grad, d in spy.calls if not grad]
    assert len(attack) == 3 and evaluation  # steps + 1 gradient passes (EOT forced to 1), then evaluation
    assert all(d == [expected] * 3 for d in attack + evaluation)


def test_stochastic_evaluation_uses_fresh_distinct_draws_offset_from_the_attackers():
    x, y, ids = data(3)
    spy = SpyDefense("whitebox_eot")
    attack_batch(spy, x, y, ids, attack="pgd", setting="whitebox_eot", norm="linf", eps=EPS, alpha=ALPHA,
                 pgd={"steps": 2, "eot": 2, "random_start": False, "restarts": 1}, eval_draws=4)
    attack = {v for grad, d in spy.calls if grad for v in d}
    evaluation = [d for grad, d in spy.calls if not grad]
    assert attack == set(range(6))  # (steps + 1) x eot draws, 0..5
    # one call per evaluation draw, the same draw for every image, EVAL_DRAW_OFFSET + k
    assert evaluation == [[EVAL_DRAW_OFFSET + k] * 3 for k in range(4)]
    assert EVAL_DRAW_OFFSET > max(attack)


@pytest.mark.parametrize("norm, eps, alpha", [("linf", EPS, 4 / 255), ("l2", 0.5, 0.3)])
def test_pgd_projects_when_the_steps_would_leave_the_ball(norm, eps, alpha):
    """steps x alpha = 5 x alpha > eps: without the projection the perturbation would grow to
    5 alpha (the linear model's gradient never changes)."""
    x, y, ids = data(4)
    x[:, :, 0] = 0.0  # rows at the edges of the image range, so the [0, 1] clip matters too
    x[:, :, 1] = 1.0
    res = PGD(SpyDefense("dwbox"), "dwbox", norm, eps, alpha, steps=5)(x, y, ids)
    d = (res.x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-6).all()  # projected onto the ball ...
    # ... which binds (L2: less than eps where the [0, 1] clip cut the projected step)
    assert size.max() >= (eps - 1e-6 if norm == "linf" else 0.9 * eps)
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
