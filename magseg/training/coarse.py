"""The refiner phase's coarse maps, computed once per phase instead of once per sample.

The refiner learns ``refiner(fine, coarse) -> mask`` with the backbone frozen, so each
scene's coarse view, the engine's stage 0 (``stage_probs`` of the scene at ``scales[0]``),
is the same for every sample of the phase. ``prepare_coarse_maps`` computes it once per
training scene and stores it as float16 ``.npy`` under ``<cache dir>/coarse/<key>/``; a
sample memory-maps its scene's map and upsamples only its window, as the engine upsamples a
crop's coarse view (``resample_window``, reading just the map pixels the window needs): no
backbone run and no whole-map upsampling per sample.

float16 keeps probabilities within 2**-12 (values in [0.5, 1]; finer below): bilinear
upsampling is a convex combination, so the refiner's coarse input differs from the one
computed on the fly by at most that
(tests/test_train_cache.py::test_cached_coarse_maps_give_the_refiner_the_same_inputs).

The key holds everything a map depends on: magseg's version, a hash of the backbone's
weights, the model, pyramid, engine, normalisation and band settings; an entry's name holds
its source image's path, size and modification time. A resumed phase with the same weights
finds its maps; any change computes new ones.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from magseg.config import Config, EngineConfig
from magseg.data.cache import OpenEntries, SceneCache, cached_npy, digest, file_stamp, load_npy
from magseg.data.scenes import Scene
from magseg.engine.pyramid import CropBox, crop_windows
from magseg.engine.resample import ReadSource, resample_window
from magseg.engine.stages import stage_probs
from magseg.errors import DataError
from magseg.training import distributed
from magseg.training.distributed import World
from magseg.training.samples import open_scene, stage_image


def weights_digest(module: nn.Module) -> str:
    """A hash of a module's parameters and buffers (their names, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        value = value.detach().cpu().contiguous()
        h.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class CoarseMaps:
    """Windows of the cached stage-0 probabilities (picklable: DataLoader workers read them)."""

    def __init__(self, directory: str | Path, config: Config) -> None:
        self.directory = Path(directory)
        self.config = config
        self._open = OpenEntries()

    def path(self, scene: Scene) -> Path:
        return self.directory / f"{digest(file_stamp(scene.image))}.npy"

    def window(self, scene: Scene, size: tuple[int, int], box: CropBox) -> Tensor:
        """``(classes, ch, cw)``: stage 0 upsampled to the stage ``size`` at ``box``'s crop
        window, as ``StageRun.coarse`` makes a crop's coarse view (zero beyond the stage
        image)."""
        path = self.path(scene)
        y0 = self._open.get(path)
        if y0 is None:
            y0 = load_npy(path)
            if y0 is not None:
                self._open.put(path, y0)
        if y0 is None:
            raise DataError(f"{scene.image}: its coarse map {self.path(scene)} is missing; "
                            "the refiner phase computes them before its first epoch")
        source = ReadSource((int(y0.shape[1]), int(y0.shape[2])),
                            lambda r, c: torch.from_numpy(np.array(y0[:, r, c], dtype=np.float32)))
        (window,) = crop_windows([box], self.config.pyramid.crop)
        return resample_window(source, tuple(size), window)


def coarse_key(backbone: nn.Module, config: Config, precision: str) -> str:
    """``precision``: the engine's, resolved (the maps are computed at it)."""
    import magseg

    data = config.data
    return digest({
        "magseg": magseg.__version__, "weights": weights_digest(backbone),
        "model": config.model, "pyramid": config.pyramid, "engine": config.engine,
        "precision": precision, "data": [data.layout, data.bands, data.mean, data.std],
    })


def prepare_coarse_maps(backbone: nn.Module, scenes: list[Scene], config: Config, root: str | Path,
                        engine: EngineConfig, world: World = World(),
                        cache: SceneCache | None = None, on_scene=None) -> CoarseMaps:
    """Compute the coarse map of every scene that has none under ``root`` (each rank its
    share, then any a rank cannot see, e.g. on a node-local disk) and return their reader.
    ``engine``: the device and resolved precision they are computed at, the engine's as
    predict runs it (``magseg.engine.precision.resolved_engine``).

    Raises:
        WriteError: a map cannot be written (full disk); no partial entry is left.
    """
    maps = CoarseMaps(Path(root) / "coarse" / coarse_key(backbone, config, engine.precision), config)
    device = torch.device(engine.device)

    def build(scene: Scene) -> np.ndarray:
        source = open_scene(scene, config, cache)
        scene0 = stage_image(source, config.pyramid.stage_sizes(source.size)[0], config)
        with torch.no_grad():
            y0 = stage_probs(backbone, scene0.to(device), config.pyramid, engine)
        return y0.float().cpu().numpy().astype(np.float16)

    def ensure(share: list[Scene]) -> None:
        for scene in share:
            cached_npy(maps.path(scene), lambda: build(scene), f"coarse map of {scene.image}")
            if on_scene is not None:
                on_scene()

    ensure(scenes[world.rank :: world.size])
    distributed.barrier(world)
    if world.distributed:
        ensure(scenes)
    return maps
