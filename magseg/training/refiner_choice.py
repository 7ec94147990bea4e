"""After the refiner phase: validate the best epoch's models at every K of
``train.choose_k`` (and ``refine.points`` and 1), with the refiner and without it, and store
the choice (``magseg.training.choice.choose``) in best.ckpt's ``refine.points`` and
``refiner.enabled``.

The choice keeps patch-only (K = 1, no refiner) unless a candidate beats it by more than the
validation noise, a bootstrap interval over validation scenes or windows: a refiner or a K
that wins on a few validation tiles by chance does not reach predict and benchmark.
``--set refiner.enabled=...`` / ``refine.points=...`` override the choice; the refiner's
weights stay in the file. last.ckpt keeps the training config, for --resume.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from magseg.checkpoint import Checkpoint, load_checkpoint, load_state, save_checkpoint
from magseg.evaluation.metrics import percent
from magseg.segmenter import create_refiner, create_segmenter_model
from magseg.training import distributed
from magseg.training.choice import LEVEL, Candidate, choose
from magseg.training.phase import PhaseRun
from magseg.training.state import BEST, RunState, logger
from magseg.training.validation import validate


def _sweep(state: RunState, backbone: nn.Module, refiner: nn.Module, ks: list[float]) -> list[Candidate]:
    """Every ``(refiner on/off, K)`` validated, one confusion matrix per scene window."""
    candidates = []
    bar = state.progress(2 * len(ks) * len(state.val_scenes), "refinement sweep")
    try:
        for enabled in (True, False):
            for k in ks:
                bar.set_postfix_str(f"K={k}, refiner {'on' if enabled else 'off'}")
                scores = validate(state.config.override({"refine.points": k}), state.val_scenes, backbone,
                                  refiner if enabled else None, state.world, state.precision.engine,
                                  on_scene=lambda: bar.update(1), windows=True)
                assert scores.units is not None  # asked for (windows=True)
                candidates.append(Candidate(enabled, k, scores.units))
    finally:
        bar.close()
    return candidates


def _choice_record(pick: Candidate, sweep: list[dict[str, Any]], unit: str, own_k: float) -> dict[str, Any]:
    """best.ckpt's meta ``refiner_choice``: the pick, its gain and the whole sweep."""
    at_own_k = {s["refiner"]: s["val_miou"] for s in sweep if s["k"] == own_k}
    picked = next(s for s in sweep if (s["refiner"], s["k"]) == (pick.refiner, pick.k))
    return {"enabled": pick.refiner, "points": pick.k, "val_miou": picked["val_miou"],
            "val_miou_refiner": at_own_k[True], "val_miou_no_refiner": at_own_k[False],
            "gain": picked["gain"], "interval": picked["interval"],
            "rule": f"patch-only (K=1, no refiner) unless a candidate's {round(100 * LEVEL)}% "
                    f"bootstrap interval of mIoU gain over it, resampling validation {unit}, "
                    "is above 0",
            "bootstrap_unit": unit, "sweep": sweep}


def _log_sweep(sweep: list[dict[str, Any]]) -> None:
    for s in sweep:
        low, high = s["interval"]
        logger.info("refinement sweep: K=%s, refiner %s: val mIoU %s, gain over patch-only "
                    "%+.1f points (%d%% interval %+.1f..%+.1f)%s", s["k"], "on" if s["refiner"] else "off",
                    percent(s["val_miou"]), 100 * (s["gain"] or 0.0), round(100 * LEVEL),
                    100 * low, 100 * high, " beats the noise" if s["beats_noise"] else "")


def _store(state: RunState, best: Checkpoint, refiner: nn.Module, choice: dict[str, Any]) -> None:
    """best.ckpt again, its config saying the choice (main process)."""
    backbone = create_segmenter_model(best.config, pretrained=False)
    load_state(backbone, best.backbone, "backbone", best.path)
    config = best.config.override({"refiner.enabled": choice["enabled"], "refine.points": choice["points"]})
    state.result.best = save_checkpoint(state.out / BEST, config, backbone, refiner.cpu(),
                                        meta={**best.meta, "refiner_choice": choice})


def choose_refinement(state: RunState, run: PhaseRun) -> None:
    """Make the choice on every rank (the sweep is validated together) and store it."""
    if not math.isfinite(run.best_miou):
        return
    distributed.barrier(state.world)  # the main process may just have written best.ckpt
    best = load_checkpoint(state.out / BEST)
    if best.refiner is None:
        return
    refiner = create_refiner(best.config)
    assert refiner is not None
    load_state(refiner, best.refiner, "refiner", best.path)
    refiner.to(state.device)
    own_k = state.config.refine.points
    ks = sorted({*state.config.train.choose_k, own_k, 1.0})
    logger.info("refinement sweep: validating K in %s with and without the refiner (%d runs "
                "over %d scene(s))", ks, 2 * len(ks), len(state.val_scenes))
    candidates = _sweep(state, run.backbone, refiner, ks)
    baseline = next(c for c in candidates if not c.refiner and c.k == 1.0)
    in_mean = [c.in_mean for c in state.config.classes]
    pick, sweep, unit = choose(candidates, baseline, in_mean, own_k, seed=state.config.train.seed)
    _log_sweep(sweep)
    choice = _choice_record(pick, sweep, unit, own_k)
    state.result.refiner_choice = choice
    logger.info("refinement chosen: K=%s, refiner %s (val mIoU %s, %+.1f points over patch-only), "
                "stored in %s", pick.k, "on" if pick.refiner else "off", percent(choice["val_miou"]),
                100 * (choice["gain"] or 0.0), state.out / BEST)
    if not state.world.main:
        return
    if state.options.on_epoch:
        chosen = {k: v for k, v in choice.items() if k != "sweep"}
        state.options.on_epoch({"phase": "refiner", "choice": chosen, "sweep": sweep})
    _store(state, best, refiner, choice)
