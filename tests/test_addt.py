import copy
import math
from types import SimpleNamespace

import pytest
import torch
from scipy import stats

from dbprepro.addt import addt_loss, cgpo, cgpo_delta, mixing_weight, pgd_perturbation, rbgm
from dbprepro.models.diffusion import build_scheduler
from dbprepro.models.classifiers import SmallCNN


def test_rbgm_values_are_exactly_the_gaussian_draw_and_ranks_are_the_gradients():
    g = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(0)) ** 3  # heavy-tailed, not Gaussian
    out = rbgm(g, torch.Generator().manual_seed(7))
    z = torch.randn(3, 2, 25, generator=torch.Generator().manual_seed(7))  # the draw RBGM makes
    flat = out.reshape(3, 2, 25)
    assert torch.equal(flat.sort(-1).values, z.sort(-1).values)  # same multiset of values
    assert torch.equal(flat.argsort(-1).argsort(-1), g.reshape(3, 2, 25).argsort(-1).argsort(-1))  # same ranks


def test_rbgm_output_is_standard_normal_whatever_the_input_distribution():
    g = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(1)) ** 8  # far from Gaussian
    out = rbgm(g, torch.Generator().manual_seed(2)).flatten().numpy()
    assert stats.kstest(out, "norm").pvalue > 0.01
    assert stats.kstest(g.flatten().numpy(), "norm").pvalue < 1e-6


def test_mixing_weight_formula_and_clipping():
    abar = torch.tensor([0.9999, 0.99, 0.5, 1e-4])
    lam = mixing_weight(abar)
    expected = [min(0.3, 0.03 * math.sqrt(a) / math.sqrt(1 - a)) for a in abar.tolist()]
    assert torch.allclose(lam, torch.tensor(expected), atol=1e-6)
    assert lam[0] == pytest.approx(0.3) and 0 <= float(lam.min())


@pytest.fixture
def parts(tiny_diffusion):
    torch.manual_seed(0)
    clf = SmallCNN(width=8, hidden=16).eval()
    x0 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    y = torch.tensor([0, 1, 2, 3])
    # a trainable copy: the session's UNet is shared, and every purifier built on it freezes it
    unet = copy.deepcopy(tiny_diffusion[0]).requires_grad_(True)
    return unet, tiny_diffusion[1], clf, x0, y


def test_cgpo_returns_rbgm_noise_and_leaves_the_weights_alone(parts):
    unet, sch, clf, x0, y = parts
    t = torch.tensor([50, 100, 400, 900])
    lam = mixing_weight(sch.alphas_cumprod[t])
    before = [p.detach().clone() for p in unet.parameters()]
    delta = cgpo(unet, sch, clf, x0, y, t, lam, iterations=3, generator=torch.Generator().manual_seed(0))
    assert delta.shape == x0.shape and torch.isfinite(delta).all()
    assert all(torch.equal(a, b) for a, b in zip(before, unet.parameters()))
    assert all(p.grad is None for p in unet.parameters()) and all(p.grad is None for p in clf.parameters())
    # a permutation of a Gaussian draw per image/channel: sorted values ~ N(0,1) quantiles
    assert abs(float(delta.mean())) < 0.3 and abs(float(delta.std()) - 1) < 0.3


def test_cgpo_direction_raises_the_classifier_loss(parts):
    """The accumulated gradient's ordering is adversarial: the one-step estimate with the CGPO
    delta has a higher classifier loss than with the same values in random order."""
    unet, sch, clf, x0, y = parts
    t = torch.full((4,), 30)
    lam = torch.full((4,), 0.3)  # the largest mixing weight, to see the effect on a tiny model
    gen = torch.Generator().manual_seed(0)
    delta = cgpo(unet, sch, clf, x0, y, t, lam, iterations=5, generator=gen)
    a = sch.alphas_cumprod[t].view(-1, 1, 1, 1)

    def loss(d):
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * ((1 - 0.09) ** 0.5 * eps + 0.3 * d)
        with torch.no_grad():
            x0_hat = (x_t - (1 - a).sqrt() * unet(x_t, t).sample) / a.sqrt()
            return float(torch.nn.functional.cross_entropy(clf(x0_hat / 2 + 0.5), y))  # CGPO's unclamped input

    shuffled = delta.flatten(2)[..., torch.randperm(64, generator=torch.Generator().manual_seed(4))].view_as(delta)
    assert loss(delta) > loss(shuffled)


