#!/usr/bin/env python
"""What the refiner does to one class (small objects) at the finest stage, measured.

For every scene of a split: fine = the backbone's crops at the finest scale (stitched, as
patch-only), coarse = the stage-0 view upsampled (the refiner's coarse input in training),
refined = the refiner on each crop of fine and coarse (K = 1: every pixel takes it). Then,
for ``--class`` (default urban):

- IoU of fine and of refined, and how many of the pixels of the class that fine got right
  the refiner turns to another class ("erased"), by fine certainty (top-1 minus top-2) and
  by object size (largest side of the ground-truth connected component): which objects
  the refiner overturns;
- the correction the refiner applies there, in logits toward the true class (negative:
  against it), and the gate's mean value (1 without a gate);
- the class's share of the pixels and of a dense cross-entropy on the refined logits: how
  much of a plain loss the class carries.

    python scripts/refiner_diagnostics.py run/best.ckpt data/ --split test --class urban

stdout: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from magseg.data.scenes import IGNORE, list_scenes, read_scene  # noqa: E402
from magseg.engine.pyramid import crop_boxes, extract_crops, resize, stitch_crops  # noqa: E402
from magseg.engine.stages import stage_probs  # noqa: E402
from magseg.segmenter import Segmenter  # noqa: E402

CERTAINTY_BINS = (0.0, 0.25, 0.5, 0.75, 1.01)
SIZE_BINS = (0, 8, 16, 31, 10**9)


def _sizes(mask: np.ndarray) -> np.ndarray:
    """Per pixel of ``mask``, the largest side of its connected component (0 elsewhere)."""
    count, comp, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    side = np.maximum(stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT])
    side[0] = 0
    return side[comp]


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--class", dest="cls", default="urban", help="class name to follow")
    parser.add_argument("--limit", type=int, default=None, help="at most this many scenes")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="config override key=value")
    args = parser.parse_args(argv)

    seg = Segmenter.from_checkpoint(args.checkpoint, ["refiner.enabled=true", *args.sets])
    config, backbone, refiner = seg.config, seg.backbone, seg.refiner
    if refiner is None:
        parser.error(f"{args.checkpoint} has no refiner")
    names = [c.name for c in config.classes]
    k = names.index(args.cls)
    pyramid, engine = config.pyramid, config.engine
    scenes = list_scenes(config.data, args.split, args.data)[: args.limit]

    n_cert = len(CERTAINTY_BINS) - 1
    n_size = len(SIZE_BINS) - 1
    tally = {key: 0.0 for key in ("fine_inter", "fine_union", "ref_inter", "ref_union", "pixels", "class_pixels",
                                  "loss_all", "loss_class", "delta_class", "gate_class", "gate_other")}
    by_cert = np.zeros((n_cert, 2))  # fine right, of which erased
    by_size = np.zeros((n_size, 2))
    for scene in scenes:
        image, mask = read_scene(scene, config)
        x = seg.normalize(image).to(seg.device)
        sizes = pyramid.stage_sizes(tuple(x.shape[-2:]))
        coarse = resize(stage_probs(backbone, resize(x, sizes[0]), pyramid, engine), sizes[-1])
        fine = stage_probs(backbone, resize(x, sizes[-1]), pyramid, engine)
        boxes = crop_boxes(sizes[-1], pyramid.crop)
        f, c = extract_crops(fine, boxes, pyramid.crop), extract_crops(coarse, boxes, pyramid.crop)
        logits = refiner(f, c)
        gate = refiner.gate_map(f, c)
        delta = logits - f.clamp_min(1e-6).log()  # gate * correction, per class
        refined_logits = stitch_crops(fine.new_empty(fine.shape), logits, boxes)
        gate_full = stitch_crops(fine.new_empty((1, *fine.shape[1:])), gate, boxes)[0]
        delta_full = stitch_crops(fine.new_empty(fine.shape), delta, boxes)
        target = torch.from_numpy(resize(torch.from_numpy(mask)[None, None].float(), sizes[-1], mode="nearest")
                                  [0, 0].numpy().astype(np.int64))
        valid = target != IGNORE
        fine_l, ref_l = fine.argmax(0), refined_logits.argmax(0)
        is_k = (target == k) & valid
        for name, pred in (("fine", fine_l), ("ref", ref_l)):
            p = (pred == k) & valid
            tally[f"{name}_inter"] += float((p & is_k).sum())
            tally[f"{name}_union"] += float((p | is_k).sum())
        tally["pixels"] += float(valid.sum())
        tally["class_pixels"] += float(is_k.sum())
        ce = torch.nn.functional.cross_entropy(refined_logits[None], torch.where(valid, target, 0)[None],
                                               reduction="none")[0]
        tally["loss_all"] += float(ce[valid].sum())
        tally["loss_class"] += float(ce[is_k].sum())
        # Correction toward the true class: its logit minus the mean of the others'.
        d = delta_full[k] - (delta_full.sum(0) - delta_full[k]) / (delta_full.shape[0] - 1)
        tally["delta_class"] += float(d[is_k].sum())
        tally["gate_class"] += float(gate_full[is_k].sum())
        tally["gate_other"] += float(gate_full[valid & ~is_k].sum())

        top2 = fine.topk(2, dim=0).values
        cert = (top2[0] - top2[1]).numpy()
        right = (is_k & (fine_l == k)).numpy()
        erased = right & (ref_l != k).numpy()
        side = _sizes(is_k.numpy())
        for b in range(n_cert):
            sel = right & (cert >= CERTAINTY_BINS[b]) & (cert < CERTAINTY_BINS[b + 1])
            by_cert[b] += (sel.sum(), (sel & erased).sum())
        for b in range(n_size):
            sel = right & (side > SIZE_BINS[b]) & (side <= SIZE_BINS[b + 1])
            by_size[b] += (sel.sum(), (sel & erased).sum())

    def pct(a: float, b: float) -> float | None:
        return None if b == 0 else round(100 * a / b, 2)

    out = {
        "checkpoint": str(args.checkpoint), "split": args.split, "scenes": len(scenes), "class": args.cls,
        "gate": getattr(refiner, "gate", None) is not None, "context_stride": config.refiner.context_stride,
        "iou_fine": pct(tally["fine_inter"], tally["fine_union"]),
        "iou_refined_k1": pct(tally["ref_inter"], tally["ref_union"]),
        "class_pixel_share": pct(tally["class_pixels"], tally["pixels"]),
        "class_loss_share": pct(tally["loss_class"], tally["loss_all"]),
        "mean_correction_toward_class_logits": round(tally["delta_class"] / max(tally["class_pixels"], 1), 3),
        "mean_gate_on_class": round(tally["gate_class"] / max(tally["class_pixels"], 1), 3),
        "mean_gate_elsewhere": round(tally["gate_other"] / max(tally["pixels"] - tally["class_pixels"], 1), 3),
        "erased_by_fine_certainty": [
            {"certainty": f"[{lo:.2f}, {min(hi, 1):.2f}]", "fine_right": int(n), "erased_pct": pct(e, n)}
            for (lo, hi), (n, e) in zip(zip(CERTAINTY_BINS, CERTAINTY_BINS[1:]), by_cert)],
        "erased_by_object_side": [
            {"side_px": f"({lo}, {hi if hi < 10**9 else 'inf'}]", "fine_right": int(n), "erased_pct": pct(e, n)}
            for (lo, hi), (n, e) in zip(zip(SIZE_BINS, SIZE_BINS[1:]), by_size)],
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
