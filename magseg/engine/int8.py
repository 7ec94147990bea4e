"""int8 backbones in OpenVINO: NNCF's post-training quantisation of the exported graph,
calibrated on training windows (``engine.precision=int8``, made by ``magseg quantize``).

The quantised graph is exported once with its height and width free
(``runtime.export_onnx(free_size=True)``), so one quantisation serves every window size the
engine meets (they vary with the raster's size at its edges): its quantisation ranges are
per channel or per tensor, whatever the size, and each size's runner reshapes the graph to
``(-1, C_in, h, w)`` before compiling it. The fixed-size fp32 graphs cannot be reshaped:
their upsampling sizes are constants.

What NNCF is asked for (docs/runtimes.md#reduced-precision): int8 weights per output
channel, int8 activations whose ranges the calibration windows give, bias correction; and
the weights' width (``weight_bits``). Without VNNI, x86 int8 kernels sum pairs of u8 x s8
products in int16, which 8-bit weights can saturate: NNCF's default, 7-bit weights in the
first layer only, cost 3.4 points of mIoU on the demo set on an AVX2-only CPU, against 0.26
with 7 bits in every layer (``OverflowFix.ENABLE``). With VNNI or AMX the products sum in
int32 and 8-bit weights are exact, and worth having: on an AMX Xeon, 7-bit weights cost the
small-objects checkpoint 0.74 point of mIoU, 8-bit ones 0.19. So a graph gets 8-bit weights
where the CPU quantising it has VNNI and 7-bit ones elsewhere (``magseg quantize
--weight-bits``), its sidecar says which, and a graph of 8-bit weights is refused on a CPU
without VNNI (``require_int8_kernels``) instead of run saturated.

The refiner's convolutions (``Refiner.context``, at 1/stride of the window: cells in,
correction out) get an int8 graph of their own, calibrated on the cells the engine feeds
them over training scenes (``magseg.quantize.refiner_cells``) and exported with their height
and width free too. On a CPU they are the engine's one compute-bound step of its own
(docs/performance.md#the-refiners-convolutions), and int8 halves them where fp32 is at the
CPU's peak. ``RefinerInt8`` runs that graph in their place; the per-pixel refine step after
them stays float32.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from magseg.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor, nn

    from magseg.engine.runtime import CompiledBlob, GraphCache

EXTRA = "magseg[int8]"


def nncf_installed() -> bool:
    """Whether int8 graphs can be made here (NNCF and OpenVINO; the ``int8`` extra)."""
    return all(importlib.util.find_spec(m) is not None for m in ("nncf", "openvino"))


@contextlib.contextmanager
def _nncf_output(show: bool) -> Iterator[None]:
    """NNCF's progress bars (rich, on ``sys.stdout``) and log lines (a handler on stdout)
    on stderr, or nowhere: magseg's stdout is its JSON records. The warning torch logs when
    NNCF imports its C++ extension loader on a machine without CUDA is not shown."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from nncf.common.logging.logger import nncf_logger

    target = sys.stderr if show else open(os.devnull, "w")  # noqa: SIM115 - closed below
    handlers = [h for h in nncf_logger.handlers if isinstance(h, logging.StreamHandler)]
    streams = [h.stream for h in handlers]
    # Set, not ``setStream``: that flushes the stream it replaces, which may be closed by now
    # (the stdout NNCF's handler took at import, where a test runner had replaced it).
    for handler in handlers:
        handler.stream = target
    try:
        with contextlib.redirect_stdout(target):
            yield
    finally:
        target.flush()
        for handler, stream in zip(handlers, streams):
            handler.stream = stream
        if not show:
            target.close()


# The weights' widths an int8 graph may have: 7 bits run exactly on every x86 CPU, 8 bits
# only where int8 products sum in int32 (VNNI, AMX).
WEIGHT_BITS = (7, 8)


def weight_bits(choice: str | int = "auto") -> int:
    """The weights' width of a graph quantised here: ``auto`` is 8 on a CPU with VNNI's
    int8 dot products (AVX512-VNNI, AVX-VNNI; every AMX CPU has them), else 7; 7 and 8 as
    given (``"7"``, ``"8"`` too: the command line's).

    Raises:
        ConfigError: any other choice.
    """
    from magseg.engine.precision import cpu_has_vnni

    if str(choice) == "auto":
        return 8 if cpu_has_vnni() else 7
    if str(choice) not in {str(bits) for bits in WEIGHT_BITS}:
        raise ConfigError(f"--weight-bits {choice}: choose auto, 7 or 8")
    return int(choice)


def runs_here(record: dict[str, Any]) -> bool:
    """Whether this CPU runs an int8 graph of ``record`` (its sidecar) exactly: any graph
    of 7-bit weights (graphs made before the sidecar said so had them), 8-bit ones only
    with VNNI."""
    from magseg.engine.precision import cpu_has_vnni

    return record.get("weight_bits", 7) == 7 or cpu_has_vnni()


