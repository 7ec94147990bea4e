"""`magseg train` on tiny generated datasets: both phases learn, the CLI writes what it says,
the checkpoint holds everything predict needs."""

from __future__ import annotations

import dataclasses
import json

import magseg.cli.train  # noqa: F401  (registers the command)
import numpy as np
import pytest
import torch
import yaml
from magseg.cli.app import app
from test_datasets import CONFIGS_TINY, geotiff_config, make_deepglobe, make_geotiff
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from magseg.checkpoint import load_checkpoint
from magseg.config import config_from_dict
from magseg.data.scenes import list_scenes, read_scene
from magseg.engine.maps import MemoryMap
from magseg.engine.precision import resolved_engine
from magseg.engine.pyramid import CropBox, crop_boxes, crop_windows, resize
from magseg.engine.resample import TensorSource, resample_window, resample_windows
from magseg.engine.stages import StageRun, segment, stage_probs
from magseg.geometry import Rect
from magseg.segmenter import Segmenter, create_refiner, create_segmenter_model
from magseg.training.backbone_phase import backbone_loss
from magseg.training.batches import collate_backbone, collate_refiner
from magseg.training.refiner_phase import coarse_inputs, refiner_loss
from magseg.training.resume import seed_everything
from magseg.training.samples import BackboneSamples, RefinerSamples, load_scene
from magseg.training.state import RunPrecision
from magseg.training.trainer import TrainOptions, train

CPU = torch.device("cpu")


def small(config, **overrides):
    base = {"train.samples_per_epoch": 8, "train.batch_size": 4, "train.epochs": 1,
            "train.refiner_epochs": 1}
    return config.override({**base, **overrides})


class _Bar:
    """A progress bar that records what it was told."""

    def __init__(self, total, desc):
        self.total, self.desc, self.n, self.closed = total, desc, 0, False

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, text):
        pass

    def close(self):
        self.closed = True


