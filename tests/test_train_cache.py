"""The scene cache and the refiner's coarse maps: hits, misses, invalidation, failures that
leave nothing behind, and coarse inputs equal to the ones computed on the fly; the loader's
worker count for ``train.num_workers: auto``."""

from __future__ import annotations

import errno
import os

import magseg.cli.train  # noqa: F401  (registers the command)
import numpy as np
import pytest
import torch
from magseg.cli.app import app
from test_datasets import CONFIGS_TINY, make_deepglobe
from typer.testing import CliRunner

import magseg
from magseg.data import cache as cache_module
from magseg.data.cache import SceneCache
from magseg.data.scenes import list_scenes, read_scene
from magseg.engine.precision import resolved_engine
from magseg.errors import WriteError
from magseg.segmenter import create_segmenter_model
from magseg.training.batches import collate_refiner
from magseg.training.coarse import prepare_coarse_maps
from magseg.training.loader import (
    MAX_AUTO_WORKERS,
    loader_options,
    lower_priority,
    phase_workers,
    resolve_workers,
)
from magseg.training.refiner_phase import coarse_inputs
from magseg.training.samples import RefinerSamples

CPU = torch.device("cpu")


@pytest.fixture
def data(tmp_path, tiny_config):
    config = tiny_config.override({"data.mean": [90.0, 100.0, 110.0], "data.std": [50.0, 60.0, 70.0]})
    root = make_deepglobe(tmp_path / "data", config, counts=(("train", 3), ("val", 1)))
    return config, list_scenes(config.data, "train", root)


def _decodes(monkeypatch):
    """Count the scenes decoded (each a cache miss)."""
    calls = []
    original = read_scene

    def counting(scene, config):
        calls.append(scene.id)
        return original(scene, config)

    monkeypatch.setattr("magseg.data.scenes.read_scene", counting)
    return calls


def _entries(root):
    return sorted((root / "scenes").glob("*.npy"))


def test_scene_cache_hit_miss_and_invalidation(tmp_path, data, monkeypatch):
    config, scenes = data
    decodes = _decodes(monkeypatch)
    cache = SceneCache(tmp_path / "c", config)
    image, mask = cache.load(scenes[0])
    want_image, want_mask = read_scene(scenes[0], config)
    decodes.clear()
    assert np.array_equal(image, want_image) and np.array_equal(mask, want_mask)
    assert isinstance(image.base, np.memmap) or isinstance(image, np.memmap)  # memory-mapped

    cache.load(scenes[0])
    SceneCache(tmp_path / "c", config).load(scenes[0])  # another run, same files: a hit
    assert decodes == []

    # A rewritten image (other bytes, other mtime) and a replaced mask: misses, rebuilt.
    path = scenes[0].image
    path.write_bytes(scenes[1].image.read_bytes())
    os.utime(path, ns=(1, 1))
    image, _ = cache.load(scenes[0])
    assert decodes == [scenes[0].id]
    assert np.array_equal(image, read_scene(scenes[1], config)[0])
    os.utime(scenes[0].mask, ns=(2, 2))  # same size, new mtime
    cache.load(scenes[0])
    assert decodes[1:] == [scenes[0].id]
    assert len(_entries(tmp_path / "c")) == 1  # the stale entries of that scene are gone


def test_cache_from_another_version_or_config_is_rebuilt(tmp_path, data, monkeypatch):
    config, scenes = data
    decodes = _decodes(monkeypatch)
    SceneCache(tmp_path / "c", config).load(scenes[0])
    monkeypatch.setattr(magseg, "__version__", "999.0")
    SceneCache(tmp_path / "c", config).load(scenes[0])
    # Other colours for a class: the same mask file decodes to other ids.
    classes = [dict(id=c.id, name=c.name, color=list(c.color), in_mean=c.in_mean) for c in config.classes]
    classes[2]["color"], classes[3]["color"] = classes[3]["color"], classes[2]["color"]
    swapped = config.override({"classes": classes})
    _, mask = SceneCache(tmp_path / "c", swapped).load(scenes[0])
    assert decodes == [scenes[0].id] * 3
    assert np.array_equal(mask, read_scene(scenes[0], swapped)[1])


