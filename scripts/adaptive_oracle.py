#!/usr/bin/env python
"""How well could adaptive mode choose its last-stage crops? A crop-selection score against
an oracle, on a labelled split.

Adaptive mode skips the crops of a stage that look certain in the coarse view. This script
asks how many of the *last* stage's crops a selection rule must run to keep the full method's
mIoU within ``--tolerance`` points, for:

  - ``mean_uncertainty``: the engine's own rule (mean of 1 - cert(Y) over the crop);
  - ``changed``: the fraction of the crop whose label changed between the two stages before
    the last
    (where the previous magnification step found something, the next one may too);
  - ``oracle``: a greedy choice that knows the ground truth (the best any rule can do).

How: every scene is segmented twice, by the full pyramid and by the pyramid without its last
stage (``scales[:-1]``, same reference scene). The last stage's crops read the coarse map and
write only the pixels they own, so running a subset of them gives the full result on those
crops and the truncated result everywhere else; one confusion matrix per crop and per outcome
scores any subset exactly, with no further model runs. Earlier stages always run in full.

The speed-up of running ``k`` of ``n`` last-stage crops is modelled from measured seconds:
the earlier stages' time from the full run, and the last stage's as ``fixed + k * per_crop``.
``per_crop`` and ``fixed`` (scoring every crop, upsampling and writing the skipped ones,
resizing the image) come from the full run and a third, adaptive run that keeps ``m`` crops per
stage, ``m`` being the most crops an earlier stage has (so those stages still run in full).
Taking the last stage's time as proportional to ``k`` alone would overstate the speed-up
(on the demo's test split: 76 crops allowed at 2x instead of 52).

    python scripts/adaptive_oracle.py demo_out/run/best.ckpt demo_out/data --split test

Prints one JSON object (also to --json). The greedy oracle costs O(crops^2) metric
evaluations: use --limit on large splits.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from figures import report as report_figures  # noqa: E402

from magseg.allocator import keep_freed_memory  # noqa: E402
from magseg.config import AdaptiveConfig, PyramidConfig  # noqa: E402
from magseg.data.scenes import list_scenes, read_scene  # noqa: E402
from magseg.engine.certainty import certainty  # noqa: E402
from magseg.engine.pyramid import crop_boxes, resize  # noqa: E402
from magseg.evaluation.metrics import confusion_matrix, scores  # noqa: E402
from magseg.segmenter import Segmenter  # noqa: E402


def crop_outcomes(segmenter: Segmenter, root: str, split: str, limit: int | None) -> dict:
    """Per last-stage crop: confusion matrices with and without it, and its selection scores."""
    config = segmenter.config
    pyramid = config.pyramid
    if len(pyramid.scales) < 3:
        raise SystemExit("the pyramid needs 3 stages or more: the last is skipped, and the "
                         "'changed' rule compares the two before it")
    truncated = PyramidConfig(scales=pyramid.scales[:-1], crop=pyramid.crop, input=pyramid.input,
                              scene=pyramid.scene)
    classes = len(config.classes)
    out: dict[str, list] = {"full": [], "skip": [], "mean_uncertainty": [], "changed": []}
    stage_seconds = np.zeros(len(pyramid.scales))
    partial_seconds = partial_crops = 0.0  # the last stage in the adaptive timing runs
    scenes = list_scenes(config.data, split, root)[:limit]
    for i, scene in enumerate(scenes):
        image, mask = read_scene(scene, config)
        x = segmenter.normalize(torch.from_numpy(image.astype(np.float32)))
        if i == 0:  # one untimed run first: the first call's one-off costs would count as the full run's
            segmenter.segment(x)
        full = segmenter.segment(x, return_stages=True)
        skip = segmenter.segment(x, pyramid=truncated, return_probs=True, return_stages=True)
        stage_seconds += [s.seconds for s in full.stages]
        most_earlier = max(s.crops_total for s in full.stages[:-1])
        if most_earlier < full.stages[-1].crops_total:
            timing = dataclasses.replace(config.engine, adaptive=AdaptiveConfig(max_crops=most_earlier))
            partial = segmenter.segment(x, engine=timing, return_stages=True).stages[-1]
            partial_seconds += partial.seconds
            partial_crops += partial.crops_run
        size = tuple(full.stages[-1].size)
        if tuple(full.labels.shape) != size:
            raise SystemExit(f"{scene.image}: the last stage ({size}) is not the image size "
                             f"{tuple(full.labels.shape)}; the per-crop bookkeeping needs them equal")
        # The truncated run's probabilities at the image size are exactly the coarse map the
        # last stage reads (what the engine's select_crops scores).
        uncertainty = 1 - certainty(skip.probs[None])[0]
        # Where the step between the two stages before the last changed labels.
        before, after = (resize(s.labels[None], size, mode="nearest")[0] for s in skip.stages[-2:])
        changed = (before != after).float()
        target = torch.from_numpy(mask).long()
        for box in crop_boxes(size, pyramid.crop):
            o = box.owned.slices
            out["full"].append(confusion_matrix(full.labels[o], target[o], classes).numpy())
            out["skip"].append(confusion_matrix(skip.labels[o], target[o], classes).numpy())
            out["mean_uncertainty"].append(float(uncertainty[o].mean()))
            out["changed"].append(float(changed[o].mean()))
    out["stage_seconds"] = (stage_seconds / len(scenes)).tolist()
    out["scenes"] = len(scenes)
    out["last_stage_partial"] = [partial_seconds / len(scenes), partial_crops / len(scenes)]
    return out


class _Subsets:
    """mIoU of the result when only a subset of the last stage's crops runs.

    ``full``, ``skip``: ``(n, C, C)`` confusion matrices of each of the ``n`` last-stage
    crops, with the last stage run and skipped; ``in_mean``: which of the ``C`` classes count
    in the mean. A selection is an ``(n,)`` bool array, True for the crops that run.
    """

    def __init__(self, full: np.ndarray, skip: np.ndarray, in_mean: list[bool]) -> None:
        self.full, self.skip, self.in_mean = full, skip, in_mean
        self.n = len(full)

    def miou(self, selected: np.ndarray) -> float:
        """mIoU points with the ``selected`` crops run and the others skipped."""
        return 100 * scores(np.where(selected[:, None, None], self.full, self.skip).sum(0), self.in_mean)["miou"]

    def needed(self, order: list[int], goal: float) -> int:
        """How many crops, taken in ``order``, reach ``goal`` mIoU (``n`` when none do)."""
        selected = np.zeros(self.n, bool)
        if self.miou(selected) >= goal:
            return 0
        for k, i in enumerate(order, 1):
            selected[i] = True
            if self.miou(selected) >= goal:
                return k
        return self.n

    def greedy_oracle(self, goal: float) -> int:
        """How many crops reach ``goal`` when each next crop is the one that raises the mIoU
        most, knowing the ground truth (``n`` when none do)."""
        n = self.n
        selected = np.zeros(n, bool)
        for k in range(1, n + 1):
            gains = {}
            for i in np.flatnonzero(~selected):
                selected[i] = True
                gains[i] = self.miou(selected)
                selected[i] = False
            best = max(gains, key=gains.get)
            selected[best] = True
            if gains[best] >= goal:
                return k
        return n


@dataclasses.dataclass(frozen=True)
class _Timing:
    """Seconds per image: ``total`` of all stages, ``last`` of the last stage in full, and the
    last stage modelled as ``fixed + per_crop * crops run``; ``scenes`` measured."""

    total: float
    last: float
    fixed: float
    per_crop: float
    scenes: int

    def speed_up(self, k: int) -> float:
        """The full method's time over the time with ``k`` last-stage crops run (all scenes)."""
        return self.total / (self.total - self.last + self.fixed + self.per_crop * k / self.scenes)


