"""GDMP (Wang et al. 2022): guided DDPM purification's known answers, its exact gradient through the
guidance and the reference path, and what the config checks and the cost model say about it."""

import copy

import pytest
import torch

from dbprepro.config.validate import validate_config
from dbprepro.errors import ConfigError
from dbprepro.purifiers import PURIFIERS, Purifier
from dbprepro.purifiers import gdmp as gdmp_mod
from dbprepro.purifiers.gdmp import GDMPPurifier, guidance_gradient, ssim_map
from dbprepro.randomness import Randomness, Stream


def _x(n=3, seed=0, dtype=torch.float32):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("mode", ["fixed", "random"])
def test_scale_zero_is_plain_ddpm_purification_bit_for_bit(tiny_diffusion, mode):
    unet, sch = tiny_diffusion
    x, ids, draws = _x(4), torch.arange(4), torch.tensor([0, 3, 1, 2])
    g = GDMPPurifier(unet, sch, num_inference_steps=100, rounds=1, scale=0.0, randomness=Randomness(5, mode))
    d = Purifier(unet, sch, num_inference_steps=100, randomness=Randomness(5, mode))
    with torch.no_grad():
        assert torch.equal(g(x, ids, draws), d(x, ids, draws))
        assert not torch.equal(GDMPPurifier(unet, sch, num_inference_steps=100, rounds=1, scale=50.0,
                                            randomness=Randomness(5, mode))(x, ids, draws), d(x, ids, draws))


