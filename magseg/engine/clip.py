"""A window is a clip: the crops of each stage that a window of the result depends on, so
that segmenting only them gives the whole image's labels on that window, bit for bit.

A crop's output depends only on its own inputs: its fine view (the backbone's answer over
its grown window, blended with its neighbours' over the margins where the stage blends,
magseg.engine.blend) and the previous stage's map over its crop window, upsampled (top-K,
the median blur and the refiner all stay inside the crop). So, walking back from the window:

    final pass      the image-size crops whose owned region meets the window read the
                    last stage's map over a span of it (``source_span``)
    stage s         the crops whose owned region meets what stage s + 1 reads run; they
                    read stage s - 1's map over a span of it, and so on down to stage 0;
                    where the stage blends, their neighbours' backbones run too

``clip_plan`` gives those crops per stage, in the whole batches of ``engine.batch_size`` the
whole run puts them in (a backbone's float sums may depend on its batch's size, so a crop
runs in the same company); ``magseg.engine.stages.run_stages`` runs only them (its
``plan``). Stage maps are then written only where those crops own pixels, which is all
that is read. Adaptive mode ranks every crop of a stage against the others, so a clip with
it runs whole stages (``clip_plan`` returns None).
"""

from __future__ import annotations

from dataclasses import dataclass

from magseg.config import PyramidConfig, RefineConfig
from magseg.engine.blend import BlendGrid, blends
from magseg.engine.pyramid import CropBox, Size, crop_boxes
from magseg.engine.resample import axis_weights
from magseg.geometry import Rect

Span = tuple[int, int]  # half-open [start, stop)


