"""atomic_write and the clean-up of temporaries that killed runs left behind."""

import os
import subprocess
import sys

import pytest

from magseg.atomic import atomic_write, partial_path, remove_stale_partials
from magseg.errors import OutputExistsError


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_partial_path_names_the_process_and_host(tmp_path):
    path = partial_path(tmp_path / "scene.tif")
    assert path.parent == tmp_path
    assert path.name.startswith(f".scene.tif.{os.getpid()}@") and path.name.endswith(".partial")


def test_writing_a_target_removes_only_the_leftovers_of_dead_processes_on_this_host(tmp_path):
    target = tmp_path / "scene.tif"
    own = partial_path(target)
    host = own.name[len(f".scene.tif.{os.getpid()}@") : -len(".partial")]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": f".scene.tif.{_dead_pid()}@{host}.partial",
            "alive": f".scene.tif.{sleeper.pid}@{host}.partial",
            "other_host": f".scene.tif.{_dead_pid()}@not-{host}.partial",
            "old_style": f".scene.tif.{_dead_pid()}.partial",
            "scratch": f".scene.tif.tiled.{_dead_pid()}@{host}.partial",  # another target's
            "other_target": f".other.tif.{_dead_pid()}@{host}.partial",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"x" * 10)
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"done")
        assert target.read_bytes() == b"done"
        left = {p.name for p in tmp_path.iterdir()} - {"scene.tif"}
        assert left == set(names.values()) - {names["dead"]}
        # The scratch file is a target of its own: writing that one removes it.
        assert remove_stale_partials(tmp_path / "scene.tif.tiled") == [tmp_path / names["scratch"]]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_failed_write_leaves_the_target_and_no_temporary(tmp_path):
    target = tmp_path / "scene.tif"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["scene.tif"]
    with pytest.raises(OutputExistsError, match="--overwrite"):
        with atomic_write(target, overwrite=False):
            pass
