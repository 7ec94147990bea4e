#!/usr/bin/env python
"""The quick-look pictures at awkward shapes, from fixed inputs, for docs/gis.md.

Renders, without a model, what `magseg predict --preview` and `magseg benchmark` draw:

- previews of synthetic scenes of 100 x 100, 90 x 1024 (W x H: tall and narrow) and
  1024 x 120 (a wide strip) pixels, with a made-up uncertainty that grows towards class
  borders;
- the benchmark's per-stage plot, one sample panel and (where this version draws it) the
  normalised confusion matrix, from a fixed example report whose progressive and
  "no refiner" rows are identical (a checkpoint whose refiner was switched off), as a real
  benchmark of such a checkpoint reports them.

The same inputs every run, so two versions of magseg can be compared picture for picture:

    python scripts/quicklook_figures.py --out docs/img --prefix after_
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from magseg.config import ClassSpec
from magseg.data.synthetic import SceneSpec, make_scene
from magseg.geometry import Rect
from magseg.io.preview import PreviewCanvas

CLASSES = [
    ClassSpec(0, "unknown", (0, 0, 0), in_mean=False),
    ClassSpec(1, "urban", (0, 255, 255)),
    ClassSpec(2, "agriculture", (255, 255, 0)),
    ClassSpec(3, "rangeland", (255, 0, 255)),
    ClassSpec(4, "forest", (0, 255, 0)),
    ClassSpec(5, "water", (0, 0, 255)),
    ClassSpec(6, "barren", (255, 255, 255)),
]
# (W, H), as GIS tools name a raster's size.
SHAPES = [(100, 100), (90, 1024), (1024, 120)]


def scene(height: int, width: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image (3, H, W) uint8, labels (H, W) uint8, uncertainty (H, W) uint8)``: a synthetic
    scene, and an uncertainty of 255 on class borders fading over 8 px."""
    image, labels = make_scene(seed, 0, SceneSpec(size=(height, width), cells=3))
    import cv2

    border = np.zeros(labels.shape, np.uint8)
    border[:-1] |= labels[:-1] != labels[1:]
    border[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    distance = cv2.distanceTransform((1 - border).astype(np.uint8), cv2.DIST_L2, 3)
    uncertainty = np.clip(255 * (1 - distance / 8), 0, 255).astype(np.uint8)
    return image, labels, uncertainty


def preview(path: Path, width: int, height: int) -> None:
    image, labels, uncertainty = scene(height, width)
    canvas = PreviewCanvas((height, width))
    canvas.add(Rect(0, 0, height, width), image, labels, uncertainty, np.ones(labels.shape, bool))
    canvas.save(path, CLASSES, title=f"scene_{width}x{height}.tif")


def example_report() -> dict:
    """A report as ``build_report`` makes it (only what the plots and report.md read)."""
    names = [c.name for c in CLASSES]
    rng = np.random.default_rng(0)

    def method(miou: float, matrix: np.ndarray, description: str, stages=None) -> dict:
        tp, gt, pred = matrix.diagonal(), matrix.sum(1), matrix.sum(0)
        iou = tp / np.maximum(gt + pred - tp, 1)
        out = {"description": description, "miou": miou, "iou": dict(zip(names, iou.tolist())),
               "accuracy": float(tp[1:].sum() / gt[1:].sum()), "fwiou": miou - 0.02,
               "seconds_per_image": 1.0, "peak_memory_mb": 900.0, "images": 4,
               "confusion_matrix": matrix.tolist()}
        if stages:
            out["stages"] = [{"stage": k, "size": s, "miou": v, "refined_fraction": f,
                              "crops_run": 4 ** k, "crops_total": 4 ** k, "seconds_per_image": 0.3}
                             for k, (s, v, f) in enumerate(stages)]
        return out

    def matrix(noise: float) -> np.ndarray:
        m = np.diag([0, 30000, 90000, 20000, 40000, 10000, 8000]).astype(float)
        m += rng.random(m.shape) * noise * m.diagonal()[:, None]
        m[0] = 0
        return m.round().astype(int)

    progressive = matrix(0.06)
    stages = [([256, 256], 0.62, 0.0), ([512, 512], 0.70, 0.18), ([1024, 1024], 0.74, 0.09)]
    return {
        "split": "test", "data_root": "data/synthetic", "checkpoint": "runs/demo/best.ckpt", "images": 4,
        "failed": [], "classes": [{"id": c.id, "name": c.name, "in_mean": c.in_mean} for c in CLASSES],
        "config": {"pyramid": {"scales": [[256, 256], [512, 512], [1024, 1024]], "crop": [256, 256]},
                   "refine": {"points": 0.5}, "refiner": {"enabled": False}},
        "environment": {"device": "cpu", "precision": "fp32", "torch_threads": 2,
                        "cpu": {"model": "AMD EPYC", "capability": "AVX512"}},
        "measurement": {"miou": "one confusion matrix per method", "time": "wall time", "memory": "VmHWM"},
        "methods": {
            "progressive": method(0.74, progressive, "progressive", stages),
            "progressive, no refiner": method(0.74, progressive, "progressive, no refiner", stages),
            "downsample": method(0.62, matrix(0.12), "downsample-only"),
            "patch": method(0.63, matrix(0.11), "patch-only"),
        },
        "margins_miou_points": {"progressive_minus_downsample": 12.0, "progressive_minus_patch": 11.0},
        "refiner_gain_points": None, "plots": [], "command": None,
    }


def example_sample():
    from magseg.evaluation.benchmark import Sample

    image, labels, uncertainty = scene(256, 256, seed=5)
    shifted = np.roll(labels, 3, axis=1)
    refined = [uncertainty > 200, uncertainty > 240]
    return Sample("000005", np.ascontiguousarray(image.transpose(1, 2, 0)), labels,
                  {"progressive": labels, "progressive, no refiner": labels, "downsample": shifted,
                   "patch": np.roll(labels, 2, axis=0)}, uncertainty / 255.0, refined)


def plots(out: Path, prefix: str) -> list[Path]:
    from magseg.evaluation import report as rep

    report = example_report()
    made = {f"{prefix}miou_per_stage.png": rep.plot_miou_per_stage(report),
            f"{prefix}sample.png": rep.plot_sample(example_sample(), CLASSES)}
    if hasattr(rep, "plot_confusion"):
        made[f"{prefix}confusion.png"] = rep.plot_confusion(report)
    for name, data in made.items():
        (out / name).write_bytes(data)
    return [out / n for n in made]


def shrink(path: Path, width: int) -> None:
    """``path`` (a PNG) scaled down to ``width`` px wide if wider, and stored with a
    256-colour palette: small enough for docs/."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the PNGs")
    parser.add_argument("--prefix", default="", help="prefix of every file name (e.g. before_)")
    parser.add_argument("--max-width", type=int, default=None,
                        help="shrink wider pictures to this width (area-averaged), e.g. for docs/")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for w, h in SHAPES:
        path = args.out / f"{args.prefix}preview_{w}x{h}.png"
        preview(path, w, h)
        written.append(path)
    written += plots(args.out, args.prefix)
    if args.max_width:
        for path in written:
            shrink(path, args.max_width)
    print(json.dumps({str(p): p.stat().st_size for p in written}, indent=1))


if __name__ == "__main__":
    main()
