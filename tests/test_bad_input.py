"""Bad input and bad usage, the same in train, predict and benchmark: one ``magseg: error:``
line on stderr, no traceback, nothing on stdout, and one exit code for one kind of problem:
2 when the run cannot start as asked (command line, config, device, checkpoint), 1 when the
data is at fault (see docs/reliability.md)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from geotiff import smooth_image, write_raster
from magseg.cli.app import _register, app
from test_datasets import CONFIGS_TINY, make_deepglobe
from typer.testing import CliRunner

from magseg.checkpoint import FORMAT, VERSION, load_checkpoint, save_checkpoint
from magseg.errors import CheckpointError
from magseg.segmenter import create_segmenter_model

_register()
COMMANDS = ["train", "predict", "benchmark"]


@pytest.fixture
def data(tmp_path, tiny_config):
    return make_deepglobe(tmp_path / "data", tiny_config,
                          counts=(("train", 2), ("val", 1), ("test", 1)))


@pytest.fixture
def raster(tmp_path):
    return write_raster(tmp_path / "a.tif", smooth_image(3, 20, 20))


def _invoke(args, stdin=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=stdin)


def _run(command, ckpt, tmp_path, data, raster, *extra):
    """``command`` with ``ckpt`` as its model (train: as <out-dir>/last.ckpt under --resume)."""
    if command == "predict":
        return _invoke(["predict", ckpt, raster, "-o", tmp_path / "pred", *extra])
    if command == "benchmark":
        return _invoke(["benchmark", ckpt, "--data-root", data, "-o", tmp_path / "bench", "--no-warmup", *extra])
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    if ckpt is not None:
        shutil.copy(ckpt, out / "last.ckpt")
    return _invoke(["train", "-c", CONFIGS_TINY, "--data-root", data, "-o", out, "--epochs", "1",
                    "-q", "--set", "train.samples_per_epoch=4", *(["--resume"] if ckpt is not None else []),
                    *extra])


def _one_error_line(result, code, *needles):
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("magseg: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------
# Checkpoints that cannot be used: exit 2 in every command.

class _Code:
    """Any object a pickle would rebuild by running code."""

    def __reduce__(self):
        return (print, ("this ran",))


def _with_payload(**changes):
    def make(path, config):
        payload = {"format": FORMAT, "version": VERSION, "config": config.to_dict(),
                   "backbone": {}, "refiner": None, "meta": {}, "training": None}
        payload.update(changes)
        payload = {k: v for k, v in payload.items() if v is not _DROP}
        torch.save(payload, path)
    return make


_DROP = object()


def _empty(path, config):
    path.write_bytes(b"")


def _mismatched(path, config):
    """Weights of another shape than the config's model (another decoder width)."""
    other = config.override({"model.kwargs": {"decoder_channels": [8, 8, 8, 8, 8]}})
    save_checkpoint(path, config, create_segmenter_model(other),
                    training={"phase": "backbone", "epoch": 1})


