"""Which model made an output: tags written into every predict output, and the check that
keeps a re-run from silently keeping another model's results.

An output carries the magseg version, the checkpoint file's SHA-256, a digest of the config
keys that decide its pixels, and the device and precision that computed it. A re-run without
``--overwrite`` skips an existing output only when its checkpoint and config digests are this
run's; otherwise the input fails with both digests named.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from magseg.config import Config

# Config keys that do not change an output's pixels: where data and checkpoints live,
# training settings, and how the engine is scheduled. Device and precision are tagged on
# their own: the same model on another CPU is not another model.
_NOT_RESULTS = {
    "name": None,
    "train": None,
    "data": ("root", "layout", "train_split", "val_split", "test_split"),
    "engine": ("batch_size", "device", "precision", "channels_last", "runtime", "cache_dir"),
}
_TAGS = {"version": "MAGSEG_VERSION", "checkpoint_sha256": "MAGSEG_CHECKPOINT_SHA256",
         "config_sha256": "MAGSEG_CONFIG_SHA256", "device": "MAGSEG_DEVICE", "precision": "MAGSEG_PRECISION"}


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def config_sha256(config: Config) -> str:
    """SHA-256 of the config keys that decide the pixels (classes, model, pyramid, refiner,
    K and kernel, the CRF when on, normalisation, bands, adaptive mode), in canonical JSON."""
    data = config.to_dict()
    if data.get("engine", {}).get("tta") == "none":
        data["engine"].pop("tta")  # the digest of a config from before engine.tta existed
    for section, keys in _NOT_RESULTS.items():
        if keys is None:
            data.pop(section, None)
        else:
            for key in keys:
                data.get(section, {}).pop(key, None)
    # A CRF that is off decides nothing: its settings stay out, so a config without the
    # section hashes as it always has.
    if not data.get("refine", {}).get("crf", {}).get("enabled", False):
        data.get("refine", {}).pop("crf", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Provenance:
    """What made an output; ``checkpoint_sha256`` is ``none`` for models not from a file."""

    version: str
    checkpoint_sha256: str
    config_sha256: str
    device: str
    precision: str

    def tags(self) -> dict[str, str]:
        """GeoTIFF metadata / vector layer metadata."""
        return {tag: getattr(self, field) for field, tag in _TAGS.items()}

    @classmethod
    def from_tags(cls, tags: Mapping[str, Any]) -> "Provenance | None":
        """The provenance an output's tags hold, or None when it has none."""
        if not all(tag in tags for tag in _TAGS.values()):
            return None
        return cls(**{field: str(tags[tag]) for field, tag in _TAGS.items()})

    def same_model(self, other: "Provenance") -> bool:
        """Same checkpoint file and the same pixel-deciding config."""
        return (self.checkpoint_sha256, self.config_sha256) == (other.checkpoint_sha256, other.config_sha256)

    def describe(self) -> str:
        return f"checkpoint sha256 {self.checkpoint_sha256[:12]}, config {self.config_sha256[:12]}"


def output_tags(path: str | Path, layer: str = "classes") -> dict[str, str] | None:
    """The metadata an existing output file carries, by its kind: a raster's dataset tags,
    a PNG's text chunks, a vector layer's metadata (GeoPackage and FlatGeobuf keep it,
    GeoJSON keeps none: ``{}``). None when the file does not open as that kind at all."""
    import warnings

    from magseg.io.sources import gdal_path

    path = Path(path)
    suffix = path.suffix.lower()
    try:
        with warnings.catch_warnings(), gdal_path(path) as name:
            warnings.simplefilter("ignore")
            if suffix in (".tif", ".tiff"):
                import rasterio

                with rasterio.open(name) as src:
                    return dict(src.tags())
            if suffix == ".png":
                from PIL import Image

                with Image.open(path) as image:
                    image.load()
                    return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}
            import pyogrio

            return dict(pyogrio.read_info(name, layer=layer).get("layer_metadata") or {})
    except Exception:  # noqa: BLE001  whatever the library: it is not such a file
        return None
