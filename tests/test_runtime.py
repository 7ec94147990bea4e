"""engine.runtime: the backbone run from its exported graph in ONNX Runtime / OpenVINO, the
graph cache (keyed, checked, rebuilt when stale or corrupt), and a start-up from a warm cache
that imports neither smp nor timm."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from magseg.engine import runtime as rt
from magseg.errors import ConfigError

pytestmark = pytest.mark.skipif(not rt.installed("onnxruntime"),
                                reason="onnxruntime, onnx and onnxscript not installed (magseg[onnx])")


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A tiny checkpoint, its exported graph in a cache folder, the torch engine's result on
    a 128 px scene (the reference), and the scene. One export for the whole module."""
    from magseg.checkpoint import save_checkpoint
    from magseg.config import load_config
    from magseg.segmenter import Segmenter, create_refiner, create_segmenter_model

    root = tmp_path_factory.mktemp("runtime")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"))
    ckpt = save_checkpoint(root / "tiny.ckpt", config, create_segmenter_model(config),
                           create_refiner(config))
    scene = torch.randn(3, 128, 128, generator=torch.Generator().manual_seed(1))
    reference = Segmenter.from_checkpoint(ckpt).segment(scene, return_probs=True)
    cache = root / "cache"
    ort = Segmenter.from_checkpoint(ckpt, ["engine.runtime=onnxruntime", f"engine.cache_dir={cache}"])
    result = ort.segment(scene, return_probs=True)
    return {"ckpt": ckpt, "cache": cache, "scene": scene, "reference": reference,
            "result": result, "segmenter": ort}


def _graph_dir(cache) -> "os.PathLike":
    (folder,) = (cache / "graphs").iterdir()
    return folder


def test_onnxruntime_reproduces_the_torch_engine(warm):
    ref, got = warm["reference"], warm["result"]
    assert warm["segmenter"].backbone_runtime == "onnxruntime"
    assert warm["segmenter"].runtime["precision"] == "fp32"
    assert (got.probs - ref.probs).abs().max().item() < 1e-4
    assert (got.labels == ref.labels).float().mean().item() >= 0.999


def test_cache_holds_one_checked_graph_per_input_size(warm):
    # The run's two input sizes: a stage of one crop (32) and crops grown by the default
    # margin of 4 on each side (40).
    # And ONNX Runtime's optimised form of each, checked by its own sidecar.
    folder = _graph_dir(warm["cache"])
    # (Each graph's lock file, empty, beside it: GraphCache.build.)
    assert sorted(p.name for p in folder.iterdir()) == [".32x32.onnx.lock", ".40x40.onnx.lock", "32x32.json",
                                                        "32x32.onnx", "40x40.json", "40x40.onnx",
                                                        "compiled", "model.json"]
    blobs = sorted((folder / "compiled").glob("*.blob"))
    assert len(blobs) == 2 and all(rt.CompiledBlob(b).read() == b.read_bytes() for b in blobs)
    assert sorted(p.suffix for p in (folder / "compiled").iterdir()) == [".blob", ".blob", ".json", ".json"]
    from magseg.io.provenance import file_sha256

    for side in (32, 40):
        sidecar = json.loads((folder / f"{side}x{side}.json").read_text())
        assert sidecar["size"] == [side, side] and sidecar["in_channels"] == 3
        assert sidecar["sha256"] == file_sha256(folder / f"{side}x{side}.onnx")
    from magseg.engine.backbone import input_multiple

    torch_model = warm["segmenter"].backbone.torch_model()
    assert json.loads((folder / "model.json").read_text())["input_multiple"] == input_multiple(torch_model)


def test_onnxruntimes_graph_gives_the_torch_models_logits(warm):
    # ONNX Runtime's softmax over the channel axis costs more than the engine's own, so its
    # graph ends at the logits and the engine applies the softmax.
    from magseg.engine.backbone import gives_probabilities

    backbone = warm["segmenter"].backbone
    assert not gives_probabilities(backbone)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = backbone.torch_model()(x)
    assert (backbone(x) - logits).abs().max().item() < 1e-4


