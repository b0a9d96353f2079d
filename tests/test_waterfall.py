"""The robustness waterfall (issue 17): the table from synthetic p1_table_main rows, the runs' costs
from the cost model, and the figure's files."""

import pandas as pd
import pytest

from dbprepro.paper1.waterfall import (STAGES, STRONGEST, run_costs, stage_of, waterfall_table,
                                       write_waterfall_table)


def _row(defense, setting, attack, evaluation, acc, n=64, threat="linf"):
    return dict(defense=defense, threat=threat, norm="linf", eps=0.2, setting=setting, attack=attack,
                evaluation=evaluation, n_images=n, clean_accuracy=0.95, robust_accuracy=acc,
                ci_low=max(0.0, acc - 0.1), ci_high=min(1.0, acc + 0.1), mean_linf=0.2, mean_l2=1.0)


def _main() -> pd.DataFrame:
    rows = []
    for ev, shift in (("single", 0.0), ("worst", -0.2), ("mean", 0.05), ("vote", 0.01)):
        rows += [_row("undefended", "none", "pgd", ev, 0.0)]
        rows += [_row("vanilla", "whitebox_eot", "lowfreq", ev, max(0.0, 0.32 + shift)),  # out of order
                 _row("vanilla", "whitebox_eot", "diffhammer", ev, max(0.0, 0.30 + shift)),
                 _row("vanilla", "whitebox_eot", "bpda", ev, max(0.0, 0.60 + shift)),
                 _row("vanilla", "whitebox", "pgd", ev, max(0.0, 0.50 + shift)),
                 _row("vanilla", "whitebox_eot", "pgd", ev, max(0.0, 0.40 + shift)),
                 _row("vanilla", "dwbox", "pgd", ev, 0.20, n=256),
                 _row("vanilla", "dwbox", "aa_standard_dwbox", ev, max(0.0, 0.25 + shift)),
                 _row("vanilla", "whitebox_eot", "aa_rand", ev, max(0.0, 0.35 + shift)),
                 _row("vanilla", "dwbox_c1", "pgd", ev, 0.01),  # paper 2's fixed configuration: no stage
                 _row("addt", "whitebox_eot", "pgd", ev, max(0.0, 0.45 + shift)),
                 _row("addt", "dwbox", "pgd", ev, 0.45, n=256)]
    return pd.DataFrame(rows)


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


COSTS = [dict(defense="vanilla", threat="linf", setting="dwbox", attack="pgd", steps=20, calls_per_image=154.0,
              unet_calls_per_image=132.0, calls_upper_bound=False),
         dict(defense="vanilla", threat="linf", setting="dwbox", attack="aa_standard_dwbox", steps=10,
              calls_per_image=1106.0, unet_calls_per_image=948.0, calls_upper_bound=True)]


def _cells(t, defense, evaluation):
    return t[(t["defense"] == defense) & (t["evaluation"] == evaluation)]


def test_stage_order_and_absent_stages():
    t = waterfall_table(_main(), COSTS, defenses=["vanilla", "addt"])
    assert list(dict.fromkeys(t["defense"])) == ["vanilla", "addt", "undefended"]  # others after, in table order
    assert set(t["evaluation"]) == {"single", "worst"}  # mean and vote are not in the waterfall
    v = _cells(t, "vanilla", "single")
    assert list(v["stage"]) == ["BPDA", "white-box", "White-box-EOT", "DW-box", "AutoAttack", "DiffHammer",
                                "low-frequency", STRONGEST]
    assert list(v["stage_index"]) == sorted(v["stage_index"])
    a = _cells(t, "addt", "worst")
    assert list(a["stage"]) == ["White-box-EOT", "DW-box", STRONGEST]  # no BPDA, AutoAttack, ... rows
    assert "DiffAttack" not in set(t["stage"]) and "surrogate" not in set(t["stage"])
    assert "dwbox_c1" not in set(t["setting"])  # a run no stage holds is left out
    assert STAGES.index("BPDA") < STAGES.index("DW-box") < STAGES.index("AutoAttack") < STAGES.index("DiffHammer") \
        < STAGES.index("low-frequency") == len(STAGES) - 1


