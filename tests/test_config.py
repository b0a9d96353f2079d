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
    ({"attacks": {"autoattack": {"protocols": ["standard"]}}}, "attacks.autoattack.protocols"),
    ({"attacks": {"autoattack": {"versions": ["plus"]}}}, "attacks.autoattack.versions"),
    ({"addt": {"variants": ["addt", "diffpure"]}}, "addt.variants"),
    ({"attacks": {"pgd": {"eot_samples": 10}}}, "eot_samples"),
    # fixed configurations the clean evaluation never scores (their clean accuracy would be missing)
    ({"attacks": {"fixed_draw": 4}}, "attacks.fixed_draw"),
]


@pytest.mark.parametrize("override, key", BAD, ids=[k for _, k in BAD])
def test_malformed_configs_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        validate_config(default(**override))
    assert key in str(err.value)


def test_the_dag_refuses_paper2_configurations_that_are_never_clean_evaluated():
    from dbprepro.config import check_dag_config

    cfg = validate_config(default(analysis={"fixed_configs": 5}))  # fine for `dbprepro evaluate`
    with pytest.raises(ConfigError, match=r"analysis\.fixed_configs: 5 configurations"):
        check_dag_config(cfg)
    check_dag_config(validate_config(default()))


def test_the_deprecated_autoattack_versions_are_read_as_protocols():
    cfg = default()
    del cfg["attacks"]["autoattack"]["protocols"]
    cfg["attacks"]["autoattack"]["versions"] = ["standard", "rand"]
    with pytest.warns(DeprecationWarning, match="versions is deprecated"):
        out = validate_config(cfg)
    aa = out["attacks"]["autoattack"]
    assert aa["protocols"] == ["standard_dwbox", "rand"] and "versions" not in aa
    with pytest.raises(ConfigError) as err:  # one clear line naming the new key
        validate_config(default(attacks={"autoattack": {"versions": "standard"}}))
    assert "\n" not in str(err.value) and "attacks.autoattack.protocols" in str(err.value)


def test_load_config_applies_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: t\npurification:\n  t_star: 0.2\n")
    cfg = load_config(p, {"purification": {"sampler": "ddim"}})
    assert cfg["purification"]["t_star"] == 0.2 and cfg["purification"]["sampler"] == "ddim"
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


# -- paper 1's purifier families (issue 9) --------------------------------------------------------
FAMILY_BAD = [
    ({"families": {"names": ["heun"]}}, "families.names"),
    ({"families": {"names": ["edm"], "threat_models": ["l3"]}}, "families.threat_models"),
    ({"families": {"names": ["edm"], "n_images": 1000}}, "families.n_images"),
    ({"families": {"names": ["edm"], "n_images": 8}, "attacks": {"shards": 2, "batch_size": 8}}, "families.n_images"),
    ({"families": {"names": ["edm"]}, "addt": {"variants": ["clean_finetune"]}}, "families.addt"),
    ({"families": {"own_addt": ["ddim"]}}, "families.own_addt"),
]


