import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_diffusion():
    """A randomly initialised tiny UNet + the DDPM schedule (1000 linear betas)."""
    from dbprepro.models.diffusion import build_scheduler, build_unet

    torch.manual_seed(0)
    unet = build_unet(8, 1, [8, 16], attention=[False, True], norm_num_groups=4)
    return unet.eval(), build_scheduler()


@pytest.fixture
def defended(tiny_diffusion):
    """The stand-in defense of the attack tests, as a factory: ``defended(setting, fixed_draw=0)``
    is a small untrained classifier (``SmallCNN``, width 8, hidden 16, seeded with 0 at each call)
    after a DDPM purifier of :func:`tiny_diffusion` (t* = 0.1, 100-step schedule) whose randomness
    is the one ``setting`` needs (``settings_randomness(setting, seed=0, fixed_draw=fixed_draw)``)."""
    from dbprepro.attacks import settings_randomness
    from dbprepro.models.classifiers import SmallCNN
    from dbprepro.purifiers import DefendedClassifier, Purifier

    def make(setting, fixed_draw=0):
        torch.manual_seed(0)
        clf = SmallCNN(width=8, hidden=16).eval()
        p = Purifier(*tiny_diffusion, t_star=0.1, num_inference_steps=100,
                     randomness=settings_randomness(setting, seed=0, fixed_draw=fixed_draw))
        return DefendedClassifier(clf, p)

    return make

@pytest.fixture
def stage_inputs(tiny_diffusion, tmp_path):
    """What a model stage reads, on disk in ``tmp_path``: the digits split, the tiny diffusion
    model (``diffusion/``) and a small untrained classifier (``clf/``); returns the paths by name."""
    from dbprepro.data import prepare_split
    from dbprepro.models.classifiers import SmallCNN, save_classifier
    from dbprepro.models.diffusion import save_diffusion

    paths = {"train": tmp_path / "train.npz", "test": tmp_path / "test.npz", "manifest": tmp_path / "split.json",
             "diffusion": tmp_path / "diffusion", "classifier": tmp_path / "clf"}
    prepare_split("digits", {"train": paths["train"], "test": paths["test"]}, paths["manifest"], test_fraction=0.2,
                  seed=0)
    save_diffusion(*tiny_diffusion, paths["diffusion"])
    torch.manual_seed(0)
    save_classifier(SmallCNN(width=8, hidden=16), "small_cnn", {"width": 8, "hidden": 16}, paths["classifier"])
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture
def attack_stage(stage_inputs, tmp_path):
    """The DAG's attack stage on :func:`stage_inputs` as a factory: ``attack_stage(attack, setting,
    attacks)`` runs one shard of ``attack`` (``attacks``: the validated config's section) on the
    vanilla defense, merges it and returns the merged records (a DataFrame)."""
    import pandas as pd

    from dbprepro.attacks.runner import merge_shards, run_attack_shard

    def run(attack, setting, attacks, purification):
        stem = tmp_path / f"{attack}_s0"
        run_attack_shard(stage_inputs["classifier"], stage_inputs["diffusion"], stage_inputs["test"],
                         stage_inputs["manifest"], records=f"{stem}.rec.parquet", trace=f"{stem}.tr.parquet",
                         paths=f"{stem}.npz", defense="vanilla", threat="linf", setting=setting, attack=attack,
                         shard=0, attacks=attacks, purification=purification, variance_type="fixed_large",
                         seed=0, device=torch.device("cpu"))
        merged = tmp_path / f"{attack}_m"
        merge_shards([f"{stem}.rec.parquet"], [f"{stem}.tr.parquet"], [f"{stem}.npz"], f"{merged}.rec.parquet",
                     f"{merged}.tr.parquet", f"{merged}.npz")
        return pd.read_parquet(f"{merged}.rec.parquet")

    return run


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """A finished local run of the smoke configuration (``--cores 2``), shared by every test that
    needs its outputs (idempotence, byte-reproducibility across executors, DVC round trip).
    Treat the directory as read-only: copy it before changing anything."""
    from smoke import snakemake

    workdir = tmp_path_factory.mktemp("smoke") / "run"
    r = snakemake(workdir, "--show-failed-logs", timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return workdir
