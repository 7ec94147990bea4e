"""`--runner ray`: scenes on a local Ray instance with 2 workers give the local runner's outputs."""

from __future__ import annotations

import json
import sys

import magseg.cli.predict  # noqa: F401  (registers the command)
import numpy as np
import pytest
from geotiff import read_raster, smooth_image, write_raster
from magseg.cli.app import app
from typer.testing import CliRunner

pytest.importorskip("ray")

SMALL_SCENE = ["pyramid.scales=[16,32,64]", "pyramid.crop=16", "pyramid.input=32",
               "engine.precision=fp32"]


def _predict(*args):
    return CliRunner().invoke(app, ["predict", *map(str, args)])


def _records(result) -> dict[str, dict]:
    return {r["input"]: r for r in map(json.loads, result.stdout.splitlines())}


def test_ray_runner_with_two_workers_matches_the_local_runner(tmp_path, make_checkpoint):
    ckpt = make_checkpoint(SMALL_SCENE)
    inputs = [write_raster(tmp_path / f"scene{i}.tif", smooth_image(3, 40 + 30 * i, 90, seed=i))
              for i in range(3)]
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a raster at all")

    local = _predict(ckpt, *inputs, broken, "-o", tmp_path / "local", "--quiet", "--probs")
    remote = _predict(ckpt, *inputs, broken, "-o", tmp_path / "ray", "--quiet", "--probs",
                      "--runner", "ray", "--workers", "2")
    assert local.exit_code == remote.exit_code == 1, remote.stderr
    local_records, remote_records = _records(local), _records(remote)
    assert set(local_records) == set(remote_records) == {str(p) for p in [*inputs, broken]}
    assert remote_records[str(broken)]["status"] == "failed"
    assert "broken.tif" in remote_records[str(broken)]["error"]
    for path in inputs:
        a, b = local_records[str(path)], remote_records[str(path)]
        assert a["status"] == b["status"] == "ok"
        assert a["histogram"] == b["histogram"] and (a["width"], a["height"]) == (b["width"], b["height"])
        for name in (f"{path.stem}.tif", f"{path.stem}_probs.tif"):
            ours, meta = read_raster(tmp_path / "local" / name)
            theirs, meta_ray = read_raster(tmp_path / "ray" / name)
            assert np.array_equal(ours, theirs)
            assert meta["crs"] == meta_ray["crs"] and meta["transform"] == meta_ray["transform"]


def test_one_raster_on_two_ray_workers_equals_the_local_run(tmp_path, make_checkpoint):
    # One raster: its stages' crop batches go to the actors (stage maps in the scratch
    # directory, which both see), the outputs are written by the driver, bit for bit the
    # local run's.
    ckpt = make_checkpoint(SMALL_SCENE + ["engine.batch_size=3"])
    raster = write_raster(tmp_path / "big.tif", smooth_image(3, 150, 170, seed=4))
    local = _predict(ckpt, raster, "-o", tmp_path / "local", "--quiet", "--probs", "--uncertainty")
    remote = _predict(ckpt, raster, "-o", tmp_path / "ray", "--quiet", "--probs", "--uncertainty",
                      "--runner", "ray", "--workers", "2", "--scratch-dir", tmp_path / "scratch")
    assert local.exit_code == remote.exit_code == 0, remote.stderr
    (a,), (b,) = _records(local).values(), _records(remote).values()
    assert a["status"] == b["status"] == "ok"
    assert a["crops"] == b["crops"] > 20 and 0 < a["scratch_bytes"]
    # The workers also share the blending stages' backbone answers on disk (magseg.engine.blend),
    # which the local run keeps in memory a few rows at a time.
    assert b["scratch_bytes"] > a["scratch_bytes"]
    assert a["histogram"] == b["histogram"]
    for name in ("big.tif", "big_probs.tif", "big_uncertainty.tif"):
        ours, meta = read_raster(tmp_path / "local" / name)
        theirs, meta_ray = read_raster(tmp_path / "ray" / name)
        assert np.array_equal(ours, theirs), name
        assert meta["transform"] == meta_ray["transform"]
    assert list((tmp_path / "scratch").iterdir()) == []  # the stage maps are gone


