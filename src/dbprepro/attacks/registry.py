"""The registry of attacks: ``name`` -> class (:class:`~dbprepro.attacks.base.Attack`).

An attack registers itself with :func:`register_attack`; the attack grid, the Snakefile's
wildcard constraints, the attack stage, the cost model, the API and the CLI read :data:`ATTACKS`.
Adding an attack is one module in ``dbprepro/attacks/`` (plus its config section in the schema, if
it has settings of its own); the package's ``__init__`` imports every module of the folder.
"""

from __future__ import annotations

from ..registry import Registry

#: attack name -> class, in registration order (the order of the attack grid's runs)
ATTACKS: Registry = Registry("attack", key="name")
#: class decorator: register an attack under its ``name``
register_attack = ATTACKS.register
#: the registered attack ``name``, or a ValueError listing the known ones
attack_class = ATTACKS.get_class


def attack_names() -> tuple[str, ...]:
    """Names of every registered attack."""
    return tuple(ATTACKS)
