"""Usage errors (exit 2) are found before anything is created, say what is wrong in one line,
and a checkpoint that is not the one `magseg train` wrote is never run: a damaged file (one
byte flipped, 4 KiB overwritten, cut short), a file of another kind (a raster, random bytes,
a raw pickle, a directory), a refiner promised and absent. What needs no torch (the path,
the file's kind and CRCs, ``--set`` syntax) is refused before torch is imported (see
docs/reliability.md#usage-errors-create-nothing)."""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from geotiff import smooth_image, write_raster
from test_bad_input import _invoke, _mismatched, _one_error_line
from test_datasets import CONFIGS_TINY, geotiff_config, make_deepglobe, make_geotiff

from magseg.checkpoint import (
    check_checkpoint_file,
    checkpoint_from_bytes,
    load_checkpoint,
    run_config,
    save_checkpoint,
)
from magseg.config import load_config, parse_overrides
from magseg.data.scenes import check_scene, list_scenes
from magseg.errors import CheckpointError, ConfigError, DataError
from magseg.io.provenance import config_sha256
from magseg.segmenter import Segmenter, create_segmenter_model


@pytest.fixture
def data(tmp_path, tiny_config):
    return make_deepglobe(tmp_path / "data", tiny_config,
                          counts=(("train", 2), ("val", 1), ("test", 1)))


@pytest.fixture
def raster(tmp_path):
    return write_raster(tmp_path / "a.tif", smooth_image(3, 20, 20))


def _predict(ckpt, raster, out, *extra):
    return _invoke(["predict", ckpt, raster, "-o", out, "-q", *extra])


def _benchmark(ckpt, data, out, *extra):
    return _invoke(["benchmark", ckpt, "--data-root", data, "-o", out, "--no-warmup", "--samples", "0", "-q", *extra])


def _train(data, out, *extra):
    return _invoke(["train", "-c", CONFIGS_TINY, "--data-root", data, "-o", out, "--epochs", "1",
                    "-q", "--set", "train.samples_per_epoch=4", *extra])


# ------------------------------------------------------------------------------------------
# Damaged checkpoints: every zip entry's CRC-32 is checked before any of it is used.

def _entry_span(path: Path, data_pkl: bool) -> tuple[int, int, str]:
    """``(offset, size, name)`` of the stored bytes of data.pkl, or of the largest tensor."""
    with zipfile.ZipFile(path) as archive:
        entries = [e for e in archive.infolist() if e.filename.endswith("/data.pkl") == data_pkl]
        entry = max(entries, key=lambda e: e.file_size)
    with open(path, "rb") as file:
        file.seek(entry.header_offset + 26)  # the local header's name and extra lengths
        name_length, extra_length = struct.unpack("<HH", file.read(4))
    return entry.header_offset + 30 + name_length + extra_length, entry.file_size, entry.filename


