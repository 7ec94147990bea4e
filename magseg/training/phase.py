"""What both phases do alike: start from their parts (``PhaseParts``, made by
``backbone_phase`` or ``refiner_phase``), train epoch by epoch, validate, and write
``last.ckpt`` (and ``best.ckpt`` when validation improves) after every epoch.

A phase's optimisation: AdamW, a poly learning-rate decay over the phase's steps, and for
``fp16`` a loss scaler. ``--resume`` restores all of it, the epoch and the RNG states
(``restore``), so a resumed phase continues as an uninterrupted one would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from magseg.checkpoint import Checkpoint, save_checkpoint
from magseg.config import Config
from magseg.data.cache import SceneCache
from magseg.evaluation.metrics import percent
from magseg.training import distributed
from magseg.training.batches import BackboneBatch, BackboneItem, RefinerBatch, RefinerItem
from magseg.training.loader import batches, loader_options, phase_workers, resolve_workers
from magseg.training.resume import TrainingState, rng_state, set_rng_state
from magseg.training.samples import BackboneSamples, EpochSampler, RefinerSamples
from magseg.training.state import BEST, LAST, Phase, RunPrecision, RunState, logger
from magseg.training.validation import Validation, validate

# ``loss(trained, backbone, batch, config, precision) -> (loss, batch size)``: ``trained`` is
# what the optimizer updates (DDP-wrapped when distributed), ``backbone`` the bare backbone.
Loss = Callable[[nn.Module, nn.Module, Any, Config, RunPrecision], tuple[Tensor, int]]


@dataclass
class PhaseParts:
    """What a phase trains, on what: made after the phase's seeding, before its loader."""

    name: Phase
    epochs: int
    lr: float
    backbone: nn.Module
    refiner: nn.Module | None
    trained: nn.Module  # the module the optimizer updates: the backbone or the refiner
    dataset: BackboneSamples | RefinerSamples
    collate: Callable[[list[BackboneItem]], BackboneBatch] | Callable[[list[RefinerItem]], RefinerBatch]
    loss: Loss


@dataclass
class PhaseRun:
    """One phase being trained: its models, data, optimisation and where it stands."""

    name: Phase
    epochs: int
    backbone: nn.Module
    refiner: nn.Module | None
    trained: nn.Module  # the module the optimizer updates (DDP-wrapped when distributed)
    loader: DataLoader
    dataset: BackboneSamples | RefinerSamples
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    # fp16's loss scaler (disabled, a pass-through, for fp32 and bf16).
    scaler: torch.amp.GradScaler
    loss: Loss
    start_epoch: int = 0
    best_miou: float = -math.inf


def _poly(steps: int, power: float) -> Callable[[int], float]:
    return lambda step: max(0.0, 1 - step / max(steps, 1)) ** power


def scene_cache(state: RunState) -> SceneCache | None:
    """The training scenes' cache, every entry made (JPEG/PNG layouts; GeoTIFFs are read
    by windows and need none). Decoding happens here, in the main process of each rank
    (its share, then any missing), so DataLoader workers only ever read entries, and a
    full disk stops the run with one message instead of a worker's traceback."""
    config, world = state.config, state.world
    if config.data.layout == "geotiff":
        return None
    cache = SceneCache(state.cache_root, config)
    bar = state.progress(len(state.train_scenes), "scene cache")
    threads = max(1, resolve_workers(config.train.num_workers))
    try:
        cache.prepare(state.train_scenes[world.rank :: world.size], threads, on_scene=lambda: bar.update(1))
        distributed.barrier(world)
        if world.distributed:
            cache.prepare(state.train_scenes, threads)
    finally:
        bar.close()
    return cache


def start_phase(state: RunState, parts: PhaseParts, resume: Checkpoint | None) -> PhaseRun:
    """The phase's loader and optimisation around ``parts``; restored from ``resume``."""
    train, world, device = state.config.train, state.world, state.device
    trained = parts.trained
    if world.distributed:
        trained = DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = (DistributedSampler(parts.dataset, world.size, world.rank, shuffle=False)
               if world.distributed else SequentialSampler(parts.dataset))
    # The loader's own generator: starting an iteration draws a seed for the workers, from
    # the global torch RNG otherwise, which dropout also draws from. Persistent workers
    # start once per run, so a resumed run would draw once more than an uninterrupted
    # one. Samples need no worker seed (they are functions of their index).
    workers = phase_workers(train.num_workers, parts.name, device)
    loader = DataLoader(parts.dataset, batch_size=train.batch_size,
                        sampler=EpochSampler(sampler, parts.dataset), collate_fn=parts.collate,
                        generator=torch.Generator().manual_seed(train.seed), **loader_options(workers, device))
    optimizer = torch.optim.AdamW(trained.parameters(), lr=parts.lr, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _poly(parts.epochs * len(loader), train.poly_power))
    # fp16 gradients underflow without a loss scale; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=state.precision.train == "fp16")
    run = PhaseRun(parts.name, parts.epochs, parts.backbone, parts.refiner, trained, loader, parts.dataset,
                   optimizer, scheduler, scaler, parts.loss)
    if resume is not None:
        restore(run, resume)
    return run


