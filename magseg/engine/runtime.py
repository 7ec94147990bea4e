"""What runs the backbone: torch eager, or its exported ONNX graph in ONNX Runtime or OpenVINO.

``engine.runtime``:

- ``torch``: the ``nn.Module`` itself (training always uses it);
- ``onnxruntime`` / ``openvino``: the backbone exported once to ONNX (opset 18, dynamic
  batch, fixed input size) and kept in a cache; ``RuntimeBackbone`` runs that graph and
  looks like any other backbone to the engine. OpenVINO's graph ends in the softmax, and
  its ``RuntimeBackbone`` returns probabilities (``returns_probabilities``): there the
  softmax is nearly free (Unet-ResNet18 at bf16, a 2448 px scene: the backbone calls 19 ms
  longer, the engine's own work 51 ms shorter), while ONNX Runtime's softmax over the
  channel axis took 100 ms a batch more than the engine's own
  (docs/runtimes.md#the-softmax-in-the-graph);
- ``auto``: the fastest one installed for the device (``resolve_runtime``).

The cache (``GraphCache``) is one folder per model, named by a digest of its weights (the
checkpoint file's SHA-256) and the model config, holding one graph per input size
(``<h>x<w>.onnx``), each with a JSON sidecar recording its own SHA-256. A graph whose
sidecar is missing, unreadable, of another key or size, or whose bytes do not hash to the
recorded digest is rebuilt from the torch model, never trusted; so is one the runtime cannot
load. ``model.json`` records the backbone's input multiple, so a warm cache needs no torch
model at all: a run from it imports neither segmentation-models-pytorch nor timm. What each
runtime makes of a graph for this CPU (OpenVINO's compiled graph, ONNX Runtime's optimised
one) is kept there too (``compiled/``, ``GraphCache.compiled_blob``), checked against its
own digest before it is used.

The refiner stays in torch. It is a tenth of the engine's time (the demo model, one thread),
and its exported graph (``export_refiner_onnx``, which ``magseg export`` writes beside the
backbone) ran slower in ONNX Runtime than torch's in-place ``Refiner.probs`` (1.7x, same
crops; docs/runtimes.md#the-refiner).

``engine.precision=int8`` runs OpenVINO on the model's int8 graph, which ``magseg quantize``
puts in the same cache folder (``int8.xml``/``.bin``, one graph for every input size, with
its own sidecar; ``magseg.engine.int8``): it needs training windows, so it is never made
here, and a run asking for it without one is a usage error naming that command.

``quantize_int8`` quantises an exported graph to int8 with ONNX Runtime's static
quantisation; magseg offers it nowhere, since it cost more than half a point of mIoU
(docs/runtimes.md#reduced-precision; ``scripts/runtime_miou.py`` measures it).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from magseg.cache import INT8_STEMS, cache_root, mark_used
from magseg.errors import ConfigError
from magseg.io.atomic import atomic_write, entry_lock

# Bumped whenever what the cache's graphs compute changes: older entries are then rebuilt.
# 2: a graph may end in the softmax (``<h>x<w>.probs.onnx``), its sidecar says so.
GRAPH_FORMAT = 2
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "image", "logits"
PROBS_NAME = "probabilities"  # the output of a graph that ends in the softmax


def exporter_installed() -> bool:
    """Whether a backbone can be exported to ONNX here (torch's exporter needs onnxscript)."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))


def installed(runtime: str) -> bool:
    """Whether ``runtime`` can run here: torch always; the others when their package and the
    exporter are (both extras bring it)."""
    if runtime == "torch":
        return True
    return importlib.util.find_spec(GRAPH_RUNTIMES[runtime].module) is not None and exporter_installed()


def resolve_runtime(choice: str, device: torch.device, multi_context: bool = False) -> str:
    """The runtime ``engine.runtime=choice`` means for ``device``.

    ``auto`` on a CPU: the first installed of ``GRAPH_RUNTIMES`` (OpenVINO, else ONNX
    Runtime), else torch; on CUDA, and for multi-context backbones (FCtL, two inputs), torch.

    Raises:
        ConfigError: an explicit runtime that is not installed, or cannot run this backbone
            on this device (the message names the key and the fix).
    """
    if choice == "auto":
        if device.type != "cpu" or multi_context:
            return "torch"
        return next((r for r in GRAPH_RUNTIMES if installed(r)), "torch")
    if choice == "torch":
        return choice
    if choice not in RUNTIMES:
        raise ConfigError(f"engine.runtime={choice}: choose {', '.join(RUNTIMES)} or auto")
    if not installed(choice):
        graph_runtime = GRAPH_RUNTIMES[choice]
        raise ConfigError(f"engine.runtime={choice} needs {graph_runtime.module}, onnx and onnxscript: "
                          f"pip install '{graph_runtime.extra}', or use engine.runtime=torch")
    if device.type != "cpu":
        raise ConfigError(f"engine.runtime={choice} runs on the CPU here; with "
                          f"engine.device={device} use engine.runtime=torch (or auto)")
    if multi_context:
        raise ConfigError(f"engine.runtime={choice} runs single-input backbones; a "
                          "multi-context one (model.arch=fctl) needs engine.runtime=torch (or auto)")
    return choice


def runtime_precision(runtime: str, precision: str) -> str:
    """The precision a runtime computes in, for the resolved ``precision``: torch runs what
    was asked; a graph runtime runs it where it has the kernels (``Runtime.precisions``) and
    this CPU has them (``Runtime.native``), else fp32."""
    if runtime == "torch":
        return precision
    graph_runtime = GRAPH_RUNTIMES[runtime]
    if precision not in graph_runtime.precisions:
        return "fp32"
    return precision if graph_runtime.native is None or graph_runtime.native(precision) else "fp32"


def check_precision(runtime: str, precision: str) -> None:
    """``engine.precision=int8`` is OpenVINO's (the int8 graph ``magseg quantize`` makes):
    with any other runtime a ConfigError naming the fix, rather than fp32 in its place."""
    if precision == "int8" and runtime != "openvino":
        raise ConfigError(f"engine.precision=int8 runs the backbone's int8 graph in OpenVINO, not in {runtime}: "
                          "set engine.runtime=openvino (pip install 'magseg[int8]'), or another precision")


def state_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's weights (names, shapes, dtypes, bytes): the cache key of a
    model that did not come from a checkpoint file."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def graph_key(weights_sha256: str, model_config: dict[str, Any], classes: int) -> str:
    """The cache folder of a model: its weights, the config that builds it, the format."""
    text = json.dumps({"weights": weights_sha256, "model": model_config, "classes": classes,
                       "format": GRAPH_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _file_sha256(path: Path) -> str:
    from magseg.io.provenance import file_sha256

    return file_sha256(path)


class _Logits(nn.Module):
    """The exported function: ``(B, C_in, h, w)`` -> ``(B, classes, h, w)`` logits (the first
    output of smp models with an auxiliary head), or probabilities with ``softmax``."""

    def __init__(self, backbone: nn.Module, softmax: bool = False) -> None:
        super().__init__()
        self.backbone, self.softmax = backbone, softmax

    def forward(self, x: Tensor) -> Tensor:
        out = self.backbone(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.softmax(dim=1) if self.softmax else out


def export_onnx(
    backbone: nn.Module, path: Path, in_channels: int, size: tuple[int, int], *,
    softmax: bool = False, metadata: dict[str, str] | None = None, output_name: str = OUTPUT_NAME,
    free_size: bool = False,
) -> None:
    """Write ``backbone`` as one self-contained ONNX file (opset 18, batch dynamic, input
    ``(B, in_channels, *size)`` named ``image``), atomically, with ``metadata`` as its
    ``metadata_props``. ``free_size``: height and width dynamic too (``size`` is then only
    the example traced); slower to export, and some encoders' exports take minutes.

    torch's ``torch.export``-based exporter (``dynamo=True``; it works offline and names
    every output dimension), its weights kept inside the file rather than beside it.
    """
    was_training = backbone.training
    backbone = backbone.float().eval()  # a channels-last or half model exports the same graph
    try:
        _save_onnx(_Logits(backbone, softmax).eval(), {INPUT_NAME: (in_channels, *size)}, path,
                   output_name, metadata, free_size=free_size)
    finally:
        backbone.train(was_training)


class _RefinerProbs(nn.Module):
    """The exported refiner: ``(fine, coarse)``, each ``(B, C, h, w)`` probabilities ->
    ``(B, C, h, w)`` refined probabilities, ``softmax(refiner(fine, coarse))``."""

    def __init__(self, refiner: nn.Module) -> None:
        super().__init__()
        self.refiner = refiner

    def forward(self, fine: Tensor, coarse: Tensor) -> Tensor:
        return self.refiner(fine, coarse).softmax(dim=1)


REFINER_INPUTS, REFINER_OUTPUT = ("fine", "coarse"), PROBS_NAME


def export_refiner_onnx(refiner: nn.Module, path: Path, classes: int, size: tuple[int, int], *,
                        metadata: dict[str, str] | None = None) -> None:
    """Write the refiner as one ONNX file: inputs ``fine`` and ``coarse``, each ``(B, classes,
    *size)`` probabilities (batch dynamic), output ``probabilities`` ``(B, classes, *size)``,
    the softmax of its refined logits (what the engine's ``Refiner.probs`` computes, up to
    its log floor of 1e-6)."""
    was_training = refiner.training
    refiner = refiner.float().eval()
    try:
        # Traced with autograd on: magseg's Refiner takes its inference shortcut (reading its
        # gate's four numbers as Python floats) only without it, and a traced graph cannot.
        _save_onnx(_RefinerProbs(refiner).eval(), {n: (classes, *size) for n in REFINER_INPUTS},
                   path, REFINER_OUTPUT, metadata, grad=True)
    finally:
        refiner.train(was_training)


def _save_onnx(module: nn.Module, inputs: dict[str, tuple[int, ...]], path: Path, output_name: str,
               metadata: dict[str, str] | None, grad: bool = False, free_size: bool = False) -> None:
    """Export ``module`` (inputs named and shaped ``(B, *shape)``, batch dynamic; with
    ``free_size`` height and width too) to ``path``."""
    import onnx

    examples = tuple(torch.rand(2, *shape) for shape in inputs.values())  # batch 1 would be specialised
    batch = torch.export.Dim("batch", min=1, max=4096)
    dims: dict[int, Any] = {0: batch}
    if free_size:
        dims.update({2: torch.export.Dim("height", min=1, max=65536), 3: torch.export.Dim("width", min=1, max=65536)})
    # Autocast off: the engine's first call, which may export, runs under the engine's
    # bf16/fp16 autocast, and a graph traced there would hold its casts.
    with torch.set_grad_enabled(grad), torch.autocast("cpu", enabled=False), \
            torch.autocast("cuda", enabled=False):
        program = torch.onnx.export(
            module, examples, dynamo=True, opset_version=OPSET, input_names=list(inputs),
            output_names=[output_name], dynamic_shapes=tuple(dict(dims) for _ in inputs),
            verbose=False,
        )
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_write(path) as tmp:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)


class GraphCache:
    """One model's exported graphs, one per input size, each checked before it is used;
    with ``softmax``, graphs that end in the softmax (probabilities out), kept beside the
    others under their own names."""

    def __init__(self, root: Path, key: str, in_channels: int, softmax: bool = False) -> None:
        self.dir = root / key
        self.key = key
        self.in_channels = in_channels
        self.softmax = softmax

    def _read_json(self, path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("key") == self.key else None

    def _write_json(self, path: Path, data: dict[str, Any]) -> None:
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps({"key": self.key, "format": GRAPH_FORMAT, **data}))

    def input_multiple(self) -> int | None:
        """The backbone's input multiple as recorded (None when not yet, or unreadable)."""
        data = self._read_json(self.dir / "model.json")
        multiple = None if data is None else data.get("input_multiple")
        return multiple if isinstance(multiple, int) and multiple >= 1 else None

    def record_input_multiple(self, multiple: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_json(self.dir / "model.json", {"input_multiple": multiple})

    def paths(self, size: tuple[int, int]) -> tuple[Path, Path]:
        name = f"{size[0]}x{size[1]}" + (".probs" if self.softmax else "")
        return self.dir / f"{name}.onnx", self.dir / f"{name}.json"

    def _graph_record(self, size: tuple[int, int]) -> dict[str, Any] | None:
        """The sidecar of the graph for ``size`` when it describes such a graph (this format,
        size, input bands and ending) and names a digest; the graph's bytes are not read."""
        data = self._read_json(self.paths(size)[1])
        if (data is None or data.get("format") != GRAPH_FORMAT or data.get("size") != list(size)
                or data.get("in_channels") != self.in_channels or data.get("softmax") is not self.softmax
                or not isinstance(data.get("sha256"), str)):
            return None
        return data

    def valid_graph(self, size: tuple[int, int]) -> Path | None:
        """The graph for ``size`` if its sidecar vouches for exactly these bytes, else None."""
        (graph, sidecar), data = self.paths(size), self._graph_record(size)
        if data is None or not graph.is_file() or _file_sha256(graph) != data["sha256"]:
            return None
        mark_used(sidecar)
        return graph

    def graph_digest(self, size: tuple[int, int]) -> str | None:
        """The SHA-256 its sidecar records for the graph of ``size`` (what its compiled forms
        are kept under: ``compiled_blob``); None without a sidecar for such a graph. The
        graph itself is not read: ``valid_graph`` checks its bytes where they are used."""
        data = self._graph_record(size)
        return None if data is None else data["sha256"]

    def build(self, size: tuple[int, int], backbone: Callable[[], nn.Module], failed: str | None = None) -> Path:
        """The graph for ``size``, exported from ``backbone()`` (the torch model, made only
        when it is exported) with the file's digest recorded, replacing whatever was there.

        One process at a time, under a lock on the graph's file: processes sharing the cache
        (Ray actors on one machine, runs side by side) export it once. One that waited takes
        the graph another built meanwhile, unless that graph's digest is ``failed`` (a graph
        that checked out but that the runtime could not load)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with entry_lock(self.paths(size)[0]):
            built = self.valid_graph(size)
            if built is not None and self.graph_digest(size) != failed:
                return built
            return self._export(size, backbone())

    def _export(self, size: tuple[int, int], backbone: nn.Module) -> Path:
        """Export ``backbone`` for ``size`` and record the file's digest (``build``'s work,
        under its lock)."""
        graph, sidecar = self.paths(size)
        sidecar.unlink(missing_ok=True)  # a crash between the two writes leaves no voucher
        export_onnx(backbone, graph, self.in_channels, size, softmax=self.softmax,
                    output_name=PROBS_NAME if self.softmax else OUTPUT_NAME)
        self._write_json(sidecar, {"size": list(size), "in_channels": self.in_channels, "softmax": self.softmax,
                                   "sha256": _file_sha256(graph), "opset": OPSET,
                                   "torch": torch.__version__})
        return graph

    # The int8 graphs ``magseg quantize`` makes (magseg.engine.int8), OpenVINO IR, never
    # rebuilt here since they need training data: the backbone's (``part`` "backbone"), one
    # for every input size (height and width free), and the refiner's convolutions
    # ("refiner"), likewise one for every size of cells; named by ``magseg.cache.INT8_STEMS``.
    def int8_paths(self, part: str = "backbone") -> tuple[Path, Path, Path]:
        """``part``'s int8 graph (``int8.xml`` and ``int8.bin`` for the backbone,
        ``refiner-int8.*`` for the refiner) and its sidecar ``.json``."""
        stem = INT8_STEMS[part]
        return self.dir / f"{stem}.xml", self.dir / f"{stem}.bin", self.dir / f"{stem}.json"

    def int8_record(self, part: str = "backbone", in_channels: int | None = None) -> dict[str, Any] | None:
        """``part``'s int8 sidecar (its digests and calibration) when it vouches for exactly
        the bytes of both files and a graph of ``in_channels`` inputs (the backbone's bands
        when None), else None."""
        xml, weights, sidecar = self.int8_paths(part)
        data = self._read_json(sidecar)
        channels = self.in_channels if in_channels is None else in_channels
        if (data is None or data.get("format") != GRAPH_FORMAT or data.get("in_channels") != channels
                or not xml.is_file() or not weights.is_file()):
            return None
        digests = data.get("sha256")
        if not isinstance(digests, dict) or digests.get("xml") != _file_sha256(xml) \
                or digests.get("bin") != _file_sha256(weights):
            return None
        mark_used(sidecar)
        return data

    # The runtimes' compiled graphs: OpenVINO's as ``export_model``'s blobs (importing one
    # took 0.04-0.08 s where compiling took 0.16-0.22 s a size for an fp32 graph and
    # 0.56-0.84 s for the int8 one reshaped to it, the demo model), ONNX Runtime's as the
    # graph it optimised (docs/runtimes.md#the-graph-cache). A blob is named by a digest of
    # all it depends on (the graph's bytes, the input size, threads and precision, the
    # runtime and its version, the CPU), and used only if its bytes hash to what its sidecar
    # says: OpenVINO's own cache (CACHE_DIR) checks no bytes, and imported a blob with 64
    # bytes flipped without a word.
    def compiled_blob(self, graph_digest: str, size: tuple[int, int], threads: int, precision: str,
                      runtime: str = "openvino") -> CompiledBlob:
        """Where ``runtime``'s compiled form of the graph with ``graph_digest`` is kept, for
        inputs of ``size`` on ``threads`` threads at ``precision``, on this CPU and version."""
        text = json.dumps({"graph": graph_digest, "size": list(size), "threads": threads, "precision": precision,
                           "format": GRAPH_FORMAT, "runtime": runtime, **_runtime_target(runtime)},
                          sort_keys=True)
        return CompiledBlob(self.dir / "compiled" / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.blob")

    def save_int8(self, model: Any, record: dict[str, Any], part: str = "backbone",
                  in_channels: int | None = None) -> Path:
        """Write ``model`` (an ``openvino.Model``) as ``part``'s int8 graph (of ``in_channels``
        inputs: the backbone's bands when None), ``record`` (what it was calibrated on) in
        its sidecar; the sidecar goes last, so a crash leaves no voucher."""
        xml, weights, sidecar = self.int8_paths(part)
        self.dir.mkdir(parents=True, exist_ok=True)
        sidecar.unlink(missing_ok=True)
        save_openvino(model, xml, weights)
        self._write_json(sidecar, {**record, "in_channels": self.in_channels if in_channels is None else in_channels,
                                   "sha256": {"xml": _file_sha256(xml), "bin": _file_sha256(weights)}})
        return xml


def save_openvino(model: Any, xml: Path, weights: Path) -> None:
    """Write ``model`` (an ``openvino.Model``) as OpenVINO IR, ``xml`` and its ``weights``
    (``.bin``, same stem) put in place together, atomically; weights as they are (no fp16)."""
    import shutil
    import tempfile

    import openvino as ov

    from magseg.io.atomic import atomic_writes

    scratch = Path(tempfile.mkdtemp(prefix=".magseg-ir-", dir=xml.parent))
    try:
        ov.save_model(model, str(scratch / "model.xml"), compress_to_fp16=False)
        with atomic_writes({"xml": xml, "bin": weights}) as tmp:
            os.replace(scratch / "model.xml", tmp["xml"])
            os.replace(scratch / "model.bin", tmp["bin"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# The operators int8 quantisation rewrites: the convolutions and matrix products hold the
# arithmetic; activations between them (resize, add, softmax) stay float, where int8 would
# cost accuracy for little time.
INT8_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def quantize_int8(src: Path, dst: Path, windows: Iterable[np.ndarray],
                  input_name: str = INPUT_NAME) -> None:
    """Write ``src`` (an fp32 ONNX graph) to ``dst`` quantised to int8 by ONNX Runtime's
    post-training static quantisation: QDQ format, int8 weights per output channel, int8
    activations whose ranges (min/max) are those ``windows`` produce. Atomic.

    ``windows``: calibration batches ``(B, C_in, h, w)`` float32, normalised as the model's
    input (``scripts/runtime_miou.py`` cuts training windows as training does).

    Raises:
        ConfigError: no calibration window.
    """
    import tempfile

    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from magseg.engine.precision import cpu_has_vnni

    batches = [np.ascontiguousarray(w, dtype=np.float32) for w in windows]
    if not batches:
        raise ConfigError("int8 quantisation needs calibration windows; none were given")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._next = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._next, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory(prefix=".magseg-int8-", dir=dst.parent) as scratch:
        # ORT's pre-processing (shape inference, constant folding) before quantising: the
        # quantiser needs every tensor's shape to place its QDQ pairs.
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        with atomic_write(dst) as tmp:
            # Without VNNI a pair of u8 x s8 products can pass int16's range and saturate;
            # 7-bit weights (reduce_range, |w| <= 64) keep every pair in it: 2 * 255 * 64 < 32767.
            quantize_static(str(prepared), str(tmp), _Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=not cpu_has_vnni(),
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=list(INT8_OPS),
                            calibration_cache_path=Path(scratch) / "calibration")


def _ort_runner(path: Path | None, threads: int, precision: str,
                blob: "CompiledBlob | None" = None) -> Callable[[np.ndarray], np.ndarray] | None:
    """ONNX Runtime's CPU session (its kernels are fp32 whatever ``precision`` asks): from
    the graph as ONNX Runtime optimised it, kept in ``blob``, when it holds it (0.03-0.04 s
    to load against 0.26 s for Unet-ResNet18's graph optimised anew, 0.46 s for
    FPN-ResNet50's), else the graph at ``path`` optimised now (and kept in ``blob``); None
    when ``path`` is None and ``blob`` holds nothing ONNX Runtime takes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # as many as torch's: the engine's thread budget
    options.inter_op_num_threads = 1
    # Its threads sleep after a run instead of spinning: between two backbone batches the
    # engine's own threads need those cores (docs/runtimes.md#speed).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = _ort_session(ort, path, options, blob)
    return None if session is None else lambda x: session.run(None, {INPUT_NAME: x})[0]


def _ort_session(ort: Any, path: Path | None, options: Any, blob: "CompiledBlob | None") -> Any:
    """The session of the graph at ``path``: loaded as kept in ``blob`` (already optimised),
    else optimised now, and then kept in ``blob``; None if that is needed and ``path`` is."""
    providers = ["CPUExecutionProvider"]
    kept = None if blob is None else blob.read()
    if kept is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(kept, sess_options=options, providers=providers)
        except Exception:  # noqa: BLE001 - a kept graph ONNX Runtime will not take is optimised anew
            pass
    if path is None:
        return None
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if blob is None:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="magseg-ort-") as scratch:
        optimised = Path(scratch) / "optimised.onnx"
        options.optimized_model_filepath = str(optimised)
        # Its warning that the saved graph holds this CPU's layouts is what the blob's key is
        # for (``_runtime_target``): errors only.
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        if optimised.is_file():
            blob.write(optimised.read_bytes())
    return session


@functools.lru_cache(maxsize=1)
def _openvino_core() -> Any:
    """The process's one ``openvino.Core``. OpenVINO expects one per application: with a Core
    per compiled graph (one graph per input size, two with a context margin), a process that
    had run them crashed later, in CPython, once it had spawned a child process."""
    import openvino as ov

    return ov.Core()


def _openvino_compile(model: Any, threads: int, precision: str, blob: "CompiledBlob | None" = None) -> Any:
    """OpenVINO's compiled ``model`` (a path, an ``openvino.Model``, or a function that
    makes one) for the CPU: imported from ``blob`` when it holds it, else compiled (and
    then kept in ``blob``); None if that is needed and ``model`` is None."""
    # The precision is explicit: OpenVINO's CPU default is bf16 wherever the CPU has it. On a
    # CPU without bf16 kernels a bf16 hint compiles f32 (``_openvino_native`` says which).
    hint = "bf16" if precision == "bf16" else "f32"
    settings = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint}
    core = _openvino_core()
    kept = None if blob is None else blob.read()
    if kept is not None:
        try:
            return core.import_model(kept, "CPU", settings)
        except Exception:  # noqa: BLE001 - a blob OpenVINO will not take is compiled anew
            pass
    if model is None:
        return None
    if callable(model):
        model = model()
    compiled = core.compile_model(str(model) if isinstance(model, Path) else model, "CPU", settings)
    if blob is not None:
        blob.write(compiled.export_model().getvalue())
    return compiled


@functools.lru_cache(maxsize=None)
def _runtime_target(runtime: str) -> dict[str, Any]:
    """What a runtime's compiled (or optimised) graph depends on besides the graph and its
    settings: the runtime's version and the CPU (its name and flags; for OpenVINO also what
    its plugin finds the CPU can do)."""
    from magseg.engine.precision import cpu_flags, cpu_info

    module = importlib.import_module(runtime)
    target = {runtime: module.__version__, "cpu": cpu_info()["model"], "flags": cpu_flags()}
    if runtime == "openvino":
        core = _openvino_core()
        target.update(cpu=core.get_property("CPU", "FULL_DEVICE_NAME"),
                      capabilities=sorted(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")))
    return target


@dataclass(frozen=True)
class CompiledBlob:
    """Where OpenVINO's compiled form of one graph is kept (``export_model``'s bytes), with
    a sidecar ``.json`` holding their SHA-256: a blob is imported only if its bytes hash to
    it. Writing is best effort: a cache that cannot be written costs the next run a
    compile, never this run."""

    path: Path

    @property
    def sidecar(self) -> Path:
        return self.path.with_suffix(".json")

    def read(self) -> bytes | None:
        """The blob's bytes when its sidecar vouches for them, else None."""
        try:
            data = self.path.read_bytes()
            record = json.loads(self.sidecar.read_text())
        except (OSError, ValueError):
            return None
        if not (isinstance(record, dict) and record.get("sha256") == hashlib.sha256(data).hexdigest()):
            return None
        mark_used(self.sidecar)
        return data

    def write(self, data: bytes) -> None:
        from magseg.errors import WriteError

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.sidecar.unlink(missing_ok=True)  # a crash between the two writes leaves no voucher
            with atomic_write(self.path) as tmp:
                tmp.write_bytes(data)
            with atomic_write(self.sidecar) as tmp:
                tmp.write_text(json.dumps({"sha256": hashlib.sha256(data).hexdigest()}))
        except (OSError, WriteError):
            pass


@functools.lru_cache(maxsize=None)
def _openvino_native(precision: str) -> bool:
    """Whether OpenVINO's CPU plugin computes ``precision`` on this CPU: its
    ``OPTIMIZATION_CAPABILITIES`` list BF16 only where it has bf16 kernels (AVX512-BF16,
    AMX), and a bf16 hint elsewhere compiles f32."""
    capability = {"bf16": "BF16", "fp16": "FP16", "int8": "INT8"}.get(precision)
    return capability is not None and capability in _openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _openvino_runner(model: Any, threads: int, precision: str,
                     blob: CompiledBlob | None = None) -> Callable[[np.ndarray], np.ndarray] | None:
    """OpenVINO's runner of ``model`` (as ``_openvino_compile`` takes it; None where it
    gives None)."""
    compiled = _openvino_compile(model, threads, precision, blob)
    if compiled is None:
        return None
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()

    run.compiled = compiled  # the graph outlives its request
    return run


@dataclass(frozen=True)
class Runtime:
    """A runtime that runs the backbone's exported graph on the CPU.

    ``load(graph, threads, precision)`` reads the ``.onnx`` file and returns the runner
    (with ``keeps_compiled``, ``load(..., blob)`` loads the compiled or optimised graph kept
    in a ``CompiledBlob``, or makes it and keeps it there; ``load(None, ..., blob)`` only
    the kept one, None where there is none),
    ``(B, C_in, h, w)`` float32 array -> ``(B, classes, h, w)`` float32 logits, or
    probabilities where ``softmax_in_graph``; ``module`` is the package it imports (whether
    it is installed), ``extra`` the magseg extra that installs it; ``precisions``: the
    precisions it has kernels for (others run fp32); ``native(precision)``: whether this CPU
    runs one of them (None: wherever it is installed); ``softmax_in_graph``: its graphs end
    in the softmax, where it costs less than the engine's own pass over the logits.
    """

    module: str
    extra: str
    load: Callable[..., Callable[[np.ndarray], np.ndarray]]
    precisions: tuple[str, ...] = ()
    native: Callable[[str], bool] | None = None
    softmax_in_graph: bool = False
    keeps_compiled: bool = False


# The graph runtimes, in auto's order on a CPU: fastest first (both ran Unet-ResNet18 and
# FPN-ResNet50 in 0.6-0.7x torch eager's time, OpenVINO a little ahead: docs/runtimes.md).
# ONNX Runtime's CPU kernels are fp32; OpenVINO runs bf16 when asked (native on
# AVX512-BF16/AMX). OpenVINO's softmax costs little in its graph; ONNX Runtime's, over the
# channel axis, more than the engine's own (docs/runtimes.md#the-softmax-in-the-graph).
GRAPH_RUNTIMES: dict[str, Runtime] = {
    "openvino": Runtime("openvino", "magseg[openvino]", _openvino_runner, ("bf16", "int8"), _openvino_native,
                        softmax_in_graph=True, keeps_compiled=True),
    "onnxruntime": Runtime("onnxruntime", "magseg[onnx]", _ort_runner, keeps_compiled=True),
}
# What engine.runtime may name (besides auto); the config schema lists the same.
RUNTIMES = ("torch", *GRAPH_RUNTIMES)


class RuntimeBackbone(nn.Module):
    """A backbone run by a graph runtime (``GRAPH_RUNTIMES``: ONNX Runtime, OpenVINO) from
    its cached exported graph.

    ``backbone(x)``: ``x`` ``(B, C_in, h, w)`` float -> ``(B, classes, h, w)`` float32 logits,
    as the torch module would return them, or their softmax where its cache's graphs end in
    it (``returns_probabilities``). A graph per ``(h, w)`` is loaded on first use,
    exported first when the cache has no valid one (``build_torch`` makes the torch model
    then, and only then).
    """

    # The graph takes NCHW: ``run_backbone`` hands it the input as it is, not a channels-last
    # copy the runtime would copy back.
    takes_channels_last = False

    def __init__(self, runtime: str, cache: GraphCache, build_torch: Callable[[], nn.Module],
                 precision: str = "fp32", threads: int | None = None, int8_graph: Path | None = None,
                 int8_digest: str | None = None) -> None:
        super().__init__()
        self.runtime, self.cache, self.precision = runtime, cache, precision
        self.threads = threads or torch.get_num_threads()
        # The int8 graph (its .xml, already checked), which every input size runs reshaped,
        # its compiled forms kept under the digest of its files.
        self._int8 = None
        if int8_graph is not None:
            from magseg.engine.int8 import Int8Graph

            self._int8 = Int8Graph(int8_graph, cache.in_channels, self.threads, cache, int8_digest)
        self._build_torch = build_torch
        self._torch: nn.Module | None = None
        self._runners: dict[tuple[int, int], Callable[[np.ndarray], np.ndarray]] = {}

    @property
    def int8_graph(self) -> Path | None:
        """The int8 graph's ``.xml`` it runs (``engine.precision=int8``), else None."""
        return None if self._int8 is None else self._int8.graph

    @property
    def returns_probabilities(self) -> bool:
        """Whether its graphs end in the softmax: the engine then takes them as they come."""
        return self.cache.softmax

    def torch_model(self) -> nn.Module:
        """The torch backbone (built on first need: exporting, or learning its multiple)."""
        if self._torch is None:
            self._torch = self._build_torch().eval()
        return self._torch

    @property
    def input_multiple(self) -> int:
        """What the input's height and width must be divisible by (``run_backbone`` pads)."""
        multiple = self.cache.input_multiple()
        if multiple is None:
            from magseg.engine.backbone import input_multiple

            multiple = input_multiple(self.torch_model())
            self.cache.record_input_multiple(multiple)
        return multiple

    def _load(self, path: Path | None, size: tuple[int, int]) -> Callable[[np.ndarray], np.ndarray] | None:
        """The runner of the graph at ``path`` for inputs of ``size``, from its compiled form
        where one is kept for the digest its sidecar records (and that form kept where the
        runtime keeps one); with ``path`` None only from a kept form, None without one."""
        runtime = GRAPH_RUNTIMES[self.runtime]
        digest = self.cache.graph_digest(size) if runtime.keeps_compiled else None
        if digest is None:  # nothing to key a compiled graph by: compiled, not kept
            return None if path is None else runtime.load(path, self.threads, self.precision)
        blob = self.cache.compiled_blob(digest, size, self.threads, self.precision, self.runtime)
        return runtime.load(path, self.threads, self.precision, blob)

    def runner(self, size: tuple[int, int]) -> Callable[[np.ndarray], np.ndarray]:
        """The loaded graph for inputs of ``size``: at int8 the int8 graph's
        (``magseg.engine.int8.Int8Graph``); else its compiled form kept in the cache
        (``GraphCache.compiled_blob``), else the cached graph if it checks out, else the graph
        exported anew; a cached graph the runtime cannot load is rebuilt once."""
        if size not in self._runners and self._int8 is not None:
            self._runners[size] = self._int8.runner(size)
        if size not in self._runners:
            # A compiled form kept under the digest the graph's sidecar records is used
            # without reading the graph: the form's own digest vouches for its bytes. Hashing
            # the graph costs about what loading that form does (0.05-0.08 s for a DeepGlobe
            # model's 50-100 MB graph, 0.012 s for the demo's 14 MB). The graph is read, and
            # checked, only where no such form is kept.
            kept = self._load(None, size)
            if kept is not None:
                self._runners[size] = kept
        if size not in self._runners:
            graph, failed = self.cache.valid_graph(size), None
            if graph is not None:
                try:
                    self._runners[size] = self._load(graph, size)
                except Exception:  # noqa: BLE001 - any load failure means: rebuild it
                    graph, failed = None, self.cache.graph_digest(size)
            if graph is None:
                self._runners[size] = self._load(self.cache.build(size, self.torch_model, failed), size)
        return self._runners[size]

    def forward(self, x: Tensor) -> Tensor:
        run = self.runner((int(x.shape[-2]), int(x.shape[-1])))
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(run(array))


def runtime_backbone(
    runtime: str, *, weights_sha256: str, config: Any, build_torch: Callable[[], nn.Module],
    precision: str,
) -> RuntimeBackbone:
    """The ``RuntimeBackbone`` of ``config``'s model with these weights, on its cache.

    Raises:
        ConfigError: ``precision`` int8 without a valid int8 graph in the cache (the message
            names ``magseg quantize``), or with one of 8-bit weights on a CPU without VNNI
            (``int8.require_int8_kernels``). Which runtimes may run int8 at all is
            ``check_precision``'s, when the runtime is resolved.
    """
    cache = model_cache(runtime, weights_sha256, config)
    int8_graph = int8_digest = None
    if precision == "int8":
        from magseg.engine.int8 import require_int8_kernels

        record = cache.int8_record()  # hashes both files: once
        if record is None:
            raise ConfigError(
                f"engine.precision=int8 needs this checkpoint's int8 graph, and {cache.dir} has none (or one "
                "that no longer matches its sidecar): make it with `magseg quantize CHECKPOINT --data-root "
                "TRAINING_DATA` (with the same engine.cache_dir), or use engine.precision=fp32")
        int8_graph, int8_digest = cache.int8_paths()[0], json.dumps(record["sha256"], sort_keys=True)
        require_int8_kernels(record, int8_graph)
    return RuntimeBackbone(runtime, cache, build_torch, runtime_precision(runtime, precision),
                           int8_graph=int8_graph, int8_digest=int8_digest)


def model_cache(runtime: str, weights_sha256: str, config: Any) -> GraphCache:
    """The graph cache of ``config``'s model with these weights, as ``runtime`` keeps it."""
    key = graph_key(weights_sha256, config.to_dict()["model"], config.num_classes)
    return GraphCache(cache_root(config.engine.cache_dir), key, config.model.in_channels,
                      softmax=GRAPH_RUNTIMES[runtime].softmax_in_graph)
