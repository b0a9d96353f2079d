import numpy as np
import pandas as pd
import pytest
import torch

from dbprepro.config import validate_config
from dbprepro.data import prepare_split, shard_slices
from dbprepro.models.classifiers import SmallCNN, save_classifier
from dbprepro.models.diffusion import save_diffusion
from dbprepro.attacks.runner import merge_shards, run_attack_shard
from dbprepro.paper1.tables import p1_main_table


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_diffusion):
    root = tmp_path_factory.mktemp("ws")
    prepare_split("digits", {"train": root / "train.npz", "test": root / "test.npz"}, root / "split.json",
                  test_fraction=0.2, seed=0)
    torch.manual_seed(0)
    save_classifier(SmallCNN(width=8, hidden=16), "small_cnn", {"width": 8, "hidden": 16}, root / "clf")
    save_diffusion(*tiny_diffusion, root / "dif")
    return root


def config(shards):
    cfg = validate_config({"name": "t", "data": {"n_test": 64},
                           "attacks": {"n_images": 12, "batch_size": 4, "shards": shards, "track_images": 2,
                                       "pgd": {"steps": 2, "eot": 2}, "eval_draws": 3}})
    return cfg


def run(ws, shards, setting="whitebox_eot", attack="pgd"):
    cfg = config(shards)
    outs = []
    for s in range(shards):
        stem = ws / f"{setting}{attack}{shards}_{s}"
        run_attack_shard(ws / "clf", ws / "dif", ws / "test.npz", ws / "split.json",
                         records=f"{stem}.rec.parquet", trace=f"{stem}.tr.parquet", paths=f"{stem}.npz",
                         adv=f"{stem}.adv.npz",
                         defense="vanilla", threat="linf", setting=setting, attack=attack, shard=s,
                         attacks=cfg["attacks"], purification=cfg["purification"], variance_type="fixed_large",
                         seed=0, device=torch.device("cpu"))
        outs.append(stem)
    merged = ws / f"{setting}{attack}{shards}_merged"
    merge_shards([f"{o}.rec.parquet" for o in outs], [f"{o}.tr.parquet" for o in outs], [f"{o}.npz" for o in outs],
                 f"{merged}.rec.parquet", f"{merged}.tr.parquet", f"{merged}.npz",
                 [f"{o}.adv.npz" for o in outs], f"{merged}.adv.npz")
    return merged


@pytest.mark.parametrize("setting", ["whitebox_eot", "dwbox"])
def test_results_do_not_depend_on_the_number_of_shards(workspace, setting):
    one, three = run(workspace, 1, setting), run(workspace, 3, setting)
    a = pd.read_parquet(f"{one}.rec.parquet").drop(columns="shard")
    b = pd.read_parquet(f"{three}.rec.parquet").drop(columns="shard")
    assert len(a) == 12 and a["id"].is_unique
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(pd.read_parquet(f"{one}.tr.parquet"), pd.read_parquet(f"{three}.tr.parquet"))
    with np.load(f"{one}.adv.npz") as za, np.load(f"{three}.adv.npz") as zb:
        assert za["x_adv"].shape == (12, 1, 8, 8) and np.array_equal(za["ids"], a["id"].to_numpy())
        assert np.array_equal(za["x_adv"], zb["x_adv"])
    with np.load(f"{one}.npz") as za, np.load(f"{three}.npz") as zb:
        assert za["deltas"].shape == (2, 3, 64)
        assert np.array_equal(za["deltas"], zb["deltas"])


def test_shards_are_unions_of_whole_fixed_batches():
    for n_shards in (1, 2, 3):
        got = [sl for s in range(n_shards) for sl in shard_slices(10, 4, n_shards, s)]
        assert [(s.start, s.stop) for s in got] == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ValueError, match="shards"):
        shard_slices(10, 4, 4, 0)


def test_main_table_rows_and_clean_accuracy_source():
    rec = pd.DataFrame({"defense": "vanilla", "threat": "linf", "setting": "dwbox", "attack": "pgd", "norm": "linf",
                        "eps": 0.03, "id": [1, 2, 3, 4], "label": 0, "correct_single": [1.0, 0, 0, 0],
                        "correct_mean": [1.0, 0, 0, 0], "correct_worst": [1.0, 0, 0, 0], "correct_vote": [1.0, 0, 0, 0],
                        "norm_l2": 0.1, "norm_linf": 0.03, "loss_start": 0.0, "loss_end": 1.0})
    clean = pd.DataFrame({"setting": ["fixed"] * 4 + ["fixed"] * 4 + ["random"] * 4, "draw": [0] * 4 + [1] * 4 + [0] * 4,
                          "id": [1, 2, 3, 4] * 3, "correct": [1, 1, 1, 0] + [0, 0, 0, 0] + [1, 1, 1, 1]})
    t = p1_main_table([rec], {"vanilla": clean}, fixed_draw=0)
    assert list(t["evaluation"]) == ["single", "mean", "worst", "vote"]
    assert (t["robust_accuracy"] == 0.25).all()
    assert (t["clean_accuracy"] == 0.75).all()  # dwbox: clean accuracy of the attacked fixed configuration
    rec["setting"] = "whitebox_eot"
    assert (p1_main_table([rec], {"vanilla": clean})["clean_accuracy"] == 1.0).all()


