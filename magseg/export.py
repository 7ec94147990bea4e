"""``magseg export``: a checkpoint's backbone as one ONNX file (or OpenVINO IR) that runs
without magseg or torch, with what it needs to be used stored inside it and beside it.

The file maps a normalised ``(B, C_in, N, N)`` float32 batch (batch dynamic, ``N`` the
pyramid's input size unless asked otherwise) to ``(B, classes, N, N)`` class probabilities
(softmax of the backbone's logits). Its ``metadata_props`` (every value JSON text) hold:

- magseg's own keys: ``classes`` (id, name, colour, in_mean), ``class_colors``, ``bands``,
  ``normalization`` (mean/std in raw pixel units: input = (raw - mean) / std), ``pyramid``
  (scales, crop, input), ``refine_points`` (K), ``model``, ``magseg_version``,
  ``checkpoint_sha256``, ``output``;
- the QGIS Deepness plugin's keys: ``model_type`` ``Segmentor``, ``class_names``,
  ``tiles_size`` (and ``tile_size``, the spelling its code reads), ``tiles_overlap`` (percent),
  ``standardization_mean``/``standardization_std``: Deepness divides 8-bit pixels by 255
  first, so these are magseg's mean/std over 255.

Beside it, ``<name>.mlm.json``: a STAC item with the machine-learning-model (MLM) extension
describing the same input, normalisation, output and classes; and, when the checkpoint has
a refiner, ``<name>.refiner.onnx`` (``.refiner.xml``/``.bin``): ``(fine, coarse)``, each
``(B, classes, h, w)`` probabilities of the same crops (``h, w`` the pyramid's crop), to
``(B, classes, h, w)`` refined probabilities, with its own metadata (``refiner_metadata``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from collections.abc import Callable
from pathlib import Path
from typing import Any

from magseg.checkpoint import Checkpoint, load_checkpoint, load_state
from magseg.config import Config
from magseg.errors import ConfigError
from magseg.io.atomic import atomic_write

FORMATS = ("onnx", "openvino")
MLM_SCHEMA = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"
# Deepness cuts the map into tiles overlapping by this percentage (a starting point: magseg's
# own pyramid owns each pixel by one crop and needs none).
TILES_OVERLAP_PERCENT = 10


@dataclass(frozen=True)
class Exported:
    """What ``export_model`` wrote: the model file(s), the STAC MLM JSON, the metadata, and
    the refiner's file(s) (empty without a refiner)."""

    files: list[Path]
    mlm: Path
    metadata: dict[str, str]
    input_size: int
    refiner: list[Path] = dataclasses.field(default_factory=list)


def export_paths(out: Path, fmt: str) -> tuple[list[Path], Path]:
    """The files ``export_model`` writes for ``out``: the model (``.xml`` + ``.bin`` for
    OpenVINO), and the STAC MLM JSON beside them."""
    if fmt == "openvino":
        files = [out.with_suffix(".xml"), out.with_suffix(".bin")]
    else:
        files = [out]
    return files, out.with_name(out.stem + ".mlm.json")


def refiner_paths(out: Path, fmt: str) -> list[Path]:
    """The refiner's file(s) beside ``out``: ``<name>.refiner.onnx`` (``.refiner.xml`` and
    ``.refiner.bin`` for OpenVINO)."""
    stem = out.with_name(out.stem + ".refiner")
    if fmt == "openvino":
        return [stem.with_name(stem.name + ".xml"), stem.with_name(stem.name + ".bin")]
    return [stem.with_name(stem.name + ".onnx")]


def refiner_metadata(config: Config, backbone_file: Path, checkpoint_sha256: str) -> dict[str, Any]:
    """The metadata of an exported refiner, as plain values: what goes in, what comes out,
    and how magseg's engine uses it."""
    from magseg import __version__

    crop = list(config.pyramid.crop)
    return {
        "role": "refiner",
        "inputs": {
            "fine": f"(B, classes, {crop[0]}, {crop[1]}) float32: the backbone's probabilities "
                    "of a stage's crops",
            "coarse": f"(B, classes, {crop[0]}, {crop[1]}) float32: the previous stage's "
                      "probabilities at the same crops, resized to the crop",
        },
        "output": "probabilities: (B, classes, h, w), softmax of the refined logits",
        "usage": "magseg keeps these at the refine_points (K) fraction of each crop's pixels "
                 "where the coarse map is least certain, and the coarse map elsewhere",
        "backbone": backbone_file.name,
        "classes": [{"id": c.id, "name": c.name} for c in config.classes],
        "crop": crop,
        "refine_points": config.refine.points,
        "context_stride": config.refiner.context_stride,
        "magseg_version": __version__,
        "checkpoint_sha256": checkpoint_sha256,
    }


