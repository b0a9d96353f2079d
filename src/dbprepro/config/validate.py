"""Validation of a configuration: one JSON schema, then the checks a schema cannot express.

The schema (``schemas/config.schema.yaml`` inside the package) documents every key.  Snakemake
(``workflow/rules/common.smk``) and the CLI both call :func:`validate_config`, which runs
``snakemake.utils.validate`` (JSON-schema validation that also fills defaults) and then the
checks a schema cannot express; every failure is a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .attack_checks import _diffhammer_checks, _grad_mode_checks
from .competitor_checks import competitor_checks

SCHEMA_PATH = Path(__file__).parent.parent / "schemas" / "config.schema.yaml"


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _schema_message(err) -> str:
    """A one-line message for a jsonschema ValidationError, naming the key."""
    path = list(err.absolute_path)
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        where = _key(path)
        known = ", ".join(sorted(err.schema.get("properties", {})))
        return f"unknown config key(s) {', '.join(map(repr, extra))} in {where} (known: {known})"
    if err.validator == "required":
        return f"config section {_key(path)}: {err.message}"
    desc = err.schema.get("description")
    hint = f" ({desc})" if isinstance(desc, str) and len(desc) < 160 else ""
    return f"config key {_key(path)}: {err.message}{hint}"


def load_yaml(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys, got {type(data).__name__}")
    return data


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate ``config`` in place (defaults filled in) and return it, or raise ConfigError."""
    import jsonschema
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    if not isinstance(config, dict):
        raise ConfigError(f"a config must be a mapping of keys, got {type(config).__name__}")
    _migrate_deprecated(config)
    # validate a copy first: snakemake's validator reports the *first* error it meets, and we
    # want the best-matching one (jsonschema.exceptions.best_match) with its key path.
    validator = jsonschema.Draft202012Validator(yaml.safe_load(SCHEMA_PATH.read_text()))
    best = jsonschema.exceptions.best_match(validator.iter_errors(copy.deepcopy(config)))
    if best is not None:
        raise ConfigError(_schema_message(best))
    try:
        validate(config, str(SCHEMA_PATH), set_default=True)
    except WorkflowError as e:  # pragma: no cover - the check above catches the same errors
        raise ConfigError(str(e)) from e
    _semantic_checks(config)
    return config


#: attacks.autoattack.versions (deprecated) -> the protocol of attacks.autoattack.protocols
AUTOATTACK_VERSIONS = {"standard": "standard_dwbox", "rand": "rand"}


def _migrate_deprecated(config: dict[str, Any]) -> None:
    """Rewrite deprecated keys in place, with a DeprecationWarning: ``attacks.autoattack.versions``
    (``standard`` -> ``standard_dwbox``, ``rand``) becomes ``attacks.autoattack.protocols``, which
    it replaces (an overlay naming ``versions`` over a base naming ``protocols`` wins)."""
    att = config.get("attacks")
    aa = att.get("autoattack") if isinstance(att, dict) else None
    if not isinstance(aa, dict) or "versions" not in aa:
        return
    versions = aa.pop("versions")
    if not isinstance(versions, list) or not all(isinstance(v, str) and v in AUTOATTACK_VERSIONS for v in versions):
        raise ConfigError(f"config key attacks.autoattack.versions (deprecated): {versions!r} is not a list of "
                          f"{', '.join(AUTOATTACK_VERSIONS)}; use attacks.autoattack.protocols "
                          "(standard_dwbox, standard_multieval, rand)")
    aa["protocols"] = list(dict.fromkeys(AUTOATTACK_VERSIONS[v] for v in versions))
    warnings.warn(f"config key attacks.autoattack.versions is deprecated: read as protocols: {aa['protocols']} "
                  "(standard is standard_dwbox; paper 1's Fixed-AutoAttack is standard_multieval)",
                  DeprecationWarning, stacklevel=3)