def test_main_table_refuses_a_fixed_configuration_that_was_never_clean_evaluated():
    """dwbox_c{k} / dwbox against a configuration without clean records: an error naming it, the
    defense and the configurations present - never the mean of the other configurations."""
    rec = pd.DataFrame({"defense": "addt", "threat": "linf", "setting": "dwbox_c3", "attack": "pgd", "norm": "linf",
                        "eps": 0.03, "id": [1, 2], "label": 0, "correct_single": [1.0, 0], "correct_mean": [1.0, 0],
                        "correct_worst": [1.0, 0], "correct_vote": [1.0, 0], "norm_l2": 0.1, "norm_linf": 0.03,
                        "loss_start": 0.0, "loss_end": 1.0})
    clean = pd.DataFrame({"setting": ["fixed"] * 4 + ["random"] * 2, "draw": [0, 0, 1, 1, 0, 0],
                          "id": [1, 2, 1, 2, 1, 2], "correct": [1, 1, 0, 0, 1, 1]})
    with pytest.raises(ValueError, match=r"'dwbox_c3'.*configuration 3 was never clean-evaluated for defense 'addt' "
                                         r"\(configurations present: \[0, 1\]\)"):
        p1_main_table([rec], {"addt": clean})
    rec["setting"] = "dwbox"  # plain dwbox: the configuration is fixed_draw
    with pytest.raises(ValueError, match=r"configuration 2 was never clean-evaluated"):
        p1_main_table([rec], {"addt": clean}, fixed_draw=2)
    assert (p1_main_table([rec], {"addt": clean}, fixed_draw=1)["clean_accuracy"] == 0.0).all()
    rec["setting"] = "dwbox_c1"
    assert (p1_main_table([rec], {"addt": clean})["clean_accuracy"] == 0.0).all()
    rec["id"] = [7, 8]  # configuration 1 exists, but not for the attacked images
    with pytest.raises(ValueError, match="configuration 1 was not clean-evaluated on the attacked images"):
        p1_main_table([rec], {"addt": clean})
    rec["id"] = [1, 2]  # a defense without clean records never borrows another defense's
    with pytest.raises(ValueError, match="no clean-evaluation records of defense 'addt'"):
        p1_main_table([rec], {"vanilla": clean})
    rec["setting"], rec["defense"] = "none", "undefended"  # the classifier alone: any defense's records
    assert len(p1_main_table([rec], {"vanilla": clean.assign(setting="classifier")}))


def _main_rows(defense, setting, n, k, clean=0.9):
    from dbprepro.metrics import wilson_interval

    lo, hi = wilson_interval(k, n, 0.95)
    return [{"defense": defense, "threat": "linf", "norm": "linf", "eps": 0.2, "setting": setting, "attack": "pgd",
             "evaluation": ev, "n_images": n, "clean_accuracy": clean,
             "robust_accuracy": (k if ev == "single" else 0) / n, "ci_low": lo, "ci_high": hi,
             "mean_linf": 0.2, "mean_l2": 1.0} for ev in ("single", "mean", "worst", "vote")]


def test_families_and_ablation_tables_pick_the_single_evaluation_rows(tmp_path):
    from dbprepro.paper1.tables import write_p1_ablation_table, write_p1_families_table

    rows = (_main_rows("vanilla", "whitebox_eot", 64, 22) + _main_rows("vanilla", "dwbox", 64, 14)
            + _main_rows("addt", "whitebox_eot", 64, 26) + _main_rows("addt", "dwbox", 64, 19)
            + _main_rows("edm", "whitebox_eot", 32, 12) + _main_rows("edm", "dwbox", 32, 5)
            + _main_rows("edm_addt", "dwbox", 32, 9)  # no whitebox_eot run: its columns stay empty
            + _main_rows("edm", "whitebox", 32, 30))  # a setting the table does not show
    main = tmp_path / "main.csv"
    pd.DataFrame(rows).to_csv(main, index=False)
    spec = [dict(family="ddpm", weights="vanilla", defense="vanilla"), dict(family="ddpm", weights="addt", defense="addt"),
            dict(family="edm", weights="vanilla", defense="edm"), dict(family="edm", weights="addt", defense="edm_addt")]
    fam = write_p1_families_table(main, tmp_path / "f.csv", tmp_path / "f.md", spec, "linf")
    assert fam[["family", "weights", "defense"]].values.tolist() == [[r["family"], r["weights"], r["defense"]] for r in spec]
    assert fam["robust_dwbox"].tolist() == pytest.approx([14 / 64, 19 / 64, 5 / 32, 9 / 32])
    assert fam["n_images_dwbox"].tolist() == [64, 64, 32, 32]
    assert fam["robust_whitebox_eot"].iloc[:3].tolist() == pytest.approx([22 / 64, 26 / 64, 12 / 32])
    assert np.isnan(fam["robust_whitebox_eot"].iloc[3])
    assert (tmp_path / "f.md").read_text().count("\n") >= 5
    # the ablation table: the ablation order first, then the families as given, with their family
    abl = write_p1_ablation_table(main, tmp_path / "a.csv", tmp_path / "a.md", ["edm_addt", "edm", "addt", "vanilla"],
                                  "linf", families={"vanilla": "ddpm", "addt": "ddpm", "edm": "edm", "edm_addt": "edm"})
    assert abl["defense"].tolist() == ["vanilla", "addt", "edm_addt", "edm"]
    assert abl["family"].tolist() == ["ddpm", "ddpm", "edm", "edm"]
    assert abl["robust_dwbox"].tolist() == pytest.approx([14 / 64, 19 / 64, 9 / 32, 5 / 32])
    assert str(abl["n_images_whitebox_eot"].dtype) == "Int64" and "16.0" not in (tmp_path / "a.csv").read_text()
