"""A training run: its checks, its setup, its phases in order, then the refinement choice
and the calibration (docs/training.md).

    phase "backbone": one segmenter learns windows at every stage's magnification
                      (magseg.training.backbone_phase)
    phase "refiner":  backbone frozen (from <out>/best.ckpt, or last.ckpt per
                      train.backbone_from); the refiner learns refiner(fine, coarse) -> mask
                      (magseg.training.refiner_phase), then K and the refiner are chosen on
                      validation (magseg.training.refiner_choice)
    calibration:      a temperature fitted on validation (magseg.training.calibrate)

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
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import yaml

from magseg.checkpoint import Checkpoint, load_checkpoint
from magseg.config import Config
from magseg.data.scenes import Scene, check_scene, list_scenes, read_scene
from magseg.device import resolve_device
from magseg.errors import CheckpointError, ConfigError, OutputExistsError
from magseg.io.atomic import atomic_write
from magseg.normalization import ChannelStats
from magseg.training import distributed
from magseg.training.backbone_phase import backbone_parts
from magseg.training.calibrate import calibrate_best
from magseg.training.distributed import World
from magseg.training.matching import check_matches
from magseg.training.phase import start_phase, train_epoch
from magseg.training.refiner_choice import choose_refinement
from magseg.training.refiner_phase import backbone_checkpoint, refiner_parts
from magseg.training.resume import seed_everything
from magseg.training.state import (
    BEST,
    CONFIG,
    LAST,
    LOG,
    PHASES,
    Phase,
    RunPrecision,
    RunState,
    TrainOptions,
    TrainResult,
    logger,
)

__all__ = ["TrainOptions", "TrainResult", "Trainer", "train"]


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


class Trainer:
    """Runs the phases of ``TrainOptions.phase`` for one config (see the module docstring)."""

    def __init__(self, config: Config, options: TrainOptions) -> None:
        self.config = config
        self.options = options
        self.out = Path(options.out)
        # The refiner phase's backbone checkpoint, when it was read before the first phase.
        self._base: Checkpoint | None = None

    # ------------------------------------------------------------------ checks
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

    def _make_out(self, world: World) -> None:
        if world.main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise ConfigError(f"--out-dir {self.out} is a file (or under one); give a "
                                  "directory for the checkpoints") from None
        distributed.barrier(world)

    # ------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        world = distributed.init_world(self.config.engine.device)
        try:
            device = _device(self.config, world)
            phases = self._phases()
            # Every check that reads what is there comes before anything is created: a run
            # that cannot start (exit 2) leaves no directory and no train.log behind.
            resume = self._check_outputs(phases)
            if resume is None and phases[0] == "refiner":
                # Before the statistics: the backbone's own normalisation is used.
                self._base, self.config = backbone_checkpoint(self.config, self.out)
            self._make_out(world)
            with _log_file(self.out / LOG, world.main):
                state = self._setup(world, device)
                if resume is not None and resume.training.get("phase") == "refiner":
                    phases = [p for p in phases if p == "refiner"]
                self._train(state, phases, resume)
                calibrate_best(state)
        finally:
            distributed.close_world(world)
        return state.result

    def _setup(self, world: World, device: torch.device) -> RunState:
        """The scenes checked, the normalisation computed, config.yaml written: the run's state."""
        if self._base is not None:
            logger.info("refiner phase: frozen backbone from %s", self._base.path)
        config, root = self.config, self.options.data_root
        train_scenes = _scenes(config, "train", root)
        val_scenes = _scenes(config, "val", root, config.train.val_max_scenes)
        check_mask_colours(config, train_scenes[:1] + val_scenes[:1])
        logger.info("data: %d training and %d validation scenes (%s layout) on %d process(es)",
                    len(train_scenes), len(val_scenes), config.data.layout, world.size)
        config = compute_stats(config, train_scenes, world)
        if world.main:
            with atomic_write(self.out / CONFIG) as tmp:
                tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return RunState(config, self.options, world, device, RunPrecision.resolve(config, device),
                        train_scenes, val_scenes, TrainResult(config))

    def _train(self, state: RunState, phases: list[Phase], resume: Checkpoint | None) -> None:
        state.overall = state.progress(_epochs_to_run(state.config, phases, resume), "training")
        try:
            for name in phases:
                ckpt = resume if resume is not None and resume.training.get("phase") == name else None
                self._train_phase(state, name, ckpt)
        finally:
            state.overall.close()

    def _train_phase(self, state: RunState, name: Phase, resume: Checkpoint | None) -> None:
        distributed.barrier(state.world)  # the main process may just have written best.ckpt
        seed_everything(state.config.train.seed)  # before the models are made
        if name == "backbone":
            parts = backbone_parts(state, resume)
        else:
            parts = refiner_parts(state, resume, self._base)
            self._base = None
        run = start_phase(state, parts, resume)
        if run.start_epoch >= run.epochs:
            logger.info("%s phase: already trained for %d epoch(s)", name, run.start_epoch)
            return
        logger.info("%s phase: epochs %d..%d of %d, %d steps per epoch", name, run.start_epoch + 1,
                    run.epochs, run.epochs, len(run.loader))
        for epoch in range(run.start_epoch, run.epochs):
            train_epoch(state, run, epoch)
        if name == "refiner" and state.config.train.refiner_choice:
            choose_refinement(state, run)


def _epochs_to_run(config: Config, phases: Sequence[Phase], resume: Checkpoint | None) -> int:
    """Epochs this run trains, all phases together (the overall progress bar's total):
    each phase's epochs, less those a resumed phase already has."""
    planned = {"backbone": config.train.epochs, "refiner": config.train.refiner_epochs}
    done = int(resume.training.get("epoch", 0)) if resume is not None else 0
    return max(0, sum(planned[p] for p in phases) - done)


def train(config: Config, options: TrainOptions) -> TrainResult:
    """Train ``config`` as ``options`` say (see ``Trainer``)."""
    return Trainer(config, options).run()
