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
    """A tiny checkpoint and its export at --input 64 (not the pyramid's 32: the flag works).
    Its refiner's weights are random: a fresh one's last convolution is zero, and it would
    return ``fine`` whatever the graph computed around it."""
    from magseg.checkpoint import save_checkpoint
    from magseg.config import load_config
    from magseg.segmenter import create_refiner, create_segmenter_model

    from conftest import CONFIGS

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    config = load_config(CONFIGS / "tiny.yaml")
    backbone = create_segmenter_model(config).eval()
    refiner = create_refiner(config).eval()
    with torch.no_grad():
        for param in refiner.parameters():
            param.normal_(0, 0.5)
    ckpt = save_checkpoint(root / "tiny.ckpt", config, backbone, refiner)
    result = _export(ckpt, "-o", root / "model.onnx", "--input", 64)
    assert result.exit_code == 0, result.output
    return {"root": root, "ckpt": ckpt, "backbone": backbone, "refiner": refiner,
            "config": config, "line": json.loads(result.stdout.strip().splitlines()[-1])}


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


def test_the_refiner_runs_without_torch_and_gives_the_engines_refined_probabilities(exported):
    """model.refiner.onnx beside the model: fine and coarse crop probabilities in (batch
    free, the pyramid's 32 px crop), the torch refiner's probabilities out, its metadata
    naming the inputs; run with torch not importable."""
    root, config = exported["root"], exported["config"]
    assert exported["line"]["refiner"] == [str(root / "model.refiner.onnx")]
    rng = np.random.default_rng(2)
    # Every probability >= ~1e-3: the engine's log floor (1e-6) plays no part.
    fine, coarse = (torch.from_numpy(rng.standard_normal((3, 4, 32, 32)).astype(np.float32)).softmax(1)
                    for _ in range(2))
    np.save(root / "fine.npy", fine.numpy())
    np.save(root / "coarse.npy", coarse.numpy())
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        import json, numpy as np, onnxruntime as ort
        s = ort.InferenceSession({str(root / 'model.refiner.onnx')!r}, providers=["CPUExecutionProvider"])
        feed = {{"fine": np.load({str(root / 'fine.npy')!r}), "coarse": np.load({str(root / 'coarse.npy')!r})}}
        np.save({str(root / 'refined.npy')!r}, s.run(None, feed)[0])
        print(json.dumps({{"meta": s.get_modelmeta().custom_metadata_map,
                           "inputs": [[i.name, i.shape] for i in s.get_inputs()],
                           "output": s.get_outputs()[0].name}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout)
    assert [name for name, _ in info["inputs"]] == ["fine", "coarse"]
    assert all(shape[1:] == [4, 32, 32] and not isinstance(shape[0], int) for _, shape in info["inputs"])
    assert info["output"] == "probabilities"
    meta = {k: json.loads(v) for k, v in info["meta"].items()}
    assert meta["role"] == "refiner" and sorted(meta["inputs"]) == ["coarse", "fine"]
    assert meta["backbone"] == "model.onnx" and meta["crop"] == [32, 32]
    assert meta["context_stride"] == config.refiner.context_stride
    with torch.no_grad():
        want = exported["refiner"].probs(fine, coarse)
    got = np.load(root / "refined.npy")
    assert np.abs(got - want.numpy()).max() < 1e-5
    assert np.abs(got - fine.numpy()).max() > 0.05  # the refiner did change them
    item = json.loads((root / "model.mlm.json").read_text())
    assert item["assets"]["refiner"]["href"] == "./model.refiner.onnx"


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
    refiner = ov.Core().read_model(str(root / "ov.refiner.xml"))
    assert json.loads(refiner.get_rt_info(["model_info", "role"]).astype(str)) == "refiner"
    assert (root / "ov.refiner.bin").is_file()
