"""Tests of dbprepro.models.training: determinism, learning, EMA, train/eval modes (fast, tiny models)."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from dbprepro.data import make_digits_split
from dbprepro.models.classifiers import SmallCNN
from dbprepro.models.diffusion import build_scheduler, build_unet
from dbprepro.models.training import accuracy, train_classifier, train_ddpm


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    parts = make_digits_split(test_fraction=0.2, seed=0)
    return parts["train"], parts["test"]


def tiny_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(width=8, hidden=32)


def tiny_unet(seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    return build_unet(8, 1, [8, 16], layers_per_block=1, norm_num_groups=4, dropout=dropout)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- classifier ------------------------------------------------------------------------------------

def test_classifier_deterministic_and_leaves_global_rng(digits):
    (x, y, _), _ = digits
    x, y = x[:256], y[:256]
    init = tiny_cnn()
    runs = []
    for seed in (3, 3, 4):
        m = copy.deepcopy(init)
        rng = torch.get_rng_state()
        h = train_classifier(m, x, y, epochs=2, batch_size=32, lr=2e-3, seed=seed, progress=False)
        assert torch.equal(rng, torch.get_rng_state()), "training touched the global RNG state"
        runs.append((m, h))
    assert same_weights(runs[0][0], runs[1][0])
    pd.testing.assert_frame_equal(runs[0][1], runs[1][1])
    assert not same_weights(runs[0][0], runs[2][0]), "the seed does not change the batch order"


def test_classifier_learns_and_returns_eval(digits):
    (x, y, _), (xv, yv, _) = digits
    x, y, xv, yv = x[:400], y[:400], xv[:200], yv[:200]
    m = tiny_cnn()
    before = accuracy(m, xv, yv)
    h = train_classifier(m, x, y, epochs=12, batch_size=32, lr=3e-3, seed=0, val=(xv, yv),
                         progress=False)
    assert not m.training
    assert list(h.columns) == ["epoch", "loss", "train_acc", "val_acc"]
    assert h["epoch"].tolist() == list(range(1, 13))
    assert h["loss"].iloc[-1] < 0.3 * h["loss"].iloc[0]
    assert before < 0.3
    assert h["val_acc"].iloc[-1] == pytest.approx(accuracy(m, xv, yv))
    assert accuracy(m, xv, yv) >= 0.8, h.to_string()  # ~0.90; chance is 0.1


def test_classifier_trains_in_train_mode(digits):
    (x, y, _), _ = digits
    m = tiny_cnn().eval()
    seen = []
    m.register_forward_pre_hook(lambda mod, inp: seen.append(mod.training))
    train_classifier(m, x[:64], y[:64], epochs=1, batch_size=32, lr=1e-3, progress=False)
    assert seen and all(seen)
    assert not m.training


def test_classifier_rejects_bad_input(digits):
    (x, y, _), _ = digits
    with pytest.raises(ValueError):
        train_classifier(tiny_cnn(), x[:10], y[:9], epochs=1, batch_size=4, lr=1e-3, progress=False)
    with pytest.raises(ValueError):
        train_classifier(tiny_cnn(), x[:10], y[:10], epochs=0, batch_size=4, lr=1e-3, progress=False)


# -- DDPM ------------------------------------------------------------------------------------------

def test_ddpm_deterministic(digits):
    (x, _, _), _ = digits
    x = x[:64]
    init = tiny_unet(dropout=0.1)  # dropout draws from the (forked, seeded) global RNG
    sched = build_scheduler()
    out = []
    for seed in (1, 1, 2):
        u = copy.deepcopy(init)
        rng = torch.get_rng_state()
        ema, h = train_ddpm(u, sched, x, steps=6, batch_size=16, lr=1e-3, ema_decay=0.9,
                            warmup_steps=2, seed=seed, log_every=2, progress=False)
        assert torch.equal(rng, torch.get_rng_state()), "training touched the global RNG state"
        out.append((u, ema, h))
    assert same_weights(out[0][0], out[1][0]) and same_weights(out[0][1], out[1][1])
    pd.testing.assert_frame_equal(out[0][2], out[1][2])
    assert not same_weights(out[0][1], out[2][1])
    h = out[0][2]
    assert h["step"].tolist() == [2, 4, 6]
    assert h["lr"].tolist() == pytest.approx([1e-3, 1e-3, 1e-3])  # warm-up done by step 2


def test_ddpm_loss_goes_down(digits):
    (x, _, _), _ = digits
    u = tiny_unet()
    ema, h = train_ddpm(u, build_scheduler(), x[:256], steps=60, batch_size=32, lr=3e-3,
                        ema_decay=0.99, seed=0, log_every=10, progress=False)
    assert len(h) == 6 and h["step"].iloc[-1] == 60
    assert h["loss"].iloc[-1] < 0.5 * h["loss"].iloc[0], h.to_string()  # ~0.65 -> ~0.2
    assert not u.training and not ema.training


def test_ddpm_returns_ema_weights(digits):
    """The returned UNet carries the EMA (diffusers EMAModel with warm-up 1 - (1+s)^-3/4,
    capped at ema_decay) of the raw weights, which stay in the ``unet`` passed in."""
    (x, _, _), _ = digits
    x = x[:64]
    init = tiny_unet()
    sched = build_scheduler()
    kw = dict(batch_size=16, lr=3e-3, ema_decay=0.3, seed=0, progress=False)
    raw1 = copy.deepcopy(init)
    train_ddpm(raw1, sched, x, steps=1, **kw)
    raw2 = copy.deepcopy(init)
    ema2, _ = train_ddpm(raw2, sched, x, steps=2, **kw)
    assert ema2 is not raw2
    assert not same_weights(raw1, raw2) and not same_weights(ema2, raw2)
    # step 1: decay 0 (EMA = raw1); step 2: decay min(1 - 2 ** -0.75, 0.3) = 0.3.
    d = min(1 - 2 ** -0.75, 0.3)
    p1, p2, pe = (dict(m.named_parameters()) for m in (raw1, raw2, ema2))
    for k in p2:
        torch.testing.assert_close(pe[k], d * p1[k] + (1 - d) * p2[k], rtol=1e-5, atol=1e-6)
    # with decay 0 the average is the raw model itself
    raw0 = copy.deepcopy(init)
    ema0, _ = train_ddpm(raw0, sched, x, steps=3, **{**kw, "ema_decay": 0.0})
    for (k, a), b in zip(raw0.named_parameters(), ema0.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_ddpm_trains_in_train_mode(digits):
    (x, _, _), _ = digits
    u = tiny_unet().eval()
    seen = []
    u.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    ema, _ = train_ddpm(u, build_scheduler(), x[:32], steps=2, batch_size=8, lr=1e-3,
                        ema_decay=0.9, progress=False)
    assert seen == [True, True]
    assert not u.training and not ema.training
    assert all(not m.training for m in ema.modules())


def test_ddpm_rejects_bad_args(digits):
    (x, _, _), _ = digits
    with pytest.raises(ValueError):
        train_ddpm(tiny_unet(), build_scheduler(), x[:8], steps=0, batch_size=4, lr=1e-3,
                   ema_decay=0.9, progress=False)
    with pytest.raises(ValueError):
        train_ddpm(tiny_unet(), build_scheduler(), x[:8], steps=1, batch_size=4, lr=1e-3,
                   ema_decay=1.0, progress=False)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, tiny_diffusion):
    """Kill the run mid-way (an exception in step 7), rerun: it continues from the checkpoint of
    step 5 and ends with exactly the weights of an uninterrupted run."""
    import copy as _copy

    from dbprepro.models.training import ddpm_loss, train_ddpm

    unet0, sch = tiny_diffusion
    imgs = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(steps=10, batch_size=8, lr=1e-3, ema_decay=0.9, seed=3, progress=False, checkpoint_every=5)

    ref, hist_ref = train_ddpm(_copy.deepcopy(unet0), sch, imgs, checkpoint_dir=tmp_path / "ref", **kw)

    calls = {"n": 0}

    def dying_loss(unet, scheduler, x0, y, gen):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("killed")
        return ddpm_loss(unet, scheduler, x0, y, gen)

    with pytest.raises(KeyboardInterrupt):
        train_ddpm(_copy.deepcopy(unet0), sch, imgs, checkpoint_dir=tmp_path / "run", loss_fn=dying_loss, **kw)
    assert (tmp_path / "run" / "state.pt").exists()
    resumed, hist = train_ddpm(_copy.deepcopy(unet0), sch, imgs, checkpoint_dir=tmp_path / "run", **kw)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert hist.equals(hist_ref)
    with pytest.raises(ValueError, match="steps"):  # a checkpoint of another run is not silently reused
        train_ddpm(_copy.deepcopy(unet0), sch, imgs, checkpoint_dir=tmp_path / "run", **{**kw, "steps": 12})
