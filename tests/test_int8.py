"""``engine.precision=int8``: ``magseg quantize`` writes a checkpoint's int8 OpenVINO graph into
the graph cache, calibrated on its training windows and checked against the torch model;
predict runs it at every input size; without it, or with another runtime, or corrupted,
it is a usage error that names the fix. Bounds, not bits: int8 kernels differ by CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import magseg.cli.predict  # noqa: F401  (registers the command)
import magseg.cli.quantize  # noqa: F401
from magseg.cli.app import app
from magseg.config import load_config
from magseg.engine import int8
from magseg.engine import runtime as rt
from magseg.errors import ConfigError
from synthetic import SceneSpec, write_dataset

from conftest import CONFIGS

pytestmark = pytest.mark.skipif(not (int8.nncf_installed() and rt.exporter_installed()),
                                reason="nncf, openvino, onnx and onnxscript not installed (magseg[int8])")

# The demo's classes and pyramid (its synthetic data), the tiny config's minute model.
TINY_MODEL = ["model.encoder=tu-test_resnet", "model.encoder_weights=none",
              "model.kwargs={decoder_channels: [16, 16, 16, 16, 16]}", "engine.precision=fp32",
              "data.mean=[120,120,100]", "data.std=[40,40,40]"]


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from magseg.checkpoint import save_checkpoint
    from magseg.segmenter import create_refiner, create_segmenter_model

    root = tmp_path_factory.mktemp("int8")
    write_dataset(root / "data", {"train": 2, "val": 1, "test": 1}, SceneSpec(size=(128, 128)), seed=0)
    torch.manual_seed(0)
    config = load_config(CONFIGS / "demo.yaml").override(TINY_MODEL)
    backbone = create_segmenter_model(config)
    with torch.no_grad():  # logits that decide most pixels, as a trained model's do
        backbone.segmentation_head[0].weight.mul_(30)
    ckpt = save_checkpoint(root / "tiny.ckpt", config, backbone, create_refiner(config))
    cache = root / "cache"
    result = _invoke("quantize", ckpt, "--data-root", root / "data", "--windows", 6,
                     "--set", f"engine.cache_dir={cache}")
    assert result.exit_code == 0, result.output
    return {"root": root, "ckpt": ckpt, "cache": cache, "config": config, "stdout": result.stdout,
            "stderr": result.stderr,
            "backbone": backbone.eval()}


def _agreement(want: torch.Tensor, got: torch.Tensor, margin: float = 0.0) -> float:
    """The share of pixels of ``(B, C, h, w)`` probabilities whose labels agree, over the
    pixels where ``want``'s top-1 leads its top-2 by more than ``margin`` (a random model
    leaves many near-ties, which any rounding flips)."""
    top = want.topk(2, dim=1).values
    decided = (top[:, 0] - top[:, 1]) > margin
    return (want.argmax(1) == got.argmax(1))[decided].float().mean().item()


def _sets(cache, precision="int8", runtime="openvino"):
    return [f"engine.cache_dir={cache}", f"engine.runtime={runtime}", f"engine.precision={precision}"]


def test_quantize_writes_a_checked_int8_graph_and_says_so_in_one_json_line(quantized):
    lines = quantized["stdout"].strip().splitlines()
    assert len(lines) == 1  # NNCF's progress goes to stderr, with the steps
    assert "Statistics collection" in quantized["stderr"] and "quantize: exporting" in quantized["stderr"]
    line = json.loads(lines[0])
    graph = quantized["cache"] / "graphs"
    (folder,) = graph.iterdir()
    assert line["graph"] == str(folder / "int8.xml")
    sidecar = json.loads((folder / "int8.json").read_text())
    # Training's windows, at the demo pyramid's input size.
    assert sidecar["calibration"]["windows"] == line["windows"] == 6
    assert sidecar["calibration"]["split"] == "train" and sidecar["calibration"]["size"] == line["size"] == [128, 128]
    assert sidecar["calibration"]["data_root"] == str((quantized["root"] / "data").resolve())
    assert "FakeQuantize" in (folder / "int8.xml").read_text()
    # The check it reports: the graph against the torch model on the same calibration windows.
    from magseg.quantize import calibration_windows

    x = torch.from_numpy(np.concatenate(calibration_windows(quantized["config"], quantized["root"] / "data",
                                                            "train", 6, 32)))
    got = torch.from_numpy(int8.int8_runner(folder / "int8.xml", (128, 128), 3, 1)(x.numpy()))
    # Kept compiled (predict's way): the first runner compiles and keeps it, the second
    # imports it without reading the graph, and both answer as the plain one does.
    blob = rt.GraphCache(graph, folder.name, 3).compiled_blob("int8 digest", (128, 128), 1, "int8")
    for _ in range(2):
        kept = int8.int8_runner(folder / "nonexistent.xml" if blob.read() else folder / "int8.xml",
                                (128, 128), 3, 1, blob)
        assert torch.equal(torch.from_numpy(kept(x.numpy())), got)
    with torch.inference_mode():
        want = quantized["backbone"](x).softmax(1)
    # Near-ties flip with the batch and thread count: agreement to a point, not exactly.
    assert line["label_agreement"] == pytest.approx(_agreement(want, got), abs=0.01)
    assert line["mean_abs_diff"] == pytest.approx((got - want).abs().mean().item(), rel=0.05)
    assert 0 < line["mean_abs_diff"] < 0.03 and _agreement(want, got, margin=0.2) >= 0.97
    # A random model's near-ties flip often: below 98 % agreement, a warning on stderr.
    assert line["label_agreement"] < 0.98
    assert "warning: the int8 graph's labels agree with the torch model's on" in quantized["stderr"]


def test_predict_runs_the_int8_graph_at_every_input_size_near_fp32(quantized):
    from magseg.data.scenes import list_scenes, read_scene
    from magseg.quantize import calibration_windows
    from magseg.segmenter import Segmenter

    ckpt, cache = quantized["ckpt"], quantized["cache"]
    fp32 = Segmenter.from_checkpoint(ckpt, _sets(cache, "fp32"))
    q = Segmenter.from_checkpoint(ckpt, _sets(cache))
    assert q.precision == "int8" and q.runtime["precision"] == "int8" and q.provenance.precision == "int8"
    assert q.backbone.int8_graph is not None and q.backbone.returns_probabilities
    # Windows of real scenes (not the calibration's: the test split), cut to the sizes the
    # engine meets at a raster's edges; the one int8 graph reshaped for each.
    test = calibration_windows(quantized["config"], quantized["root"] / "data", "test", 4, 32)
    x = torch.from_numpy(np.concatenate(test))
    for h, w in [(128, 128), (96, 128), (64, 32)]:
        with torch.inference_mode():
            want, got = fp32.backbone(x[..., :h, :w]), q.backbone(x[..., :h, :w])
        assert got.shape == (4, 7, h, w)
        assert (got - want).abs().mean().item() < 0.02
        assert _agreement(want, got, margin=0.2) >= 0.97
    assert sorted(q.backbone._runners) == [(64, 32), (96, 128), (128, 128)]
    # The whole engine on a scene of an odd size: its labels near fp32's.
    (scene,) = list_scenes(quantized["config"].data, "test", quantized["root"] / "data")
    image = fp32.normalize(read_scene(scene, quantized["config"])[0])[:, :100, :90]
    with torch.inference_mode():
        want, got = fp32.segment(image, return_probs=True), q.segment(image, return_probs=True)
    assert got.labels.shape == (100, 90)
    assert _agreement(want.probs[None], got.probs[None], margin=0.2) >= 0.9


def test_int8_without_its_graph_or_in_another_runtime_is_a_usage_error(quantized, tmp_path):
    from magseg.segmenter import Segmenter

    ckpt, scene = quantized["ckpt"], next((quantized["root"] / "data").glob("*_sat.jpg"))
    empty = tmp_path / "empty-cache"
    result = _invoke("predict", ckpt, scene, "-o", tmp_path / "out", *sum((["--set", s] for s in _sets(empty)), []))
    assert result.exit_code == 2 and "magseg quantize" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    for runtime in ("torch", "onnxruntime"):
        with pytest.raises(ConfigError, match="int8 .*OpenVINO.*engine.runtime=openvino"):
            Segmenter.from_checkpoint(ckpt, _sets(quantized["cache"], runtime=runtime))


def test_a_damaged_int8_graph_is_refused_not_run(quantized, tmp_path):
    import shutil

    from magseg.segmenter import Segmenter

    cache = tmp_path / "cache"
    shutil.copytree(quantized["cache"], cache)
    (weights,) = (cache / "graphs").rglob("int8.bin")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="no longer matches its sidecar"):
        Segmenter.from_checkpoint(quantized["ckpt"], _sets(cache))


def test_quantize_keeps_an_existing_graph_without_overwrite_and_checks_its_inputs(quantized, tmp_path, monkeypatch):
    ckpt, cache, data = quantized["ckpt"], quantized["cache"], quantized["root"] / "data"
    (sidecar,) = (cache / "graphs").rglob("int8.json")
    before = sidecar.read_bytes()
    again = _invoke("quantize", ckpt, "--data-root", data, "--windows", 2, "--set", f"engine.cache_dir={cache}", "-q")
    assert again.exit_code == 1 and "--overwrite" in again.output and sidecar.read_bytes() == before
    missing = _invoke("quantize", ckpt, "--data-root", tmp_path / "nowhere", "--set",
                      f"engine.cache_dir={tmp_path / 'c'}", "-q")
    assert missing.exit_code == 1 and "nowhere" in missing.output and "Traceback" not in missing.output
    assert not (tmp_path / "c" / "graphs").exists() or not list((tmp_path / "c" / "graphs").rglob("int8.*"))
    monkeypatch.setattr(int8, "nncf_installed", lambda: False)
    absent = _invoke("quantize", ckpt, "--data-root", data, "--set", f"engine.cache_dir={tmp_path / 'd'}", "-q")
    assert absent.exit_code == 2 and "magseg[int8]" in absent.output


def test_training_refuses_int8():
    from magseg.training.state import RunPrecision

    config = load_config(CONFIGS / "tiny.yaml").override(["engine.precision=int8"])
    with pytest.raises(ConfigError, match="engine.precision=int8 is for a trained checkpoint"):
        RunPrecision.resolve(config, torch.device("cpu"))