def _flip_byte(path: Path, data_pkl: bool = False) -> str:
    offset, size, name = _entry_span(path, data_pkl)
    data = bytearray(path.read_bytes())
    data[offset + size // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return name


def _overwrite_4k(path: Path) -> str:
    offset, size, name = _entry_span(path, data_pkl=False)
    assert size > 8192
    data = bytearray(path.read_bytes())
    data[offset + 4096:offset + 8192] = bytes(range(256)) * 16
    path.write_bytes(bytes(data))
    return name


DAMAGE = {
    "one byte of a tensor flipped": (_flip_byte, "fails its CRC-32 check"),
    "4 KiB of a tensor overwritten": (_overwrite_4k, "fails its CRC-32 check"),
    "one byte of data.pkl flipped": (lambda p: _flip_byte(p, data_pkl=True), "fails its CRC-32 check"),
    "cut short": (lambda p: _cut(p), "it is cut short"),
}


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


@pytest.fixture
def damaged(make_checkpoint, request):
    damage, message = DAMAGE[request.param]
    path = make_checkpoint(name="bad.ckpt")
    name = damage(path)
    if name is not None:  # zipfile's own check names the entry the message names
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() == name
        message = f"its entry {name.partition('/')[2]!r} {message}"
    return path, message


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_a_damaged_checkpoint_is_refused_by_the_library(damaged):
    path, message = damaged
    for load in (lambda: load_checkpoint(path), lambda: checkpoint_from_bytes(path.read_bytes(), path),
                 lambda: check_checkpoint_file(path)):
        with pytest.raises(CheckpointError, match=f"checkpoint {path} is damaged: ") as caught:
            load()
        assert message in str(caught.value)


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
@pytest.mark.parametrize("command", ["predict", "benchmark"])
def test_a_damaged_checkpoint_is_exit_2_naming_the_file(tmp_path, damaged, data, raster, command):
    path, message = damaged
    out = tmp_path / "out" / "sub"
    result = _predict(path, raster, out) if command == "predict" else _benchmark(path, data, out)
    _one_error_line(result, 2, f"checkpoint {path} is damaged", message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["predict", "benchmark"])
def test_the_cli_reads_a_checkpoints_crcs_once(tmp_path, make_checkpoint, data, raster, command, monkeypatch):
    # The CLI checks the file before it imports torch, then loads it with checked=True: one
    # pass over the whole file for its CRCs, not two. The library's load checks by itself.
    import magseg.checkpoint as checkpoint_module

    path = make_checkpoint(name="m.ckpt")
    calls = []
    check = checkpoint_module.check_checkpoint_file

    def counted(p):
        calls.append(Path(p))
        return check(p)

    monkeypatch.setattr(checkpoint_module, "check_checkpoint_file", counted)
    out = tmp_path / "out"
    result = _predict(path, raster, out) if command == "predict" else _benchmark(path, data, out)
    assert result.exit_code == 0, result.output
    assert calls == [path]
    calls.clear()
    assert load_checkpoint(path).config == load_checkpoint(path, checked=True).config
    assert calls == [path]


def test_every_one_bit_change_is_refused_or_loads_the_same_checkpoint(tmp_path, tiny_config):
    """Exhaustive over a small checkpoint (about 4 KiB): a bit flipped anywhere (weights,
    pickled structure, zip headers and directory) is refused, or it is in bytes that hold no
    data (padding, dates) and what loads is exactly what was saved."""
    from torch import nn

    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "small.ckpt", tiny_config, nn.Linear(3, 2), nn.Conv2d(2, 2, 1),
                           meta={"phase": "refiner", "epoch": 1})
    data = path.read_bytes()
    saved = checkpoint_from_bytes(data, path)
    refused = 0
    for offset in range(len(data)):
        changed = bytearray(data)
        changed[offset] ^= 0x01
        try:
            loaded = checkpoint_from_bytes(bytes(changed), path)
        except CheckpointError:
            refused += 1
            continue
        assert (loaded.config, loaded.meta, loaded.training) == (saved.config, saved.meta, saved.training)
        for got, want in ((loaded.backbone, saved.backbone), (loaded.refiner, saved.refiner)):
            assert got.keys() == want.keys(), offset
            assert all(torch.equal(got[k], want[k]) for k in want), offset
    assert refused > len(data) // 2  # most bytes are data, the names and the directory


def test_an_intact_checkpoint_passes_and_its_bytes_load_the_same(make_checkpoint):
    path = make_checkpoint()
    check_checkpoint_file(path)
    a, b = load_checkpoint(path), checkpoint_from_bytes(path.read_bytes(), path)
    assert a.backbone.keys() == b.backbone.keys()
    assert all(torch.equal(a.backbone[k], b.backbone[k]) for k in a.backbone)


# ------------------------------------------------------------------------------------------
# A refiner promised (refiner.enabled: true) but not in the file.

def _without_refiner(path: Path, config, **kwargs) -> Path:
    return save_checkpoint(path, config, create_segmenter_model(config), None, **kwargs)


def test_a_refiner_promised_and_absent_is_refused(tmp_path, tiny_config):
    assert tiny_config.refiner.enabled
    ckpt = load_checkpoint(_without_refiner(tmp_path / "r.ckpt", tiny_config))
    assert ckpt.config.refiner.enabled and ckpt.warnings == []
    with pytest.raises(CheckpointError, match="holds no refiner weights, but its config enables"):
        Segmenter.from_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="--set refiner.enabled=false"):
        run_config(ckpt, ["engine.batch_size=2"])
    alone = Segmenter.from_checkpoint(ckpt, ["refiner.enabled=false"])
    assert alone.refiner is None and not alone.config.refiner.enabled


@pytest.mark.parametrize("command", ["predict", "benchmark"])
def test_a_refiner_promised_and_absent_is_exit_2(tmp_path, tiny_config, data, raster, command):
    path = _without_refiner(tmp_path / "r.ckpt", tiny_config)
    out = tmp_path / "out"
    result = _predict(path, raster, out) if command == "predict" else _benchmark(path, data, out)
    _one_error_line(result, 2, f"checkpoint {path} holds no refiner weights",
                    "--set refiner.enabled=false")
    assert not out.exists()
    args = ["--set", "refiner.enabled=false"]
    result = _predict(path, raster, out, *args) if command == "predict" else _benchmark(path, data, out, *args)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("where", ["meta", "training"])
