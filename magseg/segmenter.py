"""A model ready to segment: backbone + refiner + the config they belong to.

``predict``, ``benchmark`` and the demo all go through this class, so a checkpoint is turned
into models, normalisation and engine settings in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from magseg.checkpoint import Checkpoint, load_checkpoint, load_state, run_config
from magseg.config import Config
from magseg.device import resolve_device
from magseg.engine.crf import check_crf
from magseg.engine.precision import resolve_precision, runtime_info
from magseg.engine.refiner_network import Refiner
from magseg.engine.runtime import (
    RuntimeBackbone,
    check_precision,
    resolve_runtime,
    runtime_backbone,
    runtime_precision,
    state_sha256,
)
from magseg.engine.stages import SegmentationResult, segment
from magseg.engine.tta import with_tta
from magseg.errors import ConfigError
from magseg.engine.temperature import apply_temperature
from magseg.io.provenance import Provenance, config_sha256
from magseg.models.smp import create_backbone
from magseg.normalization import normalize


def create_refiner(config: Config) -> Refiner | None:
    """The refiner the config describes, or None when ``refiner.enabled`` is false."""
    if not config.refiner.enabled:
        return None
    return Refiner(config.num_classes, config.refiner.channels, config.refiner.context_stride,
                   gate=config.refiner.gate)


def create_segmenter_model(config: Config, pretrained: bool = True) -> nn.Module:
    """The backbone segmenter of ``config`` (an smp model, or FCtL for ``arch: fctl``).

    ``pretrained=False`` skips encoder weights (they come from a checkpoint instead).
    """
    model = config.model if pretrained else dataclasses.replace(config.model, encoder_weights=None)
    if model.arch.lower() == "fctl":
        from magseg.models.fctl import create_fctl

        return create_fctl(model, config.num_classes)
    return create_backbone(model, config.num_classes)


def _resolve_runtime(config: Config, device: torch.device) -> str:
    runtime = resolve_runtime(config.engine.runtime, device, config.model.arch.lower() == "fctl")
    check_precision(runtime, config.engine.precision)
    return runtime


def run_info(config: Config) -> dict[str, Any]:
    """What computes ``config``'s results: ``runtime_info``'s block (device, precision, CPU)
    with the backbone's runtime (``backbone_runtime``, ``engine.runtime`` resolved) and the
    precision that runtime really computes in (OpenVINO asked for bf16 on a CPU without it: fp32)."""
    device = resolve_device(config.engine.device)
    runtime = _resolve_runtime(config, device)
    info = runtime_info(device, config.engine.precision)
    return {**info, "precision": runtime_precision(runtime, info["precision"]), "backbone_runtime": runtime}


def _runtime_backbone(runtime: str, config: Config, device: torch.device, digest: str,
                      build) -> RuntimeBackbone:
    precision = resolve_precision(device, config.engine.precision)
    return runtime_backbone(runtime, weights_sha256=digest, config=config, build_torch=build,
                            precision=precision)


class Segmenter:
    """Segments raw or normalised images with a backbone, an optional refiner and a config."""

    def __init__(self, config: Config, backbone: nn.Module, refiner: nn.Module | None = None):
        self.config = config
        # SHA-256 of the checkpoint bytes the weights came from (from_checkpoint), for outputs'
        # provenance tags; "none" for models built otherwise.
        self.checkpoint_sha256 = "none"
        # The checkpoint's temperature (magseg.evaluation.calibration): applied to the
        # probabilities and uncertainty this segmenter outputs, never to its labels.
        self.temperature = 1.0
        self.device = resolve_device(config.engine.device)
        # What runs the backbone (engine.runtime resolved): a torch module handed over is
        # run from its exported graph when the runtime is another (magseg.engine.runtime).
        self.backbone_runtime = _resolve_runtime(config, self.device)
        if self.backbone_runtime != "torch" and not isinstance(backbone, RuntimeBackbone):
            backbone = _runtime_backbone(self.backbone_runtime, config, self.device,
                                         state_sha256(backbone), lambda model=backbone: model)
        check_crf(config.refine.crf)  # a dense CRF without its extra fails here, before any work
        self.backbone = backbone.to(self.device).eval()
        self.refiner = None if refiner is None else refiner.to(self.device).eval()
        if (isinstance(self.backbone, RuntimeBackbone) and self.backbone.int8_graph is not None
                and isinstance(self.refiner, Refiner)):
            # int8: the refiner's convolutions too, where `magseg quantize` made their graph
            # from these weights (else they stay float32: magseg.engine.int8.refiner_int8).
            from magseg.engine.int8 import refiner_int8

            self.refiner.int8_convolutions = refiner_int8(self.refiner, self.backbone.cache, self.backbone.threads)
        if config.engine.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, config: Config) -> "Segmenter":
        """Fresh (untrained or ImageNet-initialised) models: for tests and benchmarks of speed."""
        return cls(config, create_segmenter_model(config), create_refiner(config))

    @classmethod
    def from_checkpoint(
        cls, path: str | Path | Checkpoint, overrides: Mapping[str, Any] | Sequence[str] = ()
    ) -> "Segmenter":
        """Load a checkpoint; ``overrides`` adjust run-time keys (``engine.*``, ``refine.*``).

        Raises:
            CheckpointError: unusable file, or a refiner enabled that the file lacks
                (``magseg.checkpoint.run_config``).
        """
        ckpt = path if isinstance(path, Checkpoint) else load_checkpoint(path)
        config = run_config(ckpt, overrides)

        def build() -> nn.Module:
            model = create_segmenter_model(config, pretrained=False)
            load_state(model, ckpt.backbone, "backbone", ckpt.path)
            return model

        runtime = _resolve_runtime(config, resolve_device(config.engine.device))
        if runtime == "torch":
            backbone = build()
        else:  # from the cached graph: the torch model is built only if it must be exported
            backbone = _runtime_backbone(runtime, config, resolve_device(config.engine.device),
                                         ckpt.sha256, build)
        refiner = None
        if config.refiner.enabled:
            refiner = create_refiner(config)
            load_state(refiner, ckpt.refiner, "refiner", ckpt.path)
        segmenter = cls(config, backbone, refiner)
        segmenter.temperature = ckpt.temperature
        segmenter.checkpoint_sha256 = ckpt.sha256
        return segmenter

    @property
    def provenance(self) -> Provenance:
        """What this segmenter's outputs are tagged with (magseg.io.provenance)."""
        from magseg import __version__

        return Provenance(__version__, self.checkpoint_sha256, config_sha256(self.config),
                          str(self.device), self.precision)

    @property
    def precision(self) -> str:
        """The precision the backbone computes in: ``engine.precision`` resolved for the
        device, as the backbone's runtime runs it (ONNX Runtime: fp32)."""
        resolved = resolve_precision(self.device, self.config.engine.precision)
        return runtime_precision(self.backbone_runtime, resolved)

    @property
    def stage_backbone(self) -> nn.Module:
        """The backbone the engine calls: with ``engine.tta``'s transforms around it."""
        return with_tta(self.backbone, self.config.engine.tta)

    @property
    def runtime(self) -> dict[str, Any]:
        """What computes this segmenter's results: device, resolved precision, the CPU
        (``magseg.engine.precision.runtime_info``) and the backbone's runtime, for records
        and reports."""
        return run_info(self.config)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def normalize(self, pixels: np.ndarray | Tensor) -> Tensor:
        """Raw ``(C, H, W)`` pixels -> normalised float32, with the stored statistics."""
        data = self.config.data
        if data.mean is None or data.std is None:
            raise ConfigError(
                "the config has no data.mean/data.std; train computes them, or set them"
            )
        return normalize(pixels, data.mean, data.std)

    def segment(self, image: Tensor, *, normalized: bool = True, calibrated: bool = True,
                **kwargs: Any) -> SegmentationResult:
        """Run the engine on one ``(C, H, W)`` image; ``kwargs`` go to ``magseg.engine.stages.segment``
        (``return_probs``, ``return_stages``, ``on_crops``, or a ``pyramid``/``refine``/
        ``engine`` to use instead of the config's; ``pixel_std`` is ``data.std``).
        ``calibrated``: the probabilities with the checkpoint's temperature (False: as the
        engine made them); labels are the same."""
        if not normalized:
            image = self.normalize(image)
        cfg = self.config
        kwargs.setdefault("pyramid", cfg.pyramid)
        kwargs.setdefault("refine", cfg.refine)
        kwargs.setdefault("engine", cfg.engine)
        kwargs.setdefault("refiner", self.refiner)
        kwargs.setdefault("pixel_std", cfg.data.std)  # the CRF's pixel units
        result = segment(image, with_tta(self.backbone, kwargs["engine"].tta), **kwargs)
        if calibrated and result.probs is not None:
            result.probs = apply_temperature(result.probs, self.temperature)
        return result
