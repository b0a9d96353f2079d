"""profiles/slurm end to end: the smoke DAG submitted through sbatch to a real SLURM cluster.

In CI that cluster is the single node set up by ``scripts/slurm_local.sh`` (run by ``.ci/run``); the
profile is used as shipped except for the few values in ``LOCAL_OVERRIDES`` below. It builds
``SLURM_TARGETS`` (every kind of heavy job, a merge and a table); every file it writes must be the local
run's (fixture ``smoke_run``, heavy jobs in warm workers) byte for byte, and ``dbprepro compare-runs``
must report every table and attack run identical.
"""

import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from smoke import ROOT, snakemake

PROFILE = ROOT / "profiles" / "slurm" / "profile.yaml"

# What a single-node test cluster without accounting needs changed in profiles/slurm/profile.yaml.
# Everything else (executor, partitions, per-rule GPU routing, retries, jobs, logdir, ...) is used
# as shipped; the partitions can be renamed for another test cluster through the environment.
LOCAL_OVERRIDES = {
    "slurm-no-account": True,  # no accounts on the test cluster (also: slurm_account removed below)
    "slurm-status-command": "squeue",  # accounting disabled: sacct has no data
    "slurm-keep-successful-logs": True,  # the test reads every job's SLURM log
    "slurm-init-seconds-before-status-checks": 2,  # default 40 s is for real queues, not 30 s jobs
    "seconds-between-status-checks": 2,
}
# default-resources keys removed: the placeholder account CHANGE_ME would be refused (and
# --slurm-no-account does not remove an account given as a resource in plugin 2.8.0).
DROP_DEFAULT_RESOURCES = ("slurm_account",)
# What the sbatch run builds: every kind of heavy job (data, classifier, DDPM, the ADDT variants, clean evaluations of
# every defense, attack shards) and the local ones (merge, a table), 26 of the smoke DAG's 241 jobs; the whole DAG
# through sbatch took 13 of CI's 33 minutes and proves nothing more about submission (issue 26)
SLURM_TARGETS = ("results/tables/clean_accuracy.csv", "results/attacks/vanilla/linf/whitebox/pgd/records.parquet",
                 "results/attacks/addt/linf/dwbox/pgd/records.parquet")
PARTITION_ENV = {"cpu": "DBPREPRO_TEST_SLURM_CPU_PARTITION", "gpu": "DBPREPRO_TEST_SLURM_GPU_PARTITION"}


def rules_declared():
    """Rule name -> (threads, needs a GPU, localrule), read from workflow/rules/*.smk."""
    rules = {}
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text()
        heads = list(re.finditer(r"^\s*rule (\w+):", text, re.M))
        for head, nxt in zip(heads, heads[1:] + [None]):
            body = text[head.end(): nxt.start() if nxt else len(text)]
            threads = re.search(r"^\s*threads:\s*(\d+)", body, re.M)
            rules[head.group(1)] = (int(threads.group(1)) if threads else 1,
                                    re.search(r"^\s*gpu=1,", body, re.M) is not None,
                                    re.search(r"^\s*localrule:\s*True", body, re.M) is not None)
    return rules


