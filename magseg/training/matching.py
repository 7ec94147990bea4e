"""Whether a checkpoint was trained for the config asked of it: the entries that define
the trained weights must agree for a run to resume from it or build on it."""

from __future__ import annotations

from typing import Any

from magseg.checkpoint import Checkpoint
from magseg.config import Config
from magseg.errors import CheckpointError

# Config entries that define the trained weights: a checkpoint resumed or built upon must
# agree on them (the rest, e.g. learning rate or refine.points, may change between runs).
MODEL_KEYS = ("classes", "model", "refiner", "pyramid", "data.layout", "data.bands", "data.mean",
              "data.std")

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
