"""docs/results.md is generated from the recorded run's tables (dbprepro.results_doc), never typed."""

from pathlib import Path

import pandas as pd
import pytest

from dbprepro.cli import main
from dbprepro.results_doc import (SECTIONS, recorded_tables_hash, render_results, stamped_hash, tables_hash,
                                  write_results_doc)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results.md"
SNAPSHOT = ROOT / "docs" / "results_tables"
REPRODUCTION = ROOT / "docs" / "reproduction"  # the kept compare-runs check (dbprepro compare-runs --describe)
REPLICATES = ROOT / "docs" / "replicates"  # the replicate seeds' tables kept beside the recorded run
KNOWN_DVC_HASH = "40901a28ad303e6396563e3fcc50a39c.dir"  # `dvc add` of the folder of test_tables_hash_is_dvcs


def test_the_tables_copy_is_the_recorded_runs_and_the_document_is_what_they_render_to():
    """Every number of docs/results.md: a cell of the recorded run's tables (a typed or edited number fails)."""
    assert tables_hash(SNAPSHOT) == recorded_tables_hash(ROOT / "dvc.lock")
    assert DOC.read_text() == render_results(SNAPSHOT, recorded_tables_hash(ROOT / "dvc.lock"), REPRODUCTION,
                                             REPLICATES)


