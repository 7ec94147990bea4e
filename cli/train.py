"""``magseg train``: MagNet's two training phases (backbone, then refiner)."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import typer
from magseg.cli.app import Command, app
from magseg.cli.common import (
    DATA_ROOT,
    DEVICE,
    EXIT_USAGE,
    OVERWRITE,
    QUIET,
    SETTINGS,
    check_device,
    config_overrides,
    emit,
    examples,
    fail,
    handle_errors,
    out_dir_option,
    progress_bar,
    refuse_positional_arguments,
    removed_option,
)

# train's own options (the shared ones come from magseg.cli.common).
CONFIG = typer.Option(..., "--config", "-c", metavar="FILE", help="YAML config (see configs/).")
OUT_DIR = out_dir_option("best.ckpt, last.ckpt, train.log and config.yaml (default: runs/<config "
                         "name>)", required=False)
PHASE = typer.Option(
    "all", metavar="backbone|refiner|all",
    help="backbone, refiner (needs a trained backbone in --out-dir) or all (both, in turn).")
EPOCHS = typer.Option(
    None, min=0, metavar="N", help="Epochs of the phase(s) run: sets train.epochs and/or train.refiner_epochs.")
RESUME = typer.Option(
    False, "--resume", help="Continue from <out-dir>/last.ckpt (model, optimizer, schedule, epoch, RNG).")
CACHE_DIR = typer.Option(
    None, "--cache-dir", metavar="DIR", help="Where decoded JPEG/PNG scenes and the refiner's coarse maps are "
    "cached (default: <out-dir>/cache); share one between runs on the same data to decode once.")
ENCODER_WEIGHTS = typer.Option(
    None, metavar="imagenet|none|FILE", help="imagenet, none, or a state dict file (timm, "
    "torchgeo: see docs/training.md); sets model.encoder_weights. Offline, imagenet works for "
    "timm-tf_efficientnet_lite0 and tu-tf_efficientnet_lite0 only.")
REMOVED_OUT = removed_option("--out", "--out is now --out-dir (-o), as in predict and benchmark")


@app.command(
    cls=Command,
    context_settings={"allow_extra_args": True},  # see refuse_positional_arguments
    epilog=examples([
        "magseg train --config configs/deepglobe.yaml --data-root /data/deepglobe -o runs/dg",
        "magseg train --config configs/pyramid256.yaml --data-root data/tiles -o runs/t "
        "--phase backbone --epochs 5 --set train.batch_size=4 --set model.in_channels=4 "
        "--set data.bands=[1,2,3,4]",
        "magseg train --config configs/deepglobe.yaml -o runs/dg --resume   "
        "# continue an interrupted run",
        "torchrun --nproc_per_node 2 -m magseg.cli.app train --config configs/tiny.yaml "
        "--data-root data/ -o runs/ddp",
        "magseg train -c configs/deepglobe.yaml --data-root /data/dg -o runs/dg "
        "| jq -c '{phase, epoch, loss, val_miou}'",
    ]),
)
@handle_errors
def train(
    ctx: typer.Context,
    config: Path = CONFIG,
    settings: list[str] = SETTINGS,
    data_root: Path = DATA_ROOT,
    out_dir: Path = OUT_DIR,
    phase: str = PHASE,
    epochs: int = EPOCHS,
    resume: bool = RESUME,
    overwrite: bool = OVERWRITE,
    cache_dir: Path = CACHE_DIR,
    encoder_weights: str = ENCODER_WEIGHTS,
    device: str = DEVICE,
    quiet: bool = QUIET,
    old_out: str = REMOVED_OUT,
) -> None:
    """Train a backbone and a refiner; one JSON line per epoch on stdout.

    Phase 1 trains one segmenter on windows sampled at every stage's magnification. Phase 2
    freezes it (taken from <out-dir>/best.ckpt, or last.ckpt with train.backbone_from=last)
    and trains the refiner on (fine, coarse) prediction pairs. Each epoch writes
    <out-dir>/last.ckpt and, when validation mIoU improves, <out-dir>/best.ckpt; both hold
    the weights and the full resolved config, so `magseg predict` needs nothing else.
    Normalisation statistics are computed from the training split unless data.mean/data.std
    are set.

    Runs on several processes under torchrun (gloo on CPU, nccl on GPU); only rank 0 writes.
    Exit 2 when the run cannot start as asked (a usage or config error, a device this machine
    lacks, a checkpoint in --out-dir that is unreadable or does not match the config); 1 on
    bad data (a split file, image or mask).
    """
    refuse_positional_arguments(ctx)
    check_device(device)
    cfg = _load_config(config, settings, phase, epochs, encoder_weights, device)  # needs no torch

    from magseg.training.trainer import TrainOptions
    from magseg.training.trainer import train as run_training

    out_dir = out_dir if out_dir is not None else Path("runs") / cfg.name
    if out_dir.exists() and not out_dir.is_dir():
        fail(f"--out-dir {out_dir} is a file; give a directory (created if missing) for the "
             "checkpoints", EXIT_USAGE)
    with _log_to_stderr(quiet):
        run_training(cfg, TrainOptions(
            out=out_dir, phase=phase, resume=resume, overwrite=overwrite, data_root=data_root,
            cache_dir=cache_dir, on_epoch=emit,
            progress=lambda total, desc: progress_bar(total, desc, quiet, "step")))


def _load_config(path: Path, settings: list[str] | None, phase: str, epochs: int | None,
                 encoder_weights: str | None, device: str | None):
    """The config file with ``--set`` and the flags that set config keys applied."""
    from magseg.config import load_config

    phases = ("backbone", "refiner") if phase == "all" else (phase,)
    flags = {f"train.{'epochs' if p == 'backbone' else 'refiner_epochs'}": epochs for p in phases}
    flags.update({"model.encoder_weights": encoder_weights, "engine.device": device})
    return load_config(path, config_overrides(settings, flags))


@contextlib.contextmanager
def _log_to_stderr(quiet: bool):
    """The trainer's log lines on stderr, from the main process only, unless ``quiet``."""
    from magseg.training.distributed import launched_by_torchrun

    main = not launched_by_torchrun() or _rank() == 0
    if not main or quiet:
        yield
        return
    logger = logging.getLogger("magseg.train")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("magseg: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))
