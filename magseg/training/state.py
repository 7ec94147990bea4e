"""What the parts of a training run share: its options and result, the precisions it runs
at (resolved once), and ``RunState``, the run's config, process, device and scenes.

The phases (``magseg.training.phase``, ``backbone_phase``, ``refiner_phase``) and the steps
after them (``refiner_choice``, ``calibrate``) each take a ``RunState`` and read from it;
``magseg.training.trainer`` makes it and puts the steps in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from magseg.config import Config, EngineConfig
from magseg.data.scenes import Scene
from magseg.engine.precision import Precision, autocast, resolve_precision, resolved_engine
from magseg.errors import ConfigError
from magseg.training.distributed import World

# Every part of training logs here: train.log is a handler on this logger.
logger = logging.getLogger("magseg.train")

Phase = Literal["backbone", "refiner"]
PHASES: tuple[Phase, ...] = ("backbone", "refiner")
BEST, LAST, LOG, CONFIG = "best.ckpt", "last.ckpt", "train.log", "config.yaml"


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
    # Called on the main process after each epoch's checkpoints are written, with the
    # epoch's record (then the refinement choice's and the calibration's).
    on_epoch: Callable[[dict[str, Any]], None] | None = None
    progress: ProgressFactory | None = None
    # Decoded scenes and the refiner's coarse maps (magseg.data.cache, magseg.training.coarse);
    # None: <out>/cache. Shareable between runs and ranks.
    cache_dir: Path | None = None


@dataclass
class TrainResult:
    config: Config
    # One JSON record per epoch, as train.log and the CLI's stdout give them.
    records: list[dict[str, Any]] = field(default_factory=list)
    best: Path | None = None
    last: Path | None = None
    # After a refiner phase with train.refiner_choice: best.ckpt's meta "refiner_choice"
    # record (validation mIoU with and without the refiner, each K, which one was stored).
    refiner_choice: dict[str, Any] | None = None
    # best.ckpt's "calibration" record (magseg.training.calibrate.fit_calibration).
    calibration: dict[str, Any] | None = None


@dataclass(frozen=True)
class RunPrecision:
    """The precisions of one run, resolved once (docs/precision.md#training-and-the-engine).

    ``train``: the autocast of the module being trained, its forward pass and loss
    (``train.precision``). ``engine``: the config's engine with its device and its precision
    resolved, for every pass the engine makes (the frozen backbone's inputs to the refiner,
    coarse maps, validation, the refinement choice, calibration), as predict makes them.
    The two never nest: the engine runs outside the training autocast.
    """

    device: torch.device
    train: Precision
    engine: EngineConfig

    @classmethod
    def resolve(cls, config: Config, device: torch.device) -> RunPrecision:
        """Raises ConfigError for ``engine.precision=int8``: training's engine passes run the
        torch model, and int8 exists only as a trained checkpoint's quantised graph."""
        if config.engine.precision == "int8":
            raise ConfigError("engine.precision=int8 is for a trained checkpoint (magseg quantize, then predict "
                              "or benchmark); training's engine passes run in torch: set engine.precision to "
                              "auto, fp32, bf16 or fp16 to train")
        return cls(device, resolve_precision(device, config.train.precision),
                   resolved_engine(config.engine, device))

    def training(self) -> AbstractContextManager:
        """The training autocast (nothing for fp32)."""
        return autocast(self.device, self.train)


@dataclass
class RunState:
    """One training run as its parts share it. ``config`` is the run's resolved config (the
    normalisation filled in, a resumed checkpoint's checked); ``world`` this process's place
    among the ranks."""

    config: Config
    options: TrainOptions
    world: World
    device: torch.device
    precision: RunPrecision
    train_scenes: list[Scene]
    val_scenes: list[Scene]
    result: TrainResult
    # The whole run's bar, phases x epochs (one step per epoch).
    overall: Progress = field(default_factory=Progress)

    @property
    def out(self) -> Path:
        return Path(self.options.out)

    @property
    def cache_root(self) -> Path:
        return Path(self.options.cache_dir) if self.options.cache_dir is not None else self.out / "cache"

    @property
    def memory_format(self) -> torch.memory_format:
        """The backbone's layout in training: NHWC with ``train.channels_last`` (faster CPU
        convolutions, docs/performance.md#channels-last), else the standard layout."""
        return torch.channels_last if self.config.train.channels_last else torch.contiguous_format

    def progress(self, total: int, desc: str) -> Progress:
        """A bar from ``options.progress`` on the main process; one that shows nothing elsewhere."""
        if self.options.progress is None or not self.world.main:
            return Progress()
        return self.options.progress(total, desc)
