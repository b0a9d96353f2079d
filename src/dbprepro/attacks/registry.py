"""The registry of attacks: ``name`` -> class (:class:`~dbprepro.attacks.base.Attack`).

An attack registers itself with :func:`register_attack`; the attack grid, the Snakefile's
wildcard constraints, the attack stage, the cost model, the API and the CLI read :data:`ATTACKS`.
Adding an attack is one module in ``dbprepro/attacks/`` (plus its config section in the schema, if
it has settings of its own); the package's ``__init__`` imports every module of the folder.
"""

from __future__ import annotations

#: attack name -> class, in registration order (the order of the attack grid's runs)
ATTACKS: dict[str, type] = {}


def register_attack(cls):
    """Class decorator: register an attack under its ``name``."""
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute name = '<attack>' to be registered")
    if name in ATTACKS and ATTACKS[name] is not cls:
        raise ValueError(f"attack {name!r} is registered twice ({ATTACKS[name].__name__}, {cls.__name__})")
    ATTACKS[name] = cls
    return cls


def attack_names() -> tuple[str, ...]:
    """Names of every registered attack."""
    return tuple(ATTACKS)


def attack_class(name: str):
    """The registered attack ``name``, or a ValueError listing the known ones."""
    try:
        return ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; registered: {', '.join(ATTACKS)}") from None
