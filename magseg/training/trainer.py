"""MagNet's two training phases, checkpoints and resume.

    phase "backbone": one segmenter learns windows at every stage's magnification
    phase "refiner":  backbone frozen (from <out>/best.ckpt, or last.ckpt per
                      train.backbone_from); the refiner learns refiner(fine, coarse) -> mask

Files in ``out``: ``last.ckpt`` (after every epoch, with the optimizer, scheduler, epoch and
RNG states for ``--resume``), ``best.ckpt`` (the epoch of highest validation mIoU of the
phase), ``train.log`` and ``config.yaml`` (the resolved config). Checkpoints are written
atomically, only by the main process, only at the end of an epoch: a run that fails keeps
the previous ones intact. After the refiner phase both files hold backbone and refiner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from magseg.checkpoint import Checkpoint, load_checkpoint, load_state, save_checkpoint
from magseg.config import Config
from magseg.data.cache import SceneCache
from magseg.data.scenes import IGNORE, Scene, check_scene, list_scenes, read_scene
from magseg.device import resolve_device
from magseg.engine.backbone import context_ratios, input_multiple, run_backbone
from magseg.engine.precision import precision_context
from magseg.engine.pyramid import CropBox, crop_windows, cut_crops
from magseg.engine.resample import TensorSource, resample_window
from magseg.engine.stages import crop_probs, stage_probs
from magseg.errors import CheckpointError, ConfigError, OutputExistsError
from magseg.evaluation.metrics import percent
from magseg.geometry import Rect
from magseg.io.atomic import atomic_write
from magseg.normalization import ChannelStats
from magseg.segmenter import create_refiner, create_segmenter_model
from magseg.training import distributed
from magseg.training.calibrate import fit_calibration, validation_pixels
from magseg.training.choice import LEVEL, Candidate, choose
from magseg.training.coarse import prepare_coarse_maps
from magseg.training.distributed import World
from magseg.training.loader import batches, loader_options, phase_workers, resolve_workers
from magseg.training.losses import (
    gather_points,
    margin_uncertainty,
    segmentation_loss,
    uncertain_points,
)
from magseg.training.resume import rng_state, seed_everything, set_rng_state
from magseg.training.samples import (
    BackboneSamples,
    EpochSampler,
    RefinerSamples,
    collate_refiner,
    training_input,
)
from magseg.training.validation import validate

logger = logging.getLogger("magseg.train")

Phase = Literal["backbone", "refiner"]
PHASES: tuple[Phase, ...] = ("backbone", "refiner")
BEST, LAST, LOG, CONFIG = "best.ckpt", "last.ckpt", "train.log", "config.yaml"

# Config entries that define the trained weights: a checkpoint resumed or built upon must
# agree on them (the rest, e.g. learning rate or refine.points, may change between runs).
MODEL_KEYS = ("classes", "model", "refiner", "pyramid", "data.layout", "data.bands", "data.mean",
              "data.std")


class Progress:
    """A progress bar that shows nothing (the CLI passes tqdm bars instead)."""

    def update(self, n: int = 1) -> None: ...

    def set_postfix_str(self, text: str) -> None: ...

    def close(self) -> None: ...


ProgressFactory = Callable[[int, str], Progress]


@dataclass
class TrainOptions:
    """What a run does, beyond the config."""

    out: Path
    phase: Literal["backbone", "refiner", "all"] = "all"
    resume: bool = False
    overwrite: bool = False
    data_root: Path | None = None
    # Called on the main process after each epoch's checkpoints are written.
    on_epoch: Callable[[dict[str, Any]], None] | None = None
    progress: ProgressFactory | None = None
    # Decoded scenes and the refiner's coarse maps (magseg.data.cache, magseg.training.coarse);
    # None: <out>/cache. Shareable between runs and ranks.
    cache_dir: Path | None = None


@dataclass
class TrainResult:
    config: Config
    records: list[dict[str, Any]] = field(default_factory=list)
    best: Path | None = None
    last: Path | None = None
    # After a refiner phase with train.refiner_choice: validation mIoU with and without the
    # refiner, and which one best.ckpt's refiner.enabled now says.
    refiner_choice: dict[str, Any] | None = None
    # The temperature fitted on validation and stored in best.ckpt, with the ECE before and
    # after (magseg.training.calibrate).
    calibration: dict[str, Any] | None = None


# Differences that do not change the weights: where the initial weights came from, and
# whether the refiner is used (training stores its choice there; the weights stay).
_IGNORED = ("model.encoder_weights", "refiner.enabled")


def _leaf_diffs(key: str, asked: Any, stored: Any) -> list[str]:
    if isinstance(asked, dict) and isinstance(stored, dict):
        out = []
        for k in sorted(set(asked) | set(stored), key=str):
            out += _leaf_diffs(f"{key}.{k}", asked.get(k), stored.get(k))
        return out
    if key in _IGNORED or asked == stored:
        return []
    if key in ("data.mean", "data.std") and asked is None:
        return []  # None asks for 'whatever was computed'
    return [f"{key}: asked {asked!r}, checkpoint has {stored!r}"]


def config_mismatches(asked: Config, stored: Config, keys: tuple[str, ...] = MODEL_KEYS) -> list[str]:
    """``"key: asked X, checkpoint has Y"`` for each entry under ``keys`` that differs."""
    a, s = asked.to_dict(), stored.to_dict()
    out = []
    for key in keys:
        va, vs = a, s
        for part in key.split("."):
            va, vs = va.get(part), vs.get(part)
        out += _leaf_diffs(key, va, vs)
    return out


def check_matches(asked: Config, ckpt: Checkpoint) -> Config:
    """``asked`` with the checkpoint's normalisation filled in.

    Raises:
        CheckpointError: the checkpoint was trained for another model, classes or pyramid.
    """
    # A backbone-only checkpoint has no refiner weights: the refiner may still be reshaped.
    keys = MODEL_KEYS if ckpt.refiner is not None else tuple(k for k in MODEL_KEYS if k != "refiner")
    problems = config_mismatches(asked, ckpt.config, keys)
    if problems:
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not match the config asked for:\n  "
            + "\n  ".join(problems)
            + "\nuse the config it was trained with, or another --out-dir"
        )
    return asked.override({"data.mean": list(ckpt.config.data.mean or []) or None,
                           "data.std": list(ckpt.config.data.std or []) or None})


def _scenes(config: Config, split: str, root: Path | None, limit: int | None = None) -> list[Scene]:
    """A split's scenes, every file checked from its header (seconds, not an epoch, to find
    a typo, a missing or corrupt file or mismatched sizes)."""
    scenes = list_scenes(config.data, split, root)
    if limit is not None:
        scenes = scenes[:limit]
    for scene in scenes:
        check_scene(scene, config)
    return scenes


def check_mask_colours(config: Config, scenes: list[Scene]) -> None:
    """Decode the masks of ``scenes`` (the first scene of each split), so that a config whose
    classes are not the data's (configs/tiny.yaml on DeepGlobe-coloured masks) fails before
    the first training step, not inside the first epoch.

    Raises:
        DataError: a mask colour that is no class's, with the file and the known colours.
    """
    from magseg.data.scenes import read_mask

    for scene in scenes:
        if scene.mask is not None:
            read_mask(scene.mask, config)


def compute_stats(config: Config, scenes: list[Scene], world: World) -> Config:
    """Fill ``data.mean``/``data.std`` from the training scenes when they are not given
    (each rank reads its share; the sums are added across ranks)."""
    if config.data.mean is not None and config.data.std is not None:
        return config
    stats = ChannelStats(config.model.in_channels)
    for scene in scenes[world.rank :: world.size]:
        image, _ = read_scene(dataclasses.replace(scene, mask=None), config)
        stats.update(image)
    distributed.all_sum(world, stats.tensor())
    mean, std = stats.result()
    logger.info("normalisation from %d training scenes: mean %s std %s", len(scenes),
                [round(v, 3) for v in mean], [round(v, 3) for v in std])
    return config.override({"data.mean": list(mean), "data.std": list(std)})


def _device(config: Config, world: World) -> torch.device:
    device = resolve_device(config.engine.device)
    if device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


class _LogFile(logging.FileHandler):
    """``train.log``: a line that cannot be written (a full disk) stops the file logging with
    one warning on stderr instead of a traceback per line; training goes on, and its
    checkpoints report their own failures."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802  (logging's name)
        error = sys.exc_info()[1]
        logger.removeHandler(self)
        sys.stderr.write(f"magseg: warning: {self.baseFilename}: no longer written ({error})\n")


