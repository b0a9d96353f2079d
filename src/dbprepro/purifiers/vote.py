"""The majority-vote defense (DensePure-style inference, Xiao et al., arXiv 2211.00322): V
independent purifications of the same input, each classified; the prediction is the most frequent
label (ties to the lowest label, the rule of the ``vote`` evaluation in
:func:`dbprepro.attacks.protocols.summarise_evaluations`).

Draw indexing
-------------
One *vote draw* ``d`` of sample ``i`` uses the V purifier draws ``d * V + v`` (v = 0..V-1) of
sample ``i``.  The map ``(d, v) -> d * V + v`` is injective, so

- distinct vote draws use disjoint purifier draws (the V purifications of an evaluation never
  reappear in another evaluation, nor in an attack step: the attacker's vote draws stay below
  :data:`~dbprepro.attacks.protocols.EVAL_DRAW_OFFSET`, the evaluation's start at it);
- everything stays replayable from (seed, sample id, vote draw);
- with V = 1 vote draw ``d`` *is* purifier draw ``d``: the vote defense is the single-draw defense.

In ``fixed`` mode (``dwbox``) the purifier is a deterministic function P_xi: the draw passed *is*
the configuration, the V purifications would coincide, so the vote defense purifies once with the
draw unchanged and equals the single-draw defense (``dwbox`` against a vote is ``dwbox``).

Attack objective
----------------
The hard vote has no useful gradient.  :meth:`VoteDefense.forward` returns, as logits, the log of
the V draws' *mean softmax probability*, ``log(1/V sum_v softmax(f(P_v(x))))``: its cross-entropy
is ``-log`` of the mean probability of the true label over the V purifications, the smooth
expected vote share that EOT attacks on majority votes aim at (DiffBreak's MV attacks; MEFA's
averaged-output CE, reference notes Sec. 4-6).  An EOT attack with K samples then averages K such
V-draw objectives (K x V purifications per step).  With V = 1 the forward returns the single
draw's logits unchanged (reduction: MV with V = 1 equals SP).  :meth:`VoteDefense.predict` is the
hard vote; the evaluation protocols call it.
"""

from __future__ import annotations

import math

import torch

from .base import ReverseChain
from .defended import ChainForward, DefendedClassifier


def vote_draws(draws: torch.Tensor, votes: int) -> torch.Tensor:
    """Purifier draws [B, V] of vote draws [B]: ``draws * V + v``."""
    draws = torch.as_tensor(draws, dtype=torch.long).reshape(-1, 1)
    return draws * int(votes) + torch.arange(int(votes), dtype=torch.long)


def majority(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Most frequent label per row of ``labels`` [B, V]; ties go to the lowest label."""
    counts = torch.zeros(labels.shape[0], n_classes, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    # torch.argmax returns the first maximal index: the lowest tied label
    return counts.argmax(1)


class VoteDefense(DefendedClassifier):
    """Classifier after purifier, predicting by the majority vote of ``votes`` purifications
    (see the module docstring for the draws and the attack objective).

    ``forward(x, ids, draws)`` returns the log mean softmax of the V draws (the differentiable
    surrogate attacks use); ``predict(x, ids, draws)`` the voted labels.
    """

    def __init__(self, classifier, purifier: ReverseChain, purification: dict | None = None, votes: int = 1):
        super().__init__(classifier, purifier, purification)
        if int(votes) < 1:
            raise ValueError(f"votes must be >= 1, got {votes}")
        self.votes = int(votes)

    def with_purifier(self, purifier: ReverseChain, purification: dict | None = None) -> "VoteDefense":
        new = VoteDefense(self.classifier, purifier, purification, self.votes)
        new._ids, new._draws = self._ids, self._draws
        return new

    @property
    def effective_votes(self) -> int:
        """Purifications per vote: ``votes``, or 1 in fixed mode (they would all coincide)."""
        return 1 if self.purifier.randomness.mode == "fixed" else self.votes

    def _inputs(self, x, ids, draws) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The V-fold batch: images, ids and purifier draws, image-major ([B * V])."""
        ids = self._ids if ids is None else ids
        draws = self._draws if draws is None else draws
        ids, draws = self.purifier.ids_and_draws(x, ids, draws)  # defaults: 0..B-1, fresh draws
        V = self.effective_votes
        ids = torch.as_tensor(ids, dtype=torch.long)
        return x.repeat_interleave(V, dim=0), ids.repeat_interleave(V), vote_draws(draws, V).reshape(-1)

    def draw_logits(self, x: torch.Tensor, ids=None, draws=None) -> torch.Tensor:
        """Logits [B, V, C] of the V purifications of every image (V = 1 in fixed mode)."""
        xr, idr, dr = self._inputs(x, ids, draws)
        logits = self.classifier(self.purifier(xr, ids=idr, draws=dr))
        return logits.view(x.shape[0], self.effective_votes, -1)

    @staticmethod
    def _vote_logits(logits: torch.Tensor) -> torch.Tensor:
        """The attack objective's logits [B, C] of the draws' logits [B, V, C] (module docstring)."""
        if logits.shape[1] == 1:
            return logits[:, 0]
        return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=1) - math.log(logits.shape[1])

    def forward(self, x: torch.Tensor, ids=None, draws=None) -> torch.Tensor:
        return self._vote_logits(self.draw_logits(x, ids, draws))

    def forward_states(self, x: torch.Tensor, ids=None, draws=None, keep=()) -> ChainForward:
        """:meth:`forward` and the kept chain states of its V purifications ([B * V, ...] image-major,
        with their purifier ids and draws; V = 1 in fixed mode)."""
        xr, idr, dr = self._inputs(x, ids, draws)
        V = self.effective_votes
        if not keep:
            logits = self.classifier(self.purifier(xr, ids=idr, draws=dr))
            return ChainForward(self._vote_logits(logits.view(x.shape[0], V, -1)), [], idr, dr, V)
        out, states = self.purifier.purify_states(xr, idr, dr, keep)
        logits = self.classifier(out).view(x.shape[0], V, -1)
        return ChainForward(self._vote_logits(logits), states, idr, dr, V)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, ids=None, draws=None) -> torch.Tensor:
        """The voted labels [B]."""
        logits = self.draw_logits(x, ids, draws)
        return majority(logits.argmax(-1), logits.shape[-1])


def vote_defense(defense: DefendedClassifier, votes: int) -> VoteDefense:
    """The vote defense of a single-draw defense (same classifier and purifier, shared weights)."""
    return VoteDefense(defense.classifier, defense.purifier, defense.purification, votes)