def test_a_corrupt_entry_is_rebuilt(tmp_path, data, monkeypatch):
    config, scenes = data
    cache = SceneCache(tmp_path / "c", config)
    cache.load(scenes[0])
    (entry,) = _entries(tmp_path / "c")
    entry.write_bytes(entry.read_bytes()[:1000])  # truncated (not by magseg: it renames)
    decodes = _decodes(monkeypatch)
    image, _ = SceneCache(tmp_path / "c", config).load(scenes[0])  # a later run
    assert decodes == [scenes[0].id] and image.shape == (3, 128, 128)


def test_a_failed_write_leaves_no_entry_and_says_why(tmp_path, data, monkeypatch):
    config, scenes = data

    def full(file, array, *args, **kwargs):
        file.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module.np, "save", full)
    with pytest.raises(WriteError, match="disk is full") as info:
        SceneCache(tmp_path / "c", config).load(scenes[0])
    assert "scene cache entry of" in str(info.value)
    assert _entries(tmp_path / "c") == []
    assert not [p for p in (tmp_path / "c" / "scenes").iterdir() if p.name.endswith(".partial")]


def test_cli_full_disk_while_caching_exits_1_without_a_traceback(tmp_path, data, monkeypatch):
    config, scenes = data

    def full(file, array, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module.np, "save", full)
    result = CliRunner().invoke(app, ["train", "-c", str(CONFIGS_TINY), "--data-root",
                                      str(scenes[0].image.parent), "-o", str(tmp_path / "run"),
                                      "--cache-dir", str(tmp_path / "c"), "--epochs", "1", "-q"])
    assert result.exit_code == 1, result.output
    assert "disk is full" in result.output and "Traceback" not in result.output
    assert _entries(tmp_path / "c") == []


def test_concurrent_writers_publish_one_complete_entry(tmp_path, data, monkeypatch):
    # Two processes building one entry: the lock makes the second wait, then read the
    # first one's file instead of decoding again (here: threads, each with its own fd).
    import threading

    config, scenes = data
    decodes = _decodes(monkeypatch)
    results = []
    threads = [threading.Thread(target=lambda: results.append(SceneCache(tmp_path / "c", config)
                                                              .load(scenes[0])[0].sum()))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(int(r) for r in results)) == 1 and len(results) == 4
    assert decodes == [scenes[0].id]
    assert len(_entries(tmp_path / "c")) == 1


