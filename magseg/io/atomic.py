"""Write files so that a killed run, a full disk or a concurrent run never leaves one that
looks finished but is not, and never loses the file that was there before.

Everything magseg writes (checkpoints, rasters, reports) goes to a temporary name beside the
target and is put in place (``publish``) only once complete: written without an error,
checked by its writer where the library may fail silently (GDAL, magseg.io.raster), and synced
to disk (``os.fsync``, which reports write errors the kernel deferred). Renaming is atomic on
one filesystem. When anything fails the temporary file is removed, the target is left as it
was, and a write failure becomes a ``WriteError`` that names the target and, when the disk
is full, says so.

Without ``overwrite`` the target is put in place only if it still does not exist: a
concurrent run that wrote it meanwhile keeps its file (``OutputExistsError``).

A run killed outright (SIGKILL, the OOM killer, a power cut) cannot remove its temporary
file, which for a large raster may hold gigabytes. The temporary name records the process
and host that own it, so the next run writing the same target removes the leftovers of
processes that are gone, and leaves alone those still running or on another host (a shared
filesystem).

Cache entries that several processes may build at once (a training scene, an exported graph)
are built under ``entry_lock``: one builds, the others wait and then read its entry.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import glob
import os
import re
import shutil
import socket
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

from magseg.errors import OutputExistsError, WriteError

K = TypeVar("K")

# Temporary files carry this marker so a later run (or a person) can tell them apart.
PARTIAL_SUFFIX = ".partial"


@functools.lru_cache(maxsize=1)
def _host() -> str:
    return socket.gethostname()


def partial_path(target: str | Path) -> Path:
    """The temporary name used while ``target`` is being written:
    ``.<name>.<pid>@<host>.partial``."""
    target = Path(target)
    return target.with_name(f".{_temporary_stem(target.name)}.{os.getpid()}@{_host()}{PARTIAL_SUFFIX}")


def _temporary_stem(name: str) -> str:
    """``name`` in temporary names: as it is, or, when its bytes are not UTF-8 (GDAL and
    pyogrio cannot be given such a name), with those bytes as ``#xx``."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "".join(f"#{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in name)
    return name


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to someone else
        return True
    return True