@pytest.mark.skipif(not rt.installed("openvino"), reason="openvino not installed (magseg[openvino])")
def test_openvinos_graph_ends_in_the_softmax_and_says_so(warm, tmp_path):
    # OpenVINO's graph ends in the softmax, kept beside ONNX Runtime's logits graphs under its
    # own name; the engine takes its output as probabilities (a second softmax would flatten
    # every distribution towards uniform) and reproduces the torch engine.
    from magseg.engine.backbone import gives_probabilities
    from magseg.segmenter import Segmenter

    shutil.copytree(warm["cache"], tmp_path / "cache")
    segmenter = Segmenter.from_checkpoint(warm["ckpt"], [
        "engine.runtime=openvino", "engine.precision=fp32", f"engine.cache_dir={tmp_path / 'cache'}"])
    backbone = segmenter.backbone
    assert gives_probabilities(backbone)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = backbone.torch_model()(x)
    got = backbone(x)
    assert got.shape == logits.shape and got.dtype == torch.float32
    assert (got - logits.softmax(dim=1)).abs().max().item() < 1e-5
    folder = _graph_dir(tmp_path / "cache")
    assert {"32x32.onnx", "32x32.probs.onnx"} <= {p.name for p in folder.iterdir()}
    sidecar = json.loads((folder / "32x32.probs.json").read_text())
    assert sidecar["softmax"] is True and json.loads((folder / "32x32.json").read_text())["softmax"] is False
    result = segmenter.segment(warm["scene"], return_probs=True)
    assert (result.probs - warm["reference"].probs).abs().max().item() < 1e-4
    assert (result.labels == warm["reference"].labels).float().mean().item() >= 0.999


