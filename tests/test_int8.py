"""``engine.precision=int8``: ``magseg quantize`` writes a checkpoint's int8 OpenVINO graph into
the graph cache, calibrated on its training windows and checked against the torch model;
predict runs it at every input size; without it, or with another runtime, or corrupted,
it is a usage error that names the fix. The refiner's convolutions get a graph of their
own, calibrated on the cells the engine feeds them; one that does not check out leaves them
in float32. Bounds, not bits: int8 kernels differ by CPU."""

from __future__ import annotations

import json
from pathlib import Path

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
    refiner = create_refiner(config)
    with torch.no_grad():  # a correction that changes pixels, as a trained refiner's does
        last = refiner.context[-1].weight
        last.copy_(torch.randn(last.shape, generator=torch.Generator().manual_seed(0)))
    ckpt = save_checkpoint(root / "tiny.ckpt", config, backbone, refiner)
    cache = root / "cache"
    result = _invoke("quantize", ckpt, "--data-root", root / "data", "--windows", 6,
                     "--set", f"engine.cache_dir={cache}")
    assert result.exit_code == 0, result.output
    return {"root": root, "ckpt": ckpt, "cache": cache, "config": config, "stdout": result.stdout,
            "stderr": result.stderr,
            "backbone": backbone.eval(), "refiner": refiner.eval()}


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


def _fp32_engine(quantized):
    """The fp32 torch engine of the fixture's checkpoint, and the normalised train scenes."""
    from magseg.data.scenes import list_scenes, read_scene
    from magseg.segmenter import Segmenter

    segmenter = Segmenter.from_checkpoint(quantized["ckpt"], [f"engine.cache_dir={quantized['cache']}",
                                                              "engine.device=cpu"])
    scenes = list_scenes(quantized["config"].data, "train", quantized["root"] / "data")
    return segmenter, [segmenter.normalize(read_scene(s, quantized["config"])[0]) for s in scenes]


def test_quantize_makes_the_refiners_graph_from_the_cells_the_engine_feeds_it(quantized):
    from magseg.engine.runtime import state_sha256
    from magseg.quantize import refiner_cells

    line = json.loads(quantized["stdout"])
    (folder,) = (quantized["cache"] / "graphs").iterdir()
    refiner = line["refiner"]
    assert refiner["graph"] == str(folder / "refiner-int8.xml") and "FakeQuantize" in Path(refiner["graph"]).read_text()
    sidecar = json.loads((folder / "refiner-int8.json").read_text())
    # Both train scenes (fewer than --scenes' 4), and up to --windows' 6 of the cell maps they
    # gave: the same again (the engine is deterministic), one per crop of a refined stage.
    segmenter, images = _fp32_engine(quantized)
    every = refiner_cells(segmenter, images, 1000)
    cells = refiner_cells(segmenter, images, 6)
    assert sidecar["calibration"]["scenes"] == refiner["scenes"] == 2
    assert sidecar["calibration"]["cells"] == refiner["cells"] == len(cells) == min(6, len(every)) >= 2
    assert {c.shape[:2] for c in every} == {(1, 14)}
    # Fewer than it made: spread over them, the first and the last kept.
    two = refiner_cells(segmenter, images, 2)
    assert np.array_equal(two[0], every[0]) and np.array_equal(two[1], every[-1])
    assert sidecar["in_channels"] == 14 and sidecar["weights_sha256"] == state_sha256(quantized["refiner"].context)
    # The check it reports, on those cells.
    run = int8.RefinerInt8(Path(refiner["graph"]), 14, 1)
    diff = scale = 0.0
    with torch.inference_mode():
        for item in cells:
            want, got = quantized["refiner"].context(torch.from_numpy(item)), run(torch.from_numpy(item))
            assert got.shape == want.shape and got.dtype == torch.float32
            diff += (got - want).abs().mean().item() / len(cells)
            scale += want.abs().mean().item() / len(cells)
    assert refiner["mean_abs_correction"] == pytest.approx(scale, rel=1e-3)
    assert refiner["mean_abs_diff"] == pytest.approx(diff, rel=0.1, abs=1e-4)
    assert 0 < diff < 0.1 * scale  # int8's rounding: a few per cent of the correction