def test_without_ray_the_command_says_how_to_install_it(tmp_path, make_checkpoint, monkeypatch):
    ckpt = make_checkpoint(SMALL_SCENE)
    image = write_raster(tmp_path / "a.tif", smooth_image(3, 20, 20, seed=0))
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    result = _predict(ckpt, image, "-o", tmp_path / "out", "--runner", "ray")
    assert result.exit_code == 1
    assert "pip install 'magseg[ray]'" in result.stderr
    assert not (tmp_path / "out" / "a.tif").exists()


def test_ray_benchmark_sums_the_same_confusion_matrices_as_the_local_run(tmp_path, make_checkpoint):
    import cv2
    from magseg.cli.app import _register

    from synthetic import DEEPGLOBE_CLASSES_OVERRIDE, SceneSpec, write_dataset

    _register()
    ckpt = make_checkpoint(DEEPGLOBE_CLASSES_OVERRIDE, name="dg.ckpt")
    data = tmp_path / "data"
    write_dataset(data, {"train": 1, "test": 4}, SceneSpec(size=(128, 128)), seed=3)
    # A mask with a colour no class has: that image fails, the others are still scored.
    mask = cv2.imread(str(data / "000004_mask.png"))
    mask[:4, :4] = (0, 0, 200)  # BGR of RGB (200, 0, 0): red is no class's colour
    cv2.imwrite(str(data / "000004_mask.png"), mask)

    def bench(out, *extra):
        result = CliRunner().invoke(app, ["benchmark", str(ckpt), "--data-root", str(data), "--out-dir", str(out),
                                          "--no-warmup", "--quiet", *extra])
        return result, json.loads((out / "report.json").read_text())

    local, local_report = bench(tmp_path / "local")
    remote, remote_report = bench(tmp_path / "ray", "--runner", "ray", "--workers", "2")
    assert local.exit_code == remote.exit_code == 1, remote.stderr
    assert [f["id"] for f in remote_report["failed"]] == ["000004"]
    assert "000004_mask.png" in remote_report["failed"][0]["error"]
    for name, method in local_report["methods"].items():
        theirs = remote_report["methods"][name]
        assert theirs["confusion_matrix"] == method["confusion_matrix"]
        assert theirs["miou"] == method["miou"] and theirs["images"] == method["images"] == 3


def test_quiet_keeps_rays_own_lines_off_stderr(tmp_path, make_checkpoint):
    # --quiet silences stderr, Ray's start-up warnings (its token authentication's) included.
    # They reach the process's real stderr, not CliRunner's: the command runs on its own.
    import subprocess

    ckpt = make_checkpoint(SMALL_SCENE)
    scene = write_raster(tmp_path / "scene.tif", smooth_image(3, 40, 60, seed=0))
    done = subprocess.run([sys.executable, "-m", "magseg.cli.app", "predict", str(ckpt), str(scene),
                           "-o", str(tmp_path / "out"), "--quiet", "--runner", "ray", "--workers", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert json.loads(done.stdout)["status"] == "ok"


def test_actors_that_cannot_build_the_model_say_why_for_every_task(tmp_path, make_checkpoint):
    # A machine whose graph cache lacks the int8 graph: its actors cannot build the model.
    # Each task must end with that reason (not Ray's traceback of a dead actor, nor its
    # colour codes), and the run must end.
    pytest.importorskip("openvino")
    from magseg.run.pools import ScenePool

    ckpt = make_checkpoint(SMALL_SCENE)
    overrides = ["engine.runtime=openvino", "engine.precision=int8", f"engine.cache_dir={tmp_path / 'empty'}"]
    with ScenePool(ckpt.read_bytes(), str(ckpt), overrides, workers=2, quiet=True) as pool:
        # getattr: any function the actors can import; it is never called here.
        results = dict(pool.map_unordered(getattr, [("num_classes",)] * 5, lambda task, reason: reason))
    assert sorted(results) == list(range(5))
    for reason in results.values():
        assert reason.startswith("no Ray worker could load the model: engine.precision=int8 needs"), reason
        assert "magseg quantize" in reason and "\x1b" not in reason
