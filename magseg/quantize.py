"""``magseg quantize``: a checkpoint's backbone as an int8 OpenVINO graph in the graph cache,
calibrated on windows of its training data, which ``engine.precision=int8`` then runs.

    checkpoint --> torch backbone --> ONNX, height and width free, ending in the softmax
    training split --> N windows cut as training cuts them (no augmentation, seed 0),
                       padded to the backbone's input multiple as the engine pads them
    NNCF (magseg.engine.int8.quantize) --> <cache>/<model key>/int8.xml, int8.bin, int8.json

The graph goes where predict looks for it: the cache folder of the checkpoint's weights and
model config (``engine.cache_dir``, ``$MAGSEG_CACHE_DIR``, ``~/.cache/magseg``), its sidecar
recording both files' SHA-256 and the calibration. The quantised graph is then checked on
the calibration windows against the torch model: the share of pixels whose labels agree and
the mean absolute difference of the probabilities, in the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from magseg.checkpoint import Checkpoint, load_checkpoint, load_state, run_config
from magseg.config import Config
from magseg.errors import ConfigError, OutputExistsError

SEED = 0
# Below this share of agreeing labels on the calibration windows, quantize says so: the
# demo's and small-objects' checkpoints agreed on 99.6 % and kept mIoU within 0.3 point.
AGREEMENT_WARNING = 0.98


@dataclass(frozen=True)
class Quantized:
    """What ``quantize_checkpoint`` made: the int8 graph (its ``.xml``; the ``.bin`` and the
    sidecar ``.json`` beside it), the calibration, and how the graph compares with the torch
    model on the calibration windows."""

    graph: Path
    windows: int
    size: tuple[int, int]
    label_agreement: float
    mean_abs_diff: float
    seconds: float


def calibration_windows(config: Config, data_root: str | Path | None, split: str, count: int,
                        multiple: int) -> list[np.ndarray]:
    """``count`` windows of ``split``, each ``(1, C_in, h, w)`` float32, normalised: cut as
    training cuts them (a random stage, a random window with its margins, resized to the
    backbone's input; ``BackboneSamples`` without augmentation, seed 0), padded to
    ``multiple`` as the engine pads its inputs."""
    from magseg.data.scenes import list_scenes
    from magseg.engine.backbone import padded_input
    from magseg.training.samples import BackboneSamples

    samples = BackboneSamples(list_scenes(config.data, split, data_root), config, count, seed=SEED, augment=False)
    return [padded_input(samples[i].image[None].float(), multiple).numpy() for i in range(count)]


def quantize_checkpoint(
    checkpoint: str | Path | Checkpoint, data_root: str | Path | None, *, windows: int = 64,
    split: str = "train", overrides: Mapping[str, Any] | Sequence[str] = (), overwrite: bool = False,
    log: Callable[[str], None] = lambda message: None, progress: bool = True,
) -> Quantized:
    """Quantise the checkpoint's backbone to int8 on ``windows`` windows of ``split`` under
    ``data_root`` and put it in the graph cache (replacing one there only with ``overwrite``).
    ``log``: a line at each step; ``progress``: NNCF's progress bars on stderr.

    Raises:
        CheckpointError: the checkpoint cannot be read or does not fit its config.
        ConfigError: NNCF, OpenVINO or the exporter not installed; a multi-context backbone
            (FCtL); fewer than one window; a config without data.mean/std.
        DataError: the split or its files are missing.
        OutputExistsError: the cache holds this checkpoint's int8 graph and ``overwrite`` is false.
    """
    import torch

    from magseg.engine.backbone import input_multiple
    from magseg.engine.int8 import EXTRA, int8_runner, nncf_installed, quantize_into_cache
    from magseg.engine.runtime import exporter_installed, model_cache
    from magseg.io.provenance import file_sha256
    from magseg.segmenter import create_segmenter_model

    if windows < 1:
        raise ConfigError(f"--windows {windows}: quantisation needs at least one calibration window")
    if not (nncf_installed() and exporter_installed()):
        raise ConfigError(f"magseg quantize needs NNCF, OpenVINO, onnx and onnxscript: pip install '{EXTRA}'")
    start = time.perf_counter()
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    config = run_config(ckpt, overrides)
    if config.model.arch.lower() == "fctl":
        raise ConfigError("model.arch=fctl takes context crops beside each crop (two inputs); "
                          "int8 graphs are made for single-input backbones only")
    digest = file_sha256(ckpt.path) if ckpt.path.is_file() else None
    if digest is None:
        raise ConfigError("magseg quantize needs a checkpoint file (the cache is keyed by its SHA-256)")
    cache = model_cache("openvino", digest, config)
    existing = cache.int8_record()
    if existing is not None and not overwrite:
        calibration = existing.get("calibration", {})
        raise OutputExistsError(
            f"{cache.int8_paths()[0]} already holds {ckpt.path}'s int8 graph (calibrated on "
            f"{calibration.get('windows')} windows of {calibration.get('data_root')}); "
            "pass --overwrite to quantise again")
    backbone = create_segmenter_model(config, pretrained=False)
    load_state(backbone, ckpt.backbone, "backbone", ckpt.path)
    backbone.eval()
    multiple = input_multiple(backbone)
    log(f"quantize: {ckpt.path}: {windows} calibration windows of split {split!r} of "
        f"{data_root or config.data.root or '.'}")
    inputs = calibration_windows(config, data_root, split, windows, multiple)
    size = (int(inputs[0].shape[-2]), int(inputs[0].shape[-1]))
    record = {"calibration": {"data_root": str(Path(data_root or config.data.root or ".").resolve()),
                              "split": split, "windows": windows, "seed": SEED, "size": list(size)},
              "checkpoint": str(ckpt.path)}
    cache.record_input_multiple(multiple)
    xml = quantize_into_cache(backbone, cache, inputs, record, log=log, progress=progress)
    log("quantize: checking the int8 graph against the torch model on the calibration windows")
    agree, diff = _compare(backbone, int8_runner(xml, size, config.model.in_channels, torch.get_num_threads()),
                           inputs)
    if agree < AGREEMENT_WARNING:
        log(f"magseg: warning: the int8 graph's labels agree with the torch model's on {100 * agree:.1f} % of "
            "the calibration windows' pixels; compare `magseg benchmark` at --set engine.precision=int8 and "
            "fp32 before relying on it")
    return Quantized(xml, windows, size, agree, diff, time.perf_counter() - start)


def _compare(backbone: Any, run: Callable[[np.ndarray], np.ndarray], inputs: Sequence[np.ndarray],
             batch: int = 4) -> tuple[float, float]:
    """The share of pixels whose labels ``run`` (probabilities) and the torch ``backbone``
    (logits) agree on over ``inputs``, and the mean absolute difference of their probabilities."""
    import torch

    agree = diff = 0.0
    pixels = 0
    for i in range(0, len(inputs), batch):
        x = np.concatenate(inputs[i:i + batch])
        with torch.inference_mode():
            logits = backbone(torch.from_numpy(x))
        reference = (logits[0] if isinstance(logits, (tuple, list)) else logits).float().softmax(1).numpy()
        probs = run(x)
        agree += float((probs.argmax(1) == reference.argmax(1)).sum())
        diff += float(np.abs(probs - reference).mean(axis=1).sum())
        pixels += reference.shape[0] * reference.shape[2] * reference.shape[3]
    return agree / pixels, diff / pixels
