"""The graph cache as a whole, on disk: where it is, what it holds, when each part was last
used, and pruning what has not been (``magseg cache``).

    <cache>/graphs/<model>/             one folder per model (magseg.engine.runtime.GraphCache)
        <h>x<w>[.probs].onnx + .json    an exported graph per input size, and its sidecar
        int8.xml, int8.bin, int8.json   the int8 graph ``magseg quantize`` made
        refiner-int8.xml, .bin, .json   and the refiner's convolutions', where it has one
        compiled/<digest>.blob + .json  what a runtime made of a graph, for one CPU and version

A run marks what it uses (``mark_used``: the sidecar it checked gets the current time), so a
folder's last use is its newest file's time, and a compiled graph's is its sidecar's. A
compiled graph for a runtime version or a CPU no longer in use, and a model no longer run,
stop being marked; ``prune`` removes those not used for a while. Nothing here imports torch:
``magseg cache`` answers at once.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# A model's folder is named by 32 hex digits (``runtime.graph_key``): nothing else under
# graphs/ is touched.
_MODEL_DIR = re.compile(r"[0-9a-f]{32}")
# The int8 graphs ``magseg quantize`` makes, by part of the model: ``<stem>.xml``, ``.bin``, ``.json``.
INT8_STEMS = {"backbone": "int8", "refiner": "refiner-int8"}


def cache_root(configured: str | None = None) -> Path:
    """Where exported graphs are kept: ``engine.cache_dir``, else ``$MAGSEG_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/magseg`` (``~/.cache/magseg``); graphs under ``graphs/`` in it."""
    base = configured or os.environ.get("MAGSEG_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        base = str(Path(xdg) / "magseg")
    return Path(base).expanduser() / "graphs"


def mark_used(sidecar: Path) -> None:
    """Record that what ``sidecar`` vouches for was used now (its time, for ``prune``). A
    cache that cannot be written (a read-only shared one) is used all the same."""
    try:
        os.utime(sidecar)
    except OSError:
        pass


@dataclass(frozen=True)
class CacheEntry:
    """One model's folder: ``bytes`` in all, ``last_used`` (seconds since the epoch, its
    newest file's time), its exported ``graphs`` (``HxW``, ``.probs`` for those that end in
    the softmax), how many ``compiled`` graphs it keeps, and the parts it has an ``int8``
    graph of (``INT8_STEMS``: backbone, refiner)."""

    path: Path
    bytes: int
    last_used: float
    graphs: tuple[str, ...]
    compiled: int
    int8: tuple[str, ...]


@dataclass(frozen=True)
class Removal:
    """A part of the cache ``prune`` removed (or, on a dry run, would remove): a ``model``
    folder or a ``compiled`` graph (its blob and sidecar), with its bytes and last use;
    ``error`` says why it could not be removed."""

    path: Path
    kind: str
    bytes: int
    last_used: float
    error: str | None = None


def _files(folder: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every file under ``folder``, its path relative to it and its ``lstat``; one removed
    while we look is not counted."""
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(dirpath, name)
            stat = _stat(path)
            if stat is not None:
                yield path.relative_to(folder), stat


def model_folders(root: Path) -> list[Path]:
    """The models' folders under ``root`` (``cache_root()``): real directories named as
    magseg names them, never a link."""
    try:
        children = list(root.iterdir())
    except OSError:
        return []
    return sorted(p for p in children if _MODEL_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def entry(folder: Path) -> CacheEntry:
    """What the model's ``folder`` holds (one walk through it)."""
    files = dict(_files(folder))
    graphs = tuple(sorted(p.stem for p in files if p.parent == Path() and p.suffix == ".onnx"))
    blobs = sum(p.parent == Path("compiled") and p.suffix == ".blob" for p in files)
    int8 = tuple(part for part, stem in INT8_STEMS.items() if Path(f"{stem}.xml") in files)
    return CacheEntry(folder, sum(s.st_size for s in files.values()),
                      max((s.st_mtime for s in files.values()), default=0.0), graphs, blobs, int8)


def entries(root: Path) -> list[CacheEntry]:
    """Every model's ``CacheEntry`` under ``root``, the least recently used first."""
    return sorted((entry(f) for f in model_folders(root)), key=lambda e: e.last_used)


def prune(root: Path, older_than: float | None, dry_run: bool = False) -> list[Removal]:
    """Remove what was not used in the last ``older_than`` seconds: a model's whole folder
    when nothing in it was; else each compiled graph not used since (one made for a runtime
    version or a CPU that no longer runs it). ``older_than`` None removes every model.

    A part that cannot be removed is reported (``Removal.error``) and the others are still
    removed. With ``dry_run`` nothing is removed: the list says what would be."""
    cutoff = None if older_than is None else time.time() - older_than
    removals = []
    for item in entries(root):
        if cutoff is None or item.last_used < cutoff:
            removals.append(_remove(Removal(item.path, "model", item.bytes, item.last_used), dry_run))
            continue
        for blob in sorted((item.path / "compiled").glob("*.blob")):
            stats = [s for s in map(_stat, (blob, blob.with_suffix(".json"))) if s is not None]
            used = max((s.st_mtime for s in stats), default=None)
            if used is not None and used < cutoff:  # None: gone while we looked
                removals.append(_remove(Removal(blob, "compiled", sum(s.st_size for s in stats), used), dry_run))
    return removals


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except OSError:
        return None


def _remove(removal: Removal, dry_run: bool) -> Removal:
    if dry_run:
        return removal
    try:
        if removal.kind == "model":
            shutil.rmtree(removal.path)
        else:  # the sidecar first: a blob without one is never used
            removal.path.with_suffix(".json").unlink(missing_ok=True)
            removal.path.unlink(missing_ok=True)
    except OSError as exc:
        return Removal(removal.path, removal.kind, removal.bytes, removal.last_used,
                       f"{exc.strerror or exc}: {exc.filename or removal.path}")
    return removal
