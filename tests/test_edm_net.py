"""EDM's SongUNet behind EDMPrecond (dbprepro.models.edm_net, issue 18): the paper-scale architecture
(count, keys, shapes) built on the meta device, and a small instance for the arithmetic."""

import math

import pytest
import torch

import dbprepro.models  # noqa: F401  (registers the networks)
from dbprepro.models.edm_net import PAPER_CONFIG, EDMSongUNet, UNetBlock, positional_embedding
from dbprepro.models.networks import network_class, network_names

SMALL = {"img_resolution": 8, "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]}


@pytest.fixture(scope="module")
def paper():
    with torch.device("meta"):
        return EDMSongUNet.from_config()


def small(seed=0, dtype=torch.float64, scale=0.2):
    """A small instance with every parameter random (not the near-zero init), so outputs are O(1)."""
    torch.manual_seed(seed)
    net = EDMSongUNet.from_config(SMALL).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return net


def test_registered_with_the_edm_family():
    assert network_class("edm_songunet") is EDMSongUNet
    assert EDMSongUNet.family == "edm" and "edm_songunet" in network_names("edm")
    assert "edm_songunet" not in network_names("vpsde")


def test_paper_scale_parameter_count(paper):
    """55,733,891 parameters in 417 tensors plus 8 resample_filter buffers (425 state-dict entries):
    the count ../shared/reference/paper-scale-networks.md §2.4 derives from the EDM source (config F,
    augment_dim 9); 55,732,739 without the 9 -> 128 map_augment layer (the same section)."""
    params = list(paper.parameters())
    assert sum(p.numel() for p in params) == 55_733_891 == EDMSongUNet.official_parameters
    assert len(params) == 417 and len(paper.state_dict()) == 425
    with torch.device("meta"):
        no_aug = EDMSongUNet.from_config({"augment_dim": 0})
    assert sum(p.numel() for p in no_aug.parameters()) == 55_732_739


def test_paper_scale_keys_and_shapes(paper):
    """The keys and shapes ../shared/reference/paper-scale-networks.md §2.4 and §5.2 name."""
    sd = paper.state_dict()
    assert all(k.startswith("model.") for k in sd)
    shapes = {
        "model.map_augment.weight": (128, 9), "model.map_layer0.weight": (512, 128), "model.map_layer0.bias": (512,),
        "model.map_layer1.weight": (512, 512), "model.enc.32x32_conv.weight": (128, 3, 3, 3),
        "model.enc.32x32_block0.skip.weight": (256, 128, 1, 1), "model.enc.16x16_block0.qkv.weight": (768, 256, 1, 1),
        "model.enc.16x16_block0.proj.weight": (256, 256, 1, 1),
        "model.enc.16x16_down.conv0.resample_filter": (1, 1, 2, 2),
        "model.enc.8x8_block3.affine.weight": (256, 512), "model.dec.8x8_in0.norm2.weight": (256,),
        "model.dec.8x8_block0.conv0.weight": (256, 512, 3, 3), "model.dec.32x32_block4.conv0.weight": (256, 384, 3, 3),
        "model.dec.32x32_aux_norm.weight": (256,), "model.dec.32x32_aux_conv.weight": (3, 256, 3, 3),
        "model.dec.32x32_aux_conv.bias": (3,),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert "model.map_augment.bias" not in sd and not any("map_noise" in k or "map_label" in k for k in sd)
    attention = sorted(k.rsplit(".", 2)[0] for k in sd if k.endswith(".qkv.weight"))
    assert attention == sorted([f"model.enc.16x16_block{i}" for i in range(4)]
                               + ["model.dec.8x8_in0", "model.dec.16x16_block4"])
    buffers = sorted(k for k, _ in paper.named_buffers())
    assert buffers == sorted(f"model.{side}.{blk}.{conv}.resample_filter" for side, blk in
                             [("enc", "16x16_down"), ("enc", "8x8_down"), ("dec", "16x16_up"), ("dec", "32x32_up")]
                             for conv in ("conv0", "skip"))
    blocks = {k.split(".")[2] for k in sd if k.startswith("model.dec.")}
    assert blocks == {"8x8_in0", "8x8_in1", "16x16_up", "32x32_up", "32x32_aux_norm", "32x32_aux_conv",
                      *(f"{r}x{r}_block{i}" for r in (8, 16, 32) for i in range(5))}


def test_from_config_defaults_and_refusals():
    assert PAPER_CONFIG["channel_mult"] == (2, 2, 2) and PAPER_CONFIG["dropout"] == 0.13
    net = EDMSongUNet.from_config(SMALL)
    assert not net.training and net.sigma_data == 0.5
    with pytest.raises(ValueError, match="unknown EDM network option"):
        EDMSongUNet.from_config({"nf": 8})
    for key, value in [("label_dim", 10), ("encoder_type", "residual"), ("embedding_type", "fourier")]:
        with pytest.raises(ValueError, match=key):
            EDMSongUNet.from_config({**SMALL, key: value})
    EDMSongUNet.from_config({**SMALL, "label_dim": 0, "precond": "edm"})  # the fixed values are accepted


def test_resample_filter_and_forward_shapes():
    torch.manual_seed(0)
    net = EDMSongUNet.from_config(SMALL)
    sd = net.state_dict()
    filt = [v for k, v in sd.items() if k.endswith("resample_filter")]
    assert len(filt) == 4 and all(torch.equal(f, torch.full((1, 1, 2, 2), 0.25)) for f in filt)
    for b in (1, 4):
        x = torch.randn(b, 3, 8, 8)
        f = net.model(x, torch.randn(b))
        assert f.shape == (b, 3, 8, 8)
        assert f.abs().max() < 1e-3  # aux_conv starts near zero (init weight 1e-5)
        assert net(x, 0.5).shape == net.eps(x, torch.full((b,), 0.5)).shape == (b, 3, 8, 8)


def test_positional_embedding_is_score_sdes():
    """Sin half first, frequencies 10000^(-k/63): Score SDE's DDPM++ embedding (§2.5, §5.4)."""
    t = torch.tensor([0.0, 1e-3, 0.37, 1.0], dtype=torch.float64) * 999
    emb = positional_embedding(t, 128)
    freqs = torch.exp(-math.log(10000) * torch.arange(64, dtype=torch.float64) / 63)
    expected = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected, rtol=0, atol=1e-9)


def test_preconditioning_identities():
    """With F = 0, D(x) = c_skip x; c_skip(0.5) = 0.5 (§5.5); the UNet sees c_in x and ln(sigma)/4."""
    net = small()
    with torch.no_grad():
        net.model.dec["8x8_aux_conv"].weight.zero_()
        net.model.dec["8x8_aux_conv"].bias.zero_()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(net(x, 0.5), 0.5 * x)
    for s in (0.01, 0.3, 2.0, 80.0):
        torch.testing.assert_close(net(x, s), 0.25 / (s * s + 0.25) * x)
    seen = []
    net2 = small()
    handle = net2.model.register_forward_pre_hook(lambda m, a: seen.append(a))
    net2(x, torch.tensor([0.5, 2.0], dtype=torch.float64))
    handle.remove()
    (inp, labels), = seen
    torch.testing.assert_close(labels, torch.log(torch.tensor([0.5, 2.0], dtype=torch.float64)) / 4)
    torch.testing.assert_close(inp[1], x[1] / math.sqrt(4.25))


def test_eps_is_the_definition():
    """eps(x_vp, sigma) = (x - D(x; sigma)) / sigma at x = x_vp sqrt(1 + sigma^2), for a float sigma
    and one sigma per sample, in float64."""
    net = small()
    x_vp = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    for sigma in (0.05, 0.5, torch.tensor([0.02, 0.4, 3.0], dtype=torch.float64)):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        x = x_vp * torch.sqrt(1 + s * s)
        expected = (x - net(x, sigma)) / s
        torch.testing.assert_close(net.eps(x_vp, sigma), expected, rtol=1e-9, atol=1e-9)
    # per-sample sigma = the samples one at a time (no mixing across the batch, attention included)
    sig = torch.tensor([0.02, 0.4, 3.0], dtype=torch.float64)
    whole = net.eps(x_vp, sig)
    for i in range(3):
        torch.testing.assert_close(whole[i:i + 1], net.eps(x_vp[i:i + 1], float(sig[i])), rtol=1e-12, atol=1e-12)


def test_eps_gradient_against_finite_differences():
    """The gradient of eps with respect to the input and to sigma, against central finite differences
    in float64 (torch.autograd.gradcheck)."""
    net = small(seed=1)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, s: net.eps(a, s), (x, sigma), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_attention_channels_are_interleaved():
    """qkv's 3C output channels are (3c + j, j = q, k, v) (§2.5): the block equals attention computed
    by hand from that layout."""
    torch.manual_seed(0)
    blk = UNetBlock(8, 8, emb_channels=16, attention=True).double()
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x, emb = torch.randn(2, 8, 4, 4, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    out = blk(x, emb)
    captured = {}
    h1 = blk.qkv.register_forward_hook(lambda m, a, o: captured.update(qkv=o))
    blk(x, emb)
    h1.remove()
    qkv = captured["qkv"].reshape(2, 8 * 3, 16)
    q, k, v = qkv[:, 0::3], qkv[:, 1::3], qkv[:, 2::3]
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(8), dim=2)
    a = torch.einsum("bij,bcj->bci", w, v).reshape(2, 8, 4, 4)
    h = (blk.conv1(torch.nn.functional.silu(blk.norm1(
        blk.conv0(torch.nn.functional.silu(blk.norm0(x))) + blk.affine(emb)[:, :, None, None]))) + x) * math.sqrt(0.5)
    torch.testing.assert_close(out, (blk.proj(a) + h) * math.sqrt(0.5))


def test_dropout_only_in_training_mode():
    net = small(dtype=torch.float32)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(net.eps(x, 0.3), net.eps(x, 0.3))
    net.train()
    torch.manual_seed(0)
    a = net.eps(x, 0.3)
    assert not torch.equal(a, net.eps(x, 0.3))
