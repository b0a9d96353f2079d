"""Size the embedded digits models (8x8 grey-scale): classifier and DDPM UNet.

For each UNet configuration: number of parameters, training time, ms per UNet call at batch 64
(forward under no_grad, and forward + backward to the input as attacks do), and the accuracy of
the classifier on clean and on purified test images (Purifier, t* = 0.1, DDPM sampler, random
mode, mean over ``--draws`` purifications).  Runs on one thread (``torch.set_num_threads(1)``).

    .venv/bin/python benchmarks/size_digits_models.py                 # all configurations
    .venv/bin/python benchmarks/size_digits_models.py --only B2 --long # one, also 1000-step grid
    .venv/bin/python benchmarks/size_digits_models.py --time-only      # just the ms/call columns

Not a test: it takes minutes per configuration.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from dbprepro.data import make_digits_split
from dbprepro.models.classifiers import SmallCNN, save_classifier
from dbprepro.models.diffusion import build_scheduler, build_unet, save_diffusion
from dbprepro.models.training import accuracy, train_classifier, train_ddpm
from dbprepro.purifiers import Purifier
from dbprepro.randomness import Randomness

CLASSIFIER = dict(epochs=20, batch_size=64, lr=2e-3, weight_decay=1e-4)

# name: (unet kwargs, training kwargs)
CONFIGS: dict[str, tuple[dict, dict]] = {
    # the recommended embedded default
    "A-rec": (dict(block_out_channels=[16, 32], attention=[False, False]),
              dict(steps=3000, lr=2e-3, ema_decay=0.999)),
    "A": (dict(block_out_channels=[16, 32], attention=[False, False]),
          dict(steps=4000, lr=2e-3, ema_decay=0.999)),
    "A-2k": (dict(block_out_channels=[16, 32], attention=[False, False]),
             dict(steps=2000, lr=2e-3, ema_decay=0.995)),
    "A-3k": (dict(block_out_channels=[16, 32], attention=[False, False]),
             dict(steps=3000, lr=3e-3, ema_decay=0.998)),
    "A-b32": (dict(block_out_channels=[16, 32], attention=[False, False]),
              dict(steps=4000, batch_size=32, lr=2e-3, ema_decay=0.999)),
    "A-attn": (dict(block_out_channels=[16, 32], attention=[False, True]),
               dict(steps=3000, lr=3e-3, ema_decay=0.998)),
    "B-2k": (dict(block_out_channels=[32, 64], attention=[False, False]),
             dict(steps=2000, lr=2e-3, ema_decay=0.995)),
    "B": (dict(block_out_channels=[32, 64], attention=[False, False]),
          dict(steps=4000, lr=2e-3, ema_decay=0.999)),
    "B-attn": (dict(block_out_channels=[32, 64], attention=[False, True]),
               dict(steps=4000, lr=2e-3, ema_decay=0.999)),
    "C": (dict(block_out_channels=[32, 64, 64], attention=[False, False, False]),
          dict(steps=4000, lr=2e-3, ema_decay=0.999)),
}

COMMON_UNET = dict(layers_per_block=1, norm_num_groups=8, dropout=0.0)
COMMON_TRAIN = dict(batch_size=64, warmup_steps=200, grad_clip=1.0, seed=0)


def parse_override(items: list[str]) -> dict:
    """``key=value`` pairs -> dict (values parsed as Python literals when possible)."""
    import ast

    out = {}
    for it in items:
        k, v = it.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def ms_per_call(unet, batch: int = 64, reps: int = 20) -> tuple[float, float]:
    """Median ms of one UNet call at ``batch``: forward (no_grad) and forward + backward to x."""
    unet.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    t = torch.full((batch,), 50, dtype=torch.long)

    def fwd():
        with torch.no_grad():
            unet(x, t)

    def fwd_bwd():
        xi = x.clone().requires_grad_(True)
        unet(xi, t).sample.sum().backward()

    res = []
    for fn in (fwd, fwd_bwd):
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        res.append(1000 * sorted(times)[len(times) // 2])
    return res[0], res[1]


def purified_accuracy(unet, scheduler, clf, x, y, ids, n_inf: int, draws: int, seed: int = 0) -> list[float]:
    pur = Purifier(unet, scheduler, t_star=0.1, num_inference_steps=n_inf, sampler="ddpm",
                   randomness=Randomness(seed, "random"))
    accs = []
    with torch.no_grad():
        for _ in range(draws):
            xp = torch.cat([pur(x[i:i + 120], ids=ids[i:i + 120]) for i in range(0, len(x), 120)])
            accs.append(accuracy(clf, xp, y))
    return accs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    ap.add_argument("--set", nargs="*", default=[], help="overrides key=value for unet/training args")
    ap.add_argument("--name", help="name of the (overridden) configuration in the table")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--long", action="store_true", help="also purify on the 1000-step grid (101 steps)")
    ap.add_argument("--time-only", action="store_true")
    ap.add_argument("--save", help="folder to save the classifier and the trained UNets into")
    ap.add_argument("--out", help="CSV file to append the table to")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    parts = make_digits_split(test_fraction=0.2, seed=0)
    xtr, ytr, _ = parts["train"]
    xte, yte, idte = (torch.from_numpy(a) for a in parts["test"])

    clf = None
    if not args.time_only:
        torch.manual_seed(0)
        clf = SmallCNN()
        t0 = time.perf_counter()
        train_classifier(clf, xtr, ytr, seed=0, progress=False, **CLASSIFIER)
        clf_time = time.perf_counter() - t0
        clean = accuracy(clf, xte, yte)
        print(f"classifier SmallCNN {CLASSIFIER}: {clf_time:.1f}s, clean test acc {clean:.4f}", flush=True)
        if args.save:
            save_classifier(clf, "small_cnn", {}, Path(args.save) / "classifier")

    overrides = parse_override(args.set)
    rows = []
    for name in args.only or list(CONFIGS):
        ucfg, tcfg = CONFIGS[name]
        ucfg = {**COMMON_UNET, **ucfg, **{k: v for k, v in overrides.items() if k in COMMON_UNET or k in ("block_out_channels", "attention")}}
        tcfg = {**COMMON_TRAIN, **tcfg, **{k: v for k, v in overrides.items() if k not in ucfg}}
        label = args.name or name
        torch.manual_seed(0)
        unet = build_unet(8, 1, **ucfg)
        scheduler = build_scheduler()
        n_params = sum(p.numel() for p in unet.parameters())
        row = {"config": label, "unet": str(ucfg), "train": str(tcfg), "params": n_params}
        if not args.time_only:
            t0 = time.perf_counter()
            ema_unet, hist = train_ddpm(unet, scheduler, xtr, progress=False, **tcfg)
            row["train_s"] = round(time.perf_counter() - t0, 1)
            row["ms_step"] = round(1000 * row["train_s"] / tcfg["steps"], 1)
            row["final_loss"] = round(float(hist["loss"].iloc[-1]), 4)
            unet = ema_unet
            if args.save:
                save_diffusion(unet, scheduler, Path(args.save) / f"ddpm-{label}")
        row["fwd_ms"], row["fwd_bwd_ms"] = (round(v, 2) for v in ms_per_call(unet))
        if not args.time_only:
            row["clean_acc"] = clean
            accs = purified_accuracy(unet, scheduler, clf, xte, yte, idte, 100, args.draws)
            row["pur_acc_11"] = round(sum(accs) / len(accs), 4)
            row["pur_acc_11_draws"] = " ".join(f"{a:.4f}" for a in accs)
            if args.long:
                accs = purified_accuracy(unet, scheduler, clf, xte, yte, idte, 1000, args.draws)
                row["pur_acc_101"] = round(sum(accs) / len(accs), 4)
        rows.append(row)
        print(pd.DataFrame([row]).to_string(index=False), flush=True)

    table = pd.DataFrame(rows)
    print(table.drop(columns=["unet", "train"]).to_string(index=False))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, mode="a", header=not out.exists(), index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
