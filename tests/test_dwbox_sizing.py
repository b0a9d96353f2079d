"""attacks.dwbox_n_images (issue 16): the main sampler's DW-box PGD runs attack more images than
every other run; the config, the typed experiment and everything downstream that pairs a DW-box
run with runs of fewer images (paper 1's tables and Fig. 1, paper 2's fixed-randomness table and
compression analysis)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dbprepro.config import ConfigError, Experiment, deep_merge, load_yaml, validate_config
from dbprepro.paper1.figures import common_image_traces
from dbprepro.paper1.tables import p1_main_table
from dbprepro.paper2.compression import compression_models_table, compression_table
from dbprepro.paper2.fixed_randomness import p2_fixed_randomness_table

ROOT = Path(__file__).resolve().parents[1]


def default(**overrides):
    return validate_config(deep_merge(load_yaml(ROOT / "config.yaml"), overrides))


# -- the config and the typed experiment ---------------------------------------------------------
def test_default_config_attacks_256_images_in_the_main_samplers_dwbox_pgd_runs_only():
    cfg = default()
    exp = Experiment.from_config(cfg)
    assert cfg["data"]["n_test"] == cfg["attacks"]["dwbox_n_images"] == 256 and cfg["attacks"]["n_images"] == 64
    n = {(r.defense, r.setting, r.attack): exp.attacks(r.defense, r.setting, r.attack)["n_images"]
         for r in exp.attack_runs(fixed_configs=True)}
    big = {k for k, v in n.items() if v == 256}
    assert big == {(d, "dwbox", "pgd") for d in ["vanilla", "addt", "addt_no_rbgm", "cgpo_mse", "clean_finetune"]}
    assert n[("vanilla", "whitebox_eot", "pgd")] == n[("addt", "whitebox_eot", "pgd")] == 64  # EOT
    assert (n[("vanilla", "dwbox", "aa_standard_dwbox")] == n[("vanilla", "whitebox", "aa_standard_multieval")]
            == n[("vanilla", "whitebox_eot", "aa_rand")] == 64)  # AutoAttack
    assert n[("vanilla", "dwbox_c1", "pgd")] == n[("vanilla", "dwbox_c2", "pgd")] == 64  # paper 2's configurations
    assert n[("undefended", "none", "pgd")] == 64
    assert n[("ddim", "dwbox", "pgd")] == n[("edm_addt", "dwbox", "pgd")] == 24  # families.n_images
    # without a run: the defense's other runs
    assert exp.attacks("vanilla")["n_images"] == 64 and exp.attacks("edm")["n_images"] == 24
    assert analysis_n_images(cfg) == 64


def analysis_n_images(cfg):
    return cfg["analysis"]["n_images"]


def test_the_runs_section_leaves_the_new_key_out_so_other_runs_keep_their_params():
    cfg = default()
    exp = Experiment.from_config(cfg)
    from dbprepro.config.experiment import private_sections

    # the section before the key (issue 17's attack sections go to their own runs only)
    before = {k: v for k, v in cfg["attacks"].items() if k != "dwbox_n_images" and k not in private_sections()}
    # where AutoAttack and BPDA run (their defenses) is the grid's business, not their runs' params
    for section in ("autoattack", "bpda"):
        before[section] = {k: v for k, v in before[section].items() if k != "defenses"}
    assert exp.attacks("vanilla", "whitebox_eot", "pgd") == before
    assert exp.attacks("vanilla", "dwbox", "pgd") == {**before, "n_images": 256}
    assert list(exp.attacks("addt", "dwbox", "pgd")) == list(before)  # same keys, same order


def test_null_means_attacks_n_images():
    cfg = default(attacks={"dwbox_n_images": None})
    exp = Experiment.from_config(cfg)
    assert exp.attacks("vanilla", "dwbox", "pgd")["n_images"] == 64
    assert validate_config({"name": "x"})["attacks"]["dwbox_n_images"] is None  # the schema's default


@pytest.mark.parametrize("override, match", [
    ({"attacks": {"dwbox_n_images": 300}}, r"attacks\.dwbox_n_images: 300 exceeds data\.n_test \(256\)"),
    ({"attacks": {"dwbox_n_images": 32}}, r"attacks\.dwbox_n_images: 32 is below attacks\.n_images \(64\)"),
    ({"attacks": {"dwbox_n_images": 0}}, r"attacks\.dwbox_n_images"),
])
def test_dwbox_n_images_is_validated(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        validate_config(deep_merge(load_yaml(ROOT / "config.yaml"), override))
    assert "\n" not in str(e.value)


def test_fewer_batches_than_shards_is_refused():
    # n_images 8 of batch 8 on one shard is fine; dwbox_n_images 8 with 2 shards would leave a shard empty
    cfg = deep_merge(load_yaml(ROOT / "config.yaml"),
                     {"attacks": {"n_images": 16, "batch_size": 8, "shards": 2, "dwbox_n_images": 16},
                      "families": {"n_images": 16}, "analysis": {"n_images": 16}, "sanity": {"n_images": 16},
                      "competitors": {"n_images": {"gdmp": 16}}})
    assert validate_config(cfg)["attacks"]["dwbox_n_images"] == 16
    cfg["attacks"].update(batch_size=16, n_images=16, dwbox_n_images=16)  # 1 batch, 2 shards
    with pytest.raises(ConfigError, match=r"attacks\.shards"):
        validate_config(cfg)


def test_cost_model_counts_the_larger_runs():
    from dbprepro.cost import count_calls

    cfg = default()
    notes = {j.job: j.note for j in count_calls(cfg)}
    assert notes["attack/vanilla/linf/dwbox/pgd"] == notes["attack/cgpo_mse/linf/dwbox/pgd"] == "256 images"
    assert notes["attack/vanilla/linf/dwbox_c1/pgd"] == notes["attack/vanilla/linf/whitebox_eot/pgd"] == "64 images"
    assert notes["attack/ddim/linf/dwbox/pgd"] == "24 images"


# -- downstream: synthetic records of a 8-image DW-box run beside 4-image runs ------------------
def records(setting, correct, defense="vanilla", ids=None):
    correct = np.asarray(correct, float)
    ids = np.arange(len(correct)) if ids is None else np.asarray(ids)
    return pd.DataFrame({"defense": defense, "threat": "linf", "norm": "linf", "eps": 0.2, "setting": setting,
                         "attack": "pgd", "id": ids, "correct_single": correct, "correct_mean": correct,
                         "correct_worst": correct, "correct_vote": correct, "norm_linf": 0.2, "norm_l2": 1.0})


def test_p1_table_reports_each_runs_own_images_and_their_clean_accuracy():
    # clean records of 8 images: fixed configuration 0 right on ids 0-3 only; random draws always right
    clean = pd.concat([pd.DataFrame({"id": np.arange(8), "setting": "fixed", "draw": 0,
                                     "correct": [1, 1, 1, 1, 0, 0, 0, 0]}),
                       pd.DataFrame({"id": np.arange(8), "setting": "random", "draw": 0, "correct": 1})])
    dw = records("dwbox", [1, 0, 0, 0, 0, 0, 0, 0])
    eot = records("whitebox_eot", [1, 1, 0, 0])
    t = p1_main_table([dw, eot], {"vanilla": clean})
    t = t[t["evaluation"] == "single"].set_index("setting")
    assert t.loc["dwbox", "n_images"] == 8 and t.loc["whitebox_eot", "n_images"] == 4
    assert t.loc["dwbox", "clean_accuracy"] == 0.5  # over the dwbox run's 8 ids, not the first 4
    assert t.loc["dwbox", "robust_accuracy"] == 1 / 8 and t.loc["whitebox_eot", "robust_accuracy"] == 0.5


def test_fixed_randomness_rows_use_the_first_analysis_images_of_the_larger_dwbox_run():
    und = records("none", [0, 0, 0, 0], defense="undefended")
    rnd = records("whitebox_eot", [1, 1, 1, 0])
    # configuration 0 (the dwbox run) attacked 8 images; on the first 4 it keeps 1, on the others 4
    fixed = {0: records("dwbox", [1, 0, 0, 0, 1, 1, 1, 1]), 1: records("dwbox_c1", [1, 1, 0, 0])}
    for n in (None, 4):
        t = p2_fixed_randomness_table(und, rnd, fixed, n_images=n).set_index("row")
        assert t["n_images"].tolist() == [4] * 5
        assert t.loc["fixed_c0", "robust_accuracy"] == 0.25
        assert t.loc["fixed_mean", "robust_accuracy"] == pytest.approx(0.375)
    t2 = p2_fixed_randomness_table(und, rnd, fixed, n_images=2).set_index("row")
    assert t2["n_images"].tolist() == [2] * 5 and t2.loc["fixed_c1", "robust_accuracy"] == 1.0
    short = {0: fixed[0], 1: records("dwbox_c1", [1, 1])}  # a run lacking analysed images is refused
    with pytest.raises(ValueError, match="cover 2 of the 4 images"):
        p2_fixed_randomness_table(und, rnd, short)


def test_compression_tables_cover_only_the_analysed_images():
    # CR of the 4 analysed images; the dwbox run attacked 8 (robust on the 4 extra ones only)
    cr = pd.DataFrame({"defense": "vanilla", "id": np.arange(4), "label": 0, "config": 0,
                       "cr": [0.2, 0.4, 0.6, 0.8], "cr_std": 0.0, "clean_correct": 1})
    dw = records("dwbox", [1, 0, 0, 0, 1, 1, 1, 1])
    per_image, summary = compression_table(cr, {0: dw})
    assert per_image["id"].tolist() == [0, 1, 2, 3] and per_image["robust"].tolist() == [1, 0, 0, 0]
    assert summary.set_index("scope").loc["all", "n"] == 4
    eot = records("whitebox_eot", [1, 1, 0, 0])
    m = compression_models_table({"vanilla": cr}, {"vanilla": dw}, {"vanilla": eot}).set_index("defense")
    assert m.loc["vanilla", "n_images"] == 4
    assert m.loc["vanilla", "robust_accuracy_dwbox"] == 0.25  # not 5/8 over the dwbox run's images
    assert m.loc["vanilla", "robust_accuracy_whitebox_eot"] == 0.5


def test_trajectory_loss_panel_compares_the_same_images():
    traces = {"dwbox": pd.DataFrame({"id": np.repeat(np.arange(8), 2), "step": np.tile([0, 1], 8), "loss": 1.0}),
              "whitebox_eot": pd.DataFrame({"id": np.repeat(np.arange(4), 2), "step": np.tile([0, 1], 4),
                                            "loss": 2.0})}
    common = common_image_traces(traces)
    assert {s: sorted(t["id"].unique()) for s, t in common.items()} == {"dwbox": [0, 1, 2, 3],
                                                                         "whitebox_eot": [0, 1, 2, 3]}
    assert common_image_traces({}) == {}