def remove_stale_partials(target: str | Path) -> list[Path]:
    """Remove the temporary files that killed runs left for ``target``.

    Only names ``partial_path`` makes for this host whose process no longer exists are
    removed (also with a format's suffix after them, ``….partial.fgb``, and a library's
    journal beside them, ``….partial.gpkg-wal``); a live process's file, another host's,
    and anything else are kept.

    Returns:
        the removed paths.
    """
    target = Path(target)
    prefix, host = f".{_temporary_stem(target.name)}.", _host()
    removed = []
    for path in target.parent.glob(glob.escape(prefix) + "*" + PARTIAL_SUFFIX + "*"):
        owner, _, after = path.name[len(prefix):].rpartition(PARTIAL_SUFFIX)
        if after and not re.fullmatch(r"\.\w+(-\w+)?", after):
            continue
        pid, at, owner_host = owner.partition("@")
        if at and owner_host == host and pid.isdigit() and not _running(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                if path.is_dir() and not path.is_symlink():  # a scratch directory
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
    return removed


def fresh_partial_path(target: str | Path) -> Path:
    """``partial_path(target)``, after removing what killed runs left for it."""
    remove_stale_partials(target)
    return partial_path(target)


@contextlib.contextmanager
def atomic_write(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; put it in place as ``target`` when the block succeeds.

    After the block the file is synced to disk and published (``publish``): replacing
    ``target`` when ``overwrite``, else only if ``target`` still does not exist. On any
    exception the temporary file is removed and ``target`` is left as it was.

    Raises:
        OutputExistsError: ``target`` exists, or appeared while the block ran, and
            ``overwrite`` is False.
        WriteError: the file could not be written completely: the block raised a WriteError
            or an OSError of a failed write (disk full, quota, I/O error), or syncing or
            renaming failed. The message names ``target`` and, for a full disk, the fix.
    """
    with atomic_writes({0: target}, overwrite) as temps:
        yield temps[0]


@contextlib.contextmanager
def entry_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<dir>/.<name>.lock`` while one process builds ``path``
    (a cache entry), so that processes sharing the cache build it once: one builds, the
    others wait and then find it built. Where the filesystem has no working ``flock`` (some
    network filesystems) it does not lock, and each may build it; their atomic writes still
    leave one complete file."""
    lock = path.with_name(f".{path.name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a folder it cannot write: no lock, and the build's own write says why
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def atomic_writes(targets: Mapping[K, str | Path], overwrite: bool | Collection[K] = True
                  ) -> Iterator[dict[K, Path]]:
    """``atomic_write`` for files that belong together (one input's outputs): yield their
    temporary paths; when the block succeeds, sync them all, then publish them in order.

    ``overwrite``: True or False for all targets, or the keys of those that may be replaced
    (a vector layer made again with other options, while the rest must not exist).
    Without ``overwrite``, when one cannot be published (it appeared meanwhile), the ones
    this block already published are removed again: none of the new files is left. With
    ``overwrite`` those already published stay (each is complete).

    Raises:
        as ``atomic_write``, for the first target the failure concerns.
    """
    targets = {key: Path(path) for key, path in targets.items()}
    replace = {key: overwrite if isinstance(overwrite, bool) else key in overwrite for key in targets}
    for key, target in targets.items():
        if not replace[key] and target.exists():
            raise OutputExistsError(f"{target} already exists; pass --overwrite to replace it")
    temps = {key: fresh_partial_path(target) for key, target in targets.items()}
    published: list[tuple[Path, int]] = []
    try:
        yield temps
        for key, target in targets.items():
            _finish(temps[key], _fsync)
        for key, target in targets.items():
            inode = os.stat(temps[key]).st_ino
            _finish(temps[key], lambda tmp, target=target, key=key: publish(tmp, target, replace[key]))
            if not replace[key]:
                published.append((target, inode))
    except BaseException as exc:
        _unpublish(published)
        # The target whose own temporary failed first: a name such as ``x.tif.aux.xml``
        # also looks like a temporary of ``x.tif``.
        named = _failed_file(exc)
        order = sorted(targets, key=lambda key: named is None or Path(os.fsdecode(named)) != temps[key])
        failure = next((f for key in order
                        if (f := _write_failure(targets[key], temps[key], exc)) is not None), None)
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if failure is not None:
            raise failure from exc
        raise


def _finish(tmp: Path, step: Callable[[Path], None]) -> None:
    """Run a step of putting ``tmp`` in place; an OSError is a WriteError about ``tmp``."""
    try:
        step(tmp)
    except OutputExistsError:
        raise
    except OSError as exc:
        raise WriteError(str(exc), path=tmp) from exc


def _unpublish(published: list[tuple[Path, int]]) -> None:
    """Remove the files this run has just published, each only while it is still this run's
    file (its inode), so that nothing another run wrote is touched."""
    for target, inode in published:
        with contextlib.suppress(OSError):
            if os.stat(target).st_ino == inode:
                target.unlink()


# A failed write, whatever the library that wrote (an OSError with one of these errno values).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# Less free space than this when a write failed: the disk is full (libraries such as GDAL
# and torch report a failed write without its errno).
FULL_BELOW_BYTES = 1 << 20


def _write_failure(target: Path, tmp: Path, exc: BaseException) -> WriteError | None:
    """The WriteError to raise for ``exc`` raised while writing ``target`` through ``tmp``,
    or None when ``exc`` is no failure to write this target (it is re-raised as it is): not
    a write failure, already attributed to a target, or about another file (several
    ``atomic_write`` blocks can be open at once)."""
    if isinstance(exc, OutputExistsError) or not isinstance(exc, (WriteError, OSError)):
        return None
    if isinstance(exc, WriteError):
        if exc.target is not None or not _is_ours(exc.path, target):
            return None
    elif exc.errno not in _WRITE_ERRNOS or not _is_ours(exc.filename, target):
        return None
    failure = _describe(target, tmp, exc)
    failure.target = target
    return failure


def _failed_file(exc: BaseException) -> str | bytes | Path | None:
    """The file ``exc`` says failed: a WriteError's ``path``, an OSError's ``filename``."""
    if isinstance(exc, WriteError):
        return exc.path
    if isinstance(exc, OSError):
        return exc.filename
    return None


def _is_ours(path: str | Path | None, target: Path) -> bool:
    """Whether a failure about ``path`` is one of writing ``target``: no path named, or a
    temporary file of ``target`` (its own, or a scratch file named after it)."""
    if path is None:
        return True
    path = Path(os.fsdecode(path))
    return (path == target or path.parent == target.parent
            and path.name.startswith(f".{_temporary_stem(target.name)}.")
            and path.name.endswith(PARTIAL_SUFFIX))


def _describe(target: Path, tmp: Path, exc: BaseException) -> WriteError:
    kept = (f"the existing {target} is unchanged" if target.exists()
            else f"no {target.name} was written")
    free = _free_bytes(target.parent)
    if _says_full(exc) or (free is not None and free < FULL_BELOW_BYTES):
        where = f" ({_size(free)} free in {target.parent})" if free is not None else ""
        return WriteError(
            f"{target}: not written, the disk is full{where}; free some space there (or write "
            f"elsewhere) and run again; {kept}"
        )
    # The temporary files' names mean nothing to a reader: the message names the target.
    temporary = (re.escape(f"{target.parent}{os.sep}.{_temporary_stem(target.name)}.") + r"\S*?"
                 + re.escape(PARTIAL_SUFFIX))
    detail = re.sub(temporary + ": ", "", str(exc))
    detail = re.sub(temporary, "the temporary file", detail)
    return WriteError(f"{target}: not written ({detail}); {kept}")


def _says_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception it came from is a full disk or an exceeded quota."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        text = str(exc)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _size(n: int) -> str:
    return f"{n} bytes" if n < 1024 else f"{n / 1024:.0f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def _fsync(path: Path) -> None:
    """Flush ``path`` to disk: reports write errors the kernel deferred (NFS, thin pools)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``target``; without ``overwrite`` never replace a
    ``target`` that exists by now (a concurrent run's output).

    Without ``overwrite``: a hard link to ``target`` (which fails if it exists) then the
    removal of ``tmp``; where the filesystem has no hard links, ``renameat2`` with
    ``RENAME_NOREPLACE`` (Linux); where neither is supported, a check just before the rename
    (then two runs that finish in the same instant may still replace one another).

    Raises:
        OutputExistsError: ``target`` exists and ``overwrite`` is False.
    """
    if overwrite:
        os.replace(tmp, target)
        return
    appeared = _appeared(target)
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise appeared from None
    except OSError as exc:
        if exc.errno not in _NO_LINK_ERRNOS:
            raise
    else:
        os.unlink(tmp)
        return
    if _rename_noreplace(tmp, target):
        return
    if os.path.lexists(target):
        raise appeared
    os.replace(tmp, target)


def _appeared(target: Path) -> OutputExistsError:
    return OutputExistsError(
        f"{target} appeared while this run was writing it (another run?); it is kept as it is; "
        "pass --overwrite to replace it"
    )


# os.link's errno where a filesystem has no hard links (FAT, some FUSE and SMB mounts).
_NO_LINK_ERRNOS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS,
                   errno.EACCES}
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


@functools.lru_cache(maxsize=1)
def _renameat2():
    """libc's ``renameat2`` (glibc 2.28+), or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _rename_noreplace(tmp: Path, target: Path) -> bool:
    """Rename ``tmp`` to ``target`` unless ``target`` exists; False where the system or the
    filesystem cannot do that atomically (nothing was renamed).

    Raises:
        OutputExistsError: ``target`` exists.
    """
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.EEXIST:
        raise _appeared(target)
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(tmp))
