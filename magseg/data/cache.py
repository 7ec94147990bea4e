"""On-disk caches that training reads instead of decoding the same files again and again.

A JPEG/PNG scene (the DeepGlobe layout) cannot be read by windows: every read decodes the
whole file (0.29 s for a 2448 px DeepGlobe JPEG). The **scene cache** decodes it once into a
``.npy`` file, ``(C + 1, H, W)`` of the image's dtype with the mask as the last channel, that
every sample memory-maps and reads only its window of.

An entry is named by what its content depends on, so a stale entry is never read, only
never asked for again:

- the source files: their resolved paths, sizes and modification times (ns), so a changed
  or replaced image or mask gets a new entry;
- what decoding depends on: magseg's version, the layout, the bands read, the classes' ids
  and colours (colour masks are decoded by them).

Entries are written under a temporary name and renamed into place when complete
(``magseg.io.atomic.atomic_write``): a full disk, a kill or a concurrent reader never sees half
an entry, and a failed write raises ``WriteError`` with the cause. Writers of one entry take
an ``fcntl`` lock on it, so concurrent DataLoader workers or DDP ranks on one machine decode a
scene once: one writes, the others wait and then read. (On filesystems without working
``flock`` the lock is a no-op and two writers may both decode; their renames are atomic, so
readers still see one complete file.)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from magseg.config import Config
from magseg.errors import DataError, WriteError
from magseg.io.atomic import atomic_write, entry_lock


def digest(value: Any, length: int = 16) -> str:
    """A short stable hash of a JSON-able value."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@functools.lru_cache(maxsize=4096)
def _resolved(path: str) -> str:
    # Resolving walks every component of the path (an lstat each): once per process. A file
    # replaced at the same path is still seen, by its size and mtime.
    return str(Path(path).resolve())


def file_stamp(path: Path) -> list[Any]:
    """What identifies one version of a file: its resolved path, size and mtime (ns)."""
    st = os.stat(path)
    return [_resolved(str(path)), st.st_size, st.st_mtime_ns]


class OpenEntries:
    """Entries this process has memory-mapped, by path: a sample then costs a stat of its
    source files (to see a changed file) instead of an open, a header parse and an mmap.
    Not pickled (a spawned worker maps its own)."""

    def __init__(self) -> None:
        self._maps: dict[Path, np.ndarray] = {}

    def get(self, path: Path) -> np.ndarray | None:
        return self._maps.get(path)

    def put(self, path: Path, array: np.ndarray) -> np.ndarray:
        self._maps[path] = array
        return array

    def __getstate__(self) -> dict:
        return {"_maps": {}}


def _version() -> str:
    import magseg

    return magseg.__version__


def load_npy(path: Path) -> np.ndarray | None:
    """``path`` memory-mapped, or None when it is missing or not a complete ``.npy``."""
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        return None
    except (ValueError, OSError, EOFError):  # truncated or not an .npy: rebuilt
        return None


def save_npy(path: Path, array: np.ndarray, what: str) -> None:
    """Write ``array`` to ``path`` atomically; a failed write names ``what`` and leaves no
    file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            np.save(f, array)
    except WriteError as exc:
        raise WriteError(f"{what}: {exc} (caches go under the run directory, or --cache-dir)") from None


def cached_npy(path: Path, build: Callable[[], np.ndarray], what: str,
               check: Callable[[np.ndarray], bool] = lambda a: True) -> np.ndarray:
    """The array in ``path`` (memory-mapped), built with ``build`` and written first when it
    is missing or fails ``check``; one process builds while the others wait for it."""
    array = load_npy(path)
    if array is not None and check(array):
        return array
    path.parent.mkdir(parents=True, exist_ok=True)
    with entry_lock(path):
        array = load_npy(path)  # another process may have written it while this one waited
        if array is None or not check(array):
            save_npy(path, build(), what)
            array = load_npy(path)
            if array is None:
                raise WriteError(f"{what}: {path} does not read back after writing it")
    return array


class SceneCache:
    """Decoded scenes of the DeepGlobe layout under ``<root>/scenes`` (see the module doc)."""

    def __init__(self, root: str | Path, config: Config) -> None:
        self.root = Path(root) / "scenes"
        self.channels = config.model.in_channels
        data = config.data
        self._config_key = {
            "magseg": _version(), "layout": data.layout, "bands": data.bands,
            "classes": [(c.id, tuple(c.color)) for c in config.classes],
        }
        self._config = config
        self._open = OpenEntries()

    def path(self, scene) -> Path:
        """The entry for ``scene`` as its files are now (a stat of each, no decoding):
        ``<path hash>-<files' stamp hash>-<config hash>.npy``."""
        stamp = [file_stamp(scene.image), file_stamp(scene.mask) if scene.mask else None]
        return self.root / (f"{digest(stamp[0][0], 12)}-{digest(stamp, 12)}-"
                            f"{digest(self._config_key, 12)}.npy")

    def _check(self, array: np.ndarray) -> bool:
        return array.ndim == 3 and array.shape[0] == self.channels + 1

    def load(self, scene) -> tuple[np.ndarray, np.ndarray]:
        """``(image (C, H, W), mask (H, W))`` of ``scene``, memory-mapped from its entry
        (decoded and written first when there is none).

        Raises:
            DataError: the scene cannot be read (as ``read_scene``).
            WriteError: the entry cannot be written (full disk: the message says so).
        """
        from magseg.data.scenes import read_scene

        if scene.mask is None:
            raise DataError(f"{scene.image}: training needs a mask")
        path = self.path(scene)
        array = self._open.get(path)
        if array is not None:
            return array[:-1], array[-1]

        def build() -> np.ndarray:
            image, mask = read_scene(scene, self._config)
            assert mask is not None
            # One file, so one rename publishes image and mask together. Class ids (< 256)
            # are exact in any image dtype.
            array = np.concatenate([image, mask[None].astype(image.dtype)])
            self._remove_stale(path)
            return array

        array = self._open.put(path, cached_npy(path, build, f"scene cache entry of {scene.image}",
                                                self._check))
        return array[:-1], array[-1]

    def _remove_stale(self, path: Path) -> None:
        """Remove this scene's entries made from older versions of its files (same path
        hash, another stamp), whatever their config: nothing will ask for them again.
        Removing is safe for a process that has one memory-mapped (the data stays until it
        is unmapped)."""
        prefix, stamp, _ = path.name.split("-")
        for other in self.root.glob(f"{prefix}-*.npy"):
            if other.name.split("-")[1] != stamp:
                with contextlib.suppress(OSError):
                    other.unlink()

    def prepare(self, scenes: list, threads: int = 1, on_scene: Callable[[], None] | None = None) -> None:
        """Make sure every scene has an entry (decoding the missing ones, ``threads`` at a
        time: decoding releases the GIL)."""
        def one(scene) -> None:
            self.load(scene)
            if on_scene is not None:
                on_scene()

        if threads <= 1:
            for scene in scenes:
                one(scene)
            return
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(one, scenes):
                pass
