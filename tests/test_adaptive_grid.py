"""Where the adaptive attacks of issue 17 run (the waterfall's rows): each attack's own section
lists its ``defenses`` and may attack fewer images (``n_images``); the grid, the runs' params and
the config checks read them through the attack registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbprepro.attacks import ATTACKS
from dbprepro.config import ConfigError, Experiment, deep_merge, load_yaml, validate_config
from dbprepro.config.experiment import private_sections

ROOT = Path(__file__).resolve().parents[1]
ADAPTIVE = ("diffattack", "surrogate", "diffhammer", "lowfreq")


def config(competitors=None, **attacks):
    cfg = deep_merge(load_yaml(ROOT / "config.yaml"), {"attacks": attacks, "competitors": competitors or {}})
    return validate_config(cfg)


def test_private_sections_are_read_from_the_registry():
    private = private_sections()
    assert all(private[a] == a for a in ADAPTIVE)
    assert set(private) == {c.config_section for c in ATTACKS.values() if c.private_section}
    assert "pgd" not in private and "autoattack" not in private


def test_defenses_add_each_attacks_runs_on_the_listed_defenses_only():
    on = {a: {"enabled": True, "defenses": ["vanilla", "addt"], "settings": ["whitebox_eot"]} for a in ADAPTIVE}
    runs = Experiment.from_config(config(**on)).attack_runs()
    for a in ADAPTIVE:
        mine = {(r.defense, r.setting) for r in runs if r.attack == a}
        assert mine == {("vanilla", "whitebox_eot"), ("addt", "whitebox_eot")}
    assert len(runs) == len(set(runs))
    # without the key: vanilla only (the schema's default)
    raw = load_yaml(ROOT / "config.yaml")
    for a in ADAPTIVE:
        raw["attacks"][a] = {"enabled": True, "settings": ["dwbox"]}
    runs = Experiment.from_config(validate_config(raw)).attack_runs()
    assert {r.defense for r in runs if r.attack in ADAPTIVE} == {"vanilla"}


def test_an_attacks_n_images_caps_its_own_runs_and_leaves_the_others():
    cfg = config(diffattack={"enabled": True, "defenses": ["vanilla", "addt", "ddim"], "n_images": 32,
                             "settings": ["dwbox", "whitebox_eot"]})
    exp = Experiment.from_config(cfg)
    assert exp.attacks("vanilla", "dwbox", "diffattack")["n_images"] == 32  # not dwbox_n_images' 256
    assert exp.attacks("addt", "whitebox_eot", "diffattack")["n_images"] == 32
    assert exp.attacks("ddim", "dwbox", "diffattack")["n_images"] == 24  # families.n_images is smaller
    assert exp.attacks("vanilla", "dwbox", "pgd")["n_images"] == 256
    assert exp.attacks("vanilla", "whitebox_eot", "pgd")["n_images"] == 64


def test_where_an_attack_runs_stays_out_of_its_runs_params():
    a = Experiment.from_config(config(surrogate={"enabled": True, "defenses": ["vanilla"]}))
    b = Experiment.from_config(config(surrogate={"enabled": True, "defenses": ["vanilla", "addt"], "n_images": 16}))
    pa, pb = (e.attacks("vanilla", "whitebox_eot", "surrogate") for e in (a, b))
    assert "defenses" not in pa["surrogate"] and "n_images" not in pa["surrogate"]
    assert {**pa, "n_images": None} == {**pb, "n_images": None} and pb["n_images"] == 16
    assert "surrogate" not in a.attacks("vanilla", "whitebox_eot", "pgd")  # private to its own runs


def test_an_unknown_defense_is_refused_naming_the_defenses():
    with pytest.raises(ConfigError, match=r"attacks.diffhammer.defenses: \['vote'\].*vanilla, addt"):
        config(diffhammer={"enabled": True, "defenses": ["vanilla", "vote"]})


def test_a_defense_the_config_switches_off_is_skipped():
    on = {"enabled": True, "defenses": ["vanilla", "addt", "edm_addt", "vanilla_vote"]}
    cfg = validate_config(deep_merge(load_yaml(ROOT / "config.yaml"),
                                     {"attacks": {"diffhammer": on}, "addt": {"enabled": False},
                                      "families": {"addt": False},
                                      "competitors": {"names": ["gdmp"]}}))  # adbm needs its ADDT fine-tune
    runs = Experiment.from_config(cfg).attack_runs()
    assert {r.defense for r in runs if r.attack == "diffhammer"} == {"vanilla"}


#: GDMP on 2 batches of 8 (config.yaml's 8 images would be refused first, under competitors.n_images.gdmp)
GDMP16 = {"n_images": {"gdmp": 16}}


def test_an_attacks_n_images_must_fill_the_shards():
    with pytest.raises(ConfigError, match="attacks.surrogate.n_images: 8 images are fewer than attacks.shards"):
        config(surrogate={"enabled": True, "n_images": 8}, shards=2, batch_size=8, competitors=GDMP16)
    config(surrogate={"enabled": False, "n_images": 8}, shards=2, batch_size=8, competitors=GDMP16)  # not run: not checked
