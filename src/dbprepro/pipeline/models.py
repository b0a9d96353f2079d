"""Stages: base models and ADDT fine-tuning (rules of workflow/rules/models.smk).

Each function is the rule of the same name; it reads only the rule's ``input``, ``output``,
``params`` and ``wildcards``."""

from __future__ import annotations

from pathlib import Path

from .run import stage_device, stage


@stage
def train_classifier(input, output, params, wildcards) -> None:
    import torch

    from ..data import load_split
    from ..metrics import write_table
    from ..models.classifiers import build_classifier, save_classifier
    from ..models.training import train_classifier as fit

    train = load_split(input.train, input.manifest)
    test = load_split(input.test, input.manifest)
    clf, tr = params.classifier, params.classifier["train"]
    kwargs = dict(clf["kwargs"])
    if clf["arch"] == "small_cnn":
        kwargs.setdefault("in_channels", int(train.images.shape[1]))
        kwargs.setdefault("image_size", int(train.images.shape[-1]))
    torch.manual_seed(params.seed)
    model = build_classifier(clf["arch"], **kwargs)
    history = fit(model, train.images, train.labels, epochs=tr["epochs"], batch_size=tr["batch_size"],
                  lr=tr["lr"], weight_decay=tr["weight_decay"], seed=params.seed,
                  val=(test.images, test.labels))
    save_classifier(model, clf["arch"], kwargs, output.model)
    write_table(history, output.history)


@stage
def train_diffusion(input, output, params, wildcards) -> None:
    import torch

    from ..data import load_split
    from ..metrics import write_table
    from ..models.diffusion import build_scheduler, build_unet, save_diffusion
    from ..models.training import train_ddpm

    train = load_split(input.train, input.manifest)
    dif = params.diffusion
    u, tr = dif["unet"], dif["train"]
    torch.manual_seed(params.seed)
    unet = build_unet(int(train.images.shape[-1]), int(train.images.shape[1]), u["block_out_channels"],
                      layers_per_block=u["layers_per_block"], attention=u["attention"],
                      norm_num_groups=u["norm_num_groups"], dropout=u["dropout"])
    scheduler = build_scheduler(**dif["schedule"])
    ema_unet, history = train_ddpm(unet, scheduler, train.images, steps=tr["steps"],
                                   batch_size=tr["batch_size"], lr=tr["lr"], ema_decay=tr["ema_decay"],
                                   warmup_steps=tr["warmup_steps"], grad_clip=tr["grad_clip"],
                                   seed=params.seed)
    save_diffusion(ema_unet, scheduler, output.model)
    write_table(history, output.history)


@stage
def download_classifier(input, output, params, wildcards) -> None:
    """The classifier file fetched to the rule's ``raw`` output (or placed there by hand) and checked against its
    sha256 -- unpinned (``allow_unpinned``), the sha256 recorded on first use before the file is parsed --, read
    by the guarded loader into the configured architecture, and saved as the model folder whose
    ``config.json`` records the file's ``source`` (url, filename, ``sha256``, ``sha256_pinned``): the hash a
    first use trusted is kept in a declared output, not only beside the download."""
    from ..models.checkpoints import download_url, load_state_dict, load_weights_into, trusted_sha256, verify_file
    from ..models.classifiers import build_classifier, save_classifier

    clf = params.classifier
    dl = clf["download"]
    raw = download_url(dl["url"], dl["sha256"], Path(output.raw), allow_unpinned=dl.get("allow_unpinned", False))
    sha = trusted_sha256(raw, dl["sha256"])
    verify_file(raw, sha)  # a pickle-format file: read only under a pinned or recorded hash
    model = build_classifier(clf["arch"], **clf["kwargs"])
    load_weights_into(model, load_state_dict(raw))
    source = {"url": dl["url"], "filename": raw.name, "sha256": sha, "sha256_pinned": dl["sha256"] is not None}
    save_classifier(model, clf["arch"], clf["kwargs"], output.model, source=source)


