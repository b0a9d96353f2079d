"""The battery's network calls per job (the cost model's rows, :func:`dbprepro.cost.count_calls`):
no network is built."""

from __future__ import annotations

from typing import Any

from ..attacks.registry import attack_class
from ..calls import Calls, defended_forward
from ..config.experiment import Experiment
from ..purifiers.registry import purifier_class
from .plan import battery_jobs, transfer_sources


def battery_calls(cfg: dict[str, Any], defense: str, threat: str) -> tuple[Calls, bool, str]:
    """(calls per image, whether an upper bound, a note) of the battery job on ``defense`` /
    ``threat``: every PGD run (the sweep's factors, the longer run, the unbounded run; each as the
    attack grid prices PGD, with one evaluation draw), Square's queries (an upper bound: Square stops
    on an image once it is misclassified) plus one evaluation forward, one forward per transferred
    example."""
    san, att = cfg["sanity"], cfg["attacks"]
    exp = Experiment.from_config(cfg)
    pur = exp.purification(defense)
    gm = cfg["purification"].get("grad_mode", "exact")
    T = cfg["diffusion"]["schedule"]["num_train_timesteps"]
    s, steps, k = san["pgd_setting"], att["pgd"]["steps"], san["iterations_factor"]
    votes = exp.defense(defense).votes or 1  # a vote defense purifies V times per pass (dwbox: once)

    def pgd(n_steps: int) -> Calls:  # as the attack grid prices a PGD run (dbprepro.cost.attack_run_calls)
        sub = {**att, "eval_draws": 1, "pgd": {**att["pgd"], "steps": n_steps}}
        per = attack_class("pgd").run_calls(sub, s, pur, gm, T)[0]
        return per * (1 if s.startswith("dwbox") else votes)

    runs = len(san["eps_factors"]) + 1  # the sweep and the unbounded run, at the default steps
    total = pgd(steps) * runs + pgd(k * steps)
    fwd = defended_forward(purifier_class(pur.get("sampler", "ddpm")).network_calls(pur, T))
    for ss in san["square"]["settings"]:  # torchattacks: 2 forwards before the queries, then one evaluation
        total = total + fwd * ((san["square"]["queries"] + 3) * (1 if ss.startswith("dwbox") else votes))
    n_tr = len(transfer_sources(cfg, exp, defense, threat))
    total = total + fwd * (n_tr * votes)
    note = (f"{exp.sanity_n_images(defense)} images x ({runs - 1} sweep + 1 unbounded PGD-{steps}, PGD-{k * steps} in {s}; "
            f"Square {san['square']['queries']} queries x {len(san['square']['settings'])}, {n_tr} transfers)")
    return total, bool(san["square"]["settings"]), note


def battery_cost_rows(cfg: dict[str, Any]) -> list[tuple[str, Calls, bool, str, str | None]]:
    """(job, calls of the whole job, upper bound, note, the defense's own network) of every
    battery job."""
    exp = Experiment.from_config(cfg)
    out = []
    for d, t in battery_jobs(cfg, exp):
        per, bound, note = battery_calls(cfg, d, t)
        out.append((f"sanity/{d}/{t}", per * exp.sanity_n_images(d), bound, note, exp.defense(d).network))
    return out
