"""The stage loop over a raster on disk: the raster as the engine's image, the outputs as its
sink, and the scratch space that holds the stage maps in between.

    RasterSource   a window of the raster, normalised, nodata set to the mean (0)
    RasterSink     the final labels (and probabilities, uncertainty) of each crop, handed to
                   the writers of the outputs being made (magseg.run.outputs); nodata stays nodata
    PoolStages     a stage's crop batches on a pool of workers (Ray actors, each holding the
                   model once), the outputs written here: one huge raster on many machines
    Scratch        one directory per input for the stage maps (magseg.engine.maps.ChunkMap)
                   and a blending stage's backbone answers (magseg.engine.blend.FineStore),
                   sized before the run, removed however the run ends

With these, ``magseg.engine.stages.run_stages`` segments a raster of any size exactly as
``segment`` segments the same image in memory, holding a few crop batches at a time.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from magseg.engine.certainty import certainty
from magseg.engine.temperature import apply_temperature
from magseg.engine.blend import FineStore, blends, store_bytes
from magseg.engine.maps import ChunkMap, map_bytes
from magseg.engine.pyramid import CropBox, Size
from magseg.engine.stages import BatchJob, CollectSink, StageRun, run_job
from magseg.errors import MagsegError, WriteError
from magseg.geometry import Rect
from magseg.io.aoi import AreaOfInterest
from magseg.io.atomic import fresh_partial_path
from magseg.io.raster import NODATA, VALUE_MAX, RasterReader, io_env
from magseg.run.pools import Pool, worth_running_again


class RasterSource:
    """The raster behind ``reader`` as a ``magseg.engine.resample.Source``: ``read`` gives
    ``(C_in, h, w)`` normalised float32, 0 (the mean) on nodata pixels, including pixels
    that are not finite once normalised (1e39 in a float64 raster is inf in float32)."""

    def __init__(self, reader: RasterReader, normalize) -> None:
        self.reader = reader
        self.normalize = normalize
        self.size = reader.size

    def pixels(self, rows: slice, cols: slice) -> tuple[np.ndarray, Tensor, np.ndarray]:
        """Raw pixels, normalised image and validity of a window inside the raster."""
        raw, image, valid = self._read(rows, cols, normalized=True)
        if not valid.all():
            image[:, torch.from_numpy(~valid)] = 0
        return raw, image, valid

    def validity(self, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        """Raw pixels and validity of a window, as ``pixels`` gives them, normalising only
        where that decides validity (a float raster's values that overflow float32)."""
        raw, _, valid = self._read(rows, cols, normalized=False)
        return raw, valid

    def _read(self, rows: slice, cols: slice, normalized: bool
              ) -> tuple[np.ndarray, Tensor | None, np.ndarray]:
        """A window's raw pixels, its normalised image (when asked, or needed to decide
        validity) and its validity: the file's, and finite once normalised."""
        raw, valid = self.reader.read(Rect.from_slices(rows, cols))
        check = not self._always_finite(raw.dtype, raw.shape[0])
        image = self.normalize(raw) if normalized or check else None
        if check:
            valid &= torch.isfinite(image).all(dim=0).numpy()
        return raw, image, valid

    def read(self, rows: slice, cols: slice) -> Tensor:
        return self.pixels(rows, cols)[1]

    @functools.lru_cache(maxsize=4)  # noqa: B019  (a few dtypes per source, for its life)
    def _always_finite(self, dtype: np.dtype, channels: int) -> bool:
        """Whether every value of an integer ``dtype`` normalises to a finite float32 (its
        extremes do), so the per-pixel check can be skipped."""
        if dtype.kind not in "ui":
            return False
        info = np.iinfo(dtype)
        extremes = np.array([[[info.min, info.max]]] * channels, dtype=dtype)
        return bool(torch.isfinite(self.normalize(extremes)).all())


def _to_uint8(values: Tensor, invalid: Tensor) -> np.ndarray:
    """Values in [0, 1] -> uint8 ``0..VALUE_MAX`` (rounded); ``NODATA`` where ``invalid``
    (``(h, w)`` bool, broadcast over leading dimensions)."""
    out = (values.clamp(0, 1) * VALUE_MAX).round().to(torch.uint8)
    return out.masked_fill(invalid, NODATA).numpy()


class CropResult:
    """The final result on one crop's owned window, as every output being made takes it
    (``magseg.run.outputs``): ``window`` in the raster, ``raw`` pixels ``(C_in, h, w)``,
    ``labels`` ``(h, w)`` uint8 (nodata 255), ``valid`` ``(h, w)`` bool and ``probs``
    ``(classes, h, w)`` float with the temperature applied (None: no output needs them).
    The uint8 values are computed once, for the first output that asks."""

    def __init__(self, window: Rect, raw: np.ndarray, labels: np.ndarray, valid: np.ndarray,
                 probs: Tensor | None) -> None:
        self.window, self.raw, self.labels, self.valid, self.probs = window, raw, labels, valid, probs

    @functools.cached_property
    def _invalid(self) -> Tensor:
        return torch.from_numpy(~self.valid)

    @functools.cached_property
    def probs_uint8(self) -> np.ndarray:
        """``(classes, h, w)`` probability x VALUE_MAX, NODATA where invalid."""
        assert self.probs is not None, "an output that needs probabilities was not declared so"
        return _to_uint8(self.probs.nan_to_num(0.0), self._invalid)

    @functools.cached_property
    def uncertainty_uint8(self) -> np.ndarray | None:
        """``(h, w)`` (1 - certainty) x VALUE_MAX, NODATA where invalid; None without ``probs``."""
        if self.probs is None:
            return None
        return _to_uint8(1 - certainty(self.probs[None])[0].nan_to_num(1.0), self._invalid)


class CropWriter(Protocol):
    """An output written crop by crop (``magseg.run.outputs``): each crop's owned window once."""

    def write(self, crop: CropResult) -> None: ...


class RasterSink:
    """Writes each crop's owned region of the final result to the outputs being made.

    Args:
        writers: the open writers of the outputs made crop by crop (``magseg.run.outputs``).
        wants_probs: the probabilities are needed (some writer's kind ``needs_probs``).
        temperature: the checkpoint's (``Segmenter.temperature``), applied to the
            probabilities and uncertainty written; the labels are the engine's.
    """

    def __init__(self, source: RasterSource, classes: int, writers: Sequence[CropWriter],
                 wants_probs: bool, temperature: float = 1.0) -> None:
        self.source = source
        self.classes = classes
        self.writers = writers
        self.wants_probs = wants_probs
        self.temperature = temperature
        self.counts = np.zeros(256, dtype=np.int64)  # pixels per class id (and nodata)

    def write(self, boxes: list[CropBox], labels: Tensor, probs: Tensor | None) -> None:
        for i, box in enumerate(boxes):
            raw, valid = self.source.validity(*box.owned.slices)
            crop_part = box.owned_in_crop
            own = labels[i][crop_part].cpu().numpy().copy()
            # A label is a class id or nodata, whatever the model computed: a pixel whose
            # probabilities are not finite (labels_of gives it id C) is nodata too.
            valid &= own < self.classes
            own[~valid] = NODATA
            self._write(box, raw, own, None if probs is None else probs[i][(slice(None), *crop_part)], valid)

    def _write(self, box: CropBox, raw: np.ndarray, labels: np.ndarray, probs: Tensor | None,
               valid: np.ndarray) -> None:
        window = box.owned
        self.counts += np.bincount(labels.ravel(), minlength=256)
        if probs is not None:
            probs = apply_temperature(probs.float().cpu(), self.temperature)
        crop = CropResult(window, raw, labels, valid, probs)
        for writer in self.writers:
            writer.write(crop)

    def write_nodata(self, boxes: list[CropBox]) -> None:
        """Nodata over ``boxes`` (a raster with no valid pixel: no engine run at all)."""
        for box in boxes:
            raw, valid = self.source.validity(*box.owned.slices)
            labels = np.full(box.owned.size, NODATA, np.uint8)
            probs = torch.zeros((self.classes, *box.owned.size)) if self.wants_probs else None
            self._write(box, raw, labels, probs, np.zeros_like(valid))


class Scratch:
    """The stage maps of one input, in one directory named like magseg's temporaries
    (``.<stem>.scratch.<pid>@<host>.partial``), so the next run removes what a killed run left.

    ``peak_bytes``: the most the maps took on disk at once.
    """

    def __init__(self, directory: Path, crop: Size, margin: Size = (0, 0)) -> None:
        self.directory = directory
        self.crop = crop
        self.margin = margin
        self._live: list[ChunkMap | FineStore] = []
        self.peak_bytes = 0

    def new_map(self, stage: int, size: Size) -> ChunkMap:
        chunk_map = ChunkMap(self.directory / f"stage{stage}", size, self.crop, self._discarded)
        self._live.append(chunk_map)
        return chunk_map

    def new_store(self, stage: int, size: Size) -> FineStore | None:
        """A ``FineStore`` on disk for a stage of ``size`` that blends, else None."""
        if not blends(size, self.crop, self.margin):
            return None
        store = FineStore(size, self.crop, self.margin, self.directory / f"fine{stage}",
                          on_discard=self._discarded)
        self._live.append(store)
        return store

    def _discarded(self, item: ChunkMap | FineStore) -> None:
        # A map is discarded once the next stage has written its own, a store once its stage
        # has read it: what is live then is complete.
        self.peak_bytes = max(self.peak_bytes, sum(m.disk_bytes() for m in self._live))
        self._live.remove(item)


def scratch_estimate(sizes: list[Size], image_size: Size, classes: int, final_map: bool = False,
                     crop: Size = (1, 1), margin: Size = (0, 0)) -> int:
    """Bytes the stage maps of a run need on disk at once, at most: two consecutive maps
    (a stage reads the previous one while it writes its own), and the stage's backbone
    answers where it blends (``crop``, ``margin``: magseg.engine.blend.store_bytes). The
    last stage at the image size writes the outputs, not a map; unless ``final_map`` (the
    CRF's input, one more map at the image size)."""
    sizes = [tuple(size) for size in sizes]
    maps = [map_bytes(size, classes) for size in sizes]
    if sizes[-1] == tuple(image_size) and not final_map:
        maps[-1] = 0
    stores = [store_bytes(size, crop, margin, classes) if blends(size, crop, margin) else 0 for size in sizes]
    need = [(maps[s - 1] if s else 0) + maps[s] + stores[s] for s in range(len(sizes))]
    if final_map and sizes[-1] != tuple(image_size):  # the CRF's map, written from the last one
        need.append(maps[-1] + map_bytes(tuple(image_size), classes))
    return max(need)


def free_bytes(directory: Path) -> int:
    """Free bytes on the filesystem of ``directory``."""
    return shutil.disk_usage(directory).free


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.1f} MiB"