def _cache_copy(warm, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(warm["cache"], cache)
    folder = _graph_dir(cache)
    return rt.GraphCache(cache / "graphs", folder.name, 3), folder


def _no_torch_model():
    raise AssertionError("the torch model was built although the cache was valid")


def test_a_warm_cache_is_used_without_the_torch_model(warm, tmp_path):
    cache, _ = _cache_copy(warm, tmp_path)
    backbone = rt.RuntimeBackbone("onnxruntime", cache, _no_torch_model)
    x = torch.randn(3, 3, 32, 32)
    assert backbone.input_multiple == cache.input_multiple() >= 1
    assert torch.allclose(backbone(x), warm["segmenter"].backbone(x), atol=0)


@pytest.mark.parametrize("damage", ["no sidecar", "sidecar cut short", "other size",
                                    "other key", "graph missing", "graph bytes changed", "other kind"])
def test_a_stale_or_damaged_entry_is_not_trusted(warm, tmp_path, damage):
    cache, folder = _cache_copy(warm, tmp_path)
    graph, sidecar = folder / "32x32.onnx", folder / "32x32.json"
    data = json.loads(sidecar.read_text())
    if damage == "other kind":  # a logits graph, its sidecar and all, under a softmax graph's name
        assert cache.valid_graph((32, 32)) == graph
        shutil.copy(graph, folder / "32x32.probs.onnx")
        shutil.copy(sidecar, folder / "32x32.probs.json")
        cache = rt.GraphCache(cache.dir.parent, cache.key, 3, softmax=True)
    elif damage == "no sidecar":
        sidecar.unlink()
    elif damage == "sidecar cut short":
        sidecar.write_text(sidecar.read_text()[:20])
    elif damage == "other size":
        sidecar.write_text(json.dumps({**data, "size": [64, 64]}))
    elif damage == "other key":
        sidecar.write_text(json.dumps({**data, "key": "0" * 32}))
    elif damage == "graph missing":
        graph.unlink()
    else:
        blob = bytearray(graph.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        graph.write_bytes(bytes(blob))
    assert cache.valid_graph((32, 32)) is None


@pytest.mark.parametrize("kept", [False, True], ids=["graph alone", "optimised graph kept"])
def test_a_corrupt_graph_is_rebuilt_where_it_is_read_and_then_right(warm, tmp_path, monkeypatch, kept):
    """A graph cut short is rebuilt when it is needed. Where ONNX Runtime's optimised form
    of it is kept (checked by its own digest), the graph is not read at all: the run is right
    without it, and it is rebuilt on the first run that needs it."""
    from magseg.segmenter import Segmenter

    cache, folder = _cache_copy(warm, tmp_path)
    if not kept:
        shutil.rmtree(folder / "compiled")
    graph = folder / "32x32.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])  # cut short
    cut = graph.read_bytes()
    hashed = []
    monkeypatch.setattr(rt, "_file_sha256", lambda path, real=rt._file_sha256: hashed.append(path) or real(path))

    def run():
        # engine.precision=bf16: a rebuild happens on the engine's first backbone call, under
        # its bf16 autocast, which must not leak into the graph (ONNX Runtime runs it in fp32).
        # The 1e-4 holds on any CPU, bf16 native or emulated: the backbone runs fp32 in ONNX
        # Runtime, and the untrained refiner's correction is exactly 0 in bf16 as in fp32.
        segmenter = Segmenter.from_checkpoint(warm["ckpt"], [
            "engine.runtime=onnxruntime", "engine.precision=bf16",
            f"engine.cache_dir={tmp_path / 'cache'}"])
        result = segmenter.segment(warm["scene"], return_probs=True)
        assert (result.probs - warm["reference"].probs).abs().max().item() < 1e-4

    run()
    if kept:  # used as kept: the graph was neither read nor rebuilt
        assert graph not in hashed and graph.read_bytes() == cut
        shutil.rmtree(folder / "compiled")
        run()
    assert cache.valid_graph((32, 32)) == graph


def test_a_vouched_graph_the_runtime_cannot_load_is_rebuilt_once(warm, tmp_path):
    cache, folder = _cache_copy(warm, tmp_path)
    good = (folder / "32x32.onnx").read_bytes()
    (folder / "32x32.onnx").write_bytes(b"not an onnx graph")
    cache._write_json(folder / "32x32.json", {"size": [32, 32], "in_channels": 3, "softmax": False,
                                              "sha256": rt._file_sha256(folder / "32x32.onnx")})
    assert cache.valid_graph((32, 32)) == folder / "32x32.onnx"  # vouched for, and not a graph
    built = []
    vouched = rt._file_sha256(folder / "32x32.onnx")

    def export(size, _model):  # stands in for the export: the good bytes, counted
        built.append(size)
        (folder / "32x32.onnx").write_bytes(good)
        return folder / "32x32.onnx"

    cache._export = export
    backbone = rt.RuntimeBackbone("onnxruntime", cache, lambda: torch.nn.Identity())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(backbone(x), warm["segmenter"].backbone(x), atol=0)
    assert built == [(32, 32)]
    # Under the build's lock the vouched graph is not taken again: its digest is the failed one.
    (folder / "32x32.onnx").write_bytes(b"not an onnx graph")
    assert cache.graph_digest((32, 32)) == vouched
    assert cache.build((32, 32), lambda: torch.nn.Identity(), failed=vouched) == folder / "32x32.onnx"
    assert built == [(32, 32)] * 2
    # A graph another process built meanwhile (vouched for, another digest) is taken.
    cache._write_json(folder / "32x32.json", {"size": [32, 32], "in_channels": 3, "softmax": False,
                                              "sha256": rt._file_sha256(folder / "32x32.onnx")})
    assert cache.build((32, 32), lambda: torch.nn.Identity(), failed=vouched) == folder / "32x32.onnx"
    assert built == [(32, 32)] * 2


def test_processes_sharing_a_cold_cache_export_a_graph_once(warm, tmp_path, monkeypatch):
    """One builder holds the graph's lock while it exports; another (here a thread with its
    own descriptor, as a second process would have) waits for it, then takes that graph
    without making the torch model."""
    import fcntl
    import threading

    cache, folder = _cache_copy(warm, tmp_path)
    for name in ("32x32.onnx", "32x32.json"):
        (folder / name).unlink()
    model = warm["segmenter"].backbone.torch_model()
    exporting, finish, second_went_on, made = threading.Event(), threading.Event(), threading.Event(), []

    def first_model():
        exporting.set()
        assert finish.wait(60)
        return model

    def second_model():
        made.append("second")
        second_went_on.set()
        return model

    def flock(fd, operation, real=fcntl.flock):
        if threading.current_thread().name == "second":  # about to wait on the first's lock
            second_went_on.set()
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", cache.build((32, 32), first_model)))
    first.start()
    assert exporting.wait(60)
    second = threading.Thread(target=lambda: results.setdefault("second", cache.build((32, 32), second_model)),
                              name="second")
    second.start()
    # The first export ends once the second builder has gone as far as it goes alone: to the
    # lock (where it waits, or takes it after the first let go) or, without one, to a model
    # of its own. Either order of the two threads then gives the same outcome.
    assert second_went_on.wait(60)
    finish.set()
    first.join(60)
    second.join(60)
    assert made == [] and results == {"first": folder / "32x32.onnx", "second": folder / "32x32.onnx"}
    assert cache.valid_graph((32, 32)) == folder / "32x32.onnx"


def test_other_weights_get_another_cache_entry(tiny_config):
    from magseg.segmenter import create_segmenter_model

    a, b = create_segmenter_model(tiny_config), create_segmenter_model(tiny_config)
    model = tiny_config.to_dict()["model"]
    assert rt.state_sha256(a) == rt.state_sha256(a)
    assert rt.graph_key(rt.state_sha256(a), model, 4) != rt.graph_key(rt.state_sha256(b), model, 4)
    assert rt.graph_key("x", model, 4) != rt.graph_key("x", {**model, "encoder": "resnet18"}, 4)


def test_cache_root_config_over_env_over_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("MAGSEG_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert rt.cache_root() == tmp_path / "xdg" / "magseg" / "graphs"
    monkeypatch.setenv("MAGSEG_CACHE_DIR", str(tmp_path / "env"))
    assert rt.cache_root() == tmp_path / "env" / "graphs"
    assert rt.cache_root(str(tmp_path / "cfg")) == tmp_path / "cfg" / "graphs"


def test_resolve_runtime(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(rt, "installed", lambda r: r in ("torch", "onnxruntime"))
    assert rt.resolve_runtime("auto", cpu) == "onnxruntime"
    assert rt.resolve_runtime("auto", cpu, multi_context=True) == "torch"
    assert rt.resolve_runtime("auto", cuda) == "torch"
    assert rt.resolve_runtime("torch", cuda) == "torch"
    with pytest.raises(ConfigError, match=r"magseg\[openvino\]"):
        rt.resolve_runtime("openvino", cpu)
    with pytest.raises(ConfigError, match="engine.runtime=torch"):
        rt.resolve_runtime("onnxruntime", cuda)
    with pytest.raises(ConfigError, match="fctl"):
        rt.resolve_runtime("onnxruntime", cpu, multi_context=True)
    monkeypatch.setattr(rt, "installed", lambda r: True)
    assert rt.resolve_runtime("auto", cpu) == "openvino"


def test_runtime_precision(monkeypatch):
    assert rt.runtime_precision("onnxruntime", "bf16") == "fp32"
    assert rt.runtime_precision("openvino", "fp16") == "fp32"
    assert rt.runtime_precision("torch", "bf16") == "bf16"
    # OpenVINO computes bf16 only on a CPU with bf16 kernels; elsewhere its bf16 hint is f32.
    for native, expected in [(True, "bf16"), (False, "fp32")]:
        openvino = dataclasses.replace(rt.GRAPH_RUNTIMES["openvino"], native=lambda p, n=native: n)
        monkeypatch.setitem(rt.GRAPH_RUNTIMES, "openvino", openvino)
        assert rt.runtime_precision("openvino", "bf16") == expected
        assert rt.runtime_precision("openvino", "fp32") == "fp32"


def test_openvino_reports_the_precision_its_compiled_model_computes_in(tmp_path):
    # Whatever this CPU is: what runtime_precision reports for a bf16 request is what the
    # graph OpenVINO compiles for it runs at (bf16 with AVX512-BF16 or AMX, f32 without).
    pytest.importorskip("openvino")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    shape = [1, 4, 8, 8]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", rt.OPSET)]), path)
    for asked in ("bf16", "fp32"):
        compiled = rt._openvino_compile(path, 1, asked)  # a file, as the engine's runner does
        hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        del compiled
        assert rt.runtime_precision("openvino", asked) == {"bf16": "bf16", "f32": "fp32"}[hint]


@pytest.mark.parametrize("vnni", [True, False])
def test_int8_quantisation_writes_a_calibrated_int8_graph_close_to_fp32(warm, tmp_path, monkeypatch, vnni):
    """quantize_int8: int8 weights and QDQ pairs in the file, the calibration's ranges used
    (probabilities near fp32's on inputs like the calibration windows), nothing but the
    output left behind; no window is a ConfigError with no file written. Bounds, not bits:
    int8 kernels differ between AVX2, AVX512 and VNNI. Without VNNI (as CI's AVX2-only CPUs)
    the weights take 7 bits, so no u8 x s8 pair can saturate int16."""
    import onnx
    import onnxruntime as ort
    from collections import Counter

    from magseg.engine import precision

    monkeypatch.setattr(precision, "cpu_has_vnni", lambda: vnni)

    src = _graph_dir(warm["cache"]) / "32x32.onnx"
    rng = np.random.default_rng(0)
    windows = [rng.standard_normal((4, 3, 32, 32)).astype(np.float32) for _ in range(4)]
    dst = tmp_path / "int8.onnx"
    rt.quantize_int8(src, dst, windows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx"]
    model = onnx.load(str(dst))
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["QuantizeLinear"] >= ops["Conv"] > 0 and ops["DequantizeLinear"] > ops["Conv"]
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8) == ops["Conv"]  # every convolution's weights, as int8
    widest = max(int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int16)).max()) for t in int8)
    assert widest <= 64 if not vnni else widest > 64
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)

    def probs(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"image": x})[0]).softmax(1)

    want, got = probs(src), probs(dst)
    assert (got - want).abs().mean().item() < 0.02
    assert (got.argmax(1) == want.argmax(1)).float().mean().item() >= 0.8
    with pytest.raises(ConfigError, match="calibration"):
        rt.quantize_int8(src, tmp_path / "none.onnx", [])
    assert not (tmp_path / "none.onnx").exists()


