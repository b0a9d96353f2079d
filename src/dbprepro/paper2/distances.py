"""Paper 2, claim 1: purification *increases* the l_p distance to the clean image.

Per image x with adversarial example x_adv (paper 2 attacks the stochastic purifier with
PGD-EOT; here the ``whitebox_eot`` PGD run) and one randomness draw xi used for both
purifications, the four distances of :data:`PAIRS`, each in the l2 and l-inf norms, in [0, 1]
pixel units over the whole image (C x H x W):

* ``adv``: ||x_adv - x||, the attack's own perturbation;
* ``purified_adv``: ||P_xi(x_adv) - x||, where the purified adversarial example lands;
* ``purified_clean``: ||P_xi(x) - x||, where the purified clean image lands;
* ``purified_adv_vs_clean``: ||P_xi(x_adv) - P_xi(x)||, what is left of the perturbation after
  purification under a shared randomness.

Along the chain (paper 2's Fig. 1c), :meth:`~dbprepro.purifiers.Purifier.trajectory` gives
every state of one purification: the input, the forward path x_t at the chain's timesteps up to
t* (the path that ends at the purifier's own x_{t*}), then the state after each reverse step;
each state's distance to the clean image is recorded (states in [0, 1] units, unclamped except
the last, which is the purified image).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..attacks import EVAL_DRAW_OFFSET
from ..data import batches, load_split
from ..metrics import write_table
from ..purifiers import Purifier

log = logging.getLogger(__name__)

PAIRS = {
    "adv": "||x_adv - x||",
    "purified_adv": "||P(x_adv) - x||",
    "purified_clean": "||P(x) - x||",
    "purified_adv_vs_clean": "||P(x_adv) - P(x)||",
}
NORMS = ("l2", "linf")


def lp_distance(a: torch.Tensor, b: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample l2 and l-inf distances between two batches [B, ...] (float64 numpy [B])."""
    d = (a.double() - b.double()).flatten(1)
    return {"l2": d.norm(dim=1).cpu().numpy(), "linf": d.abs().amax(1).cpu().numpy()}


def pair_distances(x: torch.Tensor, x_adv: torch.Tensor, p_clean: torch.Tensor, p_adv: torch.Tensor
                   ) -> dict[str, np.ndarray]:
    """The columns ``{pair}_{norm}`` of :data:`PAIRS` x :data:`NORMS` for one batch."""
    out = {}
    for pair, (a, b) in {"adv": (x_adv, x), "purified_adv": (p_adv, x), "purified_clean": (p_clean, x),
                         "purified_adv_vs_clean": (p_adv, p_clean)}.items():
        for norm, v in lp_distance(a, b).items():
            out[f"{pair}_{norm}"] = v
    return out


@torch.no_grad()
def image_distances(purifier: Purifier, x: torch.Tensor, x_adv: torch.Tensor, ids: torch.Tensor, draw: int
                    ) -> dict[str, np.ndarray]:
    """:func:`pair_distances` with P = the purifier under draw ``draw`` for every image (the same
    draw purifies x and x_adv)."""
    draws = torch.full_like(ids, int(draw))
    return pair_distances(x, x_adv, purifier(x, ids=ids, draws=draws), purifier(x_adv, ids=ids, draws=draws))


@torch.no_grad()
def chain_distances(purifier: Purifier, x: torch.Tensor, start: torch.Tensor, ids: torch.Tensor, draw: int
                    ) -> pd.DataFrame:
    """Distance to the clean images ``x`` of every state of the purification of ``start`` (x
    itself or x_adv): rows (id, step, phase, t, l2, linf), step 0 = the input."""
    traj = purifier.trajectory(start, ids=ids, draws=torch.full_like(ids, int(draw)))
    frames = []
    last = len(traj.states) - 1
    for step, (phase, t, s) in enumerate(zip(traj.phase, traj.t, traj.states)):
        if step == last and purifier.clip_output:
            s = s.clamp(0, 1)  # the purified image itself
        d = lp_distance(s, x)
        frames.append(pd.DataFrame({"id": ids.numpy(), "step": step, "phase": phase, "t": t, **d}))
    return pd.concat(frames, ignore_index=True)


