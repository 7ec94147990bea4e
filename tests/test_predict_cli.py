"""`magseg predict` from the shell's side: outputs read back, NDJSON on stdout, exit codes,
and every kind of bad input (named in the message, the rest of the batch still done)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import cv2
import magseg.cli.predict  # noqa: F401  (registers the command)
import numpy as np
import pytest
import rasterio
from geotiff import TRANSFORM, UTM33, read_raster, smooth_image, write_raster
from magseg.cli.app import app
from rasterio.errors import NotGeoreferencedWarning
from typer.testing import CliRunner

from magseg.io.raster import BLOCK, NODATA

SMALL_SCENE = ["pyramid.scales=[16,32,64]", "pyramid.crop=16", "pyramid.input=32"]
# A 256 px scene (for rasters big enough to get COG overviews without hundreds of windows).
LARGE_SCENE = ["--set", "pyramid.scales=[64,128,256]", "--set", "pyramid.crop=64",
               "--set", "pyramid.input=64"]
TINY_COLOURS = {0: (0, 0, 0), 1: (255, 255, 0), 2: (255, 255, 255), 3: (0, 0, 255)}


@pytest.fixture
def ckpt(make_checkpoint):
    return make_checkpoint(SMALL_SCENE)


def _predict(*args, stdin=None):
    return CliRunner().invoke(app, ["predict", *map(str, args)], input=stdin)


def _records(result):
    lines = result.stdout.splitlines()
    return [json.loads(line) for line in lines]


def test_outputs_are_georeferenced_like_the_input_and_described_in_ndjson(tmp_path, ckpt):
    image = smooth_image(3, 150, 170, seed=1)
    image[:, :, :5] = 0                                     # padding -> nodata (--nodata 0)
    big = write_raster(tmp_path / "big.tif", image)
    small = write_raster(tmp_path / "small.tif", smooth_image(3, 30, 40, seed=2))
    out = tmp_path / "out"
    result = _predict(ckpt, big, small, "--out-dir", out, "--probs", "--uncertainty", "--preview",
                      "--nodata", "0")
    assert result.exit_code == 0, result.output
    records = _records(result)
    assert [r["input"] for r in records] == [str(big), str(small)]
    for record, (h, w) in zip(records, [(150, 170), (30, 40)]):
        assert record["status"] == "ok" and record["error"] is None and record["warnings"] == []
        assert (record["height"], record["width"]) == (h, w) and record["seconds"] > 0
        assert sum(record["histogram"].values()) == h * w
        assert set(record["histogram"]) == {"unknown", "field", "road", "water", "nodata"}
        labels, profile = read_raster(record["output"])
        assert profile["crs"] == UTM33 and profile["transform"] == TRANSFORM
        assert (profile["height"], profile["width"], profile["count"]) == (h, w, 1)
        assert profile["dtype"] == "uint8" and profile["nodata"] == NODATA
        assert profile["tiled"] and profile["blockxsize"] == BLOCK and profile["compress"] == "deflate"
        for cid, colour in TINY_COLOURS.items():
            assert profile["colormap"][cid] == (*colour, 255)
        classes = json.loads(profile["tags"]["MAGSEG_CLASSES"])
        assert [c["name"] for c in classes] == ["unknown", "field", "road", "water"]
        counts = np.bincount(labels.ravel(), minlength=256)
        assert record["histogram"]["nodata"] == counts[NODATA]
        assert record["histogram"]["road"] == counts[2]
        for extra in ("probs", "uncertainty"):
            _, p = read_raster(record["outputs"][extra])
            assert p["crs"] == UTM33 and p["transform"] == TRANSFORM and (p["height"], p["width"]) == (h, w)
    assert records[0]["histogram"]["nodata"] == 150 * 5
    assert records[0]["windows"] == records[1]["windows"] == 1
    assert records[0]["crops"] > records[1]["crops"] > 0

    preview = cv2.imread(records[0]["outputs"]["preview"])
    assert preview is not None and preview.shape[1] > 2 * preview.shape[0] // 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}{x}" for s in ("big", "small")
        for x in (".tif", ".tif.aux.xml", ".qml", "_probs.tif", "_uncertainty.tif", "_preview.png"))


def test_preview_of_a_large_raster_is_downsampled(tmp_path, ckpt):
    path = write_raster(tmp_path / "wide.tif", smooth_image(3, 300, 1400, seed=3))
    result = _predict(ckpt, path, "-o", tmp_path / "out", "--preview", *LARGE_SCENE)
    assert result.exit_code == 0, result.output
    preview = cv2.imread(str(tmp_path / "out" / "wide_preview.png"))
    # panels of 1400 / 3 = 467 px (at most 512), stacked (the raster is over twice as wide as
    # high), plus margins
    assert 400 <= preview.shape[1] <= 512 + 100 and preview.shape[0] <= 700


def test_paths_from_stdin_directories_and_globs(tmp_path, ckpt):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b", "c"):
        write_raster(folder / f"{name}.tif", smooth_image(3, 20, 20, seed=len(name)))
    (folder / "notes.txt").write_text("not an input")
    stdin = f"{folder / 'a.tif'}\n\n# a comment\n{folder / 'b.tif'}\n"
    result = _predict(ckpt, "-", "-o", tmp_path / "out1", stdin=stdin)
    assert result.exit_code == 0, result.output
    assert [Path(r["input"]).name for r in _records(result)] == ["a.tif", "b.tif"]
    result = _predict(ckpt, folder, str(folder / "[ab].tif"), "-o", tmp_path / "out2")
    assert result.exit_code == 0, result.output
    assert [Path(r["input"]).name for r in _records(result)] == ["a.tif", "b.tif", "c.tif"]


def test_cog_outputs_have_overviews(tmp_path, ckpt):
    path = write_raster(tmp_path / "s.tif", smooth_image(3, 540, 600, seed=4))
    result = _predict(ckpt, path, "-o", tmp_path / "out", "--cog", "--uncertainty", *LARGE_SCENE)
    assert result.exit_code == 0, result.output
    for name in ("s.tif", "s_uncertainty.tif"):
        data, profile = read_raster(tmp_path / "out" / name)
        assert profile["layout"].get("LAYOUT") == "COG" and profile["overviews"] == [2]
        assert profile["crs"] == UTM33 and data.shape[1:] == (540, 600)
    labels, lprofile = read_raster(tmp_path / "out" / "s.tif")
    np.testing.assert_array_equal(profile["masks"][0] > 0, labels[0] != NODATA)
    assert lprofile["colormap"][3] == (0, 0, 255, 255)
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []


def _gcps():
    from rasterio.control import GroundControlPoint

    return [GroundControlPoint(row, col, 10.0 + col * 1e-4, 50.0 - row * 1e-4, 120.0)
            for row in (0, 40) for col in (0, 50)]


def _rpcs():
    from rasterio.rpc import RPC

    unit = [1.0] + [0.0] * 19
    return RPC(height_off=120.0, height_scale=50.0, lat_off=50.0, lat_scale=0.01,
               long_off=10.0, long_scale=0.01, line_off=20.0, line_scale=20.0, samp_off=25.0,
               samp_scale=25.0, line_num_coeff=[0.0, 0.0, -1.0] + [0.0] * 17,
               line_den_coeff=unit, samp_num_coeff=[0.0, 1.0] + [0.0] * 18, samp_den_coeff=unit)


@pytest.mark.parametrize("cog", [False, True])
def test_ground_control_points_and_rpcs_are_kept(tmp_path, ckpt, cog):
    """Scenes that are not orthorectified are located by GCPs or RPCs, not by a transform:
    the outputs (class map and extras, plain or COG) carry the same ones."""
    image = smooth_image(3, 40, 50, seed=6)
    gcp_path = write_raster(tmp_path / "gcp.tif", image, crs="EPSG:4326", transform=None,
                            gcps=_gcps())
    rpc_path = write_raster(tmp_path / "rpc.tif", image, crs=None, transform=None, rpcs=_rpcs())
    with rasterio.open(rpc_path) as src:
        rpcs = src.rpcs.to_dict()          # as GDAL stores them (unset error terms are -1)
    out = tmp_path / "out"
    result = _predict(ckpt, gcp_path, rpc_path, "-o", out, "--uncertainty", *(["--cog"] if cog else []))
    assert result.exit_code == 0, result.output
    for name in ("gcp.tif", "gcp_uncertainty.tif", "rpc.tif", "rpc_uncertainty.tif"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(out / name) as dst:
                gcps, gcp_crs = dst.gcps
                assert dst.transform.is_identity
                if name.startswith("gcp"):
                    assert gcp_crs == "EPSG:4326" and dst.rpcs is None
                    assert [(g.row, g.col, g.x, g.y, g.z) for g in gcps] == [
                        (g.row, g.col, g.x, g.y, g.z) for g in _gcps()]
                else:
                    assert gcps == [] and dst.rpcs.to_dict() == rpcs


@pytest.mark.parametrize("driver, suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("JP2OpenJPEG", ".jp2")])
def test_png_jpeg_and_jpeg2000_inputs(tmp_path, ckpt, driver, suffix):
    with rasterio.Env() as env:
        if driver not in env.drivers():
            pytest.skip(f"GDAL in this rasterio wheel has no {driver} driver")
    georef = driver == "JP2OpenJPEG"   # JPEG2000 carries a georeference (GeoJP2/GMLJP2)
    image = smooth_image(3, 70, 90, seed=5)
    extra = {"QUALITY": "100", "REVERSIBLE": "YES"} if georef else {}
    path = write_raster(tmp_path / f"img{suffix}", image, driver=driver,
                        crs=UTM33 if georef else None, transform=TRANSFORM if georef else None, **extra)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _predict(ckpt, path, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert not [w for w in caught if issubclass(w.category, NotGeoreferencedWarning)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels, profile = read_raster(tmp_path / "out" / "img.tif")
    assert labels.shape == (1, 70, 90) and labels.dtype == np.uint8
    if georef:
        assert profile["crs"] == UTM33 and profile["transform"] == TRANSFORM
    else:
        # no CRS, and no made-up geotransform either
        assert profile["crs"] is None and profile["transform"].is_identity


# ------------------------------------------------------------------------------------------
# Bad input: each makes its own input fail (exit 1) and the rest of the batch still runs.

def _truncated(tmp_path):
    path = write_raster(tmp_path / "bad.tif", smooth_image(3, 200, 200, seed=6), tiled=True,
                        compress="deflate")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def _corrupt(tmp_path):
    path = write_raster(tmp_path / "bad.tif", smooth_image(3, 200, 200, seed=7), tiled=True,
                        compress="deflate")
    data = bytearray(path.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)   # tiles zeroed
    path.write_bytes(bytes(data))
    return path


def _text(tmp_path):
    (tmp_path / "bad.tif").write_text("hello, I am not a GeoTIFF")
    return tmp_path / "bad.tif"


def _empty(tmp_path):
    (tmp_path / "bad.tif").write_bytes(b"")
    return tmp_path / "bad.tif"


BAD_INPUTS = {
    "not a raster": (_text, "not a readable raster"),
    "truncated": (_truncated, "truncated or corrupt"),
    "corrupt": (_corrupt, "truncated or corrupt"),
    "zero-size": (_empty, "empty file"),
    "missing": (lambda p: p / "bad.tif", "no such file"),
    "wrong band count": (lambda p: write_raster(p / "bad.tif", smooth_image(2, 30, 30)), "--bands"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_a_bad_input_fails_alone(tmp_path, ckpt, kind):
    make, message = BAD_INPUTS[kind]
    bad = make(tmp_path)
    good = write_raster(tmp_path / "good.tif", smooth_image(3, 40, 40, seed=8))
    out = tmp_path / "out"
    result = _predict(ckpt, bad, good, "-o", out)
    assert result.exit_code == 1, result.output
    first, second = _records(result)
    assert first["status"] == "failed" and "bad.tif" in first["error"] and message in first["error"]
    assert second["status"] == "ok" and (out / "good.tif").exists()
    assert "bad.tif" in result.stderr and "1 of 2 input(s) failed" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["good.qml", "good.tif", "good.tif.aux.xml"]  # nothing half-written


def test_pixels_on_another_scale_are_segmented_with_a_warning(tmp_path, ckpt):
    # uint16 reflectance-like values (x 40) for a model whose statistics are 8-bit ones
    # (mean 127.5, std 64: scale 191.5): the outputs are made, and the record says why they
    # are suspect, band by band, with the fix.
    image = smooth_image(3, 50, 60, seed=9)
    image[1] //= 3                                   # band 2 darker: a smaller ratio
    wide = write_raster(tmp_path / "wide.tif", image.astype(np.uint16) * 40)
    out = tmp_path / "out"
    result = _predict(ckpt, wide, "-o", out)
    assert result.exit_code == 0, result.output
    (record,) = _records(result)
    assert record["status"] == "ok" and (out / "wide.tif").exists()
    (warning,) = record["warnings"]
    assert warning.startswith(f"{wide}: pixel values on another scale") and "--bands" in warning
    for band in (1, 2, 3):
        values = image[band - 1].astype(np.float64) * 40
        ratio = (values.mean() + values.std()) / (127.5 + 64)
        assert ratio > 8 and f"band {band} mean {values.mean():.4g} " in warning
        assert f"{ratio:.3g} times training's (mean 127.5 std 64)" in warning
    # said once, at once: before the input's result line
    assert result.stderr.count(f"warning: {warning}") == 1
    assert result.stderr.index(f"warning: {warning}") < result.stderr.index("[1/1]")


def test_missing_checkpoint_is_a_usage_error(tmp_path):
    path = write_raster(tmp_path / "a.tif", smooth_image(3, 20, 20))
    result = _predict(tmp_path / "nope.ckpt", path, "-o", tmp_path / "out")
    assert result.exit_code == 2 and result.stdout == ""
    assert "nope.ckpt" in result.stderr and "does not exist" in result.stderr


def test_corrupt_checkpoint_is_a_usage_error(tmp_path, ckpt):
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    path = write_raster(tmp_path / "a.tif", smooth_image(3, 20, 20))
    result = _predict(ckpt, path, "-o", tmp_path / "out")
    assert result.exit_code == 2 and result.stdout == "" and str(ckpt) in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--bands", "1,x"], "comma-separated"),
    (["--bands", "0,1,2"], "numbered from 1"),
    (["--bands", "1,2"], "takes 3"),
    (["--batch-size", "0"], "batch-size"),
])
def test_usage_errors_exit_2(tmp_path, ckpt, args, message):
    path = write_raster(tmp_path / "a.tif", smooth_image(3, 20, 20))
    result = _predict(ckpt, path, "-o", tmp_path / "out", *args)
    assert result.exit_code == 2 and result.stdout == ""
    assert message in result.stderr, result.stderr


def test_glob_matching_nothing_is_a_usage_error(tmp_path, ckpt):
    result = _predict(ckpt, str(tmp_path / "*.tif"), "-o", tmp_path / "out")
    assert result.exit_code == 2 and "no file matches" in result.stderr


def test_existing_output_is_skipped_unless_overwrite(tmp_path, ckpt):
    path = write_raster(tmp_path / "a.tif", smooth_image(3, 30, 30))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.tif").write_bytes(b"precious")
    result = _predict(ckpt, path, "-o", out)  # not magseg's output: in the way, kept
    assert result.exit_code == 1
    (record,) = _records(result)
    assert record["status"] == "failed" and "is in the way" in record["error"]
    assert (out / "a.tif").read_bytes() == b"precious"
    result = _predict(ckpt, path, "-o", out, "--overwrite")
    assert result.exit_code == 0 and _records(result)[0]["status"] == "ok"
    assert read_raster(out / "a.tif")[0].shape == (1, 30, 30)
    result = _predict(ckpt, path, "-o", out)  # this model's output: skipped
    assert result.exit_code == 0 and _records(result)[0]["status"] == "skipped"
    assert "--overwrite" in result.stderr


def test_two_inputs_with_the_same_name_do_not_overwrite_each_other(tmp_path, ckpt):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = write_raster(tmp_path / "x" / "s.tif", smooth_image(3, 20, 20, seed=1))
    b = write_raster(tmp_path / "y" / "s.tif", smooth_image(3, 20, 20, seed=2))
    result = _predict(ckpt, a, b, "-o", tmp_path / "out", "--overwrite")
    assert result.exit_code == 1
    first, second = _records(result)
    assert first["status"] == "ok" and second["status"] == "failed" and "same file name" in second["error"]


def _cli(*args):
    return [sys.executable, "-m", "magseg.cli.app", "predict", *map(str, args)]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _predict_as_nobody(*args):
    """Run the command in a forked child that has dropped root (uid/gid 65534), so that file
    permissions apply to it. Returns ``(exit code, stdout, stderr)``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(read_end)
            signal.alarm(120)
            os.setgid(65534)
            os.setgroups([])
            os.setuid(65534)
            result = _predict(*args)
            payload = [result.exit_code, result.stdout, result.stderr + repr(result.exception)]
        except BaseException as exc:  # noqa: BLE001
            payload = [-1, "", repr(exc)]
        os.write(write_end, json.dumps(payload).encode())
        os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 1 << 16):
        data += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    return tuple(json.loads(data))