@pytest.mark.skipif(not rt.installed("openvino"), reason="openvino not installed (magseg[openvino])")
def test_openvino_bf16_stays_near_fp32(warm, tmp_path):
    """engine.precision=bf16 with OpenVINO: bf16 where the CPU has it (f32 elsewhere, which
    the bounds hold for too)."""
    from magseg.segmenter import Segmenter

    shutil.copytree(warm["cache"], tmp_path / "cache")
    segmenter = Segmenter.from_checkpoint(warm["ckpt"], [
        "engine.runtime=openvino", "engine.precision=bf16", f"engine.cache_dir={tmp_path / 'cache'}"])
    result = segmenter.segment(warm["scene"], return_probs=True)
    # What the compiled graph computes in, as the outputs report it: bf16 only where the CPU
    # has bf16 kernels; an AVX2-only CPU compiles the bf16 hint to f32.
    (hint,) = {run.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
               for run in segmenter.backbone._runners.values()}  # one per input size, all alike
    assert segmenter.runtime["precision"] == {"bf16": "bf16", "f32": "fp32"}[hint]
    # A mean: a pixel whose top-K pick flips can move by far more than bf16's rounding.
    assert (result.probs - warm["reference"].probs).abs().mean().item() < 0.01
    assert (result.labels == warm["reference"].labels).float().mean().item() >= 0.95