BAD_CHECKPOINTS = {
    "empty": (_empty, "is an empty file (0 bytes)"),
    "no config": (_with_payload(config=_DROP), "its 'config' entry should be a mapping but is nothing"),
    "string config": (_with_payload(config="tiny"), "its 'config' entry should be a mapping but is a str"),
    "no backbone": (_with_payload(backbone=_DROP), "its 'backbone' entry should be a mapping"),
    "pickled code": (_with_payload(meta=_Code()), "holds pickled Python objects"),
    "mismatched weights": (_mismatched, "do not fit the model built from its config"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_an_unusable_checkpoint_is_one_line_and_exit_2_in_every_command(
        tmp_path, tiny_config, data, raster, command, kind, capfd):
    make, message = BAD_CHECKPOINTS[kind]
    ckpt = tmp_path / "bad.ckpt"
    make(ckpt, tiny_config)
    line = _one_error_line(_run(command, ckpt, tmp_path, data, raster), 2, message)
    assert "weights_only" not in line      # torch's advice to unpickle anyway is not repeated
    assert "this ran" not in capfd.readouterr().out


def test_the_library_refuses_the_same_checkpoints(tmp_path, tiny_config):
    for kind, (make, message) in BAD_CHECKPOINTS.items():
        if kind == "mismatched weights":
            continue  # readable: refused when the weights are loaded into the model
        path = tmp_path / f"{kind}.ckpt"
        make(path, tiny_config)
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_checkpoint(path)


# ------------------------------------------------------------------------------------------
# Device strings: checked once (magseg.device), one line and exit 2 in every command.

def _absent(device: str) -> bool:
    """Whether this machine lacks ``device`` (invalid names: always)."""
    if device in ("cuda", "cuda:7"):
        index = int(device.partition(":")[2] or 0)
        return not torch.cuda.is_available() or torch.cuda.device_count() <= index
    if device == "mps":
        return not torch.backends.mps.is_available()
    return True


DEVICES = {
    "gpu": "--device gpu: not a device; use cpu, cuda, cuda:N (N = 0, 1, ...) or mps",
    "tpu": "--device tpu: not a device; use cpu, cuda, cuda:N",
    "cuda:x": "--device cuda:x: not a device",
    "garbage!": "--device garbage!: not a device",
    "cuda:7": "--device cuda:7: ",
    "cuda": "--device cuda: no CUDA device is available",
    "mps": "--device mps: MPS (Apple GPU) is not available",
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("device", list(DEVICES))
def test_a_bad_or_absent_device_is_one_line_and_exit_2(tmp_path, make_checkpoint, data, raster,
                                                       command, device):
    if not _absent(device):
        pytest.skip(f"this machine has {device}")
    ckpt = make_checkpoint() if command != "train" else None
    _one_error_line(_run(command, ckpt, tmp_path, data, raster, "--device", device), 2,
                    DEVICES[device])


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_device_through_set_is_refused_by_the_schema(tmp_path, make_checkpoint, data, raster,
                                                           command):
    ckpt = make_checkpoint() if command != "train" else None
    _one_error_line(_run(command, ckpt, tmp_path, data, raster,
                         "--set", "engine.device=gpu"), 2, "engine.device=gpu: not a device")


# ------------------------------------------------------------------------------------------
# Config files, overrides and --out-dir of train.

def test_a_config_file_that_is_not_utf8(tmp_path, data):
    config = tmp_path / "tiny.yaml"
    config.write_bytes(CONFIGS_TINY.read_bytes().replace(b"name: tiny", b"name: t\xefny"))
    result = _invoke(["train", "-c", config, "--data-root", data, "-o", tmp_path / "run"])
    _one_error_line(result, 2, "tiny.yaml is not UTF-8 text (byte 0xef")


def test_a_batch_size_beyond_any_machine(tmp_path, data, raster):
    result = _run("train", None, tmp_path, data, raster, "--set", "train.batch_size=99999999999999999999")
    _one_error_line(result, 2, "train.batch_size=99999999999999999999 is larger than any run can use")


def test_train_out_that_is_a_file(tmp_path, data):
    out = tmp_path / "taken"
    out.write_text("not a directory")
    result = _invoke(["train", "-c", CONFIGS_TINY, "--data-root", data, "-o", out, "-q"])
    _one_error_line(result, 2, f"--out-dir {out} is a file")
    assert out.read_text() == "not a directory"


@pytest.mark.parametrize("option, value, message", [
    ("--adaptive-threshold", "nan", "engine.adaptive.threshold: Input should be a finite number"),
    ("--adaptive-threshold", "1.5", "engine.adaptive.threshold is a mean uncertainty in [0, 1]"),
    ("--adaptive-max-crops", "-3", "engine.adaptive.max_crops must be >= 0"),
])
@pytest.mark.parametrize("command", ["predict", "benchmark"])
def test_the_adaptive_flags_are_checked_by_the_schema(tmp_path, make_checkpoint, data, raster, command,
                                                      option, value, message):
    result = _run(command, make_checkpoint(), tmp_path, data, raster, option, value)
    _one_error_line(result, 2, message)


@pytest.mark.parametrize("setting, message", [
    ("data.std=[0,0,0]", "data.std must be > 0"),
    ("data.std=[64,-64,64]", "data.std must be > 0"),
    ("engine.adaptive.max_crops=-3", "engine.adaptive.max_crops must be >= 0"),
    ("engine.adaptive.threshold=nan", "engine.adaptive.threshold: Input should be a finite number"),
])
@pytest.mark.parametrize("command", ["predict", "benchmark"])
def test_set_values_are_checked_like_the_flags(tmp_path, make_checkpoint, data, raster, command,
                                               setting, message):
    result = _run(command, make_checkpoint(), tmp_path, data, raster, "--set", setting)
    _one_error_line(result, 2, message)


def test_a_layout_that_is_not_one_is_named_with_the_layouts(tmp_path, make_checkpoint, data, raster):
    from magseg.config import LAYOUTS

    line = _one_error_line(_run("benchmark", make_checkpoint(), tmp_path, data, raster,
                                "--layout", "tiles"), 2, "--layout", "'tiles'")
    assert all(f"'{layout}'" in line for layout in LAYOUTS)


# ------------------------------------------------------------------------------------------
# predict's inputs and outputs.

def test_stdin_holding_a_nul_byte(tmp_path, make_checkpoint, raster):
    result = _invoke(["predict", make_checkpoint(), "-", "-o", tmp_path / "out"],
                     stdin=f"{raster}\nbad\0name.tif\n")
    _one_error_line(result, 2, "line 2 of stdin holds a NUL byte")


# ------------------------------------------------------------------------------------------
# Spellings that went away: one line naming what replaces them, exit 2, nothing written.

OLD_SPELLINGS = {
    "predict --engine": ("predict", ["--engine", "ray"], "--engine is now --runner (local or ray)"),
    "benchmark --engine": ("benchmark", ["--engine=local"], "--engine is now --runner (local or ray)"),
    "predict --margin": ("predict", ["--margin", "64"],
                         ("predict runs the pyramid over the whole raster, so there are no windows "
                          "and no margin; drop --margin")),
    "train --out": ("train", ["--out", "elsewhere"], "--out is now --out-dir (-o)"),
    "train positional override": ("train", ["train.epochs=3"],
                                  "config overrides are given with --set (--set train.epochs=3)"),
    "train positional data root": ("train", ["data/"],
                                   "the dataset root is given with --data-root (--data-root data/)"),
    # benchmark took the data root as its second argument, as in `benchmark CKPT DATA -o OUT`.
    "benchmark positional data root": ("benchmark", ["elsewhere/data"],
                                       "the dataset root is given with --data-root "
                                       "(--data-root elsewhere/data)"),
    "benchmark --adaptive": ("benchmark", ["--adaptive"],
                             "the 'adaptive' row is scored whenever engine.adaptive is set"),
}


@pytest.mark.parametrize("spelling", list(OLD_SPELLINGS))
def test_an_old_spelling_names_the_new_one(tmp_path, make_checkpoint, data, raster, spelling):
    command, extra, message = OLD_SPELLINGS[spelling]
    ckpt = make_checkpoint() if command != "train" else None
    _one_error_line(_run(command, ckpt, tmp_path, data, raster, *extra), 2, message)
    written = [p for p in tmp_path.rglob("*") if p.parent.name in ("pred", "bench", "run")]
    assert written == [] and not (tmp_path / "elsewhere").exists()


def test_a_file_name_with_glob_characters_is_processed(tmp_path, make_checkpoint):
    literal = write_raster(tmp_path / "br[1].tif", smooth_image(3, 20, 20))
    result = _invoke(["predict", make_checkpoint(), literal, "-o", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "br[1].tif").is_file()


def test_an_output_path_that_is_a_directory_is_failed_with_the_reason(tmp_path, make_checkpoint,
                                                                      raster):
    import json

    (tmp_path / "out" / "a.tif").mkdir(parents=True)
    result = _invoke(["predict", make_checkpoint(), raster, "-o", tmp_path / "out"])
    assert result.exit_code == 1, result.output
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["status"] == "failed"
    assert f"its output {tmp_path / 'out' / 'a.tif'} is a directory" in record["error"]


def test_a_one_pixel_raster_gets_no_scale_warning(tmp_path, make_checkpoint):
    import json

    # One dark pixel: far below the training data's scale, and no evidence of another scale.
    path = write_raster(tmp_path / "one.tif", np.full((3, 1, 1), 3, np.uint8))
    result = _invoke(["predict", make_checkpoint(), path, "-o", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["status"] == "ok" and record["warnings"] == []
    assert "warning" not in result.stderr