def _subset_checks(key: str, sec: dict[str, Any], att: dict[str, Any], names: list[str], active: bool) -> None:
    """A section that attacks a subset of the grid (``families``, ``vote``): its threat models are
    names of ``attacks.threat_models``; its ``n_images`` fit in ``attacks.n_images`` and, when the
    section is ``active``, fill ``attacks.shards`` batches."""
    for tm in sec["threat_models"]:
        if tm not in names:
            raise ConfigError(f"config key {key}.threat_models: {tm!r} is not a name in attacks.threat_models "
                              f"({', '.join(names)})")
    n = sec["n_images"]
    if n is not None and n > att["n_images"]:
        raise ConfigError(f"config key {key}.n_images: {n} exceeds attacks.n_images ({att['n_images']})")
    if active and n is not None and att["shards"] > -(-n // att["batch_size"]):
        raise ConfigError(f"config key {key}.n_images: {n} images are fewer than attacks.shards "
                          f"({att['shards']}) batches of {att['batch_size']}")


def _semantic_checks(cfg: dict[str, Any]) -> None:
    data, clf, dif = cfg["data"], cfg["classifier"], cfg["diffusion"]
    if data["dataset"] == "cifar10" and "download" not in data:
        raise ConfigError("config key data.download: required for dataset cifar10 (repo, revision, sha256 per file)")
    for section, name in ((clf, "classifier"), (dif, "diffusion")):
        if section["source"] == "download" and "download" not in section:
            raise ConfigError(f"config key {name}.download: required when {name}.source is 'download'")
    unpinned = [(key, section) for key, section in unpinned_entries(cfg) if not section.get("allow_unpinned", False)]
    if unpinned:
        keys = "; ".join(key for key, _ in unpinned)
        raise ConfigError(f"config key {keys}: not pinned (null). Pin the sha256 / 40-hex commit (a first online run "
                          "with allow_unpinned: true in that download section records and prints them; "
                          "`dbprepro sha256 <file>` prints a file's hash), or set allow_unpinned: true there")
    unet = dif["unet"]
    if len(unet["attention"]) != len(unet["block_out_channels"]):
        raise ConfigError("config key diffusion.unet.attention: needs one entry per level of "
                          f"block_out_channels ({len(unet['block_out_channels'])}), got {len(unet['attention'])}")
    bad = [c for c in unet["block_out_channels"] if c % unet["norm_num_groups"]]
    if bad:
        raise ConfigError(f"config key diffusion.unet.norm_num_groups: {unet['norm_num_groups']} does not divide "
                          f"the channel counts {bad}")
    sch = dif["schedule"]
    if sch["beta_end"] <= sch["beta_start"]:
        raise ConfigError("config key diffusion.schedule.beta_end: must be larger than beta_start")
    _purifier_checks(cfg)
    att = cfg["attacks"]
    if att["n_images"] > data["n_test"]:
        raise ConfigError(f"config key attacks.n_images: {att['n_images']} exceeds data.n_test ({data['n_test']})")
    n_batches = -(-att["n_images"] // att["batch_size"])
    if att["shards"] > n_batches:
        raise ConfigError(f"config key attacks.shards: {att['shards']} shards but only {n_batches} batches of "
                          f"{att['batch_size']} among {att['n_images']} images")
    _dwbox_n_images_checks(att, data["n_test"])
    n_fixed = cfg["evaluation"]["fixed_configs"]  # the configurations evaluate_clean scores
    if att["fixed_draw"] >= n_fixed:
        raise ConfigError(f"config key attacks.fixed_draw: configuration {att['fixed_draw']} is not clean-evaluated "
                          f"(evaluation.fixed_configs = {n_fixed} scores configurations 0..{n_fixed - 1})")
    names = [t["name"] for t in att["threat_models"]]
    if len(set(names)) != len(names):
        raise ConfigError(f"config key attacks.threat_models: names must be unique, got {names}")
    for tm in att["autoattack"]["threat_models"]:
        if tm not in names:
            raise ConfigError(f"config key attacks.autoattack.threat_models: {tm!r} is not a name in "
                              f"attacks.threat_models ({', '.join(names)})")
    fam = cfg["families"]
    _subset_checks("families", fam, att, names, bool(fam["names"]))
    if fam["names"] and fam["addt"] and not (cfg["addt"]["enabled"] and "addt" in cfg["addt"]["variants"]):
        raise ConfigError("config key families.addt: needs addt.enabled and 'addt' in addt.variants "
                          "(or set families.addt: false)")
    _adbm_checks(cfg)
    competitor_checks(cfg, names)
    _vote_checks(cfg, names)
    _attack_defenses_checks(cfg)
    _diffhammer_checks(cfg["attacks"]["diffhammer"])
    _sanity_checks(cfg, names)
    _network_checks(cfg)
    _replicates_checks(cfg)
    an = cfg["analysis"]
    if an["threat_model"] is not None and an["threat_model"] not in names:
        raise ConfigError(f"config key analysis.threat_model: {an['threat_model']!r} is not a name in "
                          f"attacks.threat_models ({', '.join(names)})")
    if an["n_images"] is None:
        an["n_images"] = att["n_images"]  # resolved here, so stages and Snakemake params see the number
    elif an["n_images"] > att["n_images"]:
        raise ConfigError(f"config key analysis.n_images: {an['n_images']} exceeds attacks.n_images ({att['n_images']}); "
                          "the analyses use attacked images")
    if data["dataset"] == "digits":
        n_test_max = int(1797 * data["test_fraction"]) - 1
        if data["n_test"] > n_test_max:
            raise ConfigError(f"config key data.n_test: {data['n_test']} exceeds the ~{n_test_max} test images of "
                              f"the digits split with test_fraction {data['test_fraction']}")


def _adbm_checks(cfg: dict[str, Any]) -> None:
    """The ``adbm`` training variant: its T' range within the schedule, and its defense name not also a
    family defense's (``families.names``: adbm is the ADBM sampler on the vanilla weights)."""
    a = cfg["addt"]
    if not (a["enabled"] and "adbm" in a["variants"]):
        return
    T, b = cfg["diffusion"]["schedule"]["num_train_timesteps"], a["adbm"]
    if not b["t_prime_min"] <= b["t_prime_max"] < T:
        raise ConfigError(f"config key addt.adbm.t_prime_max: the bridge ends need t_prime_min <= t_prime_max < {T} "
                          f"(num_train_timesteps), got {b['t_prime_min']} and {b['t_prime_max']}")
    if "adbm" in cfg["families"]["names"]:
        raise ConfigError("config key families.names: 'adbm' there is the ADBM sampler on the vanilla weights, a "
                          "defense named like the adbm fine-tune of addt.variants; list it in only one of the two")


def _vote_checks(cfg: dict[str, Any], names: list[str]) -> None:
    """``vote``: threat models named in ``attacks.threat_models``, at most ``attacks.n_images`` images."""
    vote, att = cfg["vote"], cfg["attacks"]
    _subset_checks("vote", vote, att, names, bool(vote["enabled"]))


def possible_defenses() -> set[str]:
    """Every defense name some configuration can have: vanilla, the ADDT variants of the schema, every
    registered purifier family and its ``_addt`` defense, and the vote defense."""
    from ..purifiers.registry import PURIFIERS
    from .experiment import VOTE_DEFENSE

    schema = load_yaml(SCHEMA_PATH)["properties"]["addt"]["properties"]["variants"]["items"]["enum"]
    return {"vanilla", VOTE_DEFENSE, *schema, *PURIFIERS, *(f"{f}_addt" for f in PURIFIERS)}  # competitors: PURIFIERS


def _network_checks(cfg: dict[str, Any]) -> None:
    """``families.networks``: registered networks of the family they are listed under, for families
    the config evaluates, and not fine-tuned with ADDT (``families.own_addt``: not supported yet)."""
    from ..models.networks import network_class

    fam = cfg["families"]
    for family, net in fam["networks"].items():
        key = f"config key families.networks.{family}"
        try:
            cls = network_class(net["network"])
        except ValueError as e:
            raise ConfigError(f"{key}.network: {e}") from None
        if cls.family != family:
            raise ConfigError(f"{key}.network: {net['network']!r} is a network of the {cls.family} family, not {family}")
        if family not in fam["names"]:
            raise ConfigError(f"{key}: {family!r} is not in families.names ({', '.join(fam['names']) or 'none'})")
        if family in fam["own_addt"]:
            raise ConfigError(f"{key}: fine-tuning {net['network']} with ADDT is not supported yet; leave {family!r} "
                              "out of families.own_addt (its _addt defense then purifies with the addt weights)")


def _attack_defenses_checks(cfg: dict[str, Any]) -> None:
    """Every attack's ``defenses`` (its own section's, :meth:`~dbprepro.attacks.base.Attack.defenses`)
    name defenses some configuration has (:func:`possible_defenses`: one this configuration
    switches off, e.g. ``addt`` without ADDT, is skipped by the grid; a typo is refused); its own
    ``n_images`` fill ``attacks.shards`` batches."""
    from ..attacks.registry import ATTACKS
    from .experiment import Experiment

    possible, known = possible_defenses(), Experiment.from_config(cfg).defenses
    for name, cls in ATTACKS.items():
        bad = [d for d in cls.defenses(cfg["attacks"]) if d not in possible]
        if bad:
            raise ConfigError(f"config key attacks.{cls.config_section}.defenses: {bad} are not defenses (this "
                              f"configuration's: {', '.join(known)})")
        n, att = cls.n_images(cfg["attacks"]), cfg["attacks"]
        if n is not None and any(cls.settings(att, tm["name"]) for tm in att["threat_models"]) \
                and att["shards"] > -(-min(n, att["n_images"]) // att["batch_size"]):
            raise ConfigError(f"config key attacks.{cls.config_section}.n_images: {n} images are fewer than "
                              f"attacks.shards ({att['shards']}) batches of {att['batch_size']}")


def _sanity_checks(cfg: dict[str, Any], names: list[str]) -> None:
    """``sanity``: its defenses, threat models, epsilon factors, images, transfer sources and the
    reference runs its checks compare with (:func:`dbprepro.sanity.plan.config_problem`)."""
    from ..sanity.plan import config_problem
    from .experiment import Experiment

    problem = config_problem(cfg, Experiment.from_config(cfg), names, possible_defenses())
    if problem:
        raise ConfigError(f"config key sanity.{problem}")


def _dwbox_n_images_checks(att: dict[str, Any], n_test: int) -> None:
    """``attacks.dwbox_n_images``: between ``attacks.n_images`` and ``data.n_test``, with at least
    one fixed batch per shard."""
    n = att.get("dwbox_n_images")
    if n is None:
        return
    if n > n_test:
        raise ConfigError(f"config key attacks.dwbox_n_images: {n} exceeds data.n_test ({n_test})")
    if n < att["n_images"]:
        raise ConfigError(f"config key attacks.dwbox_n_images: {n} is below attacks.n_images ({att['n_images']}); "
                          "the DW-box runs attack at least the images every other run attacks")
    if att["shards"] > -(-n // att["batch_size"]):
        raise ConfigError(f"config key attacks.dwbox_n_images: {n} images are fewer than attacks.shards "
                          f"({att['shards']}) batches of {att['batch_size']}")


def _purifier_checks(cfg: dict[str, Any]) -> None:
    """The checks of every purifier family the config uses (the registered class's ``check_config``),
    then the gradient modes (:func:`_grad_mode_checks`)."""
    from ..purifiers import purifier_class

    pur, fam = cfg["purification"], cfg["families"]
    try:
        for name in dict.fromkeys([pur["sampler"], *fam["names"]]):
            purifier_class(name).check_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _grad_mode_checks(cfg)
    own = [f for f in fam["own_addt"] if purifier_class(f).loss_family == "ddpm"]
    if own:
        raise ConfigError(f"config key families.own_addt: {own} fine-tune with the DDPM loss, which the addt weights "
                          "already are; list only families with an ADDT loss of their own")


def unpinned_entries(cfg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(config key, its download section)`` of every sha256 or hub revision left null in the
    download sections of the data, classifier, diffusion model and families' own networks that the
    config uses.
    Torch-free (Snakemake and the CLI call it)."""
    out: list[tuple[str, dict[str, Any]]] = []
    sections = []
    if cfg.get("data", {}).get("dataset") == "cifar10":
        sections.append(("data.download", cfg["data"].get("download")))
    for name in ("classifier", "diffusion"):
        if cfg.get(name, {}).get("source") == "download":
            sections.append((f"{name}.download", cfg[name].get("download")))
    for fam, net in (cfg.get("families", {}).get("networks") or {}).items():
        if fam in cfg.get("families", {}).get("names", []):
            sections.append((f"families.networks.{fam}.download", net.get("download")))
    for where, dl in sections:
        if not isinstance(dl, dict):
            continue
        if "files" in dl:  # a hub download
            if dl.get("revision") is None:
                out.append((f"{where}.revision", dl))
            out += [(f"{where}.files[{name!r}]", dl) for name, sha in dl["files"].items() if sha is None]
        elif dl.get("sha256", "") is None:
            out.append((f"{where}.sha256", dl))
    return out


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML config, apply ``overrides`` (deep-merged) and validate it."""
    cfg = load_yaml(path)
    if overrides:
        cfg = deep_merge(cfg, overrides)
    return validate_config(cfg)


def load_configs(paths) -> dict[str, Any]:
    """Read YAML configs, later files overlaying earlier ones key by key (as Snakemake's
    ``--configfile``), and validate the result (raises :class:`ConfigError`)."""
    cfg: dict[str, Any] = {}
    for path in paths:
        cfg = deep_merge(cfg, load_yaml(path))
    return validate_config(cfg)


def deep_merge(base: dict, extra: dict) -> dict:
    """Recursively merge ``extra`` into a copy of ``base`` (mappings merge, other values replace)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def check_dag_config(cfg: dict[str, Any]) -> None:
    """Checks of a validated config that only the whole DAG needs (``dbprepro evaluate`` may
    clean-evaluate fewer configurations): paper 2's fixed configurations must be clean-evaluated,
    or its tables would lack their clean accuracy."""
    n_fixed, an = cfg["evaluation"]["fixed_configs"], cfg["analysis"]
    if an["enabled"] and an["fixed_configs"] > n_fixed:
        raise ConfigError(f"config key analysis.fixed_configs: {an['fixed_configs']} configurations, but "
                          f"evaluation.fixed_configs = {n_fixed} clean-evaluates only configurations 0..{n_fixed - 1}")


def _replicates_checks(cfg: dict[str, Any]) -> None:
    """``replicates``: the seeds are distinct non-negative integers (YAML floats such as 1.0 are
    refused), at least 2 of them for a combined test, with the claims table they compare; the
    internal ``module_seed`` marks one replicate's module (its own seed, no seeds of its own)."""
    rep = cfg["replicates"]
    seeds = rep["seeds"]
    bad = [s for s in seeds if not isinstance(s, int) or isinstance(s, bool) or s < 0]
    if bad:
        raise ConfigError(f"config key replicates.seeds: {bad} are not non-negative integers")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"config key replicates.seeds: duplicate seeds in {seeds}")
    if len(seeds) == 1:
        raise ConfigError(f"config key replicates.seeds: {seeds} is one seed; a combined test across seeds needs "
                          "at least 2 (or [] for no replicates)")
    if seeds and not cfg["claims"]["enabled"]:
        raise ConfigError("config key replicates.seeds: needs claims.enabled (claims_replicates.csv compares the "
                          "seeds' claims tables)")
    module_seed = rep["module_seed"]
    if module_seed is not None and (module_seed != cfg["seed"] or seeds):
        raise ConfigError(f"config key replicates.module_seed: internal (set by workflow/rules/replicates.smk); "
                          f"{module_seed} must equal seed ({cfg['seed']}) with replicates.seeds empty")
