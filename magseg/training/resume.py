"""What ``--resume`` needs beyond the weights, in a form ``torch.load(weights_only=True)``
reads: tensors, dicts, lists, ints, floats and strings only.

Optimizer and scheduler state dicts are already of that kind. The random number generators
of torch, numpy and Python are converted here (numpy's state holds an ndarray, Python's a
tuple of 625 ints).
"""

from __future__ import annotations

import random
from typing import Any, NotRequired, TypedDict

import numpy as np
import torch


class NumpyRng(TypedDict):
    kind: str
    keys: torch.Tensor  # (624,) int64: the Mersenne Twister's state words
    pos: int
    has_gauss: int
    cached: float


class PythonRng(TypedDict):
    version: int
    internal: list[int]  # 625 ints
    gauss_next: float | None


class RngState(TypedDict):
    """``rng_state()``: what ``set_rng_state`` restores."""

    torch: torch.Tensor
    numpy: NumpyRng
    python: PythonRng
    cuda: NotRequired[list[torch.Tensor]]  # with CUDA initialised


class TrainingState(TypedDict):
    """A checkpoint's ``training`` entry: where a phase stands, for ``--resume``."""

    phase: str  # "backbone" or "refiner"
    epoch: int  # epochs done
    optimizer: dict[str, Any]  # torch's state dicts
    scheduler: dict[str, Any]
    best_miou: float
    rng: RngState
    scaler: dict[str, Any]  # empty without a loss scale


def rng_state() -> RngState:
    """The global RNG states of torch (CPU and CUDA), numpy and Python."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: RngState = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {
            "version": int(version),
            "internal": [int(v) for v in internal],
            "gauss_next": gauss_next if gauss_next is None else float(gauss_next),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: RngState) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python (model initialisation must agree across ranks)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