def test_stage_map():
    assert stage_of("pgd", "whitebox_eot") == "White-box-EOT"
    assert stage_of("pgd", "dwbox") == "DW-box"
    assert stage_of("pgd", "none") == "white-box"
    assert {stage_of(a, "dwbox") for a in ("aa_standard_dwbox", "aa_standard_multieval", "aa_rand")} == {"AutoAttack"}
    assert stage_of("bpda", "dwbox") == "BPDA" and stage_of("surrogate", "whitebox_eot") == "surrogate"
    assert stage_of("lowfreq", "whitebox_eot") == stage_of("lowfreq", "dwbox") == "low-frequency"
    assert stage_of("pgd", "dwbox_c3") is None


def test_strongest_known_is_the_minimum_and_names_its_attack():
    t = waterfall_table(_main(), COSTS)
    s = _cells(t, "vanilla", "single")
    best = s[s["stage"] == STRONGEST].iloc[0]
    stages = s[s["stage"] != STRONGEST]
    assert best["robust_accuracy"] == stages["robust_accuracy"].min() == 0.20
    assert (best["attack"], best["setting"], best["from_stage"]) == ("pgd", "dwbox", "DW-box")
    w = _cells(t, "vanilla", "worst")
    best_w = w[w["stage"] == STRONGEST].iloc[0]
    assert best_w["robust_accuracy"] == pytest.approx(0.05)  # worst of N: the AutoAttack protocol aa_standard_dwbox (0.25 - 0.2)
    assert (best_w["attack"], best_w["from_stage"]) == ("aa_standard_dwbox", "AutoAttack")
    # a tie goes to the earliest stage: addt is 0.45 under White-box-EOT and DW-box (single)
    a = _cells(t, "addt", "single")
    assert a[a["stage"] == STRONGEST].iloc[0]["from_stage"] == "White-box-EOT"


def test_single_and_worst_kept_apart_and_stage_keeps_its_strongest_run():
    t = waterfall_table(_main(), COSTS)
    aa = t[(t["defense"] == "vanilla") & (t["stage"] == "AutoAttack")].set_index("evaluation")
    assert aa.loc["single", "robust_accuracy"] == 0.25 and aa.loc["worst", "robust_accuracy"] == pytest.approx(0.05)
    assert aa.loc["single", "attack"] == "aa_standard_dwbox" and aa.loc["single", "runs"] == 2
    wb = t[(t["defense"] == "undefended") & (t["stage"] == "white-box")].set_index("evaluation")
    assert wb.loc["single", "setting"] == "none" and wb.loc["single", "runs"] == 1  # the classifier's PGD
    v = _cells(t, "vanilla", "single").set_index("stage")
    assert v.loc["white-box", "drop_from_previous"] == pytest.approx(0.10)  # BPDA 0.60 -> white-box 0.50
    assert pd.isna(v.loc["BPDA", "drop_from_previous"])


def test_intervals_images_steps_and_calls_are_carried():
    main = _main()
    t = waterfall_table(main, COSTS)
    dw = t[(t["defense"] == "vanilla") & (t["stage"] == "DW-box") & (t["evaluation"] == "single")].iloc[0]
    src = main[(main["defense"] == "vanilla") & (main["setting"] == "dwbox") & (main["attack"] == "pgd")
               & (main["evaluation"] == "single")].iloc[0]
    assert (dw["n_images"], dw["ci_low"], dw["ci_high"]) == (256, src["ci_low"], src["ci_high"])
    assert (dw["steps"], dw["calls_per_image"], dw["network_calls"]) == (20, 154.0, 154.0 * 256)
    aa = t[(t["stage"] == "AutoAttack") & (t["evaluation"] == "worst")].iloc[0]
    assert aa["calls_upper_bound"] == True and aa["steps"] == 10  # noqa: E712 - object column
    addt = t[(t["defense"] == "addt") & (t["stage"] == "DW-box")].iloc[0]
    assert pd.isna(addt["calls_per_image"]) and pd.isna(addt["steps"])  # no cost row: left empty, not guessed


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


def test_table_and_figure_files(tmp_path):
    from dbprepro.paper1.waterfall_figure import fig_waterfall

    main_csv = tmp_path / "p1_table_main.csv"
    _main().to_csv(main_csv, index=False)
    csv, md = tmp_path / "waterfall.csv", tmp_path / "waterfall.md"
    written = write_waterfall_table(main_csv, csv, md, COSTS, ["vanilla", "addt"])
    back = pd.read_csv(csv)
    assert len(back) == len(written) and list(back["stage"])[:2] == ["BPDA", "white-box"]
    assert "strongest known" in md.read_text()
    png, pdf = tmp_path / "waterfall.png", tmp_path / "waterfall.pdf"
    fig_waterfall(csv, png, pdf, confidence=0.95)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"


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