def source_span(n_src: int, n_dst: int, span: Span) -> Span:
    """Source pixels ``[a, b)`` (clipped to ``n_src``) that output pixels ``span`` of an axis
    resized ``n_src -> n_dst`` by ``magseg.engine.resample`` may read, by either of its paths
    (the tap-by-tap filter, or ``F.interpolate`` on a part with one output pixel of margin)."""
    lo, hi = span
    if n_src == n_dst:
        return lo, hi
    aw = axis_weights(n_src, n_dst)
    a, b = int(aw.first[lo]), int(aw.first[hi - 1]) + aw.taps
    if n_src % n_dst == 0:  # an integer shrink by F.interpolate reads whole blocks, 1 px around
        f = n_src // n_dst
        a, b = min(a, (lo - 1) * f), max(b, (hi + 1) * f)
    elif n_dst % n_src == 0:  # an integer enlargement: a source pixel before and two after
        f = n_dst // n_src
        a, b = min(a, lo // f - 1), max(b, (hi - 1) // f + 2)
    return max(a, 0), min(b, n_src)


def _reads(boxes: list[CropBox], crop: Size, size: Size, src: Size) -> Rect:
    """The part of a map of size ``src`` that ``boxes`` of a grid of ``size`` read (their crop
    windows, clipped to the grid, resized from ``src``)."""
    tops, lefts = [b.window.top for b in boxes], [b.window.left for b in boxes]
    r0, r1 = source_span(src[0], size[0], (min(tops), min(max(tops) + crop[0], size[0])))
    c0, c1 = source_span(src[1], size[1], (min(lefts), min(max(lefts) + crop[1], size[1])))
    return Rect(r0, c0, r1 - r0, c1 - c0)


@dataclass(frozen=True)
class ClipPlan:
    """The crops to run: ``stages[s]`` of stage s (row-major, a subset of ``crop_boxes``);
    ``backbone[s]``, those whose backbone runs, when stage s blends its crops' outputs (its
    first pass, magseg.engine.blend: ``stages[s]`` and their neighbours), else ``stages[s]``;
    and ``final`` of the pass that upsamples the last map to the image size (when there is
    one)."""

    stages: list[list[CropBox]]
    final: list[CropBox]
    backbone: list[list[CropBox]]

    @property
    def crops(self) -> int:
        """Crops that go through the backbone."""
        return sum(len(b) for b in self.backbone)


def _whole_batches(boxes: list[CropBox], needed: list[CropBox], batch: int) -> list[CropBox]:
    """The batches of ``batch`` crops the whole run cuts ``boxes`` into that hold a ``needed``
    crop, whole: a backbone's float sums may depend on how many crops share its batch, so a
    clip runs each crop in the batch the whole run runs it in."""
    wanted = set(needed)
    out: list[CropBox] = []
    for start in range(0, len(boxes), batch):
        part = boxes[start : start + batch]
        if wanted.intersection(part):
            out.extend(part)
    return out


def clip_plan(pyramid: PyramidConfig, refine: RefineConfig, image_size: Size, window: Rect,
              adaptive: bool = False, batch: int = 1) -> ClipPlan | None:
    """The crops the labels over ``window`` of an image of
    ``image_size`` depend on, in the whole batches of ``batch`` (``engine.batch_size``) that
    the whole run puts them in; None with ``adaptive`` (every crop of a stage counts)."""
    if adaptive:
        return None
    if window.empty or not Rect.of_size(image_size).contains(window):
        raise ValueError(f"window {window} is not inside the image {image_size}")
    crop = pyramid.crop
    sizes = [tuple(s) for s in pyramid.stage_sizes(tuple(image_size))]
    # The stages that run: stage 0, then every later one unless K is 0 (run_stages).
    run = [0] if refine.points == 0 else list(range(len(sizes)))
    last = run[-1]
    region = window  # what the stage being planned must give, in its own pixels
    final: list[CropBox] = []
    if not (last == len(sizes) - 1 and sizes[last] == tuple(image_size)):
        every = crop_boxes(tuple(image_size), crop)
        final = _whole_batches(every, [b for b in every if b.owned.meets(region)], batch)
        region = _reads(final, crop, tuple(image_size), sizes[last])
    stages: list[list[CropBox]] = [[] for _ in sizes]
    backbone: list[list[CropBox]] = [[] for _ in sizes]
    margin = pyramid.margin_pixels
    for s in reversed(run):
        every = crop_boxes(sizes[s], crop)
        stages[s] = _whole_batches(every, [b for b in every if b.owned.meets(region)], batch)
        backbone[s] = (_whole_batches(every, BlendGrid(sizes[s], crop, margin).sources(stages[s]), batch)
                       if blends(sizes[s], crop, margin) else stages[s])
        if s > 0:
            region = _reads(stages[s], crop, sizes[s], sizes[s - 1])
    return ClipPlan(stages, final, backbone)


class WindowSink:
    """The final labels ``(h, w)`` uint8 (and probabilities ``(C, h, w)``) of one ``window``
    of the image: each crop writes the part of its owned region inside."""

    def __init__(self, window: Rect, wants_probs: bool, device) -> None:
        import torch

        self.window = window
        self.wants_probs = wants_probs
        self.labels = torch.empty(window.size, dtype=torch.uint8, device=device)
        self.probs = None

    def write(self, boxes: list[CropBox], labels, probs) -> None:
        for i, b in enumerate(boxes):
            part = b.owned.intersection(self.window)
            if part.empty:
                continue
            src, dst = part.within(b.window), part.within(self.window)
            self.labels[dst] = labels[i][src]
            if self.wants_probs:
                if self.probs is None:
                    self.probs = probs.new_zeros((probs.shape[1], *self.window.size))
                self.probs[(slice(None), *dst)] = probs[i][(slice(None), *src)]


def segment_window(image, backbone, pyramid: PyramidConfig, window: Rect, *,
                   refiner=None, refine: RefineConfig = RefineConfig(), engine=None,
                   return_probs: bool = False):
    """``segment`` of ``image`` ``(C_in, H, W)`` on ``window`` only:
    ``(labels (h, w) uint8, probs (C, h, w) or None)``, equal to the whole image's result
    there, from only the crops it depends on (``clip_plan``)."""
    import torch

    from magseg.config import EngineConfig
    from magseg.engine.maps import MemoryMap
    from magseg.engine.resample import TensorSource
    from magseg.engine.stages import StageRun, run_stages

    engine = engine or EngineConfig()
    device = torch.device(engine.device)
    image = image.to(device=device, dtype=torch.float32)
    plan = clip_plan(pyramid, refine, tuple(image.shape[-2:]), window, engine.adaptive.enabled,
                     engine.batch_size)
    run = StageRun.create(backbone, pyramid, refiner=refiner, refine=refine, engine=engine)
    sink = WindowSink(window, return_probs, device)
    with torch.inference_mode():
        run_stages(run, TensorSource(image), lambda stage, size: MemoryMap(size), sink, plan=plan)
    return sink.labels.cpu(), None if sink.probs is None else sink.probs.cpu()
