"""The paper-scale configuration (config/cifar10.yaml) and its pinning rules.

- it validates against the schema, alone and overlaid on config.yaml (as Snakemake does), and the
  overlay leaks no digits-only value into the CIFAR-10 run;
- its dry run builds the same figure and table targets as the default;
- key values match the methods reference (paper 1's code, paper 2's rebuttal);
- unpinned files (sha256 / revision null) are refused unless allow_unpinned, and then go
  through trust on first use: plausibility checks, a record, later runs verified against it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dbprepro.config import ConfigError, deep_merge, load_yaml, unpinned_entries, validate_config

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def cifar_alone():
    return validate_config(load_yaml(ROOT / "config/cifar10.yaml"))


def cifar_overlay():
    return validate_config(deep_merge(load_yaml(ROOT / "config.yaml"), load_yaml(ROOT / "config/cifar10.yaml")))


def leaves(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from leaves(v, prefix + (k,))
        else:
            yield prefix + (k,)


# ------------------------------------------------------------------------------------ validation

def test_cifar10_config_is_valid_alone_and_overlaid():
    alone, overlay = cifar_alone(), cifar_overlay()
    assert alone["data"]["dataset"] == overlay["data"]["dataset"] == "cifar10"


def test_no_digits_setting_leaks_into_the_cifar10_run():
    # Snakemake loads config.yaml first and overlays --configfile key by key: every value the
    # default sets must be set again by cifar10.yaml, so the run equals cifar10.yaml alone.
    default, cifar = load_yaml(ROOT / "config.yaml"), load_yaml(ROOT / "config/cifar10.yaml")
    missing = sorted(".".join(p) for p in leaves(default) if p not in set(leaves(cifar)))
    assert missing == [], f"config.yaml keys that cifar10.yaml does not override: {missing}"
    assert cifar_overlay() == cifar_alone()


def test_cifar10_values_match_the_methods_reference():
    c = cifar_overlay()
    assert c["data"]["n_test"] == 1024                                   # P1 code: NUM_TEST=1024
    assert c["classifier"] == {**c["classifier"], "source": "download", "arch": "wrn-28-10"}
    dl = c["diffusion"]["download"]
    assert dl["repo_id"] == "google/ddpm-cifar10-32"
    assert dl["revision"] == "267b167dc01f0e4e61923ea244e8b988f84deb80"
    assert dl["files"]["diffusion_pytorch_model.safetensors"] == \
        "1558dbe3fb093b0857d473e376b711eeda1b186c557be5e85b3a56300cd49f0f"
    p = c["purification"]
    assert (p["t_star"], p["sampler"], p["num_inference_steps"]) == (0.1, "ddpm", 1000)  # 101 reverse steps
    assert c["diffusion"]["schedule"]["variance_type"] == "fixed_large"
    tms = {t["name"]: t for t in c["attacks"]["threat_models"]}
    assert tms["linf"]["norm"] == "linf" and tms["linf"]["eps"] == pytest.approx(8 / 255)
    assert tms["linf"]["alpha"] == pytest.approx(2 / 255)
    assert tms["l2"]["norm"] == "l2" and (tms["l2"]["eps"], tms["l2"]["alpha"]) == (0.5, 0.1)
    assert (c["attacks"]["pgd"]["steps"], c["attacks"]["pgd"]["eot"], c["attacks"]["pgd"]["random_start"]) == \
        (20, 10, False)
    assert c["attacks"]["autoattack"]["n_eval"] == 20
    a = c["addt"]
    assert (a["steps"], a["batch_size"], a["lr"], a["betas"], a["weight_decay"], a["grad_clip"], a["ema_decay"]) == \
        (19600, 256, 2e-4, [0.95, 0.999], 1e-6, 1.0, 0.9999)
    assert (a["cgpo_iterations"], a["lambda_scale"], a["lambda_max"], a["t_max"]) == (5, 0.03, 0.3, 999)
    assert a["pgd_eps"] == pytest.approx(8 / 255) and a["pgd_alpha"] == pytest.approx(4 / 255)
    assert c["analysis"]["randomness"]["samples"] == 100                  # P2: 100 x 100 matrices
    # the competing defenses (competing-defenses.md): ADBM's bridge fine-tune and 5-step DDIM, GDMP's CIFAR-10 code
    assert c["competitors"]["names"] == ["adbm", "gdmp"] and "adbm" in a["variants"]
    b = a["adbm"]
    assert (b["t_prime_min"], b["t_prime_max"], b["attack_steps"]) == (100, 200, 3) and b["eps"] == pytest.approx(8 / 255)
    assert p["adbm"]["steps"] == 5 and p["adbm"]["clip_denoised"]
    g = p["gdmp"]
    assert (g["t_star"], g["rounds"], g["guidance"], g["schedule"], g["reference"]) == (0.035, 4, "mse", "gdmp", "diffused")
    assert g["scale"] == pytest.approx(18.68)
    assert c["attacks"]["n_images"] <= c["data"]["n_test"]


def test_every_unknown_pin_is_declared_and_allowed_explicitly():
    c = cifar_overlay()
    keys = [k for k, _ in unpinned_entries(c)]
    # the weights of the DDPM are pinned; what cannot be known offline is null and allowed
    assert "diffusion.download.files['diffusion_pytorch_model.safetensors']" not in keys
    assert set(keys) >= {"diffusion.download.files['config.json']", "classifier.download.sha256",
                         "data.download.revision"}
    assert all(section["allow_unpinned"] is True for _, section in unpinned_entries(c))


@pytest.mark.parametrize("section", ["data", "classifier", "diffusion"])
def test_a_null_pin_without_allow_unpinned_is_an_error_naming_the_key(section):
    cfg = deep_merge(load_yaml(ROOT / "config.yaml"), load_yaml(ROOT / "config/cifar10.yaml"))
    cfg[section]["download"]["allow_unpinned"] = False
    with pytest.raises(ConfigError, match=rf"{section}\.download\.\S+.*not pinned"):
        validate_config(cfg)


# ------------------------------------------------------------------------------- DAG (dry run)

def dry_run(*configfiles: str) -> str:
    """A forced dry run from the repository root (every job listed), as a user types it."""
    args = [SNAKEMAKE, "-n", "--cores", "1", "--forceall", "--printshellcmds"]
    for c in configfiles:
        args += ["--configfile", c]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out.stdout


def rule_all_inputs(dry_run_output: str) -> set[str]:
    m = re.search(r"rule all:\s*\n\s*input: (.*)\n", dry_run_output)
    assert m, dry_run_output[-2000:]
    return {s.strip() for s in m.group(1).split(",")}


def test_dry_run_has_the_same_figure_and_table_targets_as_the_default():
    default = rule_all_inputs(dry_run())
    cifar_out = dry_run("config/cifar10.yaml")
    cifar = rule_all_inputs(cifar_out)
    wanted = {t for t in default if t.startswith(("results/tables/", "results/figures/"))}
    assert len(wanted) >= 20
    assert {t for t in cifar if t.startswith(("results/tables/", "results/figures/"))} == wanted
    # and it is the CIFAR-10 DAG: downloads instead of training the base models
    for rule in ("download_data", "download_classifier", "download_diffusion"):
        assert f"rule {rule}:" in cifar_out
    for rule in ("train_classifier:", "train_diffusion:"):
        assert f"rule {rule}" not in cifar_out
    # the VP-SDE and EDM families purify with their own networks (issue 18), fetched by download_network
    assert cifar_out.count("rule download_network:") == 2
    nets = {}
    for block in cifar_out.split("\nrule attack:")[1:]:
        defense = re.search(r"wildcards: defense=(\w+)", block).group(1)
        nets.setdefault(defense, set()).update(re.findall(r"results/models/diffusion/(\w+)", block.split("output:")[0]))
    assert nets["vpsde"] == {"ddpmpp"} and nets["edm"] == {"edm_songunet"}
    assert nets["ddim"] == nets["vanilla"] == {"vanilla"} and nets["vpsde_addt"] == {"addt"}
    assert nets["adbm"] == {"adbm"} and nets["gdmp"] == {"vanilla"}  # ADBM's fine-tune; GDMP on the vanilla DDPM


# ------------------------------------------------------------------ trust on first use (loader)

from dbprepro.io import sha256_file  # noqa: E402
from dbprepro.models import checkpoints  # noqa: E402
from dbprepro.models.checkpoints import UNPINNED_RECORD, download_hf, download_url  # noqa: E402
from dbprepro.models.hub_configs import (DDPM_CIFAR10_32_SCHEDULER, DDPM_CIFAR10_32_UNET,  # noqa: E402
                                         check_known_configs)
from dbprepro.models.verification import CheckpointError  # noqa: E402

REV = "0123456789abcdef0123456789abcdef01234567"


def fake_hub(source: Path, calls: list):
    def download(*, repo_id, filename, revision, repo_type, local_dir, **_):
        calls.append((filename, revision))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((source / filename).read_bytes())
        return str(target)
    return download


def test_unpinned_hub_file_is_refused_unless_allowed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(checkpoints, "hf_hub_download", fake_hub(tmp_path, calls))
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not pinned"):
        download_hf("org/repo", REV, {"a.json": None}, tmp_path / "dest")
    with pytest.raises(CheckpointError, match="revision not pinned"):
        download_hf("org/repo", None, {"a.json": "0" * 64}, tmp_path / "dest")
    assert calls == [] and not (tmp_path / "dest").exists()


def test_trust_on_first_use_records_then_verifies(tmp_path, monkeypatch, caplog):
    src = tmp_path / "hub"
    src.mkdir()
    (src / "config.json").write_text('{"a": 1}')
    (src / "w.safetensors").write_bytes(b"weights" * 10)
    pinned = sha256_file(src / "w.safetensors")
    calls = []
    monkeypatch.setattr(checkpoints, "hf_hub_download", fake_hub(src, calls))
    monkeypatch.setattr(checkpoints, "_resolve_revision", lambda repo, kind: REV)
    dest = tmp_path / "dest"
    with caplog.at_level("WARNING", logger="dbprepro.models.checkpoints"):
        download_hf("org/repo", None, {"config.json": None, "w.safetensors": pinned}, dest, allow_unpinned=True)
    record = json.loads((dest / UNPINNED_RECORD).read_text())
    assert record["revision"] == REV and record["revision_pinned"] is False
    assert record["files"] == {"config.json": sha256_file(src / "config.json")}  # the pinned file is not "unpinned"
    assert sorted(calls) == [("config.json", REV), ("w.safetensors", REV)]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "UNPINNED" in warned and record["files"]["config.json"] in warned and REV in warned

    # a later run verifies against the record: a changed file is refused, not re-trusted
    (dest / "config.json").write_text('{"a": 2}')
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        download_hf("org/repo", None, {"config.json": None, "w.safetensors": pinned}, dest, allow_unpinned=True)


def test_unpinned_html_page_is_refused_even_when_allowed(tmp_path, monkeypatch):
    src = tmp_path / "hub"
    src.mkdir()
    (src / "config.json").write_text("<!DOCTYPE html><html>quota exceeded</html>")
    monkeypatch.setattr(checkpoints, "hf_hub_download", fake_hub(src, []))
    with pytest.raises(CheckpointError, match="HTML"):
        download_hf("org/repo", REV, {"config.json": None}, tmp_path / "dest", allow_unpinned=True)
    assert not (tmp_path / "dest" / UNPINNED_RECORD).exists()


def test_unpinned_url_download(tmp_path):
    src = tmp_path / "Standard-source.pt"
    src.write_bytes(b"\x80\x02fake torch file" * 100)
    dest = tmp_path / "downloads" / "Standard.pt"
    with pytest.raises(CheckpointError, match="not pinned"):
        download_url(src.as_uri(), None, dest)
    assert not dest.exists()
    assert download_url(src.as_uri(), None, dest, allow_unpinned=True) == dest
    record = json.loads((dest.parent / UNPINNED_RECORD).read_text())
    assert record["files"] == {"Standard.pt": sha256_file(src)} and record["url"] == src.as_uri()
    dest.write_bytes(b"something else")
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        download_url(src.as_uri(), None, dest, allow_unpinned=True)
    html = tmp_path / "drive.html"
    html.write_text("<html><body>Google Drive can't scan this file for viruses</body></html>")
    with pytest.raises(CheckpointError, match="HTML"):
        download_url(html.as_uri(), None, tmp_path / "other" / "Standard.pt", allow_unpinned=True)
    assert not (tmp_path / "other" / "Standard.pt").exists()


def test_known_hub_configs_are_checked_by_content(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **DDPM_CIFAR10_32_UNET}))
    (tmp_path / "scheduler_config.json").write_text(json.dumps({**DDPM_CIFAR10_32_SCHEDULER,
                                                                "variance_type": "fixed_small"}))
    assert check_known_configs("google/ddpm-cifar10-32", tmp_path) == ["config.json", "scheduler_config.json"]
    assert check_known_configs("someone/else", tmp_path) == []
    (tmp_path / "config.json").write_text(json.dumps({**DDPM_CIFAR10_32_UNET, "block_out_channels": [64, 128]}))
    with pytest.raises(CheckpointError, match="block_out_channels"):
        check_known_configs("google/ddpm-cifar10-32", tmp_path)


def test_known_unet_config_matches_the_pinned_weights_parameter_count():
    from dbprepro.models.hub_configs import build_ddpm_cifar10_32_unet

    # Ho et al.'s CIFAR-10 DDPM has 35.7M parameters
    assert sum(p.numel() for p in build_ddpm_cifar10_32_unet().parameters()) == 35_746_307
