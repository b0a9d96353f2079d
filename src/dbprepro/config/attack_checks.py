"""The attack-side checks of :func:`~dbprepro.config.validate.validate_config` that a schema cannot
express: DiffHammer's restarts and protocol, and the gradient modes every defense and attack run needs."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError


def _diffhammer_checks(dh: dict[str, Any]) -> None:
    """``attacks.diffhammer``: one restart per entry of ``losses`` (``restarts``, if set, says how many;
    the attack reads ``losses``); ``eval_draws`` only in the ``final`` protocol (in ``inloop`` every
    iterate is scored by its own ``draws``)."""
    n = len(dh["losses"])
    if dh["restarts"] is not None and dh["restarts"] != n:
        raise ConfigError(f"config key attacks.diffhammer.restarts: {dh['restarts']} restarts but "
                          f"attacks.diffhammer.losses names {n} ({', '.join(dh['losses'])}); one loss per restart "
                          "(set restarts: null, or list the loss of every restart)")
    if dh["protocol"] == "inloop" and dh["eval_draws"] is not None:
        raise ConfigError(f"config key attacks.diffhammer.eval_draws: {dh['eval_draws']} fresh evaluation draws are "
                          "read by the final protocol only; with protocol: inloop every iterate is scored by its own "
                          "attacks.diffhammer.draws (set eval_draws: null, or protocol: final)")


def _grad_mode_checks(cfg: dict[str, Any]) -> None:
    """Every defense purifies with ``purification.grad_mode`` (the section with its family's sampler,
    :meth:`~dbprepro.config.Experiment.purification`): its family must offer the mode (``grad_modes``;
    ``budget`` with an ``activation_budget_mb``); an attack run that reads the chain states with
    gradients (``needs_chain_states``) needs a defense whose family delivers them in that mode
    (``state_grad_modes``); the surrogate's own process (the defense's section overlaid,
    :func:`~dbprepro.attacks.surrogate.surrogate_purification`) passes the same checks and its
    family's ``check_config``.  Messages name the attack, the defense, its family and the mode."""
    from ..attacks.registry import ATTACKS
    from ..attacks.surrogate import surrogate_purification
    from ..purifiers import purifier_class
    from .experiment import UNDEFENDED, Experiment

    exp, sur = Experiment.from_config(cfg), cfg["attacks"]["surrogate"]

    def offered(pur: dict[str, Any], key: str, who: str) -> None:
        cls, gm = purifier_class(pur["sampler"]), pur["grad_mode"]
        if gm not in cls.grad_modes:
            raise ConfigError(f"config key {key}.grad_mode: {gm!r} is not offered by {who} (family "
                              f"{pur['sampler']!r} offers {', '.join(cls.grad_modes)})")
        if gm == "budget" and pur.get("activation_budget_mb") is None:
            raise ConfigError(f"config key {key}.activation_budget_mb: grad_mode budget of {who} needs a budget "
                              "(MiB >= 0; 0 = exact)")

    for name, d in exp.defenses.items():  # a family defense is named after its family
        offered(exp.purification(name), "purification", f"defense {name!r}" + (" (families.names)" * d.family))
    for attack, name in dict.fromkeys((r.attack, r.defense) for r in exp.attack_runs() if r.defense != UNDEFENDED):
        cls, pur, who = ATTACKS[attack], exp.purification(name), f"attack {attack} on defense {name!r}"
        if attack == "surrogate":
            pur = surrogate_purification(pur, sur)
            offered(pur, "attacks.surrogate.purification", f"the surrogate process of {who}")
            try:
                purifier_class(pur["sampler"]).check_config({**cfg, "purification": pur})
            except ValueError as e:
                raise ConfigError(f"config key attacks.surrogate: the surrogate process of {who} (coarsen "
                                  f"{sur['coarsen']}, overlay {sur['purification']}) fails its family's check: {e}"
                                  ) from None
        problem = cls.run_problem(cfg["attacks"], pur)
        if problem:
            raise ConfigError(f"config key attacks.{cls.config_section}: {who} (family {pur['sampler']!r}) cannot "
                              f"run: {problem}")
        states = purifier_class(pur["sampler"]).state_grad_modes
        if cls.needs_chain_states and pur["grad_mode"] not in states:
            raise ConfigError(f"config key purification.grad_mode: {who} (family {pur['sampler']!r}) reads the "
                              f"chain states with gradients, which grad_mode {pur['grad_mode']!r} does not deliver "
                              f"(it does in {', '.join(states)}); choose one of those, or leave {name!r} out of "
                              f"attacks.{cls.config_section}.defenses")