@contextlib.contextmanager
def scratch_space(directory: Path, stem: str, needed: int, crop: Size, source: str,
                  margin: Size = (0, 0)) -> Iterator[Scratch]:
    """A ``Scratch`` in ``directory`` for ``needed`` bytes, removed when the block ends,
    however it ends (an error, SIGINT, SIGTERM turned into KeyboardInterrupt).

    Raises:
        WriteError: ``directory`` has less free space than ``needed`` (nothing is made).
    """
    directory.mkdir(parents=True, exist_ok=True)
    free = free_bytes(directory)
    if needed > free:
        raise WriteError(
            f"{source}: its stage maps need about {_gib(needed)} of scratch space in {directory}, "
            f"which has {_gib(free)} free; free some space or pass --scratch-dir on a larger disk")
    path = fresh_partial_path(directory / f"{stem}.scratch")
    path.mkdir()
    try:
        yield Scratch(path, crop, margin)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stage_job(segmenter, path: str | Path, bands: list[int], aoi: AreaOfInterest | None,
              job: BatchJob, wants_probs: bool, nodata: float | None = None
              ) -> list[tuple[list[CropBox], np.ndarray, np.ndarray | None]]:
    """A worker's side of one ``BatchJob`` of a raster: opens the raster as the driver shows
    it (bands, area of interest), does the job, and returns what goes to the outputs
    (``(boxes, labels, probs)`` per batch; nothing for a stage map, written to shared storage)."""
    config = segmenter.config
    with io_env(), RasterReader(path, nodata=nodata) as reader:
        if aoi is not None:
            reader.restrict(aoi)
        reader.select(bands)
        run = StageRun.create(segmenter.stage_backbone, config.pyramid, refiner=segmenter.refiner,
                              refine=config.refine, engine=config.engine)
        collect = CollectSink(wants_probs)
        with torch.inference_mode():
            run_job(run, RasterSource(reader, segmenter.normalize), job, collect)
    return [(boxes, labels.numpy(), None if probs is None else probs.numpy())
            for boxes, labels, probs in collect.items]


