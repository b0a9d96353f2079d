"""The library face of dbprepro: purify, defend and attack with your own models.

A thin layer over the package's classes (:class:`~dbprepro.purifiers.Purifier`,
:class:`~dbprepro.purifiers.DefendedClassifier`, :class:`~dbprepro.attacks.PGD`); the
Snakemake pipeline uses the same classes.  Images are float tensors ``[B, C, H, W]`` in [0, 1];
anything else (NaN/Inf, values outside [0, 1], wrong channels or size, an empty batch) is refused
with a ``ValueError`` naming the problem.

Example (``docs/api_example.py`` runs it end to end)::

    from dbprepro import api

    purifier = api.load_purifier("results/models/diffusion/vanilla", t_star=0.1, num_inference_steps=100)
    x_pur = api.purify(purifier, images, seed=0, mode="fixed")        # the same output on every call
    model = api.defend(api.load_classifier("results/models/classifier"), purifier)
    report = api.attack(model, images, labels, setting="dwbox", eps=0.2, alpha=0.05, steps=20)
    print(report.robust_accuracy("single"))

Hub models are fetched only through the checksum-verified path: give the 40-hex ``revision`` and
the sha256 of every file (``api.load_purifier("google/ddpm-cifar10-32", revision=..., files=...)``);
weights load only from safetensors, never from a pickle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from .attacks import NORMS, attack_class, base_setting, settings_randomness
from .models.checkpoints import CheckpointError
from .purifiers import DefendedClassifier, Purifier, ReverseChain, build_purifier, check_images
from .randomness import Randomness

__all__ = ["load_purifier", "load_classifier", "purify", "defend", "attack", "AttackReport", "evaluate",
           "Purifier", "DefendedClassifier", "Randomness", "CheckpointError"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _cache_dir(repo_id: str, revision: str, cache_dir) -> Path:
    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "dbprepro" / "hub"
    return root / repo_id.replace("/", "--") / str(revision)


def load_purifier(source: str | Path, *, revision: str | None = None, files: dict[str, str] | None = None,
                  cache_dir: str | Path | None = None, t_star: float = 0.1, num_inference_steps: int | None = None,
                  sampler: str = "ddpm", eta: float = 0.0, variance_type: str | None = None,
                  seed: int = 0, mode: Literal["random", "fixed"] = "random", fixed_draw: int = 0,
                  grad_mode: str = "exact", clip_output: bool = True, device: str | torch.device = "cpu",
                  settings: dict | None = None) -> ReverseChain:
    """A purifier of any registered family (:data:`dbprepro.purifiers.PURIFIERS`) from a diffusers
    checkpoint folder or a Hugging Face hub id.

    Args:
        source: a local diffusers folder (``unet/`` + ``scheduler/`` as the pipeline writes it,
            or the flat layout of a hub snapshot), or a hub id such as ``"google/ddpm-cifar10-32"``.
        revision, files: required for a hub id: the full 40-hex commit and ``{file name: sha256}``
            of every file to fetch (e.g. ``config.json``, ``diffusion_pytorch_model.safetensors``,
            ``scheduler_config.json``).  Each file is verified before use
            (:func:`dbprepro.models.checkpoints.download_hf`); an HTML page, a truncated file or a hash
            mismatch raises :class:`CheckpointError`.  ``dbprepro sha256 <file>`` prints a hash.
        cache_dir: where hub files go [``~/.cache/dbprepro/hub/<owner>--<name>/<revision>``];
            verified files already there are not fetched again (offline reruns).
        t_star: diffusion strength in (0, 1] (0.1 = timestep 100 of 1000, both papers).
        num_inference_steps: schedule the reverse chain is cut from (None = every training step).
        sampler, eta: a registered family: ``"ddpm"`` (ancestral), ``"ddim"`` (with DDIM ``eta``),
            ``"vpsde"``, ``"edm"``, ...
        settings: further keys of the config's ``purification`` section, e.g. the family's own
            section (``{"vpsde": {"steps": 6}}``, ``{"edm": {"steps": 3}}``) or ``timestep_map``.
        variance_type: override the scheduler's DDPM variance (``"fixed_large"``, ``"fixed_small"``).
        seed, mode, fixed_draw: the purifier's randomness (:class:`Randomness`): ``"random"`` draws
            fresh noise on every call (replayable from ``seed``), ``"fixed"`` reuses configuration
            ``fixed_draw`` (a deterministic purifier, paper 1's DW-box setting).
        grad_mode: ``"exact"`` (flat memory), ``"autograd"``, ``"checkpoint"``, ``"budget"`` (give
            ``settings={"activation_budget_mb": ...}``) or ``"bpda"``.
        device: where the UNet runs.
    """
    from .models.checkpoints import download_hf
    from .models.diffusion import load_diffusion
    from .models.hub_configs import check_known_configs

    path = Path(source)
    if not path.exists():
        if not _HUB_ID.match(str(source)):
            raise FileNotFoundError(f"{source}: no such diffusers folder (and not a hub id like 'owner/name')")
        if revision is None or not files:
            raise CheckpointError(f"{source}: a hub model is only loaded pinned and verified: give revision= (the "
                                  "40-hex commit) and files={name: sha256} for every file to fetch")
        path = _cache_dir(str(source), revision, cache_dir)
        download_hf(str(source), revision, dict(files), path)  # refuses unpinned, verifies every file
        check_known_configs(str(source), path)
    overrides = {"variance_type": variance_type} if variance_type else None
    try:
        unet, scheduler = load_diffusion(path, scheduler_overrides=overrides)
    except (CheckpointError, FileNotFoundError):
        raise
    except Exception as e:  # truncated or corrupt safetensors, unreadable config, wrong class
        raise CheckpointError(f"{path}: could not load the diffusion model ({type(e).__name__}: {e})") from e
    purification = {"t_star": t_star, "num_inference_steps": num_inference_steps, "sampler": sampler, "eta": eta,
                    "clip_output": clip_output, **(settings or {})}
    return build_purifier(unet.to(device), scheduler, purification, Randomness(seed, mode, fixed_draw=fixed_draw),
                          grad_mode=grad_mode)


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A classifier folder written by the pipeline (``config.json`` + ``model.safetensors``);
    a missing, truncated or mismatching file raises :class:`CheckpointError` naming it."""
    from .models.classifiers import load_classifier as load

    try:
        return load(path).to(device)
    except Exception as e:
        raise CheckpointError(f"{path}: could not load the classifier ({type(e).__name__}: {e})") from e


def purify(purifier: Purifier, images: torch.Tensor, *, seed: int | None = None,
           mode: Literal["random", "fixed"] | None = None, fixed_draw: int = 0, ids=None) -> torch.Tensor:
    """Purify ``images`` ([B, C, H, W] in [0, 1]); returns the purified images in [0, 1].

    With ``seed`` (and ``mode``) the call uses that randomness and is a pure function of
    ``(images, ids, seed, mode, fixed_draw)``: ``mode="fixed"`` is the deterministic purifier of
    configuration ``fixed_draw``; ``mode="random"`` the first fresh draw of each sample.  Without
    them it uses the purifier's own randomness (in random mode: new noise on every call).
    ``ids`` name the samples (default 0..B-1): an image gets the same noise alone or in any batch.
    """
    check_images(images, *_expected_shape(purifier))
    if seed is None and mode is None:
        return purifier(images, ids=ids)
    own = purifier.randomness
    return purifier.with_randomness(Randomness(own.seed if seed is None else seed, mode or own.mode,
                                               fixed_draw=fixed_draw))(images, ids=ids)


def defend(classifier: nn.Module, purifier: Purifier) -> DefendedClassifier:
    """Classifier after purifier: an ``nn.Module`` from [0, 1] images to logits (any classifier
    ``nn.Module`` taking [0, 1] images works; torchattacks can attack it directly)."""
    if not isinstance(classifier, nn.Module):
        raise TypeError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
    if not isinstance(purifier, ReverseChain):
        raise TypeError(f"purifier must be a dbprepro purifier (any registered family), got {type(purifier).__name__}")
    return DefendedClassifier(classifier, purifier)


@dataclass
class AttackReport:
    """Outcome of :func:`attack`: the adversarial examples, per-image records (correctness under
    the ``single``/``mean``/``worst``/``vote`` evaluations, perturbation norms, losses) and the
    defended loss at every PGD iterate (``loss``: [B, steps + 1])."""

    x_adv: torch.Tensor
    records: pd.DataFrame
    loss: np.ndarray
    setting: str

    def robust_accuracy(self, evaluation: str = "single") -> float:
        """Fraction of images still classified correctly under ``evaluation``."""
        col = f"correct_{evaluation}"
        if col not in self.records:
            raise ValueError(f"unknown evaluation {evaluation!r}; known: single, mean, worst, vote")
        return float(self.records[col].mean())


def _expected_shape(purifier: Purifier) -> tuple[int | None, int | None]:
    cfg = getattr(purifier.unet, "config", None)
    channels = getattr(cfg, "in_channels", None) if cfg is not None else None
    size = getattr(cfg, "sample_size", None) if cfg is not None else None
    return (int(channels) if channels else None, int(size) if isinstance(size, int) else None)


def _labels(labels, n: int) -> torch.Tensor:
    y = torch.as_tensor(labels)
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.long().reshape(-1)
    if y.numel() != n:
        raise ValueError(f"got {y.numel()} labels for {n} images")
    if (y < 0).any():
        raise ValueError("labels must be non-negative class indices")
    return y


def attack(model: DefendedClassifier, images: torch.Tensor, labels, *, setting: str = "dwbox",
           norm: Literal["linf", "l2"] = "linf", eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 20,
           eot: int = 10, eval_draws: int = 10, seed: int = 0, fixed_draw: int = 0, ids=None,
           random_start: bool = False, restarts: int = 1, bpda: bool = False, attack: str | None = None,
           options: dict | None = None) -> AttackReport:
    """An attack (PGD by default) on a defended classifier in one of paper 1's settings, then the evaluation.

    Args:
        model: a :class:`DefendedClassifier` (see :func:`defend`).
        images, labels: [B, C, H, W] in [0, 1] and [B] integer classes.
        setting: ``"whitebox"`` (one fresh draw per step), ``"whitebox_eot"`` (``eot`` fresh draws per
            step, gradients summed) or ``"dwbox"`` (the fixed configuration ``fixed_draw``, known to the
            attacker and used for evaluation).  The purifier's randomness is set to match, with ``seed``,
            for the duration of the call.
        norm, eps, alpha, steps: threat model and step size in [0, 1] pixel units (L-inf eps above 1
            is refused: did you mean eps/255?).
        eval_draws: fresh purifications per adversarial example in the stochastic settings; the
            records hold ``single``, ``mean``, ``worst`` and ``vote`` correctness over them.
        bpda: identity backward pass through the purifier (the weak baseline; = ``attack="bpda"``).
        attack: any registered attack (:data:`dbprepro.attacks.ATTACKS`: ``pgd``, ``bpda``,
            ``aa_standard_dwbox``, ``aa_standard_multieval``, ``aa_rand``, ...; the former ``aa_standard`` is a
            deprecated alias of ``aa_standard_dwbox``); ``options``: further keys of the config's ``attacks``
            section it reads (e.g. ``{"autoattack": {"n_eval": 5}}``), schema defaults for the rest.
    """
    if not isinstance(model, DefendedClassifier):
        raise TypeError(f"model must be a DefendedClassifier (api.defend), got {type(model).__name__}")
    base_setting(setting)  # refuses unknown names, listing the known ones
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
    if not (eps > 0 and alpha > 0):
        raise ValueError(f"eps and alpha must be > 0, got eps={eps}, alpha={alpha}")
    if norm == "linf" and eps > 1:
        raise ValueError(f"L-inf eps={eps} exceeds the whole [0, 1] pixel range; did you mean {eps}/255?")
    if eval_draws < 1:
        raise ValueError(f"eval_draws must be >= 1, got {eval_draws}")
    check_images(images, *_expected_shape(model.purifier))
    y = _labels(labels, images.shape[0]).to(images.device)
    ids = torch.arange(images.shape[0]) if ids is None else torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
    name = attack or ("bpda" if bpda else "pgd")
    tm = {"name": norm, "norm": norm, "eps": float(eps), "alpha": float(alpha)}
    section = _attacks_section(options or {}, pgd={"steps": steps, "eot": eot, "random_start": random_start,
                                                    "restarts": restarts},
                               eval_draws=eval_draws, fixed_draw=fixed_draw, threat_models=[tm])
    cols, res = attack_class(name).run_batch(model.with_randomness(settings_randomness(setting, seed, fixed_draw)),
                                             images, y, ids, setting=setting, threat=tm, attacks=section, seed=seed)
    loss = res.loss if res.loss is not None else np.full((images.shape[0], 1), np.nan)
    return AttackReport(res.x_adv, pd.DataFrame(cols), loss, setting)


run_attack = attack  # for evaluate(), whose parameter ``attack`` names the attack


def _attacks_section(options: dict, **keys) -> dict:
    """An ``attacks`` config section: the schema's defaults, overlaid with ``options``, then with
    ``keys`` (the call's own arguments win; sections merge key by key)."""
    from .config import deep_merge, validate_config

    return deep_merge(deep_merge(validate_config({"name": "api"})["attacks"], options), keys)


@torch.no_grad()
def _accuracy(model, images, labels, ids=None, draws=None) -> float:
    logits = model(images) if draws is None else model(images, ids=ids, draws=draws)
    return float((logits.argmax(1) == labels).float().mean())


def evaluate(classifier: nn.Module, purifier: Purifier, images: torch.Tensor, labels, *, setting: str = "dwbox",
             norm: Literal["linf", "l2"] = "linf", eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 20,
             eot: int = 10, eval_draws: int = 10, random_draws: int = 1, fixed_configs: int = 1, seed: int = 0,
             fixed_draw: int = 0, bpda: bool = False, attack: str | None = None,
             options: dict | None = None) -> pd.DataFrame:
    """Clean accuracy (classifier alone; purified under random and fixed randomness) and the robust
    accuracy of one attack (:func:`attack`) on ``images``: one row per (what, setting, evaluation)."""
    check_images(images, *_expected_shape(purifier))
    y = _labels(labels, images.shape[0]).to(images.device)
    ids = torch.arange(images.shape[0])
    model = defend(classifier, purifier)
    rows = [{"what": "clean", "setting": "classifier", "evaluation": "-", "accuracy": _accuracy(classifier, images, y),
             "draws": 1}]
    rnd = model.with_randomness(Randomness(seed, "random"))
    acc = [_accuracy(rnd, images, y, ids, torch.full_like(ids, k)) for k in range(random_draws)]
    rows.append({"what": "clean", "setting": "random", "evaluation": "mean", "accuracy": float(np.mean(acc)),
                 "draws": random_draws})
    acc = [_accuracy(model.with_randomness(Randomness(seed, "fixed", fixed_draw=k)), images, y, ids,
                     torch.full_like(ids, k)) for k in range(fixed_configs)]
    rows.append({"what": "clean", "setting": "fixed", "evaluation": "mean", "accuracy": float(np.mean(acc)),
                 "draws": fixed_configs})
    rep = run_attack(model, images, y, setting=setting, norm=norm, eps=eps, alpha=alpha, steps=steps, eot=eot,
                 eval_draws=eval_draws, seed=seed, fixed_draw=fixed_draw, bpda=bpda, attack=attack, options=options)
    attack = attack or ("bpda" if bpda else "pgd")
    name = f"{attack}-{steps} {norm} eps={eps:.4g}" if attack in ("pgd", "bpda") else f"{attack} {norm} eps={eps:.4g}"
    for ev in ("single", "mean", "worst", "vote"):
        rows.append({"what": name, "setting": setting, "evaluation": ev, "accuracy": rep.robust_accuracy(ev),
                     "draws": 1 if setting.startswith("dwbox") else eval_draws})
    table = pd.DataFrame(rows)
    table.insert(3, "n_images", int(images.shape[0]))
    return table
