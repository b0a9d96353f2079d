"""A family's own paper-scale network in the DAG (issue 18): ``families.networks`` in the config,
the defenses that purify with it, the folder rule download_network writes (the official file
checked and read by the network's safe loader, never converted) and loading it like any model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dbprepro.config import ConfigError, Experiment, validate_config
from dbprepro.io import sha256_file
from dbprepro.models.ddpmpp import DDPMpp
from dbprepro.models.diffusion import load_diffusion, save_diffusion
from dbprepro.models.networks import NETWORK_FILE, is_network_dir, load_network_dir

TINY = {"nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "image_size": 8, "attn_resolutions": [4], "dropout": 0.0}


def net_section(network="ddpmpp", sha256=None, url="https://example.org/checkpoint_8.pth", **extra):
    return {"network": network, "config": TINY,
            "download": {"url": url, "sha256": sha256, "filename": "checkpoint_8.pth", "allow_unpinned": True},
            **extra}


def config(networks, **families):
    return validate_config({"name": "t", "families": {"names": ["ddim", "vpsde", "edm"], "own_addt": [],
                                                      "networks": networks, **families}})


def test_the_family_defense_purifies_with_its_network_and_its_addt_keeps_the_addt_weights():
    exp = Experiment.from_config(config({"vpsde": net_section()}))
    assert exp.defense("vpsde").weights == exp.defense("vpsde").network == "ddpmpp"
    assert exp.defense("vpsde_addt").weights == "addt" and exp.defense("vpsde_addt").network is None
    assert exp.defense("edm").weights == "vanilla" and exp.defense("ddim").network is None
    assert list(exp.networks) == ["ddpmpp"] and exp.networks["ddpmpp"]["network"] == "ddpmpp"
    assert not Experiment.from_config(config({})).networks


@pytest.mark.parametrize("networks, families, match", [
    ({"vpsde": net_section("edm_songunet")}, {}, "a network of the edm family, not vpsde"),
    ({"vpsde": net_section("nope")}, {}, "unknown network 'nope'"),
    ({"vpsde": net_section()}, {"own_addt": ["vpsde"]}, "not supported yet"),
    ({"vpsde": net_section()}, {"names": ["ddim"]}, "not in families.names"),
])
def test_misconfigured_networks_are_refused_naming_the_key(networks, families, match):
    with pytest.raises(ConfigError, match=match):
        config(networks, **families)


def test_an_unpinned_network_file_needs_allow_unpinned():
    sec = net_section()
    sec["download"]["allow_unpinned"] = False
    with pytest.raises(ConfigError, match=r"families.networks.vpsde.download.sha256.*not pinned"):
        config({"vpsde": sec})
    pinned = net_section(sha256="0" * 64)
    pinned["download"]["allow_unpinned"] = False
    config({"vpsde": pinned})


def _stand_in(path: Path) -> DDPMpp:
    """A tiny DDPM++ with random weights in Score SDE's checkpoint layout (EMA = the weights)."""
    torch.manual_seed(3)
    net = DDPMpp.from_config(TINY)
    for p in net.parameters():
        p.data.normal_(0, 0.2)
    model = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"model": model, "ema": {"decay": 0.9999, "num_updates": 1,
                                        "shadow_params": [p.detach().clone() for p in net.parameters()]},
                "optimizer": {}, "step": 1}, path)
    return net


