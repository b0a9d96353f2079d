"""The registry of purifier families: ``sampler`` name -> class.

A family registers itself with :func:`register_purifier`; every other part of the package reads
:data:`PURIFIERS` (the factory :func:`build_purifier`, config checks, the cost model, ADDT, the API
and the CLI), so adding a family is one module in ``dbprepro/purifiers/`` plus its config section
in the schema.  The modules of ``dbprepro/purifiers/`` are imported (and so registered) by the
package's ``__init__``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from ..randomness import Randomness
    from .base import ReverseChain
    from .defended import DefendedClassifier

#: sampler name -> purifier family class, in registration order
PURIFIERS: Registry = Registry("purifier family (sampler)", key="sampler")
#: class decorator: register a purifier family under its ``sampler`` name
register_purifier = PURIFIERS.register
#: the registered family ``sampler``, or a ValueError listing the known ones
purifier_class = PURIFIERS.get_class


def samplers() -> tuple[str, ...]:
    """Names of every registered purifier family."""
    return tuple(PURIFIERS)


def build_purifier(unet, scheduler, purification: dict[str, Any], randomness: "Randomness | None" = None,
                   grad_mode: str | None = None) -> "ReverseChain":
    """The purifier of ``purification.sampler`` (default ddpm) from a ``purification`` config section."""
    cls = purifier_class(purification.get("sampler", "ddpm"))
    return cls.from_config(unet, scheduler, purification, randomness=randomness, grad_mode=grad_mode)


def load_purifier(diffusion_dir, purification: dict[str, Any], variance_type: str, randomness: "Randomness",
                  device) -> "ReverseChain":
    """:func:`build_purifier` on the network of a diffusers folder (the DAG's model folders)."""
    from ..models.diffusion import load_diffusion

    unet, scheduler = load_diffusion(diffusion_dir, scheduler_overrides={"variance_type": variance_type})
    return build_purifier(unet.to(device), scheduler, purification, randomness)


def load_defense(classifier_dir, diffusion_dir, purification: dict, variance_type: str, randomness,
                 device) -> "DefendedClassifier":
    """Classifier after purifier, both loaded from the DAG's model folders.  A ``votes`` key in
    ``purification`` (the vote defense's, :meth:`dbprepro.config.Experiment.purification`) makes
    it a :class:`~dbprepro.purifiers.vote.VoteDefense` over that many purifications."""
    from ..models.classifiers import load_classifier
    from .defended import DefendedClassifier
    from .vote import VoteDefense

    classifier = load_classifier(classifier_dir).to(device)
    votes = purification.get("votes")
    chain = {k: v for k, v in purification.items() if k != "votes"}
    purifier = load_purifier(diffusion_dir, chain, variance_type, randomness, device)
    if votes is None:
        return DefendedClassifier(classifier, purifier, purification)
    return VoteDefense(classifier, purifier, purification, votes)


make_purifier = build_purifier  # its name in dbprepro.continuous before 0.2