def test_guidance_toward_the_state_itself_changes_nothing(tiny_diffusion):
    """MSE toward x_t itself: exactly zero guidance, so the guided step is the DDPM step; SSIM(x, x) = 1
    with a zero gradient; the MSE guidance is the closed form x - ref (float64)."""
    g = torch.Generator().manual_seed(0)
    x, ref = (torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    assert torch.equal(guidance_gradient(x, x), torch.zeros_like(x))
    assert torch.equal(guidance_gradient(x, ref), x - ref)
    assert torch.allclose(ssim_map(x, x), torch.ones_like(x), atol=1e-12)
    assert float(guidance_gradient(x, x, "ssim").abs().max()) < 1e-10
    assert float(guidance_gradient(x, ref, "ssim").abs().max()) > 1e-3
    unet, sch = tiny_diffusion
    p = GDMPPurifier(unet, sch, num_inference_steps=100, rounds=1, scale=1e3, reference="input",
                     randomness=Randomness(0, "fixed"))
    d = Purifier(unet, sch, num_inference_steps=100, randomness=Randomness(0, "fixed"))
    ids, draws = torch.arange(3), torch.zeros(3, dtype=torch.long)
    x_t = d.diffuse(_x(), ids, draws)
    with torch.no_grad():
        for t in (100, 50, 0):
            guided = p.reverse_step(torch.cat([x_t, x_t], 1), t, ids, draws)
            assert torch.equal(guided[:, :1], d.reverse_step(x_t, t, ids, draws))


def test_paper_scalars_of_gdmps_cifar10_config(tiny_diffusion):
    """GDMP's CIFAR-10 code (gamma 60000, eps 8/255, batch 100, 3072 pixels) as the per-pixel scale 2/(m B P):
    k_35 = 1.900e-3 and sum_{t <= 35} k_t = 0.0261 on the full 1000-step grid (the reference's numbers)."""
    m = (2 * 8 / 255 / 3) / 60000
    scale = 2 / (m * 100 * 3072)
    assert scale == pytest.approx(18.68, abs=0.01)
    p = GDMPPurifier(*tiny_diffusion, t_star=0.036, num_inference_steps=1000, scale=scale)
    assert p.k[35] == pytest.approx(1.900e-3, rel=2e-3)
    assert sum(k for t, k in p.k.items() if t <= 35) == pytest.approx(0.0261, rel=5e-3)


def test_rounds_keep_the_original_input_as_reference_and_count_their_calls(tiny_diffusion):
    unet, sch = tiny_diffusion
    p = GDMPPurifier(unet, sch, num_inference_steps=100, rounds=3, randomness=Randomness(0, "fixed"))
    x, ids, draws = _x(), torch.arange(3), torch.zeros(3, dtype=torch.long)
    assert p.num_steps == 3 * 11 == p.num_network_calls == GDMPPurifier.network_calls(
        {"t_star": 0.1, "num_inference_steps": 100, "gdmp": {"rounds": 3}})
    state = p.diffuse(x, ids, draws)
    with torch.no_grad():
        for key in p.timesteps:
            state = p.reverse_step(state, key, ids, draws)
            assert torch.equal(state[:, 1:], x * 2 - 1)
        assert torch.equal(((state[:, :1] + 1) / 2).clamp(0, 1), p(x, ids, draws))


def test_reference_noise_is_a_centred_gaussian_of_its_own_stream(tiny_diffusion):
    """The diffused reference has zero-mean unit Gaussian noise (a uniform draw would be offset by 0.5)."""
    p = GDMPPurifier(*tiny_diffusion, num_inference_steps=100, randomness=Randomness(0, "fixed"))
    u = torch.zeros(256, 1, 8, 8)
    ids, draws = torch.arange(256), torch.zeros(256, dtype=torch.long)
    a = float(tiny_diffusion[1].alphas_cumprod[50])
    xi = p.reference_at(u, 50, ids, draws) / (1 - a) ** 0.5
    assert abs(float(xi.mean())) < 0.03 and float(xi.std()) == pytest.approx(1.0, abs=0.03)
    z = p.randomness.normal(ids, draws, Stream.REVERSE, 50, (1, 8, 8))
    assert not torch.allclose(xi, z)  # not the step noise


@pytest.mark.parametrize("guidance, scale", [("mse", 100.0), ("ssim", 1.0)])
def test_output_does_not_depend_on_the_batch(tiny_diffusion, guidance, scale):
    """D is per image (GDMP's code averages it over the batch, so its pull shrinks as 1/B)."""
    p = GDMPPurifier(*tiny_diffusion, num_inference_steps=100, rounds=2, scale=scale, guidance=guidance,
                     randomness=Randomness(0, "fixed"))
    x, ids, draws = _x(5), torch.arange(5), torch.zeros(5, dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(p(x, ids, draws)[2:3], p(x[2:3], ids[2:3], draws[2:3]), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def double_diffusion(tiny_diffusion):
    return copy.deepcopy(tiny_diffusion[0]).double(), tiny_diffusion[1]


def _grad(p, x, w):
    xi = x.clone().requires_grad_(True)
    loss = (p(xi, torch.arange(x.shape[0]), torch.zeros(x.shape[0], dtype=torch.long)) * w).sum()
    return torch.autograd.grad(loss, xi)[0]


@pytest.mark.parametrize("guidance, scale", [("mse", 2000.0), ("ssim", 5.0)])
def test_exact_gradient_through_the_guided_chain_matches_finite_differences(double_diffusion, guidance, scale):
    """float64, 2 rounds, strong guidance: every exact grad mode equals the central finite difference
    along a random direction; cutting the reference path or the guidance's own graph changes it."""
    unet, sch = double_diffusion
    kw = dict(t_star=0.05, num_inference_steps=100, rounds=2, scale=scale, guidance=guidance, clip_output=False,
              randomness=Randomness(0, "fixed"))
    x, w = _x(2, dtype=torch.float64) * 0.8 + 0.1, torch.randn(2, 1, 8, 8, dtype=torch.float64)
    v = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = {m: _grad(GDMPPurifier(unet, sch, grad_mode=m, **kw), x, w)
             for m in ("exact", "autograd", "checkpoint")}
    budget = GDMPPurifier(unet, sch, grad_mode="budget", **kw)
    budget.activation_budget_mb = 0.05
    grads["budget"] = _grad(budget, x, w)
    p, h = GDMPPurifier(unet, sch, **kw), 1e-6
    with torch.no_grad():
        f = lambda z: float((p(z, torch.arange(2), torch.zeros(2, dtype=torch.long)) * w).sum())  # noqa: E731
        fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
    for m, g in grads.items():
        assert float((g * v).sum()) == pytest.approx(fd, rel=1e-6), m

    class Cut(GDMPPurifier):  # the reference path detached
        def diffuse(self, x01, ids, draws, t=None):
            s = super().diffuse(x01, ids, draws, t)
            return torch.cat([s[:, :1], s[:, 1:].detach()], 1)

    g_cut = _grad(Cut(unet, sch, **kw), x, w)
    assert float((grads["exact"] - g_cut).abs().max()) > 1e-3 * float(grads["exact"].abs().max())


def test_the_guidance_term_is_differentiated(double_diffusion, monkeypatch):
    unet, sch = double_diffusion
    kw = dict(t_star=0.05, num_inference_steps=100, rounds=1, scale=2000.0, clip_output=False,
              randomness=Randomness(0, "fixed"), grad_mode="exact")
    x, w = _x(2, dtype=torch.float64), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    g = _grad(GDMPPurifier(unet, sch, **kw), x, w)
    real = gdmp_mod.guidance_gradient
    monkeypatch.setattr(gdmp_mod, "guidance_gradient", lambda *a: real(*a).detach())
    g_detached = _grad(GDMPPurifier(unet, sch, **kw), x, w)
    assert float((g - g_detached).abs().max()) > 1e-3 * float(g.abs().max())


def test_bpda_is_the_identity_gradient_and_purify_states_are_images(tiny_diffusion):
    p = GDMPPurifier(*tiny_diffusion, num_inference_steps=100, rounds=2, randomness=Randomness(0, "fixed"))
    x, w = _x(2).requires_grad_(True), torch.randn(2, 1, 8, 8)
    (p.with_grad_mode("bpda")(x, torch.arange(2)) * w).sum().backward()
    assert torch.equal(x.grad, w)
    out, states = p.purify_states(_x(2).requires_grad_(True), torch.arange(2), keep=[3, 21])
    assert out.shape == (2, 1, 8, 8) and [s.shape for s in states] == [(2, 1, 8, 8)] * 2 and states[0].requires_grad


def test_config_refusals_and_costs():
    from dbprepro.attacks.surrogate import surrogate_purification
    from dbprepro.cost import count_calls, network_calls

    cfg = validate_config({"name": "t", "purification": {"sampler": "gdmp", "num_inference_steps": 50}})
    assert cfg["purification"]["gdmp"]["rounds"] == 4 and network_calls(cfg["purification"]) == 4 * 6
    sur = surrogate_purification(cfg["purification"], cfg["attacks"]["surrogate"])
    assert sur["sampler"] == "gdmp" and PURIFIERS["gdmp"].network_calls(sur) == 4 * 2  # coarsened 50 -> 10
    with pytest.raises(ConfigError, match="purification.grad_mode"):
        validate_config({"name": "t", "purification": {"sampler": "gdmp", "grad_mode": "adjoint"}})
    with pytest.raises(ConfigError, match="num_inference_steps"):
        validate_config({"name": "t", "purification": {"sampler": "gdmp", "num_inference_steps": 30}})
    cfg = validate_config({"name": "t", "addt": {"variants": ["addt", "adbm"]},
                           "families": {"names": ["gdmp"], "addt": False}})
    jobs = {j.job: j for j in count_calls(cfg)}
    assert "train_addt/adbm" in jobs and "evaluate_clean/gdmp" in jobs and "evaluate_clean/adbm" in jobs
    gd, van = jobs["evaluate_clean/gdmp"].calls, jobs["evaluate_clean/vanilla"].calls
    assert gd.unet_fwd == 4 * van.unet_fwd  # four rounds of the same chain


@pytest.mark.parametrize("reference", ["forward", "clean"])
def test_the_adaptive_attacks_run_on_a_gdmp_defense(tiny_diffusion, reference):
    """PGD, BPDA and DiffAttack (which reads the chain states, and for ``forward`` the forward-diffused input at
    each state's timestep) take a GDMP defense as they take a DDPM one, and stay in the eps ball."""
    from dbprepro.attacks import PGD, settings_randomness
    from dbprepro.attacks.diffattack import DiffAttack
    from dbprepro.models.classifiers import SmallCNN
    from dbprepro.purifiers import DefendedClassifier

    torch.manual_seed(0)
    p = GDMPPurifier(*tiny_diffusion, num_inference_steps=100, rounds=2, scale=100.0,
                     randomness=settings_randomness("dwbox", seed=0))
    model = DefendedClassifier(SmallCNN(width=8, hidden=16).eval(), p)
    x, y, ids = _x(2), torch.tensor([1, 2]), torch.arange(2)
    assert p.diffuse(x, ids, torch.zeros(2, dtype=torch.long), p.timesteps[15]).shape == x.shape
    eps = 8 / 255
    runs = [PGD(model, "dwbox", "linf", eps, eps / 4, steps=2, eot=1),
            PGD(model.with_purifier(p.with_grad_mode("bpda")), "dwbox", "linf", eps, eps / 4, steps=2, eot=1),
            DiffAttack(model, "dwbox", "linf", eps, eps / 4, steps=2, eot=1, rounds=["ce"], step_interval=5,
                       reference=reference)]
    for attack in runs:
        res = attack(x, y, ids)
        assert float((res.x_adv - x).abs().max()) <= eps + 1e-6 and not torch.equal(res.x_adv, x)


def test_forward_reference_of_a_later_round_uses_that_rounds_noise(tiny_diffusion):
    """DiffAttack's forward reference at round 2's start: the input diffused with the very noise the chain
    used to restart round 2 from round 1's output."""
    p = GDMPPurifier(*tiny_diffusion, num_inference_steps=100, rounds=2, randomness=Randomness(0, "fixed"))
    x, ids, draws = _x(), torch.arange(3), torch.zeros(3, dtype=torch.long)
    n = len(p.grid)
    with torch.no_grad():
        state = p.diffuse(x, ids, draws)
        for key in p.timesteps[:n - 1]:
            state = p.reverse_step(state, key, ids, draws)
        t_last = p.timesteps[n - 1]
        out1 = p.scheduler.step(p.eps(state[:, :1], t_last % p.T), t_last % p.T, state[:, :1]).prev_sample
        ref_t = p.reference_at(state[:, 1:], t_last, ids, draws)
        out1 = out1 - p.k[t_last % p.T] * guidance_gradient(state[:, :1], ref_t)
        start2 = p.reverse_step(state, t_last, ids, draws)[:, :1]  # round 2's start, key T + t_start
        ref = p.diffuse(x, ids, draws, p.timesteps[n])
    a = float(p.scheduler.alphas_cumprod[p.t_start])
    noise_chain = (start2 - a**0.5 * out1.clamp(-1, 1)) / (1 - a) ** 0.5
    noise_ref = (ref - a**0.5 * (x * 2 - 1)) / (1 - a) ** 0.5
    assert p.timesteps[n] == p.T + p.t_start
    assert torch.allclose(noise_chain, noise_ref, atol=1e-4)
