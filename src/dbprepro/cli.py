"""The ``dbprepro`` command line: purify images, check configs, inspect the environment, pull artifacts."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def _cmd_purify(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from .models.diffusion import load_diffusion
    from .purifiers import Purifier
    from .randomness import Randomness
    from .runtime import resolve_device

    device = resolve_device(args.device)
    unet, scheduler = load_diffusion(args.model, scheduler_overrides={"variance_type": args.variance_type})
    channels, size = int(unet.config.in_channels), int(unet.config.sample_size)
    img = Image.open(args.input)
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        raise SystemExit(f"dbprepro purify: the model expects {size}x{size} images, {args.input} is "
                         f"{img.size[0]}x{img.size[1]} (resize it first)")
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    x = x[None, None] if channels == 1 else x.permute(2, 0, 1)[None]
    p = Purifier(unet.to(device), scheduler, t_star=args.t_star, num_inference_steps=args.steps,
                 sampler=args.sampler, randomness=Randomness(args.seed, args.mode))
    with torch.no_grad():
        y = p(x.to(device), ids=torch.tensor([args.id])).cpu()[0]
    arr = (y.clamp(0, 1) * 255).round().byte()
    arr = arr[0].numpy() if channels == 1 else arr.permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(args.output)
    print(f"purified {args.input} -> {args.output} (t*={args.t_star}, {p.num_steps} reverse steps, "
          f"{args.sampler}, seed {args.seed}, mode {args.mode})")
    return 0


def _configs(paths) -> dict | None:
    """The validated overlay of config files (later ones win, as Snakemake's --configfile), or
    None after printing why it is invalid."""
    from .config import ConfigError, load_configs

    try:
        return load_configs(paths)
    except ConfigError as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
        return None


def _cmd_validate(args: argparse.Namespace) -> int:
    cfg = _configs(args.configs)
    if cfg is None:
        return 2
    print(json.dumps(cfg, indent=2, sort_keys=True) if args.show else "configuration is valid")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    import torch

    from .runtime import provenance

    info = provenance()
    info["cuda_available"] = torch.cuda.is_available()
    try:
        import torchattacks

        info["torchattacks"] = torchattacks.__version__
    except Exception as e:  # pragma: no cover - reported, not raised
        info["torchattacks"] = f"NOT IMPORTABLE ({e}); run scripts/setup.sh"
    here = str(Path(sys.executable).parent)  # the venv's bin, also when it is not on PATH
    info["sbatch"] = shutil.which("sbatch")
    info["dvc"] = shutil.which("dvc") or shutil.which("dvc", path=here)
    models = Path(args.results) / "models"
    info["models"] = sorted(str(p.relative_to(models)) for p in models.glob("**/config.json")) if models.exists() else []
    for k, v in info.items():
        print(f"{k:>26}: {v}")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from .artifacts import ArtifactError, format_status, job_stats, pull

    try:
        rep = pull(args.repo, remote=args.remote, targets=args.targets, configfiles=args.configfile or (),
                   snakefile=args.snakefile, force=args.force, touch=not args.no_touch)
    except ArtifactError as e:
        print(f"dbprepro pull: {e}", file=sys.stderr)
        return 2
    print(f"pulled from DVC remote {rep.remote!r} ({rep.url})")
    print("artifacts match dvc.lock" if not rep.status else f"adopted despite:\n{format_status(rep.status)}")
    if args.no_touch:
        return 0
    print(f"snakemake --touch adopted the outputs of: {', '.join(rep.touched) or 'no job (already up to date)'}")
    if rep.up_to_date:
        print("snakemake -n: nothing to be done")
        return 0
    print("snakemake -n still has jobs to run (outputs not versioned or not pulled; `snakemake -n` shows why):\n"
          + (job_stats(rep.dry_run) or rep.dry_run[-3000:]), file=sys.stderr)
    return 1


def _cmd_estimate_cost(args: argparse.Namespace) -> int:
    from .cost import run_estimate

    cfg = _configs(args.config)
    if cfg is None:
        return 2
    print(run_estimate(cfg, device=args.device, batch_size=args.batch_size, repeats=args.repeats, csv=args.csv,
                       threads=args.threads))
    if args.csv:
        print(f"per-job estimate written to {args.csv}")
    return 0


def _cmd_sha256(args: argparse.Namespace) -> int:
    from .data import sha256_file

    status = 0
    for name in args.paths:
        path = Path(name)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if not f.is_file():
                print(f"dbprepro sha256: {f}: no such file", file=sys.stderr)
                status = 2
                continue
            print(f"{sha256_file(f)}  {f}")
    return status


def _add_cost_commands(sub) -> None:
    """``estimate-cost`` (measured device-hours per job of a config) and ``sha256`` (pinning)."""
    e = sub.add_parser("estimate-cost", help="count the network calls of every job of a config, time one call "
                                             "of each kind on this device, print device-hours per target")
    e.add_argument("--config", nargs="+", default=["config.yaml"],
                   help="config file(s), later overlaying earlier, e.g. config.yaml config/cifar10.yaml "
                        "(config/cifar10.yaml alone is complete) [%(default)s]")
    e.add_argument("--device", default=None, choices=["cpu", "cuda"], help="[the config's device]")
    e.add_argument("--batch-size", type=int, default=None,
                   help="images per timed call [the attacks' EOT pass: attacks.batch_size x pgd.eot, at most eot_chunk]")
    e.add_argument("--repeats", type=int, default=3, help="timed repeats after a warm-up, best kept [%(default)s]")
    e.add_argument("--threads", type=int, default=1,
                   help="CPU only: torch threads of the timed calls (the DAG's compute rules use 1) [%(default)s]")
    e.add_argument("--csv", help="also write the per-job estimate to this CSV")
    e.set_defaults(func=_cmd_estimate_cost)
    h = sub.add_parser("sha256", help="print the sha256 of files (folders: every file inside), to pin downloads")
    h.add_argument("paths", nargs="+")
    h.set_defaults(func=_cmd_sha256)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .config import ConfigError, threat_model

    cfg = _configs(args.config)
    if cfg is None:
        return 2
    from . import api
    from .checkpoints import CheckpointError
    from .data import load_split, make_digits_split
    from .metrics import write_table
    from .runtime import configure_torch, resolve_device

    att, pur, ev = cfg["attacks"], cfg["purification"], cfg["evaluation"]
    try:
        device = resolve_device(args.device or cfg["device"])
        configure_torch(threads=args.threads, deterministic=cfg["deterministic"])
        tm = threat_model(att, args.threat or att["threat_models"][0]["name"])
        data = Path(args.data)
        if (data / "test.npz").is_file():  # the DAG's split, checked against its manifest
            split = load_split(data / "test.npz", data / "split.json")
            images, labels = split.images, split.labels
        elif cfg["data"]["dataset"] == "digits":  # the same seeded split, built in memory
            images, labels, _ = make_digits_split(cfg["data"]["test_fraction"], cfg["data"]["split_seed"])["test"]
            import torch

            images, labels = torch.from_numpy(images), torch.from_numpy(labels)
        else:
            raise FileNotFoundError(f"{data / 'test.npz'}: no test split (snakemake results/data/test.npz makes it)")
        if not 1 <= args.n_images <= len(labels):
            raise ValueError(f"--n-images must lie in [1, {len(labels)}], got {args.n_images}")
        purifier = api.load_purifier(args.diffusion, t_star=pur["t_star"], num_inference_steps=pur["num_inference_steps"],
                                     sampler=pur["sampler"], eta=pur["eta"], clip_output=pur["clip_output"],
                                     variance_type=cfg["diffusion"]["schedule"]["variance_type"],
                                     grad_mode=pur.get("grad_mode", "exact"), seed=cfg["seed"], device=device)
        table = api.evaluate(api.load_classifier(args.classifier, device), purifier,
                             images[: args.n_images].to(device), labels[: args.n_images], setting=args.setting,
                             norm=tm["norm"], eps=tm["eps"], alpha=tm["alpha"], steps=att["pgd"]["steps"],
                             eot=att["pgd"]["eot"], eval_draws=att["eval_draws"], random_draws=ev["random_draws"],
                             fixed_configs=ev["fixed_configs"], seed=cfg["seed"], fixed_draw=att["fixed_draw"],
                             bpda=args.attack == "bpda")
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"dbprepro evaluate: {e}", file=sys.stderr)
        return 2
    print(table.to_markdown(index=False, floatfmt=".4f"))
    if args.csv:
        write_table(table, args.csv)
        print(f"written to {args.csv}")
    return 0


def _add_evaluate_command(sub) -> None:
    e = sub.add_parser("evaluate", help="one configuration outside Snakemake: clean accuracy and one attack on a "
                                        "few test images, printed as a table (nothing written unless --csv)")
    e.add_argument("--config", nargs="+", default=["config.yaml"],
                   help="config file(s), later overlaying earlier, e.g. config.yaml config/smoke.yaml [%(default)s]")
    e.add_argument("--classifier", default="results/models/classifier", help="classifier folder [%(default)s]")
    e.add_argument("--diffusion", default="results/models/diffusion/vanilla",
                   help="diffusers folder of the purifier [%(default)s]")
    e.add_argument("--data", default="results/data",
                   help="folder with test.npz + split.json; without it the digits split is rebuilt [%(default)s]")
    e.add_argument("--n-images", type=int, default=8, help="first N test images [%(default)s]")
    e.add_argument("--threat", help="threat model name from attacks.threat_models [the first]")
    e.add_argument("--setting", default="dwbox", choices=["whitebox", "whitebox_eot", "dwbox"], help="[%(default)s]")
    e.add_argument("--attack", default="pgd", choices=["pgd", "bpda"], help="[%(default)s]")
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], help="[the config's device]")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads [torch's default]")
    e.add_argument("--csv", help="also write the table to this CSV")
    e.set_defaults(func=_cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dbprepro", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("purify", help="purify one image with a diffusion model folder")
    p.add_argument("input", help="input image (PNG/JPEG); must match the model's size and channels")
    p.add_argument("output", help="where to write the purified image")
    p.add_argument("--model", default="results/models/diffusion/vanilla",
                   help="diffusers folder (unet/ + scheduler/, or a hub snapshot) [%(default)s]")
    p.add_argument("--t-star", type=float, default=0.1, help="diffusion strength in (0, 1] [%(default)s]")
    p.add_argument("--steps", type=int, default=100, help="num_inference_steps of the schedule [%(default)s]")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="[%(default)s]")
    p.add_argument("--variance-type", choices=["fixed_small", "fixed_large"], default="fixed_large",
                   help="DDPM reverse variance [%(default)s]")
    p.add_argument("--seed", type=int, default=0, help="randomness seed [%(default)s]")
    p.add_argument("--mode", choices=["random", "fixed"], default="random", help="randomness mode [%(default)s]")
    p.add_argument("--id", type=int, default=0, help="sample id keying the noise [%(default)s]")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="[%(default)s]")
    p.set_defaults(func=_cmd_purify)

    v = sub.add_parser("validate-config", help="validate config file(s), later files overlaying earlier ones")
    v.add_argument("configs", nargs="+", help="YAML files (e.g. config.yaml config/smoke.yaml)")
    v.add_argument("--show", action="store_true", help="print the resolved config with defaults")
    v.set_defaults(func=_cmd_validate)

    d = sub.add_parser("doctor", help="versions, device, SLURM/DVC availability, models present")
    d.add_argument("--results", default="results", help="results folder to inspect [%(default)s]")
    d.set_defaults(func=_cmd_doctor)
    _add_cost_commands(sub)
    _add_evaluate_command(sub)

    u = sub.add_parser("pull", help="dvc pull the recorded artifacts, check them against dvc.lock and let "
                                    "Snakemake adopt them (snakemake --touch: nothing is retrained)")
    u.add_argument("targets", nargs="*", help="DVC outs to pull (default: all of dvc.lock)")
    u.add_argument("--remote", "-r", help="DVC remote [the default remote of .dvc/config]")
    u.add_argument("--configfile", nargs="+", help="Snakemake config file(s) of the pulled run [config.yaml]")
    u.add_argument("--snakefile", help="Snakefile [./Snakefile]")
    u.add_argument("--repo", default=".", help="repository root [%(default)s]")
    u.add_argument("--force", action="store_true",
                   help="adopt the artifacts even if dvc status reports changes against dvc.lock")
    u.add_argument("--no-touch", action="store_true", help="only dvc pull + check, leave mtimes alone")
    u.set_defaults(func=_cmd_pull)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