def test_cached_coarse_maps_give_the_refiner_the_same_inputs(tmp_path, data):
    # float16 storage: stage-0 probabilities within 2**-12 of the float32 ones; bilinear
    # upsampling is a convex combination, so the coarse input is within that too.
    config, scenes = data
    engine = resolved_engine(config.engine, CPU)
    backbone = create_segmenter_model(config).eval().requires_grad_(False)
    cache = SceneCache(tmp_path / "c", config)
    maps = prepare_coarse_maps(backbone, scenes, config, tmp_path / "c", engine, cache=cache)
    plain = RefinerSamples(scenes, config, 12, seed=1)
    cached = RefinerSamples(scenes, config, 12, seed=1, cache=cache, coarse=maps)
    a = collate_refiner([plain[i] for i in range(12)])
    b = collate_refiner([cached[i] for i in range(12)])
    assert a.coarse is None and a.scene0 is not None and b.scene0 is None and b.coarse is not None
    for key in ("fine", "mask", "size", "box"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    want, got = coarse_inputs(backbone, a, config, engine), coarse_inputs(backbone, b, config, engine)
    torch.testing.assert_close(got, want, rtol=0, atol=2**-12)
    assert len(list(maps.directory.glob("*.npy"))) == len(scenes)

    # Same weights: the maps are found again; other weights: new maps.
    again = prepare_coarse_maps(backbone, scenes, config, tmp_path / "c", engine, cache=cache)
    assert again.directory == maps.directory
    with torch.no_grad():
        next(backbone.parameters()).add_(1.0)
    other = prepare_coarse_maps(backbone, scenes, config, tmp_path / "c", engine, cache=cache)
    assert other.directory != maps.directory


@pytest.mark.parametrize("cores,ranks,want", [(1, 1, 0), (2, 1, 1), (4, 1, 3), (64, 1, MAX_AUTO_WORKERS),
                                              (16, 2, 7), (2, 2, 0)])
def test_num_workers_auto(cores, ranks, want):
    assert resolve_workers("auto", cores=cores, local_ranks=ranks) == want
    assert resolve_workers(3, cores=cores, local_ranks=ranks) == 3


@pytest.mark.parametrize("cores,device,phase,want", [
    (2, "cpu", "refiner", 0), (2, "cpu", "backbone", 1), (2, "cuda", "refiner", 1),
    (4, "cpu", "refiner", 3), (1, "cpu", "refiner", 0),
])
def test_the_refiner_phase_loads_in_the_loop_where_auto_leaves_one_worker(cores, device, phase, want):
    assert phase_workers("auto", phase, torch.device(device), cores=cores, local_ranks=1) == want
    assert phase_workers(1, phase, torch.device(device), cores=cores, local_ranks=1) == 1  # as asked


def test_loader_options_follow_the_device_and_workers():
    assert loader_options(0, CPU) == {"num_workers": 0, "pin_memory": False}
    options = loader_options(2, torch.device("cuda"))
    assert options["pin_memory"] and options["persistent_workers"] and options["prefetch_factor"] >= 2
    assert options["worker_init_fn"] is lower_priority


def test_num_workers_config(tiny_config):
    from magseg.config import load_config
    from magseg.errors import ConfigError

    assert tiny_config.train.num_workers == "auto"
    assert load_config(CONFIGS_TINY, ["train.num_workers=2"]).train.num_workers == 2
    for bad in ("-1", "many"):
        with pytest.raises(ConfigError, match="num_workers"):
            load_config(CONFIGS_TINY, [f"train.num_workers={bad}"])


def test_a_bad_sample_in_a_worker_fails_as_in_the_loop(tmp_path, tiny_config):
    # A mask id only the second scene has (the first one's are checked before training):
    # found in a DataLoader worker, reported as the worker raised it, without its traceback.
    import rasterio
    from test_datasets import geotiff_config, make_geotiff

    from magseg.errors import DataError
    from magseg.training.trainer import TrainOptions, train

    config = geotiff_config(tiny_config, bands=4).override({
        "train.num_workers": 1, "train.epochs": 1, "train.refiner_epochs": 0,
        "train.samples_per_epoch": 8})
    root = make_geotiff(tmp_path / "data", config, counts=(("train", 2), ("val", 1)))
    mask_path = sorted((root / "masks").glob("*.tif"))[1]
    with rasterio.open(mask_path, "r+") as dst:
        dst.write(np.full((1, dst.height, dst.width), 9, dtype=dst.dtypes[0]))
    with pytest.raises(DataError) as info:
        train(config, TrainOptions(out=tmp_path / "run", data_root=root))
    assert str(info.value).startswith(f"{mask_path}: mask has class ids [9]")
    assert "Traceback" not in str(info.value) and "DataLoader" not in str(info.value)


def test_batches_are_pinned_field_by_field(monkeypatch):
    # On CUDA the loader pins each batch (loader_options: pin_memory) through the batch's own
    # pin_memory(): every tensor, each of a list's, None left as it is. Pinning needs a GPU,
    # so a pinned tensor is stood in for by a marked copy.
    from torch.utils.data._utils.pin_memory import pin_memory

    from magseg.training.batches import BackboneBatch, RefinerBatch

    pinned = set()

    def fake_pin(self):
        copy = self.clone()
        pinned.add(id(copy))
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = BackboneBatch(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    out = pin_memory(batch)
    assert type(out) is BackboneBatch and out.contexts is None
    assert id(out.image) in pinned and id(out.mask) in pinned and torch.equal(out.image, batch.image)
    refiner = RefinerBatch(*(torch.ones(2, 3) for _ in range(5)), scene0=[torch.ones(3, 8, 8), torch.ones(3, 6, 6)])
    out = pin_memory(refiner)
    assert type(out) is RefinerBatch and out.coarse is None and out.contexts is None
    assert all(id(t) in pinned for t in (out.fine, out.offset, out.mask, out.size, out.box, *out.scene0))
    assert [tuple(t.shape) for t in out.scene0] == [(3, 8, 8), (3, 6, 6)]