def test_int8_runs_the_refiners_convolutions_from_their_graph_near_fp32(quantized):
    from magseg.segmenter import Segmenter

    fp32, images = _fp32_engine(quantized)
    q = Segmenter.from_checkpoint(quantized["ckpt"], _sets(quantized["cache"]))
    assert fp32.refiner.int8_convolutions is None
    assert isinstance(q.refiner.int8_convolutions, int8.RefinerInt8)
    with torch.inference_mode():
        want, got = fp32.segment(images[0], return_probs=True), q.segment(images[0], return_probs=True)
    # It ran, at the cell sizes the engine met (its stages' windows), and the result is near fp32's.
    assert q.refiner.int8_convolutions._runners
    assert _agreement(want.probs[None], got.probs[None], margin=0.2) >= 0.9
    # The same engine with the refiner's convolutions in float32: the int8 ones changed something.
    q.refiner.int8_convolutions = None
    with torch.inference_mode():
        float_refiner = q.segment(images[0], return_probs=True)
    assert not torch.equal(float_refiner.probs, got.probs)


def test_a_refiner_graph_that_does_not_check_out_leaves_its_convolutions_in_float32(quantized, tmp_path):
    import shutil

    from magseg.segmenter import Segmenter

    for damage in ("bytes", "weights"):
        cache = tmp_path / damage
        shutil.copytree(quantized["cache"], cache)
        (folder,) = (cache / "graphs").iterdir()
        if damage == "bytes":
            weights = folder / "refiner-int8.bin"
            data = bytearray(weights.read_bytes())
            data[len(data) // 2] ^= 0xFF
            weights.write_bytes(bytes(data))
        else:  # a graph made from other weights (its files intact)
            sidecar = folder / "refiner-int8.json"
            sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "weights_sha256": "0" * 64}))
        q = Segmenter.from_checkpoint(quantized["ckpt"], _sets(cache))
        assert q.backbone.int8_graph is not None and q.refiner.int8_convolutions is None, damage


def _without_refiner_graph(quantized, tmp_path):
    """A copy of the fixture's cache holding the backbone's int8 graph alone (as an earlier
    magseg quantised it), and its model folder."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(quantized["cache"], cache)
    (folder,) = (cache / "graphs").iterdir()
    for path in folder.glob("refiner-int8.*"):
        path.unlink()
    return cache, folder


def test_quantize_gives_a_cache_holding_only_the_backbones_graph_the_refiners(quantized, tmp_path):
    cache, folder = _without_refiner_graph(quantized, tmp_path)
    backbone = {p.name: p.read_bytes() for p in folder.glob("int8.*")}
    result = _invoke("quantize", quantized["ckpt"], "--data-root", quantized["root"] / "data", "--windows", 6,
                     "--scenes", 1, "--set", f"engine.cache_dir={cache}", "-q")
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout)
    assert line["graph"] == str(folder / "int8.xml") and line["label_agreement"] is None
    assert line["windows"] == 6 and line["refiner"]["scenes"] == 1 and (folder / "refiner-int8.json").is_file()
    assert {p.name: p.read_bytes() for p in folder.glob("int8.*")} == backbone  # the backbone's untouched


def test_quantize_makes_no_refiner_graph_for_a_pyramid_that_never_refines(quantized, tmp_path):
    cache, folder = _without_refiner_graph(quantized, tmp_path)
    # One stage: the engine never runs the refiner, so there is nothing to calibrate on and
    # nothing that would run the graph; the command says so and succeeds.
    result = _invoke("quantize", quantized["ckpt"], "--data-root", quantized["root"] / "data", "--windows", 6,
                     "--set", "pyramid.scales=[128]", "--set", f"engine.cache_dir={cache}")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["refiner"] is None and not list(folder.glob("refiner-int8.*"))
    assert "the refiner never ran on 2 scene(s)" in result.stderr


@pytest.mark.parametrize("vnni, auto", [(True, 8), (False, 7)])
def test_the_weights_width_is_8_bits_only_where_the_cpu_sums_int8_products_in_32_bits(monkeypatch, vnni, auto):
    from magseg.engine import precision

    monkeypatch.setattr(precision, "cpu_has_vnni", lambda: vnni)
    assert int8.weight_bits("auto") == auto and int8.weight_bits() == auto
    assert int8.weight_bits("7") == int8.weight_bits(7) == 7 and int8.weight_bits("8") == 8
    for bad in ("6", "16", "int8", ""):
        with pytest.raises(ConfigError, match="--weight-bits .*auto, 7 or 8"):
            int8.weight_bits(bad)
    # What runs here: 7-bit graphs everywhere (and those whose sidecar predates the width).
    assert int8.runs_here({"weight_bits": 7}) and int8.runs_here({})
    assert int8.runs_here({"weight_bits": 8}) == vnni


def _int8_weights(xml: Path) -> np.ndarray:
    """Every int8 weight constant of an OpenVINO int8 graph, flattened."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    return np.concatenate([op.get_data().ravel() for op in model.get_ops()
                           if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8])


