"""Counting: the network calls of every compute-heavy job of a validated config's DAG (pure
arithmetic, no network is built; unit-tested against hand counts).  The purifier
registry gives each defense's calls per purification, the attack registry each run's calls per
image (:mod:`dbprepro.calls` has the units)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..calls import KINDS, Calls, defended_forward, purify, purify_grad  # noqa: F401 - KINDS re-exported
from ..attacks.registry import attack_class
from ..config import UNDEFENDED, Experiment, analysis_threat
from ..purifiers.registry import purifier_class

DIGITS_IMAGES = 1797  # scikit-learn's digits


@dataclass
class Job:
    """One job (or a group of identical jobs) of the DAG and the calls it makes."""

    job: str                 # rule/wildcards, e.g. attack/vanilla/linf/whitebox_eot/pgd
    target: str              # the table or figure it is mainly for
    calls: Calls
    note: str = ""
    upper_bound: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    network: str | None = None  # a family's own network its UNet calls run on (None: the diffusion section's)


def network_calls(purification: dict, num_train_timesteps: int = 1000) -> int:
    """Network calls of one purification by the configured sampler family (its registered class's
    ``network_calls``: the DDPM/DDIM chain length; VP-SDE ``steps``, twice with the corrector; EDM
    Heun 2 ``steps`` - 1).  Tested against each purifier's own count."""
    return purifier_class(purification.get("sampler", "ddpm")).network_calls(purification, num_train_timesteps)


def attack_run_calls(cfg: dict, defense: str, setting: str, attack: str, purification: dict,
                  grad_mode: str) -> tuple[Calls, bool]:
    """Calls per attacked image of one run on a defense purifying with ``purification`` (and
    whether the count is an upper bound): the attack's ``run_calls`` (the undefended classifier:
    torchattacks PGD).  Also the network calls of the robustness waterfall's cells
    (:func:`dbprepro.paper1.waterfall.run_costs`)."""
    att = cfg["attacks"]
    if defense == UNDEFENDED:  # torchattacks PGD on the classifier + 3 evaluation forwards
        return Calls(clf_grad=att["pgd"]["steps"], clf_fwd=3), False
    T = cfg["diffusion"]["schedule"]["num_train_timesteps"]
    per, bound = attack_class(attack).run_calls(att, setting, purification, grad_mode, T)
    votes = purification.get("votes")  # a majority-vote defense purifies V times per pass (dwbox: once)
    if votes and not setting.startswith("dwbox"):
        per = per * votes
    return per, bound


def addt_step_calls(variant: str, cgpo_iterations: int, adbm_attack_steps: int = 3) -> Calls:
    """Calls per training image of one ADDT step: CGPO / PGD iterations (UNet and classifier
    forward+backward to the perturbation; MSE variant without the classifier), then one training
    pass; clean fine-tuning is the training pass alone; ADBM's bridge loss: its ``adbm_attack_steps``
    FGSM steps (UNet and classifier forward+backward), then one training pass."""
    K = int(cgpo_iterations)
    if variant == "adbm":
        return Calls(unet_grad=int(adbm_attack_steps), clf_grad=int(adbm_attack_steps), unet_train=1)
    if variant == "clean_finetune":
        return Calls(unet_train=1)
    if variant == "cgpo_mse":
        return Calls(unet_grad=K, unet_train=1)
    if variant in ("addt", "addt_no_rbgm"):
        return Calls(unet_grad=K, clf_grad=K, unet_train=1)
    raise ValueError(f"unknown ADDT variant {variant!r}")


def image_shape(cfg: dict) -> tuple[int, int, int]:
    return (3, 32, 32) if cfg["data"]["dataset"] == "cifar10" else (1, 8, 8)


def n_train_images(cfg: dict) -> int:
    if cfg["data"]["dataset"] == "cifar10":
        return 50_000
    return DIGITS_IMAGES - int(DIGITS_IMAGES * cfg["data"]["test_fraction"])


# ------------------------------------------------------------------------------- the counting

