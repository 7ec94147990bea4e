"""What `magseg predict` and `magseg train` promise when the disk fills up or another run
writes the same output: no output that looks finished but is not, the previous file kept,
one clear line, the rest of the batch still done (docs/reliability.md)."""

from __future__ import annotations

import errno
import json
import os
import shutil

import magseg.cli.predict  # noqa: F401  (registers the command)
import magseg.cli.train  # noqa: F401  (registers the command)
import pytest
import rasterio
import torch
from geotiff import read_raster, smooth_image, write_raster
from magseg.cli.app import app
from small_fs import fill, small_filesystem
from test_datasets import CONFIGS_TINY, make_deepglobe
from typer.testing import CliRunner

import magseg.io.atomic
from magseg.checkpoint import load_checkpoint
from magseg.run.predict import PredictOptions, predict_raster
from magseg.io.raster import RasterWriter
from magseg.segmenter import Segmenter

SMALL_SCENE = ["pyramid.scales=[16,32,64]", "pyramid.crop=16", "pyramid.input=32"]


@pytest.fixture
def ckpt(make_checkpoint):
    return make_checkpoint(SMALL_SCENE)


def _predict(*args):
    return CliRunner().invoke(app, ["predict", *map(str, args)])


def _records(result):
    return [json.loads(line) for line in result.stdout.splitlines()]


def _partials(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".partial")]


# ------------------------------------------------------------------------------ full disk
def test_predict_on_a_full_disk_fails_the_input_and_keeps_the_previous_output(tmp_path, ckpt):
    a = write_raster(tmp_path / "a.tif", smooth_image(3, 150, 170, seed=1))
    b = write_raster(tmp_path / "b.tif", smooth_image(3, 40, 50, seed=2))
    with small_filesystem(tmp_path / "disk", size="2m") as disk:
        out = disk / "out"
        assert _predict(ckpt, a, "-o", out).exit_code == 0
        good = (out / "a.tif").read_bytes()
        fill(disk)

        # The stage maps' scratch space is checked first, and refused on a full disk.
        result = _predict(ckpt, a, "-o", out, "--overwrite")
        assert result.exit_code == 1 and "scratch space" in _records(result)[0]["error"]
        assert (out / "a.tif").read_bytes() == good and _partials(out) == []

        # --overwrite on a full disk (the scratch elsewhere): the good file stays, the input
        # is reported failed.
        scratch = ["--scratch-dir", tmp_path / "scratch"]
        result = _predict(ckpt, a, "-o", out, "--overwrite", *scratch)
        assert result.exit_code == 1, result.output
        (record,) = _records(result)
        assert record["status"] == "failed"
        assert record["error"].startswith(f"{out / 'a.tif'}: not written, the disk is full")
        assert "free some space" in record["error"] and "is unchanged" in record["error"]
        assert (out / "a.tif").read_bytes() == good
        assert read_raster(out / "a.tif")[0].shape == (1, 150, 170)

        # A new output on a full disk: failed, nothing left that a re-run would skip; the
        # batch goes on (a.tif exists: skipped).
        result = _predict(ckpt, b, a, "-o", out, *scratch)
        assert result.exit_code == 1, result.output
        first, second = _records(result)
        assert first["status"] == "failed" and "the disk is full" in first["error"]
        assert "no b.tif was written" in first["error"]
        assert second["status"] == "skipped"
        assert sorted(p.name for p in out.iterdir()) == ["a.qml", "a.tif", "a.tif.aux.xml"]


@pytest.mark.parametrize("leave", [2 * 1024, 120 * 1024])
def test_probs_on_a_full_disk_fail_cleanly_and_the_batch_goes_on(tmp_path, ckpt, leave):
    """GDAL crashed (malloc abort, segfault) when a dataset whose write had failed was
    closed: with --probs on a nearly full disk, the batch died without b's record. Each
    input must fail on its own, with its record, the summary line, and nothing left behind."""
    a = write_raster(tmp_path / "a.tif", smooth_image(3, 300, 340, seed=1))
    b = write_raster(tmp_path / "b.tif", smooth_image(3, 40, 50, seed=2))
    with small_filesystem(tmp_path / "disk", size="3m") as disk:
        fill(disk, leave=leave)
        scratch = tmp_path / "scratch"
        result = _predict(ckpt, a, b, "-o", disk / "o", "--probs", "--scratch-dir", scratch)
        assert result.exit_code == 1, result.output
        records = _records(result)
        assert [r["input"] for r in records] == [str(a), str(b)]
        assert records[0]["status"] == "failed" and "the disk is full" in records[0]["error"]
        assert "magseg: 1 of 2 input(s) failed" in result.stderr or \
            "magseg: 2 of 2 input(s) failed" in result.stderr
        assert _partials(disk / "o") == [] and list(scratch.iterdir()) == []
        for record in records:
            if record["status"] == "ok":  # what was published reads back complete
                assert read_raster(record["outputs"]["probs"])[0].shape[0] == 4


