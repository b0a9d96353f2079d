"""ADBM (Li et al. 2025): the bridge loss's known answers, its training perturbation, a tiny fine-tune,
its DDIM purifier, and what the cost model and validate-config say about both."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dbprepro.addt import VARIANTS, make_loss_fn, network_passes_per_step
from dbprepro.addt.adbm import adbm_loss, adbm_perturbation, bridge_coefficients, bridge_pair
from dbprepro.config.validate import validate_config
from dbprepro.errors import ConfigError
from dbprepro.purifiers import PURIFIERS
from dbprepro.purifiers.adbm import ADBMPurifier, adbm_timesteps
from dbprepro.randomness import Randomness


@pytest.fixture
def clf():
    from dbprepro.models.classifiers import SmallCNN

    torch.manual_seed(0)
    return SmallCNN(width=8, hidden=16).eval().requires_grad_(False)


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def test_adbm_is_a_training_variant_with_its_cost():
    assert "adbm" in VARIANTS
    assert network_passes_per_step("adbm", iterations=5, attack_steps=3) == 4


@pytest.mark.parametrize("kw", [{"eps": 0.0}, {"attack_steps": 0, "eps": 0.0}])
def test_zero_perturbation_is_the_standard_eps_loss(tiny_diffusion, clf, kw):
    """delta = 0: (x_t, target) = (sqrt(abar) x0 + sqrt(1 - abar) z, z) and L_b is the plain epsilon-MSE, exactly."""
    unet, sch = tiny_diffusion
    x0, y = _batch()
    loss, parts = adbm_loss(unet, sch, clf, x0, y, generator=torch.Generator().manual_seed(1), return_parts=True, **kw)
    assert torch.equal(parts["delta"], torch.zeros_like(x0))
    abar = sch.alphas_cumprod[parts["t"]].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * parts["z"]
    assert torch.equal(parts["x_t"], x_t) and torch.equal(parts["target"], parts["z"])
    with torch.no_grad():
        assert torch.equal(loss.detach(), F.mse_loss(unet(x_t, parts["t"]).sample, parts["z"]))
    assert 1 <= int(parts["t"].min()) and int(parts["t"].max()) <= parts["t_prime"] <= 200


def test_bridge_input_is_the_diffused_adversarial_image_at_t_prime():
    """At t = T': c_in = sqrt(abar_T'), x_T' = sqrt(abar_T') (x0 + delta) + sqrt(1 - abar_T') z, and the
    target is ADDT-L-inf's z + sqrt(abar / (1 - abar)) delta; the perturbation's weight fades as t -> 0."""
    from dbprepro.models.diffusion import build_scheduler

    ac = build_scheduler().alphas_cumprod.to(torch.float64)
    g = torch.Generator().manual_seed(0)
    x0, z, delta = (torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for tp in (100, 150, 200):
        a = ac[tp]
        c_in, c_tgt = bridge_coefficients(a, a)
        assert torch.allclose(c_in, a.sqrt(), rtol=1e-12, atol=0)
        x_t, target = bridge_pair(x0, delta, z, a, a)
        assert torch.allclose(x_t, a.sqrt() * (x0 + delta) + (1 - a).sqrt() * z, rtol=0, atol=1e-12)
        assert torch.allclose(target, z + (a / (1 - a)).sqrt() * delta, rtol=0, atol=1e-12)
        k = bridge_coefficients(ac[1:tp + 1], a)[0] / ac[1:tp + 1].sqrt()  # the weight of delta on x0
        assert k[-1] == pytest.approx(1.0, rel=1e-12) and bool((k[1:] >= k[:-1]).all()) and k[0] < 2e-3
    a_tp = ac[100]
    # c_tgt(T') = sqrt(abar / (1 - abar)): 2.92 at the discrete abar_100 (2.94 at the continuous VP time 0.1)
    assert float(bridge_coefficients(a_tp, a_tp)[1]) == pytest.approx(2.92, abs=0.005)


def test_target_tweedie_estimate_is_the_clean_image_and_linear_in_delta():
    from dbprepro.models.diffusion import build_scheduler

    ac = build_scheduler().alphas_cumprod.to(torch.float64)
    g = torch.Generator().manual_seed(1)
    x0, z, d1, d2 = (torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([1, 37, 120, 200])
    a, a_tp = ac[t].view(-1, 1, 1, 1), ac[200]
    x_t, target = bridge_pair(x0, d1, z, a, a_tp)
    assert torch.allclose((x_t - (1 - a).sqrt() * target) / a.sqrt(), x0, rtol=0, atol=1e-10)
    lin = lambda d: bridge_pair(x0, d, z, a, a_tp)[1] - z  # noqa: E731
    assert torch.allclose(lin(d1 + 2 * d2), lin(d1) + 2 * lin(d2), rtol=0, atol=1e-10)


class _Spy(torch.nn.Module):
    """Records the timesteps of every call of the wrapped UNet."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, x, t):
        self.calls.append(t.clone())
        return self.unet(x, t)


def test_attack_and_loss_share_t_prime_t_and_z_and_stay_in_the_ball(tiny_diffusion, clf):
    unet, sch = tiny_diffusion
    spy = _Spy(copy.deepcopy(unet)).train()
    x0, y = _batch(8)
    x0 = x0.clamp(-0.9, 0.9)
    loss, parts = adbm_loss(spy, sch, clf, x0, y, eps=0.1, attack_steps=3,
                            generator=torch.Generator().manual_seed(2), return_parts=True)
    assert len(spy.calls) == 4 and all(torch.equal(c, parts["t"]) for c in spy.calls)
    assert spy.training  # the attack ran in eval mode and restored the mode
    d = parts["delta"]
    assert float(d.abs().max()) <= 0.2 + 1e-6 and float((x0 + d).abs().max()) <= 1 + 1e-6
    assert float(d.abs().max()) > 0.19  # sign steps of the full eps: the perturbation reaches the ball's edge
    # the loss is computed from the same z: x_t - c_in delta is the plain diffused clean image with that z
    a = sch.alphas_cumprod[parts["t"]].view(-1, 1, 1, 1)
    c_in, _ = bridge_coefficients(a, sch.alphas_cumprod[parts["t_prime"]])
    assert torch.allclose(parts["x_t"] - c_in * d, a.sqrt() * x0 + (1 - a).sqrt() * parts["z"], atol=1e-6)


def test_the_perturbation_ascends_the_classifier_loss(tiny_diffusion, clf):
    """Three FGSM steps raise the classifier's cross-entropy at the one-step estimate over the uniform start."""
    unet, sch = tiny_diffusion
    x0, y = _batch(16, seed=3)
    t, tp = torch.full((16,), 150), 150
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    a = sch.alphas_cumprod[t].view(-1, 1, 1, 1)

    def ce(d):
        x_t, _ = bridge_pair(x0, d, z, a, sch.alphas_cumprod[tp])
        with torch.no_grad():
            x0_hat = (x_t - (1 - a).sqrt() * unet(x_t, t).sample) / a.sqrt()
            return float(F.cross_entropy(clf(x0_hat / 2 + 0.5), y))

    start = adbm_perturbation(unet, sch, clf, x0, y, tp, t, z, eps=0.2, attack_steps=0,
                              generator=torch.Generator().manual_seed(5))
    adv = adbm_perturbation(unet, sch, clf, x0, y, tp, t, z, eps=0.2, attack_steps=3,
                            generator=torch.Generator().manual_seed(5))
    assert ce(adv) > ce(start)


def test_a_tiny_adbm_fine_tune_reduces_its_loss(tiny_diffusion, clf):
    from dbprepro.models.training import train_ddpm

    unet, sch = tiny_diffusion
    unet = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 8, 8, generator=g)
    labels = torch.randint(0, 10, (64,), generator=g)
    loss_fn = make_loss_fn(clf, "adbm", adbm={"t_prime_min": 100, "t_prime_max": 200, "eps": 0.1, "attack_steps": 1})

    def held_out(net):  # the loss on fixed batches, the same draws before and after
        gen = torch.Generator().manual_seed(7)
        return sum(float(loss_fn(net, sch, images[i:i + 32] * 2 - 1, labels[i:i + 32], gen).detach())
                   for i in (0, 32)) / 2

    before = held_out(unet)
    _, history = train_ddpm(unet, sch, images, labels=labels, steps=30, batch_size=32, lr=2e-3, ema_decay=0.0,
                            grad_clip=1.0, seed=0, progress=False, loss_fn=loss_fn)
    assert held_out(unet) < 0.8 * before
    assert len(history) > 0