@pytest.mark.parametrize("override, key", FAMILY_BAD, ids=[k for _, k in FAMILY_BAD])
def test_malformed_family_configs_are_refused(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(default(**override))


def test_family_defenses_weights_and_sections():
    from dbprepro.config import (attack_runs, defense_attacks, defense_family, defense_purification,
                                 defense_weights, family_defenses, own_addt_defenses)

    cfg = validate_config(default(families={"names": ["ddim", "vpsde", "edm"], "own_addt": ["edm"], "n_images": 32,
                                            "settings": ["dwbox"]}))
    assert family_defenses(cfg) == ["ddim", "ddim_addt", "vpsde", "vpsde_addt", "edm", "edm_addt"]
    assert own_addt_defenses(cfg) == ["edm_addt"]
    # vanilla weights for f, the family's own ADDT weights where trained, else the DDPM-loss ADDT
    assert [defense_weights(cfg, d) for d in family_defenses(cfg)] == [
        "vanilla", "addt", "vanilla", "addt", "vanilla", "edm_addt"]
    assert defense_weights(cfg, "addt_no_rbgm") == "addt_no_rbgm"
    assert defense_family(cfg, "vanilla") == defense_family(cfg, "addt") == cfg["purification"]["sampler"] == "ddpm"
    pur = defense_purification(cfg, "vpsde_addt")
    assert pur["sampler"] == "vpsde" and pur["t_star"] == cfg["purification"]["t_star"]
    assert cfg["purification"]["sampler"] == "ddpm"  # not modified in place
    assert defense_attacks(cfg, "edm")["n_images"] == 32
    assert defense_attacks(cfg, "vanilla")["n_images"] == cfg["attacks"]["n_images"]
    runs = attack_runs(cfg)
    assert [r for r in runs if r[0] in family_defenses(cfg)] == [
        (d, "linf", "dwbox", "pgd") for d in family_defenses(cfg)]
    # without the addt variant, no f_addt defenses (families.addt false)
    off = validate_config(default(families={"names": ["edm"], "addt": False}, addt={"variants": ["clean_finetune"]},
                                  competitors={"names": []}))  # adbm needs its variant
    assert family_defenses(off) == ["edm"]
    assert family_defenses(validate_config(default(families={"names": []}))) == []
    # the main sampler is the defense vanilla: listed among the families, it is skipped there
    assert family_defenses(validate_config(default(families={"names": ["ddpm", "edm"]}))) == ["edm", "edm_addt"]
    # (DiffAttack's forward reference needs a DDPM/DDIM chain: the clean one runs on EDM's)
    as_edm = validate_config(default(purification={"sampler": "edm"}, families={"names": ["vpsde", "edm"]},
                                     attacks={"diffattack": {"reference": "clean"}}))
    assert family_defenses(as_edm) == ["vpsde", "vpsde_addt"]


def test_ablation_variants_take_their_own_settings():
    from dbprepro.config import addt_settings, attack_runs

    paper = validate_config(default(addt={"ablation_settings": None}))
    assert addt_settings(paper, "cgpo_mse") == addt_settings(paper, "addt") == paper["addt"]["attack_settings"]
    cfg = validate_config(default(addt={"ablation_settings": ["dwbox"], "attack_settings": ["whitebox_eot", "dwbox"]}))
    assert addt_settings(cfg, "addt") == ["whitebox_eot", "dwbox"] and addt_settings(cfg, "cgpo_mse") == ["dwbox"]
    runs = {(d, s) for d, _, s, _ in attack_runs(cfg)}
    assert ("addt", "whitebox_eot") in runs and ("cgpo_mse", "whitebox_eot") not in runs and ("cgpo_mse", "dwbox") in runs


def test_the_typed_experiment_says_what_each_defense_is():
    """Defenses are typed objects (sampler, weights, fine-tune), not names to parse."""
    from dbprepro.config import AttackRun, Defense, Experiment

    cfg = validate_config(default(families={"names": ["ddim", "vpsde", "edm"], "own_addt": ["edm"]}))
    exp = Experiment.from_config(cfg)
    assert exp.defense("ddim") == Defense("ddim", "ddim", "vanilla", family=True)
    assert exp.defense("ddim_addt") == Defense("ddim_addt", "ddim", "addt", finetune="addt", family=True)
    assert exp.defense("edm_addt") == Defense("edm_addt", "edm", "edm_addt", finetune="addt", family=True, trains=True)
    assert exp.defense("cgpo_mse") == Defense("cgpo_mse", "ddpm", "cgpo_mse", finetune="cgpo_mse", trains=True)
    # adbm: the default's competing defense, trained by its addt variant (competitors.names)
    assert exp.trained_defenses == ["addt", "addt_no_rbgm", "cgpo_mse", "clean_finetune", "edm_addt", "adbm"]
    assert [exp.finetune_family(d) for d in ("addt", "edm_addt")] == ["ddpm", "edm"]
    assert exp.defense("vanilla").weights_kind == "vanilla" and exp.defense("vpsde_addt").weights_kind == "addt"
    runs = exp.attack_runs()
    assert runs[0] == AttackRun("undefended", "linf", "none", "pgd") and runs[0].attack == "pgd"
    assert AttackRun("ddim", "linf", "dwbox", "pgd") in runs
    with pytest.raises(ConfigError, match="no defense 'heun'"):
        exp.defense("heun")
