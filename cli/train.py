"""``magseg train``: MagNet's two training phases (backbone, then refiner)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer
from magseg.cli.app import app
from magseg.cli.common import EXIT_USAGE, check_device, emit, fail, handle_errors, progress_bar


@app.command(
    epilog=(
        "Examples:\n\n"
        "  magseg train --config configs/deepglobe.yaml --data-root /data/deepglobe --out runs/dg\n\n"
        "  magseg train --config configs/pyramid256.yaml --data-root data/tiles --out runs/t "
        "--phase backbone --epochs 5 train.batch_size=4 model.in_channels=4 data.bands=[1,2,3,4]\n\n"
        "  magseg train --config configs/deepglobe.yaml --out runs/dg --resume   "
        "# continue an interrupted run\n\n"
        "  torchrun --nproc_per_node 2 -m magseg.cli.app train --config configs/tiny.yaml "
        "--data-root data/ --out runs/ddp\n\n"
        "  magseg train -c configs/deepglobe.yaml --data-root /data/dg --out runs/dg "
        "| jq -c '{phase, epoch, loss, val_miou}'"
    )
)
@handle_errors
def train(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config (see configs/)."),
    overrides: list[str] = typer.Argument(
        None, help="Config overrides key=value, e.g. train.lr=0.0005 pyramid.scales=[256,512]."
    ),
    data_root: Path = typer.Option(
        None, "--data-root", help="Dataset root with the split files (default: data.root of the config)."
    ),
    out: Path = typer.Option(
        None, "--out", "-o", help="Output directory for best.ckpt, last.ckpt, train.log, config.yaml "
        "(default: runs/<config name>)."
    ),
    phase: str = typer.Option(
        "all", help="backbone, refiner (needs a trained backbone in --out) or all (both, in turn)."
    ),
    epochs: int = typer.Option(
        None, min=0, help="Epochs of the phase(s) run: sets train.epochs and/or train.refiner_epochs."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from --out/last.ckpt (model, optimizer, schedule, epoch, RNG)."
    ),
    overwrite: bool = typer.Option(False, help="Start over in an --out that already holds checkpoints."),
    cache_dir: Path = typer.Option(
        None, "--cache-dir", help="Where decoded JPEG/PNG scenes and the refiner's coarse maps are "
        "cached (default: <out>/cache); share one between runs on the same data to decode once."
    ),
    encoder_weights: str = typer.Option(
        None, help="imagenet or none (default: model.encoder_weights). Offline, imagenet works for "
        "timm-tf_efficientnet_lite0 and tu-tf_efficientnet_lite0 only."
    ),
    device: str = typer.Option(None, help="cpu or cuda (default: engine.device)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or log lines on stderr."),
) -> None:
    """Train a backbone and a refiner; one JSON line per epoch on stdout.

    Phase 1 trains one segmenter on windows sampled at every stage's magnification. Phase 2
    freezes it (taken from --out/best.ckpt, or last.ckpt with train.backbone_from=last) and
    trains the refiner on (fine, coarse) prediction pairs. Each epoch writes --out/last.ckpt
    and, when validation mIoU improves, --out/best.ckpt; both hold the weights and the full
    resolved config, so `magseg predict` needs nothing else. Normalisation statistics are
    computed from the training split unless data.mean/data.std are set.

    Runs on several processes under torchrun (gloo on CPU, nccl on GPU); only rank 0 writes.
    Exit 2 when the run cannot start as asked (a usage or config error, a device this machine
    lacks, a checkpoint in --out that is unreadable or does not match the config); 1 on bad
    data (a split file, image or mask).
    """
    from magseg.config import load_config
    from magseg.training.distributed import launched_by_torchrun
    from magseg.training.trainer import TrainOptions
    from magseg.training.trainer import train as run_training

    check_device(device)
    items = list(overrides or [])
    phases = ("backbone", "refiner") if phase == "all" else (phase,)
    if epochs is not None:
        items += [f"train.{'epochs' if p == 'backbone' else 'refiner_epochs'}={epochs}" for p in phases]
    if encoder_weights is not None:
        items.append(f"model.encoder_weights={encoder_weights}")
    if device is not None:
        items.append(f"engine.device={device}")
    cfg = load_config(config, items)
    out = out if out is not None else Path("runs") / cfg.name
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a directory (created if missing) for the checkpoints",
             EXIT_USAGE)

    main = not launched_by_torchrun() or _rank() == 0
    logger = logging.getLogger("magseg.train")
    handler = None
    if main and not quiet:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("magseg: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        run_training(
            cfg,
            TrainOptions(
                out=out, phase=phase, resume=resume, overwrite=overwrite, data_root=data_root,
                cache_dir=cache_dir,
                on_epoch=emit, progress=lambda total, desc: progress_bar(total, desc, quiet, "step"),
            ),
        )
    finally:
        if handler is not None:
            logger.removeHandler(handler)


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))