def test_read_only_output_directory_is_a_usage_error(tmp_path, ckpt):
    base = Path(tempfile.mkdtemp())   # reachable by 'nobody' (tmp_path's parents are not)
    try:
        base.chmod(0o755)
        image = write_raster(base / "a.tif", smooth_image(3, 20, 20))
        ckpt = shutil.copy(ckpt, base / "model.ckpt")
        out = base / "ro"
        out.mkdir(mode=0o555)
        if os.geteuid() == 0:
            # root writes through chmod: drop to 'nobody' so that permissions really are
            # what stops the command.
            code, stdout, stderr = _predict_as_nobody(ckpt, image, "-o", out)
        else:
            result = _predict(ckpt, image, "-o", out)
            code, stdout, stderr = result.exit_code, result.stdout, result.stderr
        assert list(out.iterdir()) == []
    finally:
        shutil.rmtree(base)
    assert code == 2, stderr
    assert stdout == "" and "not writable" in stderr and str(out) in stderr


def _signal_mid_write(ckpt, path, out, sig):
    """Run predict in a subprocess parked before its second window (tests/parked_predict.py),
    send ``sig`` once it says it is there; returns its exit code. Nothing here depends on how
    fast the machine is: the run waits for the signal, and the test for the run."""
    ready, ready_w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("parked_predict.py")), str(ready_w),
         "predict", *map(str, (ckpt, path, "-o", out, "--probs"))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), pass_fds=(ready_w,))
    os.close(ready_w)
    try:
        with os.fdopen(ready, "rb") as parked:
            # b"" means the run ended (or crashed) without reaching its second window.
            assert parked.read(1) == b"!", proc.communicate()
        assert any(p.suffix == ".partial" for p in out.iterdir())
        proc.send_signal(sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_killed_run_leaves_no_finished_looking_output_and_a_rerun_completes(tmp_path, ckpt):
    path = write_raster(tmp_path / "big.tif", smooth_image(3, 150, 170, seed=9))
    out = tmp_path / "out"
    assert _signal_mid_write(ckpt, path, out, signal.SIGKILL) == -signal.SIGKILL
    names = sorted(p.name for p in out.iterdir())
    assert "big.tif" not in names and "big_probs.tif" not in names
    assert names and all(n.startswith(".big") and n.endswith(".partial") for n in names), names

    result = _predict(ckpt, path, "-o", out, "--probs")
    assert result.exit_code == 0, result.output
    # The re-run removed the killed run's temporaries (raster, probabilities, scratch).
    assert sorted(p.name for p in out.iterdir()) == ["big.qml", "big.tif", "big.tif.aux.xml", "big_probs.tif"]
    labels, profile = read_raster(out / "big.tif")
    assert labels.shape == (1, 150, 170) and profile["crs"] == UTM33
    assert (labels != NODATA).all()


def test_sigterm_removes_the_file_being_written(tmp_path, ckpt):
    path = write_raster(tmp_path / "big.tif", smooth_image(3, 150, 170, seed=9))
    out = tmp_path / "out"
    assert _signal_mid_write(ckpt, path, out, signal.SIGTERM) == 130
    assert list(out.iterdir()) == []


def test_help_has_examples():
    result = CliRunner().invoke(app, ["predict", "--help"])
    assert result.exit_code == 0
    assert "Examples" in result.stdout and "--out-dir" in result.stdout and "| jq" in result.stdout


def test_scratch_dir_reaches_the_predict_options(tmp_path, ckpt, monkeypatch):
    import magseg.run.predict as predict_module

    seen = []
    real = predict_module.predict_input

    def spy(segmenter, path, out_dir, options, *args, **kwargs):
        seen.append(options.scratch_dir)
        return real(segmenter, path, out_dir, options, *args, **kwargs)

    monkeypatch.setattr(predict_module, "predict_input", spy)
    path = write_raster(tmp_path / "a.tif", smooth_image(3, 40, 50))
    result = _predict(ckpt, path, "-o", tmp_path / "out", "--scratch-dir", tmp_path / "scratch")
    assert result.exit_code == 0, result.output
    assert seen == [tmp_path / "scratch"] and (tmp_path / "out" / "a.tif").is_file()

    (tmp_path / "a_file").write_text("x")
    result = _predict(ckpt, path, "-o", tmp_path / "out2", "--scratch-dir", tmp_path / "a_file")
    assert result.exit_code == 2 and "--scratch-dir" in result.stderr
    assert not (tmp_path / "out2").exists()


def test_a_file_name_that_is_not_utf8_works_and_its_record_is_json(tmp_path, ckpt):
    """A valid raster named with bytes that are not UTF-8 failed with UnicodeEncodeError
    (rasterio encodes names as UTF-8). Every output is written, and the record is JSON
    whose names give the file's bytes back (os.fsencode)."""
    source = write_raster(tmp_path / "src.tif", smooth_image(3, 40, 50, seed=3))
    name = os.fsdecode(b"sc\xe8ne\xff.tif")
    path = tmp_path / name
    source.rename(path)
    out = tmp_path / "out"
    result = _predict(ckpt, path, "-o", out, "--probs", "--preview", "--vector", "gpkg", "--cog")
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in result.stdout.encode("ascii").splitlines()]
    assert record["status"] == "ok" and record["input"] == str(path)
    assert os.fsencode(record["output"]) == os.fsencode(out / name)
    stem = os.fsencode(name)[:-4]
    made = sorted(os.fsencode(p.name) for p in out.iterdir())
    assert made == sorted(stem + s for s in (b".gpkg", b".qml", b".tif", b".tif.aux.xml", b"_preview.png",
                                             b"_probs.tif"))
    from magseg.io.sources import gdal_path

    with gdal_path(out / name) as readable:  # rasterio itself cannot open such a name
        assert read_raster(readable)[0].shape == (1, 40, 50)
    again = _predict(ckpt, path, "-o", out, "--probs", "--preview", "--vector", "gpkg", "--cog")
    assert json.loads(again.stdout)["status"] == "skipped", again.output


def test_a_raster_without_georeference_gets_one_warning_in_its_record(tmp_path, ckpt):
    """No CRS, transform, GCPs or RPCs: the record had no warning, and rasterio and pyogrio
    printed their own lines on stderr instead. One warning, in the record and on stderr."""
    path = tmp_path / "plain.png"
    cv2.imwrite(str(path), smooth_image(3, 40, 50, seed=1).transpose(1, 2, 0))
    result = _predict(ckpt, path, "-o", tmp_path / "out", "--probs", "--vector", "gpkg", "--cog")
    assert result.exit_code == 0, result.output
    (record,) = _records(result)
    (warning,) = record["warnings"]
    assert warning.startswith(f"{path}: has no georeference") and "pixel coordinates" in warning
    assert [line for line in result.stderr.splitlines() if not line.startswith("magseg: ")] == []
    assert result.stderr.count("has no georeference") == 1
    # A georeferenced raster gets none.
    geo = write_raster(tmp_path / "geo.tif", smooth_image(3, 40, 50, seed=1))
    assert _records(_predict(ckpt, geo, "-o", tmp_path / "out"))[0]["warnings"] == []
