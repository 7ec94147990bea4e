"""Training masks as GIS data comes: class codes remapped by data.class_map (ESA WorldCover's
10, 20, ..., 100), and image/mask pairs that must share a grid, not only a size."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import CONFIGS
from test_datasets import geotiff_config, write_geotiff

from magseg.config import ConfigError, load_config
from magseg.data.scenes import IGNORE, Scene, check_scene, read_mask, remap_codes
from magseg.errors import DataError

WORLDCOVER = np.array([[10, 20, 30], [40, 95, 80]], np.uint16)


def test_codes_are_remapped_by_hand():
    mapping = {10: 1, 20: 1, 30: 2, 40: 3, 80: 0}
    assert remap_codes(WORLDCOVER, mapping, "ignore").tolist() == [[1, 1, 2], [3, IGNORE, 0]]
    with pytest.raises(DataError, match=r"codes \[95\] are not in data.class_map.*unmapped=ignore"):
        remap_codes(WORLDCOVER, mapping, "error", "m.tif")


def test_a_geotiff_mask_is_read_through_the_class_map(tmp_path, tiny_config):
    write_geotiff(tmp_path / "m.tif", WORLDCOVER[None])
    config = geotiff_config(tiny_config, bands=3).override(
        {"data.class_map": {10: 1, 20: 1, 30: 2, 40: 3, 80: 0, 95: 255}})
    assert read_mask(tmp_path / "m.tif", config).tolist() == [[1, 1, 2], [3, IGNORE, 0]]
    # Without the map the codes are ids beyond the classes: refused, as before.
    with pytest.raises(DataError, match="class ids"):
        read_mask(tmp_path / "m.tif", geotiff_config(tiny_config, bands=3))


@pytest.mark.parametrize("value", ["{}", "{10: 300}", "{-1: 2}"])
def test_bad_class_maps_name_the_key(value):
    with pytest.raises(ConfigError, match="data.class_map"):
        load_config(CONFIGS / "tiny.yaml", [f"data.class_map={value}"])


@pytest.mark.parametrize("what, crs, transform", [
    ("CRS", "EPSG:32632", Affine(0.5, 0, 500000, 0, -0.5, 4000000)),
    ("transform", "EPSG:32633", Affine(1.0, 0, 500000, 0, -1.0, 4000000)),
])
def test_image_and_mask_must_share_a_grid(tmp_path, tiny_config, what, crs, transform):
    config = geotiff_config(tiny_config, bands=3)
    write_geotiff(tmp_path / "images" / "a.tif", np.zeros((3, 8, 8), np.uint8))
    (tmp_path / "masks").mkdir()
    with rasterio.open(tmp_path / "masks" / "a.tif", "w", driver="GTiff", height=8, width=8, count=1,
                       dtype="uint8", crs=crs, transform=transform) as dst:
        dst.write(np.zeros((1, 8, 8), np.uint8))
    scene = Scene("a", tmp_path / "images" / "a.tif", tmp_path / "masks" / "a.tif")
    with pytest.raises(DataError, match=f"its {what}") as error:
        check_scene(scene, config)
    assert "images/a.tif" in str(error.value) and "masks/a.tif" in str(error.value)
    write_geotiff(tmp_path / "masks" / "a.tif", np.zeros((1, 8, 8), np.uint8))  # the image's grid
    assert check_scene(scene, config) == (8, 8)
