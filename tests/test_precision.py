"""Every precision runs on every CPU: what ``auto`` resolves to, the autocast each choice
enters, end-to-end segmentation, predict and training at fp32, bf16 and fp16, and the
records and reports that say which one ran.

A CPU without native bf16 or fp16 emulates them: slower, and rounded differently (an
AVX2-only CPU's emulated bf16 is not AVX512-BF16's native one, nor AVX512 forced to AVX2
kernels), so these tests compare with fp32 only through bounds that hold for either.
"""

from __future__ import annotations

import json

import magseg.cli.benchmark  # noqa: F401
import magseg.cli.predict  # noqa: F401  (registers the command)
import numpy as np
import pytest
import torch
from geotiff import smooth_image, write_raster
from magseg.cli.app import app
from test_datasets import make_deepglobe
from torch import nn
from typer.testing import CliRunner

from magseg.checkpoint import load_checkpoint
from synthetic import DEEPGLOBE_CLASSES_OVERRIDE, SceneSpec, write_dataset
from magseg.engine import precision
from magseg.engine.precision import cpu_info, precision_context, resolve_precision, runtime_info
from magseg.run.predict import predict_raster
from magseg.segmenter import Segmenter, create_segmenter_model
from magseg.training.resume import seed_everything
from magseg.training.trainer import TrainOptions, train

PRECISIONS = ["fp32", "bf16", "fp16"]


@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16"), (True, True, "bf16"),
])
def test_auto_is_bf16_only_on_a_cpu_that_computes_it_natively(monkeypatch, avx512_bf16, amx, expected):
    flags = {"_is_avx512_bf16_supported": avx512_bf16, "_is_amx_tile_supported": amx}
    monkeypatch.setattr(precision, "_cpu_supports", lambda probe: flags[probe])
    assert resolve_precision(torch.device("cpu"), "auto") == expected
    assert resolve_precision("cuda", "auto") == "fp16"  # whatever the CPU
    for choice in PRECISIONS:
        assert resolve_precision("cpu", choice) == choice


def test_the_precision_flags_are_the_cpus_own_in_a_fixed_order(monkeypatch):
    # An AVX2 EPYC, and a Sapphire Rapids-class Xeon listing its flags in another order with
    # others between: each keeps only what decides bf16 and int8 kernels, in one order.
    epyc = ["fma", "avx2", "sse4_2", "avx"]
    xeon = ["amx_int8", "avx512_vnni", "amx_tile", "avx512f", "avx2", "avx512_bf16", "sha_ni",
            "amx_bf16", "avx_vnni", "avx512_fp16", "avx512vl"]
    for flags, expected in ((epyc, ["avx2"]), ([], []),
                            (xeon, ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni",
                                    "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"])):
        monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
        assert precision.precision_flags() == expected


@pytest.mark.parametrize("probe, flags, expected", [
    (True, [], True),                                # torch's probe: AVX512-VNNI
    (False, ["avx2", "avx_vnni"], True),             # a client CPU's AVX-VNNI, which torch does not probe
    (False, ["avx512f", "amx_int8"], True),
    (False, ["avx2", "avx512f", "avx512bw"], False),  # AVX512 without VNNI sums pairs in int16 too
    (False, [], False),
])
def test_vnni_is_any_int8_dot_product_that_sums_in_32_bits(monkeypatch, probe, flags, expected):
    monkeypatch.setattr(precision, "_cpu_supports", lambda name: probe and name == "_is_vnni_supported")
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    assert precision.cpu_has_vnni() is expected


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="fp8.*fp32, bf16, fp16"):
        resolve_precision("cpu", "fp8")


