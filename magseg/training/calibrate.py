"""The temperature training stores in best.ckpt, fitted on the validation scenes.

The final probabilities of the chosen model (its pyramid, refiner and K, as predict runs
it) are taken for every validation scene; up to ``PIXELS_PER_SCENE`` labelled pixels of each
(counted classes only) are drawn, and the temperature that minimises their negative
log-likelihood is fitted (``magseg.evaluation.calibration.fit_temperature``). The ECE on
those pixels before and after is stored beside it. A fitted temperature that raises that
ECE (a model already calibrated to within the bins' noise: NLL and ECE then disagree by
a few hundredths of a point) is not kept: T = 1 is stored, and the fitted value beside it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from magseg.checkpoint import load_checkpoint, load_state, save_checkpoint
from magseg.config import Config, EngineConfig
from magseg.data.scenes import Scene
from magseg.engine.stages import segment
from magseg.evaluation.calibration import (
    ReliabilityBins,
    apply_temperature,
    fit_temperature,
    sample_pixels,
    scored_pixels,
)
from magseg.evaluation.metrics import percent
from magseg.segmenter import create_refiner, create_segmenter_model
from magseg.training.samples import load_scene
from magseg.training.state import BEST, RunState, logger

# Enough pixels for a one-parameter fit, few enough to hold for any validation split.
PIXELS_PER_SCENE = 100_000


def validation_pixels(config: Config, scenes: list[Scene], backbone: nn.Module, refiner: nn.Module | None,
                      engine: EngineConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Final probabilities ``(N, C)`` and truth ``(N,)`` of pixels drawn from ``scenes``,
    segmented as ``engine`` says (device, resolved precision; the rest is ``config``'s)."""
    generator = torch.Generator().manual_seed(seed)
    probs, targets = [], []
    modes = [(m, m.training) for m in (backbone, refiner) if m is not None]
    for module, _ in modes:
        module.eval()
    try:
        for scene in scenes:
            image, mask = load_scene(scene, config)
            with torch.inference_mode():
                result = segment(image, backbone, config.pyramid, refiner=refiner, refine=config.refine,
                                 engine=engine, return_probs=True)
            assert result.probs is not None
            scored = scored_pixels(mask, [c.in_mean for c in config.classes])
            p, t = sample_pixels(result.probs.cpu(), mask, scored, PIXELS_PER_SCENE, generator)
            probs.append(p)
            targets.append(t)
    finally:
        for module, mode in modes:
            module.train(mode)
    c = config.num_classes
    return (torch.cat(probs) if probs else torch.zeros(0, c),
            torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long))


def fit_calibration(probs: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    """The checkpoint's ``calibration`` entry from validation pixels ``(N, C)``, ``(N,)``:
    the temperature, the pixels it was fitted on, and their ECE before and after."""
    fitted = fit_temperature(probs, target)
    before, after = ReliabilityBins(), ReliabilityBins()
    before.update(probs.T, target)
    after.update(apply_temperature(probs, fitted, dim=-1).T, target)
    ece_before, ece_after = before.ece(), after.ece()
    kept = ece_before is None or ece_after is None or ece_after <= ece_before
    return {"temperature": fitted if kept else 1.0, "fitted_temperature": fitted, "kept": kept,
            "pixels": int(target.numel()), "fitted_on": "validation",
            "val_ece_before": ece_before, "val_ece_after": ece_after if kept else ece_before,
            "val_ece_fitted": ece_after}


def calibrate_best(state: RunState) -> None:
    """Fit the temperature of best.ckpt's final probabilities on the validation scenes
    (the model as stored, after the refinement choice) and store it in best.ckpt."""
    path = state.out / BEST
    if not state.world.main or not state.val_scenes or not path.is_file():
        return
    best = load_checkpoint(path)
    if best.warnings:
        # A backbone-phase file (read without the refiner its config promises): not the
        # final model, and rewriting it would store the config as read; the refiner
        # phase's best.ckpt gets the temperature.
        logger.info("temperature: not fitted, %s is not the final model yet", path)
        return
    backbone = create_segmenter_model(best.config, pretrained=False)
    load_state(backbone, best.backbone, "backbone", best.path)
    stored = None  # the refiner's weights stay in the file even when the choice is off
    if best.refiner is not None:
        stored = create_refiner(best.config.override({"refiner.enabled": True}))
        assert stored is not None
        load_state(stored, best.refiner, "refiner", best.path)
    used = stored if best.config.refiner.enabled else None
    device = state.device
    probs, target = validation_pixels(best.config, state.val_scenes, backbone.to(device),
                                      None if used is None else used.to(device), state.precision.engine,
                                      seed=state.config.train.seed)
    calibration = fit_calibration(probs, target)
    state.result.calibration = calibration
    logger.info("temperature %.3f fitted on %d validation pixels: ECE %s at T = 1, %s with it; "
                "stored T = %.3f in %s", calibration["fitted_temperature"], calibration["pixels"],
                percent(calibration["val_ece_before"]), percent(calibration["val_ece_fitted"]),
                calibration["temperature"], path)
    state.result.best = save_checkpoint(path, best.config, backbone.cpu(),
                                        None if stored is None else stored.cpu(), meta=best.meta,
                                        training=best.training, calibration=calibration)
    if state.options.on_epoch:
        state.options.on_epoch({"phase": "calibration", **calibration})
