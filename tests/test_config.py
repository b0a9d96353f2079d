from pathlib import Path

import pytest

from dbprepro.config import ConfigError, deep_merge, load_config, load_yaml, validate_config

ROOT = Path(__file__).resolve().parents[1]


def default(**overrides):
    return deep_merge(load_yaml(ROOT / "config.yaml"), overrides)


@pytest.mark.parametrize("path", ["config.yaml", "config/smoke.yaml"])
def test_shipped_configs_are_valid(path):
    cfg = load_yaml(ROOT / "config.yaml")
    if path != "config.yaml":
        cfg = deep_merge(cfg, load_yaml(ROOT / path))  # Snakemake overlays --configfile
    validate_config(cfg)


def test_defaults_are_filled_in():
    cfg = validate_config({"name": "x"})
    assert cfg["purification"]["t_star"] == 0.1
    assert cfg["diffusion"]["schedule"]["num_train_timesteps"] == 1000
    assert cfg["evaluation"]["random_draws"] >= 1


BAD = [
    ({"purification": {"t_star": 100}}, "purification.t_star"),
    ({"purification": {"t_star": 0}}, "purification.t_star"),
    ({"purification": {"t_star": "0.1"}}, "purification.t_star"),
    ({"purification": {"sampler": "heun"}}, "purification.sampler"),
    ({"purification": {"num_inference_steps": 30}}, "purification.num_inference_steps"),
    ({"purification": {"num_inference_steps": 5000}}, "purification.num_inference_steps"),
    ({"purification": {"eta": -1}}, "purification.eta"),
    ({"purification": {"t_strar": 0.1}}, "t_strar"),
    ({"seed": -3}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"device": "tpu"}, "device"),
    ({"data": {"dataset": "mnist"}}, "data.dataset"),
    ({"data": {"n_test": 0}}, "data.n_test"),
    ({"data": {"n_test": 100000}}, "data.n_test"),
    ({"data": {"dataset": "cifar10"}}, "data.download"),
    ({"classifier": {"arch": "resnet-1000"}}, "classifier.arch"),
    ({"classifier": {"train": {"lr": -0.1}}}, "classifier.train.lr"),
    ({"classifier": {"source": "download"}}, "classifier.download"),
    ({"diffusion": {"unet": {"attention": [True]}}}, "diffusion.unet.attention"),
    ({"diffusion": {"unet": {"norm_num_groups": 7}}}, "diffusion.unet.norm_num_groups"),
    ({"diffusion": {"schedule": {"beta_start": 0.1, "beta_end": 0.01}}}, "diffusion.schedule.beta_end"),
    ({"diffusion": {"train": {"steps": 0}}}, "diffusion.train.steps"),
    ({"diffusion": {"source": "download", "download": {"repo_id": "google/ddpm-cifar10-32", "revision": "main",
                                                        "files": {"config.json": "0" * 64}}}},
     "diffusion.download.revision"),
    ({"diffusion": {"source": "download", "download": {"repo_id": "google/ddpm-cifar10-32", "revision": "a" * 40,
                                                        "files": {"config.json": None}}}},
     "config.json"),
    ({"evaluation": {"random_draws": 0}}, "evaluation.random_draws"),
    ({"evaluation": {"confidence": 1.5}}, "evaluation.confidence"),
    ({"name": "has space"}, "name"),
    # attacks and defenses (issue 8: every kind of bad input names its key)
    ({"attacks": {"threat_models": [{"name": "linf", "norm": "linf", "eps": -0.1, "alpha": 0.05}]}},
     "attacks.threat_models.0.eps"),
    ({"attacks": {"threat_models": [{"name": "linf", "norm": "linf", "eps": 0, "alpha": 0.05}]}},
     "attacks.threat_models.0.eps"),
    ({"attacks": {"threat_models": [{"name": "linf", "norm": "linf", "eps": 255, "alpha": 0.05}]}},
     "attacks.threat_models.0.eps"),
    ({"attacks": {"threat_models": [{"name": "linf", "norm": "l1", "eps": 0.1, "alpha": 0.05}]}},
     "attacks.threat_models.0.norm"),
    ({"attacks": {"pgd": {"eot": 0}}}, "attacks.pgd.eot"),
    ({"attacks": {"pgd": {"steps": "20"}}}, "attacks.pgd.steps"),
    ({"attacks": {"shards": 1000}}, "attacks.shards"),
    ({"attacks": {"settings": ["whitebox", "blackbox"]}}, "attacks.settings"),
    ({"attacks": {"autoattack": {"versions": ["plus"]}}}, "attacks.autoattack.versions"),
    ({"addt": {"variants": ["addt", "diffpure"]}}, "addt.variants"),
    ({"attacks": {"pgd": {"eot_samples": 10}}}, "eot_samples"),
]


@pytest.mark.parametrize("override, key", BAD, ids=[k for _, k in BAD])
def test_malformed_configs_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        validate_config(default(**override))
    assert key in str(err.value)


def test_load_config_applies_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: t\npurification:\n  t_star: 0.2\n")
    cfg = load_config(p, {"purification": {"sampler": "ddim"}})
    assert cfg["purification"]["t_star"] == 0.2 and cfg["purification"]["sampler"] == "ddim"
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
