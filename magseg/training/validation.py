"""Validation: the full progressive engine on whole scenes, one global confusion matrix.

Each rank segments its share of the scenes; the matrices are summed across ranks before any
score is taken (mIoU of the summed matrix, never a mean of per-image scores).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from magseg.config import Config, EngineConfig
from magseg.data.scenes import Scene
from magseg.engine.stages import segment
from magseg.evaluation.metrics import ConfusionMatrix
from magseg.training.choice import GRID, window_matrices
from magseg.training.distributed import World, all_sum
from magseg.training.samples import load_scene


@dataclass(frozen=True)
class Validation:
    """The scores of one validation (``magseg.evaluation.metrics.scores`` of the confusion
    matrix summed over all ranks; NaN where undefined)."""

    miou: float
    iou: list[float]  # per class
    accuracy: float
    fwiou: float
    pixels: int  # labelled pixels counted
    matrix: Tensor  # (C, C) int64, rows ground truth
    # With ``windows``: (scenes, windows, C, C) int64, one matrix per window of each scene
    # (magseg.training.choice); else None.
    units: Tensor | None = None


def _bare(module: nn.Module | None) -> nn.Module | None:
    return getattr(module, "module", module)  # DDP wraps the model in .module


def validate(
    config: Config,
    scenes: list[Scene],
    backbone: nn.Module,
    refiner: nn.Module | None,
    world: World,
    engine: EngineConfig,
    on_scene: Callable[[], None] | None = None,
    windows: bool = False,
) -> Validation:
    """Segment ``scenes`` (this rank takes every ``world.size``-th) and score them, as
    ``engine`` says (its device and resolved precision: ``magseg.engine.precision.
    resolved_engine``; the rest of the pyramid and refinement are ``config``'s).

    ``windows``: also one confusion matrix per window of each scene (``Validation.units``).
    """
    backbone, refiner = _bare(backbone), _bare(refiner)
    modes = [(m, m.training) for m in (backbone, refiner) if m is not None]
    for module, _ in modes:
        module.eval()
    matrix = ConfusionMatrix(config.num_classes, [c.in_mean for c in config.classes])
    c = config.num_classes
    units = torch.zeros((len(scenes), GRID * GRID, c, c), dtype=torch.int64) if windows else None
    try:
        for index in range(world.rank, len(scenes), world.size):
            image, mask = load_scene(scenes[index], config)
            result = segment(image, backbone, config.pyramid, refiner=refiner, refine=config.refine,
                             engine=engine)
            matrix.update(result.labels, mask)
            if units is not None:
                units[index] = window_matrices(result.labels, mask, c)
            if on_scene:
                on_scene()
    finally:
        for module, mode in modes:
            module.train(mode)
    all_sum(world, matrix.matrix)
    scores = matrix.scores()
    return Validation(miou=scores["miou"], iou=scores["iou"], accuracy=scores["accuracy"],
                      fwiou=scores["fwiou"], pixels=scores["pixels"], matrix=matrix.matrix,
                      units=None if units is None else all_sum(world, units))
