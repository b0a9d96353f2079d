import pytest
import torch

from dbprepro.models.classifiers import SmallCNN
from dbprepro.purifiers import DefendedClassifier, Purifier
from dbprepro.randomness import Randomness


def make(tiny_diffusion, mode="fixed", n=100, **kw):
    unet, sch = tiny_diffusion
    return Purifier(unet, sch, t_star=0.1, num_inference_steps=n, randomness=Randomness(0, mode), **kw)


def images(b=6, seed=0):
    return torch.rand(b, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_chain_starts_at_t_star(tiny_diffusion):
    p = make(tiny_diffusion, n=100)
    assert p.t_start == 100 and p.timesteps[0] == 100 and p.timesteps[-1] == 0 and p.num_steps == 11
    assert make(tiny_diffusion, n=1000).num_steps == 101
    with pytest.raises(ValueError, match="grid"):
        make(tiny_diffusion, n=30)
    with pytest.raises(ValueError, match="t_star"):
        Purifier(*tiny_diffusion, t_star=100)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_same_image_same_noise_alone_or_in_any_batch(tiny_diffusion, sampler):
    p = make(tiny_diffusion, sampler=sampler)
    x, ids = images(6), torch.arange(10, 16)
    full = p(x, ids=ids)
    assert torch.equal(full, p(x, ids=ids))  # identical batch -> identical output
    for j in range(6):  # alone
        assert (p(x[j:j + 1], ids=ids[j:j + 1]) - full[j:j + 1]).abs().max() <= 1e-5
    perm = torch.tensor([3, 5, 0, 2, 1, 4])  # any order
    assert (p(x[perm], ids=ids[perm]) - full[perm]).abs().max() <= 1e-5
    for bs in (2, 4):  # any batch size
        parts = torch.cat([p(x[i:i + bs], ids=ids[i:i + bs]) for i in range(0, 6, bs)])
        assert (parts - full).abs().max() <= 1e-5


def test_fixed_mode_is_deterministic_random_mode_is_not(tiny_diffusion):
    x = images(4)
    fixed = make(tiny_diffusion, "fixed")
    assert torch.equal(fixed(x), fixed(x))
    rnd = make(tiny_diffusion, "random")
    a, b = rnd(x), rnd(x)
    assert (a - b).abs().max() > 1e-3
    # ... but replayable: a new random-mode purifier with the same seed repeats the sequence
    rnd2 = make(tiny_diffusion, "random")
    assert torch.equal(rnd2(x), a) and torch.equal(rnd2(x), b)


@pytest.mark.parametrize("sampler, eta, reverse_used", [
    ("ddim", 0.0, []),
    ("ddim", 1.0, list(range(0, 101, 10))),  # (at t=0 DDIM's sigma is 0)
    ("ddpm", 0.0, list(range(10, 101, 10))),  # DDPM adds no noise at t=0
])
def test_which_noise_streams_a_sampler_draws(tiny_diffusion, sampler, eta, reverse_used):
    from dbprepro.randomness import Stream

    p = make(tiny_diffusion, "fixed", sampler=sampler, eta=eta)
    used = []
    real = p.randomness.generators

    def spy(ids, draws, stream, index):
        used.append((int(stream), int(index)))
        return real(ids, draws, stream, index)

    p.randomness.generators = spy
    p(images(2))
    assert (int(Stream.FORWARD), 100) in used
    reverse = sorted(i for s, i in used if s == int(Stream.REVERSE))
    # DDIM with eta=0 is deterministic given the forward noise; DDPM draws z_t at every t > 0
    assert reverse == reverse_used


def test_output_in_unit_interval_and_moves_the_image(tiny_diffusion):
    p = make(tiny_diffusion)
    x = images(4)
    y = p(x)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert (y - x).abs().mean() > 1e-3


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_exact_gradient_equals_plain_autograd_and_checkpointing(tiny_diffusion, sampler):
    p = make(tiny_diffusion, sampler=sampler)
    x = images(3).requires_grad_(True)
    w = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    grads = {}
    for mode in ("exact", "autograd", "checkpoint"):
        p.grad_mode = mode
        (g,) = torch.autograd.grad((p(x) * w).sum(), x)
        grads[mode] = g
    assert grads["exact"].abs().max() > 1e-3
    torch.testing.assert_close(grads["exact"], grads["autograd"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["checkpoint"], grads["autograd"], atol=1e-5, rtol=1e-5)


def test_exact_gradient_matches_finite_differences(tiny_diffusion):
    unet, sch = tiny_diffusion
    from diffusers import DDPMScheduler

    sch = DDPMScheduler.from_config(sch.config, clip_sample=False)  # smooth chain for FD
    p = Purifier(unet.double(), sch, t_star=0.05, num_inference_steps=100, clip_output=False,
                 randomness=Randomness(0, "fixed"))
    try:
        x = images(2).double().clamp(0.2, 0.8).requires_grad_(True)
        w = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        (g,) = torch.autograd.grad((p(x) * w).sum(), x)
        v = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        h = 1e-5
        with torch.no_grad():
            fd = ((p(x + h * v) * w).sum() - (p(x - h * v) * w).sum()) / (2 * h)
        assert abs(float((g * v).sum()) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd)))
    finally:
        unet.float()


