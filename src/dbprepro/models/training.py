"""Training of the embedded models: a classifier and a DDPM epsilon-prediction UNet.

Both trainers are seeded and replayable: batch order, diffusion noise and timesteps come from
a local ``torch.Generator`` seeded with ``seed``, and anything drawn from torch's global RNG
inside the model (e.g. dropout) runs under :func:`torch.random.fork_rng` seeded with ``seed``,
so the caller's global RNG state is left untouched.  On CPU with a fixed number of threads two
runs with the same arguments give bit-identical weights and history.

Models are switched to train mode while training and are returned in eval mode.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

_TQDM = dict(file=sys.stderr, mininterval=5.0, dynamic_ncols=False, leave=False)


def _as_images(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(t.shape)}")
    return t.to(torch.float32)


def _as_labels(y, n: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).to(torch.long).reshape(-1)
    if t.numel() != n:
        raise ValueError(f"got {t.numel()} labels for {n} images")
    return t


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_positive(**kw) -> None:
    for k, v in kw.items():
        if v is None or v < 1:
            raise ValueError(f"{k} must be >= 1, got {v}")


@torch.no_grad()
def accuracy(model: nn.Module, images, labels, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on [0, 1] images (evaluated in eval mode, mode restored)."""
    x = _as_images(images)
    y = _as_labels(labels, x.shape[0])
    was_training = model.training
    model.eval()
    dev = _device(model)
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i:i + batch_size].to(dev))
        correct += int((logits.argmax(1).cpu() == y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, x.shape[0])


def train_classifier(model: nn.Module, images, labels, *, epochs: int, batch_size: int, lr: float,
                     weight_decay: float = 0.0, seed: int = 0,
                     val: tuple | None = None, progress: bool = True) -> pd.DataFrame:
    """Train ``model`` (in place) with AdamW and cross-entropy on [0, 1] ``images``.

    Each epoch visits the training set in a fresh seeded random order (the last batch may be
    smaller).  ``val = (images, labels)`` adds a validation accuracy per epoch.

    Returns one row per epoch: ``epoch``, ``loss`` (mean training loss), ``train_acc`` (running
    accuracy over the epoch's batches) and, with ``val``, ``val_acc``.  The model is left in
    eval mode.
    """
    _check_positive(epochs=epochs, batch_size=batch_size)
    x = _as_images(images)
    y = _as_labels(labels, x.shape[0])
    n = x.shape[0]
    if n == 0:
        raise ValueError("no training images")
    dev = _device(model)
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n_batches = math.ceil(n / batch_size)
    rows = []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]), tqdm(total=epochs * n_batches, desc="classifier",
                                                 unit="batch", disable=not progress, **_TQDM) as bar:
        torch.manual_seed(int(seed))  # only for in-model randomness (dropout); restored on exit
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(n, generator=gen)
            loss_sum, correct = 0.0, 0
            for i in range(0, n, batch_size):
                idx = order[i:i + batch_size]
                xb, yb = x[idx].to(dev), y[idx].to(dev)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.detach().argmax(1) == yb).sum())
                bar.update(1)
            row = {"epoch": epoch, "loss": loss_sum / n, "train_acc": correct / n}
            if val is not None:
                row["val_acc"] = accuracy(model, val[0], val[1])
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            log.info("classifier epoch %d/%d: loss %.4f, train acc %.4f%s (%.1fs)", epoch, epochs,
                     row["loss"], row["train_acc"],
                     f", val acc {row['val_acc']:.4f}" if val is not None else "",
                     time.perf_counter() - t0)
    model.eval()
    return pd.DataFrame(rows)


