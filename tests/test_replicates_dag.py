"""Replicate training seeds in the DAG (workflow/rules/replicates.smk): a module per extra seed."""

import re
import shutil

import pandas as pd
import pytest

from smoke import ROOT, SMOKE, job_counts, snakemake

REPLICATES = [str(ROOT / "config.yaml"), str(ROOT / "config" / "replicates.yaml")]


def test_replicates_dag_reruns_only_the_claims_inputs_per_extra_seed(tmp_path):
    r = snakemake(tmp_path, "-n", configfiles=REPLICATES)
    assert r.returncode == 0, r.stderr
    jobs = job_counts(r.stdout + r.stderr)
    main = job_counts(snakemake(tmp_path, "-n", configfiles=[str(ROOT / "config.yaml")]).stdout)
    for seed in (1, 2):
        own = {k.split("__", 1)[1]: v for k, v in jobs.items() if k.startswith(f"replicate_seed{seed}__")}
        # the seed's own models and every input of its claims table, nothing else (no figures, no sanity)
        assert own["train_classifier"] == own["train_diffusion"] == own["table_claims"] == 1
        assert own["train_addt"] == main["train_addt"] and own["attack"] == main["attack"]
        assert not {"prepare_data", "all", "sanity", "table_p1_main", "paper_vs_reproduced"} & set(own)
        assert not any(k.startswith("figure") for k in own)
    assert "replicate_seed0__train_classifier" not in jobs  # seed 0 is the main run
    assert jobs["table_claims_replicates"] == 1 and jobs["prepare_data"] == 1
    assert {k: v for k, v in jobs.items() if not k.startswith("replicate_")} == {**main, "table_claims_replicates": 1}
    out = r.stdout
    assert "results/replicates/seed2/models/classifier" in out and "logs/replicates/seed1/train_classifier.log" in out


def test_replicates_share_downloaded_models_at_paper_scale(tmp_path):
    """config/cifar10.yaml downloads the classifier and the DDPM: an extra seed retrains only the
    ADDT variants, on the shared downloads (nothing is downloaded twice)."""
    configs = [str(ROOT / "config.yaml"), str(ROOT / "config" / "cifar10.yaml"), str(ROOT / "config" / "replicates.yaml")]
    r = snakemake(tmp_path, "-n", configfiles=configs)
    assert r.returncode == 0, r.stderr
    jobs = job_counts(r.stdout + r.stderr)
    own = {k.split("__", 1)[1] for k in jobs if k.startswith("replicate_seed1__")}
    assert "train_addt" in own and not {"train_classifier", "train_diffusion"} & own
    assert not any(k.startswith("download") for k in own) and jobs["download_diffusion"] == 1
    assert "results/replicates/seed1/models/diffusion/vanilla" not in r.stdout


@pytest.mark.slow
def test_smoke_replicates_run_end_to_end(smoke_run, tmp_path):
    """Seeds [0, 1] at smoke size on a copy of the smoke run: seed 0 is that run (nothing of it
    reruns), seed 1 retrains its models and reruns its claims' inputs."""
    work = tmp_path / "run"
    shutil.copytree(smoke_run, work, symlinks=True)
    configs = [*SMOKE, str(ROOT / "config" / "smoke_replicates.yaml")]
    r = snakemake(work, "--show-failed-logs", configfiles=configs, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    ran = job_counts(r.stdout + r.stderr)
    assert set(ran) - {"all", "table_claims_replicates"} == {k for k in ran if k.startswith("replicate_seed1__")}
    table = pd.read_csv(work / "results" / "tables" / "claims_replicates.csv")
    seed0 = pd.read_csv(work / "results" / "tables" / "claims.csv").set_index("claim_id")
    seed1 = pd.read_csv(work / "results" / "replicates" / "seed1" / "tables" / "claims.csv").set_index("claim_id")
    assert list(table["claim_id"]) == list(seed0.index)
    t = table.set_index("claim_id")
    assert (t["estimate_seed0"] - seed0["estimate"]).abs().max() < 1e-9
    assert (t["estimate_seed1"] - seed1["estimate"]).abs().max() < 1e-9
    assert (t["n_holds"] == (seed0["verdict"] == "holds").astype(int) + (seed1["verdict"] == "holds").astype(int)).all()
    assert set(t["verdict"]) <= {"holds", "contradicted", "suggestive", "not significant"}
    assert t["p_value"].dropna().between(0, 1).all() and (t["n_seeds"] == 2).all()
    # seed 1 trained its own models (its seed in their provenance) on the shared data split
    prov = (work / "results" / "replicates" / "seed1" / "provenance" / "train_classifier.json").read_text()
    assert re.search(r'"seed": 1\b', prov)
    assert not (work / "results" / "replicates" / "seed1" / "data").exists()
    r = snakemake(work, "-n", configfiles=configs)
    assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr, r.stdout + r.stderr
