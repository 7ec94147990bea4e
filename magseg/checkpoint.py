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

import hashlib
import io
import math
import pickle
import stat
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from magseg.config import Config, config_from_dict
from magseg.errors import CheckpointError, ConfigError, WriteError
from magseg.io.atomic import atomic_write

if TYPE_CHECKING:  # torch is imported where a checkpoint is read or written: checking a
    import torch   # path (check_checkpoint_file) costs no torch import
    from torch import nn

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
    # SHA-256 of the bytes the weights were read from: what outputs' provenance names and
    # what keys the graph cache, never the file at ``path`` hashed again, which may by then
    # hold other weights (a newer best.ckpt) or, on a Ray worker elsewhere, nothing.
    sha256: str
    # What the loader changed or noticed, one line each, for the CLI to show (e.g. a
    # backbone-phase checkpoint run without its refiner).
    warnings: list[str] = field(default_factory=list)
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
    import torch

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
            raise WriteError(f"{tmp}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                             path=tmp) from exc
        _check_written(tmp)
    return path


def _check_written(path: Path) -> None:
    """Read a checkpoint just written back as a zip archive and check every member's CRC:
    a file cut short by a failed write is never put in place."""
    bad = zip_damage(path)
    if bad is not None:
        raise WriteError(f"{path}: does not read back complete after writing ({bad})", path=path)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    # DDP wraps the model in .module; store the bare model's keys. Contiguous: a model
    # trained channels-last stores the same standard layout as any other.
    module = getattr(module, "module", module)
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def load_checkpoint(path: str | Path, *, checked: bool = False) -> Checkpoint:
    """Read and validate a checkpoint file (``check_checkpoint_file`` first, unless
    ``checked``: the caller has just run it on this file, as the CLI does before it imports
    torch, so the whole file is not read once more for its CRCs).

    Raises:
        CheckpointError: missing, unreadable, damaged, not a magseg checkpoint, or an
            invalid config.
    """
    path = Path(path)
    if not checked:
        check_checkpoint_file(path)
    try:
        # Hashed and unpickled through one open file: a file put in the path's place
        # meanwhile (training replaces best.ckpt by a rename) changes neither.
        with open(path, "rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
            file.seek(0)
            return _parse(file, path, digest)
    except OSError as exc:
        raise _unreadable(path, exc) from None


def checkpoint_from_bytes(data: bytes, name: str | Path) -> Checkpoint:
    """A checkpoint from the bytes of its file (e.g. shipped to a remote worker); ``name``
    is the file it came from, for messages."""
    source = io.BytesIO(data)
    _check_contents(source, Path(name))
    return _parse(source, Path(name), hashlib.sha256(data).hexdigest())


def check_checkpoint_file(path: str | Path) -> None:
    """Everything about a checkpoint file that can be checked without torch: it is a regular
    file, readable, not empty, a zip archive as ``torch.save`` writes it (not a raster, a
    raw pickle, text...), and every entry's CRC-32 matches what was written, so a file
    changed by one byte since it was saved is refused before any of it is used.

    Reads the whole file once (the CRCs); imports no torch, so the CLI refuses a bad
    checkpoint in a fraction of a second.

    Raises:
        CheckpointError: what is wrong, naming ``path``.
    """
    path = Path(path)
    _check_path(path)
    try:
        with open(path, "rb") as file:
            _check_contents(file, path)
    except OSError as exc:
        raise _unreadable(path, exc) from None


def read_checkpoint_bytes(path: str | Path) -> bytes:
    """The bytes of the checkpoint file ``path``, read once: ``checkpoint_from_bytes`` loads
    them, and they can be sent as they are to workers, which then hold the same weights.

    Raises:
        CheckpointError: missing, not a regular file, unreadable (naming ``path``).
    """
    path = Path(path)
    _check_path(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: OSError) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror or exc})")


