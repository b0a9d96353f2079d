"""Score SDE's DDPM++ (:mod:`dbprepro.models.ddpmpp`, issue 18): the paper-scale parameter count and
state-dict keys, a stand-in of the official checkpoint loaded safely with its EMA weights, and eps at
an EDM noise level.

The numbers come from ``../shared/reference/paper-scale-networks.md`` (REF below; section numbers are
that page's).  There is no official checkpoint here: the loading tests build files with the official
layout and random weights.  The paper-scale network is only built on the meta device (shapes, no
memory, no computation); every forward pass runs on small instances.
"""

import math

from collections import OrderedDict

import pytest
import torch

from dbprepro.models.ddpmpp import DDPMpp, vp_sigma, vp_time
from dbprepro.models.ddpmpp_layers import NIN, AttnBlock, ResBlock, positional_embedding
from dbprepro.models.networks import network_class, network_names
from dbprepro.models.verification import CheckpointError

REF = "../shared/reference/paper-scale-networks.md"
SMALL = {"nf": 16, "num_res_blocks": 1, "image_size": 8, "attn_resolutions": [4]}
TINY = {"nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "image_size": 4, "attn_resolutions": [2], "dropout": 0.0}


@pytest.fixture(scope="module")
def paper_scale():
    """The paper-scale network on the meta device: every shape, no storage."""
    with torch.device("meta"):
        return DDPMpp.from_config()


def _randomize(net, seed=0, scale=0.2):
    """Perturb every parameter: DDPM's init leaves the residual branches near zero (init_scale 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def test_registered_with_the_vpsde_family():
    assert network_class("ddpmpp") is DDPMpp
    assert DDPMpp.family == "vpsde" and "ddpmpp" in network_names("vpsde") and "ddpmpp" not in network_names("edm")


# -- the paper-scale architecture -------------------------------------------------------------
def test_paper_scale_parameter_count(paper_scale):
    """106,632,579 parameters in 956 tensors, 957 state-dict entries with the sigmas buffer,
    91 modules: REF §1.5 (derived there from the Score SDE source; no official figure exists)."""
    params = list(paper_scale.parameters())
    assert sum(p.numel() for p in params) == 106_632_579 == DDPMpp.official_parameters
    assert len(params) == 956 and len(paper_scale.state_dict()) == 957 and len(paper_scale.all_modules) == 91


@pytest.mark.parametrize("batch", [1, 4])
def test_paper_scale_forward_shapes(paper_scale, batch):
    """(B, 3, 32, 32) and B labels -> (B, 3, 32, 32) (REF §5.3), shapes only, on the meta device."""
    with torch.device("meta"):
        x = torch.empty(batch, 3, 32, 32)
        assert paper_scale(x, torch.empty(batch)).shape == (batch, 3, 32, 32)
        assert paper_scale.eps(x, torch.full((batch,), 0.5, dtype=torch.float64)).shape == (batch, 3, 32, 32)


def test_paper_scale_module_map(paper_scale):
    """The index map of REF §1.2: time MLP 0-1, input conv 2, attention after every 16x16 encoder
    block (odd indices 13-27), in the middle (47) and after the 16x16 decoder blocks (78),
    down-blocks 11/28/37, up-blocks 58/68/79, GroupNorm 89, output conv 90; res-blocks elsewhere."""
    mods = paper_scale.all_modules
    attn = [i for i, m in enumerate(mods) if isinstance(m, AttnBlock)]
    assert attn == [*range(13, 28, 2), 47, 78]
    assert [i for i, m in enumerate(mods) if isinstance(m, ResBlock) and m.down] == [11, 28, 37]
    assert [i for i, m in enumerate(mods) if isinstance(m, ResBlock) and m.up] == [58, 68, 79]
    res = [i for i, m in enumerate(mods) if isinstance(m, ResBlock)]
    assert res == [i for i in range(3, 89) if i not in attn]
    assert isinstance(mods[0], torch.nn.Linear) and isinstance(mods[1], torch.nn.Linear)
    assert isinstance(mods[2], torch.nn.Conv2d) and isinstance(mods[90], torch.nn.Conv2d)
    assert isinstance(mods[89], torch.nn.GroupNorm) and (mods[89].num_groups, mods[89].eps) == (32, 1e-6)
    # resolutions and widths: 128 ch at 32, 256 at 16, 8 and 4; nine decoder blocks per level
    assert (mods[3].in_ch, mods[3].out_ch, mods[12].in_ch, mods[12].out_ch) == (128, 128, 128, 256)
    assert all(mods[i].out_ch == 256 for i in range(49, 58)) and mods[57].in_ch == 256 + 256
    assert [mods[i].in_ch for i in range(80, 89)] == [256 + 128] + [128 + 128] * 8
    assert all(hasattr(mods[i], "Conv_2") for i in range(49, 89) if isinstance(mods[i], ResBlock))  # concat or resample
    assert not hasattr(mods[3], "Conv_2") and not hasattr(mods[46], "Conv_2")  # 128 -> 128, 256 -> 256


def test_paper_scale_keys_and_shapes(paper_scale):
    """The checkpoint's keys (without DataParallel's ``module.``) and the shapes REF §5.2 names."""
    sd = paper_scale.state_dict()
    expected = {
        "sigmas": (1000,), "all_modules.0.weight": (512, 128), "all_modules.1.weight": (512, 512),
        "all_modules.2.weight": (128, 3, 3, 3), "all_modules.13.NIN_0.W": (256, 256), "all_modules.13.NIN_3.b": (256,),
        "all_modules.11.Conv_2.weight": (128, 128, 1, 1), "all_modules.12.Dense_0.weight": (256, 512),
        "all_modules.88.Conv_2.weight": (128, 256, 1, 1), "all_modules.89.weight": (128,),
        "all_modules.90.weight": (3, 128, 3, 3), "all_modules.90.bias": (3,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert sd["sigmas"].dtype == torch.float64
    assert list(sd)[:3] == ["sigmas", "all_modules.0.weight", "all_modules.0.bias"]
    # a res-block's children in the official registration order (REF §1.2), Conv_2 last
    assert [k[len("all_modules.12."):] for k in sd if k.startswith("all_modules.12.")] == [
        f"{m}.{p}" for m in ("GroupNorm_0", "Conv_0", "Dense_0", "GroupNorm_1", "Conv_1", "Conv_2")
        for p in ("weight", "bias")]
    assert [k[len("all_modules.47."):] for k in sd if k.startswith("all_modules.47.")] == [
        "GroupNorm_0.weight", "GroupNorm_0.bias", *[f"NIN_{i}.{p}" for i in range(4) for p in ("W", "b")]]
    # the parameter order (the EMA list's order) is the state-dict order without the buffer
    assert [n for n, _ in paper_scale.named_parameters()] == [k for k in sd if k != "sigmas"]


def test_sigmas_buffer_and_init():
    """``sigmas``: 1000 float64 values, 50 down to 0.01 geometrically (REF §5.2); the zero-scaled
    residual branches and output conv give near-zero outputs at init (REF §5.3)."""
    net = DDPMpp.from_config(SMALL)
    s = net.sigmas
    assert s.dtype == torch.float64 and s.shape == (1000,)
    assert math.isclose(float(s[0]), 50.0, rel_tol=1e-12) and math.isclose(float(s[-1]), 0.01, rel_tol=1e-12)
    ratios = s[1:] / s[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-10) and float(ratios[0]) < 1
    with torch.no_grad():
        assert float(net.eps(torch.randn(2, 3, 8, 8), 0.5).abs().max()) < 1e-3


def test_config_overrides_and_refusals():
    net = DDPMpp.from_config({**SMALL, "ch_mult": [1, 2], "resblock_type": "biggan", "fir_kernel": [1, 3, 3, 1],
                                  "name": "ddpmpp"})
    # time MLP + input conv, 8x8: res + down, 4x4: res + attention, middle, decoder 4x4: 2 res + attention
    # + up, 8x8: 2 res, GroupNorm + output conv
    assert net.ch_mult == (1, 2) and len(net.all_modules) == 3 + 2 + 2 + 3 + 4 + 2 + 2
    assert not net.training  # built for inference: dropout off
    with pytest.raises(ValueError, match="num_res_block"):
        DDPMpp.from_config({"num_res_block": 1})  # a typo must not silently build the paper-scale network
    with pytest.raises(ValueError, match="resblock_type"):
        DDPMpp.from_config({**SMALL, "resblock_type": "ddpm"})
    with pytest.raises(ValueError, match="embedding_type"):
        DDPMpp.from_config({**SMALL, "embedding_type": "fourier"})
    with pytest.raises(ValueError, match="divisible"):
        DDPMpp.from_config({**SMALL, "image_size": 12})


# -- the official checkpoint layout -----------------------------------------------------------
def _stand_in_checkpoint(path, cfg, seed=1):
    """A file with Score SDE's layout (REF §1.4): ``model`` a DataParallel state dict (``module.``
    keys) of raw weights, ``ema`` {decay, num_updates, shadow_params: one tensor per parameter in
    parameters() order}, ``optimizer`` an Adam state dict, ``step``; random weights throughout, the
    EMA values distinct from the raw ones.  Returns (raw state dict, shadow list)."""
    torch.manual_seed(seed)
    wrapped = torch.nn.DataParallel(_randomize(DDPMpp.from_config(cfg), seed))
    opt = torch.optim.Adam(wrapped.parameters(), lr=2e-4)
    sum(p.sum() for p in wrapped.parameters()).backward()
    opt.step()
    shadow = [torch.randn(p.shape) for p in wrapped.parameters()]
    sd = wrapped.state_dict()  # an OrderedDict with _metadata, as Score SDE saves it (state['model'].state_dict())
    model = OrderedDict((k, v.clone()) for k, v in sd.items())
    model._metadata = sd._metadata
    torch.save({"optimizer": opt.state_dict(), "model": model,
                "ema": {"decay": 0.9999, "num_updates": 400_000, "shadow_params": shadow}, "step": 400_000}, path)
    return model, shadow


def test_stand_in_checkpoint_loads_the_ema_weights(tmp_path):
    path = tmp_path / "checkpoint_8.pth"
    model, shadow = _stand_in_checkpoint(path, SMALL)
    assert all(k.startswith("module.") for k in model) and "module.sigmas" in model
    net = DDPMpp.load_state(path, SMALL)
    assert type(net) is DDPMpp and not net.training
    params = list(net.named_parameters())
    assert len(params) == len(shadow)
    for (name, p), s in zip(params, shadow):
        assert torch.equal(p, s), name  # the EMA weights, by position, exactly
        assert not torch.equal(p, model[f"module.{name}"]), name  # not the raw ones
    assert torch.equal(net.sigmas, model["module.sigmas"])
    raw = DDPMpp.load_state(path, SMALL, use_ema=False)
    for name, p in raw.named_parameters():
        assert torch.equal(p, model[f"module.{name}"]), name


def _resave(path, edit):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)


def test_checkpoints_that_do_not_fit_are_refused_naming_what(tmp_path):
    path = tmp_path / "c.pth"
    _stand_in_checkpoint(path, SMALL)
    _resave(path, lambda c: c["model"].pop("module.all_modules.5.Conv_1.bias"))
    with pytest.raises(CheckpointError, match=r"missing all_modules\.5\.Conv_1\.bias"):
        DDPMpp.load_state(path, SMALL)

    _stand_in_checkpoint(path, SMALL)
    _resave(path, lambda c: c["model"].update({"module.all_modules.99.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected all_modules\.99\.weight"):
        DDPMpp.load_state(path, SMALL)

    _stand_in_checkpoint(path, SMALL)
    _resave(path, lambda c: c["ema"]["shadow_params"].pop())
    with pytest.raises(CheckpointError, match="shadow_params'] has .* tensors"):
        DDPMpp.load_state(path, SMALL)

    _stand_in_checkpoint(path, SMALL)
    _resave(path, lambda c: c["ema"]["shadow_params"].__setitem__(4, torch.zeros(7)))
    with pytest.raises(CheckpointError, match=r"shadow_params'\]\[4\] has shape \(7,\).*all_modules\.2\.weight"):
        DDPMpp.load_state(path, SMALL)

    _stand_in_checkpoint(path, SMALL)  # a float64 tensor would be converted silently by load_state_dict: refused
    _resave(path, lambda c: c["ema"]["shadow_params"].__setitem__(4, c["ema"]["shadow_params"][4].double()))
    with pytest.raises(CheckpointError, match=r"shadow_params'\]\[4\] \(all_modules\.2\.weight\) is torch\.float64"):
        DDPMpp.load_state(path, SMALL)
    _stand_in_checkpoint(path, SMALL)
    _resave(path, lambda c: c["model"].update({"module.sigmas": c["model"]["module.sigmas"].float()}))
    with pytest.raises(CheckpointError, match=r"sigmas is torch\.float32 in the checkpoint, torch\.float64"):
        DDPMpp.load_state(path, SMALL)

    _stand_in_checkpoint(path, SMALL)
    _resave(path, lambda c: c.pop("ema"))
    with pytest.raises(CheckpointError, match="no EMA weights"):
        DDPMpp.load_state(path, SMALL)
    DDPMpp.load_state(path, SMALL, use_ema=False)  # the raw weights still load

    _stand_in_checkpoint(path, {**SMALL, "nf": 8})  # another architecture: named shape mismatches
    with pytest.raises(CheckpointError, match=r"all_modules\.0\.weight is \(32, 8\) in the checkpoint, \(64, 16\)"):
        DDPMpp.load_state(path, SMALL)
    with pytest.raises(CheckpointError, match="missing"):
        DDPMpp.load_state(tmp_path / "absent.pth", SMALL)


class _Payload:
    def __reduce__(self):
        return (print, ("executed",))


def test_a_checkpoint_carrying_code_is_refused_unexecuted(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "ema": _Payload(), "step": 0}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        DDPMpp.load_state(path, SMALL)
    assert "executed" not in capsys.readouterr().out


# -- eps at an EDM noise level ------------------------------------------------------------------
def test_time_mapping_round_trips_and_reference_numbers():
    """sigma <-> continuous VP time: sigma^2 = exp(t^2 (20 - 0.1) / 2 + 0.1 t) - 1 (REF §2.3, §5.5-5.6)."""
    t = torch.linspace(1e-5, 1.0, 201, dtype=torch.float64)
    assert torch.allclose(vp_time(vp_sigma(t)), t, rtol=0, atol=1e-12)
    s = torch.logspace(-3, 2.2, 101, dtype=torch.float64)
    assert torch.allclose(vp_sigma(vp_time(s)), s, rtol=1e-12, atol=0)
    alpha_bar = torch.exp(-0.5 * t * t * 19.9 - 0.1 * t)  # Score SDE's continuous VP
    assert torch.allclose(1 / (1 + vp_sigma(t) ** 2), alpha_bar, rtol=1e-12)
    assert abs(float(vp_sigma(0.1)) - 0.340177) < 1e-6 and abs(float(vp_sigma(1.0)) - 152.167) < 1e-3
    assert abs(999 * float(vp_time(vp_sigma(0.5))) - 499.5) < 1e-9
    sig = float(vp_sigma(0.1))
    assert abs(sig / math.sqrt(1 + sig * sig) - 0.322053) < 1e-6  # DiffPure's std(0.1): score = -eps / std


def test_positional_embedding_is_sin_first():
    """REF §1.3: frequencies 10000^(-k/63), k = 0..63, the sin half first, then the cos half."""
    labels = torch.tensor([0.0, 99.9, 999.0], dtype=torch.float64)
    emb = positional_embedding(labels, 128)
    assert emb.shape == (3, 128) and emb.dtype == torch.float64
    freqs = 10000.0 ** (-torch.arange(64, dtype=torch.float64) / 63)
    assert torch.allclose(emb[:, :64], torch.sin(labels[:, None] * freqs), rtol=0, atol=1e-9)
    assert torch.allclose(emb[:, 64:], torch.cos(labels[:, None] * freqs), rtol=0, atol=1e-9)
    assert positional_embedding(labels.float(), 128).dtype == torch.float32  # the official float32 computation
    assert positional_embedding(labels, 7).shape == (3, 7) and float(positional_embedding(labels, 7)[:, -1].abs().max()) == 0


def test_nin_weight_is_stored_in_by_out():
    """REF §1.2: a NIN's ``W`` is (in, out), the transpose of a 1x1 convolution's weight."""
    nin = NIN(3, 5)
    with torch.no_grad():
        nin.b.normal_()
        x = torch.randn(2, 3, 4, 4)
        assert nin.W.shape == (3, 5)
        conv = torch.nn.functional.conv2d(x, nin.W.t()[:, :, None, None], nin.b)
        assert torch.allclose(nin(x), conv, atol=1e-6)


def test_eps_is_the_network_at_label_999t():
    net = _randomize(DDPMpp.from_config(SMALL))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        e = net.eps(x, 0.5)
        assert e.shape == x.shape and e.dtype == torch.float32 and bool(torch.isfinite(e).all())
        label = 999 * vp_time(0.5)
        assert torch.equal(e, net(x, torch.full((3,), float(label))))
        assert torch.equal(net.eps(x, 0.5), e)  # eval mode: no dropout, deterministic
        per_sample = net.eps(x, torch.tensor([0.5, 2.0, 0.01], dtype=torch.float64))
        assert torch.allclose(per_sample[0], e[0], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(per_sample[1], e[1], rtol=1e-3, atol=1e-3)
        assert net.double().eps(x.double(), 0.5).dtype == torch.float64
    with pytest.raises(ValueError, match="2 values for a batch of 3"):
        net.eps(x.double(), torch.tensor([0.5, 1.0]))


def test_eps_gradient_matches_finite_differences():
    """Exact input (and noise-level) gradients through eps, at float64, on a tiny instance with
    attention in the encoder, the middle and the decoder."""
    net = _randomize(DDPMpp.from_config(TINY), seed=3).double()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, s: net.eps(a, s), (x, sigma), eps=1e-6, atol=1e-6, rtol=1e-4)
