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