def _index_stream(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless full batches of indices walking through seeded random permutations of ``n``."""
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while buf.numel() < batch_size:
            buf = torch.cat([buf, torch.randperm(n, generator=gen)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


def ddpm_loss(unet, scheduler, x0: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """The DDPM loss (Ho et al. 2020): ``MSE(unet(x_t, t), eps)`` with t ~ U{0..T-1}, eps ~ N(0, I)."""
    T = int(scheduler.config.num_train_timesteps)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = torch.randint(0, T, (x0.shape[0],), generator=generator).to(x0.device)
    return F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)


LossFn = "Callable[[nn.Module, object, torch.Tensor, torch.Tensor | None, torch.Generator], torch.Tensor]"


def train_ddpm(unet, scheduler, images, *, steps: int, batch_size: int, lr: float, ema_decay: float,
               warmup_steps: int = 0, grad_clip: float | None = 1.0, weight_decay: float = 0.0,
               betas: tuple[float, float] = (0.9, 0.999), seed: int = 0, log_every: int | None = None,
               progress: bool = True, labels=None, loss_fn=None, checkpoint_dir=None,
               checkpoint_every: int | None = None, desc: str = "ddpm"):
    """Train (or fine-tune) an epsilon-prediction diffusion UNet: the one training loop of the
    package, used for the vanilla DDPM and for every ADDT variant.

    Per step: a batch of [0, 1] ``images`` scaled to [-1, 1] (with its ``labels`` if given) and
    ``loss_fn(unet, scheduler, x0, y, generator)`` (default :func:`ddpm_loss`); AdamW (``betas``,
    ``weight_decay``) with a linear learning-rate warm-up over ``warmup_steps`` (constant
    afterwards), gradient-norm clipping at ``grad_clip`` (None: off), and an exponential moving
    average of the weights (``diffusers.training_utils.EMAModel`` with its warm-up
    ``1 - (1 + step) ** -3/4``, capped at ``ema_decay``, as in diffusers' training examples).

    With ``checkpoint_dir``, the complete state (weights, EMA, optimiser, learning-rate schedule,
    random generators, history) is saved atomically every ``checkpoint_every`` steps, and a call
    finding a checkpoint there resumes from it: an interrupted run finishes with exactly the
    weights of an uninterrupted one.

    ``unet`` is trained in place and ends with the *raw* (last-step) weights.  Returns
    ``(ema_unet, history)``: a copy of ``unet`` carrying the EMA weights (eval mode; this is the
    model to use) and a table with ``step``, ``loss`` (mean over the last ``log_every`` steps)
    and ``lr``, one row every ``log_every`` steps (default ``steps // 20``) and at the end.
    """
    from pathlib import Path

    from diffusers.training_utils import EMAModel

    _check_positive(steps=steps, batch_size=batch_size)
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
    x = _as_images(images)
    n = x.shape[0]
    if n == 0:
        raise ValueError("no training images")
    y_all = None if labels is None else _as_labels(labels, n)
    loss_fn = loss_fn or ddpm_loss
    log_every = int(log_every or max(1, steps // 20))
    dev = _device(unet)
    x = (x * 2 - 1).to(dev)
    if y_all is not None:
        y_all = y_all.to(dev)

    gen_batch = torch.Generator().manual_seed(int(seed))
    gen_loss = torch.Generator().manual_seed(int(seed) + 1)  # noise, timesteps, CGPO draws
    unet.requires_grad_(True)  # a UNet taken from a Purifier comes frozen; training needs its weights
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=True)
    warm = max(0, int(warmup_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    ema = EMAModel(unet.parameters(), decay=float(ema_decay), use_ema_warmup=True,
                   inv_gamma=1.0, power=3 / 4, foreach=True)

    rows, acc, acc_n, start = [], 0.0, 0, 1
    ckpt = Path(checkpoint_dir) / "state.pt" if checkpoint_dir else None
    every = int(checkpoint_every or max(1, steps // 10))
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state["steps"] != steps:
            raise ValueError(f"{ckpt} belongs to a run of {state['steps']} steps, not {steps}: remove it to restart")
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen_batch.set_state(state["gen_batch"])
        gen_loss.set_state(state["gen_loss"])
        rows, acc, acc_n, start = list(state["rows"]), state["acc"], state["acc_n"], state["step"] + 1
        log.info("%s: resuming from %s at step %d of %d", desc, ckpt, start, steps)
    # the batch order is a pure function of gen_batch's state: the stream restarts from it
    batches = _index_stream(n, batch_size, gen_batch)

    t0 = time.perf_counter()
    unet.train()
    with torch.random.fork_rng(devices=[]), tqdm(total=steps, initial=start - 1, desc=desc, unit="step",
                                                 disable=not progress, **_TQDM) as bar:
        torch.manual_seed(int(seed) + start)  # only for in-model randomness (dropout); restored on exit
        for step in range(start, steps + 1):
            if ckpt is not None and (step - 1) % every == 0 and step > start:
                _save_state(ckpt, steps=steps, step=step - 1, unet=unet, ema=ema, opt=opt, sched=sched,
                            gen_batch=gen_batch, gen_loss=gen_loss, rows=rows, acc=acc, acc_n=acc_n,
                            batches=batches)
                batches = _index_stream(n, batch_size, gen_batch)
                torch.manual_seed(int(seed) + step)  # in-model randomness restarts here too
            idx = next(batches)
            loss = loss_fn(unet, scheduler, x[idx], None if y_all is None else y_all[idx], gen_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
            cur_lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            ema.step(unet.parameters())
            acc += float(loss.detach())
            acc_n += 1
            bar.update(1)
            if step % log_every == 0 or step == steps:
                rows.append({"step": step, "loss": acc / acc_n, "lr": cur_lr})
                bar.set_postfix(loss=f"{acc / acc_n:.4f}", refresh=False)
                acc, acc_n = 0.0, 0
                if len(rows) % 5 == 0 or step == steps:
                    log.info("%s step %d/%d: loss %.4f, ema decay %.4f (%.1fs)", desc, step, steps,
                             rows[-1]["loss"], ema.cur_decay_value or 0.0, time.perf_counter() - t0)
    unet.eval()
    ema_unet = copy.deepcopy(unet)
    ema.copy_to(ema_unet.parameters())
    return ema_unet.eval(), pd.DataFrame(rows)


def _save_state(path, *, batches, **state) -> None:
    """Atomically save a resumable training state.  The batch stream cannot be pickled, so the
    caller restarts it from ``gen_batch`` right after saving: its pending partial permutation is
    dropped, identically in an interrupted and an uninterrupted run."""
    from ..io import atomic_path

    del batches
    payload = {k: v for k, v in state.items() if k not in ("unet", "ema", "opt", "sched", "gen_batch", "gen_loss")}
    payload.update(unet=state["unet"].state_dict(), ema=state["ema"].state_dict(), opt=state["opt"].state_dict(),
                   sched=state["sched"].state_dict(), gen_batch=state["gen_batch"].get_state(),
                   gen_loss=state["gen_loss"].get_state())
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
