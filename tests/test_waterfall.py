"""The robustness waterfall (issue 23): the per-image ensemble table from synthetic records with a
known answer, the runs' costs from the cost model, and the figure drawn from a table."""

import numpy as np
import pandas as pd
import pytest

from dbprepro.paper1.waterfall import (ALL_ATTACKS, PGD_ONLY, STAGES, run_costs, stage_of, waterfall_table,
                                       write_waterfall_table)


def _run(defense, setting, attack, single, worst=None, extra=0, threat="linf"):
    """One run's records: images 0..len(single)-1 with the given outcomes, then ``extra`` more images
    (all robust) that only this run attacked."""
    single = list(single) + [1] * extra
    worst = list(single if worst is None else list(worst) + [1] * extra)
    n = len(single)
    return pd.DataFrame(dict(id=np.arange(n), label=0, correct_single=np.array(single, float),
                             correct_mean=np.array(single, float), correct_worst=np.array(worst, float),
                             correct_vote=np.array(single, float), defense=defense, threat=threat, setting=setting,
                             attack=attack, norm="linf", eps=0.2))


#: vanilla: 8 shared images; pgd/dwbox attacked 8 more (dropped); the stages' known answer below
VANILLA = [
    _run("vanilla", "whitebox_eot", "diffhammer", [1, 1, 1, 1, 1, 1, 1, 1]),  # removes nothing; out of order
    _run("vanilla", "whitebox_eot", "pgd", [1, 1, 1, 1, 1, 1, 0, 0], worst=[0, 1, 1, 1, 1, 1, 0, 0]),
    _run("vanilla", "dwbox", "pgd", [1, 1, 1, 1, 0, 0, 1, 0], extra=8),
    _run("vanilla", "dwbox", "aa_standard_dwbox", [1, 1, 1, 0, 1, 1, 1, 1]),
    _run("vanilla", "whitebox_eot", "aa_rand", [1, 1, 0, 1, 1, 1, 1, 1]),
    _run("vanilla", "dwbox_c1", "pgd", [0] * 8),  # paper 2's fixed configuration: no stage
]
FAMILY = [_run("ddim", "dwbox", "pgd", [1, 0, 1, 0])]  # PGD runs only

COSTS = [dict(defense="vanilla", threat="linf", setting=s, attack=a, steps=st, calls_per_image=c,
              unet_calls_per_image=c - 10, calls_upper_bound=a.startswith("aa"))
         for s, a, st, c in (("whitebox_eot", "pgd", 20, 1610.0), ("dwbox", "pgd", 20, 154.0),
                             ("dwbox", "aa_standard_dwbox", 10, 1106.0), ("whitebox_eot", "aa_rand", 10, 500.0),
                             ("whitebox_eot", "diffhammer", 10, 900.0))]


def _table(runs=None, **kw):
    return waterfall_table(pd.concat(VANILLA + FAMILY if runs is None else runs, ignore_index=True), COSTS,
                           defenses=["vanilla"], **kw)


def _cells(t, defense="vanilla", evaluation="single"):
    return t[(t["defense"] == defense) & (t["evaluation"] == evaluation)].set_index("stage")


def test_the_known_answer_stage_by_stage():
    v = _cells(_table())
    assert list(v.index) == ["White-box-EOT", "DW-box", "AutoAttack", "DiffHammer", ALL_ATTACKS]
    assert list(v["stage_index"]) == sorted(v["stage_index"])
    assert list(v["stage_robust_accuracy"]) == [6 / 8, 5 / 8, 6 / 8, 1.0, 2 / 8]
    assert list(v["ensemble_robust_accuracy"]) == [6 / 8, 4 / 8, 2 / 8, 2 / 8, 2 / 8]
    assert list(v["removed"]) == [2, 2, 2, 0, 6]  # DiffHammer removes nothing; the last row: all removed
    aa = v.loc["AutoAttack"]  # both protocols count: an image must survive each
    assert aa["runs"] == "aa_standard_dwbox/dwbox;aa_rand/whitebox_eot" and aa["n_runs"] == 2
    assert v.loc[ALL_ATTACKS, "n_runs"] == 5 and bool(v.loc[ALL_ATTACKS, "adaptive"])
    assert "dwbox_c1" not in ";".join(v["runs"])  # a run no stage holds is left out