def _saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def test_exact_gradient_activation_memory_is_flat_in_the_number_of_steps(tiny_diffusion):
    x = images(4).requires_grad_(True)
    saved, steps = {}, {}
    for n in (200, 1000):  # 21 and 101 reverse steps
        for mode in ("exact", "autograd"):
            p = make(tiny_diffusion, n=n, grad_mode=mode)
            saved[mode, n], _ = _saved_bytes(lambda: p(x).sum())
            steps[n] = p.num_steps
    # exact: besides the output-side ops, only the chain states are saved (one image-sized tensor
    # per step, through save_for_backward so autograd frees them with the graph): no activations
    state = x.numel() * x.element_size()
    activations = {n: saved["exact", n] - steps[n] * state for n in (200, 1000)}
    assert activations[1000] == activations[200] > 0
    # plain autograd grows with the steps and dwarfs it
    assert saved["autograd", 1000] > 4 * saved["autograd", 200] > 0
    assert saved["exact", 1000] < 0.01 * saved["autograd", 1000]


def test_bpda_gradient_is_identity(tiny_diffusion):
    p = make(tiny_diffusion, grad_mode="bpda")
    x = images(2).requires_grad_(True)
    w = torch.randn(2, 1, 8, 8)
    (g,) = torch.autograd.grad((p(x) * w).sum(), x)
    assert torch.equal(g, w)
    with torch.no_grad():
        assert torch.equal(p(x), make(tiny_diffusion)(x))  # forward is the real purification


def test_defended_classifier_binds_ids_for_torchattacks_style_calls(tiny_diffusion):
    torch.manual_seed(0)
    clf = SmallCNN()
    d = DefendedClassifier(clf, make(tiny_diffusion, "fixed"))
    x, ids = images(3), torch.tensor([40, 41, 42])
    with d.bind(ids=ids):
        a = d(x)
    b = clf(d.purifier(x, ids=ids))
    assert torch.equal(a, b)
    assert not torch.equal(d(x), a)  # unbound -> ids 0..2 -> other noise


@pytest.mark.parametrize("bad, msg", [
    (torch.full((1, 1, 8, 8), float("nan")), "NaN"),
    (torch.full((1, 1, 8, 8), 2.0), r"\[0, 1\]"),
    (torch.zeros(0, 1, 8, 8), "empty"),
    (torch.zeros(1, 8, 8), "shape"),
])
def test_bad_images_are_refused(tiny_diffusion, bad, msg):
    with pytest.raises(ValueError, match=msg):
        make(tiny_diffusion)(bad)