def test_tables_hash_is_dvcs(tmp_path):
    """The hash DVC 3 records for a folder (checked against a folder hashed by `dvc commit`, 2026-12-01)."""
    (tmp_path / "a.csv").write_text("x\n1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("| x |\n")
    assert tables_hash(tmp_path) == KNOWN_DVC_HASH


def test_docs_results_belongs_to_the_run_recorded_in_dvc_lock():
    """A new dvc.lock without `dbprepro results-doc` fails here: the document names the tables it shows."""
    assert stamped_hash(DOC.read_text()) == recorded_tables_hash(ROOT / "dvc.lock")


def test_docs_results_has_no_hand_written_text(tmp_path):
    """Outside its tables, docs/results.md is exactly the generator's template: no typed number or claim."""
    import shutil

    text = DOC.read_text()
    shutil.copy(SNAPSHOT / "claims.csv", tmp_path)  # the lead's prose counts the claims' rows
    empty = render_results(tmp_path, stamped_hash(text), REPRODUCTION, REPLICATES)  # every other table missing
    template = [line for line in empty.splitlines() if line != "(not in this run)" and not line.startswith("|")]
    prose = [line for line in text.splitlines() if not line.startswith("|")]
    assert prose == template
    assert all(f"`results/tables/{name}`" in text for _, name, _, _ in SECTIONS)


def _tables(folder: Path) -> None:
    rows = [dict(defense=d, threat="linf", setting="dwbox", attack="pgd", evaluation=ev, n_images=64,
                 clean_accuracy=0.9, robust_accuracy=acc, ci_low=0.1, ci_high=0.3, extra="hidden")
            for d, acc in (("vanilla", 0.1562), ("addt", 0.2969)) for ev in ("single", "worst", "mean")]
    main = pd.DataFrame(rows)
    main.loc[main["evaluation"] == "worst", "robust_accuracy"] = 0.0123
    main.to_csv(folder / "p1_table_main.csv", index=False)
    pd.DataFrame([dict(family="ddim", weights="vanilla", defense="ddim", robust_dwbox="0.1250")]).to_csv(
        folder / "p1_table_families.csv", index=False)


def test_rendering_shows_the_cells_of_the_tables_and_names_missing_ones(tmp_path):
    _tables(tmp_path)
    text = render_results(tmp_path, "0" * 32 + ".dir")
    single = text.split("## Paper 1: the same runs")[0]
    assert "0.1562" in single and "0.2969" in single and "0.0123" not in single  # one-shot rows only
    assert "0.0123" in text.split("## Paper 1: the same runs")[1].split("## Paper 1: ADDT")[0]
    assert "hidden" not in text  # only the listed columns
    assert "| ddim " in text and "0.1250" in text
    assert text.count("(not in this run)") == len(SECTIONS) - 3
    assert stamped_hash(text) == "0" * 32 + ".dir"


def test_the_cli_writes_it_and_refuses_without_tables(tmp_path, capsys):
    _tables(tmp_path)
    lock = tmp_path / "dvc.lock"
    lock.write_text("schema: '2.0'\nstages:\n  paper:\n    outs:\n    - path: results/tables\n"
                    "      md5: " + "a" * 32 + ".dir\n")
    out = tmp_path / "results.md"
    assert main(["results-doc", "--tables", str(tmp_path), "--lock", str(lock), "--out", str(out),
                 "--snapshot", ""]) == 0
    assert stamped_hash(out.read_text()) == "a" * 32 + ".dir"
    assert main(["results-doc", "--tables", str(tmp_path / "none"), "--lock", str(lock), "--out", str(out)]) == 2
    assert "no tables" in capsys.readouterr().err


def test_a_lock_without_tables_is_refused(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text("schema: '2.0'\nstages:\n  paper:\n    outs: []\n")
    with pytest.raises(ValueError, match="results/tables"):
        recorded_tables_hash(lock)


def test_the_snapshot_is_refused_for_tables_of_another_run_and_copied_for_the_recorded_one(tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    _tables(tables)
    lock = tmp_path / "dvc.lock"
    out, snap = tmp_path / "results.md", tmp_path / "snap"
    lock.write_text("schema: '2.0'\nstages:\n  paper:\n    outs:\n    - path: results/tables\n      md5: " + "b" * 32
                    + ".dir\n")
    with pytest.raises(ValueError, match="not the tables"):
        write_results_doc(tables, lock, out, snapshot=snap)
    assert not snap.exists() and not out.exists()
    lock.write_text(lock.read_text().replace("b" * 32 + ".dir", tables_hash(tables)))
    text = write_results_doc(tables, lock, out, snapshot=snap)
    assert tables_hash(snap) == tables_hash(tables) and render_results(snap, tables_hash(tables)) == text


def test_the_all_attacks_and_adaptive_claim_sections_keep_only_their_rows(tmp_path):
    from dbprepro.paper1.waterfall import ALL_ATTACKS, PGD_ONLY
    from dbprepro.results_doc import ADAPTIVE_WHERE

    last = {"vanilla": ALL_ATTACKS, "addt": ALL_ATTACKS, "ddim": PGD_ONLY}
    pd.DataFrame([dict(defense=d, threat="linf", evaluation=ev, stage=st if st else last[d], runs="pgd/dwbox",
                       n_images=64, n_runs=1, ensemble_robust_accuracy=f"0.{k}{i}{j}77", ci_low=0.1, ci_high=0.3,
                       strongest_run="pgd/dwbox" if not st else "", strongest_robust_accuracy=f"0.{k}{i}{j}55",
                       images_dropped=192)
                  for k, d in enumerate(("vanilla", "addt", "ddim")) for i, ev in enumerate(("single", "worst"))
                  for j, st in enumerate(("DW-box", None))]).to_csv(tmp_path / "waterfall.csv", index=False)
    pd.DataFrame([dict(claim_id="p1_a", where="Table 1", claim="x", verdict="holds"),
                  dict(claim_id="p1_addt_gain_ensemble_dwbox_linf", where=ADAPTIVE_WHERE[1], claim="y",
                       verdict="not significant")]).to_csv(tmp_path / "claims.csv", index=False)
    text = render_results(tmp_path, "0" * 32 + ".dir")
    headline = text.split("## Robust accuracy against all attacks")[1].split("\n## ")[0]
    assert headline.count("| vanilla ") == headline.count("| addt ") == 2  # single and worst
    assert "| ddim " not in headline  # PGD runs only: no claim about every attack
    # only the last rows (j = 1) of both evaluations (i) and waterfall defenses (k), with the strongest single run
    assert all(f"0.{k}{i}177" in headline and f"0.{k}{i}155" in headline for k in (0, 1) for i in (0, 1))
    assert not any(f"0.{k}{i}077" in headline for k in (0, 1) for i in (0, 1))
    adaptive = text.split("## Does ADDT's gain")[1].split("\n## ")[0]
    assert "p1_addt_gain_ensemble_dwbox_linf" in adaptive and "| p1_a " not in adaptive
    assert "| p1_a " in text.split("## Every testable claim")[1].split("\n## ")[0]
    single = text.split("## Robustness waterfall: robust against every attack so far")[1].split("\n## ")[0]
    assert "0.00077" in single and "0.01077" not in single  # the waterfall's one-shot rows only


def test_the_document_leads_with_the_family_wise_verdicts(tmp_path):
    rows = [("c_ns", "not significant", "0.2"), ("c_sug", "suggestive", "0.3"), ("c_hold", "holds", "0.001"),
            ("c_con", "contradicted", "0.002"), ("c_hold2", "holds", "0.004")]
    pd.DataFrame([dict(claim_id=c, where="Table 1", claim="x", estimate="0.1", p_holm=p, verdict=v)
                  for c, v, p in rows]).to_csv(tmp_path / "claims.csv", index=False)
    text = render_results(tmp_path, "0" * 32 + ".dir")
    lead = text.split("## Verdicts at the family-wise level")[1].split("\n## ")[0]
    assert text.index("## Verdicts at the family-wise level") < text.index("## Every testable claim")
    counts = {cells[0]: cells[1] for line in lead.splitlines() if line.startswith("| ")
              for cells in [[c.strip() for c in line.strip("|").split("|")]] if len(cells) == 2}
    assert counts == {"verdict": "claims", "holds": "2", "contradicted": "1", "suggestive": "1",
                      "not significant": "1"}  # counted from the table, not typed
    assert "c_hold" in lead and "c_con" in lead and "c_sug" not in lead and "c_ns" not in lead
    table = text.split("## Every testable claim")[1].split("\n## ")[0]
    order = [table.index(f"| {c} ") for c in ("c_hold", "c_hold2", "c_con", "c_sug", "c_ns")]
    assert order == sorted(order)  # holds, contradicted, suggestive, not significant; table order kept within


def test_the_kept_reproduction_check_is_of_the_recorded_run():
    """docs/reproduction (dbprepro compare-runs --describe): its recorded side is the run dvc.lock records, and
    the results doc shows it verbatim."""
    import json

    about = json.loads((REPRODUCTION / "about.json").read_text())
    assert about["recorded_tables_hash"] == recorded_tables_hash(ROOT / "dvc.lock")
    assert about["new_tables_hash"] != about["recorded_tables_hash"] or about["verdict"]
    report = (REPRODUCTION / "compare.md").read_text().rstrip()
    section = DOC.read_text().split("## Reproduction: the recorded run against another run of the same code")[1]
    assert report in section and f"Verdict: **{about['verdict']}**" in section


def test_a_reproduction_check_of_another_run_is_not_shown(tmp_path):
    import json

    (tmp_path / "compare.md").write_text("### Tables\n\nsecret 0.123\n")
    (tmp_path / "about.json").write_text(json.dumps(dict(recorded_tables_hash="1" * 32 + ".dir", new_tables_hash="x",
                                                         new_run="y", verdict="reproduced within noise")))
    text = render_results(tmp_path, "0" * 32 + ".dir", tmp_path)
    assert "secret 0.123" not in text and "of another recorded run" in text
    text = render_results(tmp_path, "1" * 32 + ".dir", tmp_path)
    assert "secret 0.123" in text and "Verdict: **reproduced within noise**" in text


def test_kept_replicate_tables_say_when_they_extended_an_earlier_recorded_run(tmp_path):
    import json

    pd.DataFrame([dict(claim_id="p1_x", estimate_seed0="0.5", n_holds="2", verdict="holds")]).to_csv(
        tmp_path / "claims_replicates.csv", index=False)
    about = dict(recorded_tables_hash="1" * 32 + ".dir", command="snakemake --configfile config/replicates.yaml",
                 main_seed=0, wall_seconds=1234, cores=2)
    (tmp_path / "about.json").write_text(json.dumps(about))
    shown = render_results(tmp_path / "none", "1" * 32 + ".dir", None, tmp_path)
    assert "| p1_x " in shown and "took 1234 s of wall time on 2 cores" in shown
    assert "earlier recorded run" not in shown
    tables = tmp_path / "tables"
    tables.mkdir()
    claims = pd.read_csv(SNAPSHOT / "claims.csv", dtype=str, keep_default_na=False)
    claims.to_csv(tables / "claims.csv", index=False)
    pd.DataFrame(dict(claim_id=["p1_x", *claims["claim_id"][:-1]], estimate_seed0="0.5", n_holds="2",
                      verdict="holds")).to_csv(tmp_path / "claims_replicates.csv", index=False)
    later = render_results(tables, "2" * 32 + ".dir", None, tmp_path)  # a newer recorded run: said so
    section = later.split("`results/tables/claims_replicates.csv`")[1]
    assert "| p1_x " in section and "extended an earlier recorded run" in section
    assert "`" + "1" * 32 + ".dir`" in section and f"(1): `{claims['claim_id'].iloc[-1]}`" in section



def test_the_kept_replicate_table_extends_the_recorded_run():
    """docs/replicates (the 3-seed run of config/replicates.yaml): the results doc shows its table with the
    measured wall time; when about.json names another run than dvc.lock's, the doc says so and which of the
    recorded run's claims the table lacks."""
    import json

    about = json.loads((REPLICATES / "about.json").read_text())
    assert about["seeds"] == [0, 1, 2] and about["wall_seconds"] > 0
    section = DOC.read_text().split("`results/tables/claims_replicates.csv`")[1].split("\n## ")[0]
    assert f"took {about['wall_seconds']} s of wall time" in section
    if about["recorded_tables_hash"] != recorded_tables_hash(ROOT / "dvc.lock"):
        assert "extended an earlier recorded run" in section and about["recorded_tables_hash"] in section
        have = set(pd.read_csv(REPLICATES / "claims_replicates.csv")["claim_id"])
        for claim in pd.read_csv(SNAPSHOT / "claims.csv")["claim_id"]:
            assert claim in have or f"`{claim}`" in section, claim
    else:
        assert "extended an earlier recorded run" not in section
    first = (REPLICATES / "claims_replicates.csv").read_text().splitlines()[1].split(",")[0]
    assert first in section
