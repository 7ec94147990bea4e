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
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from magseg.data.scenes import IGNORE, Scene, list_scenes, read_scene  # noqa: E402
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


@dataclass
class _Finest:
    """One scene at the finest stage, ``(C, H, W)`` at the finest stage's size unless said.

    ``fine``: the backbone's probabilities (crops stitched, as patch-only). ``refined``: the
    refiner's logits on every crop (K = 1). ``gate``: ``(H, W)`` the gate's value. ``delta``:
    refined logits minus log fine, the correction the gate lets through, per class.
    ``target``: ``(H, W)`` int64 class ids, IGNORE where unlabelled.
    """

    fine: torch.Tensor
    refined: torch.Tensor
    gate: torch.Tensor
    delta: torch.Tensor
    target: torch.Tensor


def _finest(seg: Segmenter, scene: Scene) -> _Finest:
    """Run the backbone and the refiner of ``seg`` on one scene, as in training: the
    refiner's coarse input is the stage-0 view upsampled."""
    config, backbone, refiner = seg.config, seg.backbone, seg.refiner
    pyramid, engine = config.pyramid, config.engine
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
    target = torch.from_numpy(resize(torch.from_numpy(mask)[None, None].float(), sizes[-1], mode="nearest")
                              [0, 0].numpy().astype(np.int64))
    return _Finest(
        fine=fine,
        refined=stitch_crops(fine.new_empty(fine.shape), logits, boxes),
        gate=stitch_crops(fine.new_empty((1, *fine.shape[1:])), gate, boxes)[0],
        delta=stitch_crops(fine.new_empty(fine.shape), delta, boxes),
        target=target,
    )


class _Tally:
    """Sums over the scenes for one class ``k``: pixel counts, losses, corrections and gate
    values in ``sums``; ``by_cert`` and ``by_size`` ``(bins, 2)``: pixels fine got right,
    and of those, the ones the refiner erased, by fine certainty and by object size."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.sums = {key: 0.0 for key in ("fine_inter", "fine_union", "ref_inter", "ref_union", "pixels",
                                          "class_pixels", "loss_all", "loss_class", "delta_class",
                                          "gate_class", "gate_other")}
        self.by_cert = np.zeros((len(CERTAINTY_BINS) - 1, 2))
        self.by_size = np.zeros((len(SIZE_BINS) - 1, 2))

    def add(self, out: _Finest) -> None:
        """Count one scene."""
        k, tally = self.k, self.sums
        valid = out.target != IGNORE
        fine_l, ref_l = out.fine.argmax(0), out.refined.argmax(0)
        is_k = (out.target == k) & valid
        for name, pred in (("fine", fine_l), ("ref", ref_l)):
            p = (pred == k) & valid
            tally[f"{name}_inter"] += float((p & is_k).sum())
            tally[f"{name}_union"] += float((p | is_k).sum())
        tally["pixels"] += float(valid.sum())
        tally["class_pixels"] += float(is_k.sum())
        ce = torch.nn.functional.cross_entropy(out.refined[None], torch.where(valid, out.target, 0)[None],
                                               reduction="none")[0]
        tally["loss_all"] += float(ce[valid].sum())
        tally["loss_class"] += float(ce[is_k].sum())
        # Correction toward the true class: its logit minus the mean of the others'.
        delta = out.delta
        d = delta[k] - (delta.sum(0) - delta[k]) / (delta.shape[0] - 1)
        tally["delta_class"] += float(d[is_k].sum())
        tally["gate_class"] += float(out.gate[is_k].sum())
        tally["gate_other"] += float(out.gate[valid & ~is_k].sum())
        self._add_erased(out.fine, is_k, fine_l, ref_l)

    def _add_erased(self, fine: torch.Tensor, is_k: torch.Tensor, fine_l: torch.Tensor,
                    ref_l: torch.Tensor) -> None:
        """Pixels of the class fine got right, and those the refiner turned to another class,
        by certainty bin and by object size bin (``is_k``, ``fine_l``, ``ref_l``: ``(H, W)``)."""
        k = self.k
        top2 = fine.topk(2, dim=0).values
        cert = (top2[0] - top2[1]).numpy()
        right = (is_k & (fine_l == k)).numpy()
        erased = right & (ref_l != k).numpy()
        side = _sizes(is_k.numpy())
        for b in range(len(self.by_cert)):
            sel = right & (cert >= CERTAINTY_BINS[b]) & (cert < CERTAINTY_BINS[b + 1])
            self.by_cert[b] += (sel.sum(), (sel & erased).sum())
        for b in range(len(self.by_size)):
            sel = right & (side > SIZE_BINS[b]) & (side <= SIZE_BINS[b + 1])
            self.by_size[b] += (sel.sum(), (sel & erased).sum())


def _pct(a: float, b: float) -> float | None:
    return None if b == 0 else round(100 * a / b, 2)


def _report(args: argparse.Namespace, seg: Segmenter, scenes: int, tally: _Tally) -> dict:
    """The JSON object printed: the run, the class's IoUs and shares, and the erased pixels."""
    sums = tally.sums
    return {
        "checkpoint": str(args.checkpoint), "split": args.split, "scenes": scenes, "class": args.cls,
        "gate": getattr(seg.refiner, "gate", None) is not None,
        "context_stride": seg.config.refiner.context_stride,
        "iou_fine": _pct(sums["fine_inter"], sums["fine_union"]),
        "iou_refined_k1": _pct(sums["ref_inter"], sums["ref_union"]),
        "class_pixel_share": _pct(sums["class_pixels"], sums["pixels"]),
        "class_loss_share": _pct(sums["loss_class"], sums["loss_all"]),
        "mean_correction_toward_class_logits": round(sums["delta_class"] / max(sums["class_pixels"], 1), 3),
        "mean_gate_on_class": round(sums["gate_class"] / max(sums["class_pixels"], 1), 3),
        "mean_gate_elsewhere": round(sums["gate_other"] / max(sums["pixels"] - sums["class_pixels"], 1), 3),
        "erased_by_fine_certainty": [
            {"certainty": f"[{lo:.2f}, {min(hi, 1):.2f}]", "fine_right": int(n), "erased_pct": _pct(e, n)}
            for (lo, hi), (n, e) in zip(zip(CERTAINTY_BINS, CERTAINTY_BINS[1:]), tally.by_cert)],
        "erased_by_object_side": [
            {"side_px": f"({lo}, {hi if hi < 10**9 else 'inf'}]", "fine_right": int(n), "erased_pct": _pct(e, n)}
            for (lo, hi), (n, e) in zip(zip(SIZE_BINS, SIZE_BINS[1:]), tally.by_size)],
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--class", dest="cls", default="urban", help="class name to follow")
    parser.add_argument("--limit", type=int, default=None, help="at most this many scenes")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="config override key=value")
    return parser


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    seg = Segmenter.from_checkpoint(args.checkpoint, ["refiner.enabled=true", *args.sets])
    if seg.refiner is None:
        parser.error(f"{args.checkpoint} has no refiner")
    tally = _Tally([c.name for c in seg.config.classes].index(args.cls))
    scenes = list_scenes(seg.config.data, args.split, args.data)[: args.limit]
    for scene in scenes:
        tally.add(_finest(seg, scene))
    print(json.dumps(_report(args, seg, len(scenes), tally), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
