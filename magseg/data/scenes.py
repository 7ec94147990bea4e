"""Datasets on disk: which scenes a split holds, and reading one scene's image and mask.

Two layouts (``data.layout``):

- ``deepglobe``: ``<root>/<id>_sat.jpg`` (RGB) and ``<root>/<id>_mask.png`` (RGB colours,
  decoded per channel at 128 into class ids by the classes' colours).
- ``geotiff``: ``<root>/images/<id>.tif`` (any band count; uint8, uint16 or float) and
  ``<root>/masks/<id>.tif`` (one band of class ids; 255 = ignore).

Splits are plain text files of ids, one per line (``#`` comments and blank lines skipped),
named by ``data.train_split`` etc. and resolved against the root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine

from magseg.config import ClassSpec, Config, DataConfig
from magseg.errors import DataError
from magseg.io.raster import read_array

IGNORE = 255
_GEOTIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class Scene:
    """One image of a dataset, with its mask when the split has ground truth."""

    id: str
    image: Path
    mask: Path | None


def split_file(data: DataConfig, split: str, root: str | Path | None = None) -> Path:
    """The split list for ``split`` (train/val/test, or a path to a list file)."""
    root = Path(root if root is not None else (data.root or "."))
    names = {"train": data.train_split, "val": data.val_split, "test": data.test_split}
    name = names.get(split, split)
    path = Path(name)
    return path if path.is_absolute() or path.exists() else root / name


def read_split(path: str | Path) -> list[str]:
    """Ids listed in a split file."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"split file {path} does not exist (a text file of scene ids, one per line)") from None
    ids = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not ids:
        raise DataError(f"split file {path} lists no scene ids")
    return ids


def _scene(layout: str, root: Path, scene_id: str) -> Scene:
    if layout == "deepglobe":
        return Scene(scene_id, root / f"{scene_id}_sat.jpg", root / f"{scene_id}_mask.png")
    image = next((root / "images" / f"{scene_id}{s}" for s in _GEOTIFF_SUFFIXES
                  if (root / "images" / f"{scene_id}{s}").exists()), root / "images" / f"{scene_id}.tif")
    mask = next((root / "masks" / f"{scene_id}{s}" for s in _GEOTIFF_SUFFIXES
                 if (root / "masks" / f"{scene_id}{s}").exists()), root / "masks" / f"{scene_id}.tif")
    return Scene(scene_id, image, mask)


