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