@pytest.mark.parametrize("choice, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                           ("fp16", torch.float16)])
def test_each_precision_runs_a_convolution_in_its_own_dtype(choice, dtype):
    conv = nn.Conv2d(3, 4, 3)
    with precision_context("cpu", choice):
        assert torch.is_autocast_enabled("cpu") == (choice != "fp32")
        out = conv(torch.randn(1, 3, 8, 8))
    assert out.dtype == dtype
    assert not torch.is_autocast_enabled("cpu")


@pytest.fixture(scope="module")
def fp32_labels(fitted_checkpoint):
    """The fitted model's fp32 labels of three images of odd sizes: the reference."""
    segmenter = Segmenter.from_checkpoint(fitted_checkpoint, ["engine.precision=fp32"])
    images = [smooth_image(3, h, w, seed=s) for s, (h, w) in enumerate([(64, 64), (90, 130), (150, 170)])]
    return images, [segmenter.segment(segmenter.normalize(i)).labels for i in images]


@pytest.mark.parametrize("choice", PRECISIONS)
def test_each_precision_agrees_with_fp32_labels(fitted_checkpoint, fp32_labels, choice):
    # bf16 keeps 8 bits of mantissa: labels may flip only where two classes are within
    # rounding of each other, a thin line along class boundaries.
    segmenter = Segmenter.from_checkpoint(fitted_checkpoint, [f"engine.precision={choice}"])
    images, references = fp32_labels
    agree = total = 0
    for image, reference in zip(images, references):
        labels = segmenter.segment(segmenter.normalize(image)).labels
        assert labels.dtype == torch.uint8 and labels.shape == reference.shape
        assert int(labels.max()) < segmenter.num_classes
        agree += int((labels == reference).sum())
        total += reference.numel()
    assert agree / total >= 0.99, (choice, agree / total)
    if choice == "fp32":
        assert agree == total  # the same precision twice is the same answer


@pytest.mark.parametrize("choice", PRECISIONS)
def test_predict_at_each_precision_names_it_in_its_record(tmp_path, fitted_checkpoint, choice):
    path = write_raster(tmp_path / "scene.tif", smooth_image(3, 100, 120, seed=3))
    result = CliRunner().invoke(app, ["predict", str(fitted_checkpoint), str(path), "-o",
                                      str(tmp_path / "out"), "--set", f"engine.precision={choice}"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[0])
    assert record["status"] == "ok"
    assert record["device"] == "cpu" and record["precision"] == choice
    cpu = record["cpu"]
    assert cpu["model"] and cpu["capability"] and isinstance(cpu["avx512_bf16"], bool)
    assert isinstance(cpu["amx"], bool) and cpu["threads"] >= 1


def test_auto_is_recorded_as_what_it_resolved_to(tmp_path, fitted_checkpoint):
    segmenter = Segmenter.from_checkpoint(fitted_checkpoint, ["engine.precision=auto"])
    path = write_raster(tmp_path / "scene.tif", smooth_image(3, 40, 50))
    record = predict_raster(segmenter, path, tmp_path / "out").to_record()
    assert record["precision"] == resolve_precision("cpu", "auto") != "auto"
    assert record == {**record, **runtime_info("cpu", "auto")}


@pytest.mark.parametrize("choice", PRECISIONS)
def test_training_at_each_precision_learns_and_keeps_fp32_checkpoints(tmp_path, tiny_config, choice):
    config = tiny_config.override({
        "data.mean": [80, 100, 100], "data.std": [80, 80, 80], "train.samples_per_epoch": 16,
        "train.batch_size": 4, "train.epochs": 2, "train.refiner_epochs": 1, "train.val_every": 100,
        "train.precision": choice,
    })
    data = make_deepglobe(tmp_path / "data", config)
    result = train(config, TrainOptions(out=tmp_path / "run", data_root=data))
    losses = [r["loss"] for r in result.records]
    assert all(np.isfinite(losses)) and {r["precision"] for r in result.records} == {choice}
    ckpt = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert ckpt.config.train.precision == choice
    for name, tensor in [*ckpt.backbone.items(), *ckpt.refiner.items()]:
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name
            assert torch.isfinite(tensor).all(), name
    # The weights moved: the step ran through autocast (and fp16's loss scaler) into the
    # fp32 parameters.
    seed_everything(config.train.seed)  # the trainer's initial weights
    fresh = create_segmenter_model(config, pretrained=False).state_dict()
    assert max(float((fresh[k] - v).abs().max()) for k, v in ckpt.backbone.items()
               if v.is_floating_point() and v.dim() == 4) > 1e-4


def test_benchmark_report_names_the_resolved_precision_and_the_cpu(tmp_path, make_checkpoint):
    root = tmp_path / "data"
    write_dataset(root, {"train": 1, "test": 1}, SceneSpec(size=(128, 128)), seed=4)
    ckpt = make_checkpoint(DEEPGLOBE_CLASSES_OVERRIDE)
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["benchmark", str(ckpt), "--data-root", str(root), "--out-dir", str(out),
                                      "--no-warmup", "--set", "engine.precision=bf16"])
    assert result.exit_code == 0, result.output
    env = json.loads((out / "report.json").read_text())["environment"]
    assert env["device"] == "cpu" and env["precision"] == "bf16"
    assert env["cpu"] == {**cpu_info(), "threads": env["cpu"]["threads"]}
    markdown = (out / "report.md").read_text()
    assert "precision bf16" in markdown and cpu_info()["model"] in markdown


def _autocast_seen(module: nn.Module, seen: list) -> None:
    """Record, at each forward of ``module``, the CPU autocast dtype it runs under (None: none)."""
    def hook(_module, _inputs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
    module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("train_precision, engine_precision", [("bf16", "fp32"), ("fp32", "bf16"),
                                                               ("fp16", "bf16")])
def test_in_training_the_engine_runs_at_its_precision_and_the_trained_module_at_train_precision(
        tmp_path, tiny_config, train_precision, engine_precision):
    # The rule of docs/precision.md#training-and-the-engine: the frozen backbone computes the
    # refiner's inputs at engine.precision, as predict does, outside the training autocast;
    # the module being trained runs at train.precision. Neither silently overrides the other.
    from magseg.data.scenes import list_scenes
    from magseg.segmenter import create_refiner
    from magseg.training.backbone_phase import backbone_loss
    from magseg.training.batches import collate_backbone, collate_refiner
    from magseg.training.refiner_phase import refiner_loss
    from magseg.training.samples import BackboneSamples, RefinerSamples
    from magseg.training.state import RunPrecision

    config = tiny_config.override({"train.precision": train_precision, "engine.precision": engine_precision})
    scenes = list_scenes(config.data, "train", make_deepglobe(tmp_path / "data", config))
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    run = RunPrecision.resolve(config, torch.device("cpu"))
    assert (run.train, run.engine.precision) == (train_precision, engine_precision)

    backbone, refiner = create_segmenter_model(config).eval(), create_refiner(config)
    backbone_seen, refiner_seen = [], []
    _autocast_seen(backbone, backbone_seen)
    _autocast_seen(refiner, refiner_seen)
    items = RefinerSamples(scenes, config, 2, seed=0)
    refiner_loss(refiner, backbone, collate_refiner([items[0], items[1]]), config, run)
    assert refiner_seen == [dtypes[train_precision]]
    assert backbone_seen and set(backbone_seen) == {dtypes[engine_precision]}

    # The backbone phase trains the backbone: train.precision.
    backbone_seen.clear()
    samples = BackboneSamples(scenes, config, 2, seed=0)
    backbone_loss(backbone, backbone, collate_backbone([samples[0], samples[1]]), config, run)
    assert backbone_seen == [dtypes[train_precision]]


def test_a_training_run_resolves_auto_once(tmp_path, tiny_config, monkeypatch):
    # engine.precision auto: the hardware is asked once per run, not once per crop batch of
    # every validation, coarse map and refiner step.
    calls = []
    probe = precision.cpu_has_native_bf16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: calls.append(1) or probe())
    config = tiny_config.override({"engine.precision": "auto", "train.samples_per_epoch": 8,
                                   "train.choose_k": [0.25]})
    data = make_deepglobe(tmp_path / "data", config)
    result = train(config, TrainOptions(out=tmp_path / "run", data_root=data))
    assert [r["phase"] for r in result.records] == ["backbone", "refiner"]
    assert result.calibration is not None and result.refiner_choice is not None
    assert len(calls) == 1