def list_scenes(
    data: DataConfig, split: str, root: str | Path | None = None, require_masks: bool = True
) -> list[Scene]:
    """The scenes of ``split``, every file checked to exist.

    Raises:
        DataError: missing or empty split file, or files the split names that do not exist
            (all of them listed, so one run shows everything to fix).
    """
    root = Path(root if root is not None else (data.root or "."))
    if not root.is_dir():
        raise DataError(f"data root {root} is not a directory (set --data-root or data.root)")
    scenes = [_scene(data.layout, root, i) for i in read_split(split_file(data, split, root))]
    missing = [s.image for s in scenes if not s.image.is_file()]
    if require_masks:
        missing += [s.mask for s in scenes if s.mask is not None and not s.mask.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(
            f"split {split!r} of {root} names {len(missing)} missing file(s): {shown}{more}"
        )
    return scenes


def decode_colors(rgb: np.ndarray, classes: tuple[ClassSpec, ...], path: str | Path = "<mask>") -> np.ndarray:
    """RGB colour mask ``(3, H, W)`` -> class ids ``(H, W)`` uint8, each channel split at 128.

    Raises:
        DataError: a colour that is no class's (named with its pixel count and the file).
    """
    if rgb.ndim != 3 or rgb.shape[0] < 3:
        raise DataError(f"{path}: a colour mask needs 3 bands (RGB), got shape {rgb.shape}")
    bits = (rgb[:3] >= 128).astype(np.uint8)
    code = bits[0] * 4 + bits[1] * 2 + bits[2]
    lut = np.full(8, IGNORE, dtype=np.uint8)
    for c in classes:
        r, g, b = (int(v >= 128) for v in c.color)
        lut[r * 4 + g * 2 + b] = c.id
    labels = lut[code]
    if (labels == IGNORE).any():
        found = np.unique(code[labels == IGNORE])
        colours = [tuple(255 * int(b) for b in ((k >> 2) & 1, (k >> 1) & 1, k & 1)) for k in found]
        raise DataError(
            f"{path}: mask has colours that are no class's: {colours} "
            f"({int((labels == IGNORE).sum())} pixels); known colours: "
            + ", ".join(f"{c.name}={tuple(c.color)}" for c in classes)
        )
    return labels


def encode_colors(labels: np.ndarray, classes: tuple[ClassSpec, ...]) -> np.ndarray:
    """Class ids ``(H, W)`` -> RGB ``(3, H, W)`` uint8 with the classes' colours (255 -> black)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for c in classes:
        palette[c.id] = c.color
    return np.ascontiguousarray(palette[labels].transpose(2, 0, 1))


def read_mask(path: str | Path, config: Config) -> np.ndarray:
    """A scene's mask as ``(H, W)`` uint8 class ids (255 = ignore)."""
    if config.data.layout == "deepglobe":
        return decode_colors(read_array(path), config.classes, path)
    mask = read_array(path)
    if mask.shape[0] != 1:
        raise DataError(f"{path}: a class-id mask has one band, this one has {mask.shape[0]}")
    mask = mask[0]
    if not np.issubdtype(mask.dtype, np.integer):
        raise DataError(f"{path}: mask must hold integer class ids, not {mask.dtype}")
    if config.data.class_map is not None:
        mask = remap_codes(mask, config.data.class_map, config.data.unmapped, path)
    bad = (mask >= config.num_classes) & (mask != IGNORE)
    if bad.any():
        raise DataError(
            f"{path}: mask has class ids {sorted(np.unique(mask[bad]).tolist())[:10]} but the "
            f"config has {config.num_classes} classes (0..{config.num_classes - 1}; 255 = ignore)"
        )
    return mask.astype(np.uint8)


def remap_codes(mask: np.ndarray, class_map: dict[int, int], unmapped: str,
                path: str | Path = "<mask>") -> np.ndarray:
    """Mask codes ``(H, W)`` -> class ids ``(H, W)`` uint8 by ``class_map``; codes it does
    not list become 255 (``unmapped: ignore``) or an error naming them (``error``).

    Raises:
        DataError: unlisted codes with ``unmapped: error``.
    """
    codes, inverse = np.unique(mask, return_inverse=True)
    ids = np.array([class_map.get(int(c), IGNORE) for c in codes], dtype=np.uint8)
    missing = [int(c) for c in codes if int(c) not in class_map]
    if missing and unmapped == "error":
        raise DataError(
            f"{path}: mask codes {missing[:10]} are not in data.class_map (it maps "
            f"{sorted(class_map)[:10]}); add them, or set data.unmapped=ignore to leave them out")
    return ids[inverse.reshape(mask.shape)]


def read_scene(scene: Scene, config: Config) -> tuple[np.ndarray, np.ndarray | None]:
    """``(image (C, H, W) raw dtype, mask (H, W) uint8 or None)``, sizes checked to agree."""
    image = read_array(scene.image, config.data.bands)
    if image.shape[0] != config.model.in_channels:
        raise DataError(
            f"{scene.image}: {image.shape[0]} band(s) read but the model takes "
            f"{config.model.in_channels}; set data.bands"
        )
    if scene.mask is None:
        return image, None
    mask = read_mask(scene.mask, config)
    if mask.shape != image.shape[1:]:
        raise DataError(
            f"{scene.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
            f"{scene.image} is {image.shape[2]}x{image.shape[1]} (width x height)"
        )
    return image, mask


def check_scene(scene: Scene, config: Config) -> tuple[int, int]:
    """Check a scene from its file headers only (no pixels decoded): both files open as
    rasters, the image has the bands the model takes, the mask one band (three for colour
    masks) and the image's size. Cheap enough to run on a whole split before training.

    Returns:
        the scene's size ``(H, W)``.
    Raises:
        DataError: naming the file and what is wrong with it.
    """
    from magseg.io.raster import open_raster, select_bands

    with open_raster(scene.image) as src:
        bands = select_bands(scene.image, src.count, config.data.bands)
        size = (src.height, src.width)
        grid = (src.crs, src.transform)
    if len(bands) != config.model.in_channels:
        raise DataError(
            f"{scene.image}: {len(bands)} band(s) but the model takes "
            f"{config.model.in_channels}; set data.bands"
        )
    if scene.mask is None:
        return size
    with open_raster(scene.mask) as src:
        mask_size, mask_bands = (src.height, src.width), src.count
        mask_grid = (src.crs, src.transform)
    wanted = 3 if config.data.layout == "deepglobe" else 1
    if mask_bands < wanted or (wanted == 1 and mask_bands != 1):
        raise DataError(
            f"{scene.mask}: a {'colour' if wanted == 3 else 'class-id'} mask needs "
            f"{wanted} band(s), this one has {mask_bands}"
        )
    if mask_size != size:
        raise DataError(
            f"{scene.mask}: mask is {mask_size[1]}x{mask_size[0]} but its image "
            f"{scene.image} is {size[1]}x{size[0]} (width x height)"
        )
    # Same size is not enough: a mask of another place or resolution would teach the model
    # the wrong pixels.
    for what, mine, theirs in (("CRS", grid[0], mask_grid[0]), ("transform", grid[1], mask_grid[1])):
        if mine != theirs:
            raise DataError(f"{scene.mask}: its {what} ({_one_line(theirs)}) is not its image's "
                            f"({_one_line(mine)}, {scene.image}); warp one onto the other's grid "
                            "(gdalwarp)")
    return size


def _one_line(value: Any) -> str:
    """A CRS or an affine transform on one line: an Affine prints as a 3-row matrix, and its
    six coefficients (GDAL's order: a, b, c, d, e, f) are what tells two grids apart."""
    if isinstance(value, Affine):
        return ", ".join(f"{v:.12g}" for v in tuple(value)[:6])
    return " ".join(str(value).split())
