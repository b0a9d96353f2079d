"""The battery's attack runs on one defense and threat model (the DAG's ``sanity`` stage):
per-image records of every run a check needs, and the reference ensembles read from the attack
grid's records.

Runs (column ``run``; ``kind`` names the check that reads it):

``pgd_eps_x{f}``     PGD (``attacks.pgd``: steps, EOT, restarts, random start) in
                     ``sanity.pgd_setting`` at eps x f and alpha x f (``sanity.eps_factors``); the
                     sweep's runs (and the unbounded one, for an L-inf threat model) share their
                     network passes (:class:`BallsPGD`), each exactly its own PGD;
``pgd_steps_x{k}``   the same PGD at eps x 1 with k = ``sanity.iterations_factor`` times the steps;
``pgd_unbounded``    the same PGD, L-inf, eps = ``sanity.unbounded_eps`` (alpha scaled as eps);
``square_{setting}`` torchattacks' Square (margin loss, ``sanity.square``) on the defense in that
                     setting (its queries see fresh draws in a stochastic setting, the fixed
                     configuration in ``dwbox``);
``transfer_{source}`` the adversarial examples of the source's PGD run (``adv.npz``), evaluated on
                     this defense with a fresh evaluation draw;
``best_gradient_{class}`` per image, 1 only if the image survives every gradient-based attack run
                     of the grid on this defense in the randomness class (``stochastic`` / ``fixed``,
                     :func:`~dbprepro.sanity.plan.comparison_runs`) and the battery's own PGD runs at
                     eps x 1 in that class; on the images they all have (``source`` lists the runs).

Every run is scored by one evaluation (``correct``: the ``single`` evaluation of the attack
records: one fresh purification draw in a stochastic setting, the fixed configuration in ``dwbox``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..attacks.autoattack import TA_NORM, IdTracker
from ..attacks.base import project
from ..attacks.pgd import PGD
from ..attacks.protocols import evaluate_draws, settings_randomness
from ..data import load_split
from ..io import write_parquet
from ..purifiers import load_defense
from .plan import randomness_class

log = logging.getLogger("dbprepro.sanity")

COLUMNS = ("defense", "threat", "run", "kind", "setting", "eps", "eps_factor", "steps", "source", "id", "correct")


def _batches(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _score(model, x_adv, y, ids, setting) -> np.ndarray:
    pred = evaluate_draws(model, x_adv, ids, 1, setting)[:, 0]
    return (pred == y.cpu().numpy()).astype(np.float64)


def pgd_correct(model, x, y, ids, *, setting, norm, eps, alpha, pgd: dict[str, Any], steps: int,
                batch_size: int) -> np.ndarray:
    """Per-image correctness after PGD (``pgd``: the ``attacks.pgd`` section, ``steps`` replacing
    its steps) on ``model`` (its randomness fits ``setting``)."""
    out = []
    for sl in _batches(len(ids), batch_size):
        atk = PGD(model, setting, norm, eps, alpha, steps=steps, eot=pgd["eot"], random_start=pgd["random_start"],
                  restarts=pgd["restarts"], eot_chunk=pgd.get("eot_chunk", 4096))
        res = atk(x[sl], y[sl], ids[sl])
        out.append(_score(model, res.x_adv, y[sl], ids[sl], setting))
    return np.concatenate(out)


class BallsPGD(PGD):
    """:class:`~dbprepro.attacks.pgd.PGD` with a radius and step size per image (``eps``, ``alpha``:
    tensors [B]): the epsilon sweep's runs as one batch (image i of run r is row r * n + i).  Every
    row follows exactly the PGD of its own radius (the draws are keyed by image id and step, the
    projection and step act per row); only the passes through the network are shared."""

    def __init__(self, model, setting, norm, eps: torch.Tensor, alpha: torch.Tensor, **kw):
        super().__init__(model, setting, norm, float(eps.max()), float(alpha.max()), **kw)
        self.eps = eps.view(-1, 1, 1, 1)  # the random start and the step broadcast over pixels
        self.alpha = alpha.view(-1, 1, 1, 1)

    def _project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            delta = torch.maximum(torch.minimum(delta, self.eps), -self.eps)
        else:
            delta = project(delta, "l2", self.eps.view(-1))
        return (x + delta).clamp(0, 1) - x


def sweep_correct(model, x, y, ids, *, setting, norm, eps: list[float], alpha: list[float], pgd: dict[str, Any],
                  steps: int, batch_size: int) -> np.ndarray:
    """Per-image correctness [len(eps), n] after PGD at each radius ``eps[r]`` (step ``alpha[r]``),
    the runs batched together (:class:`BallsPGD`; batches of at most ``batch_size`` rows, the memory of
    one attack batch)."""
    R, out = len(eps), []
    for sl in _batches(len(ids), max(1, batch_size // R)):
        xb, yb, ib = x[sl], y[sl], ids[sl]
        n = len(ib)
        e = torch.tensor(eps, dtype=x.dtype, device=x.device).repeat_interleave(n)
        a = torch.tensor(alpha, dtype=x.dtype, device=x.device).repeat_interleave(n)
        atk = BallsPGD(model, setting, norm, e, a, steps=steps, eot=pgd["eot"], random_start=pgd["random_start"],
                       restarts=pgd["restarts"], eot_chunk=pgd.get("eot_chunk", 4096))
        xr, yr, ir = xb.repeat(R, 1, 1, 1), yb.repeat(R), ib.repeat(R)
        res = atk(xr, yr, ir)
        out.append(_score(model, res.x_adv, yr, ir, setting).reshape(R, n))
    return np.concatenate(out, axis=1)


def square_correct(model, x, y, ids, *, setting, norm, eps, queries: int, p_init: float, seed: int,
                   batch_size: int) -> np.ndarray:
    """Per-image correctness after torchattacks' Square (margin loss, one restart) on ``model``
    wrapped so that every query carries the images' ids (:class:`~dbprepro.attacks.autoattack.IdTracker`)."""
    import torchattacks

    model.purifier.randomness.reset()  # replayable whatever ran before
    out = []
    for sl in _batches(len(ids), batch_size):
        tracker = IdTracker(model, x[sl], ids[sl], norm)
        atk = torchattacks.Square(tracker, norm=TA_NORM[norm], eps=eps, n_queries=int(queries), n_restarts=1,
                                  p_init=float(p_init), loss="margin", seed=int(seed))
        x_adv = atk(x[sl], y[sl]).detach()
        out.append(_score(model, x_adv, y[sl], ids[sl], setting))
    return np.concatenate(out)


