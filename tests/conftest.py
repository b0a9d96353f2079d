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
