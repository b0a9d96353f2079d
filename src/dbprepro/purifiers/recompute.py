"""The reverse chain differentiated by per-step recomputation, with or without its intermediate states.

:class:`ExactChain` is grad_mode ``"exact"`` (the whole chain) and the recomputed part of
``"budget"`` (its first steps); :func:`chain_states` runs a chain whose states after chosen
reverse steps are outputs with gradients (:meth:`~dbprepro.purifiers.base.ReverseChain.purify_states`,
DiffAttack's deviated-reconstruction loss) in every mode that has a per-step gradient
(:data:`STATE_GRAD_MODES`).  The purifier is passed in; nothing here imports a family.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: the grad modes whose chain states have a gradient (``purify_states``): the exact ones.  bpda
#: has no gradient through a step; the adjoint re-solves the state backwards and has no per-step one.
STATE_GRAD_MODES: tuple[str, ...] = ("exact", "autograd", "checkpoint", "budget")


def state_after(step: int, entering: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The state after reverse step ``step`` of a chain run: ``entering[j]`` is the state entering
    step j (``_run_chain``'s ``keep_states``), ``out`` the state after the last step."""
    return entering[step + 1] if step + 1 < len(entering) else out


class ExactChain(torch.autograd.Function):
    """Exact gradient of the reverse steps ``timesteps`` (the whole chain, or its first steps in
    grad_mode ``"budget"``) by per-step recomputation, with the states after the steps ``keep``
    (indices into ``timesteps``) as further outputs.

    ``ExactChain.apply(x_t, purifier, ids, draws, timesteps, keep)`` returns ``(out, *states)``.
    The forward pass runs the steps without a graph and saves the state entering each step with
    ``save_for_backward`` (no copies: the tensors the forward pass made anyway), so autograd owns
    their lifetime: a plain backward frees them, as a graph; ``backward(retain_graph=True)`` keeps
    them and a second backward (torchattacks' FAB does two) recomputes the same gradient; a second
    backward without retain_graph gets autograd's own "backward through the graph a second time"
    error.  The backward pass walks the steps from the last to the first: before back-propagating
    through step k it adds the gradient of the state after step k (DiffAttack's segment-wise
    backward), then re-runs step k under autograd, regenerating its noise from the replayable
    randomness.  The kept states are copies (an output must not be another output: the state after
    the last step is ``out``)."""

    @staticmethod
    def forward(ctx, x_t, purifier, ids, draws, timesteps, keep: tuple[int, ...]):
        entering: list[torch.Tensor] = []
        with torch.no_grad():
            out = purifier._run_chain(x_t.detach(), ids, draws, keep_states=entering, timesteps=timesteps)
        ctx.purifier, ctx.ids, ctx.draws, ctx.timesteps, ctx.keep = purifier, ids, draws, list(timesteps), keep
        ctx.save_for_backward(*entering)
        return (out, *[state_after(k, entering, out).clone() for k in keep])

    @staticmethod
    def backward(ctx, grad_out, *grad_states):
        p = ctx.purifier
        extra = dict(zip(ctx.keep, grad_states))
        g = grad_out
        for k in reversed(range(len(ctx.timesteps))):
            if extra.get(k) is not None:
                g = extra[k] if g is None else g + extra[k]
            if g is None:  # nothing downstream of this step reaches the loss
                continue
            with torch.enable_grad():
                xi = ctx.saved_tensors[k].detach().requires_grad_(True)
                out = p.reverse_step(xi, ctx.timesteps[k], ctx.ids, ctx.draws)
                (g,) = torch.autograd.grad(out, xi, g)
        return g, None, None, None, None, None


def exact_chain(purifier, x_t, ids, draws, timesteps) -> torch.Tensor:
    """The steps ``timesteps`` of the chain from ``x_t`` with :class:`ExactChain`'s gradient."""
    (out,) = ExactChain.apply(x_t, purifier, ids, draws, list(timesteps), ())
    return out


def chain_states(purifier, x_t: torch.Tensor, ids, draws, keep: Sequence[int]
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reverse chain from ``x_t`` (model space) and the states after the reverse steps ``keep``
    (sorted, distinct, in range), differentiable under the purifier's ``grad_mode``:

    ``exact``: :class:`ExactChain` over the whole chain; ``autograd`` / ``checkpoint``: the graph
    holds the states; ``budget``: the first steps by :class:`ExactChain` (their kept states are its
    outputs), the last ``budget_kept_steps`` under plain autograd (their states are in the graph), so
    only those steps' activations are saved, as in :meth:`~dbprepro.purifiers.base.ReverseChain.denoise`.
    Without a gradient to compute (no grad mode, or ``x_t`` does not require one), one plain run.
    Another mode raises ValueError."""
    p, steps, mode = purifier, list(purifier.timesteps), purifier.grad_mode
    keep = list(keep)
    if not (torch.is_grad_enabled() and x_t.requires_grad):
        entering: list[torch.Tensor] = []
        with torch.no_grad():
            out = p._run_chain(x_t, ids, draws, keep_states=entering)
        return out, [state_after(k, entering, out) for k in keep]
    if mode not in STATE_GRAD_MODES:
        raise ValueError(f"grad_mode {mode!r} has no per-step gradient for the chain states "
                         f"(the {getattr(p, 'sampler', type(p).__name__)} purifier delivers them in "
                         f"{', '.join(m for m in STATE_GRAD_MODES if m in getattr(p, 'grad_modes', STATE_GRAD_MODES))})")
    if mode in ("autograd", "checkpoint"):
        entering = []
        eps_fn = p._eps_checkpointed if mode == "checkpoint" else None
        out = p._run_chain(x_t, ids, draws, eps_fn=eps_fn, keep_states=entering)
        return out, [state_after(k, entering, out) for k in keep]
    split = len(steps) if mode == "exact" else len(steps) - p.budget_kept_steps(x_t, ids, draws)
    early = tuple(k for k in keep if k < split)
    x, states = x_t, []
    if split:
        x, *states = ExactChain.apply(x_t, p, ids, draws, steps[:split], early)
    entering = []
    out = p._run_chain(x, ids, draws, keep_states=entering, timesteps=steps[split:])
    # entering[j] enters step split + j: the state after step k >= split is entering[k - split + 1]
    return out, [*states, *[state_after(k - split, entering, out) for k in keep if k >= split]]