def _timing(data: dict, n: int) -> _Timing:
    """The timing model from the measured seconds of ``crop_outcomes`` (``n``: last-stage
    crops over all scenes)."""
    seconds = data["stage_seconds"]
    total, last = sum(seconds), seconds[-1]
    per_scene = n / data["scenes"]  # last-stage crops per scene
    partial_seconds, partial_crops = data["last_stage_partial"]
    if partial_crops and partial_crops < per_scene:
        per_crop = max(last - partial_seconds, 0.0) / (per_scene - partial_crops)
        fixed = max(last - per_crop * per_scene, 0.0)
    else:  # no timing run (an earlier stage has as many crops as the last): all per crop
        per_crop, fixed = last / per_scene, 0.0
    return _Timing(total=total, last=last, fixed=fixed, per_crop=per_crop, scenes=data["scenes"])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("data_root")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="only the first N scenes")
    parser.add_argument("--tolerance", type=float, default=1.0, help="mIoU points below the full method")
    parser.add_argument("--json", type=Path, default=None)
    return parser


def main() -> None:
    args = _parser().parse_args()
    keep_freed_memory()  # time the engine as the magseg command runs it
    segmenter = Segmenter.from_checkpoint(args.checkpoint)
    in_mean = [c.in_mean for c in segmenter.config.classes]
    data = crop_outcomes(segmenter, args.data_root, args.split, args.limit)
    subsets = _Subsets(np.array(data["full"]), np.array(data["skip"]), in_mean)
    n = subsets.n
    timing = _timing(data, n)
    reference = subsets.miou(np.ones(n, bool))
    goal = reference - args.tolerance
    rules = {name: subsets.needed(list(np.argsort(data[name])[::-1]), goal)
             for name in ("mean_uncertainty", "changed")}
    rules["oracle"] = subsets.greedy_oracle(goal)
    speed_up = timing.speed_up
    two_x = max(k for k in range(n + 1) if speed_up(k) >= 2) if speed_up(0) >= 2 else None
    report = {
        "checkpoint": args.checkpoint, "split": args.split, "scenes": data["scenes"],
        "last_stage_crops": n, "stage_seconds_per_image": [round(s, 4) for s in data["stage_seconds"]],
        "last_stage_seconds_model": {"fixed": round(timing.fixed, 4), "per_crop": round(timing.per_crop, 4)},
        "miou_full": round(reference, 2), "miou_last_stage_skipped": round(subsets.miou(np.zeros(n, bool)), 2),
        "tolerance_points": args.tolerance, "crops_allowed_at_2x": two_x,
        "rules": {name: {"crops_needed": k, "fraction": round(k / n, 3), "speed_up": round(speed_up(k), 2)}
                  for name, k in rules.items()},
    }
    report_figures(report, args.json)


if __name__ == "__main__":
    main()
