"""The continuous purifiers on their families' own networks (issue 18): the VP-SDE on Score SDE's
DDPM++, EDM on EDM's SongUNet behind EDMPrecond, at a small resolution (3 x 8 x 8) with random
weights, in float64.  The purifier calls the network through ``EpsNetwork.eps`` (the dispatch of
:meth:`~dbprepro.purifiers.ContinuousPurifier.eps`); replay, batch independence and every gradient
mode are checked as on the diffusers UNet (tests/test_continuous.py, tests/test_budget_mode.py)."""

import pytest
import torch
from test_budget_mode import gradient_and_saved_bytes, step_bytes
from test_continuous import _streams
from test_ddpmpp import _randomize
from test_edm_net import small as small_edm_network

from dbprepro.models.ddpmpp import DDPMpp
from dbprepro.models.edm_net import EDMSongUNet
from dbprepro.models.networks import EpsNetwork
from dbprepro.purifiers import EDMPurifier, VPSDEPurifier, adjoint_agreement
from dbprepro.purifiers.base import MIB
from dbprepro.purifiers.gradients import gradient_agreement, mode_gradients
from dbprepro.randomness import Randomness

#: a small DDPM++ for 3 x 8 x 8 images: two levels, attention at 4 x 4, no dropout
DDPMPP_SMALL = {"nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "image_size": 8, "attn_resolutions": [4],
                "dropout": 0.0}
FAMILIES = {
    "vpsde": (VPSDEPurifier, dict(steps=10)),
    "vpsde_pc": (VPSDEPurifier, dict(steps=10, corrector=True)),
    # a short EDM grid with churn on its middle steps only, as tests/test_continuous.py
    "edm": (EDMPurifier, dict(steps=6, s_churn=6, s_min=0.01, s_max=0.3)),
}


def own_network(family: str, scale: float = 0.2) -> EpsNetwork:
    """The family's own network, small, float64, every parameter randomly perturbed by ``scale``
    (DDPM++'s init leaves the residual branches at zero: the purifier would hardly use it)."""
    if family.startswith("vpsde"):
        torch.manual_seed(0)
        return _randomize(DDPMpp.from_config(DDPMPP_SMALL), scale=scale).double()
    return small_edm_network(scale=scale)


def make(family, mode="fixed", network=None, **kw):
    from dbprepro.models.diffusion import build_scheduler

    cls, base = FAMILIES[family]
    net = network if network is not None else own_network(family)
    return cls(net, build_scheduler(), randomness=Randomness(0, mode), **{"t_star": 0.1, **base, **kw})


def images(b=2, seed=1):
    return torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def weights(b=2, seed=2):
    return torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- the dispatch ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family, cls", [("vpsde", DDPMpp), ("edm", EDMSongUNet)])
def test_the_purifier_calls_the_network_by_its_eps(family, cls):
    """eps of the purifier is the network's eps at the same EDM noise level, bit for bit, whatever
    the timestep map (the network conditions on sigma itself); the diffusers path is not taken."""
    p, q = make(family), make(family, timestep_map="round")
    assert isinstance(p.unet, cls) and p.unet.family == family
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigma in (0.002, 0.05, 0.3, 0.5, 2.0):
        ref = p.unet.eps(x, sigma)
        assert ref.dtype == torch.float64 and ref.abs().mean() > 1e-2
        assert torch.equal(p.eps(x, sigma), ref) and torch.equal(q.eps(x, sigma), ref)
    assert not torch.equal(p.eps(x, 0.3), p.eps(x, 0.31))


def test_edm_purifier_denoiser_is_edmprecond():
    """On EDM's network the purifier's D(x; sigma) = x - sigma eps(x / sqrt(1 + sigma^2)) is the
    network's own EDMPrecond denoiser (up to rounding)."""
    p = make("edm")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigma in (0.002, 0.1, 0.5):
        torch.testing.assert_close(p.denoiser(x, sigma), p.unet(x, sigma), rtol=0, atol=1e-12)


def test_vpsde_score_is_ddpmpp_eps_over_sigma_vp():
    p = make("vpsde")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = p.time(3)
    assert torch.equal(p.score(x, t), -p.unet.eps(x, p.sigma_edm(t)) / p.sigma_vp(t))


# -- replay ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_replay_fixed_and_random_modes(family):
    x = images(3)
    fixed = make(family, "fixed")
    y = fixed(x)
    assert torch.equal(y, fixed(x)) and (y - x).abs().mean() > 1e-2
    assert torch.equal(fixed.trajectory(x).states[-1].clamp(0, 1), y)
    rnd = make(family, "random", network=fixed.unet)
    a, b = rnd(x), rnd(x)
    assert (a - b).abs().max() > 1e-3
    rnd2 = make(family, "random", network=fixed.unet)
    assert torch.equal(rnd2(x), a) and torch.equal(rnd2(x), b)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_image_same_output_alone_or_in_any_batch(family):
    p = make(family)
    x, ids = images(5), torch.arange(20, 25)
    full = p(x, ids=ids)
    for j in (0, 3):
        assert (p(x[j:j + 1], ids=ids[j:j + 1]) - full[j:j + 1]).abs().max() <= 1e-12
    perm = torch.tensor([4, 2, 0, 3, 1])
    assert (p(x[perm], ids=ids[perm]) - full[perm]).abs().max() <= 1e-12
    parts = torch.cat([p(x[i:i + 2], ids=ids[i:i + 2]) for i in range(0, 5, 2)])
    assert (parts - full).abs().max() <= 1e-12


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_noise_keys_are_those_of_the_unet_purifier(family):
    """The network does not change the randomness: the same (stream, index) keys as on the
    diffusers UNet (tests/test_continuous.py), the forward noise at the DDPM's t_start."""
    p = make(family)
    steps = list(range(p.num_steps))
    if family == "edm":
        expected = {"CHURN": [i for i, g in enumerate(p.gammas) if g > 0]}
    else:
        expected = {"REVERSE": steps, **({"CORRECTOR": steps} if p.corrector else {})}
    assert all(expected.values())
    used = _streams(p, images(2))
    assert ("FORWARD", 100) in used
    for stream, idx in expected.items():
        assert sorted(i for s, i in used if s == stream) == idx
    assert not [s for s, _ in used if s not in ("FORWARD", *expected)]


