"""ADBM and GDMP as defenses of the DAG (issue 27): the typed experiment, the refusals of validate-config,
the claims rows and the results document's section."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dbprepro.claims.base import RunData
from dbprepro.claims.competitors import competitor_claims
from dbprepro.claims.table import claims_table
from dbprepro.config import ConfigError, Experiment, deep_merge, load_yaml, validate_config

ROOT = Path(__file__).resolve().parents[1]


def default(**overrides):
    return validate_config(deep_merge(load_yaml(ROOT / "config.yaml"), overrides))


def test_the_default_evaluates_adbm_and_gdmp_with_their_own_samplers_on_their_own_weights():
    exp = Experiment.from_config(default())
    adbm, gdmp = exp.defense("adbm"), exp.defense("gdmp")
    assert (adbm.sampler, adbm.weights, adbm.finetune, adbm.trains) == ("adbm", "adbm", "adbm", True)
    assert (gdmp.sampler, gdmp.weights, gdmp.finetune, gdmp.trains) == ("gdmp", "vanilla", None, False)
    assert exp.purification("adbm")["sampler"] == "adbm" and exp.purification("gdmp")["sampler"] == "gdmp"
    assert "adbm" in exp.trained_defenses and exp.finetune_family("adbm") == "ddpm"  # rule train_addt, variant adbm


def test_every_waterfall_attack_of_addt_runs_on_the_competitors_on_their_first_images():
    cfg = default()
    exp = Experiment.from_config(cfg)
    runs = exp.attack_runs()
    kinds = {d: {(r.setting, r.attack) for r in runs if r.defense == d} for d in ("addt", "adbm", "gdmp")}
    assert kinds["addt"] <= kinds["adbm"] and kinds["addt"] <= kinds["gdmp"]
    n = cfg["competitors"]["n_images"]
    for r in runs:
        if r.defense in ("adbm", "gdmp"):  # DW-box PGD too: the paired comparisons need the same images
            assert exp.attack_n_images(r.defense, r.setting, r.attack) == min(n[r.defense], cfg["attacks"]["n_images"])
    assert exp.sanity_n_images("gdmp") == min(cfg["sanity"]["n_images"], n["gdmp"])
    assert exp.sanity_n_images("addt") == cfg["sanity"]["n_images"]


def test_without_competitors_the_adbm_variant_is_the_ddpm_chain_on_its_weights():
    exp = Experiment.from_config(default(competitors={"names": [], "n_images": {}}))
    assert exp.defense("adbm").sampler == "ddpm" and not exp.defense("adbm").competitor
    assert "gdmp" not in exp.defenses


REFUSED = [
    (dict(addt={"variants": ["addt"]}), "competitors.names"),  # adbm without its fine-tune trained
    (dict(addt={"enabled": False}, families={"addt": False}), "competitors.names"),  # families.addt refuses first
    (dict(competitors={"names": ["gdmp"], "n_images": {"gdmp": 8}}, families={"names": ["ddim", "gdmp"]}),
     "competitors.names"),
    (dict(competitors={"n_images": {"gdmp": 65}}), "competitors.n_images.gdmp"),
    (dict(competitors={"threat_models": ["l2"]}), "competitors.threat_models"),
    (dict(competitors={"names": ["ddim"]}), "competitors.names"),
    (dict(purification={"adbm": {"steps": 101}}), "purification.adbm.steps"),
]


@pytest.mark.parametrize("overrides,key", REFUSED)
def test_validate_config_refuses_what_cannot_run_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        default(**overrides)


def _records(defense, setting, attack, correct, threat="linf"):
    return pd.DataFrame(dict(defense=defense, threat=threat, setting=setting, attack=attack,
                             id=np.arange(len(correct)), correct_single=np.asarray(correct, float)))


def test_the_worst_case_claims_pair_by_image_over_the_shared_runs():
    n = 16
    rec = pd.concat([
        _records("addt", "whitebox_eot", "pgd", [1] * 8 + [0] * 8 + [1] * 4),  # 20 images: cut to the shared 16
        _records("addt", "whitebox_eot", "bpda", [1] * 6 + [0] * 14),
        _records("adbm", "whitebox_eot", "pgd", [1] * n),
        _records("adbm", "whitebox_eot", "bpda", [1] * 12 + [0] * 4),
        _records("adbm", "dwbox", "pgd", [0] * n),  # ADDT has no such run: not in the pair's worst case
        _records("gdmp", "whitebox_eot", "bpda", [1] * 10 + [0] * 6),
        _records("gdmp", "whitebox_eot", "pgd", [0] * 9 + [1] + [0] * 6),
    ], ignore_index=True)
    data = RunData(rec, pd.DataFrame(columns=["defense", "setting", "id", "correct"]))
    claims = {c.claim_id: c for c in competitor_claims(data, resamples=200)}
    assert set(claims) == {"competitor_worst_adbm_vs_addt_linf", "competitor_worst_gdmp_vs_addt_linf",
                           "competitor_worst_adbm_vs_gdmp_linf", "gdmp_bpda_vs_exact_whitebox_eot_linf"}
    res, va, vb = claims["competitor_worst_adbm_vs_addt_linf"].compute(data, 0)
    assert (va, vb) == (12 / 16, 6 / 16) and res.n == 16  # worst of pgd and bpda per image, on the 16 shared
    res, va, vb = claims["gdmp_bpda_vs_exact_whitebox_eot_linf"].compute(data, 0)
    assert (va, vb) == (10 / 16, 1 / 16) and res.estimate == pytest.approx(9 / 16)
    table = claims_table(list(claims.values()), data)
    row = table.set_index("claim_id").loc["gdmp_bpda_vs_exact_whitebox_eot_linf"]
    assert row["verdict"] in ("holds", "suggestive") and row["p_value"] < 0.01  # 9 discordant pairs, all one way


def test_without_the_competitors_runs_there_is_no_competitor_row():
    data = RunData(pd.concat([_records("addt", "dwbox", "pgd", [1, 0]), _records("vanilla", "dwbox", "pgd", [0, 0])]),
                   pd.DataFrame())
    assert competitor_claims(data) == []


def test_the_results_document_shows_the_competitor_rows(tmp_path):
    from dbprepro.claims.competitors import WHERE_BPDA, WHERE_WORST
    from dbprepro.results_doc import COMPETITOR_WHERE, render_results

    assert set(COMPETITOR_WHERE) == {WHERE_WORST, WHERE_BPDA}
    pd.DataFrame([dict(claim_id="p1_a", where="Table 1", claim="x", verdict="holds"),
                  dict(claim_id="competitor_worst_adbm_vs_addt_linf", where=WHERE_WORST, claim="y", verdict="holds"),
                  dict(claim_id="gdmp_bpda_vs_exact_whitebox_eot_linf", where=WHERE_BPDA, claim="z",
                       verdict="contradicted")]).to_csv(tmp_path / "claims.csv", index=False)
    section = render_results(tmp_path, "0" * 32 + ".dir").split("## How ADDT, ADBM and GDMP compare")[1]
    section = section.split("\n## ")[0]
    assert "competitor_worst_adbm_vs_addt_linf" in section and "gdmp_bpda_vs_exact" in section
    assert "| p1_a " not in section
