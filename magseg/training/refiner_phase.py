"""Phase "refiner": the backbone frozen (from ``<out>/best.ckpt``, or ``last.ckpt`` per
``train.backbone_from``), the refiner learns ``refiner(fine, coarse) -> mask``.

Fine and coarse come from the frozen backbone through the engine's own helpers, at the
engine's precision, as predict computes them (docs/precision.md#training-and-the-engine);
only the refiner's forward pass and its loss run under the training autocast.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from magseg.checkpoint import Checkpoint, load_checkpoint, load_state
from magseg.config import Config, EngineConfig
from magseg.data.scenes import IGNORE
from magseg.engine.backbone import context_ratios, input_multiple
from magseg.engine.pyramid import CropBox, crop_windows, cut_crops
from magseg.engine.resample import TensorSource, resample_window
from magseg.engine.stages import crop_probs, stage_probs
from magseg.errors import CheckpointError
from magseg.geometry import Rect
from magseg.segmenter import create_refiner, create_segmenter_model
from magseg.training.batches import RefinerBatch, collate_refiner
from magseg.training.coarse import prepare_coarse_maps
from magseg.training.losses import (
    gather_points,
    margin_uncertainty,
    segmentation_loss,
    uncertain_points,
)
from magseg.training.matching import check_matches
from magseg.training.phase import PhaseParts, scene_cache
from magseg.training.samples import RefinerSamples, training_input
from magseg.training.state import BEST, LAST, RunPrecision, RunState, logger


def refiner_point_loss(logits: Tensor, mask: Tensor, config: Config) -> Tensor:
    """The refiner's loss on its logits ``(B, C, H, W)`` against ``mask`` ``(B, H, W)``.

    With ``train.refiner_points``, only PointRend-style points count: mostly the pixels the
    refined prediction is least sure of (boundaries, small objects, the fields that look
    alike), where refining matters, instead of every pixel of the large easy regions.
    Unlabelled pixels rank last and are left out of the loss.
    """
    train = config.train
    if train.refiner_points is not None:
        count = max(1, round(train.refiner_points * mask.shape[-2] * mask.shape[-1]))
        uncertainty = margin_uncertainty(logits).masked_fill(mask == IGNORE, -2.0)
        index = uncertain_points(uncertainty, count, train.refiner_oversample, train.refiner_importance)
        logits, mask = gather_points(logits, index), gather_points(mask, index)
    return segmentation_loss(logits, mask, train.refiner_ohem, balance=train.refiner_balance)


@torch.no_grad()
def coarse_inputs(backbone: nn.Module, batch: RefinerBatch, config: Config, engine: EngineConfig) -> Tensor:
    """The refiner's coarse input ``(B, classes, ch, cw)``: the batch's windows of the cached
    coarse maps (``batch.coarse``, magseg.training.coarse), or else computed here from each
    item's whole scene at ``scales[0]`` (``engine``: device and resolved precision)."""
    device = torch.device(engine.device)
    if batch.coarse is not None:
        return batch.coarse.to(device, non_blocking=True)
    assert batch.scene0 is not None  # a RefinerItem holds one of the two
    coarse = []
    for scene0, size, box in zip(batch.scene0, batch.size, batch.box):
        y0 = stage_probs(backbone, scene0.to(device), config.pyramid, engine)
        (window,) = crop_windows([CropBox.whole(Rect(*(int(v) for v in box)))], config.pyramid.crop)
        # As StageRun.coarse upsamples a crop's coarse view: only the window, by the engine's filter.
        coarse.append(resample_window(TensorSource(y0), tuple(int(v) for v in size), window))
    return torch.stack(coarse)


