"""The typed experiment: which defenses a validated config evaluates, how each purifies, and the
attack grid, built once from the config (and read by the Snakefile, the stages and the cost model).

A :class:`Defense` names its purifier family (``sampler``), the network it purifies with
(``weights``: a folder under ``results/models/diffusion/``) and, for a fine-tuned network, the
ADDT variant that trained it, and for the majority-vote defense (``vote`` section) its number of
``votes``; nothing parses defense names.  The attack grid reads the attack
registry (:data:`dbprepro.attacks.ATTACKS`): each registered attack says in which settings it runs.
Torch-free: the attack registry is imported only when the grid is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..errors import ConfigError

UNDEFENDED = "undefended"
VOTE_DEFENSE = "vanilla_vote"  #: the majority-vote defense of the ``vote`` section


def private_sections() -> dict[str, str]:
    """Sections of ``attacks`` read only by the attacks whose own section they are (section -> the
    first such attack; the registered classes with ``private_section``, :func:`reads_section`): left
    out of the other runs' params, so that adding them changed no existing run of the DAG."""
    from ..attacks.registry import ATTACKS

    out: dict[str, str] = {}
    for name, cls in ATTACKS.items():  # a section several attacks read belongs to the first registered
        if cls.private_section:
            out.setdefault(cls.config_section, name)
    return out


def reads_section(attack: str | None, section: str) -> bool:
    """Whether the registered ``attack`` reads the private ``section`` (its own ``config_section``:
    e.g. ``diffattack0`` reads ``diffattack``)."""
    from ..attacks.registry import ATTACKS

    cls = ATTACKS.get(attack) if attack is not None else None
    return cls is not None and cls.config_section == section


class AttackRun(NamedTuple):
    """One attack run of the grid: ``results/attacks/{defense}/{threat}/{setting}/{attack}/``."""

    defense: str
    threat: str
    setting: str
    attack: str


@dataclass(frozen=True)
class Defense:
    """One defended classifier of the experiment.

    ``name`` keys its results; ``sampler`` is its purifier family; ``weights`` the folder under
    ``results/models/diffusion/`` it purifies with; ``finetune`` the ADDT variant that made those
    weights (None: the base network); ``family`` whether it is one of ``families.names``' defenses
    (else the main sampler's); ``trains`` whether this defense's own weights are trained by the
    DAG (an ADDT variant, or a family with its own ADDT loss); ``votes`` the purifications of its
    majority vote (:class:`~dbprepro.purifiers.vote.VoteDefense`; None: a single-draw defense);
    ``network`` the family's own registered network (``families.networks``: ``weights`` is then
    its folder, made by rule download_network; None: the diffusion section's UNet or its ADDT);
    ``competitor`` whether it is one of ``competitors.names``' defenses (a competing defense's
    paper: its sampler on the weights its purifier class pairs it with, :func:`competitor_weights`)."""

    name: str
    sampler: str
    weights: str
    finetune: str | None = None
    family: bool = False
    trains: bool = False
    votes: int | None = None
    network: str | None = None
    competitor: bool = False

    @property
    def weights_kind(self) -> str:
        """``vanilla`` (the base network) or ``addt`` (ADDT-fine-tuned weights)."""
        return "vanilla" if self.finetune is None else "addt"


