"""The DAG itself: lint, dry runs, config refusal, and a real run of the smoke configuration."""

import re

import pandas as pd
import pytest

from smoke import ROOT, job_counts, snakemake


def test_lint_is_clean(tmp_path):
    r = snakemake(tmp_path, "--lint")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "good condition" in r.stdout + r.stderr


def test_default_dag_resolves(tmp_path):
    r = snakemake(tmp_path, "-n", configfiles=[str(ROOT / "config.yaml")])
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    for rule in ("prepare_data", "train_classifier", "train_diffusion", "evaluate_clean", "table_clean_accuracy"):
        assert rule in out


def test_one_figure_target_builds_only_what_it_needs(tmp_path):
    r = snakemake(tmp_path, "-n", "results/figures/p1_fig1_attack_trajectories.png")
    assert r.returncode == 0, r.stderr
    jobs = job_counts(r.stdout + r.stderr)
    assert jobs["figure_p1_fig1_attack_trajectories"] == 1 and jobs["train_diffusion"] == 1
    # three settings x 2 shards of PGD on vanilla, nothing of other figures, tables or defenses
    assert jobs["attack"] == 6 and jobs["merge_attack"] == 3
    for unrelated in ("train_addt", "table_p1_main", "evaluate_clean", "loss_landscape", "all"):
        assert unrelated not in jobs


def test_invalid_config_stops_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("purification:\n  t_star: 100\n")
    r = snakemake(tmp_path / "work", configfiles=[str(ROOT / "config.yaml"), str(bad)])
    assert r.returncode != 0
    assert "purification.t_star" in r.stderr
    assert not (tmp_path / "work" / "results").exists()


