"""atomic_write and the clean-up of temporaries that killed runs left behind."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from small_fs import fill, small_filesystem

import magseg.io.atomic
from magseg.errors import OutputExistsError, WriteError
from magseg.io.atomic import (
    atomic_write,
    atomic_writes,
    partial_path,
    publish,
    remove_stale_partials,
)


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


def test_without_overwrite_a_file_that_appeared_meanwhile_is_kept(tmp_path):
    """Two runs writing one target: the one that finishes second must not replace the file
    of the one that finished first (the existence check at the start is long past)."""
    target = tmp_path / "scene.tif"
    with pytest.raises(OutputExistsError, match="appeared while this run was writing"):
        with atomic_write(target, overwrite=False) as tmp:
            tmp.write_bytes(b"mine")
            target.write_bytes(b"theirs")  # the other run publishes first
    assert target.read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["scene.tif"]
    # With overwrite, replacing it is what was asked for.
    with atomic_write(target, overwrite=True) as tmp:
        tmp.write_bytes(b"mine")
    assert target.read_bytes() == b"mine"


def test_files_that_belong_together_are_all_put_in_place_or_none(tmp_path):
    """One input's outputs: when one of them appeared meanwhile, the ones already renamed
    into place are removed again, and the other run's file is kept."""
    labels, probs = tmp_path / "a.tif", tmp_path / "a_probs.tif"
    with pytest.raises(OutputExistsError, match="a_probs.tif appeared while"):
        with atomic_writes({"labels": labels, "probs": probs}, overwrite=False) as temps:
            temps["labels"].write_bytes(b"my labels")
            temps["probs"].write_bytes(b"my probs")
            probs.write_bytes(b"their probs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_probs.tif"]
    assert probs.read_bytes() == b"their probs"
    with atomic_writes({"labels": labels, "probs": probs}, overwrite=True) as temps:
        temps["labels"].write_bytes(b"my labels")
        temps["probs"].write_bytes(b"my probs")
    assert labels.read_bytes() == b"my labels" and probs.read_bytes() == b"my probs"


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "check-then-rename"])
def test_without_hard_links_publishing_still_never_replaces(tmp_path, monkeypatch, renameat2):
    def no_links(src, dst, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(magseg.io.atomic.os, "link", no_links)
    if not renameat2:
        monkeypatch.setattr(magseg.io.atomic, "_renameat2", lambda: None)
    target = tmp_path / "scene.tif"
    tmp = tmp_path / ".scene.tif.1@h.partial"
    tmp.write_bytes(b"mine")
    target.write_bytes(b"theirs")
    with pytest.raises(OutputExistsError, match="appeared while"):
        publish(tmp, target, overwrite=False)
    assert target.read_bytes() == b"theirs" and tmp.read_bytes() == b"mine"
    target.unlink()
    publish(tmp, target, overwrite=False)
    assert target.read_bytes() == b"mine" and not tmp.exists()


def test_a_failed_write_names_the_target_and_says_the_disk_is_full(tmp_path):
    target = tmp_path / "scene.tif"
    target.write_bytes(b"old")
    with pytest.raises(WriteError) as caught:
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    message = str(caught.value)
    assert message.startswith(f"{target}: not written, the disk is full")
    assert "free some space" in message and f"the existing {target} is unchanged" in message
    assert ".partial" not in message
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["scene.tif"]


def test_an_error_the_kernel_reports_only_at_sync_keeps_the_previous_file(tmp_path, monkeypatch):
    """NFS and thin-provisioned disks report a failed write when the file is synced: the
    file must not be put in place."""
    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(magseg.io.atomic.os, "fsync", failing_fsync)
    target = tmp_path / "scene.tif"
    target.write_bytes(b"old")
    with pytest.raises(WriteError, match=r"scene.tif: not written \(.*Input/output error"):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["scene.tif"]


def test_a_real_full_filesystem_keeps_the_previous_file(tmp_path):
    with small_filesystem(tmp_path / "disk", size="1m") as disk:
        target = disk / "model.ckpt"
        target.write_bytes(b"good" * 1000)
        fill(disk)
        with pytest.raises(WriteError, match="the disk is full .* free in"):
            with atomic_write(target) as tmp:
                tmp.write_bytes(b"x" * 500_000)
        assert target.read_bytes() == b"good" * 1000
        assert sorted(p.name for p in disk.iterdir()) == [".filler", "model.ckpt"]


def test_an_entry_lock_where_no_lock_file_can_be_made_lets_the_build_run_and_fail_on_its_own():
    # (A read-only cache folder, or one not there: the build's own write then says why.)
    from magseg.io.atomic import entry_lock

    ran = []
    with entry_lock(Path("/proc/no-such-folder/graph.onnx")):
        ran.append(True)
    assert ran == [True]
