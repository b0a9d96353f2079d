"""ADDT losses of paper 1's VP and EDM families (dbprepro.addt.addt_loss_family)."""

import math

import pytest
import torch

from dbprepro.addt import _family_noise_levels, addt_loss_family
from dbprepro.models.classifiers import SmallCNN


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("family", ["vp", "edm"])
def test_noise_levels_are_variance_preserving_and_lambda_is_paper_1s(tiny_diffusion, family):
    unet, sch = tiny_diffusion
    x0, y = batch()
    torch.manual_seed(0)
    clf = SmallCNN().eval()
    loss, parts = addt_loss_family(unet, sch, clf, x0, y, family=family, iterations=2, return_parts=True,
                                   generator=torch.Generator().manual_seed(1))
    a, b, sigma = parts["a"].flatten(), parts["b"].flatten(), parts["sigma"]
    torch.testing.assert_close(a**2 + b**2, torch.ones_like(a))
    torch.testing.assert_close(b / a, sigma.float())
    torch.testing.assert_close(parts["lam"].flatten(), (0.03 / sigma).clamp(0, 0.3).float())
    # RBGM: per image and channel, delta's values are a Gaussian sample's (mean ~0, var ~1 over 64 pixels)
    # and its ordering is adversarial; the mixed noise keeps unit variance per pixel
    d = parts["delta"].flatten(1)
    assert d.abs().max() > 0 and float(d.mean().abs()) < 0.3 and 0.6 < float(d.var()) < 1.5
    assert torch.isfinite(loss) and loss > 0


def test_edm_loss_is_the_weighted_denoiser_loss(tiny_diffusion):
    unet, sch = tiny_diffusion
    x0, y = batch()
    loss, p = addt_loss_family(unet, sch, None, x0, y, family="edm", variant="clean_finetune", return_parts=True,
                               generator=torch.Generator().manual_seed(2))
    # independent path: EDM coordinates, D(x; sigma) = x - sigma eps(x / sqrt(1 + sigma^2)), w(sigma) ||D - x0||^2
    total = 0.0
    for i, s in enumerate(p["sigma"].tolist()):
        x_edm = x0[i:i + 1] + s * p["target"][i:i + 1]
        D = x_edm - s * unet(x_edm / math.sqrt(1 + s * s), p["t_net"][i:i + 1]).sample
        w = (s * s + 0.25) / (0.5 * s) ** 2
        total = total + w * (D - x0[i:i + 1]).square().sum()
    torch.testing.assert_close(loss, total / x0.numel(), rtol=1e-4, atol=1e-6)


def test_vp_clean_loss_is_the_epsilon_loss_at_continuous_time(tiny_diffusion):
    unet, sch = tiny_diffusion
    x0, y = batch()
    loss, p = addt_loss_family(unet, sch, None, x0, y, family="vp", variant="clean_finetune", return_parts=True,
                               generator=torch.Generator().manual_seed(3))
    assert torch.equal(p["target"], p["eps"]) and not p["delta"].any()
    ref = (unet(p["a"] * x0 + p["b"] * p["eps"], p["t_net"]).sample - p["eps"]).square().mean()
    torch.testing.assert_close(loss, ref)


def test_training_noise_distributions():
    a, b, s = _family_noise_levels("edm", 20000, torch.Generator().manual_seed(0), beta_min=0.1, beta_max=20,
                                   t_eps=1e-5, p_mean=-1.2, p_std=1.2)
    assert abs(float(s.log().mean()) + 1.2) < 0.03 and abs(float(s.log().std()) - 1.2) < 0.03
    a, b, s = _family_noise_levels("vp", 20000, torch.Generator().manual_seed(0), beta_min=0.1, beta_max=20,
                                   t_eps=1e-5, p_mean=-1.2, p_std=1.2)
    assert float(a.max()) < 1 and float(b.max()) > 0.999  # t covers (t_eps, 1]: up to pure noise


def test_addt_gradients_reach_the_unet_only_and_unknown_variants_are_refused(tiny_diffusion):
    import copy

    unet = copy.deepcopy(tiny_diffusion[0]).train().requires_grad_(True)
    sch = tiny_diffusion[1]
    torch.manual_seed(0)
    clf = SmallCNN().eval().requires_grad_(False)
    x0, y = batch()
    loss = addt_loss_family(unet, sch, clf, x0, y, family="edm", iterations=2,
                            generator=torch.Generator().manual_seed(4))
    loss.backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="not implemented"):
        addt_loss_family(unet, sch, clf, x0, y, family="vp", variant="addt_no_rbgm")
    with pytest.raises(ValueError, match="family"):
        addt_loss_family(unet, sch, clf, x0, y, family="ve")