def require_int8_kernels(record: dict[str, Any], graph: Path) -> None:
    """Refuse the backbone's int8 ``graph`` (its sidecar ``record``) where this CPU would
    saturate its 8-bit weights.

    Raises:
        ConfigError: 8-bit weights on a CPU without VNNI, naming the two fixes.
    """
    if not runs_here(record):
        raise ConfigError(
            f"{graph} has 8-bit int8 weights, made for a CPU with VNNI (AVX512-VNNI, AVX-VNNI or AMX); this "
            "CPU has none, and sums int8 products in int16, which 8-bit weights saturate: quantise on this "
            "machine (`magseg quantize CHECKPOINT --data-root TRAINING_DATA --overwrite`), or make a graph "
            "for every CPU with `--weight-bits 7`, or use engine.precision=fp32")


def quantize(graph: Path, windows: Sequence[np.ndarray], progress: bool = True, bits: int = 7) -> Any:
    """NNCF's int8 quantisation of the ONNX file ``graph`` as an ``openvino.Model``.

    ``windows``: calibration inputs, each ``(1, C_in, h, w)`` float32 normalised as the
    model's input (one window an item: NNCF's statistics and its ``subset_size`` count items).
    ``progress``: NNCF's progress and log lines on stderr (else none). ``bits``: the
    weights' width, 7 in every layer or 8 (``weight_bits``).

    Raises:
        ConfigError: no calibration window, or NNCF not installed.
    """
    if not windows:
        raise ConfigError("int8 quantisation needs calibration windows; none were given")
    if not nncf_installed():
        raise ConfigError(f"int8 quantisation needs NNCF and OpenVINO: pip install '{EXTRA}'")
    from magseg.engine.runtime import _openvino_core

    with _nncf_output(progress):
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        model = _openvino_core().read_model(str(graph))
        return nncf.quantize(model, nncf.Dataset(list(windows)), subset_size=len(windows),
                             advanced_parameters=AdvancedQuantizationParameters(
                                 overflow_fix=OverflowFix.ENABLE if bits == 7 else OverflowFix.DISABLE))


def quantize_into_cache(backbone: Any, cache: Any, windows: Sequence[np.ndarray], record: dict[str, Any], *,
                        log: Callable[[str], None] = lambda message: None, progress: bool = True,
                        bits: str | int = "auto") -> Path:
    """Quantise the torch ``backbone`` on ``windows`` (``quantize``, weights of ``bits``:
    ``weight_bits``) into ``cache`` (a ``runtime.GraphCache``) as its int8 graph, ``record``
    (what the windows are) in its sidecar with the weights' width and NNCF's and OpenVINO's
    versions; returns the graph's ``.xml``.

    The ONNX graph NNCF reads is exported with its height and width free (the windows' size
    traced), ending in the softmax where the cache's graphs do; it is not kept.
    """
    from magseg.engine.runtime import export_onnx

    size = (int(windows[0].shape[-2]), int(windows[0].shape[-1]))

    def export(graph: Path) -> None:
        log("quantize: exporting the backbone with free height and width (a minute or more)")
        export_onnx(backbone, graph, cache.in_channels, size, softmax=cache.softmax, free_size=True)
        log("quantize: NNCF's int8 quantisation")

    return _quantized_into_cache(cache, export, windows, record, progress, bits)


# The refiner graph's input and output names.
REFINER_INT8_INPUT, REFINER_INT8_OUTPUT = "cells", "correction"


def quantize_refiner_into_cache(refiner: nn.Module, cache: GraphCache, cells: Sequence[np.ndarray],
                                record: dict[str, Any], *, progress: bool = True, bits: str | int = "auto") -> Path:
    """Quantise the refiner's convolutions (``refiner.context``: ``(B, 2C, h, w)`` cells ->
    ``(B, C, h, w)`` correction) on ``cells`` (each ``(1, 2C, h, w)``, any sizes; weights of
    ``bits``) into ``cache`` as its refiner int8 graph; the sidecar records ``record``, the
    digest of the convolutions' weights (``refiner_int8`` runs the graph only for those),
    the weights' width and NNCF's and OpenVINO's versions. Returns the graph's ``.xml``."""
    from magseg.engine.runtime import _save_onnx, state_sha256

    channels = int(cells[0].shape[1])
    context = refiner.context

    def export(graph: Path) -> None:
        was_training = context.training
        try:
            _save_onnx(context.eval(), {REFINER_INT8_INPUT: (channels, *cells[0].shape[-2:])}, graph,
                       REFINER_INT8_OUTPUT, None, free_size=True)
        finally:
            context.train(was_training)

    return _quantized_into_cache(cache, export, cells, {**record, "weights_sha256": state_sha256(context)},
                                 progress, bits, "refiner", channels)