def _check_path(path: Path) -> None:
    """``path`` is a regular file (or CheckpointError saying what it is instead)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path} does not exist (train one with `magseg train`, "
            "which writes best.ckpt and last.ckpt in its --out-dir)") from None
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if stat.S_ISDIR(mode):
        inside = [n for n in ("best.ckpt", "last.ckpt") if (path / n).is_file()]
        hint = f"; give {path / inside[0]}" if inside else "; give the .ckpt file written by `magseg train`"
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file{hint}")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"checkpoint {path} is not a regular file (a device, pipe or socket); "
                              "give the .ckpt file written by `magseg train`")


# File signatures of what is given as a checkpoint by mistake: (first bytes, what it is).
_SIGNATURES = (
    (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
    (b"II+\x00", "a BigTIFF image"), (b"MM\x00+", "a BigTIFF image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"), (b"\xff\x4f\xff\x51", "a JPEG 2000 codestream"),
    (b"\x1f\x8b", "a gzip-compressed file"), (b"PK\x05\x06", "an empty zip archive"),
    (b"\x89HDF", "an HDF5 file (Keras/TensorFlow weights?)"),
)


def _what_it_is(head: bytes) -> tuple[str, str]:
    """What a file starting with ``head`` (not a zip archive) is, in words, and what more to
    say about it ("" or "; ...")."""
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name, "; the checkpoint comes first, then the rasters" if "image" in name else ""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return ("a raw pickle (pickle.dump, or torch.save's legacy format)",
                "; magseg never unpickles such files: it can run code")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "a text file", ""
    return f"an unknown kind of file (it starts with bytes {head[:8].hex(' ')})", ""


def _check_contents(file: Any, path: Path) -> None:
    """``file`` (binary, seekable) holds a complete, undamaged torch zip archive; left at 0."""
    head = file.read(16)
    if not head:
        raise CheckpointError(f"checkpoint {path} is an empty file (0 bytes): a run stopped while "
                              "writing it, or it is not a checkpoint")
    file.seek(0)
    if not head.startswith(b"PK\x03\x04"):
        what, more = _what_it_is(head)
        raise CheckpointError(f"checkpoint {path} is {what}, not a magseg checkpoint (the zip "
                              f"archive `magseg train` writes){more}")
    damage = zip_damage(file, require_torch=True)
    file.seek(0)
    if damage is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {damage}; it changed after it was "
                              "written: use another copy, or train again")


def zip_damage(source: str | Path | Any, require_torch: bool = False) -> str | None:
    """Why ``source`` (a path or binary file) is not a complete, undamaged zip archive as
    ``torch.save`` writes it, in words; None when it is. Every entry is read through, so each
    one's CRC-32 is checked; memory stays at one 1 MiB chunk. ``require_torch``: also refuse
    archives that torch did not write (no ``data.pkl``, compressed entries)."""
    name = None
    try:
        with zipfile.ZipFile(source) as archive:
            entries = archive.infolist()
            if require_torch:
                if not any(e.filename.rpartition("/")[2] == "data.pkl" for e in entries):
                    return "it is a zip archive but not a PyTorch file (it has no data.pkl)"
                packed = next((e for e in entries if e.compress_type != zipfile.ZIP_STORED), None)
                if packed is not None:
                    return (f"its entry {_entry(packed.filename)} is compressed, which torch.save "
                            "never does: it is not a file torch wrote")
            for entry in entries:
                name = _entry(entry.filename)
                with archive.open(entry) as member:
                    while member.read(1 << 20):
                        pass
    except zipfile.BadZipFile as exc:
        if name is not None and "CRC" in str(exc):
            return f"its entry {name} fails its CRC-32 check"
        if name is None and str(exc) == "File is not a zip file":
            return "it is cut short (the zip directory that ends the archive is missing)"
        where = f"at its entry {name}: " if name is not None else ""
        return f"not a complete zip archive ({where}{_first_line(exc)})"
    except (EOFError, OSError, zlib.error, NotImplementedError, ValueError, RuntimeError) as exc:
        where = f" at its entry {name}" if name is not None else ""
        return f"not a complete zip archive ({type(exc).__name__}{where}: {_first_line(exc)})"
    return None


def _entry(filename: str) -> str:
    # torch names every entry "<archive name>/...": the name part is the file's (or its
    # temporary name's) and says nothing about the damage.
    return repr(filename.partition("/")[2] or filename)


def _parse(source: BinaryIO, path: Path, digest: str) -> Checkpoint:
    """The checkpoint in ``source`` (checked by ``_check_contents`` already), whose bytes
    have the SHA-256 ``digest``."""
    import torch

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
    pyramid = stored.get("pyramid") if isinstance(stored, dict) else None
    if isinstance(pyramid, dict) and "margin" not in pyramid:
        # No pyramid.margin key: written before margins, trained and predicting without one
        # (the default of a new config is an eighth of the crop).
        stored = {**stored, "pyramid": {**pyramid, "margin": 0}}
    try:
        config = config_from_dict(stored, source=f"in checkpoint {path}")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    meta = payload.get("meta") or {}
    training = payload.get("training")
    config, warnings = _backbone_phase_without_refiner(config, payload.get("refiner"), meta,
                                                       training, path)
    return Checkpoint(path=path, config=config, backbone=payload["backbone"],
                      refiner=payload.get("refiner"), meta=meta, training=training, sha256=digest,
                      warnings=warnings,
                      calibration=_calibration(payload.get("calibration"), path))


def _backbone_phase_without_refiner(config: Config, refiner: dict | None, meta: dict,
                                    training: dict | None, path: Path) -> tuple[Config, list[str]]:
    """A checkpoint the backbone phase wrote keeps the run's config, refiner.enabled: true
    included, but holds no refiner weights yet: its config is read with refiner.enabled:
    false (so its config digest is not that of the model with the refiner), and a warning
    says so. Any other file that promises a refiner it lacks is refused by ``run_config``."""
    phase = meta.get("phase") if isinstance(meta, dict) else None
    if isinstance(training, dict):
        phase = training.get("phase", phase)
    if refiner is not None or not config.refiner.enabled or phase != "backbone":
        return config, []
    return config.override({"refiner.enabled": False}), [
        f"checkpoint {path} was written by the backbone phase and holds no refiner weights: "
        "it segments without the refiner (read as refiner.enabled: false); train the refiner "
        "with `magseg train --phase refiner` for the full model"]


def run_config(ckpt: Checkpoint, overrides: Mapping[str, Any] | Sequence[str] = ()) -> Config:
    """The checkpoint's config with run-time ``overrides`` applied, as predict and benchmark
    run it.

    Raises:
        ConfigError: a bad override.
        CheckpointError: the config enables the refiner but the file holds no refiner
            weights (the model it promises is not in it).
    """
    config = ckpt.config.override(overrides) if overrides else ckpt.config
    if config.refiner.enabled and ckpt.refiner is None:
        asked = "--set refiner.enabled=true" if not ckpt.config.refiner.enabled else "its config"
        raise CheckpointError(
            f"checkpoint {ckpt.path} holds no refiner weights, but {asked} enables the refiner; "
            "run the backbone alone with --set refiner.enabled=false, or use a checkpoint the "
            "refiner phase wrote")
    return config


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
