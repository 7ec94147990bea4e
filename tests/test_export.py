"""``magseg export``: the file runs in ONNX Runtime with torch not even importable, gives the
backbone's probabilities, and carries its metadata (magseg's, Deepness's, STAC MLM beside)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import magseg.cli.export  # noqa: F401  (registers the command)
from magseg.cli.app import app
from magseg.engine import runtime as rt

pytestmark = pytest.mark.skipif(not rt.installed("onnxruntime"),
                                reason="onnxruntime, onnx and onnxscript not installed (magseg[onnx])")


def _export(*args):
    return CliRunner().invoke(app, ["export", *map(str, args)])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny checkpoint and its export at --input 64 (not the pyramid's 32: the flag works)."""
    from magseg.checkpoint import save_checkpoint
    from magseg.config import load_config
    from magseg.segmenter import create_segmenter_model

    from conftest import CONFIGS

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    config = load_config(CONFIGS / "tiny.yaml")
    backbone = create_segmenter_model(config).eval()
    ckpt = save_checkpoint(root / "tiny.ckpt", config, backbone)
    result = _export(ckpt, "-o", root / "model.onnx", "--input", 64)
    assert result.exit_code == 0, result.output
    return {"root": root, "ckpt": ckpt, "backbone": backbone, "config": config,
            "line": json.loads(result.stdout.strip().splitlines()[-1])}


def test_runs_without_torch_and_gives_the_backbones_probabilities(exported):
    root = exported["root"]
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    np.save(root / "x.npy", x)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import json, numpy as np, onnxruntime as ort
        s = ort.InferenceSession({str(root / 'model.onnx')!r}, providers=["CPUExecutionProvider"])
        (i,), (o,) = s.get_inputs(), s.get_outputs()
        np.save({str(root / 'y.npy')!r}, s.run(None, {{i.name: np.load({str(root / 'x.npy')!r})}})[0])
        meta = s.get_modelmeta().custom_metadata_map
        print(json.dumps({{"meta": meta, "input": [i.name, i.shape], "output": [o.name, o.shape],
                           "torch": [m for m in sys.modules if m.startswith("torch")]}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout)
    assert info["torch"] == ["torch"]  # only the blocker: nothing of torch was loaded
    assert info["input"][1][1:] == [3, 64, 64] and info["output"][1][1:] == [4, 64, 64]
    assert not isinstance(info["input"][1][0], int)  # batch size free
    with torch.no_grad():
        want = exported["backbone"](torch.from_numpy(x)).softmax(1).numpy()
    got = np.load(root / "y.npy")
    assert np.abs(got - want).max() < 1e-5
    assert np.allclose(got.sum(1), 1, atol=1e-5)


def test_metadata_reads_back(exported):
    import onnx

    from magseg import __version__
    from magseg.io.provenance import file_sha256

    model = onnx.load(str(exported["root"] / "model.onnx"))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    config = exported["config"]
    # Deepness's keys
    assert meta["model_type"] == "Segmentor"
    assert meta["class_names"] == {"0": "unknown", "1": "field", "2": "road", "3": "water"}
    assert meta["tiles_size"] == meta["tile_size"] == 64
    assert meta["standardization_mean"] == pytest.approx([127.5 / 255] * 3)
    assert meta["standardization_std"] == pytest.approx([64 / 255] * 3)
    # magseg's
    assert meta["class_colors"]["3"] == [0, 0, 255]
    assert [c["in_mean"] for c in meta["classes"]] == [False, True, True, True]
    assert meta["bands"] == [1, 2, 3]
    assert meta["normalization"]["mean"] == [127.5] * 3 and meta["normalization"]["std"] == [64.0] * 3
    assert meta["pyramid"]["scales"] == [[32, 32], [64, 64], [128, 128]]
    assert meta["refine_points"] == config.refine.points
    assert meta["magseg_version"] == __version__
    assert meta["checkpoint_sha256"] == file_sha256(exported["ckpt"])
    assert exported["line"]["files"] == [str(exported["root"] / "model.onnx")]


def test_stac_mlm_json_beside_it(exported):
    item = json.loads((exported["root"] / "model.mlm.json").read_text())
    assert any("/mlm/" in ext for ext in item["stac_extensions"])
    props = item["properties"]
    assert props["mlm:input"][0]["input"]["shape"] == [-1, 3, 64, 64]
    assert [s["mean"] for s in props["mlm:input"][0]["value_scaling"]] == [127.5] * 3
    assert props["mlm:output"][0]["result"]["shape"] == [-1, 4, 64, 64]
    assert [c["name"] for c in props["mlm:output"][0]["classification:classes"]] == \
        ["unknown", "field", "road", "water"]
    assert item["assets"]["model"]["href"] == "./model.onnx"


def test_refuses_an_input_the_backbone_cannot_take_and_an_existing_file(exported, monkeypatch):
    root = exported["root"]
    again = _export(exported["ckpt"], "-o", root / "model.onnx")
    assert again.exit_code == 1 and "--overwrite" in again.stderr
    monkeypatch.setattr("magseg.engine.backbone.input_multiple", lambda _b: 32)
    bad = _export(exported["ckpt"], "-o", root / "other.onnx", "--input", 40)
    assert bad.exit_code == 2 and "--input 40" in bad.stderr and "--input 32" in bad.stderr
    assert not (root / "other.onnx").exists() and not (root / "other.mlm.json").exists()
    fmt = _export(exported["ckpt"], "-o", root / "other.onnx", "--format", "tflite")
    assert fmt.exit_code == 2 and "--format tflite" in fmt.stderr


@pytest.mark.skipif(not rt.installed("openvino"), reason="openvino not installed (magseg[openvino])")
def test_openvino_ir_with_metadata(exported):
    import openvino as ov

    root = exported["root"]
    result = _export(exported["ckpt"], "-o", root / "ov.xml", "--format", "openvino", "--input", 64)
    assert result.exit_code == 0, result.output
    model = ov.Core().read_model(str(root / "ov.xml"))
    assert json.loads(model.get_rt_info(["model_info", "model_type"]).astype(str)) == "Segmentor"
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = exported["backbone"](torch.from_numpy(x)).softmax(1).numpy()
    assert np.abs(compiled(x)[0] - want).max() < 1e-5
    assert (root / "ov.bin").is_file() and (root / "ov.mlm.json").is_file()
