"""What the battery runs and reads, from a validated config (no network is built: Snakemake, the
validation and the cost model call it).

One battery job per (defense, threat model) of :func:`battery_jobs`.  It reads the records of the
*comparison runs* (:func:`comparison_runs`: every gradient-based attack run of the attack grid on
that defense and threat model, grouped by randomness class) and the adversarial examples of the
*transfer sources* (:func:`transfer_sources`)."""

from __future__ import annotations

from typing import Any

from typing import NamedTuple

from ..threat_settings import is_fixed, setting_fixed_draw

#: the undefended classifier's runs (``dbprepro.config.UNDEFENDED``; this module imports nothing of
#: ``dbprepro.config``, whose validation calls it: the experiment is passed in as ``exp``)
UNDEFENDED = "undefended"


class Run(NamedTuple):
    """An attack run (equal to the grid's ``dbprepro.config.AttackRun`` of the same fields)."""

    defense: str
    threat: str
    setting: str
    attack: str

#: registered attacks whose runs contain a gradient-free sub-attack (AutoAttack's standard suite
#: ends with Square): not "gradient attacks" of the gradient-free check's reference ensemble
GRADIENT_FREE_ATTACKS = ("aa_standard_dwbox", "aa_standard_multieval")
#: the two randomness classes an attack can see: fresh draws (whitebox, whitebox_eot) or the fixed
#: configuration ``attacks.fixed_draw`` (dwbox)
CLASSES = ("stochastic", "fixed")


def randomness_class(setting: str) -> str:
    """``fixed`` for the DW-box settings, ``stochastic`` for the others."""
    return "fixed" if is_fixed(setting) else "stochastic"


def battery_threats(cfg: dict[str, Any]) -> list[str]:
    """``sanity.threat_models`` (null: every name of ``attacks.threat_models``)."""
    names = [tm["name"] for tm in cfg["attacks"]["threat_models"]]
    chosen = cfg["sanity"]["threat_models"]
    return names if chosen is None else [t for t in names if t in chosen]


def battery_defenses(cfg: dict[str, Any], exp) -> list[str]:
    """``sanity.defenses`` that the experiment ``exp`` (:class:`dbprepro.config.Experiment` of
    ``cfg``) has (one it switches off, e.g. addt without ADDT, is skipped, as the attacks'
    ``defenses`` are)."""
    have = exp.defenses
    return [d for d in cfg["sanity"]["defenses"] if d in have]


def battery_jobs(cfg: dict[str, Any], exp) -> list[tuple[str, str]]:
    """(defense, threat) of every battery job; [] when ``sanity.enabled`` is false."""
    if not cfg["sanity"]["enabled"]:
        return []
    return [(d, t) for d in battery_defenses(cfg, exp) for t in battery_threats(cfg)]


def own_pgd_class(cfg: dict[str, Any]) -> str:
    """The randomness class of the battery's own PGD runs (``sanity.pgd_setting``)."""
    return randomness_class(cfg["sanity"]["pgd_setting"])


def comparison_runs(cfg: dict[str, Any], exp, defense: str, threat: str) -> list[tuple[str, Run]]:
    """(class, run) of every gradient-based attack run of the grid on ``defense`` and ``threat``:
    the fixed class holds only the runs against the configuration ``attacks.fixed_draw`` (the
    battery's DW-box runs attack it), i.e. ``dwbox``, not paper 2's other ``dwbox_c<k>``."""
    fixed_draw = cfg["attacks"]["fixed_draw"]
    out = []
    for run in exp.attack_runs(fixed_configs=True):
        if run.defense != defense or run.threat != threat or run.attack in GRADIENT_FREE_ATTACKS:
            continue
        cls = randomness_class(run.setting)
        if cls == "fixed" and setting_fixed_draw(run.setting, fixed_draw) != fixed_draw:
            continue
        if (cls, run) not in out:
            out.append((cls, run))
    return out


def transfer_sources(cfg: dict[str, Any], exp, defense: str, threat: str) -> list[tuple[str, Run]]:
    """(source name, run) of the adversarial examples transferred to ``defense``: the undefended
    classifier's PGD run (``sanity.transfer.undefended``) and the PGD runs in
    ``sanity.transfer.setting`` of the defenses ``sanity.transfer.sources[defense]`` that this
    configuration has."""
    tr = cfg["sanity"]["transfer"]
    have = exp.defenses
    out = [(UNDEFENDED, Run(UNDEFENDED, threat, "none", "pgd"))] if tr["undefended"] else []
    for src in (tr["sources"] or {}).get(defense, []):
        if src in have:
            out.append((src, Run(src, threat, tr["setting"], "pgd")))
    return out


def needed_classes(cfg: dict[str, Any]) -> list[str]:
    """The randomness classes whose reference ensemble some check compares with: the Square
    settings' and, with transfer sources, the stochastic class (transferred examples are evaluated
    on the stochastic defense)."""
    san = cfg["sanity"]
    need = {randomness_class(s) for s in san["square"]["settings"]}
    if san["transfer"]["undefended"] or any(san["transfer"]["sources"].values()):
        need.add("stochastic")
    return [c for c in CLASSES if c in need]


def config_problem(cfg: dict[str, Any], exp, names: list[str], possible: set[str]) -> str | None:
    """What is wrong with a validated config's ``sanity`` section (``<key>: <why>``), or None:
    defenses and transfer sources some configuration has (``possible``; not the undefended
    classifier), threat models of ``names``, ascending ``eps_factors`` holding 1; when enabled, at
    most as many images as the transfer sources attacked, every source run in the attack grid,
    and a gradient attack in each randomness class a check compares with."""
    san, att = cfg["sanity"], cfg["attacks"]
    srcs = san["transfer"]["sources"]
    bad = [d for d in [*san["defenses"], *srcs, *(s for v in srcs.values() for s in v)]
           if d not in possible or d == UNDEFENDED]
    if bad:
        return f"defenses / transfer.sources: {bad} are not defenses (this configuration's: {', '.join(exp.defenses)})"
    bad = [t for t in san["threat_models"] or [] if t not in names]
    if bad:
        return f"threat_models: {bad} are not names in attacks.threat_models ({', '.join(names)})"
    f = [float(x) for x in san["eps_factors"]]
    if sorted(set(f)) != f or 1.0 not in f:
        return f"eps_factors: {san['eps_factors']} must be ascending, distinct and contain 1 (the default PGD)"
    if san["enabled"] and san["n_images"] > att["n_images"]:  # a battery that does not run reads no images
        return f"n_images: {san['n_images']} exceeds attacks.n_images ({att['n_images']})"
    grid = set(exp.attack_runs(fixed_configs=True))
    for d, t in battery_jobs(cfg, exp):
        for _, run in transfer_sources(cfg, exp, d, t):
            if run not in grid:
                return (f"transfer: the source run {'/'.join(run)} of {d} is not in the attack grid (attack the "
                        "source in sanity.transfer.setting, or drop it)")
            n = exp.attack_n_images(run.defense, run.setting, run.attack)
            if san["n_images"] > n:
                return f"n_images: {san['n_images']} exceeds the {n} images the transfer source {'/'.join(run)} attacked"
        have = {c for c, _ in comparison_runs(cfg, exp, d, t)} | {own_pgd_class(cfg)}
        for cls in needed_classes(cfg):
            if cls not in have:
                return (f"defenses: {d}/{t} has no gradient attack run in the {cls} randomness class to compare "
                        "Square or the transferred examples with (see sanity.square.settings, sanity.transfer)")
    return None
