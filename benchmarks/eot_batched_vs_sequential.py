"""EOT gradient: dbprepro's batched pass vs torchattacks' sequential EOTPGD loop.

Same defended model (trained digits models of a finished run, or random tiny ones), same
images, K = 10 EOT samples, one PGD step each; several repetitions, median reported, both in
the same process.  Results do not depend on the machine's load as much as the ratio does not.

    .venv/bin/python benchmarks/eot_batched_vs_sequential.py [--models results/models] [--images 32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torchattacks

from dbprepro.attacks import PGD, settings_randomness
from dbprepro.models.classifiers import SmallCNN, load_classifier
from dbprepro.models.diffusion import build_scheduler, build_unet, load_diffusion
from dbprepro.purifiers import DefendedClassifier, Purifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="results/models")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--eot", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = Path(args.models)
    if (models / "diffusion" / "vanilla").exists():
        unet, sch = load_diffusion(models / "diffusion" / "vanilla")
        clf = load_classifier(models / "classifier")
        source = str(models)
    else:
        torch.manual_seed(0)
        unet, sch, clf, source = build_unet(8, 1, [16, 32]), build_scheduler(), SmallCNN(), "random init"
    x = torch.rand(args.images, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (args.images,), generator=torch.Generator().manual_seed(1))
    ids = torch.arange(args.images)
    model = DefendedClassifier(clf, Purifier(unet, sch, 0.1, 100, randomness=settings_randomness("whitebox_eot", 0)))

    ours = PGD(model, "whitebox_eot", "linf", 0.2, 0.05, steps=1, eot=args.eot)
    ta = torchattacks.EOTPGD(model, eps=0.2, alpha=0.05, steps=1, eot_iter=args.eot, random_start=False)
    times = {"batched (dbprepro PGD)": [], "sequential (torchattacks EOTPGD)": []}
    for _ in range(args.reps):
        t = time.perf_counter()
        _, grad = ours.loss_and_grad(x, y, ids, ours.draws(0, 0))
        times["batched (dbprepro PGD)"].append(time.perf_counter() - t)
        model.purifier.randomness.reset()  # torchattacks' K calls then use draws 0..K-1, as ours
        t = time.perf_counter()
        with model.bind(ids=ids):
            adv_ta = ta(x, y)
        times["sequential (torchattacks EOTPGD)"].append(time.perf_counter() - t)
    adv_ours = (x + 0.05 * grad.sign()).clamp(0, 1)
    same = float((adv_ours - adv_ta).abs().max())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"models: {source}; {args.images} images, EOT {args.eot}, {args.threads} thread(s), median of {args.reps}")
    for k, v in med.items():
        print(f"  {k:34s} {v:7.3f} s per PGD step")
    print(f"  speed-up: {med['sequential (torchattacks EOTPGD)'] / med['batched (dbprepro PGD)']:.2f}x")
    print(f"  equal results: max |x_adv(batched) - x_adv(sequential)| = {same:.2e} (same draws 0..K-1)")


if __name__ == "__main__":
    main()