def test_the_config_schema_offers_every_runtime_and_no_other():
    """A runtime is named twice: its ``GRAPH_RUNTIMES`` entry here and ``engine.runtime``'s
    values in the config schema (which cannot import the engine); this keeps them one list."""
    from typing import get_args, get_type_hints

    from magseg.config import EngineConfig

    assert set(get_args(get_type_hints(EngineConfig)["runtime"])) == {"auto", *rt.RUNTIMES}


@pytest.mark.skipif(not rt.installed("openvino"), reason="openvino not installed (magseg[openvino])")
def test_openvino_reproduces_the_torch_engine(warm, tmp_path):
    from magseg.segmenter import Segmenter

    shutil.copytree(warm["cache"], tmp_path / "cache")
    segmenter = Segmenter.from_checkpoint(warm["ckpt"], [
        "engine.runtime=openvino", "engine.precision=fp32", f"engine.cache_dir={tmp_path / 'cache'}"])
    result = segmenter.segment(warm["scene"], return_probs=True)
    assert segmenter.runtime["backbone_runtime"] == "openvino"
    assert (result.probs - warm["reference"].probs).abs().max().item() < 1e-4


class _CountingCore:
    """OpenVINO's Core, counting what it compiles and what it imports."""

    def __init__(self, core):
        self.core, self.compiled, self.imported = core, 0, 0

    def compile_model(self, *args, **kwargs):
        self.compiled += 1
        return self.core.compile_model(*args, **kwargs)

    def import_model(self, *args, **kwargs):
        self.imported += 1
        return self.core.import_model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.core, name)


