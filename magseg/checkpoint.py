"""The checkpoint: one file with the weights and the full resolved config.

Layout (a plain dict, so ``torch.load(path, weights_only=True)`` reads it and nothing from
the file is ever unpickled as code)::

    {
      "format": "magseg-checkpoint", "version": 1,
      "config": Config.to_dict(),          # architecture, classes, scales, bands, normalisation
      "backbone": state_dict,              # the smp (or FCtL) segmenter
      "refiner": state_dict | None,        # None until phase 2 has run
      "meta": {...},                       # epoch, metrics, magseg version: informational
      "training": {...} | None,            # optimizer/scheduler/RNG state for --resume
      "calibration": {...} | None,         # {"temperature": T, ...} fitted on validation;
                                           # absent (older files) or None: T = 1
    }
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from magseg.config import Config, config_from_dict
from magseg.errors import CheckpointError, ConfigError, WriteError
from magseg.io.atomic import atomic_write

FORMAT = "magseg-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint (tensors on the CPU)."""

    path: Path
    config: Config
    backbone: dict[str, torch.Tensor]
    refiner: dict[str, torch.Tensor] | None
    meta: dict[str, Any]
    training: dict[str, Any] | None
    calibration: dict[str, Any] | None = None

    @property
    def temperature(self) -> float:
        """The temperature fitted on validation (``magseg.evaluation.calibration``); 1 when
        the checkpoint has none."""
        return float((self.calibration or {}).get("temperature", 1.0))


def save_checkpoint(
    path: str | Path,
    config: Config,
    backbone: nn.Module,
    refiner: nn.Module | None = None,
    *,
    meta: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically: a crash, a full disk or any failure to write leaves any
    previous file intact.

    Raises:
        WriteError: the file could not be written completely (the message names ``path``
            and, for a full disk, says so).
    """
    from magseg import __version__

    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "backbone": _cpu_state(backbone),
        "refiner": None if refiner is None else _cpu_state(refiner),
        "meta": {"magseg_version": __version__, **(meta or {})},
        "training": training,
        "calibration": calibration,
    }
    path = Path(path)
    with atomic_write(path) as tmp:
        try:
            torch.save(payload, tmp)
        except (RuntimeError, OSError) as exc:  # torch reports a failed write as RuntimeError
            error = WriteError(f"{tmp}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            error.path = tmp  # type: ignore[attr-defined]
            raise error from exc
        _check_written(tmp)
    return path


def _check_written(path: Path) -> None:
    """Read a checkpoint just written back as a zip archive and check every member's CRC:
    a file cut short by a failed write is never put in place."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        bad = f"{type(exc).__name__}: {exc}"
    if bad is not None:
        error = WriteError(f"{path}: does not read back complete after writing ({bad})")
        error.path = path  # type: ignore[attr-defined]
        raise error


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    # DDP wraps the model in .module; store the bare model's keys. Contiguous: a model
    # trained channels-last stores the same standard layout as any other.
    module = getattr(module, "module", module)
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint file.

    Raises:
        CheckpointError: missing, unreadable, not a magseg checkpoint, or an invalid config.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist (train one with `magseg train`, "
            "which writes best.ckpt and last.ckpt in its --out-dir)"
        )
    return _parse(path, path)


def checkpoint_from_bytes(data: bytes, name: str | Path) -> Checkpoint:
    """A checkpoint from the bytes of its file (e.g. shipped to a remote worker); ``name``
    is the file it came from, for messages."""
    return _parse(io.BytesIO(data), Path(name))


def _parse(source: Path | io.BytesIO, path: Path) -> Checkpoint:
    empty = (source.stat().st_size if isinstance(source, Path) else len(source.getbuffer())) == 0
    if empty:
        raise CheckpointError(f"checkpoint {path} is an empty file (0 bytes): a run stopped while "
                              "writing it, or it is not a checkpoint")
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise CheckpointError(
                f"checkpoint {path} cannot be read (UnpicklingError: {_first_line(exc)}); "
                "it is truncated, corrupt or not a magseg checkpoint"
            ) from None
        # torch's own message advises loading with weights_only=False: never do that with a
        # file from elsewhere, unpickling it can run any code.
        raise CheckpointError(
            f"checkpoint {path} holds pickled Python objects besides tensors and plain data; "
            "magseg does not load such files (unpickling can run code), and magseg train "
            "never writes them"
        ) from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {_first_line(exc)}); "
            "it is truncated, corrupt or not a magseg checkpoint"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a magseg checkpoint (no '{FORMAT}' header)")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload.get('version')}; "
            f"this magseg reads version {VERSION}"
        )
    for key, needed in (("config", True), ("backbone", True), ("refiner", False), ("training", False),
                        ("calibration", False)):
        value = payload.get(key)
        if not isinstance(value, dict) and (needed or value is not None):
            found = "nothing" if value is None else f"a {type(value).__name__}"
            raise CheckpointError(
                f"checkpoint {path} is damaged: its '{key}' entry should be a mapping but is "
                f"{found}; use a checkpoint written by `magseg train`"
            )
    stored = payload["config"]
    refiner = stored.get("refiner") if isinstance(stored, dict) else None
    if isinstance(refiner, dict) and "gate" not in refiner:
        # No refiner.gate key: the refiner's weights are the correction alone, no gate.
        stored = {**stored, "refiner": {**refiner, "gate": False}}
    try:
        config = config_from_dict(stored, source=f"in checkpoint {path}")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    return Checkpoint(
        path=path,
        config=config,
        backbone=payload["backbone"],
        refiner=payload.get("refiner"),
        meta=payload.get("meta") or {},
        training=payload.get("training"),
        calibration=_calibration(payload.get("calibration"), path),
    )


def _calibration(value: dict[str, Any] | None, path: Path) -> dict[str, Any] | None:
    """The stored calibration, its temperature checked (a finite number > 0)."""
    if value is None:
        return None
    t = value.get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise CheckpointError(f"checkpoint {path} is damaged: its calibration temperature {t!r} "
                              "is not a number > 0; use a checkpoint written by `magseg train`")
    return value


def _first_line(exc: BaseException) -> str:
    return next(iter(str(exc).splitlines()), "") or "no details"


def load_state(module: nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    """``load_state_dict(strict=True)`` with an error that says what does not match."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} of another shape (e.g. {k}: checkpoint {tuple(state[k].shape)} "
                f"vs model {tuple(own[k].shape)})"
            )
        hint = ""
        if any(k.startswith("gate.") for k in missing + unexpected):
            hint = (" (the refiner's gate: a checkpoint without gate weights needs "
                    "refiner.gate=false, one with them refiner.gate=true)")
        raise CheckpointError(
            f"the {what} weights in {path} do not fit the model built from its config: "
            + "; ".join(parts) + hint
        )
    module.load_state_dict(state, strict=True)
