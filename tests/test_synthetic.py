"""The synthetic generator: deterministic, valid DeepGlobe files, and built as designed
(thin structures vanish at a quarter of the resolution; the two field classes look alike up
close and differ only by their margins)."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import CONFIGS, REPO

from magseg.config import load_config
from magseg.data.scenes import list_scenes, read_scene
from synthetic import (
    AGRICULTURE,
    DEEPGLOBE_CLASSES,
    FIELDS,
    RANGELAND,
    URBAN,
    WATER,
    SceneSpec,
    make_layout,
    make_scene,
    write_dataset,
)
from magseg.errors import OutputExistsError

COUNTS = {"train": 2, "val": 1, "test": 2}


def _files(root):
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def test_classes_are_deepglobes():
    assert DEEPGLOBE_CLASSES == load_config(CONFIGS / "deepglobe.yaml").classes


def test_same_seed_gives_byte_identical_files(tmp_path):
    spec = SceneSpec(size=(96, 128))
    write_dataset(tmp_path / "a", COUNTS, spec, seed=7)
    write_dataset(tmp_path / "b", COUNTS, spec, seed=7)
    write_dataset(tmp_path / "c", COUNTS, spec, seed=8)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 2 * 5 + 3
    assert a == b
    assert a["000000_sat.jpg"] != c["000000_sat.jpg"]


def test_a_scene_depends_only_on_seed_and_index():
    spec = SceneSpec(size=(64, 64))
    img, lab = make_scene(3, 5, spec)
    make_scene(3, 4, spec)  # other scenes made in between change nothing
    img2, lab2 = make_scene(3, 5, spec)
    assert np.array_equal(img, img2) and np.array_equal(lab, lab2)


@pytest.mark.parametrize("size", [(128, 128), (80, 150)])
def test_files_are_valid_deepglobe(tmp_path, size):
    ids = write_dataset(tmp_path, COUNTS, SceneSpec(size=size), seed=1)
    config = load_config(CONFIGS / "deepglobe.yaml")
    for split in ("train", "val", "test"):
        assert (tmp_path / f"{split}.txt").read_text().split() == ids[split]
        scenes = list_scenes(config.data, split, tmp_path)
        assert [s.id for s in scenes] == ids[split]
        for scene in scenes:
            assert scene.image.name.endswith("_sat.jpg") and scene.mask.name.endswith("_mask.png")
            image, mask = read_scene(scene, config)  # decodes every colour or raises
            assert image.shape == (3, *size) and image.dtype == np.uint8
            assert mask.shape == size and mask.max() <= 6
            # The mask PNG holds exact class colours (no blending, 3 bands).
            rgb = cv2.imread(str(scene.mask), cv2.IMREAD_UNCHANGED)[:, :, ::-1]
            colours = {tuple(c) for c in rgb.reshape(-1, 3)}
            assert colours <= {c.color for c in DEEPGLOBE_CLASSES}


def test_written_scene_matches_make_scene(tmp_path):
    spec = SceneSpec(size=(64, 96))
    write_dataset(tmp_path, {"train": 1, "test": 1}, spec, seed=2)
    config = load_config(CONFIGS / "deepglobe.yaml")
    scene = list_scenes(config.data, "test", tmp_path)[0]
    image, mask = read_scene(scene, config)
    want_image, want_mask = make_scene(2, 1, spec)  # test ids follow train's
    assert np.array_equal(mask, want_mask)
    # JPEG is lossy: close to its own scene, far from another one.
    assert np.abs(image.astype(int) - want_image).mean() < 5
    assert np.abs(image.astype(int) - make_scene(2, 0, spec)[0]).mean() > 20


def test_existing_files_are_not_overwritten(tmp_path):
    write_dataset(tmp_path, {"test": 1}, SceneSpec(size=(32, 32)), seed=0)
    before = _files(tmp_path)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_dataset(tmp_path, {"test": 1}, SceneSpec(size=(32, 32)), seed=1)
    assert _files(tmp_path) == before
    write_dataset(tmp_path, {"test": 1}, SceneSpec(size=(32, 32)), seed=1, overwrite=True)
    assert _files(tmp_path) != before


def test_thin_structures_are_thinner_than_a_coarse_pixel():
    """Rivers are 1.5-3 px wide: an opening with a 4x4 square (one pixel of the 4x
    downsampled view) removes them but for crossings, and after a 4x area downsample hardly
    any coarse pixel is all river: in the coarse view a river is always mixed with the
    fields around it. At full resolution every scene has one."""
    river_px, survive, touched, full = 0, 0, 0, 0
    for index in range(6):
        layout = make_layout(np.random.default_rng([0, index]), SceneSpec(size=(256, 256)))
        river = (layout.thin & (layout.labels == WATER)).astype(np.uint8)
        assert river.sum() > 100
        river_px += int(river.sum())
        survive += int(cv2.morphologyEx(river, cv2.MORPH_OPEN, np.ones((4, 4), np.uint8)).sum())
        coarse = cv2.resize(river.astype(np.float32), (64, 64), interpolation=cv2.INTER_AREA)
        touched += int((coarse > 0).sum())
        full += int((coarse >= 0.9).sum())
    assert survive < 0.05 * river_px
    assert full < 0.01 * touched


def test_fields_look_alike_inside_and_differ_at_the_margin():
    """Interior pixels of agriculture and rangeland come from one texture process: their
    colour statistics over many scenes agree; the margins (the context cue) do not."""
    spec = SceneSpec(size=(192, 192))
    stats = {AGRICULTURE: [], RANGELAND: []}
    rims = {AGRICULTURE: [], RANGELAND: []}
    for index in range(24):
        rng = np.random.default_rng([11, index])
        layout = make_layout(rng, spec)
        image = make_scene(11, index, spec)[0].transpose(1, 2, 0).astype(np.float32)
        for cls in FIELDS:
            inside = (layout.labels == cls) & ~layout.rim & ~layout.thin
            inside = cv2.erode(inside.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
            if inside.sum() > 500:
                stats[cls].append(image[inside].mean(0))
            if layout.rim[layout.labels == cls].any():
                rims[cls].append(image[layout.rim & (layout.labels == cls)].mean(0))
    agri, rng_ = np.asarray(stats[AGRICULTURE]), np.asarray(stats[RANGELAND])
    assert len(agri) >= 8 and len(rng_) >= 8
    # Difference of class means within sampling noise (per-cell colour jitter sd ~10).
    assert np.abs(agri.mean(0) - rng_.mean(0)).max() < 8
    hedge, verge = np.mean(rims[AGRICULTURE], 0), np.mean(rims[RANGELAND], 0)
    assert np.abs(hedge - verge).max() > 50


def test_fields_are_larger_than_a_finest_scale_crop():
    """With MagNet's crop of a quarter of the scene, many crops lie wholly inside one field,
    away from its margin: those are the crops where only context tells the class."""
    spec = SceneSpec(size=(256, 256))
    blind = {AGRICULTURE: 0, RANGELAND: 0}
    crops = 0
    for index in range(10):
        layout = make_layout(np.random.default_rng([0, index]), spec)
        for top in range(0, 256, 64):
            for left in range(0, 256, 64):
                crops += 1
                window = (slice(top, top + 64), slice(left, left + 64))
                cells = np.unique(layout.cell[window])
                classes = np.unique(layout.labels[window][~layout.thin[window]])
                if len(cells) == 1 and not layout.rim[window].any() and len(classes) == 1 \
                        and classes[0] in FIELDS:
                    blind[int(classes[0])] += 1
    assert blind[AGRICULTURE] + blind[RANGELAND] > 0.2 * crops
    assert min(blind.values()) > 0


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="size"):
        SceneSpec(size=(8, 64))
    with pytest.raises(ValueError, match="thin"):
        SceneSpec(thin=(0, 2))
    with pytest.raises(ValueError, match="rivers"):
        SceneSpec(rivers=(3, 1))


def test_script_writes_a_dataset_and_refuses_to_overwrite(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "make_synthetic.py"), "--out", str(tmp_path),
           "--size", "48x64", "--train", "1", "--val", "1", "--test", "1", "--quiet"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert '"test": ["000002"]' in first.stdout
    assert (tmp_path / "000002_mask.png").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    bad = subprocess.run(cmd[:-1] + ["--size", "4"], capture_output=True, text=True)
    assert bad.returncode == 2


@pytest.mark.parametrize("index", range(4))
def test_small_objects_are_small_and_cover_the_stated_fraction(index):
    spec = SceneSpec(size=(256, 256), small_objects=(0.02, 0.05))
    image, labels = make_scene(11, index, spec)
    urban = (labels == URBAN).astype(np.uint8)
    assert 0.02 <= urban.mean() <= 0.05
    count, _, stats, _ = cv2.connectedComponentsWithStats(urban, connectivity=8)
    widths, heights = stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT]
    assert count > 5
    assert widths.min() >= 4 and heights.min() >= 4 and widths.max() <= 30 and heights.max() <= 30
    # Every object is a whole rectangle: nothing painted over it, no two merged.
    assert (stats[1:, cv2.CC_STAT_AREA] == widths * heights).all()


def test_small_objects_are_told_by_their_own_pixels():
    # A building's roof differs from its 1-2 px surroundings (a shadow or the ground), so a
    # full-resolution view can find it; no urban land units or islands give it away.
    spec = SceneSpec(size=(256, 256), small_objects=(0.02, 0.05))
    image, labels = make_scene(11, 0, spec)
    urban = labels == URBAN
    ring = cv2.dilate(urban.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & ~urban
    inside = image[:, urban].astype(float).mean(axis=1)
    around = image[:, ring].astype(float).mean(axis=1)
    assert np.abs(inside - around).max() > 20


def test_make_synthetic_small_objects_option(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic.py"), "--out",
                           str(tmp_path), "--size", "96", "--train", "1", "--val", "0", "--test", "0",
                           "--small-objects", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert '"small_objects": [0.02, 0.05]' in done.stdout


def test_make_synthetic_geotiff_option_writes_georeferenced_test_scenes(tmp_path):
    # The README's quick start predicts these: no DeepGlobe, no other tool needed.
    import rasterio

    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic.py"), "--out",
                           str(tmp_path), "--size", "48x64", "--train", "1", "--val", "0", "--test", "2",
                           "--geotiff", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "geotiff").iterdir()) == ["000001.tif", "000002.tif"]
    with rasterio.open(tmp_path / "geotiff" / "000002.tif") as src:
        assert src.crs.to_epsg() == 32633 and src.res == (0.5, 0.5) and (src.height, src.width) == (48, 64)
        pixels = src.read()
    # The scene's picture (JPEG decoders differ in chroma upsampling by a few levels).
    jpeg = cv2.imread(str(tmp_path / "000002_sat.jpg"))[..., ::-1].transpose(2, 0, 1)
    assert np.abs(pixels.astype(int) - jpeg).mean() < 6 and np.corrcoef(pixels.ravel(), jpeg.ravel())[0, 1] > 0.95


def test_make_demo_writes_where_out_says():
    import shutil

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry = subprocess.run(["make", "-n", "-C", str(REPO), "demo", "OUT=/tmp/somewhere else"],
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert 'scripts/demo.py --out "/tmp/somewhere else"' in dry.stdout
