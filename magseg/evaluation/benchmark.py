"""Benchmark: the progressive method against its two single-scale baselines, on one split.

All methods are the *same* engine (``magseg.engine.stages.segment``) and the same backbone with a
different pyramid, so the comparison isolates what the pyramid and the refiner contribute:

- ``progressive``: the checkpoint's pyramid, refiner and K (the full method, adaptive mode off);
  the prediction after every stage is scored too (resized nearest to the image size).
- ``progressive, no refiner``: the same without the refiner (refined = fine), so the two rows
  side by side, per class, show what the refiner adds on this data (only when the config
  enables the refiner: otherwise it would repeat ``progressive``).
- ``downsample``: ``pyramid.downsample_only()``: the stage-0 view of the whole scene, upsampled.
- ``patch``: ``pyramid.patch_only()``: the finest scale alone, crops stitched, no context.
- ``adaptive`` (when the run's ``engine.adaptive`` is set): the progressive method with it.
- ``progressive + TTA <mode>``, ``patch + TTA <mode>`` (with ``engine.tta``): those methods
  with every crop's probabilities averaged over the transforms (magseg.engine.tta); the
  other rows run without.

Every method's final probabilities are scored for calibration too (ECE, reliability bins:
magseg.evaluation.calibration), with the checkpoint's temperature and without it.

Scores come from one confusion matrix per method summed over the split (the DeepGlobe
convention; see magseg.evaluation.metrics). Time is the wall time of the engine call per image (the
image is read and normalised once, outside the timing); memory is the process's peak
resident set size during a method's engine calls (see ``PeakMemory``).

This module scores one scene (``evaluate_scene``) and merges scenes into per-method tallies
(``add_scene``); the loop over a split's scenes, wherever they run, is ``magseg.run.benchmark``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from magseg.config import AdaptiveConfig, Config, EngineConfig, PyramidConfig, RefineConfig
from magseg.data.scenes import Scene, check_scene, read_scene
from magseg.engine.crf import check_crf
from magseg.engine.pyramid import resize
from magseg.engine.stages import SegmentationResult
from magseg.engine.tta import passes_per_crop
from magseg.errors import DataError
from magseg.evaluation.boundary import BoundaryTally, boundary_counts
from magseg.evaluation.calibration import (
    ReliabilityBins,
    apply_temperature,
    calibration_summary,
    scored_pixels,
)
from magseg.evaluation.metrics import ConfusionMatrix, confusion_matrix, scores
from magseg.evaluation.seams import SeamTally, line_changes, line_period, pyramid_border_lines
from magseg.segmenter import Segmenter

NO_REFINER = "progressive, no refiner"
# The single-scale baselines the progressive method is measured against: report.json's
# margins_miou_points holds progressive_minus_<name> for each.
BASELINES = ("downsample", "patch")
PROGRESSIVE_CRF, PATCH_CRF = "progressive + CRF", "patch + CRF"


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: a name and the engine settings that make it."""

    name: str
    description: str
    pyramid: PyramidConfig
    refine: RefineConfig
    engine: EngineConfig
    # False: run without the segmenter's refiner (refined = fine).
    refiner: bool = True

    @property
    def staged(self) -> bool:
        """More than one stage: the prediction after each stage is scored."""
        return len(self.pyramid.scales) > 1


