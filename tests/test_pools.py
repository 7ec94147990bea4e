"""The ``Pool`` contract: ``LocalPool`` runs ``fn(segmenter, *task)`` in order in this process;
both pools are ``Pool``s (Ray's own runs are in test_cluster.py)."""

from __future__ import annotations

from magseg.run.pools import LocalPool, Pool, ScenePool


def _scaled(segmenter, value: int, offset: int) -> int:
    return segmenter * value + offset


def test_local_pool_runs_each_task_on_its_segmenter_in_order_and_loses_none():
    lost = []
    with LocalPool(10) as pool:  # any object stands in for the Segmenter: fn gets it first
        results = list(pool.map_unordered(_scaled, [(1, 2), (3, 4), (0, 7)],
                                          lambda task, reason: lost.append(task)))
    assert results == [(0, 12), (1, 34), (2, 7)]
    assert lost == []


def test_both_pools_meet_the_pool_contract():
    assert issubclass(LocalPool, Pool) and issubclass(ScenePool, Pool)
    assert isinstance(LocalPool(None), Pool)
    assert not isinstance(object(), Pool)


class _FakeRay:
    """Just what ``ScenePool.map_unordered`` uses of Ray: refs are finished results,
    ``wait`` takes the oldest."""

    class exceptions:  # noqa: N801 - Ray's name
        class RayActorError(Exception):
            pass

        class RayTaskError(Exception):
            pass

    @staticmethod
    def wait(refs, num_returns):
        return refs[:num_returns], refs[num_returns:]

    @staticmethod
    def get(ref):
        return ref.value


class _FakeActor:
    def __init__(self, failure, ran):
        self.failure, self.ran, self.calls = failure, ran, 0
        self.run = self

    def remote(self, fn, *task):
        from magseg.run.pools import SetupFailed

        self.calls += 1
        if self.failure is None:
            self.ran.append(task)
        return type("Ref", (), {"value": SetupFailed(self.failure) if self.failure else fn(None, *task)})()


def _scene_pool(failures, ran):
    pool = object.__new__(ScenePool)  # no Ray: its scheduling alone
    pool._ray, pool.actors, pool._unable = _FakeRay, [_FakeActor(f, ran) for f in failures], {}
    return pool


def test_a_task_given_to_an_actor_that_could_not_build_the_model_goes_to_another():
    ran, lost = [], []
    pool = _scene_pool(["no int8 graph here", None], ran)
    results = dict(pool.map_unordered(lambda segmenter, x: 10 * x, [(i,) for i in range(6)],
                                      lambda task, reason: lost.append(task)))
    assert results == {i: 10 * i for i in range(6)} and lost == []
    assert sorted(ran) == [(i,) for i in range(6)]  # all on the one actor that could


def test_with_no_actor_able_to_build_the_model_every_task_says_why():
    ran = []
    pool = _scene_pool(["no int8 graph here", "no int8 graph here"], ran)
    for tasks in (4, 3):  # a second map (a raster's next stage) asks the same actors nothing
        results = dict(pool.map_unordered(lambda segmenter, x: x, [(i,) for i in range(tasks)],
                                          lambda task, reason: (task, reason)))
        assert results == {i: ((i,), "no Ray worker could load the model: no int8 graph here")
                           for i in range(tasks)}
    assert [actor.calls for actor in pool.actors] == [1, 1]  # one task each, in the first map


def test_an_actor_keeps_why_its_machine_could_not_build_the_model(make_checkpoint, monkeypatch):
    # SceneWorker is the actor's class; in this process it is a plain object (whose
    # process-wide malloc setting is left out here).
    from magseg import allocator
    from magseg.run.pools import SceneWorker, SetupFailed
    from magseg.segmenter import Segmenter

    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: None)
    ckpt = make_checkpoint()
    data = ckpt.read_bytes()
    cut = SceneWorker(data[: len(data) // 2], str(ckpt), [], 1)
    reason = cut.run(getattr, "num_classes").reason
    assert reason.startswith(f"checkpoint {ckpt} ") and "Traceback" not in reason

    def broken_install(*args, **kwargs):
        raise ImportError("libGL.so.1: cannot open shared object file")

    assert SceneWorker(data, str(ckpt), [], 1).run(getattr, "num_classes") == 4
    monkeypatch.setattr(Segmenter, "from_checkpoint", broken_install)
    assert SceneWorker(data, str(ckpt), [], 1).run(getattr, "num_classes") == SetupFailed(
        "ImportError: libGL.so.1: cannot open shared object file")



def test_a_rasters_lost_stage_advises_running_again_only_where_that_can_help():
    # PoolStages (a raster spread over actors) turns a lost job into the raster's error.
    import pytest

    from magseg.errors import MagsegError
    from magseg.run.streaming import PoolStages

    class WorkerDies:
        def map_unordered(self, fn, tasks, on_lost):
            for index, task in enumerate(tasks):
                yield index, on_lost(task, "Ray worker died: killed")

    reader = type("Reader", (), {"nodata": None})
    sink = type("Sink", (), {"wants_probs": False, "source": type("Source", (), {"reader": reader})})
    unable = _scene_pool(["no int8 graph here"], [])  # the pool's own words for it
    for pool, message in [
        (WorkerDies(), "(Ray worker died: killed); run it again"),
        (unable, "(no Ray worker could load the model: no int8 graph here)"),
    ]:
        with pytest.raises(MagsegError) as caught:
            PoolStages(pool, "big.tif", [1, 2, 3], None, sink)([object()])
        assert str(caught.value) == f"big.tif: a stage's crops were lost {message}"


def test_a_quiet_pool_that_cannot_reach_ray_gives_the_ray_logger_its_level_back(monkeypatch):
    import logging

    import pytest

    from magseg.errors import MagsegError
    from magseg.run import pools

    class Unreachable:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**options):
            assert logging.getLogger("ray").level == logging.ERROR  # held while it starts
            raise ConnectionError("no cluster at ray://nowhere:10001")

    monkeypatch.setattr(pools, "require_ray", lambda: Unreachable)
    logger = logging.getLogger("ray")
    monkeypatch.setattr(logger, "level", logging.INFO)
    with pytest.raises(MagsegError, match=r"cannot start or join Ray \(ray://nowhere:10001\): no cluster"):
        ScenePool(b"", "best.ckpt", address="ray://nowhere:10001", quiet=True)
    assert logger.level == logging.INFO