def transfer_correct(model, adv_path: str, x, y, ids, *, norm: str, eps: float, setting: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, correctness) of the source's adversarial examples (``adv.npz``: ``ids``, ``x_adv``) on
    ``model``, for the battery's images the source attacked.  An example outside the threat model's
    eps-ball around the battery's image is refused (the source attacked another image or budget)."""
    with np.load(adv_path) as z:
        src = dict(zip(z["ids"].tolist(), range(len(z["ids"]))))
        keep = [i for i, k in enumerate(ids.tolist()) if k in src]
        x_adv = torch.as_tensor(z["x_adv"][[src[k] for k in ids[keep].tolist()]], dtype=x.dtype, device=x.device)
    d = (x_adv - x[keep]).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    if (size > eps * (1 + 1e-4) + 1e-6).any():
        raise ValueError(f"{adv_path}: examples outside the {norm} ball of radius {eps} around the images")
    return ids[keep].numpy(), _score(model, x_adv, y[keep], ids[keep], setting)


def _rows(run, kind, setting, eps, factor, steps, source, ids, correct) -> pd.DataFrame:
    return pd.DataFrame({"run": run, "kind": kind, "setting": setting, "eps": float(eps), "eps_factor": float(factor),
                         "steps": int(steps), "source": source, "id": np.asarray(ids, dtype=np.int64),
                         "correct": np.asarray(correct, dtype=np.float64)})


def reference_ensemble(frames: dict[str, pd.DataFrame], ids) -> tuple[np.ndarray, np.ndarray]:
    """(ids, per-image min of ``correct_single``) over the runs ``frames`` (name -> records with
    ``id``, ``correct_single``), on the ``ids`` every run has."""
    common = set(np.asarray(ids).tolist())
    for df in frames.values():
        common &= set(df["id"].tolist())
    keep = np.array(sorted(common), dtype=np.int64)
    if keep.size == 0:
        raise ValueError(f"the reference runs {', '.join(frames)} and the battery share no image")
    vals = np.stack([df.set_index("id").loc[keep, "correct_single"].to_numpy(np.float64) for df in frames.values()])
    return keep, vals.min(0)


