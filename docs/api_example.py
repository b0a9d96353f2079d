"""dbprepro as a library: purify, defend and attack your own models.

Run it from the repository root:  .venv/bin/python docs/api_example.py

It uses the pipeline's trained digits models when they exist (``results/models/`` after
``snakemake``), else it builds tiny *untrained* stand-ins in a temporary folder, so that the
example always runs (the numbers are then meaningless).  tests/test_api.py executes this file.
"""

import tempfile
from pathlib import Path

import torch
from sklearn.datasets import load_digits

from dbprepro import api

DIFFUSION = Path("results/models/diffusion/vanilla")
CLASSIFIER = Path("results/models/classifier")


def tiny_models(folder: Path) -> tuple[Path, Path]:
    """Untrained stand-ins of the pipeline's two model folders (diffusers UNet + DDPM schedule,
    small CNN), saved the way the pipeline saves them."""
    from dbprepro.models.classifiers import SmallCNN, save_classifier
    from dbprepro.models.diffusion import build_scheduler, build_unet, save_diffusion

    torch.manual_seed(0)
    save_diffusion(build_unet(8, 1, [8, 16], norm_num_groups=4), build_scheduler(), folder / "diffusion")
    save_classifier(SmallCNN(width=8, hidden=16), "small_cnn", {"width": 8, "hidden": 16}, folder / "classifier")
    return folder / "diffusion", folder / "classifier"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trained = DIFFUSION.is_dir() and CLASSIFIER.is_dir()
        diffusion, classifier_dir = (DIFFUSION, CLASSIFIER) if trained else tiny_models(Path(tmp))
        print(f"models: {diffusion}, {classifier_dir}" + ("" if trained else " (untrained stand-ins)"))

        # 1. a purifier from a diffusers folder (a hub id needs revision= and files={name: sha256})
        purifier = api.load_purifier(diffusion, t_star=0.1, num_inference_steps=100)
        digits = load_digits()
        images = torch.tensor(digits.images[:4] / 16.0, dtype=torch.float32)[:, None]  # [4, 1, 8, 8] in [0, 1]
        labels = torch.tensor(digits.target[:4])

        # 2. purification with explicit randomness: fixed mode is a deterministic function
        a = api.purify(purifier, images, seed=0, mode="fixed")
        b = api.purify(purifier, images, seed=0, mode="fixed")
        c = api.purify(purifier, images, seed=0, mode="random")
        assert torch.equal(a, b) and not torch.equal(a, c)
        print(f"purified {tuple(a.shape)}; fixed mode replays exactly; mean |P(x) - x| = {(a - images).abs().mean():.3f}")

        # 3. a defended classifier (any nn.Module classifier of [0, 1] images) and paper 1's three attacks
        model = api.defend(api.load_classifier(classifier_dir), purifier)
        for setting in ("whitebox", "whitebox_eot", "dwbox"):
            report = api.attack(model, images, labels, setting=setting, norm="linf", eps=0.2, alpha=0.05,
                                steps=2, eot=2, eval_draws=2, seed=0)
            print(f"{setting:>12}: robust accuracy {report.robust_accuracy('single'):.2f} (single draw), "
                  f"{report.robust_accuracy('worst'):.2f} (worst of 2); max |delta| "
                  f"{report.records['norm_linf'].max():.3f}")

        # 4. bad input is refused with a message naming the problem
        for bad in (images * 2, images[:, :, :4], images[:0]):
            try:
                api.purify(purifier, bad)
            except ValueError as e:
                print(f"refused: {e}")


if __name__ == "__main__":
    main()