def test_a_backbone_phase_checkpoint_runs_without_the_refiner_and_says_so(tmp_path, tiny_config,
                                                                          where):
    # What the backbone phase writes: the run's config (refiner.enabled: true), no refiner.
    phase = {"phase": "backbone", "epoch": 1}
    path = _without_refiner(tmp_path / "b.ckpt", tiny_config, **{where: phase})
    ckpt = load_checkpoint(path)
    assert not ckpt.config.refiner.enabled
    assert len(ckpt.warnings) == 1 and "written by the backbone phase" in ckpt.warnings[0]
    segmenter = Segmenter.from_checkpoint(ckpt)
    assert segmenter.refiner is None
    # Its digest is not that of the model with the refiner the stored config describes.
    assert config_sha256(segmenter.config) != config_sha256(tiny_config)
    assert config_sha256(segmenter.config) == config_sha256(
        tiny_config.override({"refiner.enabled": False}))
    with pytest.raises(CheckpointError, match="but --set refiner.enabled=true enables the refiner"):
        Segmenter.from_checkpoint(ckpt, ["refiner.enabled=true"])


def test_the_trainers_backbone_phase_checkpoint_predicts_with_a_warning(tmp_path, data, raster):
    out = tmp_path / "run"
    trained = _train(data, out, "--phase", "backbone")
    assert trained.exit_code == 0, trained.output
    best = out / "best.ckpt"
    result = _invoke(["predict", best, raster, "-o", tmp_path / "pred"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("magseg: warning:")]
    assert warnings == [f"magseg: warning: checkpoint {best} was written by the backbone phase and "
                        "holds no refiner weights: it segments without the refiner (read as "
                        "refiner.enabled: false); train the refiner with `magseg train --phase "
                        "refiner` for the full model"]
    refused = _predict(best, raster, tmp_path / "pred2", "--set", "refiner.enabled=true")
    _one_error_line(refused, 2, "holds no refiner weights")
    assert not (tmp_path / "pred2").exists()


# ------------------------------------------------------------------------------------------
# Exit 2 creates nothing: every check comes before the first directory or file.

def _promising(path, config):
    _without_refiner(path, config)


def _random(path, config):
    path.write_bytes(np.random.default_rng(0).bytes(5000))


USAGE = {
    "missing checkpoint": (None, [], "does not exist"),
    "random bytes as checkpoint": (_random, [], "an unknown kind of file"),
    "weights that do not fit": (_mismatched, [], "do not fit the model"),
    "refiner promised, absent": (_promising, [], "holds no refiner weights"),
    "unknown --set key": ("ok", ["--set", "engine.nope=1"], "engine.nope: unknown key"),
    "--set value not YAML": ("ok", ["--set", "engine.batch_size=[1,"], "value is not valid YAML"),
    "--set value of a wrong type": ("ok", ["--set", "engine.batch_size=abc"], "engine.batch_size"),
    "--set without =": ("ok", ["--set", "engine.batch_size"], "is not key=value"),
    "--bands not numbers": ("ok", ["--bands", "a,b"], "--bands"),
    "--bands of another count": ("ok", ["--bands", "1,2"], "--bands lists 2 band(s)"),
    "--bbox-crs unknown": ("ok", ["--bbox", "0,0,1,1", "--bbox-crs", "EPSG:999999"], "EPSG:999999"),
}


def _usage_checkpoint(tmp_path, tiny_config, make_checkpoint, kind):
    make = USAGE[kind][0]
    if make == "ok":
        return make_checkpoint()
    path = tmp_path / "model.ckpt"
    if make is not None:
        make(path, tiny_config)
    return path


@pytest.mark.parametrize("kind", list(USAGE))
def test_a_predict_usage_error_creates_nothing(tmp_path, tiny_config, make_checkpoint, raster, kind):
    ckpt = _usage_checkpoint(tmp_path, tiny_config, make_checkpoint, kind)
    out = tmp_path / "pred" / "deeper"
    _one_error_line(_predict(ckpt, raster, out, *USAGE[kind][1]), 2, USAGE[kind][2])
    assert not (tmp_path / "pred").exists()


@pytest.mark.parametrize("kind", [k for k in USAGE if "--b" not in k])
def test_a_benchmark_usage_error_creates_nothing(tmp_path, tiny_config, make_checkpoint, data, kind):
    ckpt = _usage_checkpoint(tmp_path, tiny_config, make_checkpoint, kind)
    out = tmp_path / "bench"
    _one_error_line(_benchmark(ckpt, data, out, *USAGE[kind][1]), 2, USAGE[kind][2])
    assert not out.exists()


@pytest.mark.parametrize("exists", [False, True], ids=["new out-dir", "empty out-dir"])
@pytest.mark.parametrize("args,message", [
    (["--resume"], "nothing to resume"),
    (["--phase", "refiner"], "needs a trained backbone"),
    (["--set", "train.epochz=3"], "unknown key"),
], ids=["resume with nothing to resume", "refiner phase without a backbone", "bad --set"])
def test_a_train_usage_error_creates_nothing(tmp_path, data, args, message, exists):
    out = tmp_path / "run"
    if exists:
        out.mkdir()
    _one_error_line(_train(data, out, *args), 2, message)
    assert (list(out.iterdir()) == []) if exists else not out.exists()


@pytest.mark.parametrize("kind", ["a directory", "damaged"])
def test_train_resume_names_what_last_ckpt_is_and_creates_nothing(tmp_path, data, make_checkpoint, kind):
    out = tmp_path / "run"
    out.mkdir()
    last = out / "last.ckpt"
    if kind == "damaged":
        last.write_bytes(make_checkpoint().read_bytes())
        _flip_byte(last)
        message = "is damaged: its entry"
    else:
        last.mkdir()
        message = "is a directory, not a checkpoint file"
    _one_error_line(_train(data, out, "--resume"), 2, f"checkpoint {last} {message}")
    assert [p.name for p in out.iterdir()] == ["last.ckpt"]


# ------------------------------------------------------------------------------------------
# Errors on one line, wherever they come from (PyYAML, GDAL, rasterio's Affine, torch).

def _magseg(args, cwd):
    """The real command in a fresh process: what GDAL or a warning prints to the process's
    stderr is seen too."""
    return subprocess.run([sys.executable, "-m", "magseg.cli.app", *args], cwd=cwd,
                          capture_output=True, timeout=300)


def _one_line(run, *needles):
    err = run.stderr.decode("utf-8", "replace")
    assert run.returncode == 2, err
    assert run.stdout == b""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("magseg: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


BAD_YAML = {
    "syntax": ("model:\n  arch: Unet\n  kwargs: [1, 2\n", "line 4, column 1: expected ',' or ']'"),
    "python tag": ("model: !!python/object/apply:os.system [echo hi]\n",
                   "line 1, column 8: the tag !!python/object/apply:os.system is not allowed"),
    "control character": ("model:\n  arch: U\x07net\n", "character 0x7 is not allowed"),
}


@pytest.mark.parametrize("kind", list(BAD_YAML))
def test_a_bad_yaml_config_is_one_line(tmp_path, kind):
    text, message = BAD_YAML[kind]
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "c.yaml")
    assert "\n" not in str(caught.value) and message in str(caught.value)
    _one_line(_magseg(["train", "-c", "c.yaml", "-o", "run"], tmp_path), "c.yaml is not valid YAML",
              message)
    assert not (tmp_path / "run").exists()


def test_a_set_value_that_is_not_utf8_is_one_line(tmp_path, make_checkpoint, raster):
    with pytest.raises(ConfigError, match="not UTF-8"):
        parse_overrides(["engine.device=\udcff"])
    setting = [b"--set", b"engine.device=\xff"]
    _one_line(_magseg([b"train", b"-c", bytes(CONFIGS_TINY), *setting], tmp_path),
              "holds bytes that are not UTF-8")
    _one_line(_magseg([b"predict", bytes(make_checkpoint()), bytes(raster), b"-o", b"pred", *setting],
                      tmp_path), "holds bytes that are not UTF-8")
    assert not (tmp_path / "pred").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["pickle.dump", "torch.save legacy format"])