def test_the_curve_never_rises_and_ends_at_the_per_image_and_of_every_run():
    rng = np.random.default_rng(3)
    for trial in range(5):
        runs = []
        for s, a in (("whitebox", "pgd"), ("whitebox_eot", "pgd"), ("dwbox", "pgd"), ("whitebox_eot", "bpda"),
                     ("whitebox_eot", "diffattack"), ("dwbox", "diffattack"), ("whitebox_eot", "surrogate")):
            n = int(rng.integers(20, 40))
            runs.append(_run("vanilla", s, a, rng.random(n) < 0.7, worst=rng.random(n) < 0.5))
        t = _table(runs, resamples=300, seed=trial)
        n_shared = min(len(r) for r in runs)
        for ev, col in (("single", "correct_single"), ("worst", "correct_worst")):
            c = t[t["evaluation"] == ev]
            assert (np.diff(c["ensemble_robust_accuracy"].to_numpy(float)) <= 0).all()
            expected = np.min([r[col].to_numpy(float)[:n_shared] for r in runs], axis=0).mean()
            last = c.iloc[-1]
            assert last["stage"] == ALL_ATTACKS and last["ensemble_robust_accuracy"] == pytest.approx(expected)
            assert (c["n_images"] == n_shared).all()
            assert (c["ci_low"] <= c["ensemble_robust_accuracy"] + 1e-12).all()
            assert (c["ensemble_robust_accuracy"] <= c["ci_high"] + 1e-12).all()
            assert (c["stage_ci_low"] <= c["stage_robust_accuracy"] + 1e-12).all()
            assert (c["stage_robust_accuracy"] <= c["stage_ci_high"] + 1e-12).all()
            assert c["removed"].iloc[:-1].sum() == c["removed"].iloc[-1]  # the stages' removals add up
            assert (np.diff(c["ci_high"].to_numpy(float)) <= 1e-12).all()  # same draws: the bounds fall too


def test_runs_on_different_image_counts_are_intersected_and_recorded(caplog):
    with caplog.at_level("INFO", logger="dbprepro.paper1.waterfall"):
        v = _cells(_table())
    assert (v["n_images"] == 8).all() and (v["images_dropped"] == 8).all()
    assert (v["trimmed_runs"] == "pgd/dwbox").all()
    assert "8 images dropped" in caplog.text and "pgd/dwbox" in caplog.text
    # pgd/dwbox alone on its own 16 images: 13/16; on the shared images: 5/8
    assert v.loc["DW-box", "stage_robust_accuracy"] == 5 / 8


def test_the_strongest_single_run_is_computed_on_the_shared_images():
    last = _cells(_table()).loc[ALL_ATTACKS]
    assert last["strongest_run"] == "pgd/dwbox" and last["strongest_robust_accuracy"] == 5 / 8  # not 13/16
    assert last["strongest_ci_low"] <= 5 / 8 <= last["strongest_ci_high"]
    assert last["ensemble_robust_accuracy"] < last["strongest_robust_accuracy"]  # the union is stronger


def test_single_and_worst_are_kept_apart():
    t = _table()
    w = _cells(t, evaluation="worst")
    assert w.loc["White-box-EOT", "stage_robust_accuracy"] == 5 / 8  # worst of N: image 0 falls too
    assert w.loc[ALL_ATTACKS, "ensemble_robust_accuracy"] == 1 / 8
    assert _cells(t).loc[ALL_ATTACKS, "ensemble_robust_accuracy"] == 2 / 8


def test_a_defense_with_pgd_runs_only_is_marked_not_claimed_against_every_attack():
    t = _table()
    d = _cells(t, "ddim")
    assert list(d.index) == ["DW-box", PGD_ONLY] and not d["adaptive"].any()
    assert ALL_ATTACKS not in set(t.loc[t["defense"] == "ddim", "stage"])
    assert d.loc[PGD_ONLY, "ensemble_robust_accuracy"] == 0.5
    assert list(dict.fromkeys(t["defense"])) == ["vanilla", "ddim"]