def test_adbm_variant_needs_the_ddpm_family_and_a_classifier():
    with pytest.raises(ValueError, match="not implemented for the vpsde family"):
        make_loss_fn(None, "adbm", family="vpsde")
    with pytest.raises(ValueError, match="needs the classifier"):
        make_loss_fn(None, "adbm")


# -- the purifier ---------------------------------------------------------------------------------
def test_adbm_grid_is_the_official_trailing_ddim_grid():
    assert adbm_timesteps(100, 5) == [99, 79, 59, 39, 19]
    assert adbm_timesteps(200, 4) == [199, 149, 99, 49]


def test_adbm_purifier_is_diffusers_trailing_ddim_with_pretrained_weights(tiny_diffusion):
    """With vanilla weights ADBM's purifier is DiffPure-style DDIM: diffusers' DDIMScheduler (trailing
    spacing, 50 steps, eta 0, clip_sample, abar_prev = 1 at the end), its last 5 steps from t = 99."""
    from diffusers import DDIMScheduler

    unet, sch = tiny_diffusion
    p = ADBMPurifier(unet, sch, t_star=0.1, steps=5, randomness=Randomness(0, "fixed"))
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ids, draws = torch.arange(3), torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        out = p(x, ids, draws)
        ddim = DDIMScheduler.from_config(sch.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                         clip_sample=True)
        ddim.set_timesteps(50)
        steps = [int(t) for t in ddim.timesteps][-5:]
        assert steps == [99, 79, 59, 39, 19]
        xt = p.diffuse(x, ids, draws)
        for t in steps:
            xt = ddim.step(unet(xt, torch.full((3,), t)).sample, t, xt, eta=0.0).prev_sample
    assert torch.allclose(out, ((xt + 1) / 2).clamp(0, 1), rtol=0, atol=1e-5)