@pytest.mark.skipif(not rt.installed("openvino"), reason="openvino not installed (magseg[openvino])")
def test_openvino_keeps_its_compiled_graphs_and_imports_only_checked_ones(warm, tmp_path, monkeypatch):
    """A second run imports each size's compiled graph instead of compiling it, with the
    same probabilities bit for bit; a blob whose bytes changed is compiled anew and kept
    again, valid; one that cannot be written costs nothing but the keeping."""
    from magseg.segmenter import Segmenter

    core = _CountingCore(rt._openvino_core())
    monkeypatch.setattr(rt, "_openvino_core", lambda: core)
    shutil.copytree(warm["cache"], tmp_path / "cache")
    shutil.rmtree(_graph_dir(tmp_path / "cache") / "compiled", ignore_errors=True)  # ONNX Runtime's
    sets = ["engine.runtime=openvino", "engine.precision=fp32", f"engine.cache_dir={tmp_path / 'cache'}"]

    def run():
        core.compiled = core.imported = 0
        return Segmenter.from_checkpoint(warm["ckpt"], sets).segment(warm["scene"], return_probs=True).probs

    first = run()
    sizes = core.compiled
    blobs = sorted((_graph_dir(tmp_path / "cache") / "compiled").glob("*.blob"))
    assert sizes >= 1 and core.imported == 0 and len(blobs) == sizes
    assert all(rt.CompiledBlob(b).read() == b.read_bytes() for b in blobs)
    assert torch.equal(run(), first) and (core.compiled, core.imported) == (0, sizes)
    damaged = bytearray(blobs[0].read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    blobs[0].write_bytes(bytes(damaged))
    assert rt.CompiledBlob(blobs[0]).read() is None
    assert torch.equal(run(), first) and (core.compiled, core.imported) == (1, sizes - 1)
    assert rt.CompiledBlob(blobs[0]).read() == blobs[0].read_bytes() != bytes(damaged)
    # A blob that cannot be kept (its folder is a file) leaves the run as it was.
    shutil.rmtree(blobs[0].parent)
    blobs[0].parent.write_text("not a folder")
    assert torch.equal(run(), first) and (core.compiled, core.imported) == (sizes, 0)


@pytest.mark.skipif(not rt.installed("openvino"), reason="openvino not installed (magseg[openvino])")
def test_a_compiled_graph_is_kept_under_all_it_depends_on(tmp_path, monkeypatch):
    cache = rt.GraphCache(tmp_path, "key", 3)
    base = cache.compiled_blob("digest", (64, 64), 2, "fp32").path
    assert base.parent == tmp_path / "key" / "compiled"
    others = [cache.compiled_blob("other", (64, 64), 2, "fp32"), cache.compiled_blob("digest", (64, 32), 2, "fp32"),
              cache.compiled_blob("digest", (64, 64), 1, "fp32"), cache.compiled_blob("digest", (64, 64), 2, "bf16"),
              cache.compiled_blob("digest", (64, 64), 2, "fp32", "onnxruntime")]
    target = rt._runtime_target("openvino")
    assert target["flags"] and target["openvino"] and target["capabilities"]
    monkeypatch.setattr(rt, "_runtime_target", lambda runtime: {**target, "flags": [*target["flags"], "avx512_bf16"]})
    others.append(cache.compiled_blob("digest", (64, 64), 2, "fp32"))
    assert len({base, *(o.path for o in others)}) == 7


def test_onnxruntime_keeps_its_optimised_graphs_and_loads_only_checked_ones(warm, tmp_path, monkeypatch):
    """A second run loads each size's graph as ONNX Runtime optimised it (bytes, nothing
    left to optimise) with the same probabilities; a kept graph whose bytes changed is
    optimised anew and kept again, valid."""
    import onnxruntime as ort

    from magseg.segmenter import Segmenter

    made = []
    session = ort.InferenceSession

    def counted(model, sess_options=None, providers=None):
        made.append(("kept" if isinstance(model, bytes) else "optimised", sess_options.graph_optimization_level))
        return session(model, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", counted)
    shutil.copytree(warm["cache"], tmp_path / "cache")
    compiled = _graph_dir(tmp_path / "cache") / "compiled"
    shutil.rmtree(compiled)
    sets = ["engine.runtime=onnxruntime", f"engine.cache_dir={tmp_path / 'cache'}"]

    def run():
        made.clear()
        return Segmenter.from_checkpoint(warm["ckpt"], sets).segment(warm["scene"], return_probs=True).probs

    first = run()
    sizes = len(made)
    assert sizes >= 1 and {m[0] for m in made} == {"optimised"}
    blobs = sorted(compiled.glob("*.blob"))
    assert len(blobs) == sizes and all(rt.CompiledBlob(b).read() is not None for b in blobs)
    assert (first - warm["result"].probs).abs().max().item() < 1e-6
    second = run()
    assert made == [("kept", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)] * sizes
    assert (second - first).abs().max().item() < 1e-6
    damaged = bytearray(blobs[0].read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    blobs[0].write_bytes(bytes(damaged))
    run()
    assert sorted(m[0] for m in made) == ["kept"] * (sizes - 1) + ["optimised"]
    assert rt.CompiledBlob(blobs[0]).read() == blobs[0].read_bytes() != bytes(damaged)


def test_start_up_from_a_warm_cache_imports_neither_smp_nor_timm(warm):
    """The predict path (checkpoint -> Segmenter -> segment) with a cached graph. Nor numba:
    a small image's stages take the eager refine step (magseg.engine.fused.worth_fusing)."""
    code = textwrap.dedent(f"""
        import sys, torch
        from magseg.segmenter import Segmenter
        s = Segmenter.from_checkpoint({str(warm['ckpt'])!r},
            ["engine.runtime=onnxruntime", "engine.cache_dir={warm['cache']}"])
        s.segment(torch.zeros(3, 128, 128))
        print(sorted(m for m in ("segmentation_models_pytorch", "timm", "torchvision", "numba")
                     if m in sys.modules))
    """)
    # close_fds=False lets subprocess use posix_spawn rather than fork: this process has run
    # OpenVINO, whose thread library's fork handlers can crash a fork from it.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, close_fds=False)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


def test_a_run_marks_what_it_uses_for_the_cache_prune(warm, tmp_path):
    """A run from a warm cache gives the sidecar of each kept optimised graph it loads the
    current time (what ``magseg cache --older-than`` reads), and leaves the graphs' own
    sidecars as they were; without kept forms, the graphs' sidecars get it."""
    from magseg.cache import entry

    cache, folder = _cache_copy(warm, tmp_path)
    old = time.time() - 90 * 86_400
    for path in folder.rglob("*"):
        os.utime(path, (old, old))
    x = torch.randn(2, 3, 32, 32)
    rt.RuntimeBackbone("onnxruntime", cache, _no_torch_model)(x)
    fresh = {p.name for p in folder.rglob("*.json") if p.stat().st_mtime > old + 3600}
    (blob,) = [p for p in (folder / "compiled").glob("*.blob") if p.with_suffix(".json").name in fresh]
    assert fresh == {blob.with_suffix(".json").name}
    assert entry(folder).last_used > time.time() - 3600

    shutil.rmtree(folder / "compiled")
    for path in folder.rglob("*"):
        os.utime(path, (old, old))
    rt.RuntimeBackbone("onnxruntime", cache, _no_torch_model)(x)
    assert (folder / "32x32.json").stat().st_mtime > old + 3600


def test_magseg_predict_from_a_warm_cache_imports_no_model_library_nor_polygon_one(warm, tmp_path):
    """The whole ``magseg predict`` command on a GeoTIFF, graph cached: besides smp and timm
    (and what they bring), no shapely either when no polygons are asked for. The outputs are
    checked to be made, so the command really ran through."""
    from geotiff import smooth_image, write_raster

    scene = write_raster(tmp_path / "scene.tif", smooth_image(3, 96, 112))
    code = textwrap.dedent(f"""
        import sys
        from magseg.cli.app import main
        sys.argv = ["magseg", "predict", {str(warm['ckpt'])!r}, {str(scene)!r}, "-o", {str(tmp_path / 'out')!r},
                    "-q", "--set", "engine.runtime=onnxruntime", "--set", "engine.cache_dir={warm['cache']}"]
        try:
            main()
        except SystemExit as stop:
            assert not stop.code, stop.code
        print(sorted(m for m in ("segmentation_models_pytorch", "timm", "torchvision", "shapely")
                     if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, close_fds=False)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr[-2000:]
    assert (tmp_path / "out" / "scene.tif").is_file()


def test_onnxruntime_threads_sleep_between_runs(tmp_path, monkeypatch):
    # Spinning threads would hold the cores the engine's own work needs between batches.
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    seen = []

    class Session:
        def __init__(self, path, sess_options=None, providers=None):
            seen.append(sess_options)

    monkeypatch.setattr(ort, "InferenceSession", Session)
    rt._ort_runner(tmp_path / "graph.onnx", 2, "fp32")
    assert seen[0].get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert seen[0].intra_op_num_threads == 2


@pytest.mark.parametrize("takes_channels_last", [True, False])
def test_run_backbone_hands_a_runtimes_graph_nchw_even_with_channels_last(takes_channels_last):
    # A runtime's graph takes NCHW: a channels-last copy would only be copied back.
    from magseg.engine.backbone import run_backbone

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(x.is_contiguous())
            return x[:, :2]

    probe = Probe()
    probe.takes_channels_last = takes_channels_last
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(run_backbone(probe, x, channels_last=True), x[:, :2])
    assert seen == [not takes_channels_last]
    assert rt.RuntimeBackbone.takes_channels_last is False


def test_a_checkpoint_shipped_as_bytes_keys_the_cache_by_those_bytes(warm, tmp_path):
    # A Ray worker on another machine builds its model from the checkpoint's bytes under the
    # driver's path name. There the path may hold nothing, or another checkpoint (a newer
    # best.ckpt): the graph used, and the provenance, must be the shipped bytes' own.
    import hashlib

    from magseg.checkpoint import checkpoint_from_bytes, save_checkpoint
    from magseg.config import load_config
    from magseg.segmenter import Segmenter, create_refiner, create_segmenter_model

    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"))
    torch.manual_seed(7)
    other = save_checkpoint(tmp_path / "other.ckpt", config, create_segmenter_model(config),
                            create_refiner(config))
    cache = tmp_path / "cache"  # the module's cache, which other tests expect to hold one model
    shutil.copytree(warm["cache"], cache)
    overrides = ["engine.runtime=onnxruntime", f"engine.cache_dir={cache}"]
    Segmenter.from_checkpoint(other, overrides).segment(warm["scene"])  # the cache holds its graph too
    data = warm["ckpt"].read_bytes()
    for name in (other, tmp_path / "nowhere" / "tiny.ckpt"):
        shipped = Segmenter.from_checkpoint(checkpoint_from_bytes(data, name), overrides)
        assert shipped.checkpoint_sha256 == hashlib.sha256(data).hexdigest()
        got = shipped.segment(warm["scene"], return_probs=True)
        assert (got.probs - warm["result"].probs).abs().max().item() < 1e-6, name
