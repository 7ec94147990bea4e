"""The benchmark over a split: every scene scored where a ``Pool`` runs it (this process, or
Ray actors), the tallies summed here in scene order.

    scenes -> Pool.map_unordered(score_scene) -> SceneOutcome | FailedScene per scene
           -> add_scene in scene order -> BenchmarkResult

What is scored, and how one scene is (methods, metrics, memory), is
``magseg.evaluation.benchmark``; this module only runs the scenes and gathers them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from magseg.config import Config
from magseg.data.scenes import Scene
from magseg.errors import DataError, MagsegError
from magseg.evaluation.benchmark import (
    BenchmarkResult,
    FailedScene,
    ImageRecord,
    Method,
    SceneOutcome,
    add_scene,
    evaluate_scene,
    new_tallies,
    read_labelled,
)
from magseg.run.pools import Pool
from magseg.segmenter import Segmenter


def score_scene(segmenter: Segmenter, scene: Scene, methods: Sequence[Method], index: int,
                sample: bool, warmup: bool, checkpoint: str | None) -> SceneOutcome | FailedScene:
    """``evaluate_scene`` as one task of a pool (``fn(segmenter, *task)``, e.g. on a Ray
    worker): a scene that cannot be read or scored comes back as a ``FailedScene`` instead
    of raising, so the other scenes go on."""
    try:
        return evaluate_scene(segmenter, scene, methods, index, sample=sample, warmup=warmup,
                              checkpoint=checkpoint)
    except MagsegError as exc:
        return FailedScene(scene.id, str(exc))


def _lost(task: tuple, reason: str) -> FailedScene:
    """A task whose worker died: its scene (the task's first item) failed for ``reason``."""
    return FailedScene(task[0].id, reason)


def run_benchmark(
    pool: Pool,
    config: Config,
    scenes: Sequence[Scene],
    methods: Sequence[Method],
    *,
    samples: int = 3,
    warmup: bool = True,
    checkpoint: str | Path | None = None,
    on_image: Callable[[ImageRecord], None] | None = None,
    on_failure: Callable[[FailedScene], None] | None = None,
) -> BenchmarkResult:
    """Run every method on every scene and score them.

    ``pool`` runs the scenes: ``magseg.run.pools.LocalPool`` in this process, or a
    ``ScenePool`` of Ray workers. Confusion matrices come back per scene and are summed
    here in scene order, so the report does not depend on which worker finished first.

    The first scene is read before anything else, so a dataset that does not fit the model
    (other classes, other band count) fails at once. A scene that fails later is recorded
    in ``failed`` (and ``on_failure`` is called) and the others go on.

    Args:
        samples: how many scenes (the first ones) to keep for sample panels.
        warmup: run every method once, untimed, before measuring (once per worker).
        checkpoint: named in errors about the data not fitting the model.
        on_image: called after each scored scene with its per-image record.
    Raises:
        DataError: no scenes, or the first scene cannot be read or does not fit the model.
    """
    if not scenes:
        raise DataError("no scenes to benchmark")
    read_labelled(scenes[0], config, checkpoint)  # fail fast, before any work on the data
    name = None if checkpoint is None else str(checkpoint)
    tasks = [(scene, list(methods), i, i < samples, warmup, name) for i, scene in enumerate(scenes)]
    outcomes: dict[int, SceneOutcome] = {}
    failed: list[FailedScene] = []
    for index, outcome in pool.map_unordered(score_scene, tasks, _lost):
        if isinstance(outcome, FailedScene):
            failed.append(outcome)
            if on_failure:
                on_failure(outcome)
            continue
        outcomes[index] = outcome
        if on_image:
            on_image(outcome.record)
    tallies = new_tallies(config, methods)
    for index in sorted(outcomes):
        add_scene(tallies, outcomes[index], config)
    ordered = [outcomes[i] for i in sorted(outcomes)]
    return BenchmarkResult(config, tallies, [o.record for o in ordered], failed,
                           [o.sample for o in ordered if o.sample is not None])