class _FailingWrites:
    """Makes GDAL's writes to output ``name``'s temporary file fail as on a full disk, and
    records any call on that dataset after the failure (there must be none but the
    release: magseg.io.gdal_lib.drop_cache, then close)."""

    def __init__(self, monkeypatch, name):
        self.name, self.failed, self.after = name, False, []
        real_write, real_mask = rasterio.io.DatasetWriter.write, rasterio.io.DatasetWriter.write_mask

        def wrap(real):
            def call(dataset, *args, **kwargs):
                if os.path.basename(dataset.name).startswith(f".{self.name}."):
                    if self.failed:
                        self.after.append(real.__name__)
                    self.failed = True
                    raise rasterio.errors.RasterioIOError("_tiffWriteProc: No space left on device")
                return real(dataset, *args, **kwargs)
            return call

        monkeypatch.setattr(rasterio.io.DatasetWriter, "write", wrap(real_write))
        monkeypatch.setattr(rasterio.io.DatasetWriter, "write_mask", wrap(real_mask))


def _fail_cog(monkeypatch, name):
    real_copy = rasterio.shutil.copy

    def copy(src, dst, **kwargs):
        if os.path.basename(str(dst)).startswith(f".{name}."):
            raise rasterio.errors.RasterioIOError("_tiffWriteProc: No space left on device")
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(rasterio.shutil, "copy", copy)


def _fail_open_for_writing(monkeypatch, module, name):
    """``open`` of ``module`` (or ElementTree's) failing with ENOSPC for ``name``'s temporary."""
    import builtins

    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if "w" in mode and os.path.basename(str(file)).startswith(f".{name}."):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)


@pytest.mark.parametrize("kind", ["labels", "probs", "uncertainty", "cog", "vector", "preview",
                                  "categories"])
def test_a_failed_write_of_any_output_fails_its_input_alone(tmp_path, ckpt, monkeypatch, kind):
    """A write failure injected into each kind of output: the input fails with one line
    naming that output, the batch goes on, nothing half-written is left, and the dataset
    whose write failed is never written again."""
    import pyogrio.raw

    a = write_raster(tmp_path / "a.tif", smooth_image(3, 60, 70, seed=1))
    b = write_raster(tmp_path / "b.tif", smooth_image(3, 40, 50, seed=2))
    out = tmp_path / "out"
    names = {"labels": "a.tif", "probs": "a_probs.tif", "uncertainty": "a_uncertainty.tif",
             "cog": "a_probs.tif", "vector": "a.gpkg", "preview": "a_preview.png",
             "categories": "a.tif.aux.xml"}
    failing = None
    if kind in ("labels", "probs", "uncertainty"):
        failing = _FailingWrites(monkeypatch, names[kind])
    elif kind == "cog":
        _fail_cog(monkeypatch, names[kind])
    elif kind == "vector":
        real_write = pyogrio.raw.write

        def write(path, *args, **kwargs):
            if os.path.basename(str(path)).startswith(".a.gpkg."):
                raise pyogrio.errors.DataSourceError("sqlite3_exec(INSERT) failed: database or disk is full")
            return real_write(path, *args, **kwargs)

        monkeypatch.setattr(pyogrio.raw, "write", write)
    else:
        _fail_open_for_writing(monkeypatch, None, names[kind])
    extra = ["--probs", "--uncertainty", "--preview", "--vector", "gpkg"]
    if kind == "cog":
        extra.append("--cog")
    scratch = tmp_path / "scratch"
    result = _predict(ckpt, a, b, "-o", out, "--scratch-dir", scratch, *extra)
    assert result.exit_code == 1, result.output
    first, second = _records(result)
    assert first["status"] == "failed", first
    assert first["error"].startswith(f"{out / names[kind]}: not written"), first["error"]
    assert "\n" not in first["error"] and ".partial" not in first["error"]
    assert second["status"] == "ok", second
    assert "magseg: 1 of 2 input(s) failed" in result.stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("a")) == []
    assert _partials(out) == [] and list(scratch.iterdir()) == []
    if failing is not None:
        assert failing.failed and failing.after == []


