"""``magseg quantize``: a checkpoint's backbone as an int8 OpenVINO graph in the graph cache,
calibrated on windows of its training data, which ``engine.precision=int8`` then runs.

    checkpoint --> torch backbone --> ONNX, height and width free, ending in the softmax
    training split --> N windows cut as training cuts them (no augmentation, seed 0),
                       padded to the backbone's input multiple as the engine pads them
    NNCF (magseg.engine.int8.quantize) --> <cache>/<model key>/int8.xml, int8.bin, int8.json
    training scenes --> the fp32 engine --> the cells its refiner convolves (up to N)
    NNCF --> <cache>/<model key>/refiner-int8.xml, .bin, .json   (with a refiner)

The graph goes where predict looks for it: the cache folder of the checkpoint's weights and
model config (``engine.cache_dir``, ``$MAGSEG_CACHE_DIR``, ``~/.cache/magseg``), its sidecar
recording both files' SHA-256 and the calibration. The quantised graph is then checked on
the calibration windows against the torch model: the share of pixels whose labels agree and
the mean absolute difference of the probabilities, in the result; the refiner's graph
against its torch convolutions on their calibration cells, likewise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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
class RefinerQuantized:
    """The refiner's int8 graph (its ``.xml``), what it was calibrated on, and how its
    correction compares with the torch convolutions' on those cells (mean absolute
    difference, beside the mean absolute correction for scale; logits)."""

    graph: Path
    scenes: int
    cells: int
    mean_abs_diff: float
    mean_abs_correction: float


@dataclass(frozen=True)
class Quantized:
    """What ``quantize_checkpoint`` made: the int8 graph (its ``.xml``; the ``.bin`` and the
    sidecar ``.json`` beside it), the calibration, its weights' width (7 or 8 bits; 7 for a
    kept graph made before sidecars said), and how the graph compares with the torch
    model on the calibration windows (None where the cache held the backbone's graph
    already and only the refiner's was made); the refiner's (None without a refiner, or
    where it was there already)."""

    graph: Path
    windows: int
    size: tuple[int, int]
    weight_bits: int
    label_agreement: float | None
    mean_abs_diff: float | None
    refiner: RefinerQuantized | None
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


def refiner_cells(segmenter: Any, images: Iterable[Any], count: int) -> list[np.ndarray]:
    """What the engine feeds the refiner's convolutions while ``segmenter`` segments
    ``images`` (normalised ``(C, H, W)`` tensors): up to ``count`` inputs, each ``(1, 2C, h,
    w)`` float32 NCHW, spread evenly over all it made (sizes differ between stages)."""
    import torch

    made: list[np.ndarray] = []

    def keep(_module: Any, inputs: tuple[Any, ...]) -> None:
        cells = inputs[0].detach().float().contiguous().numpy()
        made.extend(cells[i : i + 1].copy() for i in range(cells.shape[0]))

    hook = segmenter.refiner.context.register_forward_pre_hook(keep)
    try:
        with torch.inference_mode():
            for image in images:
                segmenter.segment(image)
    finally:
        hook.remove()
    if len(made) <= count:
        return made
    return [made[int(i)] for i in np.linspace(0, len(made) - 1, count).round()]


def quantize_checkpoint(
    checkpoint: str | Path | Checkpoint, data_root: str | Path | None, *, windows: int = 64,
    split: str = "train", scenes: int = 4, overrides: Mapping[str, Any] | Sequence[str] = (),
    overwrite: bool = False, log: Callable[[str], None] = lambda message: None, progress: bool = True,
    weight_bits: str | int = "auto",
) -> Quantized:
    """Quantise the checkpoint's backbone to int8 on ``windows`` windows of ``split`` under
    ``data_root``, and its refiner's convolutions on up to ``windows`` of the cells the fp32
    engine makes on ``scenes`` scenes of it, and put both in the graph cache (replacing
    graphs there only with ``overwrite``; a cache with the backbone's and not the refiner's
    gets the refiner's). ``weight_bits``: the weights' width, ``auto`` (8 on a CPU with VNNI,
    7 elsewhere), 7 (a graph every x86 CPU runs exactly) or 8 (``int8.weight_bits``); a
    refiner graph made beside a kept backbone graph takes the kept one's width. ``log``: a
    line at each step; ``progress``: NNCF's progress bars on stderr.

    Raises:
        CheckpointError: the checkpoint cannot be read or does not fit its config.
        ConfigError: NNCF, OpenVINO or the exporter not installed; a multi-context backbone
            (FCtL); fewer than one window; a config without data.mean/std; a weight width
            other than auto, 7 or 8.
        DataError: the split or its files are missing.
        OutputExistsError: the cache holds this checkpoint's int8 graphs and ``overwrite`` is false.
    """
    import torch

    from magseg.engine.backbone import input_multiple
    from magseg.engine.int8 import EXTRA, int8_runner, nncf_installed, quantize_into_cache, refiner_int8
    from magseg.engine.int8 import weight_bits as resolve_bits
    from magseg.engine.precision import cpu_has_vnni
    from magseg.engine.runtime import exporter_installed, model_cache
    from magseg.segmenter import create_refiner, create_segmenter_model

    if windows < 1:
        raise ConfigError(f"--windows {windows}: quantisation needs at least one calibration window")
    if scenes < 1:
        raise ConfigError(f"--scenes {scenes}: the refiner's calibration needs at least one scene")
    bits = resolve_bits(weight_bits)
    if bits == 8 and not cpu_has_vnni():
        log("quantize: 8-bit weights for a CPU with VNNI: this one has none, so the check below runs them "
            "saturated, and predict here refuses the graph")
    if not (nncf_installed() and exporter_installed()):
        raise ConfigError(f"magseg quantize needs NNCF, OpenVINO, onnx and onnxscript: pip install '{EXTRA}'")
    start = time.perf_counter()
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    config = run_config(ckpt, overrides)
    if config.model.arch.lower() == "fctl":
        raise ConfigError("model.arch=fctl takes context crops beside each crop (two inputs); "
                          "int8 graphs are made for single-input backbones only")
    cache = model_cache("openvino", ckpt.sha256, config)
    refiner = None
    if config.refiner.enabled and ckpt.refiner is not None:
        refiner = create_refiner(config)
        load_state(refiner, ckpt.refiner, "refiner", ckpt.path)
        refiner.eval()
    existing = cache.int8_record()
    make_backbone = existing is None or overwrite
    make_refiner = refiner is not None and (overwrite or refiner_int8(refiner, cache, 1) is None)
    if not (make_backbone or make_refiner):
        calibration = existing.get("calibration", {})
        raise OutputExistsError(
            f"{cache.int8_paths()[0]} already holds {ckpt.path}'s int8 graphs (calibrated on "
            f"{calibration.get('windows')} windows of {calibration.get('data_root')}); "
            "pass --overwrite to quantise again")
    backbone = create_segmenter_model(config, pretrained=False)
    load_state(backbone, ckpt.backbone, "backbone", ckpt.path)
    backbone.eval()
    root = str(Path(data_root or config.data.root or ".").resolve())
    xml, agree, diff, calibrated = cache.int8_paths()[0], None, None, windows
    if make_backbone:
        multiple = input_multiple(backbone)
        log(f"quantize: {ckpt.path}: {windows} calibration windows of split {split!r} of "
            f"{data_root or config.data.root or '.'}")
        inputs = calibration_windows(config, data_root, split, windows, multiple)
        size = (int(inputs[0].shape[-2]), int(inputs[0].shape[-1]))
        record = {"calibration": {"data_root": root, "split": split, "windows": windows, "seed": SEED,
                                  "size": list(size)},
                  "checkpoint": str(ckpt.path)}
        cache.record_input_multiple(multiple)
        xml = quantize_into_cache(backbone, cache, inputs, record, log=log, progress=progress, bits=bits)
        log("quantize: checking the int8 graph against the torch model on the calibration windows")
        agree, diff = _compare(backbone, int8_runner(xml, size, config.model.in_channels, torch.get_num_threads()),
                               inputs)
        if agree < AGREEMENT_WARNING:
            log(f"magseg: warning: the int8 graph's labels agree with the torch model's on {100 * agree:.1f} % "
                "of the calibration windows' pixels; compare `magseg benchmark` at --set engine.precision=int8 "
                "and fp32 before relying on it")
    else:
        log(f"quantize: {xml} holds the backbone's int8 graph already: making the refiner's")
        # What the kept graph was calibrated on, for the result; the refiner still takes up
        # to --windows cell maps.
        calibration = existing.get("calibration")
        calibration = calibration if isinstance(calibration, dict) else {}
        calibrated, size = calibration.get("windows", windows), tuple(calibration.get("size", ()))
        # One width for both graphs: the kept graph's (7 bits where its sidecar predates them).
        bits = existing.get("weight_bits", 7)
    quantized_refiner = None
    if make_refiner:
        quantized_refiner = _quantize_refiner(config, backbone, refiner, cache, data_root, split, scenes, windows,
                                              {"checkpoint": str(ckpt.path)}, root, log, progress, bits)
    return Quantized(xml, calibrated, size, bits, agree, diff, quantized_refiner, time.perf_counter() - start)


def _quantize_refiner(config: Config, backbone: Any, refiner: Any, cache: Any, data_root: str | Path | None,
                      split: str, scenes: int, count: int, record: dict[str, Any], root: str,
                      log: Callable[[str], None], progress: bool, bits: int) -> RefinerQuantized | None:
    """The refiner's convolutions quantised on up to ``count`` of the cells the fp32 engine
    (torch) feeds them on ``scenes`` scenes of ``split`` (evenly spaced over it), into
    ``cache``, and checked against the torch convolutions on those cells; None where the
    engine never ran the refiner (nothing to calibrate on, nothing that would run it)."""
    import torch

    from magseg.data.scenes import list_scenes, read_scene
    from magseg.engine.int8 import RefinerInt8, quantize_refiner_into_cache
    from magseg.segmenter import Segmenter

    every = list_scenes(config.data, split, data_root)
    chosen = [every[int(i)] for i in np.linspace(0, len(every) - 1, min(scenes, len(every))).round()]
    log(f"quantize: the refiner: the fp32 engine on {len(chosen)} scene(s) of split {split!r} for its cells")
    segmenter = Segmenter(config.override(["engine.runtime=torch", "engine.precision=fp32", "engine.device=cpu"]),
                          backbone, refiner)
    cells = refiner_cells(segmenter, (segmenter.normalize(read_scene(s, config)[0]) for s in chosen), count)
    if not cells:  # a pyramid of one stage: the refiner never runs, in predict either
        log(f"quantize: the refiner never ran on {len(chosen)} scene(s) of split {split!r}: no graph for it")
        return None
    log(f"quantize: NNCF's int8 quantisation of the refiner's convolutions on {len(cells)} cell maps")
    xml = quantize_refiner_into_cache(refiner, cache, cells,
                                      {**record, "calibration": {"data_root": root, "split": split,
                                                                 "scenes": len(chosen), "cells": len(cells)}},
                                      progress=progress, bits=bits)
    run = RefinerInt8(xml, int(cells[0].shape[1]), torch.get_num_threads())
    diff = scale = 0.0
    with torch.inference_mode():
        for item in cells:
            x = torch.from_numpy(item)
            want, got = refiner.context(x), run(x)
            diff += float((got - want).abs().mean())
            scale += float(want.abs().mean())
    return RefinerQuantized(xml, len(chosen), len(cells), diff / len(cells), scale / len(cells))


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
