"""The stages of the Snakemake DAG: one function per rule, each a thin adapter from the rule's
``input``/``output``/``params`` to the concept modules (data, models, training, evaluation...).

``workflow/scripts/stage.py`` calls :func:`run_stage` with Snakemake's ``snakemake`` object; the
rule's name selects the stage.  Stages read settings only from ``params`` (never from the whole
config), so Snakemake's params trigger reruns exactly the jobs a changed setting affects.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("dbprepro.pipeline")

STAGES: dict[str, Callable[..., None]] = {}


def stage(fn: Callable[..., None]) -> Callable[..., None]:
    STAGES[fn.__name__] = fn
    return fn


def run_stage(smk: Any) -> None:
    """Entry point of ``workflow/scripts/stage.py``: logging, torch set-up, then the stage.

    Around every stage (also the in-process ones, :func:`run_stage_inline`): temporaries that a
    killed earlier attempt left beside the outputs are removed, a failure is logged with its
    traceback before it propagates (Snakemake shows the log), and on success a provenance record
    is written to ``results/provenance/<rule>/<wildcards>.json`` (see
    :func:`dbprepro.runtime.write_job_provenance`)."""
    from .runtime import configure_torch, provenance, setup_logging

    setup_logging(smk.log[0] if smk.log else None)
    name = smk.rule
    if name not in STAGES:
        raise KeyError(f"no dbprepro stage for rule {name!r}; known: {', '.join(sorted(STAGES))}")
    configure_torch(threads=smk.threads, deterministic=smk.params.get("deterministic", True))
    log.info("stage %s: wildcards %s", name, dict(smk.wildcards))
    log.info("provenance %s", json.dumps(provenance(), sort_keys=True))
    _run_job(name, smk.input, smk.output, smk.params, smk.wildcards, in_process=False)


def _run_job(name: str, input, output, params, wildcards, in_process: bool) -> None:
    from . import faults
    from .io import remove_stale_temporaries
    from .runtime import provenance_path, write_job_provenance

    record = provenance_path(name, wildcards, output)
    record.unlink(missing_ok=True)  # a record present always describes the outputs present
    for stale in remove_stale_temporaries(list(output)):
        log.info("removed %s, left by an interrupted earlier attempt", stale)
    started, t0 = time.time(), time.perf_counter()
    try:
        faults.arm(name, dict(wildcards))  # test-only fault injection (DBPREPRO_FAULT), else nothing
        STAGES[name](input, output, params, wildcards)
    except BaseException as e:
        log.exception("stage %s FAILED after %.1f s (wildcards %s): %s: %s", name, time.perf_counter() - t0,
                      dict(wildcards), type(e).__name__, e)
        raise
    seconds = time.perf_counter() - t0
    write_job_provenance(record, rule=name, wildcards=wildcards, params=params, inputs=input, outputs=output,
                         started=started, seconds=seconds, in_process=in_process)
    log.info("stage %s finished in %.1f s; provenance in %s", name, seconds, record)


def _device(params) -> "torch.device":  # noqa: F821
    from .runtime import resolve_device

    return resolve_device(params.get("device", "auto"))


# -- data ----------------------------------------------------------------------------------------
@stage
def prepare_data(input, output, params, wildcards) -> None:
    from .data import prepare_split

    data = params.data
    prepare_split(data["dataset"], {"train": output.train, "test": output.test}, output.manifest,
                  test_fraction=data["test_fraction"], seed=data["split_seed"],
                  source_dir=input.get("source"))


@stage
def download_data(input, output, params, wildcards) -> None:
    from .datasets_cifar import download_cifar10

    dl = params.download
    download_cifar10(output[0], dl["revision"], dl["files"], allow_unpinned=dl.get("allow_unpinned", False))


# -- base models ---------------------------------------------------------------------------------
@stage
def train_classifier(input, output, params, wildcards) -> None:
    import torch

    from .data import load_split
    from .metrics import write_table
    from .models.classifiers import build_classifier, save_classifier
    from .training import train_classifier as fit

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

    from .data import load_split
    from .metrics import write_table
    from .models.diffusion import build_scheduler, build_unet, save_diffusion
    from .training import train_ddpm

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
    from .checkpoints import download_url, load_state_dict, load_weights_into
    from .models.classifiers import build_classifier, save_classifier

    clf = params.classifier
    dl = clf["download"]
    raw = download_url(dl["url"], dl["sha256"], Path(output.raw), allow_unpinned=dl.get("allow_unpinned", False))
    model = build_classifier(clf["arch"], **clf["kwargs"])
    load_weights_into(model, load_state_dict(raw))
    save_classifier(model, clf["arch"], clf["kwargs"], output.model)


@stage
def download_diffusion(input, output, params, wildcards) -> None:
    from .checkpoints import download_hf
    from .models.hub_configs import check_known_configs

    dl = params.download
    download_hf(dl["repo_id"], dl["revision"], dl["files"], output.model,
                allow_unpinned=dl.get("allow_unpinned", False))
    check_known_configs(dl["repo_id"], output.model)  # content check of its small, unhashed JSON files


# -- evaluation ----------------------------------------------------------------------------------
@stage
def evaluate_clean(input, output, params, wildcards) -> None:
    from .evaluation import evaluate_clean as run

    run(input.classifier, input.diffusion, input.test, input.manifest, output.records,
        n_test=params.n_test, purification=params.purification, variance_type=params.variance_type,
        evaluation=params.evaluation, seed=params.seed, device=_device(params))


@stage
def table_clean_accuracy(input, output, params, wildcards) -> None:
    from .evaluation import write_clean_accuracy_table

    write_clean_accuracy_table(list(input.records), output.csv, output.md,
                               confidence=params.confidence, defenses=list(params.defenses))


@stage
def gradient_modes(input, output, params, wildcards) -> None:
    """Time and agreement of the gradient modes of every purifier family in ``params.families``
    (the base ``params.purification`` with its sampler replaced), on the first ``params.n_images``
    test images in fixed randomness (draw 0)."""
    import pandas as pd

    from .data import load_split
    from .evaluation import build_purifier
    from .gradients import compare_gradient_modes
    from .metrics import write_table
    from .models.classifiers import load_classifier
    from .purification import DefendedClassifier
    from .randomness import Randomness

    device = _device(params)
    test = load_split(input.test, input.manifest).head(int(params.n_images))
    x, y, ids = test.images.to(device), test.labels.to(device), test.ids
    classifier = load_classifier(input.classifier).to(device)
    tables = []
    for family in params.families:
        # grad_mode "exact" only to build it (an adjoint in the base section is refused by the other families)
        pur = {**params.purification, "sampler": family, "grad_mode": "exact"}
        purifier = build_purifier(input.diffusion, pur, params.variance_type, Randomness(params.seed, "fixed", 0),
                                  device)
        table = compare_gradient_modes(DefendedClassifier(classifier, purifier), x, y, ids,
                                       repeats=int(params.repeats))
        for _, r in table.iterrows():
            log.info("%-6s %-10s %4d calls: %.3f s, rel. error vs exact %.2e, cosine %.6f", r["family"],
                     r["grad_mode"], r["steps"], r["seconds"], r["rel_error_vs_exact"], r["cosine_vs_exact"])
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    # wall time is not reproducible byte for byte: it goes to a benchmark file beside the table
    key = ["family", "grad_mode", "steps", "n_images"]
    write_table(table.drop(columns="seconds"), output.csv, decimals=8)
    write_table(table[[*key, "seconds"]], output.seconds, decimals=4)


# -- attacks -------------------------------------------------------------------------------------
@stage
def attack(input, output, params, wildcards) -> None:
    from .robustness import run_attack_shard

    run_attack_shard(input.classifier, input.get("diffusion"), input.test, input.manifest,
                     records=output.records, trace=output.trace, paths=output.paths, adv=output.adv,
                     defense=wildcards.defense, threat=wildcards.threat, setting=wildcards.setting,
                     attack=wildcards.attack, shard=int(wildcards.shard), attacks=params.attacks,
                     purification=params.purification, variance_type=params.variance_type,
                     seed=params.seed, device=_device(params))


@stage
def merge_attack(input, output, params, wildcards) -> None:
    from .robustness import merge_shards

    merge_shards(list(input.records), list(input.trace), list(input.paths), output.records, output.trace,
                 output.paths, list(input.adv), output.adv)


@stage
def table_p1_main(input, output, params, wildcards) -> None:
    from .robustness import write_p1_main_table

    write_p1_main_table(list(input.records), list(input.clean), list(params.defenses), output.csv, output.md,
                        confidence=params.confidence, fixed_draw=params.fixed_draw)


# -- figures (paper 1) ---------------------------------------------------------------------------
@stage
def loss_landscape(input, output, params, wildcards) -> None:
    from .landscape import compute_landscapes

    ls = params.landscape
    compute_landscapes(input.classifier, input.diffusion, input.dwbox, input.eot, output.npz,
                       purification=params.purification, variance_type=params.variance_type, seed=params.seed,
                       fixed_draw=params.fixed_draw, n_images=ls["n_images"], grid=ls["grid"],
                       extent_factor=ls["extent_factor"], device=_device(params))


@stage
def figure_p1_fig1_attack_trajectories(input, output, params, wildcards) -> None:
    from .figures import fig_attack_trajectories

    settings = list(params.settings)
    fig_attack_trajectories(dict(zip(settings, input.paths)), dict(zip(settings, input.traces)),
                            output.png, output.pdf)


@stage
def figure_p1_fig2_loss_landscape(input, output, params, wildcards) -> None:
    from .figures import fig_loss_landscape

    fig_loss_landscape(dict(zip(params.defenses, input.npz)), output.png, output.pdf)


@stage
def figure_p1_fig3_robustness_bars(input, output, params, wildcards) -> None:
    from .figures import fig_robustness_bars

    fig_robustness_bars(input.table, output.png, output.pdf, threat=params.threat, attack=params.attack,
                        evaluation=params.evaluation, confidence=params.confidence)


# -- ADDT ----------------------------------------------------------------------------------------
@stage
def train_addt(input, output, params, wildcards) -> None:
    import time as _time

    import pandas as pd

    from .addt import make_loss_fn, network_passes_per_step
    from .data import load_split
    from .metrics import write_table
    from .models.classifiers import load_classifier
    from .models.diffusion import load_diffusion, save_diffusion
    from .training import train_ddpm

    # the defense (e.g. "edm_addt") names the outputs; params.variant / params.family say what it trains;
    # params.addt and params.purification are sections of the validated config (schema defaults filled)
    a, defense = params.addt, wildcards.defense
    variant, family = params.variant, params.family
    family_kw = {}
    if family in ("vpsde", "edm"):
        pur = params.purification
        family_kw = dict(beta_min=pur["vpsde"]["beta_min"], beta_max=pur["vpsde"]["beta_max"],
                         timestep_map=pur["timestep_map"], p_mean=a["edm_p_mean"], p_std=a["edm_p_std"],
                         sigma_data=a["edm_sigma_data"])
    device = _device(params)
    train = load_split(input.train, input.manifest)
    unet, scheduler = load_diffusion(input.base)
    classifier = load_classifier(input.classifier).to(device)
    loss_fn = make_loss_fn(classifier, variant, family=family, iterations=a["cgpo_iterations"],
                           lambda_scale=a["lambda_scale"], lambda_max=a["lambda_max"], pgd_eps=a["pgd_eps"],
                           pgd_alpha=a["pgd_alpha"], t_max=a["t_max"], **family_kw)
    t0 = _time.perf_counter()
    ema_unet, history = train_ddpm(unet.to(device), scheduler, train.images, labels=train.labels, steps=a["steps"],
                                   batch_size=a["batch_size"], lr=a["lr"], ema_decay=a["ema_decay"], warmup_steps=0,
                                   grad_clip=a["grad_clip"], weight_decay=a["weight_decay"], betas=a["betas"],
                                   seed=params.seed, loss_fn=loss_fn, checkpoint_dir=params.checkpoint_dir,
                                   checkpoint_every=a["checkpoint_every"], desc=defense)
    seconds = _time.perf_counter() - t0
    save_diffusion(ema_unet, scheduler, output.model)
    history.insert(0, "defense", defense)
    history["unet_passes_per_step"] = network_passes_per_step(variant, a["cgpo_iterations"])
    write_table(history, output.history)
    write_table(pd.DataFrame([{"defense": defense, "steps": a["steps"], "seconds": seconds,
                               "seconds_per_step": seconds / a["steps"]}]), output.timing)


@stage
def table_addt_training(input, output, params, wildcards) -> None:
    from .robustness import write_addt_training_table

    write_addt_training_table(list(input.history), list(input.timing), output.csv, output.md, output.cost)


@stage
def table_p1_ablation(input, output, params, wildcards) -> None:
    from .robustness import write_p1_ablation_table

    write_p1_ablation_table(input.main, output.csv, output.md, defenses=list(params.defenses),
                            threat=params.threat, families=dict(params.families))


@stage
def table_p1_families(input, output, params, wildcards) -> None:
    from .robustness import write_p1_families_table

    write_p1_families_table(input.main, output.csv, output.md, rows=list(params.rows), threat=params.threat,
                            settings=tuple(params.settings))


@stage
def rbgm_samples(input, output, params, wildcards) -> None:
    from .addt import rbgm_samples as compute
    from .data import load_split
    from .io import savez
    from .models.classifiers import load_classifier
    from .models.diffusion import load_diffusion

    a = params.addt
    train = load_split(input.train, input.manifest).head(params.n_images)
    unet, scheduler = load_diffusion(input.base)
    out = compute(unet, scheduler, load_classifier(input.classifier), train.images, train.labels, t=params.t,
                  iterations=a["cgpo_iterations"], lambda_scale=a["lambda_scale"], lambda_max=a["lambda_max"],
                  seed=params.seed)
    savez(output.npz, **out)


@stage
def figure_p1_fig5_rbgm(input, output, params, wildcards) -> None:
    from .figures import fig_rbgm

    fig_rbgm(input.npz, output.png, output.pdf)


# -- paper 2 ---------------------------------------------------------------------------------------
@stage
def p2_lp_distances(input, output, params, wildcards) -> None:
    from .distances import run_lp_distances

    an = params.analysis
    run_lp_distances(input.diffusion, input.test, input.manifest, input.adv, per_image_csv=output.csv,
                     summary_csv=output.summary, chain_out=output.chain, n_images=an["n_images"],
                     draws=an["distances"]["draws"], chain_draws=an["distances"]["chain_draws"],
                     batch_size=an["batch_size"], purification=params.purification,
                     variance_type=params.variance_type, seed=params.seed, device=_device(params))


@stage
def figure_p2_fig1_lp_distance(input, output, params, wildcards) -> None:
    from .figures import fig_p2_lp_distance

    fig_p2_lp_distance(input.csv, input.chain, output.png, output.pdf)


@stage
def p2_randomness(input, output, params, wildcards) -> None:
    from .dominance import run_randomness

    an = params.analysis
    run_randomness(input.diffusion, input.test, input.manifest, per_image_csv=output.csv, summary_csv=output.summary,
                   example_out=output.example, n_images=an["n_images"], samples=an["randomness"]["samples"],
                   same_draw=params.fixed_draw, distribution=an["distribution"], radius=params.radius,
                   batch_size=an["batch_size"], purification=params.purification, variance_type=params.variance_type,
                   seed=params.seed, device=_device(params))


@stage
def figure_p2_fig2_randomness_correlation(input, output, params, wildcards) -> None:
    from .figures import fig_p2_randomness

    fig_p2_randomness(input.csv, input.example, output.png, output.pdf)


@stage
def table_p2_fixed_randomness(input, output, params, wildcards) -> None:
    from .robustness import write_p2_fixed_randomness_table

    write_p2_fixed_randomness_table(input.undefended, input.random, list(input.fixed), list(params.configs),
                                    output.csv, output.md, n_images=params.n_images, evaluation=params.evaluation,
                                    confidence=params.confidence)


@stage
def p2_compression(input, output, params, wildcards) -> None:
    from .compression import run_compression

    an, comp = params.analysis, params.analysis["compression"]
    run_compression(input.classifier, input.diffusion, input.test, input.manifest, records_out=output.records,
                    jacobian_out=output.jacobian, defense=wildcards.defense, configs=list(params.configs),
                    n_images=an["n_images"], probes=comp["probes"], norm=comp["norm"],
                    distribution=an["distribution"], radius=params.radius, jacobian_images=comp["jacobian_images"],
                    batch_size=an["batch_size"], purification=params.purification,
                    variance_type=params.variance_type, seed=params.seed, device=_device(params))


@stage
def table_p2_compression(input, output, params, wildcards) -> None:
    import pandas as pd

    from .compression import compression_table
    from .metrics import write_table

    dwbox = {int(k): pd.read_parquet(p) for k, p in zip(params.configs, input.dwbox)}
    per_image, summary = compression_table(pd.read_parquet(input.records), dwbox)
    per_image.insert(4, "attack_setting", per_image["config"].map(dict(zip(params.configs, params.settings))))
    write_table(per_image, output.csv, decimals=6)
    write_table(summary, output.summary, output.md)
    for _, r in summary.iterrows():
        log.info("%-14s n=%d: Spearman(CR, robust) %.3f, AUC(low CR -> robust) %.3f", r["scope"], r["n"],
                 r["spearman_rho"], r["auc_low_cr_robust"])


@stage
def table_p2_compression_models(input, output, params, wildcards) -> None:
    import pandas as pd

    from .compression import compression_models_table
    from .metrics import write_table

    defenses = list(params.defenses)
    cr = {d: pd.read_parquet(p) for d, p in zip(defenses, input.records)}
    cr = {d: df[df["config"] == params.fixed_draw] for d, df in cr.items()}
    dwbox = {d: pd.read_parquet(p) for d, p in zip(defenses, input.dwbox)}
    eot = {d: pd.read_parquet(p) for d, p in zip(params.eot_defenses, input.eot)}
    table = compression_models_table(cr, dwbox, eot, evaluation=params.evaluation)
    write_table(table, output.csv, output.md)
    for _, r in table.iterrows():
        log.info("%-16s mean CR %.4f, dwbox robust accuracy %.4f", r["defense"], r["mean_cr"], r["robust_accuracy_dwbox"])


@stage
def figure_p2_fig5_compression_spectrum(input, output, params, wildcards) -> None:
    from .figures import fig_p2_compression_spectrum

    fig_p2_compression_spectrum(dict(zip(params.defenses, input.jacobian)), output.png, output.pdf)


@stage
def figure_p2_fig6_compression_vs_robustness(input, output, params, wildcards) -> None:
    from .figures import fig_p2_compression_vs_robustness

    fig_p2_compression_vs_robustness(input.csv, input.summary, input.models, output.png, output.pdf)


# Light stages (merges, tables, figures) run in the Snakemake process itself when Snakemake runs
# `run:` jobs in threads (profiles/default sets force-use-threads; without it Snakemake spawns a
# fresh `python -m snakemake` per `run:` job, ~10 s of start-up and imports for ~1 s of work).
# One lock serialises them: pyplot's figure registry and the shared "dbprepro" log handler are
# process-wide, and every light stage takes a second or two.
_INLINE_LOCK = threading.Lock()


def run_stage_inline(name: str, input, output, params, wildcards, logfiles) -> None:
    """Run a light stage in the calling (Snakemake) process, logging to the rule's log file
    without touching the process-wide logging or torch settings; one at a time (see
    ``_INLINE_LOCK``)."""
    if name not in STAGES:
        raise KeyError(f"no dbprepro stage for rule {name!r}")
    with _INLINE_LOCK:
        _run_inline(name, input, output, params, wildcards, logfiles)


def _run_inline(name: str, input, output, params, wildcards, logfiles) -> None:
    logfile = logfiles[0] if logfiles else None
    handler = logging.FileHandler(logfile, mode="a") if logfile else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("dbprepro")
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.INFO)
    try:
        log.info("stage %s (in-process): wildcards %s", name, dict(wildcards))
        _run_job(name, input, output, params, wildcards, in_process=True)
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
        handler.close()