def test_adbm_purifier_fixed_noise_is_deterministic_and_batch_independent(tiny_diffusion):
    unet, sch = tiny_diffusion
    p = ADBMPurifier(unet, sch, randomness=Randomness(0, "fixed"))
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ids, draws = torch.arange(6), torch.zeros(6, dtype=torch.long)
    with torch.no_grad():
        a, b = p(x, ids, draws), p(x, ids, draws)
        alone = p(x[4:5], ids[4:5], draws[4:5])
        other = p(x, ids, torch.ones(6, dtype=torch.long))
    assert torch.equal(a, b)
    assert torch.allclose(a[4:5], alone, rtol=0, atol=1e-6)
    assert not torch.allclose(a, other, atol=1e-3)  # the only randomness, z, matters


def test_adbm_purifier_exact_gradient_matches_autograd(tiny_diffusion):
    unet, sch = tiny_diffusion
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    grads = {}
    for mode in ("exact", "autograd"):
        p = ADBMPurifier(unet, sch, randomness=Randomness(0, "fixed"), grad_mode=mode)
        xi = x.clone().requires_grad_(True)
        p(xi, torch.arange(2), torch.zeros(2, dtype=torch.long)).square().sum().backward()
        grads[mode] = xi.grad
    assert torch.allclose(grads["exact"], grads["autograd"], rtol=1e-4, atol=1e-6)


def test_config_checks_and_costs():
    from dbprepro.cost import addt_step_calls, network_calls

    cfg = validate_config({"name": "t", "purification": {"sampler": "adbm"}})
    assert network_calls(cfg["purification"]) == 5 == PURIFIERS["adbm"].network_calls(cfg["purification"])
    assert cfg["addt"]["adbm"] == {"t_prime_min": 100, "t_prime_max": 200, "eps": 0.2, "attack_steps": 3}
    c = addt_step_calls("adbm", 5, 3)
    assert (c.unet_grad, c.clf_grad, c.unet_train) == (3, 3, 1)
    with pytest.raises(ConfigError, match="purification.adbm.steps"):
        validate_config({"name": "t", "purification": {"sampler": "adbm", "t_star": 0.003, "adbm": {"steps": 5}}})
    with pytest.raises(ConfigError, match="addt.adbm.t_prime_max"):
        validate_config({"name": "t", "addt": {"variants": ["adbm"], "adbm": {"t_prime_min": 300, "t_prime_max": 200}}})
    with pytest.raises(ConfigError, match="families.names"):
        validate_config({"name": "t", "addt": {"variants": ["addt", "adbm"]}, "families": {"names": ["adbm"]}})