def model_metadata(config: Config, input_size: int, checkpoint_sha256: str) -> dict[str, Any]:
    """The metadata of an exported model, as plain values (``export_model`` stores each as
    JSON text)."""
    from magseg import __version__

    mean, std = config.data.mean, config.data.std
    if mean is None or std is None:
        raise ConfigError("the checkpoint's config has no data.mean/data.std; an exported model "
                          "needs its normalisation (train computes it, or set data.mean/data.std)")
    classes = config.classes
    return {
        # QGIS Deepness (its docs spell the tile size tiles_size, its code reads tile_size)
        "model_type": "Segmentor",
        "class_names": {str(c.id): c.name for c in classes},
        "tiles_size": input_size,
        "tile_size": input_size,
        "tiles_overlap": TILES_OVERLAP_PERCENT,
        "standardization_mean": [m / 255.0 for m in mean],
        "standardization_std": [s / 255.0 for s in std],
        # magseg
        "classes": [{"id": c.id, "name": c.name, "color": list(c.color), "in_mean": c.in_mean}
                    for c in classes],
        "class_colors": {str(c.id): list(c.color) for c in classes},
        "bands": None if config.data.bands is None else list(config.data.bands),
        "normalization": {"mean": list(mean), "std": list(std), "units": "raw pixel values",
                          "input": "(raw - mean) / std"},
        "pyramid": {"scales": [list(s) for s in config.pyramid.scales],
                    "crop": list(config.pyramid.crop), "input": list(config.pyramid.input)},
        "refine_points": config.refine.points,
        "model": {"arch": config.model.arch, "encoder": config.model.encoder,
                  "in_channels": config.model.in_channels},
        "output": "probabilities: softmax over classes, (B, classes, N, N)",
        "magseg_version": __version__,
        "checkpoint_sha256": checkpoint_sha256,
    }


def mlm_item(config: Config, meta: dict[str, Any], model_file: Path, fmt: str) -> dict[str, Any]:
    """A STAC item (MLM extension 1.4) describing the exported model."""
    import torch

    from magseg.engine.runtime import INPUT_NAME, PROBS_NAME  # the names the graph has

    n, channels = meta["tiles_size"], config.model.in_channels
    bands = [f"band {b}" for b in (config.data.bands or range(1, channels + 1))]
    framework = {"onnx": "ONNX", "openvino": "OpenVINO"}[fmt]
    media = {"onnx": "application/octet-stream; framework=onnx; profile=onnx",
             "openvino": "application/xml; framework=openvino"}[fmt]
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [MLM_SCHEMA],
        "id": model_file.stem,
        "geometry": None,
        "bbox": None,
        "properties": {
            "datetime": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "mlm:name": f"magseg {config.name} {config.model.arch}-{config.model.encoder}",
            "mlm:architecture": f"{config.model.arch} ({config.model.encoder})",
            "mlm:tasks": ["semantic-segmentation"],
            "mlm:framework": framework,
            "mlm:framework_version": torch.__version__,
            "mlm:accelerator": "amd64",
            "mlm:batch_size_suggestion": config.engine.batch_size,
            "mlm:input": [{
                "name": INPUT_NAME,
                "bands": bands,
                "input": {"shape": [-1, channels, n, n],
                          "dim_order": ["batch", "bands", "height", "width"],
                          "data_type": "float32"},
                "value_scaling": [{"type": "z-score", "mean": m, "stddev": s}
                                  for m, s in zip(config.data.mean, config.data.std)],
                "resize_type": None,
            }],
            "mlm:output": [{
                "name": PROBS_NAME,
                "tasks": ["semantic-segmentation"],
                "result": {"shape": [-1, config.num_classes, n, n],
                           "dim_order": ["batch", "channel", "height", "width"],
                           "data_type": "float32"},
                "classification:classes": [
                    {"value": c["id"], "name": c["name"],
                     "color_hint": "{:02X}{:02X}{:02X}".format(*c["color"])}
                    for c in meta["classes"]],
                "post_processing_function": None,
            }],
            "magseg:pyramid": meta["pyramid"],
            "magseg:refine_points": meta["refine_points"],
            "magseg:version": meta["magseg_version"],
            "magseg:checkpoint_sha256": meta["checkpoint_sha256"],
        },
        "assets": {"model": {"href": f"./{model_file.name}", "type": media,
                             "title": f"{framework} model", "roles": ["mlm:model"],
                             "mlm:artifact_type": "onnx" if fmt == "onnx" else "openvino-ir"}},
        "links": [],
    }