@torch.no_grad()
def refiner_inputs(backbone: nn.Module, batch: RefinerBatch, config: Config,
                   engine: EngineConfig) -> tuple[Tensor, Tensor]:
    """``(fine, coarse)`` ``(B, classes, ch, cw)`` each, as the engine gives them to the
    refiner: coarse is stage 0 of the engine (``stage_probs`` of the scene at ``scales[0]``)
    upsampled to the window's stage and cut like a crop; fine is ``crop_probs`` of the
    window, cut to the crop's own part of it."""
    device = torch.device(engine.device)
    coarse = coarse_inputs(backbone, batch, config, engine)
    contexts = None if batch.contexts is None else [c.to(device) for c in batch.contexts]
    fine = crop_probs(backbone, batch.fine.to(device), training_input(config), contexts=contexts,
                      precision=engine.precision, multiple=input_multiple(backbone))
    # The crop's own part of its grown window (training_margin), as StageRun.fine cuts it.
    fine = cut_crops(fine, [tuple(int(v) for v in o) for o in batch.offset], config.pyramid.crop)
    return fine, coarse


def refiner_loss(model: nn.Module, backbone: nn.Module, batch: RefinerBatch, config: Config,
                 precision: RunPrecision) -> tuple[Tensor, int]:
    """The loss of ``refiner(fine, coarse)`` logits against the window's mask
    (``refiner_point_loss``: sampled points, class-balanced, as ``train`` says).

    ``refiner_inputs`` from the frozen ``backbone`` at the engine's precision; ``model`` (the
    refiner or its DDP wrapper) and the loss under the training autocast.
    """
    fine, coarse = refiner_inputs(backbone, batch, config, precision.engine)
    with precision.training():
        logits = model(fine, coarse)
        mask = batch.mask.to(precision.device)
        return refiner_point_loss(logits, mask, config), mask.shape[0]


def backbone_checkpoint(config: Config, out) -> tuple[Checkpoint, Config]:
    """The checkpoint whose backbone the refiner phase builds on, from ``out``, and
    ``config`` with its normalisation.

    Raises:
        CheckpointError: there is none, or it was trained for another model.
    """
    order = [BEST, LAST] if config.train.backbone_from == "best" else [LAST]
    path = next((out / n for n in order if (out / n).exists()), None)
    if path is None:
        raise CheckpointError(
            f"the refiner phase needs a trained backbone in {out / order[0]}; "
            "run `magseg train --phase backbone` (or --phase all) first"
        )
    ckpt = load_checkpoint(path)
    return ckpt, check_matches(config, ckpt)


def refiner_parts(state: RunState, resume: Checkpoint | None, base: Checkpoint | None) -> PhaseParts:
    """The frozen backbone (``resume``'s, else ``base``, else ``backbone_checkpoint``), the
    refiner to train and its samples; the coarse maps are made first."""
    train, device = state.config.train, state.device
    base = resume or base
    if base is None:
        base, state.config = backbone_checkpoint(state.config, state.out)
        logger.info("refiner phase: frozen backbone from %s", base.path)
    backbone = create_segmenter_model(state.config, pretrained=False)
    load_state(backbone, base.backbone, "backbone", base.path)
    backbone.to(device, memory_format=state.memory_format).eval().requires_grad_(False)
    refiner = create_refiner(state.config)
    assert refiner is not None  # the trainer drops the refiner phase when disabled
    if resume is not None:
        if resume.refiner is None:
            raise CheckpointError(f"{resume.path} is a refiner-phase checkpoint without a refiner")
        load_state(refiner, resume.refiner, "refiner", resume.path)
    refiner.to(device).train()
    length = train.refiner_samples_per_epoch or train.samples_per_epoch
    cache = scene_cache(state)
    bar = state.progress(len(state.train_scenes), "coarse maps")
    try:
        coarse = prepare_coarse_maps(backbone, state.train_scenes, state.config, state.cache_root,
                                     state.precision.engine, state.world, cache, on_scene=lambda: bar.update(1))
    finally:
        bar.close()
    dataset = RefinerSamples(state.train_scenes, state.config, length, train.seed,
                             ratios=context_ratios(backbone), cache=cache, coarse=coarse)
    return PhaseParts("refiner", train.refiner_epochs, train.refiner_lr, backbone, refiner, refiner, dataset,
                      collate_refiner, refiner_loss)