def benchmark_methods(config: Config, sweep_k: Sequence[float] = (), crf: bool = False) -> list[Method]:
    """The methods to compare for ``config``: progressive, downsample, patch (+
    ``progressive (K=k)`` for each k of ``sweep_k``, + ``progressive + CRF`` and
    ``patch + CRF`` with ``crf``: the config's ``refine.crf`` switched on; + adaptive when
    ``engine.adaptive`` is set, + the TTA rows when ``engine.tta`` is)."""
    full = dataclasses.replace(config.engine, adaptive=AdaptiveConfig(), tta="none")
    p = config.pyramid
    sizes = " -> ".join(f"{h}x{w}" for h, w in p.scales)
    refiner = "refiner" if config.refiner.enabled else "refiner off (refiner.enabled=false)"
    methods = [
        Method("progressive", f"progressive refinement, stages {sizes}, K={config.refine.points}, {refiner}",
               p, config.refine, full),
        # Without a refiner, this row would be progressive's again.
        *([Method(NO_REFINER, f"progressive without the refiner (refined = fine), K={config.refine.points}",
                  p, config.refine, full, refiner=False)] if config.refiner.enabled else []),
        Method("downsample", f"downsample-only: the stage-0 view ({p.scales[0][0]}x{p.scales[0][1]}) upsampled",
               p.downsample_only(), config.refine, full),
        Method("patch", f"patch-only: finest scale ({p.scales[-1][0]}x{p.scales[-1][1]}) in "
               f"{p.crop[0]}x{p.crop[1]} crops, stitched", p.patch_only(), config.refine, full),
    ]
    for k in sweep_k:
        methods.append(Method(f"progressive (K={k})", f"progressive refinement, K={k}, {refiner}", p,
                              dataclasses.replace(config.refine, points=k), full))
    if crf:
        methods += _crf_methods(config, full)
    adaptive = config.engine.adaptive
    if adaptive.enabled:
        methods.append(
            Method("adaptive", f"progressive, adaptive (threshold={adaptive.threshold}, "
                   f"max_crops={adaptive.max_crops})", p, config.refine,
                   dataclasses.replace(config.engine, adaptive=adaptive, tta="none"))
        )
    if config.engine.tta != "none":
        mode, tta = config.engine.tta, dataclasses.replace(full, tta=config.engine.tta)
        runs = f"{passes_per_crop(mode)} backbone runs per crop"
        methods += [
            Method(f"progressive + TTA {mode}", f"progressive with test-time augmentation {mode} ({runs})",
                   p, config.refine, tta),
            Method(f"patch + TTA {mode}", f"patch-only with test-time augmentation {mode} ({runs})",
                   p.patch_only(), config.refine, tta),
        ]
    return methods


def _crf_methods(config: Config, engine: EngineConfig) -> list[Method]:
    """``progressive + CRF`` and ``patch + CRF``: the two rows with the CRF over their final
    probabilities (its time inside the timed engine call)."""
    c = dataclasses.replace(config.refine.crf, enabled=True)
    check_crf(c)
    refine = dataclasses.replace(config.refine, crf=c)
    what = (f"{c.method} CRF ({c.iterations} iterations, window {c.window}, Gaussian {c.gaussian_sxy:g}/"
            f"{c.gaussian_compat:g}, bilateral {c.bilateral_sxy:g}/{c.bilateral_srgb:g}/{c.bilateral_compat:g})")
    p = config.pyramid
    return [Method(PROGRESSIVE_CRF, f"progressive, then a {what}", p, refine, engine),
            Method(PATCH_CRF, f"patch-only, then a {what}", p.patch_only(), refine, engine)]


# --------------------------------------------------------------------------- memory


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of this process while the block runs.

    On Linux the kernel's own high-water mark of the resident set (``VmHWM``) is reset at
    the start of the block and read at its end: exact, and it sees every allocation
    (torch's CPU allocator, NumPy, OpenCV) at no cost. Elsewhere, ``ru_maxrss`` (the
    peak since the process started) is used, which can only over-estimate a later block.
    On CUDA, ``torch.cuda.max_memory_allocated`` is taken as well.

    After the block: ``peak_mb`` (peak resident set), ``base_mb`` (resident set at the
    start), ``gpu_peak_mb`` (None on the CPU) and ``how`` (which of the above).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = self.base_mb = 0.0
        self.gpu_peak_mb: float | None = None
        self.how = "VmHWM"

    def __enter__(self) -> "PeakMemory":
        if not _reset_peak_rss():
            self.how = "ru_maxrss"
        self.base_mb = (_status_kb("VmRSS") or 0) / 1024
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gpu_peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = _status_kb("VmHWM") if self.how == "VmHWM" else None
        if peak is None:
            import resource

            self.how = "ru_maxrss"
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        self.peak_mb = peak / 1024


# --------------------------------------------------------------------------- results


@dataclass
class StageTally:
    """One stage of a staged method, summed over the images."""

    size: tuple[int, int]
    matrix: ConfusionMatrix
    refined_pixels: int = 0
    pixels: int = 0
    crops_run: int = 0
    crops_total: int = 0
    seconds: float = 0.0