def _input_size(config: Config, requested: int | None, multiple: int) -> int:
    size = requested if requested is not None else max(config.pyramid.input)
    if size < 1 or size % multiple:
        raise ConfigError(f"--input {size}: the backbone takes sizes divisible by {multiple}; "
                          f"use e.g. --input {max(multiple, size - size % multiple)}")
    return size


def export_model(checkpoint: str | Path | Checkpoint, out: str | Path, *, fmt: str = "onnx",
                 input_size: int | None = None, overwrite: bool = False) -> Exported:
    """Export the checkpoint's backbone (probabilities out) to ``out`` with its metadata,
    the STAC MLM JSON beside it, and its refiner (when it has one) as
    ``<name>.refiner.onnx``; every file written atomically.

    Raises:
        CheckpointError: the checkpoint cannot be read or does not fit its config.
        ConfigError: an unknown format, an input size the backbone cannot take, a
            multi-context backbone (FCtL), or no exporter installed.
        OutputExistsError: an output exists and ``overwrite`` is false.
    """
    from magseg.engine.backbone import input_multiple
    from magseg.engine.runtime import PROBS_NAME, exporter_installed, export_onnx, export_refiner_onnx
    from magseg.segmenter import create_refiner, create_segmenter_model

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: choose onnx or openvino")
    if not exporter_installed():
        raise ConfigError("magseg export needs onnx and onnxscript: pip install 'magseg[onnx]'")
    if fmt == "openvino" and not _has("openvino"):
        raise ConfigError("--format openvino needs openvino: pip install 'magseg[openvino]'")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    config = ckpt.config
    if config.model.arch.lower() == "fctl":
        raise ConfigError("model.arch=fctl takes context crops beside each crop (two inputs); "
                          "magseg export writes single-input backbones only")
    out = Path(out)
    files, mlm_path = export_paths(out, fmt)
    with_refiner = config.refiner.enabled and ckpt.refiner is not None
    refiner_files = refiner_paths(out, fmt) if with_refiner else []
    _refuse_existing([*files, mlm_path, *refiner_files], overwrite)
    backbone = create_segmenter_model(config, pretrained=False)
    load_state(backbone, ckpt.backbone, "backbone", ckpt.path)
    size = _input_size(config, input_size, input_multiple(backbone))
    meta = model_metadata(config, size, ckpt.sha256)
    props = {key: json.dumps(value) for key, value in meta.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    channels = config.model.in_channels
    _write_model(fmt, files, props, lambda path, metadata: export_onnx(
        backbone, path, channels, (size, size), softmax=True, metadata=metadata,
        output_name=PROBS_NAME))
    if with_refiner:
        refiner = create_refiner(config)
        load_state(refiner, ckpt.refiner, "refiner", ckpt.path)
        refiner_props = {key: json.dumps(value)
                         for key, value in refiner_metadata(config, files[0], ckpt.sha256).items()}
        crop = tuple(config.pyramid.crop)
        _write_model(fmt, refiner_files, refiner_props, lambda path, metadata: export_refiner_onnx(
            refiner, path, config.num_classes, crop, metadata=metadata))
    item = mlm_item(config, meta, files[0], fmt)
    if refiner_files:
        item["assets"]["refiner"] = {
            "href": f"./{refiner_files[0].name}", "type": item["assets"]["model"]["type"],
            "title": "refiner: (fine, coarse) probabilities of a crop -> refined probabilities",
            "roles": ["data"]}
    with atomic_write(mlm_path) as tmp:
        tmp.write_text(json.dumps(item, indent=2) + "\n")
    return Exported(files, mlm_path, props, size, refiner_files)


def _write_model(fmt: str, files: list[Path], props: dict[str, str],
                 write_onnx: Callable[[Path, dict[str, str] | None], None]) -> None:
    """``write_onnx(path, metadata)`` writes an ONNX file; for OpenVINO it is converted to
    IR (fp32 weights, the metadata in the IR's ``rt_info`` under ``model_info``), the .xml
    and .bin put in place together."""
    if fmt == "onnx":
        write_onnx(files[0], props)
        return
    import openvino as ov

    from magseg.engine.runtime import save_openvino

    xml, bin_ = files
    scratch = Path(tempfile.mkdtemp(prefix=".magseg-export-", dir=xml.parent))
    try:
        onnx_path = scratch / "model.onnx"
        write_onnx(onnx_path, None)
        model = ov.convert_model(str(onnx_path))
        for key, value in props.items():
            model.set_rt_info(value, ["model_info", key])
        save_openvino(model, xml, bin_)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    from magseg.errors import OutputExistsError

    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]} exists; pass --overwrite to replace it, or "
                                "choose another -o")
