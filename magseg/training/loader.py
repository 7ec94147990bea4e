"""DataLoader settings that fit the machine: how many workers ``train.num_workers: auto``
means, and the options the trainer's loaders are built with."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypedDict

import torch

from magseg.errors import MagsegError

# Beyond this many workers a loader only adds memory (each holds its prefetched batches and
# its own open files): a sample is a window read and a resize of that window.
MAX_AUTO_WORKERS = 8
# Batches each worker keeps ready. Two hide the jitter of one slow sample (a cold page of
# the scene cache, a large stage); more only holds memory (docs/training.md#loader-defaults).
PREFETCH_FACTOR = 2


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, as taskset or a container's
    cpuset leave it), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_workers(setting: int | str, cores: int | None = None, local_ranks: int | None = None) -> int:
    """``train.num_workers`` as a count: an int as it is; ``auto`` the cores of this rank's
    share of the machine (``LOCAL_WORLD_SIZE`` ranks under torchrun) less one for the
    training loop itself, at most ``MAX_AUTO_WORKERS``: 0 (load in the loop) on one core."""
    if isinstance(setting, int):
        return setting
    cores = usable_cores() if cores is None else cores
    if local_ranks is None:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(0, min(cores // max(local_ranks, 1) - 1, MAX_AUTO_WORKERS))


def phase_workers(setting: int | str, phase: str, device: torch.device, cores: int | None = None,
                  local_ranks: int | None = None) -> int:
    """``resolve_workers`` for one phase. The refiner phase cuts its samples from the caches
    (scenes and coarse maps), many times faster than its model consumes them, so the loop's
    own process keeps up; on a CPU where ``auto`` leaves a single worker (two cores per
    rank), that worker would only take a core from the loop's threads. So there ``auto``
    loads in the loop (figures: docs/training.md#figures-on-a-shared-2-core-cpu)."""
    workers = resolve_workers(setting, cores, local_ranks)
    if setting == "auto" and phase == "refiner" and device.type == "cpu" and workers <= 1:
        return 0
    return workers


# Workers run below the training loop's priority. A sample is cheap (the loader outpaces
# the model many times over), but on a machine with few cores a worker that wakes up in the
# middle of a step takes a core from the loop's OpenMP threads, and the whole parallel region
# then waits for the thread it preempted. At a lower priority workers fill the loop's idle
# moments instead; where cores are free, the priority changes nothing.
WORKER_NICENESS = 5


def lower_priority(worker_id: int) -> None:
    """``worker_init_fn``: lower this worker process's priority (``WORKER_NICENESS``)."""
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)


class LoaderOptions(TypedDict, total=False):
    """The DataLoader keyword arguments ``loader_options`` sets."""

    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int
    worker_init_fn: Callable[[int], None]


def loader_options(workers: int, device: torch.device) -> LoaderOptions:
    """DataLoader keyword arguments: workers that persist across epochs (no fork and
    re-open of the caches every epoch; the epoch travels with the indices, see
    ``samples.EpochSampler``), a prefetch factor, workers at a lower priority than the loop
    (``lower_priority``), and page-locked batches on CUDA (copied to the GPU asynchronously,
    ``non_blocking=True``)."""
    options: LoaderOptions = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=PREFETCH_FACTOR,
                       worker_init_fn=lower_priority)
    return options


# A DataLoader re-raises a worker's exception as the same type with the worker's traceback
# as its message, which the CLI would print. Samples mark their own errors' messages so the
# training loop can raise them again as the worker raised them: one line, no traceback.
_MARK = "\x1emagseg-worker-error\x1e"


def marked(exc: MagsegError) -> MagsegError:
    """``exc`` with its message marked (``raise marked(exc) from None`` in a worker)."""
    return type(exc)(f"{_MARK}{exc}{_MARK}")


def unmarked(exc: MagsegError) -> MagsegError | None:
    """The error a worker raised, from the DataLoader's re-raise of it; None if unmarked."""
    text = str(exc)
    if text.count(_MARK) < 2:
        return None
    return type(exc)(text.split(_MARK)[1])


def batches(loader: Iterable[Any]) -> Iterator[Any]:
    """Iterate ``loader``, raising a worker's magseg error as the worker raised it."""
    try:
        yield from loader
    except MagsegError as exc:
        plain = unmarked(exc)
        if plain is None:
            raise
        raise plain from None