def summarise_distances(per_image: pd.DataFrame) -> pd.DataFrame:
    """One row per (pair, norm): mean, std, median over rows, and the share of images whose
    distance exceeds that of the adversarial example ||x_adv - x|| (the claim: ~1 for P(x_adv))."""
    rows = []
    for pair, desc in PAIRS.items():
        for norm in NORMS:
            v = per_image[f"{pair}_{norm}"].to_numpy(np.float64)
            ref = per_image[f"adv_{norm}"].to_numpy(np.float64)
            rows.append({"pair": pair, "description": desc, "norm": norm, "n": int(v.size),
                         "mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
                         "median": float(np.median(v)), "ratio_to_adv_mean": float(v.mean() / ref.mean()),
                         "share_above_adv": float((v > ref).mean())})
    return pd.DataFrame(rows)


def run_lp_distances(diffusion_dir, test_path, manifest, adv_path, *, per_image_csv, summary_csv, chain_out,
                     n_images: int, draws: int, chain_draws: int, batch_size: int, purification: dict[str, Any],
                     variance_type: str, seed: int, device: torch.device) -> pd.DataFrame:
    """The stage: distances of the first ``n_images`` attacked images under ``draws`` fresh
    evaluation draws (random mode, keyed from :data:`EVAL_DRAW_OFFSET`: never seen by the
    attacker), and the along-the-chain distances under the first ``chain_draws`` of them."""
    from ..purifiers import load_purifier as build_purifier
    from ..io import write_parquet
    from ..randomness import Randomness

    split = load_split(test_path, manifest).head(n_images)
    with np.load(adv_path) as z:
        adv_ids, x_adv_all = z["ids"], z["x_adv"]
    pos = {int(i): k for k, i in enumerate(adv_ids)}
    missing = [int(i) for i in split.ids if int(i) not in pos]
    if missing:
        raise ValueError(f"{adv_path} lacks adversarial examples for images {missing[:5]}...")
    x_adv = torch.as_tensor(x_adv_all[[pos[int(i)] for i in split.ids]])
    purifier = build_purifier(diffusion_dir, purification, variance_type, Randomness(seed, "random"), device)
    rows, chains = [], []
    for sl in batches(len(split), batch_size):
        x, xa, ids = split.images[sl].to(device), x_adv[sl].to(device), split.ids[sl]
        for j in range(draws):
            draw = EVAL_DRAW_OFFSET + j
            rows.append(pd.DataFrame({"id": ids.numpy(), "label": split.labels[sl].numpy(), "draw": j,
                                      **image_distances(purifier, x, xa, ids, draw)}))
            if j < chain_draws:
                for start_name, start in (("clean", x), ("adv", xa)):
                    c = chain_distances(purifier, x, start, ids, draw)
                    c.insert(1, "start", start_name)
                    c.insert(2, "draw", j)
                    chains.append(c)
    per_image = pd.concat(rows, ignore_index=True).sort_values(["id", "draw"]).reset_index(drop=True)
    write_table(per_image, per_image_csv, decimals=6)
    summary = summarise_distances(per_image)
    write_table(summary, summary_csv)
    write_parquet(pd.concat(chains, ignore_index=True).sort_values(["start", "draw", "id", "step"])
                  .reset_index(drop=True), chain_out)
    for _, r in summary.iterrows():
        log.info("%-22s %-4s mean %.4f (x %.2f of ||x_adv - x||; above it for %.0f%% of images)", r["pair"],
                 r["norm"], r["mean"], r["ratio_to_adv_mean"], 100 * r["share_above_adv"])
    return per_image
