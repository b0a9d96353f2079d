"""grad_mode "budget" (issue 17): the exact gradient, keeping the activations of as many of the
chain's last steps as fit in ``activation_budget_mb`` and recomputing the others as "exact" does."""

import contextlib
import copy
from pathlib import Path

import pytest
import torch

from dbprepro.config import ConfigError, Experiment, deep_merge, load_yaml, validate_config
from dbprepro.purifiers import DDIMPurifier, EDMPurifier, Purifier, VPSDEPurifier
from dbprepro.purifiers.base import MIB, frozen_storages, saved_nbytes
from dbprepro.randomness import Randomness

ROOT = Path(__file__).resolve().parents[1]

FAMILIES = {
    "ddpm": (Purifier, dict(num_inference_steps=100)),  # 11 steps
    "edm": (EDMPurifier, dict(steps=4, s_max=0.3)),  # 4 Heun steps, the last one Euler
}


def make(tiny_diffusion, family, mode="exact", dtype=torch.float64):
    cls, kw = FAMILIES[family]
    unet, sch = tiny_diffusion
    unet = copy.deepcopy(unet).to(dtype)  # the fixture is shared by the session
    return cls(unet, sch, t_star=0.1, randomness=Randomness(0, "fixed"), grad_mode=mode, clip_output=False, **kw)


def problem(dtype=torch.float64):
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    w = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)).to(dtype)
    return x, w, torch.tensor([10, 11])


def gradient_and_saved_bytes(p, x, w, ids):
    """d(sum w * p(x))/dx and the bytes autograd saved for it (counted as the budget counts them:
    the network's weights, saved by reference, add nothing)."""
    xx = x.clone().requires_grad_(True)
    with counted_saves(p) as total:
        loss = (p(xx, ids=ids) * w).sum()
    (g,) = torch.autograd.grad(loss, xx)
    return g, total[0]


@contextlib.contextmanager
def counted_saves(p):
    """Count the bytes autograd saves inside the block into the yielded one-item list (the network's
    weights, saved by reference, add nothing)."""
    total, frozen = [0], frozen_storages(p)

    def pack(t):
        total[0] += saved_nbytes(t, frozen)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def step_bytes(p, x, ids):
    draws = p.randomness.next_draws(ids)
    return p.step_activation_bytes(p.diffuse(x, ids, draws), ids, draws)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_budget_gradient_is_the_exact_one_bit_for_bit_at_every_budget(tiny_diffusion, family):
    p = make(tiny_diffusion, family)
    x, w, ids = problem()
    exact, _ = gradient_and_saved_bytes(p, x, w, ids)
    p.grad_mode = "autograd"
    auto, _ = gradient_and_saved_bytes(p, x, w, ids)
    torch.testing.assert_close(auto, exact, rtol=1e-12, atol=1e-14)
    per_step = step_bytes(p, x, ids)
    p.grad_mode = "budget"
    kept = []
    for steps in (0, 1, 2.5, p.num_steps - 1, 1000):
        p.activation_budget_mb = steps * per_step / MIB
        g, _ = gradient_and_saved_bytes(p, x, w, ids)
        assert torch.equal(g, exact), (family, steps)
        draws = p.randomness.next_draws(ids)
        kept.append(p.budget_kept_steps(p.diffuse(x, ids, draws), ids, draws))
    assert kept == [0, 1, 2, p.num_steps - 1, p.num_steps] and exact.abs().sum() > 0


def test_saved_bytes_respect_the_budget_and_grow_from_exact_to_autograd(tiny_diffusion):
    p = make(tiny_diffusion, "ddpm", dtype=torch.float32)
    x, w, ids = problem(torch.float32)
    saved = {}
    for mode in ("exact", "autograd"):
        p.grad_mode = mode
        _, saved[mode] = gradient_and_saved_bytes(p, x, w, ids)
    per_step = step_bytes(p, x, ids)
    assert per_step > 0 and p.num_steps == 11
    p.grad_mode = "budget"
    budgets = [0.0, 2.5 * per_step, 6.2 * per_step, 100 * per_step]  # bytes
    by_budget = []
    for b in budgets:
        p.activation_budget_mb = b / MIB
        _, n = gradient_and_saved_bytes(p, x, w, ids)
        by_budget.append(n)
        # the kept steps' activations within the budget; the recomputed steps' states as in exact
        assert n <= saved["exact"] + b
    assert by_budget[0] == saved["exact"] and by_budget[-1] == saved["autograd"]
    assert by_budget == sorted(by_budget) and len(set(by_budget)) == len(budgets)  # strictly growing
    # 2 and 6 of the 11 steps kept: about those fractions of the way from exact to autograd
    span = saved["autograd"] - saved["exact"]
    assert 1 / 11 < (by_budget[1] - saved["exact"]) / span < 3 / 11
    assert 5 / 11 < (by_budget[2] - saved["exact"]) / span < 7 / 11