@pytest.mark.slow
def test_smoke_dag_runs_and_is_idempotent(smoke_run):
    """The smoke DAG end to end.  That a second run from scratch writes byte-identical tables is
    tested by tests/test_slurm.py, which reruns this DAG through sbatch against this run."""
    first = smoke_run
    table = pd.read_csv(first / "results" / "tables" / "clean_accuracy.csv")
    assert set(table["setting"]) == {"classifier", "random", "fixed"}
    assert table["accuracy"].between(0, 1).all()
    assert (table["ci_low"] <= table["accuracy"]).all() and (table["accuracy"] <= table["ci_high"]).all()
    # the smoke classifier is trained for real: far above the 10 % of guessing
    assert float(table.loc[table.setting == "classifier", "accuracy"].iloc[0]) > 0.6
    # progress bars and the stage's own log lines land in the rule logs
    log = (first / "logs" / "train_diffusion.log").read_text()
    assert re.search(r"ddpm:\s+\d+%\|", log), log[-2000:]  # a tqdm bar of the training loop
    assert "stage train_diffusion finished" in log
    for name in ("p1_table_main.csv", "p1_table_ablation.csv", "addt_training.csv"):
        assert (first / "results" / "tables" / name).stat().st_size > 0
    main = pd.read_csv(first / "results" / "tables" / "p1_table_main.csv")
    assert {"whitebox", "whitebox_eot", "dwbox", "none"} <= set(main["setting"])
    assert {"pgd", "bpda", "aa_standard_dwbox", "aa_standard_multieval", "aa_rand"} <= set(main["attack"])
    # the three AutoAttack protocols are separate rows, each in its own setting
    aa = main[main["attack"].str.startswith("aa_") & (main["evaluation"] == "single")]
    assert sorted(map(tuple, aa[["attack", "setting"]].drop_duplicates().values.tolist())) == [
        ("aa_rand", "whitebox_eot"), ("aa_standard_dwbox", "dwbox"), ("aa_standard_multieval", "whitebox")]
    assert main["robust_accuracy"].between(0, 1).all()
    for fig in ("p1_fig1_attack_trajectories", "p1_fig2_loss_landscape", "p1_fig3_robustness_bars", "p1_fig5_rbgm"):
        for ext in ("png", "pdf"):
            assert (first / "results" / "figures" / f"{fig}.{ext}").stat().st_size > 1000
    # paper 1's other families: every family x weights row, attacked in both settings
    fam = pd.read_csv(first / "results" / "tables" / "p1_table_families.csv")
    # (ddim: a registered family, in config.yaml's families.names like the others)
    assert fam[["family", "weights"]].values.tolist() == [["ddpm", "vanilla"], ["ddpm", "addt"], ["ddim", "vanilla"],
                                                         ["ddim", "addt"], ["vpsde", "vanilla"], ["vpsde", "addt"],
                                                         ["edm", "vanilla"], ["edm", "addt"]]
    assert fam[["robust_whitebox_eot", "robust_dwbox"]].notna().all().all()
    assert fam.loc[fam.family != "ddpm", "n_images_dwbox"].eq(16).all()
    # attacks.dwbox_n_images (24) in the main sampler's DW-box PGD runs, attacks.n_images (16) elsewhere
    assert fam.loc[fam.family == "ddpm", "n_images_dwbox"].eq(24).all()
    assert fam["n_images_whitebox_eot"].eq(16).all()
    pgd = main[(main.attack == "pgd") & (main.evaluation == "single")].set_index(["defense", "setting"])["n_images"]
    assert {k for k, v in pgd.items() if v == 24} == {("vanilla", "dwbox"), ("addt", "dwbox"),
                                                      ("clean_finetune", "dwbox")}
    assert pgd[("vanilla", "whitebox_eot")] == pgd[("undefended", "none")] == 16  # (dwbox_c1: paper 2's table)
    beyond = main[main.attack != "pgd"]
    assert beyond.loc[beyond.defense != "gdmp", "n_images"].eq(16).all()
    # the competing defenses (competitors.n_images: adbm 16, gdmp 9) in every run, DW-box PGD included
    assert beyond.loc[beyond.defense == "gdmp", "n_images"].eq(9).all() and pgd[("gdmp", "dwbox")] == 9
    assert pgd[("adbm", "dwbox")] == 16
    abl = pd.read_csv(first / "results" / "tables" / "p1_table_ablation.csv").set_index("defense")
    main_sampler = abl["family"] == "ddpm"
    assert abl.loc[main_sampler, "n_images_dwbox"].eq(24).all() and abl.loc["addt", "n_images_whitebox_eot"] == 16
    assert abl.loc[~main_sampler, "n_images_dwbox"].eq(16).all()  # the families: families.n_images
    # paper 2 pairs the 24-image dwbox run with 16-image runs on the first analysis.n_images (16) images
    fixed = pd.read_csv(first / "results" / "tables" / "p2_table_fixed_randomness.csv")
    assert fixed["row"].tolist() == ["undefended", "random", "fixed_c0", "fixed_c1", "fixed_mean"]
    assert fixed["n_images"].eq(16).all()
    models = pd.read_csv(first / "results" / "tables" / "p2_compression_models.csv")
    assert models["n_images"].eq(16).all()
    assert len(pd.read_csv(first / "results" / "tables" / "p2_compression.csv")) == 2 * 16  # 2 configurations
    assert (first / "results" / "models" / "diffusion" / "edm_addt").is_dir()  # EDM's own ADDT loss
    assert not (first / "results" / "models" / "diffusion" / "vpsde_addt").exists()  # uses addt's weights
    assert not (first / "results" / "models" / "diffusion" / "ddim_addt").exists()
    modes = pd.read_csv(first / "results" / "tables" / "gradient_modes.csv")
    assert set(modes["family"]) == {"ddpm", "ddim", "vpsde", "edm"}
    exact_equal = modes[modes.grad_mode.isin(["autograd", "checkpoint"])]
    assert (exact_equal["rel_error_vs_exact"] < 1e-5).all()
    assert set(modes.loc[modes.grad_mode == "adjoint", "family"]) == {"vpsde"}
    # every testable claim as a verdict (dbprepro.claims; its statistics: tests/test_claims_stats.py)
    claims = pd.read_csv(first / "results" / "tables" / "claims.csv")
    assert {"p1_dwbox_stronger_vanilla_linf", "p1_addt_gain_addt_dwbox_linf", "p1_addt_gain_addt_whitebox_eot_linf",
            "p1_ablation_clean_finetune_linf", "p1_exact_vs_bpda_linf", "p2_claim1_purified_adv_linf",
            "p2_claim1_purified_adv_l2", "p2_claim2_randomness", "p2_claim3_fixed_randomness",
            "p2_claim4_within", "p2_claim4_across"} <= set(claims["claim_id"])
    assert set(claims["verdict"]) <= {"holds", "contradicted", "suggestive", "not significant"}
    assert set(claims["verdict_raw"]) <= {"holds", "not significant", "contradicted"}
    assert claims["p_value"].dropna().between(0, 1).all() and (claims["p_holm"].dropna() >= claims["p_value"].dropna()).all()
    assert claims.loc[claims.verdict != "not significant", "mde"].isna().all()
    # ADBM and GDMP end to end (issue 27): trained (adbm), clean-evaluated, in the waterfall, the battery, the claims
    assert (first / "results" / "models" / "diffusion" / "adbm").is_dir()
    assert {"adbm", "gdmp"} <= set(table["defense"])
    assert {"competitor_worst_adbm_vs_addt_linf", "competitor_worst_gdmp_vs_addt_linf",
            "competitor_worst_adbm_vs_gdmp_linf", "gdmp_bpda_vs_exact_whitebox_eot_linf"} <= set(claims["claim_id"])
    assert {"adbm", "gdmp"} <= set(pd.read_csv(first / "results" / "tables" / "waterfall.csv")["defense"])
    assert {"adbm", "gdmp"} <= set(pd.read_csv(first / "results" / "tables" / "sanity.csv")["defense"])
    assert (first / "results" / "tables" / "claims.md").stat().st_size > 0
    # a second run right after the first has nothing to do
    r = snakemake(first, "-n")
    assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr, r.stdout + r.stderr
