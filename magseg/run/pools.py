"""Where scenes run: the ``Pool`` contract, met in this process (``LocalPool``) and on many
machines by a pool of Ray actors, each holding the model once (``ScenePool``).

    driver: checkpoint bytes -> Ray object store -> N actors (one Segmenter each)
            tasks fn(segmenter, *args) -> results streamed back as they finish

Whole scenes are the unit of work: one task segments one raster (predict) or one dataset
image (benchmark), so the model is loaded once per actor, not once per scene. The checkpoint
travels through the object store, so workers on other machines need no copy of it; the
rasters a task reads and writes are paths, which need the same filesystem view on every
machine (shared storage), as usual for a cluster.

Both pools subclass the ``Pool`` contract (declared, so a type checker holds them to it), and
a caller has one code path for a run in this process (``LocalPool``) and on Ray
(``ScenePool``). Ray is an optional extra
(``pip install 'magseg[ray]'``); only this module imports it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from magseg.errors import MagsegError

if TYPE_CHECKING:
    from magseg.segmenter import Segmenter

INSTALL_HINT = "pip install 'magseg[ray]' (or: pip install ray)"


def require_ray():
    """The ``ray`` module, or a MagsegError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise MagsegError(f"--runner ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


Result = TypeVar("Result")


@runtime_checkable
class Pool(Protocol):
    """Where scenes run, as a context manager (``with pool: ...`` starts and ends its workers).

    ``map_unordered(fn, tasks, on_lost)`` calls ``fn(segmenter, *task)`` for each task, on a
    ``Segmenter`` the pool holds (``fn`` importable by name), and yields ``(task index,
    result)`` as each finishes; a task lost with its worker yields ``on_lost(task, reason)``
    in its place, so one lost scene does not end the batch.
    """

    def __enter__(self) -> Pool: ...

    def __exit__(self, *exc: object) -> None: ...

    def map_unordered(
        self, fn: Callable[..., Result], tasks: Iterable[tuple], on_lost: Callable[[tuple, str], Result]
    ) -> Iterator[tuple[int, Result]]: ...


@dataclass(frozen=True)
class SetupFailed:
    """What an actor answers every task with when its machine could not build the model."""

    reason: str


class SceneWorker:
    """One actor's state: a Segmenter built once from the checkpoint's bytes, or why it
    could not be built there (its machine's graph cache lacks the int8 graph, a runtime or
    device it does not have): the actor then stays up to say so, where an exception would
    end it with Ray's traceback in place of the reason."""

    def __init__(self, checkpoint: bytes, name: str, overrides: Sequence[str], threads: int) -> None:
        import torch

        from magseg.allocator import keep_freed_memory
        from magseg.checkpoint import checkpoint_from_bytes
        from magseg.segmenter import Segmenter

        keep_freed_memory()  # an actor is its own process, as the magseg command is
        torch.set_num_threads(max(1, threads))
        self.failure: SetupFailed | None = None
        try:
            self.segmenter = Segmenter.from_checkpoint(checkpoint_from_bytes(checkpoint, name), overrides)
        except Exception as exc:  # noqa: BLE001 - whatever it is, this actor can run nothing: say why
            self.failure = SetupFailed(str(exc) if isinstance(exc, MagsegError) else f"{type(exc).__name__}: {exc}")

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(segmenter, *args)``: ``fn`` is any importable function (sent by reference);
        the ``SetupFailed`` when there is no segmenter."""
        if self.failure is not None:
            return self.failure
        return fn(self.segmenter, *args)


class LocalPool(Pool):
    """A ``Pool`` in this process: the tasks run one after another, in order, on one
    Segmenter; none is ever lost, so ``on_lost`` is never called."""

    def __init__(self, segmenter: Segmenter) -> None:
        self.segmenter = segmenter

    def __enter__(self) -> "LocalPool":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def map_unordered(
        self, fn: Callable[..., Any], tasks: Iterable[tuple], on_lost: Callable[[tuple, str], Any]
    ) -> Iterator[tuple[int, Any]]:
        for index, task in enumerate(tasks):
            yield index, fn(self.segmenter, *task)


class ScenePool(Pool):
    """A ``Pool`` of Ray actors running ``fn(segmenter, *args)`` tasks, results as they finish.

    Args:
        checkpoint: the checkpoint file's bytes, shipped through the object store (each actor
            loads the same weights and tags its outputs with their digest).
        name: the file they were read from, for messages.
        overrides: run-time config overrides for every worker (``engine.*``, ``refine.*``).
        workers: number of actors (default: as many as the cluster's CPUs allow).
        address: a Ray cluster to join (``auto``, ``ray://host:10001``...); None starts a
            local instance that ends with the pool.
        cpus_per_worker: CPUs each actor reserves; its torch thread count.
        gpus_per_worker: GPUs each actor reserves (use with ``engine.device=cuda``).
        quiet: keep Ray's own log lines off stderr.
    """

    def __init__(
        self,
        checkpoint: bytes,
        name: str,
        overrides: Sequence[str] = (),
        workers: int | None = None,
        address: str | None = None,
        cpus_per_worker: int = 1,
        gpus_per_worker: float = 0,
        quiet: bool = False,
    ) -> None:
        ray = require_ray()
        self._ray = ray
        self._started = not ray.is_initialized()
        self._ray_level: int | None = None
        if self._started:
            if quiet:
                # Ray's start-up warnings (its token authentication's, among others) are
                # logged before logging_level takes effect: --quiet keeps them off stderr too,
                # until the pool closes.
                self._ray_level = logging.getLogger("ray").level
                logging.getLogger("ray").setLevel(logging.ERROR)
            options: dict[str, Any] = dict(
                include_dashboard=False,
                logging_level=logging.ERROR if quiet else logging.INFO,
                log_to_driver=not quiet,
            )
            if address:
                options["address"] = address
            else:
                # A local instance: enough CPUs for the workers asked for, else all of them.
                options["num_cpus"] = max(os.cpu_count() or 1, (workers or 1) * cpus_per_worker)
            try:
                ray.init(**options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                self._restore_ray_logging()
                raise MagsegError(f"cannot start or join Ray ({address or 'local'}): {exc}") from None
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_worker))
        blob = ray.put(checkpoint)
        actor = ray.remote(SceneWorker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)
        self._make = lambda: actor.remote(blob, name, list(overrides), cpus_per_worker)
        self.actors = [self._make() for _ in range(workers)]
        self._unable: dict[int, SetupFailed] = {}  # actor slots whose machine could not build the model

    def __enter__(self) -> "ScenePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._restore_ray_logging()

    def _restore_ray_logging(self) -> None:
        """The ``ray`` logger's level as it was before a quiet pool held it at ERROR."""
        if self._ray_level is not None:
            logging.getLogger("ray").setLevel(self._ray_level)
            self._ray_level = None

    def map_unordered(
        self, fn: Callable[..., Any], tasks: Iterable[tuple], on_lost: Callable[[tuple, str], Any]
    ) -> Iterator[tuple[int, Any]]:
        """Run ``fn(segmenter, *task)`` for each task; yield ``(task index, result)`` as each
        finishes. Each actor has one task at a time, so a slow scene never queues others
        behind it. A task whose actor dies (killed, out of memory) yields ``on_lost(task,
        reason)`` and the actor is replaced, so the rest of the batch still runs. An actor
        whose machine could not build the model (``SetupFailed``) takes no more tasks, and
        its task goes to another; with none left, each remaining task yields ``on_lost``
        with the reason.
        """
        ray = self._ray
        queue = list(enumerate(tasks))[::-1]
        running: dict[Any, tuple[int, tuple, int]] = {}  # ref -> (index, task, actor slot)
        idle = [slot for slot in range(len(self.actors)) if slot not in self._unable]

        def submit() -> None:
            while queue and idle:
                slot = idle.pop()
                index, task = queue.pop()
                running[self.actors[slot].run.remote(fn, *task)] = (index, task, slot)

        submit()
        while running:
            (done,), _ = ray.wait(list(running), num_returns=1)
            index, task, slot = running.pop(done)
            try:
                result = ray.get(done)
            except ray.exceptions.RayActorError as exc:
                result = on_lost(task, f"Ray worker died: {_first_line(exc)}")
                self.actors[slot] = self._make()
            except ray.exceptions.RayTaskError as exc:
                result = on_lost(task, f"Ray task failed: {_first_line(exc)}")
            if isinstance(result, SetupFailed):  # the task starts next, on another actor
                self._unable[slot] = result
                queue.append((index, task))
                submit()
                continue
            idle.append(slot)
            submit()
            yield index, result
        while queue:  # every actor is out: none could build the model
            index, task = queue.pop()
            reason = next(iter(self._unable.values())).reason
            yield index, on_lost(task, f"{NO_WORKER_COULD_LOAD}: {reason}")


NO_WORKER_COULD_LOAD = "no Ray worker could load the model"


def worth_running_again(reason: str) -> bool:
    """Whether a task lost for ``reason`` (``on_lost``'s) may succeed when run again: lost
    with its worker, yes; not where no worker could build the model (the reason names the
    fix)."""
    return not reason.startswith(NO_WORKER_COULD_LOAD)


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(exc: Exception) -> str:
    """A Ray error's first line, without the colour codes Ray puts in its messages."""
    return _ANSI_ESCAPE.sub("", str(exc).splitlines()[0])