@dataclass
class Experiment:
    """The defenses and attack grid of a validated config (:meth:`from_config`)."""

    cfg: dict[str, Any]
    defenses: dict[str, Defense] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "Experiment":
        """Build the experiment of ``cfg`` (validated: schema defaults filled in)."""
        exp = cls(cfg)
        main = cfg["purification"]["sampler"]
        exp._add(Defense("vanilla", main, "vanilla"))
        paired = competitor_weights(cfg)  # competing defense -> the addt variant training its weights
        for v in exp.addt_variants:
            if v in paired.values():  # the competitor's own defense (its sampler on these weights), below
                continue
            exp._add(Defense(v, main, v, finetune=v, trains=True))
        fam, own = cfg["families"], set(cfg["families"]["own_addt"])
        for f in [f for f in fam["names"] if f != main]:  # the main sampler is vanilla / addt
            net = (fam.get("networks") or {}).get(f, {}).get("network")
            exp._add(Defense(f, f, net or "vanilla", family=True, network=net))
            if fam["addt"] and "addt" in exp.addt_variants:
                name = f"{f}_addt"
                mine = f in own
                exp._add(Defense(name, f, name if mine else "addt", finetune="addt", family=True, trains=mine))
        vote = cfg.get("vote", {})
        if vote.get("enabled", False):  # DensePure-style vote: the vanilla network, the main sampler
            exp._add(Defense(VOTE_DEFENSE, main, "vanilla", votes=int(vote["votes"])))
        for name, variant in paired.items():  # ADBM: sampler adbm on the adbm fine-tune; GDMP: on vanilla
            exp._add(Defense(name, name, variant or "vanilla", finetune=variant, trains=variant is not None,
                             competitor=True))
        return exp

    def _add(self, d: Defense) -> None:
        self.defenses[d.name] = d

    # -- defenses -------------------------------------------------------------------------------
    @property
    def addt_variants(self) -> list[str]:
        a = self.cfg["addt"]
        return list(a["variants"]) if a["enabled"] else []

    def defense(self, name: str) -> Defense:
        try:
            return self.defenses[name]
        except KeyError:
            raise ConfigError(f"no defense {name!r} in this configuration (defenses: "
                              f"{', '.join(self.defenses)})") from None

    @property
    def family_defenses(self) -> list[str]:
        return [d.name for d in self.defenses.values() if d.family]

    @property
    def networks(self) -> dict[str, dict[str, Any]]:
        """The families' own networks the defenses purify with: network name -> its
        ``families.networks`` section (what rule download_network fetches)."""
        fam = self.cfg["families"].get("networks") or {}
        return {d.network: fam[d.sampler] for d in self.defenses.values() if d.network is not None}

    @property
    def competitor_defenses(self) -> list[str]:
        """The competing defenses (``competitors.names``: ADBM, GDMP)."""
        return [d.name for d in self.defenses.values() if d.competitor]

    @property
    def vote_defenses(self) -> list[str]:
        """The majority-vote defenses (``vote.enabled``: ``vanilla_vote``)."""
        return [d.name for d in self.defenses.values() if d.votes is not None]

    @property
    def own_addt(self) -> list[str]:
        """Family defenses fine-tuned with their family's own ADDT loss."""
        return [d.name for d in self.defenses.values() if d.family and d.trains]

    @property
    def trained_defenses(self) -> list[str]:
        """Defenses whose weights the DAG fine-tunes (rule train_addt)."""
        return [d.name for d in self.defenses.values() if d.trains]

    def finetune_family(self, name: str) -> str:
        """The purifier family whose ADDT loss trains the defense's weights: the family's own for a
        family with its own ADDT, else ``ddpm`` (paper 1's ADDT variants fine-tune the DDPM loss)."""
        d = self.defense(name)
        return d.sampler if d.family and d.trains else "ddpm"

    def purification(self, name: str) -> dict[str, Any]:
        """The ``purification`` section the defense purifies with (``sampler`` = its family; the
        undefended classifier's attack runs carry the main section, unused).  A vote defense's
        section also carries ``votes`` (read by :func:`~dbprepro.purifiers.load_defense`); a family section
        with its own ``t_star`` (``purification.gdmp.t_star``: GDMP's CIFAR-10 code: 36 steps, 0.035) replaces it."""
        if name == UNDEFENDED:
            return self.main_purification()
        d = self.defense(name)
        votes = {} if d.votes is None else {"votes": d.votes}
        return with_own_t_star({**self.main_purification(), "sampler": d.sampler, **votes})

    def main_purification(self) -> dict[str, Any]:
        """The config's ``purification`` section as the DAG's params: without
        ``activation_budget_mb`` where it is unset (null, its default), so that a config without
        grad_mode budget gives the params it gave before the key existed (no Snakemake reruns)."""
        pur = self.cfg["purification"]
        return {k: v for k, v in pur.items() if not (k == "activation_budget_mb" and v is None)}

    def attacks(self, name: str, setting: str | None = None, attack: str | None = None) -> dict[str, Any]:
        """The ``attacks`` section of one attack run of defense ``name``, with the run's own
        ``n_images``: ``families.n_images`` for the family defenses, ``vote.n_images`` for the vote
        defense, ``attacks.dwbox_n_images``
        for the DW-box PGD runs (``setting`` ``dwbox``, ``attack`` ``pgd``) of the main sampler's
        defenses (vanilla and the ADDT variants), else ``attacks.n_images``.  Without ``setting``
        and ``attack``: the section of the defense's other runs.  The section leaves out
        ``dwbox_n_images`` (resolved into ``n_images``), so the params of the runs it does not
        concern are unchanged by it; likewise the :func:`private_sections` go to their own
        attack's runs only, and no attack's section carries where it runs (``defenses``,
        ``n_images``: the grid's business), so listing a further defense changes no run's params."""
        from ..attacks.registry import ATTACKS

        private = private_sections()
        section = {k: v for k, v in self.cfg["attacks"].items()
                   if k != "dwbox_n_images" and (k not in private or reads_section(attack, k))}
        own = {cls.config_section for cls in ATTACKS.values() if cls.config_section}
        for k in set(section) & own:  # where it runs is the grid's business, not the run's
            if isinstance(section[k], dict):
                section[k] = {kk: vv for kk, vv in section[k].items() if kk not in ("defenses", "n_images")}
        return {**section, "n_images": self.attack_n_images(name, setting, attack)}

    def attack_n_images(self, name: str, setting: str | None = None, attack: str | None = None) -> int:
        """Images attacked by the run (defense ``name``, ``setting``, ``attack``): see :meth:`attacks`;
        an attack whose section sets ``n_images`` (:meth:`~dbprepro.attacks.base.Attack.n_images`)
        attacks at most that many of them."""
        n = self._defense_n_images(name, setting, attack)
        if attack is not None and name != UNDEFENDED:
            from ..attacks.registry import attack_class

            own = attack_class(attack).n_images(self.cfg["attacks"])
            n = n if own is None else min(n, int(own))
        return n

    def _defense_n_images(self, name: str, setting: str | None, attack: str | None) -> int:
        att = self.cfg["attacks"]
        if name == UNDEFENDED:
            return att["n_images"]
        d = self.defense(name)
        if d.competitor:  # every run of a competing defense, DW-box PGD included
            n = (self.cfg["competitors"]["n_images"] or {}).get(name)
            return att["n_images"] if n is None else n
        if d.votes is not None:
            n = self.cfg["vote"]["n_images"]
            return att["n_images"] if n is None else n
        if d.family:
            n = self.cfg["families"]["n_images"]
            return att["n_images"] if n is None else n
        if setting == "dwbox" and attack == "pgd" and att.get("dwbox_n_images") is not None:
            return att["dwbox_n_images"]
        return att["n_images"]

    def sanity_n_images(self, name: str) -> int:
        """Images of the sanity battery on defense ``name``: ``sanity.n_images``, at most the images a
        competing defense's runs attack (``competitors.n_images``)."""
        n = int(self.cfg["sanity"]["n_images"])
        d = self.defenses.get(name)
        return min(n, self._defense_n_images(name, None, None)) if d is not None and d.competitor else n

    def addt_settings(self, variant: str) -> list[str]:
        """Settings the ADDT defense ``variant`` is attacked in: ``addt.attack_settings`` for
        ``addt``, ``addt.ablation_settings`` (default: the same) for the ablation variants."""
        a = self.cfg["addt"]
        if variant in self.defenses and self.defenses[variant].competitor:
            return list(self.cfg["competitors"]["settings"])
        if variant != "addt" and a["ablation_settings"] is not None:
            return list(a["ablation_settings"])
        return list(a["attack_settings"])

    # -- the attack grid ------------------------------------------------------------------------
    def attack_runs(self, fixed_configs: bool = False) -> list[AttackRun]:
        """Every configured attack run: the undefended reference, every registered attack's runs on
        the vanilla purifier (paper 1's main table) and on the further defenses its section lists
        (``defenses``: the adaptive attacks of the waterfall), the ADDT defenses in their settings,
        the families and the vote defense (``vote.enabled``).  With ``fixed_configs``, also paper 2's attacks on the further fixed randomness
        configurations (``dwbox_c<k>``, :func:`fixed_setting_name`)."""
        from ..attacks.registry import ATTACKS

        cfg, att = self.cfg, self.cfg["attacks"]
        names = [tm["name"] for tm in att["threat_models"]]
        runs = [AttackRun(UNDEFENDED, tm, "none", "pgd") for tm in names]
        for tm in names:
            for attack, cls in ATTACKS.items():
                runs += [AttackRun("vanilla", tm, s, attack) for s in cls.settings(att, tm)]
        for attack, cls in ATTACKS.items():  # the attacks run on further defenses (their ``defenses``;
            for d in cls.defenses(att):      # one this config switches off, e.g. addt, is skipped)
                if d == "vanilla" or d not in self.defenses:
                    continue
                runs += [AttackRun(d, tm, s, attack) for tm in names for s in cls.settings(att, tm)]
        for v in [v for v in self.addt_variants if not self.defense(v).competitor]:
            for tm in cfg["addt"]["attack_threat_models"]:
                runs += [AttackRun(v, tm, s, "pgd") for s in self.addt_settings(v)]
        comp = cfg.get("competitors") or {}  # (a competing defense exists only where the section lists it)
        for d in self.competitor_defenses:  # PGD in competitors.settings, as on ADDT
            for tm in comp["threat_models"]:
                runs += [AttackRun(d, tm, s, "pgd") for s in comp["settings"]]
        fam = cfg["families"]
        for d in self.family_defenses:
            for tm in fam["threat_models"]:
                runs += [AttackRun(d, tm, s, "pgd") for s in fam["settings"]]
        for d in self.vote_defenses:  # EOT-PGD aimed at the vote
            for tm in cfg["vote"]["threat_models"]:
                runs += [AttackRun(d, tm, s, "pgd") for s in cfg["vote"]["settings"]]
        if fixed_configs and cfg["analysis"]["enabled"]:
            for k in range(cfg["analysis"]["fixed_configs"]):
                run = AttackRun("vanilla", analysis_threat(cfg), fixed_setting_name(k, att["fixed_draw"]), "pgd")
                if run not in runs:
                    runs.append(run)
        return runs


