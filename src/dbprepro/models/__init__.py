"""Base models: classifiers and diffusion networks (built, trained, downloaded, loaded).

* :mod:`.classifiers`, :mod:`.wideresnet`: the classifiers (images in [0, 1]).
* :mod:`.diffusion`: diffusers ``UNet2DModel`` + ``DDPMScheduler``, built, saved and loaded;
  :mod:`.hub_configs`: the known configurations of the hub models.
* :mod:`.training`: seeded, replayable training of the embedded classifier and DDPM.
* :mod:`.networks`: the registry of the paper-scale diffusion networks; :mod:`.edm_net` (EDM's
  SongUNet behind EDMPrecond, registered as ``edm_songunet``) with its pickle reader
  :mod:`.edm_pickle` (the stream as data: :mod:`.safe_pickle`, :mod:`.torch_guard`).
* :mod:`.checkpoints`: pinned downloads of third-party weights and data (Hugging Face, URLs), trust
  on first use recorded; :mod:`.verification`: sha256 checks and safe loading of state dicts
  (:mod:`.torch_guard` bounds a torch file before ``torch.load``); :mod:`.bounds`: the loaders'
  errors and resource bounds (:class:`.bounds.Limits`).
* :mod:`.networks`: the registry of paper-scale network architectures; each is a module of its own
  imported here so that it registers: :mod:`.ddpmpp` (Score SDE's DDPM++, the ``vpsde`` family).
"""

from . import ddpmpp, edm_net  # noqa: F401  (register the "ddpmpp" and "edm_songunet" networks)
from .checkpoints import download_hf, download_url
from .training import accuracy, train_classifier, train_ddpm
from .verification import CheckpointError, load_state_dict, load_weights_into, verify_file

__all__ = ["CheckpointError", "accuracy", "download_hf", "download_url", "load_state_dict", "load_weights_into",
           "train_classifier", "train_ddpm", "verify_file"]
