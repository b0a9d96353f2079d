"""The ``dbprepro`` command line: purify images, check configs, inspect the environment, pull artifacts."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def _read_image(path: str, channels: int, size: int):
    """An image file (PNG/JPEG/...) or a ``.npy`` array ([C, H, W] or [H, W], floats in [0, 1]) as
    a [1, C, H, W] float tensor; the array path keeps every bit of a float image."""
    import numpy as np
    import torch

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False).astype(np.float32)
        except (EOFError, ValueError) as e:
            raise ValueError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None
        x = torch.from_numpy(arr[None] if arr.ndim == 2 else arr)[None]
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(path).convert("L" if channels == 1 else "RGB")
        except UnidentifiedImageError:
            raise ValueError(f"{path}: not an image file (PNG, JPEG, ... or a .npy array)") from None
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        x = x[None, None] if channels == 1 else x.permute(2, 0, 1)[None]
    if tuple(x.shape[1:]) != (channels, size, size):
        raise ValueError(f"the model expects {channels}x{size}x{size} images, {path} is "
                         f"{'x'.join(map(str, x.shape[1:]))} (resize it first)")
    return x


def _write_image(y, path: str) -> None:
    import numpy as np
    from PIL import Image

    if path.endswith(".npy"):
        np.save(path, y.numpy().astype(np.float32))
        return
    arr = (y.clamp(0, 1) * 255).round().byte()
    arr = arr[0].numpy() if y.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path)


def purification_settings(args: argparse.Namespace) -> tuple[dict, str, int]:
    """The ``purification`` section, variance type and seed ``dbprepro purify`` uses: the config's
    (``--config``, as the DAG purifies) with every flag given on the command line overriding it."""
    if args.config:
        cfg = load_checked_configs(args.config)
        pur, variance, seed = dict(cfg["purification"]), cfg["diffusion"]["schedule"]["variance_type"], cfg["seed"]
    else:
        pur, variance, seed = {"t_star": 0.1, "num_inference_steps": 100, "sampler": "ddpm"}, "fixed_large", 0
    for key, value in (("t_star", args.t_star), ("num_inference_steps", args.steps), ("sampler", args.sampler)):
        if value is not None:
            pur[key] = value
    return pur, args.variance_type or variance, seed if args.seed is None else args.seed


def _cmd_purify(args: argparse.Namespace) -> int:
    import torch

    from .api import load_purifier
    from .randomness import Randomness
    from .runtime import resolve_device

    if not Path(args.input).is_file():
        raise FileNotFoundError(f"{args.input}: no such input image")
    pur, variance_type, seed = purification_settings(args)
    device = resolve_device(args.device)
    fixed_draw = args.draw if args.mode == "fixed" else 0
    p = load_purifier(args.model, sampler=pur["sampler"], t_star=pur["t_star"],
                      num_inference_steps=pur.get("num_inference_steps"), variance_type=variance_type, device=device,
                      settings={k: v for k, v in pur.items() if k != "grad_mode"})
    p = p.with_randomness(Randomness(seed, args.mode, fixed_draw=fixed_draw))
    cfg = p.unet.config
    x = _read_image(args.input, int(cfg.in_channels), int(cfg.sample_size))
    with torch.no_grad():
        y = p(x.to(device), ids=torch.tensor([args.id]), draws=torch.tensor([args.draw])).cpu()[0]
    _write_image(y, args.output)
    print(f"purified {args.input} -> {args.output} (t*={pur['t_star']}, {p.num_steps} reverse steps, "
          f"{pur['sampler']}, seed {seed}, mode {args.mode}, draw {args.draw}, id {args.id})")
    return 0


def load_checked_configs(paths) -> dict:
    """The validated overlay of config files (later ones win, as Snakemake's --configfile); a
    missing or unreadable file or an invalid config raises :class:`ConfigError`."""
    import yaml

    from .config import ConfigError, load_configs

    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: no such config file")
    try:
        return load_configs(paths)
    except (OSError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot read the config ({' '.join(map(str, paths))}): {first}") from None


def _configs(paths) -> dict | None:
    """:func:`load_checked_configs`, or None after printing why the config is unusable."""
    from .config import ConfigError

    try:
        return load_checked_configs(paths)
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
    lock = info.pop("environment_lock")
    for k, v in info.items():
        print(f"{k:>26}: {v}")
    from .envlock import format_status

    for line in format_status(lock):
        print(f"{'environment':>26}: {line}" if not line.startswith(" ") else f"{'':>28}{line.strip()}")
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
                       threads=args.threads, target_seconds=args.target_seconds))
    if args.csv:
        print(f"per-job estimate written to {args.csv}")
    return 0


def _cmd_sha256(args: argparse.Namespace) -> int:
    from .io import sha256_file

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
                   help="images per timed call [GPU: the attacks' EOT pass, attacks.batch_size x pgd.eot at most "
                        "eot_chunk; CPU: the batch that answers in about --target-seconds, at most that]")
    e.add_argument("--target-seconds", type=float, default=60.0,
                   help="CPU without --batch-size: about how long the timing takes [%(default)s]")
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
    from .models.checkpoints import CheckpointError
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
        sampler = args.sampler or pur["sampler"]
        purifier = api.load_purifier(args.diffusion, t_star=pur["t_star"], num_inference_steps=pur["num_inference_steps"],
                                     sampler=sampler, variance_type=cfg["diffusion"]["schedule"]["variance_type"],
                                     grad_mode=pur["grad_mode"] if sampler == pur["sampler"] else "exact",
                                     seed=cfg["seed"], device=device, settings={**pur, "sampler": sampler})
        table = api.evaluate(api.load_classifier(args.classifier, device), purifier,
                             images[: args.n_images].to(device), labels[: args.n_images], setting=args.setting,
                             norm=tm["norm"], eps=tm["eps"], alpha=tm["alpha"], steps=att["pgd"]["steps"],
                             eot=att["pgd"]["eot"], eval_draws=att["eval_draws"], random_draws=ev["random_draws"],
                             fixed_configs=ev["fixed_configs"], seed=cfg["seed"], fixed_draw=att["fixed_draw"],
                             attack=args.attack, options=att)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"dbprepro evaluate: {e}", file=sys.stderr)
        return 2
    print(table.to_markdown(index=False, floatfmt=".4f"))
    if args.csv:
        write_table(table, args.csv)
        print(f"written to {args.csv}")
    return 0


def _cmd_results_doc(args: argparse.Namespace) -> int:
    from .results_doc import write_results_doc

    if not Path(args.tables).is_dir():
        raise FileNotFoundError(f"{args.tables}: no tables (run the DAG, or `dbprepro pull` the recorded run)")
    write_results_doc(args.tables, args.lock, args.out, args.snapshot or None, args.reproduction or None,
                      args.replicates or None)
    print(f"{args.out} written from {args.tables} (the run recorded in {args.lock}); tables copy: {args.snapshot!r}")
    return 0


def _add_evaluate_command(sub) -> None:
    from .attacks import attack_names
    from .purifiers import samplers

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
    e.add_argument("--attack", default="pgd", choices=attack_names(), help="a registered attack [%(default)s]")
    e.add_argument("--sampler", choices=samplers(), help="purifier family [the config's purification.sampler]")
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], help="[the config's device]")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads [torch's default]")
    e.add_argument("--csv", help="also write the table to this CSV")
    e.set_defaults(func=_cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dbprepro", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    from .purifiers import samplers

    p = sub.add_parser("purify", help="purify one image with a diffusion model folder, as the DAG does with --config")
    p.add_argument("input", help="input image (PNG/JPEG, or a .npy float array in [0, 1]); must match the model's "
                                 "size and channels")
    p.add_argument("output", help="where to write the purified image (.npy: the float array, bit for bit)")
    p.add_argument("--config", nargs="+", help="config file(s): t*, sampler, steps, family settings, variance type and "
                                               "seed as the DAG purifies (the flags below override them)")
    p.add_argument("--model", default="results/models/diffusion/vanilla",
                   help="diffusers folder (unet/ + scheduler/, or a hub snapshot) [%(default)s]")
    p.add_argument("--t-star", type=float, help="diffusion strength in (0, 1] [the config's, else 0.1]")
    p.add_argument("--steps", type=int, help="num_inference_steps of the DDPM/DDIM schedule [the config's, else 100]")
    p.add_argument("--sampler", choices=samplers(), help="purifier family [the config's, else ddpm]")
    p.add_argument("--variance-type", choices=["fixed_small", "fixed_large"],
                   help="DDPM reverse variance [the config's, else fixed_large]")
    p.add_argument("--seed", type=int, help="randomness seed [the config's, else 0]")
    p.add_argument("--mode", choices=["random", "fixed"], default="random", help="randomness mode [%(default)s]")
    p.add_argument("--draw", type=int, default=0,
                   help="random mode: the draw index; fixed mode: the fixed configuration [%(default)s]")
    p.add_argument("--id", type=int, default=0, help="sample id keying the noise (the DAG: the image's id) [%(default)s]")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="[%(default)s]")
    p.set_defaults(func=_cmd_purify)

    v = sub.add_parser("validate-config", help="validate config file(s), later files overlaying earlier ones")
    v.add_argument("configs", nargs="+", help="YAML files (e.g. config.yaml config/smoke.yaml)")
    v.add_argument("--show", action="store_true", help="print the resolved config with defaults")
    v.set_defaults(func=_cmd_validate)

    d = sub.add_parser("doctor", help="versions and the environment lock (sha256, mismatches), device, SLURM/DVC, models present")
    d.add_argument("--results", default="results", help="results folder to inspect [%(default)s]")
    d.set_defaults(func=_cmd_doctor)
    _add_cost_commands(sub)
    _add_evaluate_command(sub)
    from .reproduce.cli import add_compare_command

    add_compare_command(sub)  # compare-runs: the reproduction check (dbprepro.reproduce)
    r = sub.add_parser("results-doc", help="write docs/results.md from the tables of the run recorded in dvc.lock")
    for flag, default in (("--tables", "results/tables"), ("--lock", "dvc.lock"), ("--out", "docs/results.md")):
        r.add_argument(flag, default=default, help="[%(default)s]")
    r.add_argument("--snapshot", default="docs/results_tables",
                   help="copy of the tables beside the document, checked against dvc.lock's hash first "
                        "('' for none) [%(default)s]")
    r.add_argument("--reproduction", default="docs/reproduction", help="kept compare-runs check [%(default)s]")
    r.add_argument("--replicates", default="docs/replicates", help="kept replicate seeds' tables [%(default)s]")
    r.set_defaults(func=_cmd_results_doc)

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


#: errors a user can cause (a missing file, a bad config or image, an unverifiable checkpoint): one line on
#: stderr and exit code 2 instead of a traceback (DBPREPRO_DEBUG=1 shows the traceback)
USER_ERRORS = (OSError, ValueError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        import os

        if os.environ.get("DBPREPRO_DEBUG"):
            raise
        print(f"dbprepro {args.command}: {e or type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
