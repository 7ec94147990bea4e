"""magseg: progressive (MagNet-style) segmentation of ultra-high-resolution images.

The public API: ``Segmenter`` (a checkpoint or config turned into models ready to run),
``segment`` (the stage loop on one in-memory image), ``load_config`` and the config classes,
``predict_raster`` (one raster of any size to GeoTIFF outputs), ``MagsegError`` (the base
of every error magseg raises on purpose), and the contracts a model of one's own meets:
``Backbone`` (``(B, C_in, h, w)`` images to ``(B, classes, h, w)`` logits),
``MultiContextBackbone``, ``RefinerLike`` (``(fine, coarse)`` probabilities to logits) and
``ProbsRefiner``.
"""

from typing import Any

from magseg.config import Config, EngineConfig, PyramidConfig, RefineConfig, load_config
from magseg.errors import MagsegError

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "Config",
    "EngineConfig",
    "MagsegError",
    "MultiContextBackbone",
    "ProbsRefiner",
    "PyramidConfig",
    "RefineConfig",
    "RefinerLike",
    "SegmentationResult",
    "Segmenter",
    "load_config",
    "predict_raster",
    "segment",
]

# Imported when first used: they pull in torch, segmentation-models-pytorch and rasterio,
# which `magseg --version`, `--help` and the config tools do not need.
_LAZY = {
    "Backbone": "magseg.engine.backbone",
    "MultiContextBackbone": "magseg.engine.backbone",
    "ProbsRefiner": "magseg.engine.refiner_network",
    "RefinerLike": "magseg.engine.refiner_network",
    "SegmentationResult": "magseg.engine.stages",
    "segment": "magseg.engine.stages",
    "Segmenter": "magseg.segmenter",
    "predict_raster": "magseg.run.predict",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'magseg' has no attribute {name!r}")