# -- gradients ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_grad_mode_gives_the_exact_gradient(family, capsys):
    """exact (per-step recomputation) against autograd, checkpoint and budget at several budgets,
    one noise draw; bpda's gradient is the identity; adjoint (VP-SDE without corrector) in the
    test below.  Measured: exact = autograd = checkpoint bit for bit on both networks."""
    p = make(family, clip_output=False)
    x, w, ids = images(2), weights(2), torch.tensor([10, 11])
    draws = p.randomness.next_draws(ids)
    modes = [m for m in ("exact", "autograd", "checkpoint") if m in p.grad_modes]
    res = mode_gradients(p, x, lambda out: (out * w).sum(), modes, ids=ids, draws=draws)
    exact = res["exact"]["grad"]
    assert exact.abs().max() > 1e-2
    for m in modes[1:]:
        agree = gradient_agreement(res[m]["grad"], exact)
        with capsys.disabled():
            print(f"\n{family} on {type(p.unet).__name__}: {m} vs exact rel_error {agree['rel_error']:.3e} "
                  f"max_abs_diff {agree['max_abs_diff']:.3e}")
        assert agree["rel_error"] <= 1e-10 and agree["max_abs_diff"] <= 1e-10 * float(exact.abs().max())
        assert torch.equal(res[m]["out"], res["exact"]["out"])
    # budget: any number of kept steps gives the exact gradient (the kept ones by autograd)
    p.grad_mode = "budget"
    per_step = step_bytes(p, x, ids)
    assert per_step > 0
    for steps in (0, 1, 2.5, p.num_steps - 1, 1000):
        p.activation_budget_mb = steps * per_step / MIB
        g, _ = gradient_and_saved_bytes(p, x, w, ids)
        assert gradient_agreement(g, exact)["max_abs_diff"] <= 1e-10 * float(exact.abs().max()), steps
    p.grad_mode = "bpda"
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((p(xx, ids=ids) * w).sum(), xx)
    assert torch.equal(g, w)
    assert set(p.grad_modes) <= {*modes, "budget", "bpda", "adjoint"}


def test_exact_gradient_matches_finite_differences():
    """The exact gradient of the VP-SDE on DDPM++ and of EDM on its network is the derivative of the
    purification (central differences, float64)."""
    for family in ("vpsde", "edm"):
        p = make(family, clip_output=False)
        x, w = images(2).clamp(0.2, 0.8).requires_grad_(True), weights(2)
        (g,) = torch.autograd.grad((p(x) * w).sum(), x)
        v = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        h = 1e-5
        with torch.no_grad():
            fd = float(((p(x + h * v) - p(x - h * v)) * w).sum()) / (2 * h)
        assert abs(fd) > 1e-2
        assert abs(float((g * v).sum()) - fd) <= 1e-6 * max(1.0, abs(fd)), family


def test_adjoint_on_ddpmpp(capsys, record_property):
    """torchsde's adjoint on the VP-SDE with DDPM++: the forward pass is the exact chain, the gradient
    converges to the exact one at first order in dt, with the bounds of tests/test_continuous.py
    (cosine > 0.9 at 10 steps, > 0.95 at 20, error ratio < 0.7 per halving).  The adjoint's O(dt)
    error grows with the network's roughness: on DDPM++ perturbed by 0.05 (eps std ~0.2) measured
    rel. error 0.51 / 0.28 / 0.14 and cosine 0.90 / 0.97 / 0.99 at 5 / 10 / 20 steps; perturbed by
    0.2 (eps std ~0.9) it converges at the same order but later (cosine 0.86 at 10 steps, 0.98 at 40)."""
    net = own_network("vpsde", scale=0.05)
    x, w = images(2), weights(2)
    res = {}
    for n in (5, 10, 20):
        p = make("vpsde", network=net, steps=n, clip_output=False)
        res[n] = adjoint_agreement(p, x, w)
        with capsys.disabled():
            print(f"\nDDPM++ adjoint vs exact, {n} steps: rel_error {res[n]['rel_error']:.4f} "
                  f"cosine {res[n]['cosine']:.4f}")
        record_property(f"ddpmpp_adjoint_rel_error_{n}", res[n]["rel_error"])
        assert res[n]["forward_max_abs_diff"] <= 1e-12
    assert res[10]["cosine"] > 0.9 and res[20]["cosine"] > 0.95
    assert res[10]["rel_error"] < 0.7 * res[5]["rel_error"]
    assert res[20]["rel_error"] < 0.7 * res[10]["rel_error"]
    with pytest.raises(ValueError, match="grad_mode"):
        make("edm", grad_mode="adjoint")


def test_float32_networks_run_in_float32():
    """At the default precision the purifier keeps the network's dtype (no silent float64)."""
    for family in ("vpsde", "edm"):
        net = own_network(family).float()
        y = make(family, network=net)(images(2).float())
        assert y.dtype == torch.float32 and bool(torch.isfinite(y).all())
