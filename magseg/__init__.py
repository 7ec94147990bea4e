"""magseg: progressive (MagNet-style) segmentation of ultra-high-resolution images."""

from magseg.config import Config, PyramidConfig, RefineConfig, EngineConfig, load_config
from magseg.engine import SegmentationResult, segment
from magseg.errors import MagsegError

__version__ = "0.1.0"

__all__ = [
    "Config",
    "EngineConfig",
    "MagsegError",
    "PyramidConfig",
    "RefineConfig",
    "SegmentationResult",
    "load_config",
    "segment",
]