def test_costs_are_summed_per_stage_and_accumulated():
    v = _cells(_table())
    aa = v.loc["AutoAttack"]
    assert aa["calls_per_image"] == 1606.0 and aa["network_calls"] == 1606.0 * 8 and aa["steps"] == 10
    assert aa["calls_upper_bound"] == True  # noqa: E712 - object column
    assert v.loc["DW-box", "network_calls"] == 154.0 * 16  # the run's own 16 images: what it cost
    total = 1610.0 * 8 + 154.0 * 16 + 1606.0 * 8 + 900.0 * 8
    assert v.loc[ALL_ATTACKS, "network_calls"] == v.loc[ALL_ATTACKS, "ensemble_network_calls"] == total
    assert v.loc["DiffHammer", "ensemble_network_calls"] == total
    t = waterfall_table(pd.concat(VANILLA, ignore_index=True), COSTS[1:])  # no cost row for pgd/whitebox_eot
    w = _cells(t).loc["White-box-EOT"]
    assert pd.isna(w["calls_per_image"]) and pd.isna(w["steps"])  # left empty, not guessed


def test_the_bootstrap_is_seeded():
    a, b, c = _table(seed=1), _table(seed=1), _table(seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert not a["ci_low"].equals(c["ci_low"]) or not a["ci_high"].equals(c["ci_high"])


def test_stage_map():
    assert stage_of("pgd", "whitebox_eot") == "White-box-EOT"
    assert stage_of("pgd", "dwbox") == "DW-box"
    assert stage_of("pgd", "none") == "white-box"
    assert {stage_of(a, "dwbox") for a in ("aa_standard_dwbox", "aa_standard_multieval", "aa_rand")} == {"AutoAttack"}
    assert stage_of("bpda", "dwbox") == "BPDA" and stage_of("surrogate", "whitebox_eot") == "surrogate"
    assert stage_of("lowfreq", "whitebox_eot") == stage_of("lowfreq", "dwbox") == "low-frequency"
    assert stage_of("pgd", "dwbox_c3") is None
    assert STAGES.index("BPDA") < STAGES.index("DW-box") < STAGES.index("AutoAttack") < STAGES.index("DiffHammer") \
        < STAGES.index("low-frequency") == len(STAGES) - 1


@pytest.fixture
def default_config():
    """The validated embedded default (config.yaml), the DiffHammer and low-frequency attacks switched on."""
    import yaml
    from smoke import ROOT

    from dbprepro.config import validate_config

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg.setdefault("attacks", {}).setdefault("diffhammer", {})["enabled"] = True
    cfg["attacks"].setdefault("lowfreq", {})["enabled"] = True
    return validate_config(cfg)


def test_run_costs_come_from_the_cost_model(default_config):
    from dbprepro.attacks.registry import attack_class
    from dbprepro.config import Experiment

    costs = run_costs(default_config)
    exp = Experiment.from_config(default_config)
    assert {c["attack"] for c in costs} >= {"diffhammer", "lowfreq"}
    assert [(c["defense"], c["threat"], c["setting"], c["attack"]) for c in costs] == \
        [tuple(r) for r in exp.attack_runs()]
    for c in costs:
        if c["defense"] == "undefended":
            assert c["unet_calls_per_image"] == 0 and c["steps"] == default_config["attacks"]["pgd"]["steps"]
            continue
        calls, bound = attack_class(c["attack"]).run_calls(
            exp.attacks(c["defense"], c["setting"], c["attack"]), c["setting"], exp.purification(c["defense"]),
            default_config["purification"].get("grad_mode", "exact"),
            default_config["diffusion"]["schedule"]["num_train_timesteps"])
        assert c["calls_per_image"] == sum(calls.as_dict().values()) > 0 and c["calls_upper_bound"] == bound


def test_the_default_attacks_both_waterfall_defenses_with_autoattack(default_config):
    from dbprepro.config import Experiment

    runs = Experiment.from_config(default_config).attack_runs()
    aa = {(r.defense, r.attack) for r in runs if r.attack.startswith("aa_")}
    assert aa == {(d, a) for d in ("vanilla", "addt", "adbm", "gdmp")
                  for a in ("aa_standard_dwbox", "aa_standard_multieval", "aa_rand")}


def _write_records(tmp_path, runs):
    paths = []
    for k, r in enumerate(runs):
        p = tmp_path / f"r{k}.parquet"
        r.to_parquet(p)
        paths.append(p)
    return paths


def test_table_and_figure_files(tmp_path, monkeypatch):
    from dbprepro.paper1 import waterfall_figure

    csv, md = tmp_path / "waterfall.csv", tmp_path / "waterfall.md"
    written = write_waterfall_table(_write_records(tmp_path, VANILLA + FAMILY), csv, md, COSTS, ["vanilla"],
                                    resamples=200)
    back = pd.read_csv(csv)
    assert len(back) == len(written) and list(back["stage"])[:2] == ["White-box-EOT", "DW-box"]
    assert ALL_ATTACKS in md.read_text()
    png, pdf = tmp_path / "waterfall.png", tmp_path / "waterfall.pdf"
    waterfall_figure.fig_waterfall(csv, png, pdf, confidence=0.95)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"

    drawn = {}

    def keep(fig, png, pdf):
        drawn["titles"] = [ax.get_title() for ax in fig.axes if ax.get_visible()]
        drawn["texts"] = [t.get_text() for ax in fig.axes for t in ax.texts]
        drawn["steps"] = {ln.get_label(): ln.get_ydata() for ax in fig.axes[:1] for ln in ax.get_lines()}
        drawn["ticks"] = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        waterfall_figure.plt.close(fig)

    monkeypatch.setattr(waterfall_figure, "save", keep)
    waterfall_figure.fig_waterfall(csv, png, pdf)
    assert drawn["titles"] == ["vanilla (linf, n=8)", "ddim (linf, n=4) - PGD runs only"]
    assert drawn["ticks"] == ["White-box-EOT", "DW-box", "AutoAttack", "DiffHammer"]  # the table's stage order
    removed = [t for t in drawn["texts"] if t.startswith("\u2212")]
    # vanilla single 2, 2, 2 and worst 3, 2, 2; ddim 2 in both; a stage that removed nothing is not annotated
    assert removed.count("\u22122") == 3 + 2 + 2 and removed.count("\u22123") == 1 and "\u22120" not in removed
    staircase = drawn["steps"]["one-shot (single): every stage so far"]
    assert list(staircase) == [0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25]  # a falling staircase


def test_the_stages_come_from_the_attack_registry(monkeypatch):
    """An attack class brings its own stage and rank: the waterfall needs no edit for a new attack."""
    from dbprepro.attacks.base import Attack
    from dbprepro.attacks.registry import ATTACKS
    from dbprepro.paper1.waterfall import STAGE_ORDER, stage_order

    class Fake(Attack):
        name = "fake"
        waterfall_stages = (("fake stage", None),)
        waterfall_rank = 35  # after AutoAttack (30), before DiffAttack (40)

    assert stage_order() == STAGE_ORDER
    monkeypatch.setitem(ATTACKS, "fake", Fake)
    labels = [label for label, _ in stage_order()]
    assert labels.index("fake stage") == labels.index("AutoAttack") + 1 == labels.index("DiffAttack") - 1
    assert dict(stage_order())["fake stage"] == (("fake", None),)


def test_the_table_stage_takes_the_stage_order_as_plain_data():
    """The DAG hands the registry's stage order to the table stage as a param (JSON: lists), so the
    stage reads no registry: the same table as from the registry, and a given order is the one used."""
    import json

    from dbprepro.paper1.waterfall import stage_order

    plain = json.loads(json.dumps(stage_order()))
    pd.testing.assert_frame_equal(_table(stages=plain), _table())
    reordered = [s for s in plain if s[0] == "DW-box"] + [s for s in plain if s[0] != "DW-box"]
    v = _cells(_table(stages=reordered))
    assert list(v.index) == ["DW-box", "White-box-EOT", "AutoAttack", "DiffHammer", ALL_ATTACKS]
    assert list(v["stage_index"]) == [0, 3, 4, 7, len(plain)] != list(_cells(_table())["stage_index"])
    assert list(v["ensemble_robust_accuracy"]) == [5 / 8, 4 / 8, 2 / 8, 2 / 8, 2 / 8]
