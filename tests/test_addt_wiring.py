"""ADDT across purifier families: the one CGPO (cgpo_delta) reproduces the two loops it replaced bit for
bit, make_loss_fn dispatches on the family, the noise-range cap t_max of the VP and EDM losses, and the
train_addt stage for a family defense."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from dbprepro.addt import (_family_noise_levels, addt_loss, addt_loss_family, cgpo, family_noise_cap, make_loss_fn,
                           mixing_weight, rbgm)
from dbprepro.models.classifiers import SmallCNN


def batch(n=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


@pytest.fixture
def clf():
    torch.manual_seed(0)
    return SmallCNN(width=8, hidden=16).eval().requires_grad_(False)


def _old_loop(eps_theta, clf, x0, y, a, b, lam, iterations, objective, gen):
    """The CGPO loop as it was written (twice) before cgpo_delta: the reference of the refactor
    (since issue 16 without the clamp before the classifier, as paper 1's code)."""
    delta = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    G = torch.zeros_like(x0)
    for _ in range(iterations):
        e = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        d = delta.detach().requires_grad_(True)
        x = a * x0 + b * ((1 - lam**2).sqrt() * e + lam * d)
        e_hat = eps_theta(x)
        if objective == "ce":
            loss = F.cross_entropy(clf((x - b * e_hat) / a / 2 + 0.5), y, reduction="sum")
        else:
            loss = (e_hat - e).square().sum()
        (g,) = torch.autograd.grad(loss, d)
        G = G + g
        delta = rbgm(G, gen)
    return delta.detach(), G.detach()


@pytest.mark.parametrize("objective", ["ce", "mse"])
def test_ddpm_cgpo_is_bit_identical_to_the_former_loop(tiny_diffusion, clf, objective):
    unet, sch = tiny_diffusion
    x0, y = batch()
    t = torch.tensor([5, 60, 300, 900])
    lam = mixing_weight(sch.alphas_cumprod[t])
    delta, G = cgpo(unet, sch, clf, x0, y, t, lam, iterations=3, objective=objective,
                    generator=torch.Generator().manual_seed(11), return_grad=True)
    abar = sch.alphas_cumprod[t].view(-1, 1, 1, 1)
    ref_d, ref_G = _old_loop(lambda x: unet(x, t).sample, clf, x0, y, abar.sqrt(), (1 - abar).sqrt(),
                             lam.view(-1, 1, 1, 1), 3, objective, torch.Generator().manual_seed(11))
    assert torch.equal(delta, ref_d) and torch.equal(G, ref_G)


@pytest.mark.parametrize("family", ["vp", "edm"])
def test_family_cgpo_is_bit_identical_to_the_former_loop(tiny_diffusion, clf, family):
    unet, sch = tiny_diffusion
    x0, y = batch()
    _, p = addt_loss_family(unet, sch, clf, x0, y, family=family, iterations=3, return_parts=True,
                            generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    _family_noise_levels(family, 4, gen, beta_min=0.1, beta_max=20.0, t_eps=1e-5, p_mean=-1.2, p_std=1.2)
    ref, _ = _old_loop(lambda x: unet(x, p["t_net"]).sample, clf, x0, y, p["a"], p["b"], p["lam"], 3, "ce", gen)
    assert torch.equal(p["delta"], ref)


def test_make_loss_fn_dispatches_on_the_family(tiny_diffusion, clf):
    unet, sch = tiny_diffusion
    x0, y = batch()

    def run(fn):
        return fn(unet, sch, x0, y, torch.Generator().manual_seed(2))

    kw = dict(iterations=2, t_max=300)
    ddpm = run(lambda *a: addt_loss(*a[:2], clf, *a[2:4], variant="addt", generator=a[4], **kw))
    assert torch.equal(run(make_loss_fn(clf, "addt", **kw)), ddpm)
    assert torch.equal(run(make_loss_fn(clf, "addt", family="ddim", **kw)), ddpm)  # DDIM shares the DDPM loss
    fam = dict(beta_min=0.2, beta_max=15.0, p_mean=-1.0, p_std=0.8, sigma_data=0.4, timestep_map="round")
    for family, loss_family in (("vpsde", "vp"), ("edm", "edm")):
        ref = run(lambda *a: addt_loss_family(*a[:2], clf, *a[2:4], family=loss_family, variant="cgpo_mse",
                                              generator=a[4], **kw, **fam))
        assert torch.equal(run(make_loss_fn(clf, "cgpo_mse", family=family, **kw, **fam)), ref)
    with pytest.raises(ValueError, match="addt_no_rbgm.*not implemented for the vpsde family"):
        make_loss_fn(clf, "addt_no_rbgm", family="vpsde")
    with pytest.raises(ValueError, match="unknown ADDT family 'vp'"):
        make_loss_fn(clf, "addt", family="vp")
    with pytest.raises(ValueError, match="needs the classifier"):
        make_loss_fn(None, "addt", family="edm")


def _vp_time(a, beta_min=0.1, beta_max=20.0):
    """Invert log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2 for t >= 0."""
    d = beta_max - beta_min
    return (-0.5 * beta_min + (0.25 * beta_min**2 - d * a.log()).sqrt()) / (0.5 * d)


N = 20000
# KS critical value at level 1e-3 for n samples: 1.95 / sqrt(n) (asymptotic Kolmogorov distribution);
# used as p-value > 1e-3 below, with fixed seeds (deterministic) and power checked against the wrong CDF.


def test_vp_cap_draws_t_uniformly_up_to_t_max_over_T(tiny_diffusion):
    sch = tiny_diffusion[1]
    cap = family_noise_cap("vp", sch, 100)
    assert cap == {"t_hi": 0.1}
    a, b, _ = _family_noise_levels("vp", N, torch.Generator().manual_seed(0), beta_min=0.1, beta_max=20.0,
                                   t_eps=1e-5, p_mean=-1.2, p_std=1.2, **cap)
    t = _vp_time(a)
    assert float(t.min()) >= 1e-5 - 1e-9 and float(t.max()) <= 0.1 + 1e-9 and float(t.max()) > 0.0999
    assert stats.kstest(t.numpy(), stats.uniform(1e-5, 0.1 - 1e-5).cdf).pvalue > 1e-3
    assert family_noise_cap("vp", sch, None) == {}
    with pytest.raises(ValueError, match="t_hi"):
        _family_noise_levels("vp", 2, None, beta_min=0.1, beta_max=20.0, t_eps=1e-5, p_mean=0, p_std=1,
                             **family_noise_cap("vp", sch, 0))


def test_edm_cap_is_the_exactly_truncated_log_normal(tiny_diffusion):
    sch = tiny_diffusion[1]
    abar = float(sch.alphas_cumprod[100])
    (cap,) = family_noise_cap("edm", sch, 100).values()
    assert cap == pytest.approx(math.sqrt((1 - abar) / abar))  # ~0.34: truncation drops ~46 % of the mass
    _, _, s = _family_noise_levels("edm", N, torch.Generator().manual_seed(1), beta_min=0.1, beta_max=20.0,
                                   t_eps=1e-5, p_mean=-1.2, p_std=1.2, sigma_hi=cap)
    assert float(s.max()) <= cap * (1 + 1e-12) and float(s.min()) > 0
    c = (math.log(cap) + 1.2) / 1.2
    truncated = stats.truncnorm(-math.inf, c, loc=-1.2, scale=1.2).cdf
    assert stats.kstest(s.log().numpy(), truncated).pvalue > 1e-3
    assert stats.kstest(s.log().numpy(), stats.norm(-1.2, 1.2).cdf).pvalue < 1e-6  # the check has power


@pytest.mark.parametrize("family", ["vp", "edm"])
def test_capped_family_loss_uses_only_the_purifiers_noise_levels(tiny_diffusion, family):
    unet, sch = tiny_diffusion
    x0, y = batch(16)
    _, p = addt_loss_family(unet, sch, None, x0, y, family=family, variant="clean_finetune", t_max=100,
                            return_parts=True, generator=torch.Generator().manual_seed(6))
    assert float(p["t_net"].max()) <= 100 + 1e-6
    _, p = addt_loss_family(unet, sch, None, x0, y, family=family, variant="clean_finetune",
                            return_parts=True, generator=torch.Generator().manual_seed(6))
    assert float(p["t_net"].max()) > 100  # uncapped: the paper's full range


def test_train_addt_stage_for_a_family_defense(stage_inputs, tmp_path):
    from snakemake.iocontainers import Namedlist

    from dbprepro import pipeline
    from dbprepro.config import defense_purification, load_config
    from dbprepro.models.diffusion import load_diffusion

    # the sections the rule passes: the validated config's (schema defaults filled), sized down
    cfg = load_config(Path(__file__).parents[1] / "config.yaml", overrides={
        "addt": dict(cgpo_iterations=1, steps=2, batch_size=4, checkpoint_every=1, t_max=100, edm_p_std=1.0),
        "families": {"own_addt": ["edm"]}, "purification": {"timestep_map": "round"}})
    out = Namedlist(fromdict={"model": str(tmp_path / "edm_addt"), "history": str(tmp_path / "h.csv"),
                              "timing": str(tmp_path / "t.csv")})
    params = Namedlist(fromdict={"addt": cfg["addt"], "variant": "addt", "family": "edm", "seed": 0, "device": "cpu",
                                 "purification": defense_purification(cfg, "edm_addt"), "checkpoint_dir": None})
    inp = Namedlist(fromdict={"base": stage_inputs["diffusion"], "classifier": stage_inputs["classifier"],
                              "train": stage_inputs["train"], "manifest": stage_inputs["manifest"]})
    pipeline.train_addt(inp, out, params, Namedlist(fromdict={"defense": "edm_addt"}))
    hist, timing = pd.read_csv(out.history), pd.read_csv(out.timing)
    assert set(hist["defense"]) == {"edm_addt"} and list(timing["defense"]) == ["edm_addt"]
    assert set(hist["unet_passes_per_step"]) == {2}
    assert load_diffusion(out.model)[0] is not None