@stage
def download_diffusion(input, output, params, wildcards) -> None:
    from ..models.checkpoints import download_hf
    from ..models.hub_configs import check_known_configs

    dl = params.download
    download_hf(dl["repo_id"], dl["revision"], dl["files"], output.model,
                allow_unpinned=dl.get("allow_unpinned", False))
    check_known_configs(dl["repo_id"], output.model)  # content check of its small, unhashed JSON files


@stage
def download_network(input, output, params, wildcards) -> None:
    """A family's own network (``families.networks``): the official file fetched (or placed by
    hand) and checked against its sha256 -- unpinned (``allow_unpinned``), the sha256 printed and
    recorded on first use (``dbprepro_unpinned.json``, and ``network.json`` with ``sha256_pinned``
    false) before the file is parsed --, loaded once by the network's safe loader to prove it
    fits, and its model folder written beside the base model's noise schedule."""
    from ..models.checkpoints import download_url, trusted_sha256
    from ..models.diffusion import load_diffusion
    from ..models.networks import network_class, save_network_dir

    sec, dl = params.network, params.network["download"]
    raw = download_url(dl["url"], dl["sha256"], Path(params.downloads) / dl["filename"],
                       allow_unpinned=dl.get("allow_unpinned", False))
    sha = trusted_sha256(raw, dl["sha256"])  # unpinned: the hash printed and recorded on first use, else refused
    # verified against that hash, then read by the safe loader (refuses a file that does not fit)
    network_class(sec["network"]).load_state(raw, sec.get("config") or {}, sha256=sha)
    _, scheduler = load_diffusion(input.base)
    save_network_dir(output.model, sec["network"], sec.get("config") or {}, raw, sha, scheduler,
                     pinned=dl["sha256"] is not None)


@stage
def train_addt(input, output, params, wildcards) -> None:
    import time as _time

    import pandas as pd

    from ..addt import make_loss_fn, network_passes_per_step
    from ..data import load_split
    from ..metrics import write_table
    from ..models.classifiers import load_classifier
    from ..models.diffusion import load_diffusion, save_diffusion
    from ..purifiers import purifier_class
    from ..models.training import train_ddpm

    # the defense (e.g. "edm_addt") names the outputs; params.variant / params.family say what it trains;
    # params.addt and params.purification are sections of the validated config (schema defaults filled)
    a, defense = params.addt, wildcards.defense
    variant, family = params.variant, params.family
    family_kw = purifier_class(family).addt_loss_kwargs(params.purification, a)  # the family's noise levels
    device = stage_device(params)
    train = load_split(input.train, input.manifest)
    unet, scheduler = load_diffusion(input.base)
    classifier = load_classifier(input.classifier).to(device)
    loss_fn = make_loss_fn(classifier, variant, family=family, iterations=a["cgpo_iterations"],
                           lambda_scale=a["lambda_scale"], lambda_max=a["lambda_max"], pgd_eps=a["pgd_eps"],
                           pgd_alpha=a["pgd_alpha"], t_max=a["t_max"], adbm=a["adbm"], **family_kw)
    t0 = _time.perf_counter()
    ema_unet, history = train_ddpm(unet.to(device), scheduler, train.images, labels=train.labels, steps=a["steps"],
                                   batch_size=a["batch_size"], lr=a["lr"], ema_decay=a["ema_decay"], warmup_steps=0,
                                   grad_clip=a["grad_clip"], weight_decay=a["weight_decay"], betas=a["betas"],
                                   seed=params.seed, loss_fn=loss_fn, checkpoint_dir=params.checkpoint_dir,
                                   checkpoint_every=a["checkpoint_every"], desc=defense)
    seconds = _time.perf_counter() - t0
    save_diffusion(ema_unet, scheduler, output.model)
    history.insert(0, "defense", defense)
    history["unet_passes_per_step"] = network_passes_per_step(variant, a["cgpo_iterations"], a["adbm"]["attack_steps"])
    write_table(history, output.history)
    write_table(pd.DataFrame([{"defense": defense, "steps": a["steps"], "seconds": seconds,
                               "seconds_per_step": seconds / a["steps"]}]), output.timing)