def test_pgd_perturbation_stays_in_the_pixel_ball(parts):
    unet, sch, clf, x0, y = parts
    d = pgd_perturbation(unet, sch, clf, x0, y, torch.full((4,), 50), iterations=3, eps=8 / 255, alpha=4 / 255)
    assert float(d.abs().max()) <= 2 * 8 / 255 + 1e-6 and float(d.abs().max()) > 0
    assert float((x0 + d).abs().max()) <= 1 + 1e-6


@pytest.mark.parametrize("variant", ["addt", "addt_no_rbgm", "cgpo_mse", "clean_finetune"])
def test_every_variant_gives_a_differentiable_loss(parts, variant):
    unet, sch, clf, x0, y = parts
    loss = addt_loss(unet, sch, clf, x0, y, variant=variant, iterations=2, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    (g,) = torch.autograd.grad(loss, [next(unet.parameters())])
    assert g.abs().sum() > 0
    with pytest.raises(ValueError, match="variant"):
        addt_loss(unet, sch, clf, x0, y, variant="nope")


# -- issue 16: the classifier input is not clamped; the no-RBGM ablation uses one r_t -----------------

class _ZeroUNet(torch.nn.Module):
    """eps_theta = 0 (so x0_hat = x_t / sqrt(abar)); records every (x_t, t) it is called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), t.clone()))
        return SimpleNamespace(sample=torch.zeros_like(x))


def _linear_classifier():
    torch.manual_seed(0)  # a linear model: its input gradient is non-zero at every pixel
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).requires_grad_(False)


def test_cgpo_gradient_reaches_the_out_of_range_pixels_of_the_estimate():
    """Paper 1 feeds x0_hat / 2 + 0.5 unclamped: a clamp would zero G where x0_hat leaves [-1, 1]."""
    x0 = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.tensor([1, 4, 7])
    a, b, lam = torch.tensor(0.6), torch.tensor(0.8), torch.full((3,), 0.3)
    _, G = cgpo_delta(lambda x: torch.zeros_like(x), _linear_classifier(), x0, y, a, b, lam, iterations=1,
                      generator=torch.Generator().manual_seed(1), return_grad=True)
    gen = torch.Generator().manual_seed(1)  # replay CGPO's draws: delta, then the iteration's eps
    delta, eps = torch.randn(x0.shape, generator=gen), torch.randn(x0.shape, generator=gen)
    x0_hat = (a * x0 + b * ((1 - 0.09) ** 0.5 * eps + 0.3 * delta)) / a
    out = x0_hat.abs() > 1
    assert out.sum() > 20  # many pixels of the estimate are out of range ...
    assert (G[out] != 0).all()  # ... and every one of them gets a gradient


def test_no_rbgm_pgd_moves_the_out_of_range_pixels_and_feeds_them_unclamped():
    unet, sch = _ZeroUNet(), build_scheduler()
    x0 = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    seen = []
    clf = _linear_classifier()

    def spy(z):
        seen.append(z.detach())
        return clf(z)

    t = torch.full((3,), 500)  # sqrt(1 - abar) / sqrt(abar) > 1: the estimate leaves [-1, 1] often
    d = pgd_perturbation(unet, sch, spy, x0, torch.tensor([1, 4, 7]), t, iterations=1,
                         generator=torch.Generator().manual_seed(1))
    out = (seen[0] < 0) | (seen[0] > 1)
    assert out.sum() > 20
    # one sign step from 0: a pixel moves iff its gradient is non-zero
    assert torch.allclose(d[out].abs(), torch.tensor(2 * 4 / 255), atol=1e-6)


def test_no_rbgm_pgd_input_and_training_target_use_the_same_clipped_r_t():
    """At small t the unclipped sqrt(abar / (1 - abar)) exceeds 10: the PGD's noisy input and the
    training input/target must both use r_t = 10 (official train_ADDT_linf.py)."""
    unet, sch, clf = _ZeroUNet(), build_scheduler(), _linear_classifier()
    x0 = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    y = torch.tensor([1, 4, 7])
    addt_loss(unet, sch, clf, x0, y, variant="addt_no_rbgm", iterations=2, t_max=3,
              generator=torch.Generator().manual_seed(2))
    assert len(unet.calls) == 3  # two PGD iterations, then the training step
    gen = torch.Generator().manual_seed(2)
    t = torch.randint(0, 4, (3,), generator=gen)
    state = gen.get_state()
    abar = sch.alphas_cumprod[t].view(-1, 1, 1, 1)
    sa, s1a = abar.sqrt(), (1 - abar).sqrt()
    assert (sa / s1a > 10).all()  # the clip is active for every image
    r = 10.0

    def replay(iterations):
        g = torch.Generator()
        g.set_state(state)
        return pgd_perturbation(_ZeroUNet(), sch, clf, x0, y, t, iterations=iterations, generator=g), g

    delta1, _ = replay(1)
    delta2, g = replay(2)
    eps = torch.randn(x0.shape, generator=g)  # the training step's noise, drawn after the PGD
    g = torch.Generator()
    g.set_state(state)
    _, noise2 = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    assert delta1.abs().max() > 0
    x_pgd, t_pgd = unet.calls[1]
    assert torch.equal(t_pgd, t)
    torch.testing.assert_close(x_pgd, sa * x0 + s1a * (noise2 + r * delta1))
    torch.testing.assert_close(unet.calls[2][0], sa * x0 + s1a * (eps + r * delta2))  # target eps + r delta
    assert not torch.allclose(x_pgd, sa * (x0 + delta1) + s1a * noise2)  # the unclipped r_t differs


# -- issue 16: RBGM breaks ties at random (replayably), never by pixel index -----------------------

def test_rbgm_ranks_tied_gradients_in_a_random_replayable_order():
    g = torch.zeros(2, 3, 6, 6)  # every value tied
    out = rbgm(g, torch.Generator().manual_seed(7))
    z = torch.randn(2, 3, 36, generator=torch.Generator().manual_seed(7))  # the draw RBGM makes first
    flat = out.reshape(2, 3, 36)
    assert torch.equal(flat.sort(-1).values, z.sort(-1).values)  # the values are the Gaussian draw
    # a pixel-index tie-break would give the sorted draw itself, a raster ramp, in every channel
    assert not (flat.diff(dim=-1) >= 0).all(-1).any()  # no channel is monotone in pixel index
    assert torch.equal(rbgm(g, torch.Generator().manual_seed(7)), out)  # replayable
    other = rbgm(g, torch.Generator().manual_seed(8)).reshape(2, 3, 36)
    assert not torch.equal(other.argsort(-1), flat.argsort(-1))  # another seed, another arrangement
    # channels of one call are arranged independently
    assert not torch.equal(flat[0, 0].argsort(), flat[0, 1].argsort())


def test_rbgm_keeps_the_exact_order_of_untied_gradients():
    g = torch.randn(2, 2, 7, 7, generator=torch.Generator().manual_seed(0))
    out = rbgm(g, torch.Generator().manual_seed(3)).reshape(2, 2, 49)
    z = torch.randn(2, 2, 49, generator=torch.Generator().manual_seed(3))
    order = g.reshape(2, 2, 49).argsort(-1)  # pixels from the smallest gradient to the largest
    assert torch.equal(out.gather(-1, order), z.sort(-1).values)  # k-th smallest gradient -> k-th quantile


def test_rbgm_partial_ties_keep_the_order_between_distinct_values():
    g = torch.tensor([0.0, 2.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0, 1.0]).view(1, 1, 3, 3)
    z = torch.randn(1, 1, 9, generator=torch.Generator().manual_seed(5)).sort(-1).values.flatten()
    out = rbgm(g, torch.Generator().manual_seed(5)).flatten()
    for level, quantiles in ((0.0, z[:3]), (1.0, z[3:6]), (2.0, z[6:])):
        assert torch.equal(out[g.flatten() == level].sort().values, quantiles)