def _steps(loss_fn, model, backbone, batches, config, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for batch in batches:
        loss, _ = loss_fn(model, backbone, batch, config, RunPrecision.resolve(config, CPU))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("layout", ["deepglobe", "geotiff"])
def test_backbone_loss_goes_down(tmp_path, tiny_config, layout):
    # Toy problem: a pixel's class is its colour. New windows every step (not one batch
    # learnt by heart), so a falling loss means the colour -> class rule is being learnt.
    if layout == "deepglobe":
        config = tiny_config.override({"data.mean": [80, 100, 100], "data.std": [80, 80, 80]})
        root = make_deepglobe(tmp_path, config)
    else:
        config = geotiff_config(tiny_config, bands=4).override(
            {"data.mean": [3200.0] * 4, "data.std": [3200.0] * 4})
        root = make_geotiff(tmp_path, config)
    scenes = list_scenes(config.data, "train", root)
    batches = DataLoader(BackboneSamples(scenes, config, 8 * 12, seed=0), batch_size=8,
                         collate_fn=collate_backbone)
    model = create_segmenter_model(config)
    losses = _steps(backbone_loss, model, model, batches, config)
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("points", [None, 0.25])
def test_refiner_loss_goes_down(tmp_path, tiny_config, points):
    # Dense and point-sampled training (the points change every step: the most uncertain).
    config = tiny_config.override({"data.mean": [80, 100, 100], "data.std": [80, 80, 80],
                                   "train.refiner_points": points})
    root = make_deepglobe(tmp_path, config)
    scenes = list_scenes(config.data, "train", root)
    backbone = create_segmenter_model(config)
    # A briefly trained backbone: its probabilities carry the colour signal the refiner uses.
    _steps(backbone_loss, backbone, backbone, DataLoader(BackboneSamples(scenes, config, 64, 1), 8,
                                                               collate_fn=collate_backbone), config)
    backbone.eval().requires_grad_(False).zero_grad(set_to_none=True)
    items = RefinerSamples(scenes, config, 8, seed=0)
    batch = collate_refiner([items[i] for i in range(len(items))])
    refiner = create_refiner(config)
    # Judged on the dense loss (every pixel), whatever the points trained on.
    dense = config.override({"train.refiner_points": None})
    start = float(refiner_loss(refiner, backbone, batch, dense, RunPrecision.resolve(dense, CPU))[0].detach())
    torch.manual_seed(0)
    losses = _steps(refiner_loss, refiner, backbone, [batch] * 10, config)
    end = float(refiner_loss(refiner, backbone, batch, dense, RunPrecision.resolve(dense, CPU))[0].detach())
    assert end < 0.9 * start, (start, end, losses)
    assert all(p.grad is None for p in backbone.parameters())  # frozen


def test_refiner_coarse_input_is_the_engines_stage_zero(tiny_config, tmp_path):
    # The coarse map the refiner trains on is what the engine's stage 0 computes:
    # segment() with a one-stage pyramid gives stage 0 upsampled to the image (crop by crop,
    # so the whole map upsampled at once agrees to float rounding).
    config = tiny_config
    backbone = create_segmenter_model(config).eval()
    image = torch.randn(3, 128, 128)
    y0 = stage_probs(backbone, resample_window(TensorSource(image), (32, 32), Rect(0, 0, 32, 32)), config.pyramid)
    want = segment(image, backbone, config.pyramid.downsample_only(), return_probs=True).probs
    torch.testing.assert_close(resample_window(TensorSource(y0), (128, 128), Rect(0, 0, 128, 128)), want)


@pytest.mark.parametrize("layout", ["deepglobe", "geotiff"])
def test_refiner_inputs_are_the_engines_crops(tmp_path, tiny_config, layout):
    # At the same box, the refiner trains on the engine's views, bit for bit: the fine
    # window as the engine resamples it at the stage (resample_windows; the engine's backbone
    # input is made from the source in one filter, training keeps two: docs/training.md),
    # the coarse view as StageRun.coarse
    # upsamples the engine's stage 0 (computed without coarse maps, which are float16).
    # The GeoTIFF scenes (96 x 112 for scales of a 128 scene) take non-integer factors.
    if layout == "deepglobe":
        config = tiny_config.override({"data.mean": [80, 100, 100], "data.std": [80, 80, 80]})
        root = make_deepglobe(tmp_path, config, counts=(("train", 1),))
    else:
        config = geotiff_config(tiny_config, bands=4).override(
            {"data.mean": [3200.0] * 4, "data.std": [3200.0] * 4})
        root = make_geotiff(tmp_path, config, counts=(("train", 1),))
    # Crops cut edge to edge (test_margins checks the grown windows against the engine's).
    config = config.override({"pyramid.margin": 0})
    scenes = list_scenes(config.data, "train", root)
    backbone = create_segmenter_model(config).eval().requires_grad_(False)
    items = RefinerSamples(scenes, config, 6, seed=0)
    batch = collate_refiner([items[i] for i in range(len(items))])
    got = coarse_inputs(backbone, batch, config, resolved_engine(config.engine, CPU))

    image, _ = load_scene(scenes[0], config)
    pyramid, source = config.pyramid, TensorSource(image)
    run = StageRun.create(backbone, pyramid, engine=config.engine)
    size0 = pyramid.stage_sizes(tuple(image.shape[-2:]))[0]
    y0, boxes = MemoryMap(size0), crop_boxes(size0, pyramid.crop)
    with torch.inference_mode():
        for start in range(0, len(boxes), config.engine.batch_size):
            run.first_stage(source, size0, boxes[start : start + config.engine.batch_size], y0)
    for i in range(len(items)):
        size = tuple(batch.size[i].tolist())
        top, left, h, w = batch.box[i].tolist()
        box = CropBox.whole(Rect(top, left, h, w))
        fine = resample_windows(source, size, crop_windows([box], pyramid.crop))[0]
        assert torch.equal(batch.fine[i], fine)
        assert torch.equal(got[i], run.coarse(y0, size, [box])[0])


def _run_cli(args):
    return CliRunner().invoke(app, ["train", *args])


def test_cli_trains_both_phases_and_checkpoint_is_self_contained(tmp_path, tiny_config):
    config = tiny_config
    data = make_deepglobe(tmp_path / "data", config)
    out = tmp_path / "run"
    # No on/off choice here: best.ckpt keeps the training config (the choice has its test).
    result = _run_cli(["-c", str(CONFIGS_TINY), "--data-root", str(data), "--out-dir", str(out),
                       "--epochs", "1", "--set", "train.samples_per_epoch=8", "--set", "data.mean=null",
                       "--set", "data.std=null", "--set", "train.refiner_choice=false", "-q"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    # One line per epoch, then the temperature fitted on validation (stored in best.ckpt).
    *records, calibration = records
    assert calibration["phase"] == "calibration" and calibration["temperature"] > 0
    assert [(r["phase"], r["epoch"]) for r in records] == [("backbone", 1), ("refiner", 1)]
    for r in records:
        assert {"loss", "val_miou", "seconds", "val_iou"} <= set(r)
        assert np.isfinite(r["loss"]) and 0 <= r["val_miou"] <= 1
        # DeepGlobe convention: 'unknown' (in_mean false) is in the matrix, not in the mean.
        ious = np.array([v if v is not None else np.nan for v in r["val_iou"]])
        assert r["val_miou"] == pytest.approx(np.nanmean(ious[1:]))
        assert r["val_pixels"] == 2 * 128 * 128
    # cache: the decoded scenes and the refiner's coarse maps (the default --cache-dir).
    assert sorted(p.name for p in out.iterdir()) == ["best.ckpt", "cache", "config.yaml", "last.ckpt",
                                                      "train.log"]
    assert sorted(p.name for p in (out / "cache").iterdir()) == ["coarse", "scenes"]
    log = (out / "train.log").read_text()
    assert "backbone epoch 1/1" in log and "refiner epoch 1/1" in log
    for r in records:  # the unit people read everywhere: %, one decimal (JSON keeps 0-1)
        assert f"val mIoU {100 * r['val_miou']:.1f}%" in log

    # One file, loadable without unpickling code, with the whole resolved config.
    raw = torch.load(out / "best.ckpt", map_location="cpu", weights_only=True)
    stored = config_from_dict(raw["config"])
    assert stored.classes == config.classes and stored.pyramid == config.pyramid
    assert stored.model == config.model and stored.data.bands == config.data.bands
    # The normalisation was computed from the training split (raw units) and stored.
    pixels = np.concatenate([read_scene(s, config)[0].reshape(3, -1)
                             for s in list_scenes(config.data, "train", data)], axis=1)
    np.testing.assert_allclose(stored.data.mean, pixels.mean(1), rtol=1e-9)
    np.testing.assert_allclose(stored.data.std, pixels.std(1), rtol=1e-6)
    assert yaml.safe_load((out / "config.yaml").read_text()) == raw["config"]
    assert raw["refiner"] is not None and raw["training"] is None
    assert load_checkpoint(out / "last.ckpt").training["phase"] == "refiner"

    # predict needs nothing but the checkpoint.
    segmenter = Segmenter.from_checkpoint(out / "best.ckpt")
    assert segmenter.refiner is not None
    scene = list_scenes(config.data, "val", data)[0]
    image, _ = read_scene(scene, config)
    labels = segmenter.segment(torch.from_numpy(image), normalized=False).labels
    assert labels.shape == (128, 128)


def test_phases_separately_on_geotiff(tmp_path, tiny_config):
    config = small(geotiff_config(tiny_config, bands=4), **{"data.bands": [4, 2, 1, 3]})
    data = make_geotiff(tmp_path / "data", config, bands=4, dtype="uint16")
    out = tmp_path / "run"
    first = train(config, TrainOptions(out=out, phase="backbone", data_root=data))
    assert [r["phase"] for r in first.records] == ["backbone"]
    assert load_checkpoint(out / "last.ckpt").refiner is None
    backbone_state = load_checkpoint(out / "best.ckpt").backbone
    # The refiner phase takes the backbone from best.ckpt and leaves it untouched; the
    # refiner's shape is free to change until it has weights.
    config = config.override({"refiner.channels": 4})
    second = train(config, TrainOptions(out=out, phase="refiner", data_root=data))
    assert [r["phase"] for r in second.records] == ["refiner"]
    ckpt = load_checkpoint(out / "last.ckpt")
    assert ckpt.refiner is not None and ckpt.config.refiner.channels == 4
    for key, value in backbone_state.items():
        assert torch.equal(ckpt.backbone[key], value), key
    # Band order and uint16 statistics are in the checkpoint (band 4 first).
    assert ckpt.config.data.bands == (4, 2, 1, 3)
    scene = list_scenes(config.data, "train", data)[0]
    image, _ = load_scene(scene, ckpt.config)
    assert image.shape[0] == 4 and abs(float(image.mean())) < 1.5


def test_fctl_trains_with_context_windows(tmp_path, tiny_config):
    # A multi-context backbone: every window comes with its context windows, cut by the
    # engine's backbone_inputs and moved by the same augmentation as the window.
    config = small(tiny_config, **{
        "model.arch": "fctl",
        "model.kwargs": {"decoder": "Unet", "contexts": [2], "key_channels": 8,
                         "decoder_channels": [16, 16, 16, 16, 16]},
        "pyramid.margin": 0,  # crop-sized windows, so the context's centre half is the crop
    })
    data = make_deepglobe(tmp_path / "data", config, counts=(("train", 2), ("val", 1)))
    scenes = list_scenes(config.data, "train", data)
    item = BackboneSamples(scenes, config, 4, seed=0, ratios=(2.0,))[1]
    image, contexts = item.image, item.contexts
    assert contexts.shape == (1, 3, 32, 32)
    plain = BackboneSamples(scenes, config, 4, seed=0, augment=False, ratios=(2.0,))[1]
    # The context's centre half is the window itself (at half the resolution), before and
    # after augmentation.
    for img, ctx in ((plain.image, plain.contexts[0]), (image, contexts[0])):
        centre, small_img = ctx[:, 8:24, 8:24].flatten(), resize(img, (16, 16)).flatten()
        assert torch.corrcoef(torch.stack([centre, small_img]))[0, 1] > 0.98
        assert (centre - small_img).abs().mean() < 0.05
    result = train(config, TrainOptions(out=tmp_path / "run", data_root=data))
    assert [r["phase"] for r in result.records] == ["backbone", "refiner"]
    segmenter = Segmenter.from_checkpoint(tmp_path / "run" / "best.ckpt")
    assert segmenter.segment(torch.zeros(3, 64, 64)).labels.shape == (64, 64)


def test_channels_last_training_learns_the_same_weights_and_stores_the_standard_layout(tmp_path, tiny_config):
    # train.channels_last trains the backbone in NHWC. The layout must not change what is
    # learnt, only how fast, and the checkpoint holds plain contiguous tensors either way, so
    # a checkpoint does not depend on the layout it was trained in.
    # Crop-sized windows: the tolerance below was set for the 32 px input (the default margin
    # grows it to 40, with more rounding for Adam to amplify).
    config = small(tiny_config, **{"train.epochs": 2, "train.val_every": 100, "pyramid.margin": 0})
    data = make_deepglobe(tmp_path / "data", config)
    states = {}
    for channels_last in (False, True):
        out = tmp_path / f"run_{channels_last}"
        run = config.override({"train.channels_last": channels_last})
        train(run, TrainOptions(out=out, phase="backbone", data_root=data))
        states[channels_last] = load_checkpoint(out / "last.ckpt").backbone
    convs = [k for k, v in states[True].items() if v.dim() == 4]
    assert convs
    for key, value in states[True].items():
        assert value.is_contiguous(), key
        # Float rounding differs between the layouts' kernels, and Adam turns gradients at
        # rounding level into steps of up to lr: 7e-5 at most here, over 4 steps.
        torch.testing.assert_close(value, states[False][key], rtol=1e-3, atol=2e-4, msg=key)
    # Training moved the weights several times further than that tolerance (so the comparison
    # above compared something).
    seed_everything(config.train.seed)  # the trainer's initial weights
    init = create_segmenter_model(config, pretrained=False).state_dict()
    moved = max(float((init[k] - states[True][k]).abs().max()) for k in convs)
    assert moved > 1e-3, moved


def test_training_stores_the_refiner_on_off_choice(tmp_path, tiny_config):
    # A refiner trained with a zero learning rate is still the identity: without it the
    # validation mIoU is the same, so the choice is "off" (the simpler model), stored in
    # best.ckpt's config; predict follows it and --set refiner.enabled=true overrides it.
    config = small(tiny_config, **{"train.refiner_lr": 0.0, "train.weight_decay": 0.0,
                                   "train.epochs": 2})
    data = make_deepglobe(tmp_path / "data", config)
    out = tmp_path / "run"
    bars = []
    result = train(config, TrainOptions(out=out, data_root=data,
                                        progress=lambda total, desc: bars.append(_Bar(total, desc)) or bars[-1]))
    # One bar for the whole run (2 backbone + 1 refiner epochs), one for the sweep after it
    # (K, patch-only's K = 1 among them, and refiner on/off: each candidate is validated
    # window by window for the bootstrap), each run to its end.
    overall = next(b for b in bars if b.desc == "training")
    assert overall.total == 3 and overall.n == 3 and overall.closed
    sweep = [b for b in bars if b.desc == "refinement sweep"]
    ks = sorted({*config.train.choose_k, config.refine.points, 1.0})
    assert len(sweep) == 1 and sweep[0].total == 2 * len(ks) * 2  # 2 validation scenes
    assert sweep[0].n == sweep[0].total and sweep[0].closed
    assert not [b for b in bars if b.desc.startswith("validation, K=")]
    choice = result.refiner_choice
    assert choice is not None and choice["enabled"] is False
    assert choice["val_miou_no_refiner"] == pytest.approx(choice["val_miou_refiner"])
    best = load_checkpoint(out / "best.ckpt")
    assert best.config.refiner.enabled is False and best.refiner is not None
    assert best.meta["refiner_choice"] == choice
    assert load_checkpoint(out / "last.ckpt").config.refiner.enabled is True  # for --resume
    assert Segmenter.from_checkpoint(out / "best.ckpt").refiner is None
    assert Segmenter.from_checkpoint(out / "best.ckpt", ["refiner.enabled=true"]).refiner is not None
    # The stored choice does not stop a later refiner phase on the same --out.
    again = train(config.override({"train.refiner_choice": False}),
                  TrainOptions(out=out, phase="refiner", data_root=data))
    assert [r["phase"] for r in again.records] == ["refiner"]


def test_training_chooses_k_on_validation_and_never_loses_to_patch_only(tmp_path, tiny_config):
    # After the refiner phase every K of train.choose_k is validated with and without the
    # refiner. K = 1 without the refiner is exactly patch-only (the engine's invariant), the
    # baseline kept unless a candidate beats it by more than the bootstrap noise
    # (magseg.training.choice), so the chosen pair is never below patch-only on validation.
    config = small(tiny_config, **{"train.choose_k": [0.25, 1.0], "refine.points": 0.5})
    data = make_deepglobe(tmp_path / "data", config)
    records = []
    result = train(config, TrainOptions(out=tmp_path / "run", data_root=data, on_epoch=records.append))
    choice = result.refiner_choice
    sweep = {(s["refiner"], s["k"]): s["val_miou"] for s in choice["sweep"]}
    assert set(sweep) == {(on, k) for on in (True, False) for k in (0.25, 0.5, 1.0)}
    passing = [s["val_miou"] for s in choice["sweep"] if s["beats_noise"]]
    assert choice["val_miou"] == (max(passing) if passing else sweep[(False, 1.0)])
    assert all(len(s["interval"]) == 2 for s in choice["sweep"])
    best = load_checkpoint(tmp_path / "run" / "best.ckpt")
    assert (best.config.refine.points, best.config.refiner.enabled) == (choice["points"], choice["enabled"])
    [chosen] = [r for r in records if "choice" in r]
    assert chosen["choice"]["points"] == choice["points"] and chosen["sweep"] == choice["sweep"]
    # Then the temperature, fitted on validation and stored in best.ckpt.
    assert records[-1]["phase"] == "calibration" and best.calibration == result.calibration
    assert best.temperature == result.calibration["temperature"] != 1.0
    assert result.calibration["val_ece_after"] <= result.calibration["val_ece_before"]

    from magseg.data.scenes import list_scenes
    from magseg.training.distributed import World
    from magseg.training.validation import validate

    val = list_scenes(best.config.data, "val", data)
    segmenter = Segmenter.from_checkpoint(tmp_path / "run" / "best.ckpt")
    patch = validate(dataclasses.replace(best.config, pyramid=best.config.pyramid.patch_only()), val,
                     segmenter.backbone, None, World(), resolved_engine(best.config.engine, CPU)).miou
    chosen = validate(best.config, val, segmenter.backbone, segmenter.refiner, World(),
                      resolved_engine(best.config.engine, CPU)).miou
    assert chosen == pytest.approx(choice["val_miou"])
    assert chosen >= patch - 0.002