def _gdal_close_cuts_short(name):
    """rasterio.open whose write-mode datasets for output ``name`` lose their end at close
    without an error: what GDAL does on a full disk (it only prints a message)."""
    real_open = rasterio.open

    def open_(path, mode="r", *args, **kwargs):
        dataset = real_open(path, mode, *args, **kwargs)
        if mode == "w" and os.path.basename(str(path)).startswith(f".{name}."):
            close = dataset.close

            def close_short():
                close()
                os.truncate(path, os.path.getsize(path) // 2)

            dataset.close = close_short
        return dataset

    return open_


def _sync_out_of_space(name):
    """os.fsync that fails as a full disk does for output ``name``'s temporary file (a write
    the kernel deferred, as NFS does)."""
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    return fsync


@pytest.mark.parametrize("failure", ["gdal-close", "sync"])
def test_an_output_that_is_not_written_completely_fails_its_input_alone(
        tmp_path, ckpt, monkeypatch, failure):
    a = write_raster(tmp_path / "a.tif", smooth_image(3, 60, 70, seed=1))
    b = write_raster(tmp_path / "b.tif", smooth_image(3, 40, 50, seed=2))
    out = tmp_path / "out"
    assert _predict(ckpt, a, "-o", out).exit_code == 0
    good = (out / "a.tif").read_bytes()
    if failure == "gdal-close":
        monkeypatch.setattr(rasterio, "open", _gdal_close_cuts_short("a.tif"))
    else:
        monkeypatch.setattr(magseg.io.atomic.os, "fsync", _sync_out_of_space("a.tif"))
    result = _predict(ckpt, a, b, "-o", out, "--overwrite")
    assert result.exit_code == 1, result.output
    first, second = _records(result)
    assert first["status"] == "failed" and first["error"].startswith(f"{out / 'a.tif'}: not written")
    assert f"the existing {out / 'a.tif'} is unchanged" in first["error"]
    if failure == "gdal-close":
        assert "does not read back complete" in first["error"]
    else:
        assert "the disk is full" in first["error"]
    assert second["status"] == "ok"
    assert (out / "a.tif").read_bytes() == good
    assert sorted(p.name for p in out.iterdir()) == ["a.qml", "a.tif", "a.tif.aux.xml",
                                                     "b.qml", "b.tif", "b.tif.aux.xml"]


def _train(data, out, *extra):
    return CliRunner().invoke(app, ["train", "-c", str(CONFIGS_TINY), "--data-root", str(data),
                                    "--out-dir", str(out), "--phase", "backbone", "-q",
                                    "--set", "train.samples_per_epoch=4", *extra])


@pytest.fixture
def data(tmp_path, tiny_config):
    return make_deepglobe(tmp_path / "data", tiny_config, counts=(("train", 2), ("val", 1)))


def _assert_one_clear_line(result, *needles):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.startswith("magseg: error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_train_on_a_full_disk_exits_1_and_keeps_its_checkpoints(tmp_path, data):
    run = tmp_path / "run"
    assert _train(data, run, "--epochs", "1").exit_code == 0
    with small_filesystem(tmp_path / "disk", size="16m") as disk:
        shutil.copytree(run, disk / "run")
        before = {p.name: p.read_bytes() for p in (disk / "run").iterdir() if p.is_file()}
        fill(disk, leave=64 * 1024)  # room for config.yaml and the log, not a checkpoint
        result = _train(data, disk / "run", "--epochs", "2", "--resume")
        _assert_one_clear_line(result, f"{disk / 'run' / 'last.ckpt'}: not written, the disk is full",
                               "is unchanged")
        for name in ("last.ckpt", "best.ckpt"):
            assert (disk / "run" / name).read_bytes() == before[name]
        assert load_checkpoint(disk / "run" / "last.ckpt").training["epoch"] == 1
        assert not _partials(disk / "run")


def test_train_that_cannot_write_a_checkpoint_exits_1_and_keeps_the_previous_ones(
        tmp_path, data, monkeypatch):
    real_save, calls = torch.save, []  # magseg.checkpoint imports torch where it saves

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        real_save(obj, f, *args, **kwargs)
        if len(calls) > 2:  # epoch 1 wrote last.ckpt and best.ckpt; epoch 2's write fails
            os.truncate(f, 1000)
            raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    result = _train(data, out, "--epochs", "2")
    _assert_one_clear_line(result, f"{out / 'last.ckpt'}: not written", "file write failed",
                           "is unchanged")
    assert load_checkpoint(out / "last.ckpt").training["epoch"] == 1
    assert load_checkpoint(out / "best.ckpt").meta["epoch"] == 1
    assert not _partials(out)


# ------------------------------------------------------------------------ concurrent runs
def test_an_output_that_appeared_while_predict_wrote_it_is_kept(tmp_path, ckpt, make_checkpoint,
                                                                monkeypatch):
    """Two predicts into one folder: the one that finishes second must not replace the
    first one's file, and must say so. The other run is made to finish at the worst moment
    (after this run's existence check and writing, just before it renames its file)."""
    a = write_raster(tmp_path / "a.tif", smooth_image(3, 40, 50, seed=1))
    b = write_raster(tmp_path / "b.tif", smooth_image(3, 30, 40, seed=2))
    out = tmp_path / "out"
    other = Segmenter.from_checkpoint(make_checkpoint(SMALL_SCENE, name="other.ckpt"))
    real_close, theirs, pid = RasterWriter.close, {}, os.getpid()

    def close_then_other_run_finishes(writer):
        real_close(writer)
        if writer.path.name.startswith(".a.tif.") and not theirs:
            theirs["running"] = True
            with monkeypatch.context() as other_process:  # its temporary files get its own names
                other_process.setattr(magseg.io.atomic.os, "getpid", lambda: pid + 1)
                predict_raster(other, a, out, PredictOptions())
            theirs["bytes"] = (out / "a.tif").read_bytes()

    monkeypatch.setattr(RasterWriter, "close", close_then_other_run_finishes)
    result = _predict(ckpt, a, b, "-o", out)
    assert result.exit_code == 1, result.output
    first, second = _records(result)
    assert first["status"] == "failed"
    assert "appeared while this run was writing" in first["error"] and "--overwrite" in first["error"]
    assert second["status"] == "ok"
    assert (out / "a.tif").read_bytes() == theirs["bytes"]
    assert sorted(p.name for p in out.iterdir()) == ["a.qml", "a.tif", "a.tif.aux.xml",
                                                     "b.qml", "b.tif", "b.tif.aux.xml"]


# ------------------------------------------------------------------ leftovers of killed runs
def test_a_skipping_rerun_removes_what_killed_runs_left_and_keeps_a_live_runs_files(tmp_path, ckpt):
    """After a SIGKILLed --overwrite run, a re-run that skips left the dead run's temporaries
    and scratch folder in place. Whatever the re-run decides, a dead process's leftovers go;
    a running process's files stay (it is still writing them)."""
    import socket
    import subprocess
    import sys

    a = write_raster(tmp_path / "a.tif", smooth_image(3, 40, 50, seed=1))
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    assert _predict(ckpt, a, "-o", out).exit_code == 0
    scratch.mkdir()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    try:
        host = socket.gethostname()
        leftovers = [out / f".a.tif.{dead}@{host}.partial", out / f".a_probs.tif.{dead}@{host}.partial",
                     out / f".a.tif.tiled.{dead}@{host}.partial",
                     out / f".a.fgb.{dead}@{host}.partial.fgb",
                     out / f".a.gpkg.{dead}@{host}.partial.gpkg-journal"]
        for path in leftovers:
            path.write_bytes(b"half a file")
        stage_maps = scratch / f".a.tif.scratch.{dead}@{host}.partial"
        (stage_maps / "stage0").mkdir(parents=True)
        (stage_maps / "stage0" / "chunk").write_bytes(b"x")
        running = [out / f".a.tif.{live.pid}@{host}.partial", scratch / f".a.tif.scratch.{live.pid}@{host}.partial",
                   out / f".a.tif.{dead}@otherhost.partial", out / "a.tif.notes.partial"]
        for path in running:
            path.write_bytes(b"being written")

        result = _predict(ckpt, a, "-o", out, "--scratch-dir", scratch)
        assert result.exit_code == 0 and _records(result)[0]["status"] == "skipped"
        assert not any(p.exists() for p in [*leftovers, stage_maps])
        assert all(p.exists() for p in running)
    finally:
        live.stdin.close()
        live.wait()
