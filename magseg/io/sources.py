"""Where an input raster lives: a local file, or anything GDAL opens by name.

Large GeoTIFFs usually sit in buckets or behind HTTP. GDAL reads them through its virtual
file systems (``/vsicurl/``, ``/vsis3/``, ``/vsigs/``, ``/vsiaz/``, ``/vsizip/``...), and
users write them as URLs (``s3://bucket/key.tif``, ``https://host/x.tif``). Such a name is
not a local path: ``pathlib.Path`` folds its ``//`` (``https:/host``), and ``exists()`` says
no. So names are kept as strings, and only these functions look inside them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

# URL schemes and the GDAL virtual file system that reads them.
_SCHEMES = {
    "s3": "/vsis3/",
    "gs": "/vsigs/",
    "gcs": "/vsigs/",
    "az": "/vsiaz/",
    "http": "/vsicurl/http://",
    "https": "/vsicurl/https://",
    "ftp": "/vsicurl/ftp://",
}

Source = str | Path  # a local path, or a name GDAL opens (see is_virtual)


def is_virtual(name: Source) -> bool:
    """Whether ``name`` is a GDAL virtual path or a URL rather than a local file."""
    if isinstance(name, Path):
        return False
    return name.startswith("/vsi") or urlsplit(name).scheme.lower() in _SCHEMES


def gdal_name(name: Source) -> str:
    """The name to hand GDAL: ``s3://b/k`` -> ``/vsis3/b/k``, ``https://h/p`` ->
    ``/vsicurl/https://h/p``; anything else as it is."""
    name = os.fspath(name)
    scheme, sep, rest = name.partition("://")
    if sep and scheme.lower() in _SCHEMES:
        return _SCHEMES[scheme.lower()] + rest
    return name


def base_name(name: Source) -> str:
    """The last component of ``name`` (a URL's query string dropped): output names come
    from it."""
    if not is_virtual(name):
        return Path(name).name
    text = gdal_name(name)
    url = text.split("/vsicurl/", 1)[1] if text.startswith("/vsicurl/") else ""
    path = urlsplit(url).path if "://" in url else text.split("?", 1)[0]
    return PurePosixPath(path).name


def stem(name: Source) -> str:
    """``base_name`` without its suffix: ``s3://b/tiles/x.tif`` -> ``x``."""
    return PurePosixPath(base_name(name)).stem


def source_key(name: Source) -> str:
    """One key per raster, to drop duplicates from an input list."""
    return gdal_name(name) if is_virtual(name) else os.path.abspath(name)


def readable_name(name: Source) -> str:
    """``name`` as text that can be encoded anywhere (GeoTIFF tags, a PNG title): a file
    name's bytes that are not UTF-8 (Python keeps them as surrogates) become U+FFFD."""
    return os.fsencode(os.fspath(name)).decode("utf-8", "replace")


def encodable(name: Source) -> bool:
    """Whether GDAL can be given ``name``: rasterio and pyogrio encode names as UTF-8, and a
    file name whose bytes are not UTF-8 fails there (UnicodeEncodeError)."""
    try:
        os.fspath(name).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@contextlib.contextmanager
def gdal_path(path: Source) -> Iterator[str]:
    """A name GDAL can open for the local file ``path``: ``path`` itself, or, for a name that
    is not UTF-8, a symbolic link to it with a UTF-8 name in a temporary folder, with links to
    its sidecars beside it (``<name>.aux.xml``, ``.msk``, ``.ovr``, and world files
    ``<stem>.tfw``, ``.pgw``...); removed afterwards."""
    if is_virtual(path) or encodable(path):
        yield os.fspath(path)
        return
    path = Path(os.path.abspath(path))
    folder = tempfile.mkdtemp(prefix="magseg-name-")
    try:
        stem = path.name[: len(path.name) - len(path.suffix)]
        link = Path(folder) / ("file" + readable_name(path.suffix))
        for sibling in [path, *path.parent.glob(glob.escape(stem) + ".*")]:
            name = link.with_name("file" + readable_name(sibling.name[len(stem):]))
            if not os.path.lexists(name):
                os.symlink(sibling, name)
        yield str(link)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