def test_a_raw_pickle_checkpoint_is_one_line_without_torchs_warning(tmp_path, raster, legacy):
    path = tmp_path / "raw.ckpt"
    if legacy:
        torch.save({"format": "magseg-checkpoint"}, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps({"format": "magseg-checkpoint"}, protocol=4))
    _one_line(_magseg(["predict", "raw.ckpt", str(raster), "-o", "pred"], tmp_path),
              "raw.ckpt is a raw pickle", "never unpickles")
    assert not (tmp_path / "pred").exists()


def test_an_unknown_bbox_crs_is_one_line_without_gdals(tmp_path, make_checkpoint, raster):
    _one_line(_magseg(["predict", str(make_checkpoint()), str(raster), "-o", "pred", "--bbox", "0,0,1,1",
                       "--bbox-crs", "EPSG:999999"], tmp_path), "--bbox-crs 'EPSG:999999'")
    assert not (tmp_path / "pred").exists()


def test_a_mask_on_another_grid_is_one_line(tmp_path, tiny_config):
    config = geotiff_config(tiny_config)
    data = make_geotiff(tmp_path / "data", config, counts=(("train", 2), ("val", 1)))
    mask = data / "masks" / "s0.tif"
    with rasterio.open(mask) as src:
        labels, transform, crs = src.read(), src.transform, src.crs
    write_raster(mask, labels, crs=crs, transform=transform @ Affine.translation(0, 3))
    scene = next(s for s in list_scenes(config.data, "train", data) if s.mask == mask)
    with pytest.raises(DataError, match="its transform") as caught:
        check_scene(scene, config)
    assert "\n" not in str(caught.value)
    result = _train(data, tmp_path / "run", "--set", "data.layout=geotiff", "--set", "data.bands=null",
                    "--set", "model.in_channels=4", "--set", "data.mean=null", "--set", "data.std=null")
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "s0.tif: its transform (" in lines[0], result.stderr


