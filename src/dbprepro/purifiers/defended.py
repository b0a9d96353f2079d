"""The defended classifier: classifier after purifier, one ``nn.Module`` from images to logits."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from .base import ReverseChain


class ChainForward(NamedTuple):
    """The defense's forward with its chain states (:meth:`DefendedClassifier.forward_states`):
    ``logits`` [B, C] exactly as ``forward`` returns them, and the kept ``states`` of the
    purifications that made them, each [B * copies, ...] image-major (``copies`` purifications per
    image: 1, or a vote's V), with the purifier ``ids`` and ``draws`` [B * copies] of those
    purifications."""

    logits: torch.Tensor
    states: list[torch.Tensor]
    ids: torch.Tensor
    draws: torch.Tensor
    copies: int


class DefendedClassifier(nn.Module):
    """Classifier after purifier, an ``nn.Module`` mapping [0, 1] images to logits.

    Usable directly by torchattacks: ``forward(x)`` purifies with the purifier's randomness
    (fresh per call in random mode, always the same in fixed mode).  Sample ids (needed for
    replayable noise) are bound with :meth:`bind`; without binding they are ``0..B-1``.
    ``purification`` is the config section the purifier was built from, when known (an attack
    with a purification process of its own, :mod:`dbprepro.attacks.surrogate`, overlays it).
    """

    def __init__(self, classifier: nn.Module, purifier: ReverseChain, purification: dict | None = None):
        super().__init__()
        self.classifier = classifier.eval()
        self.purifier = purifier
        self.purification = None if purification is None else dict(purification)
        self._ids: torch.Tensor | None = None
        self._draws: torch.Tensor | None = None
        self.eval()  # a defense is evaluated, never trained through (dropout/BatchNorm off)

    def bind(self, ids=None, draws=None) -> "_Binding":
        """Context manager: use these sample ids (and optionally draws) in ``forward(x)``."""
        return _Binding(self, ids, draws)

    def with_randomness(self, randomness) -> "DefendedClassifier":
        """The same classifier and network with the purifier's randomness replaced (a new module
        sharing the weights; nothing is swapped in place)."""
        return self.with_purifier(self.purifier.with_randomness(randomness), self.purification)

    def with_purifier(self, purifier: ReverseChain, purification: dict | None = None) -> "DefendedClassifier":
        """The same classifier after another purifier, built from ``purification`` if known (bound
        ids and draws are kept)."""
        new = DefendedClassifier(self.classifier, purifier, purification)
        new._ids, new._draws = self._ids, self._draws
        return new

    def forward(self, x: torch.Tensor, ids=None, draws=None) -> torch.Tensor:
        ids = self._ids if ids is None else ids
        draws = self._draws if draws is None else draws
        return self.classifier(self.purifier(x, ids=ids, draws=draws))

    def forward_states(self, x: torch.Tensor, ids=None, draws=None, keep: Sequence[int] = ()) -> ChainForward:
        """:meth:`forward` and the chain states after the reverse steps ``keep`` of the same
        purification (:meth:`~dbprepro.purifiers.base.ReverseChain.purify_states`), for attacks whose
        loss also reads the states (DiffAttack).  Without ``keep`` the logits are :meth:`forward`'s
        own pass (no per-step state path)."""
        ids = self._ids if ids is None else ids
        draws = self._draws if draws is None else draws
        ids, draws = self.purifier.ids_and_draws(x, ids, draws)
        if not keep:
            return ChainForward(self.forward(x, ids, draws), [], ids, draws, 1)
        out, states = self.purifier.purify_states(x, ids, draws, keep)
        return ChainForward(self.classifier(out), states, ids, draws, 1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, ids=None, draws=None) -> torch.Tensor:
        """Predicted labels [B] (the argmax of the logits; a vote defense votes instead)."""
        return self.forward(x, ids, draws).argmax(1)


def predict_labels(model, x: torch.Tensor, ids, draws) -> torch.Tensor:
    """The labels ``model`` predicts for ``x`` under ``draws``: its ``predict`` (a vote defense
    votes over its purifications, :mod:`dbprepro.purifiers.vote`), else the argmax of its logits."""
    predict = getattr(model, "predict", None)
    if predict is not None:
        return predict(x, ids=ids, draws=draws)
    return model(x, ids=ids, draws=draws).argmax(1)


class _Binding:
    def __init__(self, model: DefendedClassifier, ids, draws):
        self.model, self.ids, self.draws = model, ids, draws

    def __enter__(self):
        self.saved = (self.model._ids, self.model._draws)
        self.model._ids = None if self.ids is None else torch.as_tensor(self.ids, dtype=torch.long)
        self.model._draws = None if self.draws is None else torch.as_tensor(self.draws, dtype=torch.long)
        return self.model

    def __exit__(self, *exc):
        self.model._ids, self.model._draws = self.saved
        return False