@pytest.mark.parametrize("family", list(FAMILIES))
def test_budget_mode_backward_twice_with_retain_graph(tiny_diffusion, family):
    """As the exact mode (tests/test_gradients.py): FAB's second backward on one graph recomputes
    the same gradient, through both the kept and the recomputed steps."""
    p = make(tiny_diffusion, family, mode="budget")
    x, w, ids = problem()
    p.activation_budget_mb = 2 * step_bytes(p, x, ids) / MIB
    xx = x.clone().requires_grad_(True)
    loss = (p(xx, ids=ids) * w).sum()
    grads = []
    for _ in range(2):
        xx.grad = None
        loss.backward(retain_graph=True)
        grads.append(xx.grad.clone())
    p.grad_mode = "exact"
    exact, _ = gradient_and_saved_bytes(p, x, w, ids)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], exact)


def test_every_family_offers_budget_and_it_needs_a_budget(tiny_diffusion):
    unet, sch = tiny_diffusion
    for cls, kw in ((Purifier, dict(num_inference_steps=100)), (DDIMPurifier, dict(num_inference_steps=100)),
                    (VPSDEPurifier, dict(steps=3)), (VPSDEPurifier, dict(steps=2, corrector=True)),
                    (EDMPurifier, dict(steps=2))):
        p = cls(unet, sch, t_star=0.1, grad_mode="budget", **kw)
        assert "budget" in p.grad_modes or cls in (Purifier, DDIMPurifier)
        x = torch.rand(1, 1, 8, 8, requires_grad=True)
        with pytest.raises(ValueError, match="activation_budget_mb"):
            p(x)  # no budget set
        p.activation_budget_mb = 0
        assert p(x).requires_grad
    with pytest.raises(ValueError, match="activation_budget_mb"):
        p.activation_budget_mb = -1
    q = Purifier.from_config(unet, sch, {"t_star": 0.1, "num_inference_steps": 100, "grad_mode": "budget",
                                         "activation_budget_mb": 12.5})
    assert (q.grad_mode, q.activation_budget_mb) == ("budget", 12.5)
    r = q.with_grad_mode("budget", 3)
    assert r.activation_budget_mb == 3 and q.activation_budget_mb == 12.5


def test_config_needs_the_budget_of_grad_mode_budget():
    base = load_yaml(ROOT / "config.yaml")
    assert validate_config(base)["purification"]["activation_budget_mb"] is None  # default: unset
    with pytest.raises(ConfigError, match="purification.activation_budget_mb"):
        validate_config(deep_merge(base, {"purification": {"grad_mode": "budget"}}))
    with pytest.raises(ConfigError, match="purification.activation_budget_mb"):
        validate_config(deep_merge(base, {"purification": {"grad_mode": "budget", "activation_budget_mb": -1}}))
    cfg = validate_config(deep_merge(base, {"purification": {"grad_mode": "budget", "activation_budget_mb": 0}}))
    assert cfg["purification"]["activation_budget_mb"] == 0
    # the DAG's params: an unset budget leaves them as before the key existed (no Snakemake reruns)
    assert "activation_budget_mb" not in Experiment.from_config(validate_config(base)).purification("vanilla")
    assert "activation_budget_mb" not in Experiment.from_config(validate_config(base)).main_purification()
    assert Experiment.from_config(cfg).purification("vanilla")["activation_budget_mb"] == 0