# ------------------------------------------------------------------------------------------
# What is given as a checkpoint is named for what it is; found without torch.

def _tiff(path):
    write_raster(path, smooth_image(3, 8, 8))


def _zip_of_text(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")


def _best_inside(path):
    path.mkdir()
    (path / "best.ckpt").write_bytes(b"")


KINDS = {
    "missing": (lambda p: None, "m.ckpt does not exist"),
    "a directory": (lambda p: p.mkdir(), "m.ckpt is a directory, not a checkpoint file"),
    "a run directory": (_best_inside, "is a directory, not a checkpoint file; give /"),
    "empty": (lambda p: p.write_bytes(b""), "m.ckpt is an empty file (0 bytes)"),
    "random bytes": (lambda p: _random(p, None), "m.ckpt is an unknown kind of file (it starts with bytes"),
    "a TIFF": (_tiff, "m.ckpt is a TIFF image, not a magseg checkpoint"),
    "a YAML config": (lambda p: p.write_text(CONFIGS_TINY.read_text()), "m.ckpt is a text file"),
    "a raw pickle": (lambda p: p.write_bytes(pickle.dumps([1, 2])), "m.ckpt is a raw pickle"),
    "a zip of text": (_zip_of_text, "it is a zip archive but not a PyTorch file (it has no data.pkl)"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_what_is_given_as_a_checkpoint_is_named_for_what_it_is(tmp_path, kind):
    make, message = KINDS[kind]
    make(tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError) as caught:
        check_checkpoint_file(tmp_path / "m.ckpt")
    assert message in str(caught.value)
    assert "pickled Python objects" not in str(caught.value)
    if kind == "a run directory":
        assert str(caught.value).endswith(f"give {tmp_path / 'm.ckpt' / 'best.ckpt'}")


_NO_TORCH = (
    "import sys\nfrom magseg.cli.app import main\nsys.argv = ['magseg', *sys.argv[1:]]\n"
    "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
    "print(code, sorted(m for m in ('torch', 'segmentation_models_pytorch') if m in sys.modules))"
)


@pytest.mark.parametrize("command", ["predict", "benchmark"])
@pytest.mark.parametrize("kind", ["missing", "a directory", "random bytes", "a TIFF", "a raw pickle",
                                  "damaged", "bad --set"])
def test_a_bad_checkpoint_or_set_is_refused_before_torch_is_imported(tmp_path, make_checkpoint, command,
                                                                     kind):
    settings = ["--set", "engine.batch_size"] if kind == "bad --set" else []
    if kind == "damaged":
        _flip_byte(make_checkpoint(name="m.ckpt"))
    elif kind == "bad --set":
        make_checkpoint(name="m.ckpt")
    else:
        KINDS[kind][0](tmp_path / "m.ckpt")
    run = subprocess.run([sys.executable, "-c", _NO_TORCH, command, "m.ckpt", "x.tif", "-o", "d",
                          *settings], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.stdout.splitlines()[-1] == "2 []", run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("magseg: error: "), run.stderr
    assert not (tmp_path / "d").exists()