class PoolStages:
    """Does a stage's ``BatchJob``s on ``pool`` (a ``magseg.run.pools.Pool``, usually a
    ``ScenePool``: tasks ``fn(segmenter, *args)``) and writes what they return to ``sink``, here; ``run_stages``
    waits for every job of a stage before it starts the next (the barrier).

    The workers must see ``path`` and the scratch directory (shared storage).
    """

    def __init__(self, pool: Pool, path: str | Path, bands: list[int], aoi: AreaOfInterest | None,
                 sink: RasterSink, on_crops=None) -> None:
        self.pool, self.path, self.bands, self.aoi = pool, path, bands, aoi
        self.sink, self.on_crops = sink, on_crops

    def __call__(self, jobs: list[BatchJob], picked_map: Tensor | None = None) -> None:
        nodata = self.sink.source.reader.nodata
        tasks = [(self.path, self.bands, self.aoi, job, self.sink.wants_probs, nodata) for job in jobs]

        def lost(task: tuple, reason: str):
            advice = "; run it again" if worth_running_again(reason) else ""
            raise MagsegError(f"{self.path}: a stage's crops were lost ({reason}){advice}")

        for index, items in self.pool.map_unordered(stage_job, tasks, lost):
            for boxes, labels, probs in items:  # Ray's arrays are read-only: copies
                self.sink.write(boxes, torch.tensor(labels),
                                None if probs is None else torch.tensor(probs))
            if self.on_crops and jobs[index].runs_backbone:
                self.on_crops(len(jobs[index].boxes))