def run_battery(classifier_dir, diffusion_dir, test_path, manifest, records_out, *, defense: str, threat: str,
                tm: dict[str, Any], pgd: dict[str, Any], fixed_draw: int, sanity: dict[str, Any],
                purification: dict[str, Any], variance_type: str, batch_size: int, seed: int,
                comparisons: list[tuple[str, str, str]], transfers: list[tuple[str, str]],
                device: torch.device) -> pd.DataFrame:
    """Run the battery on ``defense`` / ``threat`` (``tm``: its ``attacks.threat_models`` entry)
    and write its per-image records (module docstring).  ``comparisons``: (class, run name,
    records path) of the grid's gradient attack runs; ``transfers``: (source, adv.npz path)."""
    split = load_split(test_path, manifest).head(sanity["n_images"])
    x, y, ids = split.images.to(device), split.labels.to(device), split.ids
    base = load_defense(classifier_dir, diffusion_dir, purification, variance_type,
                        settings_randomness("dwbox", seed, fixed_draw), device)

    def model(setting):
        return base.with_randomness(settings_randomness(setting, seed, fixed_draw))

    s, norm, eps, alpha = sanity["pgd_setting"], tm["norm"], float(tm["eps"]), float(tm["alpha"])
    steps = int(pgd["steps"])
    frames, own = [], {}
    m = model(s)
    factors, ue = [float(f) for f in sanity["eps_factors"]], float(sanity["unbounded_eps"])
    joint = norm == "linf"  # the unbounded run (L-inf) joins the sweep's batch when the threat model is L-inf
    radii = [eps * f for f in factors] + ([ue] if joint else [])
    c = sweep_correct(m, x, y, ids, setting=s, norm=norm, eps=radii, alpha=[r * alpha / eps for r in radii], pgd=pgd,
                      steps=steps, batch_size=batch_size)
    c_unb = c[-1] if joint else None
    for f, cf in zip(factors, c):
        frames.append(_rows(f"pgd_eps_x{f:g}", "eps_sweep", s, eps * f, f, steps, "", ids, cf))
        log.info("PGD eps x %g (%s): robust accuracy %.4f", f, s, cf.mean())
        if f == 1:
            own[f"battery pgd_eps_x1 ({s})"] = cf
    k = int(sanity["iterations_factor"])
    c = pgd_correct(m, x, y, ids, setting=s, norm=norm, eps=eps, alpha=alpha, pgd=pgd, steps=k * steps,
                    batch_size=batch_size)
    frames.append(_rows(f"pgd_steps_x{k}", "iterations", s, eps, 1.0, k * steps, "", ids, c))
    own[f"battery pgd_steps_x{k} ({s})"] = c
    log.info("PGD %dx steps (%s): robust accuracy %.4f", k, s, c.mean())
    if c_unb is None:
        c_unb = sweep_correct(m, x, y, ids, setting=s, norm="linf", eps=[ue], alpha=[ue * alpha / eps], pgd=pgd,
                              steps=steps, batch_size=batch_size)[0]
    c = c_unb
    frames.append(_rows("pgd_unbounded", "unbounded", s, ue, ue / eps, steps, "", ids, c))
    log.info("PGD unbounded (L-inf eps %g, %s): robust accuracy %.4f", ue, s, c.mean())
    sq = sanity["square"]
    for ss in sq["settings"]:
        c = square_correct(model(ss), x, y, ids, setting=ss, norm=norm, eps=eps, queries=sq["queries"],
                           p_init=sq["p_init"], seed=sanity["seed"], batch_size=batch_size)
        frames.append(_rows(f"square_{ss}", "gradient_free", ss, eps, 1.0, sq["queries"], "", ids, c))
        log.info("Square (%s, %d queries): robust accuracy %.4f", ss, sq["queries"], c.mean())
    for source, path in transfers:
        tid, c = transfer_correct(model("whitebox"), path, x, y, ids, norm=norm, eps=eps, setting="whitebox")
        frames.append(_rows(f"transfer_{source}", "transfer", "whitebox", eps, 1.0, 0, path, tid, c))
        log.info("transfer from %s: robust accuracy %.4f on %d images", source, c.mean(), len(tid))
    for cls in ("stochastic", "fixed"):
        runs = {name: pd.read_parquet(p, columns=["id", "correct_single"]) for c_, name, p in comparisons if c_ == cls}
        if randomness_class(s) == cls:
            runs.update({name: pd.DataFrame({"id": ids.numpy(), "correct_single": v}) for name, v in own.items()})
        if not runs:
            continue
        rid, c = reference_ensemble(runs, ids.numpy())
        frames.append(_rows(f"best_gradient_{cls}", "reference", cls, eps, 1.0, 0, ", ".join(runs), rid, c))
        log.info("best gradient ensemble (%s, %d runs): robust accuracy %.4f on %d images", cls, len(runs),
                 c.mean() if c.size else float("nan"), len(rid))
    df = pd.concat(frames, ignore_index=True)
    df.insert(0, "threat", threat)
    df.insert(0, "defense", defense)
    write_parquet(df[list(COLUMNS)], records_out)
    return df