def with_own_t_star(purification: dict[str, Any]) -> dict[str, Any]:
    """A ``purification`` section whose sampler's own section sets ``t_star`` (``purification.gdmp.t_star``:
    GDMP's CIFAR-10 code, 36 steps, 0.035), with that ``t_star``; otherwise the section as it is."""
    own = purification.get(purification["sampler"])
    t_star = own.get("t_star") if isinstance(own, dict) else None
    return purification if t_star is None else {**purification, "t_star": t_star}


def competitor_weights(cfg: dict[str, Any]) -> dict[str, str | None]:
    """Each competing defense of ``competitors.names`` -> the addt variant whose fine-tune it purifies
    (its purifier class's ``paired_variant``: adbm -> adbm, trained by rule train_addt), or None for
    the vanilla weights (gdmp).  Reads the purifier registry (imports torch) only when a competitor is
    listed."""
    names = list((cfg.get("competitors") or {}).get("names") or [])
    if not names:
        return {}
    from ..purifiers.registry import purifier_class

    return {n: purifier_class(n).paired_variant for n in names}


def threat_model(attacks: dict[str, Any], name: str) -> dict[str, Any]:
    """The threat model called ``name`` in the ``attacks`` config section."""
    for tm in attacks["threat_models"]:
        if tm["name"] == name:
            return tm
    raise ConfigError(f"no threat model named {name!r} in attacks.threat_models")