def _quantized_into_cache(cache: GraphCache, export: Callable[[Path], None], inputs: Sequence[np.ndarray],
                          record: dict[str, Any], progress: bool, bits: str | int = "auto", part: str = "backbone",
                          in_channels: int | None = None) -> Path:
    """``export`` (writing an ONNX graph to the path it is given, in a scratch folder in the
    cache's, not kept), quantised on ``inputs`` with weights of ``bits`` (``weight_bits``)
    and saved as ``part``'s int8 graph, with ``record``, the weights' width and NNCF's and
    OpenVINO's versions in its sidecar; returns its ``.xml``."""
    import tempfile

    import nncf
    import openvino

    width = weight_bits(bits)
    cache.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".magseg-quantize-", dir=cache.dir) as scratch:
        graph = Path(scratch) / f"{part}.onnx"
        export(graph)
        model = quantize(graph, inputs, progress, width)
    return cache.save_int8(model, {**record, "weight_bits": width, "nncf": nncf.__version__,
                                   "openvino": openvino.__version__}, part=part, in_channels=in_channels)


class Int8Graph:
    """An int8 graph (its ``.xml``, height and width free) of ``in_channels`` inputs, run at
    any input size: a runner per size, the one graph reshaped to it and compiled, and kept
    compiled in ``cache`` under ``digest`` (the digests of its files:
    ``GraphCache.compiled_blob``; compiled each time without them). The backbone's
    (``runtime.RuntimeBackbone``) and the refiner's convolutions' (``RefinerInt8``)."""

    def __init__(self, graph: Path, in_channels: int, threads: int, cache: GraphCache | None = None,
                 digest: str | None = None) -> None:
        self.graph, self.in_channels, self.threads = graph, in_channels, threads
        self.cache, self.digest = cache, digest
        self._runners: dict[tuple[int, int], Callable[[np.ndarray], np.ndarray]] = {}

    def runner(self, size: tuple[int, int]) -> Callable[[np.ndarray], np.ndarray]:
        """The runner for inputs ``(B, in_channels, *size)``."""
        run = self._runners.get(size)
        if run is None:
            blob = (None if self.cache is None or self.digest is None
                    else self.cache.compiled_blob(self.digest, size, self.threads, "int8"))
            run = self._runners[size] = int8_runner(self.graph, size, self.in_channels, self.threads, blob)
        return run


class RefinerInt8(Int8Graph):
    """The refiner's convolutions from their int8 graph: ``(B, 2C, h, w)`` float32 cells ->
    ``(B, C, h, w)`` float32 correction, what ``Refiner.context`` returns."""

    def __call__(self, cells: Tensor) -> Tensor:
        import torch

        run = self.runner((int(cells.shape[-2]), int(cells.shape[-1])))
        # NCHW, as the graph takes it (the engine's channels-last copy is torch's layout).
        return torch.from_numpy(run(cells.detach().float().contiguous().numpy()))


def refiner_int8(refiner: nn.Module, cache: GraphCache, threads: int) -> RefinerInt8 | None:
    """The int8 runner of ``refiner``'s convolutions where ``cache`` holds their int8 graph
    made from these very weights and its files check out, and this CPU runs its weights
    exactly (``runs_here``); None otherwise (a cache quantised before the refiner had one,
    other weights, a damaged file, 8-bit weights without VNNI): the refiner then convolves
    in float32, which is never wrong, only slower."""
    from magseg.engine.runtime import state_sha256

    context = refiner.context
    channels = int(context[0].in_channels)
    record = cache.int8_record("refiner", channels)
    if record is None or record.get("weights_sha256") != state_sha256(context) or not runs_here(record):
        return None
    digests = json.dumps(record["sha256"], sort_keys=True)
    return RefinerInt8(cache.int8_paths("refiner")[0], channels, threads, cache, digests)


def int8_runner(graph: Path, size: tuple[int, int], in_channels: int, threads: int,
                blob: "CompiledBlob | None" = None) -> Callable[[np.ndarray], np.ndarray]:
    """The runner of the int8 graph ``graph`` (its ``.xml``) for ``(B, in_channels, *size)``
    inputs: the graph reshaped to that size (batch free), compiled for the CPU, or imported
    from ``blob`` where it was kept (the graph is then not read at all)."""
    import openvino as ov

    from magseg.engine.runtime import _openvino_core, _openvino_runner

    def reshaped() -> Any:
        model = _openvino_core().read_model(str(graph))
        model.reshape({0: ov.PartialShape([-1, in_channels, *size])})
        return model

    # The f32 hint: OpenVINO runs the quantised layers in int8 whatever it is, and the
    # rest (softmax, resizes) in f32 rather than in bf16 where the CPU has it.
    return _openvino_runner(reshaped, threads, "fp32", blob)