@dataclass
class MethodTally:
    """Everything measured for one method over the split."""

    method: Method
    matrix: ConfusionMatrix
    stages: list[StageTally] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    peak_mb: float = 0.0
    peak_increase_mb: float = 0.0
    gpu_peak_mb: float | None = None
    memory_how: str = "VmHWM"
    # The final labels' seam score across each stage's crop borders (the config's pyramid).
    seams: list[SeamTally] = field(default_factory=list)
    boundary: BoundaryTally | None = None  # boundary IoU and F counts (magseg.evaluation.boundary)
    # Reliability of the final probabilities: with the checkpoint's temperature, and as the
    # engine made them (temperature 1).
    reliability: ReliabilityBins = field(default_factory=ReliabilityBins)
    reliability_raw: ReliabilityBins = field(default_factory=ReliabilityBins)
    temperature: float = 1.0


@dataclass
class Sample:
    """What a sample panel shows for one image (display-sized: see ``_display_size``).

    ``image``: ``(h, w, 3)`` uint8 for display; ``truth`` and ``predictions[name]``:
    ``(h, w)`` uint8 class ids; ``uncertainty``: ``(h, w)`` float 1 - certainty of the
    progressive method's final probabilities; ``refined``: per stage >= 1, ``(h, w)`` bool.
    """

    id: str
    image: np.ndarray
    truth: np.ndarray
    predictions: dict[str, np.ndarray]
    uncertainty: np.ndarray
    refined: list[np.ndarray]


@dataclass
class ImageRecord:
    """Per-image results (for the NDJSON stream): each method's own mIoU and seconds."""

    id: str
    size: tuple[int, int]
    methods: dict[str, dict[str, float]]


@dataclass(frozen=True)
class FailedScene:
    """A scene of the split that was not scored: its id and why (it could not be read or
    scored, or its worker was lost). The report lists these under ``failed``."""

    id: str
    error: str


@dataclass
class BenchmarkResult:
    """A benchmark over a split (``magseg.run.benchmark.run_benchmark``): the tallies of the
    scored scenes, their per-image records and samples, and the scenes that failed."""

    config: Config
    tallies: dict[str, MethodTally]
    images: list[ImageRecord]
    failed: list[FailedScene]
    samples: list[Sample]


# --------------------------------------------------------------------------- checks


def check_scenes(scenes: Sequence[Scene], config: Config) -> None:
    """Check every scene from its file headers (``magseg.data.scenes.check_scene``): sizes,
    band counts. Milliseconds per scene, so a split with a bad file fails before any
    segmentation time is spent.

    Raises:
        DataError: listing every bad scene (the first 5) with what is wrong.
    """
    bad = []
    for scene in scenes:
        try:
            check_scene(scene, config)
        except DataError as exc:
            bad.append(str(exc))
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DataError(f"{len(bad)} scene(s) of the split are not usable: " + "; ".join(bad[:5]) + more)