@contextlib.contextmanager
def _log_file(path: Path, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    handler = _LogFile(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        with contextlib.suppress(OSError):  # what a full disk did not take was reported
            handler.close()


def _poly(steps: int, power: float) -> Callable[[int], float]:
    return lambda step: max(0.0, 1 - step / max(steps, 1)) ** power


@dataclass
class _PhaseRun:
    """One phase being trained: its models, data, optimisation and where it stands."""

    name: Phase
    epochs: int
    backbone: nn.Module
    refiner: nn.Module | None
    trained: nn.Module  # the module the optimizer updates (DDP-wrapped when distributed)
    loader: DataLoader
    dataset: BackboneSamples | RefinerSamples
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    # fp16's loss scaler (disabled, a pass-through, for fp32 and bf16).
    scaler: torch.amp.GradScaler | None = None
    start_epoch: int = 0
    best_miou: float = -math.inf


def backbone_loss(model: nn.Module, backbone: nn.Module, batch: tuple[Tensor, Tensor], config: Config,
                  device: torch.device) -> tuple[Tensor, int]:
    """Phase 1: the loss of one batch of windows ``(image (B, C_in, ih, iw), mask (B, ih, iw))``
    (and contexts ``(B, ratios, C_in, ih, iw)`` for a multi-context backbone).

    ``model`` is what runs (the backbone, or its DDP wrapper); ``backbone`` the bare module.
    Returns the loss and the batch size.
    """
    image, mask, *rest = (t.to(device, non_blocking=True) for t in batch)
    contexts = list(rest[0].unbind(1)) if rest else None
    # In the layout the model is in (Trainer.memory_format).
    logits = run_backbone(model, image, input_multiple(backbone), contexts, config.train.channels_last)
    return segmentation_loss(logits, mask, config.train.ohem), image.shape[0]


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
def coarse_inputs(backbone: nn.Module, batch: dict[str, Any], config: Config, device: torch.device) -> Tensor:
    """The refiner's coarse input ``(B, classes, ch, cw)``: the batch's windows of the cached
    coarse maps (``batch["coarse"]``, magseg.training.coarse), or else computed here from
    each item's whole scene at ``scales[0]``."""
    if "coarse" in batch:
        return batch["coarse"].to(device, non_blocking=True)
    coarse = []
    for scene0, size, box in zip(batch["scene0"], batch["size"], batch["box"]):
        y0 = stage_probs(backbone, scene0.to(device), config.pyramid, config.engine)
        (window,) = crop_windows([CropBox.whole(Rect(*(int(v) for v in box)))], config.pyramid.crop)
        # As StageRun.coarse upsamples a crop's coarse view: only the window, by the engine's filter.
        coarse.append(resample_window(TensorSource(y0), tuple(int(v) for v in size), window))
    return torch.stack(coarse)


def refiner_loss(model: nn.Module, backbone: nn.Module, batch: dict[str, Any], config: Config,
                 device: torch.device) -> tuple[Tensor, int]:
    """Phase 2: the loss of ``refiner(fine, coarse)`` logits against the window's mask
    (``refiner_point_loss``: sampled points, class-balanced, as ``train`` says).

    Fine and coarse come from the frozen ``backbone`` through the engine's own helpers:
    coarse is stage 0 of the engine (``stage_probs`` of the scene at ``scales[0]``)
    upsampled to the window's stage and cut like a crop; fine is ``crop_probs`` of the
    window. ``model`` is the refiner (or its DDP wrapper). ``batch``: see ``RefinerSamples``.
    """
    pyramid, engine = config.pyramid, config.engine
    with torch.no_grad():
        coarse = coarse_inputs(backbone, batch, config, device)
        contexts = [c.to(device) for c in batch["contexts"]] if "contexts" in batch else None
        fine = crop_probs(backbone, batch["fine"].to(device), training_input(config), contexts=contexts,
                          precision=engine.precision, multiple=input_multiple(backbone))
        # The crop's own part of its grown window (pyramid.margin), as StageRun.fine cuts it.
        fine = cut_crops(fine, [tuple(int(v) for v in o) for o in batch["offset"]], pyramid.crop)
    logits = model(fine, coarse)
    mask = batch["mask"].to(device)
    return refiner_point_loss(logits, mask, config), mask.shape[0]


class Trainer:
    """Runs the phases of ``TrainOptions.phase`` for one config (see the module docstring)."""

    def __init__(self, config: Config, options: TrainOptions) -> None:
        self.config = config
        self.options = options
        self.out = Path(options.out)
        self.world = World()
        self.device = torch.device("cpu")
        self.train_scenes: list[Scene] = []
        self.val_scenes: list[Scene] = []
        self.result = TrainResult(config)
        self._overall: Progress = Progress()  # the whole run, phases x epochs (in run())
        # The refiner phase's backbone checkpoint, when it was read before the first phase.
        self._base: Checkpoint | None = None

    @property
    def memory_format(self) -> torch.memory_format:
        """The backbone's layout in training: NHWC with ``train.channels_last`` (faster CPU
        convolutions, docs/performance.md#channels-last), else the standard layout."""
        return torch.channels_last if self.config.train.channels_last else torch.contiguous_format

    # ------------------------------------------------------------------ setup
    def _progress(self, total: int, desc: str) -> Progress:
        if self.options.progress is None or not self.world.main:
            return Progress()
        return self.options.progress(total, desc)

    def _phases(self) -> list[Phase]:
        phase = self.options.phase
        if phase not in ("backbone", "refiner", "all"):
            raise ConfigError(f"unknown phase {phase!r}; choose backbone, refiner or all")
        phases: list[Phase] = list(PHASES) if phase == "all" else [phase]
        if "refiner" in phases and not self.config.refiner.enabled:
            if phase == "refiner":
                raise ConfigError("refiner.enabled is false: there is no refiner to train")
            phases.remove("refiner")
        return phases

    def _check_outputs(self, phases: list[Phase]) -> Checkpoint | None:
        """The checkpoint to resume from (or None), after checking ``out`` is usable."""
        last = self.out / LAST
        if self.options.resume:
            if not last.exists():  # anything else there is named by load_checkpoint
                raise CheckpointError(f"nothing to resume: {last} does not exist")
            ckpt = load_checkpoint(last)
            if not ckpt.training:
                raise CheckpointError(f"{last} holds no training state (optimizer, epoch); cannot resume")
            done = ckpt.training.get("phase")
            if done == "refiner" and "refiner" not in phases:
                raise ConfigError(
                    f"--phase backbone --resume: {last} is from the refiner phase (epoch "
                    f"{ckpt.training.get('epoch')}), which starts after the backbone phase has "
                    "finished; resume with --phase refiner or --phase all, or train a new "
                    "backbone in another --out-dir (or with --overwrite)"
                )
            self.config = check_matches(self.config, ckpt)
            return ckpt
        if phases[0] == "backbone" and not self.options.overwrite:
            existing = [p for p in (self.out / BEST, last) if p.exists()]
            if existing:
                raise OutputExistsError(
                    f"{existing[0]} already exists; pass --resume to continue that run or "
                    "--overwrite to start a new one"
                )
        return None

    def _write_config(self) -> None:
        if self.world.main:
            with atomic_write(self.out / CONFIG) as tmp:
                tmp.write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))

    # ------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        config = self.config
        self.world = distributed.init_world(config.engine.device)
        try:
            self.device = _device(config, self.world)
            phases = self._phases()
            # Every check that reads what is there comes before anything is created: a run
            # that cannot start (exit 2) leaves no directory and no train.log behind.
            resume = self._check_outputs(phases)
            if resume is None and phases[0] == "refiner":
                # Before the statistics: the backbone's own normalisation is used.
                self._base = self._backbone_checkpoint()
            if self.world.main:
                try:
                    self.out.mkdir(parents=True, exist_ok=True)
                except (FileExistsError, NotADirectoryError):
                    raise ConfigError(f"--out-dir {self.out} is a file (or under one); give a "
                                      "directory for the checkpoints") from None
            distributed.barrier(self.world)
            with _log_file(self.out / LOG, self.world.main):
                if self._base is not None:
                    logger.info("refiner phase: frozen backbone from %s", self._base.path)
                root = self.options.data_root
                self.train_scenes = _scenes(self.config, "train", root)
                self.val_scenes = _scenes(self.config, "val", root, config.train.val_max_scenes)
                check_mask_colours(self.config, self.train_scenes[:1] + self.val_scenes[:1])
                logger.info("data: %d training and %d validation scenes (%s layout) on %d process(es)",
                            len(self.train_scenes), len(self.val_scenes), config.data.layout,
                            self.world.size)
                self.config = compute_stats(self.config, self.train_scenes, self.world)
                self.result.config = self.config
                self._write_config()
                if resume is not None and resume.training.get("phase") == "refiner":
                    phases = [p for p in phases if p == "refiner"]
                self._overall = self._progress(self._epochs_to_run(phases, resume), "training")
                try:
                    for name in phases:
                        ckpt = resume if resume is not None and resume.training.get("phase") == name else None
                        self._train_phase(name, ckpt)
                finally:
                    self._overall.close()
                self._calibrate()
        finally:
            distributed.close_world(self.world)
        return self.result

    def _epochs_to_run(self, phases: Sequence[Phase], resume: Checkpoint | None) -> int:
        """Epochs this run trains, all phases together (the overall progress bar's total):
        each phase's epochs, less those a resumed phase already has."""
        planned = {"backbone": self.config.train.epochs, "refiner": self.config.train.refiner_epochs}
        done = int(resume.training.get("epoch", 0)) if resume is not None else 0
        return max(0, sum(planned[p] for p in phases) - done)

    def _train_phase(self, name: Phase, resume: Checkpoint | None) -> None:
        run = self._build_phase(name, resume)
        if run.start_epoch >= run.epochs:
            logger.info("%s phase: already trained for %d epoch(s)", name, run.start_epoch)
            return
        logger.info("%s phase: epochs %d..%d of %d, %d steps per epoch", name, run.start_epoch + 1,
                    run.epochs, run.epochs, len(run.loader))
        for epoch in range(run.start_epoch, run.epochs):
            self._train_epoch(run, epoch)
        if name == "refiner" and self.config.train.refiner_choice:
            self._choose_refiner(run)

    def _choose_refiner(self, run: _PhaseRun) -> None:
        """Validate the best epoch's models at every K of ``train.choose_k`` (and
        ``refine.points`` and 1), with the refiner and without it, and store the choice in
        best.ckpt's ``refine.points`` and ``refiner.enabled``.

        The choice keeps patch-only (K = 1, no refiner) unless a candidate beats it by more
        than the validation noise, a bootstrap interval over validation scenes or windows
        (``magseg.training.choice``): a refiner or a K that wins on a few validation tiles
        by chance does not reach predict and benchmark. ``--set refiner.enabled=...`` /
        ``refine.points=...`` override the choice, the refiner's weights stay in the file.
        last.ckpt keeps the training config, for --resume.
        """
        if not math.isfinite(run.best_miou):
            return
        distributed.barrier(self.world)  # the main process may just have written best.ckpt
        best = load_checkpoint(self.out / BEST)  # every rank: the sweep is validated together
        if best.refiner is None:
            return
        refiner = create_refiner(best.config)
        assert refiner is not None
        load_state(refiner, best.refiner, "refiner", best.path)
        refiner.to(self.device)
        own_k = self.config.refine.points
        ks = sorted({*self.config.train.choose_k, own_k, 1.0})
        logger.info("refinement sweep: validating K in %s with and without the refiner (%d runs "
                    "over %d scene(s))", ks, 2 * len(ks), len(self.val_scenes))
        candidates = []
        bar = self._progress(2 * len(ks) * len(self.val_scenes), "refinement sweep")
        try:
            for enabled in (True, False):
                for k in ks:
                    bar.set_postfix_str(f"K={k}, refiner {'on' if enabled else 'off'}")
                    scores = validate(self.config.override({"refine.points": k}), self.val_scenes,
                                      run.backbone, refiner if enabled else None, self.world, self.device,
                                      on_scene=lambda: bar.update(1), windows=True)
                    candidates.append(Candidate(enabled, k, scores["units"]))
        finally:
            bar.close()
        baseline = next(c for c in candidates if not c.refiner and c.k == 1.0)
        in_mean = [c.in_mean for c in self.config.classes]
        pick, sweep, unit = choose(candidates, baseline, in_mean, own_k, seed=self.config.train.seed)
        for s in sweep:
            low, high = s["interval"]
            logger.info("refinement sweep: K=%s, refiner %s: val mIoU %s, gain over patch-only "
                        "%+.1f points (%d%% interval %+.1f..%+.1f)%s", s["k"], "on" if s["refiner"] else "off",
                        percent(s["val_miou"]), 100 * (s["gain"] or 0.0), round(100 * LEVEL),
                        100 * low, 100 * high, " beats the noise" if s["beats_noise"] else "")
        at_own_k = {s["refiner"]: s["val_miou"] for s in sweep if s["k"] == own_k}
        picked = next(s for s in sweep if (s["refiner"], s["k"]) == (pick.refiner, pick.k))
        choice = {"enabled": pick.refiner, "points": pick.k, "val_miou": picked["val_miou"],
                  "val_miou_refiner": at_own_k[True], "val_miou_no_refiner": at_own_k[False],
                  "gain": picked["gain"], "interval": picked["interval"],
                  "rule": f"patch-only (K=1, no refiner) unless a candidate's {round(100 * LEVEL)}% "
                          f"bootstrap interval of mIoU gain over it, resampling validation {unit}, "
                          "is above 0",
                  "bootstrap_unit": unit, "sweep": sweep}
        self.result.refiner_choice = choice
        logger.info("refinement chosen: K=%s, refiner %s (val mIoU %s, %+.1f points over patch-only), "
                    "stored in %s", pick.k, "on" if pick.refiner else "off", percent(picked["val_miou"]),
                    100 * (picked["gain"] or 0.0), self.out / BEST)
        if not self.world.main:
            return
        if self.options.on_epoch:
            chosen = {k: v for k, v in choice.items() if k != "sweep"}
            self.options.on_epoch({"phase": "refiner", "choice": chosen, "sweep": sweep})
        backbone = create_segmenter_model(best.config, pretrained=False)
        load_state(backbone, best.backbone, "backbone", best.path)
        config = best.config.override({"refiner.enabled": pick.refiner, "refine.points": pick.k})
        self.result.best = save_checkpoint(self.out / BEST, config, backbone, refiner.cpu(),
                                           meta={**best.meta, "refiner_choice": choice})

    def _calibrate(self) -> None:
        """Fit the temperature of best.ckpt's final probabilities on the validation scenes
        (the model as stored, after the refinement choice) and store it in best.ckpt."""
        path = self.out / BEST
        if not self.world.main or not self.val_scenes or not path.is_file():
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
        probs, target = validation_pixels(best.config, self.val_scenes, backbone.to(self.device),
                                          None if used is None else used.to(self.device), self.device,
                                          seed=self.config.train.seed)
        calibration = fit_calibration(probs, target)
        self.result.calibration = calibration
        logger.info("temperature %.3f fitted on %d validation pixels: ECE %s at T = 1, %s with it; "
                    "stored T = %.3f in %s", calibration["fitted_temperature"], calibration["pixels"],
                    percent(calibration["val_ece_before"]), percent(calibration["val_ece_fitted"]),
                    calibration["temperature"], path)
        self.result.best = save_checkpoint(path, best.config, backbone.cpu(),
                                           None if stored is None else stored.cpu(), meta=best.meta,
                                           training=best.training, calibration=calibration)
        if self.options.on_epoch:
            self.options.on_epoch({"phase": "calibration", **calibration})

    # ------------------------------------------------------------------ phase construction
    def _backbone_checkpoint(self) -> Checkpoint:
        """The checkpoint whose backbone the refiner phase builds on, from ``out``."""
        order = [BEST, LAST] if self.config.train.backbone_from == "best" else [LAST]
        path = next((self.out / n for n in order if (self.out / n).exists()), None)
        if path is None:
            raise CheckpointError(
                f"the refiner phase needs a trained backbone in {self.out / order[0]}; "
                "run `magseg train --phase backbone` (or --phase all) first"
            )
        ckpt = load_checkpoint(path)
        self.config = check_matches(self.config, ckpt)
        return ckpt

    @property
    def _cache_root(self) -> Path:
        return Path(self.options.cache_dir) if self.options.cache_dir is not None else self.out / "cache"

    def _scene_cache(self) -> SceneCache | None:
        """The training scenes' cache, every entry made (JPEG/PNG layouts; GeoTIFFs are read
        by windows and need none). Decoding happens here, in the main process of each rank
        (its share, then any missing), so DataLoader workers only ever read entries, and a
        full disk stops the run with one message instead of a worker's traceback."""
        if self.config.data.layout == "geotiff":
            return None
        cache = SceneCache(self._cache_root, self.config)
        bar = self._progress(len(self.train_scenes), "scene cache")
        threads = max(1, resolve_workers(self.config.train.num_workers))
        try:
            cache.prepare(self.train_scenes[self.world.rank :: self.world.size], threads,
                          on_scene=lambda: bar.update(1))
            distributed.barrier(self.world)
            if self.world.distributed:
                cache.prepare(self.train_scenes, threads)
        finally:
            bar.close()
        return cache

    def _build_phase(self, name: Phase, resume: Checkpoint | None) -> _PhaseRun:
        train, world = self.config.train, self.world
        distributed.barrier(world)  # the main process may just have written best.ckpt
        seed_everything(train.seed)
        if name == "backbone":
            backbone, refiner, trained, dataset = self._backbone_phase_parts(resume)
            epochs, lr, collate = train.epochs, train.lr, None
        else:
            backbone, refiner, trained, dataset = self._refiner_phase_parts(resume)
            epochs, lr, collate = train.refiner_epochs, train.refiner_lr, collate_refiner

        if world.distributed:
            trained = DistributedDataParallel(
                trained, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        sampler = (DistributedSampler(dataset, world.size, world.rank, shuffle=False)
                   if world.distributed else SequentialSampler(dataset))
        # The loader's own generator: starting an iteration draws a seed for the workers, from
        # the global torch RNG otherwise, which dropout also draws from. Persistent workers
        # start once per run, so a resumed run would draw once more than an uninterrupted
        # one. Samples need no worker seed (they are functions of their index).
        workers = phase_workers(train.num_workers, name, self.device)
        loader = DataLoader(dataset, batch_size=train.batch_size, sampler=EpochSampler(sampler, dataset),
                            collate_fn=collate, generator=torch.Generator().manual_seed(train.seed),
                            **loader_options(workers, self.device))
        optimizer = torch.optim.AdamW(trained.parameters(), lr=lr, weight_decay=train.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _poly(epochs * len(loader), train.poly_power)
        )
        # fp16 gradients underflow without a loss scale; bf16 has fp32's range and needs none.
        scaler = torch.amp.GradScaler(self.device.type, enabled=train.precision == "fp16")
        run = _PhaseRun(name, epochs, backbone, refiner, trained, loader, dataset, optimizer, scheduler,
                        scaler)
        if resume is not None:
            self._restore(run, resume)
        return run

    def _backbone_phase_parts(self, resume: Checkpoint | None):
        """The backbone phase's models and samples: ``(backbone, None, trained, dataset)``."""
        config, train = self.config, self.config.train
        backbone = create_segmenter_model(config, pretrained=resume is None)
        if resume is not None:
            load_state(backbone, resume.backbone, "backbone", resume.path)
        backbone.to(self.device, memory_format=self.memory_format).train()
        dataset = BackboneSamples(self.train_scenes, config, train.samples_per_epoch, train.seed,
                                  augment=train.augment, ratios=context_ratios(backbone),
                                  cache=self._scene_cache())
        return backbone, None, backbone, dataset

    def _refiner_phase_parts(self, resume: Checkpoint | None):
        """The refiner phase's models and samples, the frozen backbone's coarse maps made
        first: ``(backbone, refiner, trained, dataset)``."""
        train, world = self.config.train, self.world
        base = resume or self._base
        if base is None:
            base = self._backbone_checkpoint()
            logger.info("refiner phase: frozen backbone from %s", base.path)
        self._base = None
        backbone = create_segmenter_model(self.config, pretrained=False)
        load_state(backbone, base.backbone, "backbone", base.path)
        backbone.to(self.device, memory_format=self.memory_format).eval().requires_grad_(False)
        refiner = create_refiner(self.config)
        assert refiner is not None  # _phases drops the refiner phase when disabled
        if resume is not None:
            if resume.refiner is None:
                raise CheckpointError(f"{resume.path} is a refiner-phase checkpoint without a refiner")
            load_state(refiner, resume.refiner, "refiner", resume.path)
        refiner.to(self.device).train()
        length = train.refiner_samples_per_epoch or train.samples_per_epoch
        cache = self._scene_cache()
        bar = self._progress(len(self.train_scenes), "coarse maps")
        try:
            coarse = prepare_coarse_maps(backbone, self.train_scenes, self.config, self._cache_root,
                                         self.device, world, cache, on_scene=lambda: bar.update(1))
        finally:
            bar.close()
        dataset = RefinerSamples(self.train_scenes, self.config, length, train.seed,
                                 ratios=context_ratios(backbone), cache=cache, coarse=coarse)
        return backbone, refiner, refiner, dataset

    @staticmethod
    def _restore(run: _PhaseRun, resume: Checkpoint) -> None:
        """Optimiser, schedule, epoch, best score, RNG and loss scale from ``resume``."""
        state = resume.training
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        # The schedule is a function of (step, total steps): with the planned total this
        # gives the stored rate again; with more --epochs the decay stretches from here.
        for group, base, fn in zip(run.optimizer.param_groups, run.scheduler.base_lrs,
                                   run.scheduler.lr_lambdas):
            group["lr"] = base * fn(run.scheduler.last_epoch)
        run.start_epoch = int(state["epoch"])
        run.best_miou = float(state.get("best_miou", -math.inf))
        set_rng_state(state["rng"])
        if state.get("scaler"):  # absent or empty: written without a loss scale
            run.scaler.load_state_dict(state["scaler"])
        logger.info("resumed %s phase from %s after epoch %d", run.name, resume.path, run.start_epoch)

    # ------------------------------------------------------------------ one epoch
    def _train_epoch(self, run: _PhaseRun, epoch: int) -> None:
        config, world = self.config, self.world
        start = time.perf_counter()
        run.dataset.set_epoch(epoch)
        inner = getattr(run.loader.sampler, "sampler", run.loader.sampler)  # an EpochSampler's
        if isinstance(inner, DistributedSampler):
            inner.set_epoch(epoch)
        step_loss = backbone_loss if run.name == "backbone" else refiner_loss
        totals = torch.zeros(2, dtype=torch.float64)  # loss * samples, samples
        bar = self._progress(len(run.loader), f"{run.name} {epoch + 1}/{run.epochs}")
        try:
            for batch in batches(run.loader):
                with precision_context(self.device, config.train.precision):
                    loss, count = step_loss(run.trained, run.backbone, batch, config, self.device)
                run.optimizer.zero_grad(set_to_none=True)
                run.scaler.scale(loss).backward()
                run.scaler.step(run.optimizer)
                run.scaler.update()
                run.scheduler.step()
                totals += torch.tensor([float(loss.detach()) * count, count], dtype=torch.float64)
                bar.update(1)
                bar.set_postfix_str(f"loss {float(loss.detach()):.4f}")
        finally:
            bar.close()
        distributed.all_sum(world, totals)
        record: dict[str, Any] = {
            "phase": run.name, "epoch": epoch + 1, "epochs": run.epochs,
            "loss": float(totals[0] / totals[1]) if totals[1] > 0 else float("nan"),
            "lr": run.optimizer.param_groups[0]["lr"], "precision": config.train.precision,
        }
        improved = False
        if (epoch + 1) % config.train.val_every == 0 or epoch + 1 == run.epochs:
            bar = self._progress(len(self.val_scenes), "validation")
            try:
                scores = validate(config, self.val_scenes, run.backbone, run.refiner, world,
                                  self.device, on_scene=lambda: bar.update(1))
            finally:
                bar.close()
            record.update(val_miou=scores["miou"], val_accuracy=scores["accuracy"],
                          val_fwiou=scores["fwiou"], val_iou=scores["iou"],
                          val_pixels=scores["pixels"])
            if math.isfinite(scores["miou"]) and scores["miou"] > run.best_miou:
                run.best_miou, improved = scores["miou"], True
        record["seconds"] = round(time.perf_counter() - start, 3)
        record["best"] = improved
        self._save(run, epoch, record, improved)
        self.result.records.append(record)
        logger.info("%s epoch %d/%d: loss %.4f%s (%.1f s)%s", run.name, epoch + 1, run.epochs,
                    record["loss"],
                    f", val mIoU {percent(record['val_miou'])}" if "val_miou" in record else "",
                    record["seconds"], " best" if improved else "")
        self._overall.update(1)
        if world.main and self.options.on_epoch:
            self.options.on_epoch(record)

    def _save(self, run: _PhaseRun, epoch: int, record: dict[str, Any], improved: bool) -> None:
        if not self.world.main:
            return
        meta = dict(record)
        training = {
            "phase": run.name,
            "epoch": epoch + 1,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "best_miou": run.best_miou,
            "rng": rng_state(),
            "scaler": run.scaler.state_dict(),
        }
        # last first: if writing best fails, the run can still resume from last.
        self.result.last = save_checkpoint(self.out / LAST, self.config, run.backbone, run.refiner,
                                           meta=meta, training=training)
        if improved:
            self.result.best = save_checkpoint(self.out / BEST, self.config, run.backbone,
                                               run.refiner, meta=meta)


def train(config: Config, options: TrainOptions) -> TrainResult:
    """Train ``config`` as ``options`` say (see ``Trainer``)."""
    return Trainer(config, options).run()