def count_calls(cfg: dict) -> list[Job]:
    """Every compute-heavy job of the DAG of the validated config ``cfg`` with its network calls."""
    pur, sch = cfg["purification"], cfg["diffusion"]["schedule"]
    exp = Experiment.from_config(cfg)
    S = network_calls(pur, sch["num_train_timesteps"])
    gm = pur.get("grad_mode", "exact")
    variants = exp.addt_variants
    defenses = ["vanilla", *variants]
    jobs: list[Job] = []

    # base models trained by the DAG (source train)
    if cfg["classifier"]["source"] == "train":
        tr = cfg["classifier"]["train"]
        jobs.append(Job("train_classifier", "models", Calls(clf_train=tr["epochs"] * n_train_images(cfg)),
                        note=f"{tr['epochs']} epochs x {n_train_images(cfg)} images"))
    if cfg["diffusion"]["source"] == "train":
        tr = cfg["diffusion"]["train"]
        jobs.append(Job("train_diffusion", "models", Calls(unet_train=tr["steps"] * tr["batch_size"]),
                        note=f"{tr['steps']} steps x batch {tr['batch_size']}"))

    # ADDT fine-tuning
    a = cfg["addt"]
    for v in variants:
        per = addt_step_calls(v, a["cgpo_iterations"], a["adbm"]["attack_steps"])
        jobs.append(Job(f"train_addt/{v}", "tables/addt_training.csv", per * (a["steps"] * a["batch_size"]),
                        note=f"{a['steps']} steps x batch {a['batch_size']}"))
    for d in exp.own_addt:  # a family's own ADDT loss: the same passes per step as addt
        per = addt_step_calls("addt", a["cgpo_iterations"])
        jobs.append(Job(f"train_addt/{d}", "tables/p1_table_families.csv", per * (a["steps"] * a["batch_size"]),
                        note=f"{a['steps']} steps x batch {a['batch_size']}"))
    fam = exp.family_defenses

    def chain(d: str) -> int:  # network calls of one purification by defense d's sampler
        return network_calls(exp.purification(d), sch["num_train_timesteps"])

    # clean evaluation
    ev, n_test = cfg["evaluation"], cfg["data"]["n_test"]
    evaluated = dict.fromkeys([*defenses, *fam, *exp.vote_defenses, *exp.competitor_defenses])  # ADBM is a variant too
    for d in evaluated:  # a vote: V purifications per random draw
        V = exp.defense(d).votes or 1
        per = Calls(clf_fwd=1) + defended_forward(chain(d)) * (V * ev["random_draws"] + ev["fixed_configs"])
        jobs.append(Job(f"evaluate_clean/{d}", "tables/clean_accuracy.csv", per * n_test, network=exp.defense(d).network,
                        note=f"{n_test} images x ({ev['random_draws']} random + {ev['fixed_configs']} fixed)"))

    # attacks
    n_att = cfg["attacks"]["n_images"]
    for d, tm, s, atk in exp.attack_runs(fixed_configs=True):
        per, bound = attack_run_calls(cfg, d, s, atk, exp.purification(d), gm)
        n_d = exp.attack_n_images(d, s, atk)
        if attack_class(atk).private_section or (atk != "pgd" and d != "vanilla" and d in variants) \
                or d in exp.competitor_defenses:
            # the adaptive attacks, every attack beyond PGD on an ADDT defense, every run on a competing defense
            target = "tables/waterfall.csv"
        elif d in fam:
            target = "tables/p1_table_families.csv"
        elif d in variants:
            target = "tables/p1_table_ablation.csv"
        elif s.startswith("dwbox_c"):
            target = "tables/p2_table_fixed_randomness.csv"
        else:
            target = "tables/p1_table_main.csv"
        jobs.append(Job(f"attack/{d}/{tm}/{s}/{atk}", target, per * n_d, upper_bound=bound,
                        network=None if d == UNDEFENDED else exp.defense(d).network,
                        note=f"{n_d} images" + (" (upper bound: every image through every sub-attack)"
                                                  if bound else "")))

    # paper 1 loss landscapes
    att = cfg["attacks"]
    if att["track_images"] > 0:
        ls = att["landscape"]
        m = min(ls["n_images"], att["track_images"])
        for d in ["vanilla"] + (["addt"] if "addt" in variants else []):
            jobs.append(Job(f"loss_landscape/{d}", "figures/p1_fig2_loss_landscape.png",
                            defended_forward(S) * (m * ls["grid"] ** 2), note=f"{m} images x {ls['grid']}^2 grid"))

    # paper 2
    an = cfg["analysis"]
    if an["enabled"]:
        n_a = an["n_images"] if an["n_images"] is not None else n_att
        dist = an["distances"]
        jobs.append(Job("p2_lp_distances", "tables/p2_lp_distances.csv",
                        purify(S) * (n_a * 2 * (dist["draws"] + dist["chain_draws"])),
                        note=f"{n_a} images x 2 x ({dist['draws']} draws + {dist['chain_draws']} chains)"))
        M = an["randomness"]["samples"]
        jobs.append(Job("p2_randomness", "tables/p2_randomness.csv", purify(S) * (n_a * 2 * M),
                        note=f"{n_a} images x 2 x {M} samples"))
        comp = an["compression"]
        D = 1
        for s_ in image_shape(cfg):
            D *= s_
        p2_threat = analysis_threat(cfg)
        addt_dw = [v for v in variants if p2_threat in a["attack_threat_models"] and "dwbox" in exp.addt_settings(v)
                   and not exp.defense(v).competitor]  # paper 2 analyses paper 1's defenses
        for d in ["vanilla", *addt_dw]:
            n_cfg = an["fixed_configs"] if d == "vanilla" else 1
            per_img = purify(S) * (comp["probes"] + 1) + defended_forward(S)
            jac = purify_grad(S, gm) * (min(comp["jacobian_images"], n_a) * D)
            jobs.append(Job(f"p2_compression/{d}", "tables/p2_compression.csv", per_img * (n_cfg * n_a) + jac,
                            note=f"{n_cfg} configs x {n_a} images x ({comp['probes']} probes + 2); "
                                 f"Jacobian {min(comp['jacobian_images'], n_a)} x {D} rows"))
    # the sanity battery (sanity.enabled): one job per defense and threat model
    from ..sanity.cost import battery_cost_rows

    for job, calls, bound, note, net in battery_cost_rows(cfg):
        jobs.append(Job(job, "tables/sanity.csv", calls, note=note, upper_bound=bound, network=net))
    for j in jobs:
        j.extra["chain_steps"] = S
    return jobs

