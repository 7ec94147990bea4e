#!/usr/bin/env python
"""One test scene's class map (top) and uncertainty, 1 - certainty (bottom), side by side for
each context margin: what the crop grid looks like on a map, and what blending leaves of it.

    python scripts/seam_figure.py demo_out/run/best.ckpt demo_out/data --margins 0,16 \\
        --scene 3 --out docs/img/seams_margin.png

Class colours are the checkpoint's; uncertainty is black (sure) to white (two classes tie).
Runs at fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from magseg.data.scenes import list_scenes, read_scene
from magseg.segmenter import Segmenter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("data_root")
    parser.add_argument("--split", default="test")
    parser.add_argument("--scene", type=int, default=0, help="index of the scene in the split")
    parser.add_argument("--margins", default="0,16", help="pyramid.margin values, stage pixels")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)

    seg = Segmenter.from_checkpoint(args.checkpoint, ["engine.precision=fp32", "engine.device=cpu"])
    scenes = list_scenes(seg.config.data, args.split, args.data_root)
    if not 0 <= args.scene < len(scenes):
        print(f"seam_figure: --scene {args.scene} is not in the {len(scenes)} scenes of {args.split}",
              file=sys.stderr)
        return 2
    image, _ = read_scene(scenes[args.scene], seg.config)
    x = seg.normalize(image)
    colours = np.array([c.color for c in seg.config.classes], np.uint8)
    panels = []
    for margin in (int(m) for m in args.margins.split(",")):
        result = seg.segment(x, pyramid=dataclasses.replace(seg.config.pyramid, margin=margin), return_probs=True)
        uncertainty = ((1 - result.certainty).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        panels.append(np.concatenate([colours[result.labels.numpy()], np.repeat(uncertainty[..., None], 3, -1)]))
    gap = np.full((panels[0].shape[0], 8, 3), 128, np.uint8)
    row = [panels[0]]
    for panel in panels[1:]:
        row += [gap, panel]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(row, axis=1)).save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