def local_profile(directory: Path) -> dict:
    """profiles/slurm with LOCAL_OVERRIDES applied, written to ``directory``/profile.yaml."""
    profile = yaml.safe_load(PROFILE.read_text())
    for key in DROP_DEFAULT_RESOURCES:
        profile["default-resources"].pop(key)
    profile.update(LOCAL_OVERRIDES)
    shipped = {"cpu": profile["default-resources"]["slurm_partition"],
               "gpu": profile["set-resources"]["attack"]["slurm_partition"]}
    for kind, env in PARTITION_ENV.items():
        if os.environ.get(env):
            if kind == "cpu":
                profile["default-resources"]["slurm_partition"] = os.environ[env]
            else:
                for res in profile["set-resources"].values():
                    if res.get("slurm_partition") == shipped["gpu"]:
                        res["slurm_partition"] = os.environ[env]
    directory.mkdir(parents=True)
    (directory / "profile.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return profile


def test_profile_sends_every_gpu_rule_to_the_gpu_partition():
    profile = yaml.safe_load(PROFILE.read_text())
    gpu_rules = {name for name, (_, gpu, _) in rules_declared().items() if gpu}
    assert {"attack", "train_diffusion", "train_addt", "evaluate_clean"} <= gpu_rules
    gpu_partition = profile["set-resources"]["attack"]["slurm_partition"]
    routed = {rule for rule, res in profile["set-resources"].items()
              if res.get("slurm_partition") == gpu_partition}
    assert routed == gpu_rules, f"missing: {gpu_rules - routed}, not a GPU rule: {routed - gpu_rules}"
    assert profile["default-resources"]["slurm_partition"] != gpu_partition
    assert profile["executor"] == "slurm" and profile["slurm-logdir"] == "logs/slurm"
    for res in [profile["default-resources"], *profile["set-resources"].values()]:
        assert "runtime" not in res or re.fullmatch(r"\d+[mhd]", str(res["runtime"])), res


def test_default_profile_never_selects_slurm():
    profile = yaml.safe_load((ROOT / "profiles" / "default" / "profile.yaml").read_text())
    assert "executor" not in profile and not any(k.startswith("slurm") for k in profile)
    assert "default-resources" not in profile and "resources" not in profile


@pytest.fixture(scope="session")
def slurm_cluster():
    """Skip without SLURM on a developer machine; in CI (CI=true) a missing cluster is a failure."""
    missing = [tool for tool in ("sbatch", "sinfo", "squeue", "scontrol") if shutil.which(tool) is None]
    if missing:
        msg = (f"SLURM client tools not found ({', '.join(missing)}); "
               "set up a local cluster with: sudo bash scripts/slurm_local.sh")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {msg}")
        pytest.skip(msg)
    r = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip(), (
        f"sinfo failed (is slurmctld running? sudo bash scripts/slurm_local.sh): {r.stderr}")
    return r.stdout


def scontrol_jobs(run_id: str) -> list[dict]:
    """`scontrol show job` records (one dict per job) of the jobs named ``run_id``."""
    r = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    jobs = []
    for line in r.stdout.splitlines():
        fields = dict(re.findall(r"(?:^|\s)([A-Za-z/:]+)=(\S*)", line))
        if fields.get("JobName") == run_id:
            jobs.append(fields)
    return jobs


@pytest.mark.slow
def test_smoke_dag_through_sbatch_reproduces_local_run(slurm_cluster, smoke_run, tmp_path):
    profile = local_profile(tmp_path / "profile")
    cpu_part = profile["default-resources"]["slurm_partition"]
    gpu_part = profile["set-resources"]["attack"]["slurm_partition"]
    for part in (cpu_part, gpu_part):
        assert re.search(rf"^{re.escape(part)}\*? ", slurm_cluster, re.M), (
            f"partition {part!r} not in sinfo:\n{slurm_cluster}\n"
            f"create it (scripts/slurm_local.sh) or set {PARTITION_ENV['cpu']}/{PARTITION_ENV['gpu']}")

    workdir = tmp_path / "run"
    r = snakemake(workdir, *SLURM_TARGETS, "--workflow-profile", str(tmp_path / "profile"), timeout=3600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    assert "Using workflow specific profile" in out and str(tmp_path / "profile") in out

    # every non-local job went through sbatch exactly once (no retry, nothing run locally)
    declared = rules_declared()
    stats = out[out.index("Job stats"):].splitlines()[3:]
    planned = Counter()
    for line in stats:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        planned[parts[0]] = int(parts[1])
    remote = Counter({rule: n for rule, n in planned.items() if rule != "all" and not declared[rule][2]})
    assert remote["attack"] >= 2 and remote["train_diffusion"] == 1 and remote["prepare_data"] == 1
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.", out)
    assert len(submitted) == sum(remote.values()), (len(submitted), remote)

    run_id = re.search(r"SLURM run ID: (\S+)", out).group(1)
    jobs = scontrol_jobs(run_id)
    assert sorted(j["JobId"] for j in jobs) == sorted(jid for jid, _ in submitted), (
        "scontrol does not list every submitted job (MinJobAge too low?)")
    slurm_logdir = workdir / "logs" / "slurm"
    seen = Counter()
    for job in jobs:
        log = Path(job["StdOut"])
        rule = log.relative_to(slurm_logdir).parts[0].removeprefix("rule_")
        threads, gpu, _ = declared[rule]
        seen[rule] += 1
        where = f"SLURM job {job['JobId']} ({rule}): {job}"
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", where
        assert job["Comment"].startswith(f"rule_{rule}"), where
        assert job["WorkDir"] == str(workdir), where
        assert int(job["NumCPUs"]) == threads, where  # --cpus-per-task = the rule's threads
        if gpu:
            assert job["Partition"] == gpu_part and job.get("TresPerJob") == "gres:gpu:1", where
        else:
            assert job["Partition"] == cpu_part and "gpu" not in job.get("TresPerJob", ""), where
        # the per-job SLURM log (kept) shows the job step running this very rule
        text = log.read_text()
        assert f"rule {rule}:" in text and "Finished job" in text, where
    assert seen == remote, (seen, remote)

    # every file the cluster run wrote is the local run's (warm workers), to the byte: data, models, evaluations,
    # attack shards and merged runs, the table
    # (not the resume checkpoints of training: torch.save names its zip records after the temporary file, and the
    # training history in them has wall-clock seconds; the models they lead to are compared)
    produced = [p for p in (workdir / "results").rglob("*") if p.is_file()
                and p.relative_to(workdir / "results").parts[0] not in ("provenance", "benchmarks", "checkpoints")]
    assert len(produced) >= 20 and any(p.name == "clean_accuracy.csv" for p in produced), produced
    differ = [str(p.relative_to(workdir)) for p in produced
              if p.read_bytes() != (smoke_run / p.relative_to(workdir)).read_bytes()]
    assert not differ, f"files differ between the local and the SLURM run: {differ}"
    # and the reproduction check says so (dbprepro compare-runs), on the local run's copy of what the cluster ran
    from dbprepro.cli import main

    recorded = tmp_path / "recorded" / "results"
    for p in produced:
        rel = p.relative_to(workdir / "results")
        if rel.parts[0] in ("tables", "attacks"):
            (recorded / rel).parent.mkdir(parents=True, exist_ok=True)
            (recorded / rel).symlink_to(smoke_run / "results" / rel)
    report = tmp_path / "reproduction"
    assert main(["compare-runs", str(recorded), str(workdir / "results"), "--out", str(report), "--quiet"]) == 0
    summary = pd.read_csv(report / "compare.csv")
    assert set(summary["section"]) == {"table", "attack run"}, summary
    assert summary["status"].eq("identical").all(), summary[summary.status != "identical"]