def test_quantize_makes_7_or_8_bit_weights_as_asked_and_an_8_bit_graph_runs_only_with_vnni(
        quantized, tmp_path, monkeypatch):
    from magseg.engine import precision
    from magseg.segmenter import Segmenter

    ckpt, data = quantized["ckpt"], quantized["root"] / "data"
    # The fixture's graph is auto's width on this CPU, and says so.
    (folder,) = (quantized["cache"] / "graphs").iterdir()
    auto = int8.weight_bits("auto")
    assert json.loads(quantized["stdout"])["weight_bits"] == auto
    for part in ("int8", "refiner-int8"):
        assert json.loads((folder / f"{part}.json").read_text())["weight_bits"] == auto
    caches = {}
    # Made where the CPU has no VNNI (as every graph may be): 8 bits is the user's choice,
    # for another machine, and the command says what it means here.
    monkeypatch.setattr(precision, "cpu_has_vnni", lambda: False)
    for bits in (7, 8):
        cache = caches[bits] = tmp_path / f"cache{bits}"
        result = _invoke("quantize", ckpt, "--data-root", data, "--windows", 6, "--scenes", 1,
                         "--weight-bits", bits, "--set", f"engine.cache_dir={cache}")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["weight_bits"] == bits
        assert ("8-bit weights for a CPU with VNNI: this one has none" in result.stderr) == (bits == 8)
        (folder,) = (cache / "graphs").iterdir()
        for part in ("int8", "refiner-int8"):
            assert json.loads((folder / f"{part}.json").read_text())["weight_bits"] == bits
            weights = np.abs(_int8_weights(folder / f"{part}.xml").astype(np.int32))
            # 7 bits: |w| <= 64, so a pair of u8 x s8 products stays in int16; 8 bits use
            # the whole range (a random model's largest weight of a channel maps to 127).
            assert (weights.max() <= 64) if bits == 7 else (weights.max() > 100), (part, weights.max())
    bad = _invoke("quantize", ckpt, "--data-root", data, "--weight-bits", 6, "--set",
                  f"engine.cache_dir={tmp_path / 'c6'}", "-q")
    assert bad.exit_code == 2 and "--weight-bits 6" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "c6").exists()
    # A CPU without VNNI: the 7-bit graphs run, the 8-bit backbone is refused with both fixes
    # named, before any output; an 8-bit refiner graph would leave its convolutions in float32.
    q = Segmenter.from_checkpoint(ckpt, _sets(caches[7]))
    assert q.backbone.int8_graph is not None and q.refiner.int8_convolutions is not None
    scene = next(data.glob("*_sat.jpg"))
    out = tmp_path / "out"
    refused = _invoke("predict", ckpt, scene, "-o", out, *sum((["--set", s] for s in _sets(caches[8])), []))
    assert refused.exit_code == 2 and "Traceback" not in refused.output, refused.output
    assert "8-bit int8 weights" in refused.output and "--weight-bits 7" in refused.output
    assert "magseg quantize" in refused.output and "--overwrite" in refused.output
    assert not out.exists() or not any(out.iterdir())
    # The 7-bit backbone beside the 8-bit refiner graph (files and sidecar intact).
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(caches[7], mixed)
    (folder,) = (mixed / "graphs").iterdir()
    for path in (caches[8] / "graphs" / folder.name).glob("refiner-int8.*"):
        shutil.copy(path, folder / path.name)
    q = Segmenter.from_checkpoint(ckpt, _sets(mixed))
    assert q.backbone.int8_graph is not None and q.refiner.int8_convolutions is None
    monkeypatch.setattr(precision, "cpu_has_vnni", lambda: True)
    assert Segmenter.from_checkpoint(ckpt, _sets(mixed)).refiner.int8_convolutions is not None