def test_rule_download_network_writes_a_folder_that_loads_like_any_model(tiny_diffusion, tmp_path):
    from dbprepro.pipeline.models import download_network

    official = tmp_path / "mirror" / "checkpoint_8.pth"
    official.parent.mkdir()
    net = _stand_in(official)
    base = tmp_path / "vanilla"
    save_diffusion(*tiny_diffusion, base)
    sec = net_section(sha256=sha256_file(official), url=official.as_uri())
    out = tmp_path / "results" / "models" / "diffusion" / "ddpmpp"
    downloads = tmp_path / "results" / "downloads" / "networks"
    download_network(SimpleNamespace(base=str(base)), SimpleNamespace(model=str(out)),
                     SimpleNamespace(network=sec, downloads=str(downloads)), SimpleNamespace())
    assert is_network_dir(out) and (downloads / "checkpoint_8.pth").is_file()
    spec = json.loads((out / NETWORK_FILE).read_text())
    assert spec["network"] == "ddpmpp" and spec["sha256"] == sha256_file(official)
    assert not any(p.suffix in (".pth", ".pt", ".safetensors", ".bin") for p in out.rglob("*"))  # never converted
    loaded, scheduler = load_diffusion(out)  # the DAG's loader dispatches on the folder
    assert isinstance(loaded, DDPMpp) and not loaded.training
    for (k, a), b in zip(loaded.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(scheduler.alphas_cumprod, tiny_diffusion[1].alphas_cumprod)
    # the folder moves with results/: the weights path is relative
    moved = tmp_path / "elsewhere"
    (tmp_path / "results").rename(moved)
    assert isinstance(load_network_dir(moved / "models" / "diffusion" / "ddpmpp")[0], DDPMpp)


def test_a_weights_file_changed_after_download_is_refused(tiny_diffusion, tmp_path):
    from dbprepro.models.networks import save_network_dir
    from dbprepro.models.verification import CheckpointError

    weights = tmp_path / "checkpoint_8.pth"
    _stand_in(weights)
    save_network_dir(tmp_path / "ddpmpp", "ddpmpp", TINY, weights, sha256_file(weights), tiny_diffusion[1])
    load_network_dir(tmp_path / "ddpmpp")
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(CheckpointError):
        load_network_dir(tmp_path / "ddpmpp")


def test_the_networks_name_their_image_shape_as_a_unet_config_does():
    from dbprepro.models.edm_net import EDMSongUNet

    ddpmpp = DDPMpp.from_config(TINY)
    assert (ddpmpp.config.in_channels, ddpmpp.config.sample_size) == (3, 8)
    edm = EDMSongUNet.from_config({"img_resolution": 8, "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
                                   "attn_resolutions": [4]})
    assert (edm.config.in_channels, edm.config.sample_size) == (3, 8)


def test_the_cost_model_prices_a_family_on_its_own_network():
    """count_calls marks the jobs that run on a family's network; estimate prices their UNet calls
    with that network's unit costs, the other jobs' with the diffusion section's."""
    from dbprepro.config import load_configs
    from dbprepro.cost import count_calls
    from dbprepro.cost.report import estimate

    jobs = {j.job: j for j in count_calls(load_configs(["config/cifar10.yaml"]))}
    assert jobs["attack/vpsde/linf/dwbox/pgd"].network == "ddpmpp"
    assert jobs["evaluate_clean/edm"].network == "edm_songunet"
    assert jobs["attack/vpsde_addt/linf/dwbox/pgd"].network is None and jobs["attack/vanilla/linf/dwbox/pgd"].network is None
    unit = {k: 1.0 for k in ("unet_fwd", "unet_grad", "unet_train", "clf_fwd", "clf_grad", "clf_train")}
    unit["networks"] = {"ddpmpp": {"unet_fwd": 3.0, "unet_grad": 5.0, "unet_train": 1.0}}
    pair = [jobs["attack/vpsde/linf/dwbox/pgd"], jobs["attack/vpsde_addt/linf/dwbox/pgd"]]
    df = estimate(pair, unit).set_index("job")
    c = pair[0].calls
    assert df.loc[pair[0].job, "device_hours"] * 3600 == pytest.approx(
        3 * c.unet_fwd + 5 * c.unet_grad + c.unet_train + c.clf_fwd + c.clf_grad + c.clf_train)
    c = pair[1].calls
    assert df.loc[pair[1].job, "device_hours"] * 3600 == pytest.approx(sum(c.as_dict().values()))


def test_unit_costs_are_measured_on_each_familys_network():
    from dbprepro.cost.measure import measure_unit_costs

    tiny = {**TINY, "num_channels": 1, "ch_mult": [1], "attn_resolutions": []}  # the digits' 1x8x8 images
    sec = net_section()
    sec["config"] = tiny
    cfg = validate_config({"name": "t", "families": {"names": ["vpsde"], "own_addt": [], "networks": {"vpsde": sec}}})
    unit = measure_unit_costs(cfg, device="cpu", batch_size=2, repeats=1)
    net = unit["networks"]["ddpmpp"]
    assert net["unet_fwd"] > 0 and net["unet_grad"] > 0 and "parameters" in net["name"]
