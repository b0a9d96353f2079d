"""The checks of the ``competitors`` section (ADBM, GDMP as defenses) that a schema cannot express; called
by :func:`~dbprepro.config.validate.validate_config`."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError


def competitor_checks(cfg: dict[str, Any], names: list[str]) -> None:
    """``competitors``: a competitor trained by an ``addt.variants`` fine-tune (ADBM) needs that variant
    trained; no competitor is also a ``families.names`` defense; its threat models are names of
    ``attacks.threat_models``; its ``n_images`` (of the listed competitors) fit in ``attacks.n_images`` and
    fill ``attacks.shards`` batches; its sampler passes its family's ``check_config``."""
    from ..purifiers.registry import purifier_class
    from .experiment import with_own_t_star

    comp, a, att = cfg["competitors"], cfg["addt"], cfg["attacks"]
    for name in comp["names"]:
        variant = purifier_class(name).paired_variant
        if variant is not None and not (a["enabled"] and variant in a["variants"]):
            raise ConfigError(f"config key competitors.names: {name!r} purifies the {variant!r} fine-tune, which "
                              f"needs addt.enabled: true and {variant!r} in addt.variants (rule train_addt trains it)")
        if name in cfg["families"]["names"]:
            raise ConfigError(f"config key competitors.names: {name!r} is also in families.names (the {name} sampler "
                              "on the vanilla weights, a defense of the same name); list it in only one of the two")
        pur = with_own_t_star({**cfg["purification"], "sampler": name})  # the family's own t*, if set
        try:
            purifier_class(name).check_config({**cfg, "purification": pur})
        except ValueError as e:
            raise ConfigError(str(e)) from None
    bad = [t for t in comp["threat_models"] if t not in names]
    if bad:
        raise ConfigError(f"config key competitors.threat_models: {bad} are not names in attacks.threat_models "
                          f"({', '.join(names)})")
    for name, n in (comp["n_images"] or {}).items():
        if n is None or name not in comp["names"]:  # an overlay that drops a competitor may keep its size
            continue
        if n > att["n_images"]:
            raise ConfigError(f"config key competitors.n_images.{name}: {n} exceeds attacks.n_images "
                              f"({att['n_images']}); the competitors attack the images vanilla and ADDT do")
        if att["shards"] > -(-n // att["batch_size"]):
            raise ConfigError(f"config key competitors.n_images.{name}: {n} images are fewer than attacks.shards "
                              f"({att['shards']}) batches of {att['batch_size']}")