def restore(run: PhaseRun, resume: Checkpoint) -> None:
    """Optimiser, schedule, epoch, best score, RNG and loss scale from ``resume``."""
    state: TrainingState = resume.training  # type: ignore[assignment]  (written by ``save``)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    # The schedule is a function of (step, total steps): with the planned total this
    # gives the stored rate again; with more --epochs the decay stretches from here.
    for group, base, fn in zip(run.optimizer.param_groups, run.scheduler.base_lrs, run.scheduler.lr_lambdas):
        group["lr"] = base * fn(run.scheduler.last_epoch)
    run.start_epoch = int(state["epoch"])
    run.best_miou = float(state.get("best_miou", -math.inf))
    set_rng_state(state["rng"])
    if state.get("scaler"):  # absent or empty: written without a loss scale
        run.scaler.load_state_dict(state["scaler"])
    logger.info("resumed %s phase from %s after epoch %d", run.name, resume.path, run.start_epoch)


def train_step(run: PhaseRun, batch: BackboneBatch | RefinerBatch, config: Config,
               precision: RunPrecision) -> tuple[Tensor, int]:
    """One optimisation step on ``batch``: its loss (before the step) and size."""
    loss, count = run.loss(run.trained, run.backbone, batch, config, precision)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return loss, count


def _fit_epoch(state: RunState, run: PhaseRun, epoch: int) -> float:
    """Train ``run`` for one epoch; the mean loss over every rank's samples."""
    run.dataset.set_epoch(epoch)
    inner = run.loader.sampler.sampler  # type: ignore[attr-defined]  (an EpochSampler's)
    if isinstance(inner, DistributedSampler):
        inner.set_epoch(epoch)
    totals = torch.zeros(2, dtype=torch.float64)  # loss * samples, samples
    bar = state.progress(len(run.loader), f"{run.name} {epoch + 1}/{run.epochs}")
    try:
        for batch in batches(run.loader):
            loss, count = train_step(run, batch, state.config, state.precision)
            totals += torch.tensor([float(loss.detach()) * count, count], dtype=torch.float64)
            bar.update(1)
            bar.set_postfix_str(f"loss {float(loss.detach()):.4f}")
    finally:
        bar.close()
    distributed.all_sum(state.world, totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


def _validate(state: RunState, run: PhaseRun) -> Validation:
    bar = state.progress(len(state.val_scenes), "validation")
    try:
        return validate(state.config, state.val_scenes, run.backbone, run.refiner, state.world,
                        state.precision.engine, on_scene=lambda: bar.update(1))
    finally:
        bar.close()


def train_epoch(state: RunState, run: PhaseRun, epoch: int) -> None:
    """One epoch: train, validate when ``train.val_every`` says, write the checkpoints, log
    the epoch's record and hand it to ``options.on_epoch``."""
    config = state.config
    start = time.perf_counter()
    record: dict[str, Any] = {
        "phase": run.name, "epoch": epoch + 1, "epochs": run.epochs,
        "loss": _fit_epoch(state, run, epoch),
        "lr": run.optimizer.param_groups[0]["lr"], "precision": state.precision.train,
    }
    improved = False
    if (epoch + 1) % config.train.val_every == 0 or epoch + 1 == run.epochs:
        scores = _validate(state, run)
        record.update(val_miou=scores.miou, val_accuracy=scores.accuracy, val_fwiou=scores.fwiou,
                      val_iou=scores.iou, val_pixels=scores.pixels)
        if math.isfinite(scores.miou) and scores.miou > run.best_miou:
            run.best_miou, improved = scores.miou, True
    record["seconds"] = round(time.perf_counter() - start, 3)
    record["best"] = improved
    save(state, run, epoch, record, improved)
    state.result.records.append(record)
    logger.info("%s epoch %d/%d: loss %.4f%s (%.1f s)%s", run.name, epoch + 1, run.epochs, record["loss"],
                f", val mIoU {percent(record['val_miou'])}" if "val_miou" in record else "",
                record["seconds"], " best" if improved else "")
    state.overall.update(1)
    if state.world.main and state.options.on_epoch:
        state.options.on_epoch(record)


def save(state: RunState, run: PhaseRun, epoch: int, record: dict[str, Any], improved: bool) -> None:
    """``last.ckpt`` with the training state for ``--resume``, and ``best.ckpt`` when
    ``improved`` (main process only)."""
    if not state.world.main:
        return
    training: TrainingState = {
        "phase": run.name,
        "epoch": epoch + 1,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "best_miou": run.best_miou,
        "rng": rng_state(),
        "scaler": run.scaler.state_dict(),
    }
    meta = dict(record)
    # last first: if writing best fails, the run can still resume from last.
    state.result.last = save_checkpoint(state.out / LAST, state.config, run.backbone, run.refiner,
                                        meta=meta, training=training)
    if improved:
        state.result.best = save_checkpoint(state.out / BEST, state.config, run.backbone, run.refiner, meta=meta)