def analysis_threat(cfg: dict[str, Any]) -> str:
    """Name of the threat model paper 2's analyses use (``analysis.threat_model``, else the first)."""
    name = cfg["analysis"]["threat_model"]
    return name if name is not None else cfg["attacks"]["threat_models"][0]["name"]


def fixed_setting_name(k: int, default_draw: int = 0) -> str:
    """The attack setting that attacks fixed randomness configuration ``k``: ``dwbox`` when ``k``
    is ``attacks.fixed_draw`` (that run exists already), else ``dwbox_c{k}``."""
    if int(k) < 0:
        raise ValueError(f"a fixed configuration is a non-negative integer, got {k}")
    return "dwbox" if int(k) == int(default_draw) else f"dwbox_c{int(k)}"


# -- the function API of 0.1 (each builds the Experiment) ---------------------------------------
def addt_settings(cfg: dict[str, Any], variant: str) -> list[str]:
    return Experiment.from_config(cfg).addt_settings(variant)


def family_defenses(cfg: dict[str, Any]) -> list[str]:
    return Experiment.from_config(cfg).family_defenses


def own_addt_defenses(cfg: dict[str, Any]) -> list[str]:
    return Experiment.from_config(cfg).own_addt


def defense_family(cfg: dict[str, Any], defense: str) -> str:
    exp = Experiment.from_config(cfg)
    return exp.defenses[defense].sampler if defense in exp.defenses else cfg["purification"]["sampler"]


def defense_weights(cfg: dict[str, Any], defense: str) -> str:
    exp = Experiment.from_config(cfg)
    return exp.defenses[defense].weights if defense in exp.defenses else defense


def defense_purification(cfg: dict[str, Any], defense: str) -> dict[str, Any]:
    return {**cfg["purification"], "sampler": defense_family(cfg, defense)}


def defense_attacks(cfg: dict[str, Any], defense: str, setting: str | None = None,
                    attack: str | None = None) -> dict[str, Any]:
    exp = Experiment.from_config(cfg)
    return exp.attacks(defense, setting, attack) if defense in exp.defenses else cfg["attacks"]


def attack_runs(cfg: dict[str, Any], fixed_configs: bool = False) -> list[AttackRun]:
    return Experiment.from_config(cfg).attack_runs(fixed_configs)