def read_labelled(scene: Scene, config: Config,
                  checkpoint: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A scene's image ``(C, H, W)`` and mask ``(H, W)`` of class ids, for scoring.

    Raises:
        DataError: the scene cannot be read, its mask does not fit the model's classes
            (named with ``checkpoint``), or it has no mask.
    """
    try:
        image, mask = read_scene(scene, config)
    except DataError as exc:
        names = ", ".join(c.name for c in config.classes)
        source = f"the checkpoint {checkpoint}" if checkpoint else "the config"
        raise DataError(
            f"{exc} [{source} has {config.num_classes} classes ({names}): the data must use "
            "the classes the model was trained with]"
        ) from None
    if mask is None:
        raise DataError(f"{scene.image}: no ground-truth mask; a benchmark needs one per image")
    return image, mask


# --------------------------------------------------------------------------- running


def _display_size(size: tuple[int, int], longest: int = 1024) -> tuple[int, int]:
    scale = min(1.0, longest / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _labels_to(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """``(h, w)`` uint8 labels resized nearest to ``size``."""
    if tuple(labels.shape) == tuple(size):
        return labels
    return resize(labels[None].float(), size, mode="nearest")[0].to(torch.uint8)


def display_image(image: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` raw pixels -> ``(H, W, 3)`` uint8 for display (2-98 % stretch unless
    already uint8; one band is shown grey)."""
    rgb = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    if rgb.dtype != np.uint8:
        lo, hi = np.percentile(rgb, [2, 98])
        rgb = np.clip((rgb.astype(np.float32) - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb.transpose(1, 2, 0))


def _per_image(matrix: Tensor, in_mean: Sequence[bool]) -> float | None:
    return defined(scores(matrix, in_mean)["miou"])


@dataclass
class StageOutcome:
    """One stage of a staged method on one image."""

    size: tuple[int, int]
    matrix: Tensor
    refined_pixels: int
    crops_run: int
    crops_total: int
    seconds: float


@dataclass
class SceneOutcome:
    """Everything one scene contributes to a benchmark (plain tensors and numbers, so a Ray
    worker can send it back); ``add_scene`` merges it into the tallies."""

    index: int
    record: ImageRecord
    matrices: dict[str, Tensor]
    stages: dict[str, list[StageOutcome]]
    memory: dict[str, tuple[float, float, str, float | None]]  # peak, increase, how, gpu peak
    sample: Sample | None
    seams: dict[str, list[SeamTally]] = field(default_factory=dict)  # per method, per stage
    boundary: dict[str, Tensor] = field(default_factory=dict)  # (C, 6) boundary counts per method
    # Per method: reliability bins with the checkpoint's temperature and without it.
    reliability: dict[str, tuple[ReliabilityBins, ReliabilityBins]] = field(default_factory=dict)
    temperature: float = 1.0


# Segmenters that have run every method once (the first call of a method pays for allocator
# growth and kernel selection, which is not what a benchmark should time). Per process, so
# each Ray worker warms its own.
_WARMED: "weakref.WeakSet[Segmenter]" = weakref.WeakSet()


def evaluate_scene(
    segmenter: Segmenter,
    scene: Scene,
    methods: Sequence[Method],
    index: int = 0,
    *,
    sample: bool = False,
    warmup: bool = True,
    checkpoint: str | Path | None = None,
) -> SceneOutcome:
    """Run every method on one scene and score it.

    Args:
        index: the scene's position in the split (results merge in this order).
        sample: keep display-sized panels of this scene.
        warmup: first run every method once, untimed, if this segmenter has not yet.
    Raises:
        DataError: the scene cannot be read or does not fit the model.
    """
    config = segmenter.config
    in_mean = [c.in_mean for c in config.classes]
    image, mask = read_labelled(scene, config, checkpoint)
    size = tuple(mask.shape)
    target = torch.from_numpy(mask)
    x = segmenter.normalize(image)
    if warmup and segmenter not in _WARMED:
        for m in methods:
            _segment(segmenter, x, m)
        _WARMED.add(segmenter)
    out = SceneOutcome(index, ImageRecord(scene.id, size, {}), {}, {}, {}, None,
                       temperature=segmenter.temperature)
    scored = scored_pixels(target, in_mean)
    predictions: dict[str, np.ndarray] = {}
    uncertainty: np.ndarray | None = None
    refined: list[np.ndarray] = []
    shown = _display_size(size)
    for m in methods:
        want_probs = sample and m.name == "progressive"
        with PeakMemory(segmenter.device) as mem:
            start = time.perf_counter()
            # Probabilities for every method (the ECE); raw, the temperature applied below.
            result = _segment(segmenter, x, m, return_stages=m.staged, return_probs=True, calibrated=False)
            seconds = time.perf_counter() - start
        out.reliability[m.name] = _reliability(result, target, scored, segmenter.temperature)
        out.memory[m.name] = (mem.peak_mb, mem.peak_mb - mem.base_mb, mem.how, mem.gpu_peak_mb)
        own = confusion_matrix(result.labels, target, config.num_classes)
        out.matrices[m.name] = own
        out.boundary[m.name] = boundary_counts(result.labels, target, config.num_classes)
        out.record.methods[m.name] = {"miou": _per_image(own, in_mean), "seconds": seconds}
        out.seams[m.name] = seam_tallies(result.labels.numpy(), config.pyramid)
        if m.staged:
            out.stages[m.name] = _stage_outcomes(result, target, config.num_classes)
        if sample:
            predictions[m.name] = _labels_to(result.labels, shown).numpy()
            if want_probs:
                uncertainty, refined = _progressive_panels(result, shown)
    if sample:
        out.sample = _sample(scene.id, image, target, shown, predictions, uncertainty, refined)
    return out


def seam_tallies(labels: np.ndarray, pyramid: PyramidConfig, continuous: bool = False) -> list[SeamTally]:
    """One ``SeamTally`` per stage of ``pyramid`` for final labels ``(H, W)`` (or, with
    ``continuous``, an uncertainty map): every method is scored on the same grids (the
    checkpoint's), so a baseline's column says whether its map shows the progressive
    method's crop borders."""
    changes = line_changes(labels, continuous)
    period = line_period(pyramid.scales, labels.shape, pyramid.scene)
    tallies = []
    for rows, cols in pyramid_border_lines(pyramid.scales, pyramid.crop, labels.shape, pyramid.scene):
        tally = SeamTally()
        tally.add(changes, rows, cols, period)
        tallies.append(tally)
    return tallies


def _reliability(result: SegmentationResult, target: Tensor, scored: Tensor,
                 temperature: float) -> tuple[ReliabilityBins, ReliabilityBins]:
    """Reliability bins of ``result``'s raw probabilities with ``temperature`` and without;
    ``result.probs`` becomes the tempered ones (what predict writes)."""
    assert result.probs is not None
    raw, tempered = ReliabilityBins(), ReliabilityBins()
    raw.update(result.probs, target, scored, result.labels)
    result.probs = apply_temperature(result.probs, temperature)
    tempered.update(result.probs, target, scored, result.labels)
    return tempered, raw


def _segment(segmenter: Segmenter, x: Tensor, method: Method, **kwargs: Any) -> SegmentationResult:
    """``segmenter.segment`` of ``x`` as ``method`` runs it (without the refiner where the
    method has none); ``kwargs``: what to return besides the labels."""
    return segmenter.segment(x, pyramid=method.pyramid, refine=method.refine, engine=method.engine,
                             **kwargs, **({} if method.refiner else {"refiner": None}))


def _stage_outcomes(result: SegmentationResult, target: Tensor, classes: int) -> list[StageOutcome]:
    """Each stage's labels scored against ``target`` (``(H, W)``), with its refined pixels,
    crops and time."""
    size = tuple(target.shape)
    return [
        StageOutcome(
            stage.size,
            confusion_matrix(_labels_to(stage.labels, size), target, classes),
            0 if stage.refined is None else int(stage.refined.sum()),
            stage.crops_run, stage.crops_total, stage.seconds,
        )
        for stage in result.stages
    ]


def _progressive_panels(result: SegmentationResult, shown: tuple[int, int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The sample panel's uncertainty ``(h, w)`` and refined-pixel masks (one per refining
    stage), at the display size ``shown``."""
    uncertainty = 1 - resize(result.certainty[None, None], shown)[0, 0].numpy()
    refined = [
        _labels_to(s.refined.to(torch.uint8), shown).numpy().astype(bool)
        for s in result.stages[1:] if s.refined is not None
    ]
    return uncertainty, refined


def _sample(scene_id: str, image: np.ndarray, target: Tensor, shown: tuple[int, int],
            predictions: dict[str, np.ndarray], uncertainty: np.ndarray | None,
            refined: list[np.ndarray]) -> Sample:
    """One scene's panels at the display size ``shown``."""
    pixels = torch.from_numpy(display_image(image)).permute(2, 0, 1).float()
    return Sample(
        id=scene_id,
        image=np.asarray(resize(pixels, shown).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)),
        truth=_labels_to(target, shown).numpy(),
        predictions=predictions,
        uncertainty=uncertainty if uncertainty is not None else np.zeros(shown, np.float32),
        refined=refined,
    )


def new_tallies(config: Config, methods: Sequence[Method]) -> dict[str, MethodTally]:
    """Empty per-method tallies to ``add_scene`` into."""
    in_mean = [c.in_mean for c in config.classes]
    return {m.name: MethodTally(m, ConfusionMatrix(config.num_classes, in_mean),
                                boundary=BoundaryTally(config.num_classes, in_mean)) for m in methods}


def add_scene(tallies: dict[str, MethodTally], outcome: SceneOutcome, config: Config) -> None:
    """Merge one scene into the tallies: confusion matrices are summed, never averaged."""
    in_mean = [c.in_mean for c in config.classes]
    for name, tally in tallies.items():
        tally.matrix += outcome.matrices[name]
        if tally.boundary is not None and name in outcome.boundary:
            tally.boundary += outcome.boundary[name]
        if name in outcome.reliability:
            tally.reliability += outcome.reliability[name][0]
            tally.reliability_raw += outcome.reliability[name][1]
            tally.temperature = outcome.temperature
        tally.seconds.append(outcome.record.methods[name]["seconds"])
        peak, increase, how, gpu = outcome.memory[name]
        tally.peak_mb = max(tally.peak_mb, peak)
        tally.peak_increase_mb = max(tally.peak_increase_mb, increase)
        tally.memory_how = how
        if gpu is not None:
            tally.gpu_peak_mb = max(tally.gpu_peak_mb or 0.0, gpu)
        _add_seams(tally, outcome.seams.get(name, []))
        for k, stage in enumerate(outcome.stages.get(name, [])):
            if len(tally.stages) <= k:
                tally.stages.append(StageTally(stage.size, ConfusionMatrix(config.num_classes, in_mean)))
            st = tally.stages[k]
            st.matrix += stage.matrix
            st.pixels += stage.size[0] * stage.size[1]
            st.refined_pixels += stage.refined_pixels
            st.crops_run += stage.crops_run
            st.crops_total += stage.crops_total
            st.seconds += stage.seconds


def _add_seams(tally: MethodTally, seams: list[SeamTally]) -> None:
    """Merge one scene's per-stage seam tallies into a method's."""
    for k, seam in enumerate(seams):
        if len(tally.seams) <= k:
            tally.seams.append(SeamTally())
        tally.seams[k].merge(seam)


# --------------------------------------------------------------------------- summaries


def defined(value: float) -> float | None:
    """``value``, or None where it is undefined (NaN): JSON has no NaN, and a class absent
    from both the ground truth and the prediction has no IoU."""
    return None if value is None or not math.isfinite(value) else float(value)


def _scores(matrix: ConfusionMatrix, names: Sequence[str]) -> dict[str, Any]:
    s = matrix.scores()
    return {"miou": defined(s["miou"]), "iou": {n: defined(v) for n, v in zip(names, s["iou"])},
            "accuracy": defined(s["accuracy"]), "fwiou": defined(s["fwiou"])}


def method_summary(tally: MethodTally, config: Config) -> dict[str, Any]:
    """The report's entry for one method (plain JSON types; None where undefined)."""
    names = [c.name for c in config.classes]
    seconds = tally.seconds
    out: dict[str, Any] = {
        "description": tally.method.description,
        "scales": [list(v) for v in tally.method.pyramid.scales],
        **_scores(tally.matrix, names),
        "seconds_per_image": float(np.mean(seconds)) if seconds else None,
        "seconds_total": float(np.sum(seconds)),
        "peak_memory_mb": tally.peak_mb,
        "peak_memory_increase_mb": tally.peak_increase_mb,
        "peak_gpu_memory_mb": tally.gpu_peak_mb,
        "images": len(seconds),
        "confusion_matrix": tally.matrix.matrix.tolist(),
        # Per stage of the config's pyramid, coarse to fine (None: a stage of one crop).
        "seam_scores": [defined(s.score()) for s in tally.seams],
        "tta": tally.method.engine.tta,
        "backbone_runs_per_crop": passes_per_crop(tally.method.engine.tta),
        "calibration": calibration_summary(tally.reliability, tally.reliability_raw, tally.temperature),
    }
    if tally.boundary is not None:
        out.update(_boundary_summary(tally.boundary, names))
    if tally.stages:
        images = max(len(seconds), 1)
        stages = []
        for k, st in enumerate(tally.stages):
            stages.append({
                "stage": k,
                "size": list(st.size),
                **_scores(st.matrix, names),
                "refined_fraction": st.refined_pixels / st.pixels if st.pixels else 0.0,
                "crops_run": st.crops_run,
                "crops_total": st.crops_total,
                "seconds_per_image": st.seconds / images,
            })
        out["stages"] = stages
    return out


def _boundary_summary(tally: BoundaryTally, names: Sequence[str]) -> dict[str, Any]:
    """Boundary IoU and F (means over the counted classes, and per class), None where undefined."""
    b = tally.scores()
    return {
        "boundary_miou": defined(b["boundary_miou"]),
        "boundary_iou": {n: defined(v) for n, v in zip(names, b["boundary_iou"])},
        "boundary_mf": defined(b["boundary_mf"]),
        "boundary_f": {n: defined(v) for n, v in zip(names, b["boundary_f"])},
        "boundary_counts": tally.counts.tolist(),
    }
