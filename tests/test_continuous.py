"""VP-SDE (DiffPure) and EDM purifiers (dbprepro.purifiers): replay, fixed mode, exact gradients,
schedules, the closed-form Gaussian toy and the adjoint's agreement with the exact gradient."""

import math

import pytest
import torch

from dbprepro.purifiers import (EDMPurifier, NoiseLevelMap, VPSDEPurifier, adjoint_agreement, edm_sigma,
                                 make_purifier)
from dbprepro.purifiers import DefendedClassifier, Purifier
from dbprepro.randomness import Randomness, Stream

FAMILIES = {
    "vpsde": (VPSDEPurifier, dict(steps=10)),
    "vpsde_pc": (VPSDEPurifier, dict(steps=10, corrector=True)),
    # a short EDM grid with churn on its middle steps only (S_min/S_max cut both ends)
    "edm": (EDMPurifier, dict(steps=6, s_churn=6, s_min=0.01, s_max=0.3)),
}


def make(tiny_diffusion, family, mode="fixed", **kw):
    cls, base = FAMILIES[family]
    unet, sch = tiny_diffusion
    return cls(unet, sch, randomness=Randomness(0, mode), **{"t_star": 0.1, **base, **kw})


def images(b=4, seed=0, dtype=torch.float32):
    return torch.rand(b, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_noise_level_map_recovers_the_trained_timesteps(tiny_diffusion):
    abar = tiny_diffusion[1].alphas_cumprod.double()
    m, r = NoiseLevelMap(abar), NoiseLevelMap(abar, "round")
    for i in (0, 1, 37, 100, 999):
        assert m(edm_sigma(float(abar[i]))) == pytest.approx(i, abs=1e-9)
    mid = math.exp(0.5 * (math.log(edm_sigma(float(abar[100]))) + math.log(edm_sigma(float(abar[101])))))
    assert m(mid) == pytest.approx(100.5, abs=1e-9) and r(mid) in (100.0, 101.0)
    assert m(1e-6) == 0.0 and m(1e6) == 999.0  # clamped outside the trained noise levels
    with pytest.raises(ValueError, match="timestep_map"):
        NoiseLevelMap(abar, "nearest")


def test_continuous_vp_schedule_is_the_ddpm_up_to_one_step(tiny_diffusion):
    # beta_min = 0.1, beta_max = 20 is T * (1e-4, 0.02): the continuous time t sits at discrete
    # noise level ~1000 t - 1 (within one step), the documented O(1/T) offset.
    p = make(tiny_diffusion, "vpsde")
    for t in (0.001, 0.01, 0.05, 0.1, 0.5):
        assert abs(p.net_time(p.sigma_edm(t)) - (1000 * t - 1)) < 0.7


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_image_same_noise_alone_or_in_any_batch(tiny_diffusion, family):
    p = make(tiny_diffusion, family)
    x, ids = images(5), torch.arange(20, 25)
    full = p(x, ids=ids)
    for j in (0, 3):
        assert (p(x[j:j + 1], ids=ids[j:j + 1]) - full[j:j + 1]).abs().max() <= 1e-5
    perm = torch.tensor([4, 2, 0, 3, 1])
    assert (p(x[perm], ids=ids[perm]) - full[perm]).abs().max() <= 1e-5
    parts = torch.cat([p(x[i:i + 2], ids=ids[i:i + 2]) for i in range(0, 5, 2)])
    assert (parts - full).abs().max() <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fixed_mode_is_deterministic_random_mode_is_not(tiny_diffusion, family):
    x = images(3)
    fixed = make(tiny_diffusion, family, "fixed")
    assert torch.equal(fixed(x), fixed(x))
    rnd = make(tiny_diffusion, family, "random")
    a, b = rnd(x), rnd(x)
    assert (a - b).abs().max() > 1e-3
    rnd2 = make(tiny_diffusion, family, "random")
    assert torch.equal(rnd2(x), a) and torch.equal(rnd2(x), b)
    y = fixed(x)
    assert float(y.min()) >= 0 and float(y.max()) <= 1 and (y - x).abs().mean() > 1e-3


def _streams(p, x):
    used = []
    real = p.randomness.generators

    def spy(ids, draws, stream, index):
        used.append((Stream(int(stream)).name, int(index)))
        return real(ids, draws, stream, index)

    p.randomness.generators = spy
    p(x)
    return used


@pytest.mark.parametrize("family, expected", [
    ("vpsde", {"REVERSE": list(range(10))}),
    ("vpsde_pc", {"REVERSE": list(range(10)), "CORRECTOR": list(range(10))}),
])
def test_vpsde_noise_streams(tiny_diffusion, family, expected):
    used = _streams(make(tiny_diffusion, family), images(2))
    assert ("FORWARD", 100) in used  # the DDPM's key: families share the forward noise of a draw
    for stream, idx in expected.items():
        assert sorted(i for s, i in used if s == stream) == idx
    assert not [s for s, _ in used if s not in ("FORWARD", *expected)]


def test_edm_sigma_grid_and_churn_schedule(tiny_diffusion):
    p = make(tiny_diffusion, "edm", steps=6, sigma_max=0.5, sigma_min=0.002, rho=7, s_churn=6, s_min=0.01,
             s_max=0.3)
    s = p.sigmas
    assert len(s) == 7 and s[0] == pytest.approx(0.5) and s[5] == pytest.approx(0.002) and s[6] == 0.0
    assert all(a > b for a, b in zip(s, s[1:]))
    a, b = 0.5 ** (1 / 7), 0.002 ** (1 / 7)
    assert s[2] == pytest.approx((a + 2 / 5 * (b - a)) ** 7)
    churn = [i for i in range(6) if 0.01 <= s[i] <= 0.3]
    assert 0 not in churn and 5 not in churn and churn  # both ends outside [S_min, S_max]
    assert p.gammas == [min(6 / 6, math.sqrt(2) - 1) if i in churn else 0.0 for i in range(6)]
    used = _streams(p, images(2))
    assert sorted(i for st, i in used if st == "CHURN") == churn
    assert not [st for st, _ in used if st not in ("FORWARD", "CHURN")]
    # S_churn = 0: no churn noise at all, the chain is deterministic given the forward noise
    q = make(tiny_diffusion, "edm", s_churn=0)
    assert q.gammas == [0.0] * 6 and [st for st, _ in _streams(q, images(2))] == ["FORWARD"]
    # paper 1's setting: gamma = 6 / 50 on the grid points inside [0.01, 0.46]; not the first two
    # (sigma 0.5 and 0.462 > S_max) nor the last two (0.0024 and 0.002 < S_min)
    paper = make(tiny_diffusion, "edm", steps=50, s_churn=6, s_min=0.01, s_max=0.46)
    assert paper.gammas[:3] == [0.0, 0.0, pytest.approx(0.12)] and paper.gammas[-2:] == [0.0, 0.0]
    assert [g > 0 for g in paper.gammas] == [0.01 <= x <= 0.46 for x in paper.sigmas[:-1]]


def test_edm_heun_calls_the_network_twice_per_step_but_the_last(tiny_diffusion):
    p = make(tiny_diffusion, "edm")
    calls = []
    real = p.eps
    p.eps = lambda x, sigma: calls.append(sigma) or real(x, sigma)
    p(images(1))
    assert len(calls) == p.num_network_calls == 11
    assert calls[-1] == pytest.approx(p.sigmas[-2])  # last step: Euler at sigma_{N-1}, no correction at 0


def test_edm_sigma_max_from_t_star(tiny_diffusion):
    p = make(tiny_diffusion, "edm", sigma_max=None)
    abar = float(tiny_diffusion[1].alphas_cumprod[100])
    assert p.sigma_max == pytest.approx(math.sqrt((1 - abar) / abar)) and 0.33 < p.sigma_max < 0.35


def test_edm_denoiser_is_the_vp_preconditioned_eps_network(tiny_diffusion):
    p = make(tiny_diffusion, "edm")
    x, sigma = torch.randn(2, 1, 8, 8), 0.3
    abar = 1 / (1 + sigma**2)
    t = p.net_time(sigma)
    eps = p.unet(x * math.sqrt(abar), torch.full((2,), t)).sample
    torch.testing.assert_close(p.denoiser(x, sigma), x - sigma * eps)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exact_gradient_equals_plain_autograd_and_checkpointing(tiny_diffusion, family):
    p = make(tiny_diffusion, family)
    x = images(2).requires_grad_(True)
    w = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    grads = {}
    for mode in ("exact", "autograd", "checkpoint"):
        p.grad_mode = mode
        (grads[mode],) = torch.autograd.grad((p(x) * w).sum(), x)
    assert grads["exact"].abs().max() > 1e-3
    torch.testing.assert_close(grads["exact"], grads["autograd"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["checkpoint"], grads["autograd"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exact_gradient_matches_finite_differences(tiny_diffusion, family):
    unet = tiny_diffusion[0]
    p = make(tiny_diffusion, family, clip_output=False)
    unet.double()
    try:
        x = images(2, dtype=torch.float64).clamp(0.2, 0.8).requires_grad_(True)
        w = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        (g,) = torch.autograd.grad((p(x) * w).sum(), x)
        v = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        h = 1e-5
        with torch.no_grad():
            fd = ((p(x + h * v) * w).sum() - (p(x - h * v) * w).sum()) / (2 * h)
        assert abs(float(fd)) > 1e-3
        assert abs(float((g * v).sum()) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd)))
    finally:
        unet.float()


def test_bpda_and_defended_classifier(tiny_diffusion):
    from dbprepro.models.classifiers import SmallCNN

    p = make(tiny_diffusion, "edm", grad_mode="bpda")
    x = images(2).requires_grad_(True)
    w = torch.randn(2, 1, 8, 8)
    (g,) = torch.autograd.grad((p(x) * w).sum(), x)
    assert torch.equal(g, w)
    torch.manual_seed(0)
    d = DefendedClassifier(SmallCNN(), make(tiny_diffusion, "vpsde"))
    with d.bind(ids=torch.tensor([7, 8])):
        a = d(x.detach())
    assert torch.equal(a, d.classifier(d.purifier(x.detach(), ids=torch.tensor([7, 8]))))


def test_trajectory_ends_in_the_purified_image(tiny_diffusion):
    for family in ("vpsde", "edm"):
        p = make(tiny_diffusion, family)
        x = images(2)
        tr = p.trajectory(x)
        assert tr.phase[0] == "input" and tr.phase[-1] == "reverse" and tr.t[-1] == 0
        assert tr.phase.count("reverse") == p.num_steps
        assert torch.equal(tr.states[-1].clamp(0, 1), p(x))
        fwd = [t for ph, t in zip(tr.phase, tr.t) if ph == "forward"]
        assert fwd == sorted(fwd) and tr.states[tr.phase.index("reverse") - 1].shape == x.shape


# -- the VP-SDE against closed forms ---------------------------------------------------------------
class _GaussianOracle:
    """eps of the exact score of data x0 ~ N(mu, s^2) per pixel (in [-1, 1] units) under the VP-SDE:
    p_t = N(alpha mu, alpha^2 s^2 + sigma_vp^2), eps = -sigma_vp * score."""

    def __init__(self, mu, s):
        self.mu, self.s = mu, s

    def __call__(self, x, sigma_edm):
        alpha = 1 / math.sqrt(1 + sigma_edm**2)
        sigma_vp = sigma_edm * alpha
        return sigma_vp * (x - alpha * self.mu) / (alpha**2 * self.s**2 + sigma_vp**2)


def test_vpsde_drift_and_diffusion_match_the_closed_form(tiny_diffusion):
    mu, s = 0.2, 0.1
    p = make(tiny_diffusion, "vpsde", steps=100, beta_min=0.1, beta_max=20.0)
    p.eps = _GaussianOracle(mu, s)
    x = torch.linspace(-1, 1, 11, dtype=torch.float64)
    for t in (0.003, 0.05, 0.1):
        beta = 0.1 + t * 19.9
        # alpha(t) = exp(-1/2 int_0^t beta), integrated numerically (independent of the code's closed form)
        u = torch.linspace(0, t, 10001, dtype=torch.float64)
        alpha = math.exp(-0.5 * float(torch.trapezoid(0.1 + u * 19.9, u)))
        var = alpha**2 * s**2 + (1 - alpha**2)
        score = -(x - alpha * mu) / var
        torch.testing.assert_close(p.reverse_drift(x, t), -0.5 * beta * x - beta * score, rtol=1e-7, atol=1e-9)
        assert p.diffusion(t) == pytest.approx(math.sqrt(beta))
        assert p.sigma_vp(t) == pytest.approx(math.sqrt(1 - alpha**2), rel=1e-7)


def test_vpsde_reverse_chain_returns_the_gaussian_data_distribution(tiny_diffusion):
    # Data x0 ~ N(mu, s^2): diffuse to t* and run the reverse SDE with the exact score; the output
    # must be N(mu, s^2) again, up to Monte Carlo error (4096 pixels: SE(mean) = s/64, SE(std) ~1.1 %)
    # and the O(dt) bias (measured: |mean error| <= 0.002, std off by 1.5-1.6 %).  Mutations checked
    # by hand: score coefficient beta/2 gives std +90 %; drift -beta x instead of -beta x / 2 gives a
    # mean error of 0.016 and std +6.7 % at t* = 1: both fail here.
    mu, s = 0.5, 0.1
    x0 = mu + s * torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for t_star in (0.1, 1.0):
        p = make(tiny_diffusion, "vpsde", t_star=t_star, steps=200, clip_output=False)
        p.eps = _GaussianOracle(mu, s)
        y = p((x0 + 1) / 2) * 2 - 1
        assert abs(float(y.mean()) - mu) < 5 * s / 64
        assert abs(float(y.std()) / s - 1) < 0.04
        # the reverse chain really moved the samples (it is not the identity on N(mu, s^2))
        assert float((y - x0).std()) > 0.5 * s


def test_vpsde_step_equals_diffusers_score_sde_vp_step(tiny_diffusion):
    # deprecated in diffusers (not exported at the top level any more)
    from diffusers.schedulers.deprecated.scheduling_sde_vp import ScoreSdeVpScheduler

    p = make(tiny_diffusion, "vpsde", steps=100)  # dt = 1e-3 = 1 / N for N = 1000
    sch = ScoreSdeVpScheduler(beta_min=0.1, beta_max=20.0)
    sch.set_timesteps(1000)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    ids, draws = torch.tensor([1, 2, 3]), torch.zeros(3, dtype=torch.long)
    k = 40
    t = p.time(k)
    eps = p.eps(x, p.sigma_edm(t))
    gens = p.randomness.generators(ids, draws, Stream.REVERSE, k)
    theirs, _ = sch.step_pred(eps, x, torch.full((3,), t), generator=gens)
    ours = p.reverse_step(x, k, ids, draws)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# -- adjoint ---------------------------------------------------------------------------------------
def test_adjoint_forward_is_the_exact_chain_and_its_gradient_converges(tiny_diffusion, record_property, capsys):
    """torchsde's sdeint_adjoint on our replayed Brownian path: the forward pass equals the EM chain
    exactly; the gradient differs (the adjoint re-solves the state backwards) by O(dt).  Measured on
    the tiny random UNet, float64 (see the final report): rel. error ~0.67 / 0.37 / 0.21 at 5 / 10 / 20
    steps of t* = 0.1, cosine 0.88 / 0.95 / 0.98.  Asserted: exact forward, first-order convergence
    and cosine > 0.9 from 10 steps on (bounds with margin over the measured values)."""
    unet = tiny_diffusion[0].double()
    try:
        x = images(2, dtype=torch.float64)
        w = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        res = {}
        for n in (5, 10, 20):
            p = make(tiny_diffusion, "vpsde", steps=n, clip_output=False)
            res[n] = adjoint_agreement(p, x, w)
            with capsys.disabled():
                print(f"\nadjoint vs exact, {n} steps (dt={res[n]['dt']:.4f}): rel_error {res[n]['rel_error']:.4f} "
                      f"cosine {res[n]['cosine']:.4f} norm_ratio {res[n]['norm_ratio']:.4f}")
            record_property(f"adjoint_rel_error_{n}", res[n]["rel_error"])
            record_property(f"adjoint_cosine_{n}", res[n]["cosine"])
            assert res[n]["forward_max_abs_diff"] <= 1e-12
        assert res[10]["cosine"] > 0.9 and res[20]["cosine"] > 0.95
        # first order in dt: halving dt (nearly) halves the error
        assert res[10]["rel_error"] < 0.7 * res[5]["rel_error"]
        assert res[20]["rel_error"] < 0.7 * res[10]["rel_error"]
    finally:
        unet.float()


def test_adjoint_is_refused_where_it_does_not_apply(tiny_diffusion):
    with pytest.raises(ValueError, match="corrector"):
        make(tiny_diffusion, "vpsde_pc", grad_mode="adjoint")
    with pytest.raises(ValueError, match="grad_mode"):
        make(tiny_diffusion, "edm", grad_mode="adjoint")


def test_make_purifier_builds_every_family(tiny_diffusion):
    unet, sch = tiny_diffusion
    base = dict(t_star=0.1, num_inference_steps=100, eta=0.0, clip_output=True, grad_mode="exact",
                timestep_map="round")
    r = Randomness(0, "fixed")
    assert isinstance(make_purifier(unet, sch, {**base, "sampler": "ddpm"}, r), Purifier)
    vp = make_purifier(unet, sch, {**base, "sampler": "vpsde", "vpsde": {"steps": 7, "corrector": True}}, r)
    assert isinstance(vp, VPSDEPurifier) and vp.num_steps == 7 and vp.corrector and vp.net_time.mode == "round"
    edm = make_purifier(unet, sch, {**base, "sampler": "edm", "edm": {"steps": 4, "sigma_max": None}}, r)
    assert isinstance(edm, EDMPurifier) and edm.num_steps == 4 and edm.sigma_max < 0.35
    with pytest.raises(ValueError, match="sampler"):
        make_purifier(unet, sch, {**base, "sampler": "dpm"}, r)


# -- configuration and the DAG's purifier factory -------------------------------------------------
def test_config_keys_validate_and_reach_the_purifier(tiny_diffusion, tmp_path):
    from dbprepro.config import ConfigError, load_config
    from dbprepro.purifiers import load_purifier as build_purifier
    from dbprepro.models.diffusion import save_diffusion

    # (DiffAttack's forward reference needs a DDPM/DDIM chain, validate-config refuses it on EDM: the clean one runs)
    cfg = load_config("config.yaml", {"purification": {"sampler": "edm"},
                                      "attacks": {"diffattack": {"reference": "clean"}}})
    # config.yaml shortens the chains (EDM 3 Heun steps, VP-SDE 6 Euler-Maruyama steps); the rest: paper values
    assert cfg["purification"]["edm"] == dict(sigma_max=0.5, steps=3, sigma_min=0.002, rho=7.0, s_churn=6.0,
                                              s_min=0.01, s_max=0.46, s_noise=1.007)
    assert cfg["purification"]["vpsde"] == dict(beta_min=0.1, beta_max=20.0, steps=6, corrector=False, snr=0.16)
    cfg = load_config("config.yaml", {"purification": {"sampler": "vpsde", "grad_mode": "adjoint",
                                                       "vpsde": {"steps": 12}},
                                      # the other families (and the competitors' samplers) do not offer the adjoint,
                                      # DiffAttack needs the chain states
                                      "families": {"names": []}, "competitors": {"names": []},
                                      "attacks": {"diffattack": {"enabled": False}}})
    save_diffusion(*tiny_diffusion, tmp_path / "diffusion")
    p = build_purifier(tmp_path / "diffusion", cfg["purification"], "fixed_large", Randomness(0, "fixed"), "cpu")
    assert isinstance(p, VPSDEPurifier) and p.num_steps == 12 and p.grad_mode == "adjoint"
    for bad, key in [({"sampler": "vpsde", "grad_mode": "adjoint", "vpsde": {"corrector": True}}, "grad_mode"),
                     ({"sampler": "edm", "grad_mode": "adjoint"}, "grad_mode"),
                     ({"sampler": "edm", "edm": {"sigma_max": 0.001}}, "sigma_max"),
                     ({"sampler": "edm", "edm": {"s_churn": -1}}, "s_churn"),
                     ({"sampler": "euler"}, "sampler")]:
        with pytest.raises(ConfigError, match=key):
            load_config("config.yaml", {"purification": bad})