def test_a_frozen_weight_saved_by_reference_is_not_counted():
    """A frozen conv saves its weight (for the gradient to the input) and its input; only the
    input is memory of the step's own: the budget counts it alone."""
    conv = torch.nn.Conv2d(3, 64, 3).requires_grad_(False)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    frozen, seen = frozen_storages(conv), []

    def pack(t):
        seen.append((t.numel() * t.element_size(), saved_nbytes(t, frozen)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        conv(x).sum().backward()
    counted = sum(c for _, c in seen)
    assert counted == x.numel() * 4  # the input only
    assert sum(n for n, _ in seen) == counted + conv.weight.numel() * 4  # the weight was saved, by reference


# -- the chain states with gradients (purify_states, DiffAttack's deviation loss) -------------------
STATE_FAMILIES = {
    "ddpm": (Purifier, dict(num_inference_steps=100)),  # 11 steps
    "ddim": (DDIMPurifier, dict(num_inference_steps=100, eta=0.5)),  # 11 steps, reverse noise on
    "vpsde": (VPSDEPurifier, dict(steps=6)),
    "vpsde_pc": (VPSDEPurifier, dict(steps=5, corrector=True)),
    "edm": (EDMPurifier, dict(steps=5, s_max=0.3)),  # churn on the first steps, the last one Euler
}


def state_purifier(tiny_diffusion, family, mode):
    cls, kw = STATE_FAMILIES[family]
    unet, sch = tiny_diffusion
    return cls(copy.deepcopy(unet).to(torch.float64), sch, t_star=0.1, randomness=Randomness(0, "fixed"),
               grad_mode=mode, clip_output=False, **kw)


def states_gradient(p, x, ids, keep):
    """d/dx of sum(w * out) + sum_k sum(v_k * state_k) through purify_states (one fixed draw), and
    the bytes autograd saved for it (as :func:`gradient_and_saved_bytes` counts them)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(x.shape, generator=g, dtype=x.dtype)
    vs = [torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in keep]
    xx = x.clone().requires_grad_(True)
    with counted_saves(p) as total:
        out, states = p.purify_states(xx, ids, torch.zeros_like(ids), keep)
        loss = (out * w).sum() + sum((s * v).sum() for s, v in zip(states, vs))
    (grad,) = torch.autograd.grad(loss, xx)
    return grad, total[0], out.detach(), [s.detach() for s in states]


@pytest.mark.parametrize("family", list(STATE_FAMILIES))
def test_purify_states_gradient_is_exacts_in_every_state_mode(tiny_diffusion, family):
    """The gradient of a loss on the output AND on kept states is exact's in autograd, checkpoint and
    budget, including budgets whose kept/recomputed boundary falls between kept states, and budget
    keeps no more activations than its budget (the recomputed steps' states as in exact on top)."""
    x, _, ids = problem()
    p = state_purifier(tiny_diffusion, family, "exact")
    n = p.num_steps
    keep = [0, 1, n // 2, n - 2, n - 1]  # the last one is the output's state
    assert len(set(keep)) == len(keep) == 5
    ref, saved_exact, out_ref, states_ref = states_gradient(p, x, ids, keep)
    assert ref.abs().sum() > 0 and len(states_ref) == len(keep)
    torch.testing.assert_close(states_ref[-1], out_ref * 2 - 1)  # clip_output off: out = (state + 1) / 2
    for mode in ("autograd", "checkpoint"):
        g, *_ = states_gradient(p.with_grad_mode(mode), x, ids, keep)
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-13)
    per_step = step_bytes(p, x, ids)
    splits = []
    for kept_steps in (0, 1, n - keep[2] - 1, n - keep[2], n - 1, n):  # the boundary before/after kept states
        q = p.with_grad_mode("budget", kept_steps * per_step / MIB)
        g, saved, out, states = states_gradient(q, x, ids, keep)
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-13)
        assert torch.equal(out, out_ref) and all(torch.equal(a, b) for a, b in zip(states, states_ref))
        assert saved <= saved_exact + kept_steps * per_step, (family, kept_steps)
        draws = torch.zeros_like(ids)
        splits.append(q.budget_kept_steps(q.diffuse(x, ids, draws), ids, draws))
    assert splits == [0, 1, n - keep[2] - 1, n - keep[2], n - 1, n]


def test_purify_states_is_refused_where_no_step_has_a_gradient(tiny_diffusion):
    x, _, ids = problem()
    p = state_purifier(tiny_diffusion, "vpsde", "adjoint")
    assert "adjoint" in p.grad_modes and "adjoint" not in p.state_grad_modes
    for q in (p, p.with_grad_mode("bpda")):
        with pytest.raises(ValueError, match=f"grad_mode '{q.grad_mode}' has no per-step gradient"):
            q.purify_states(x.clone().requires_grad_(True), ids, torch.zeros_like(ids), [0])
    with torch.no_grad():  # no gradient asked for: the states of one plain run
        _, states = p.purify_states(x, ids, torch.zeros_like(ids), [0])
    assert states[0].shape == x.shape
