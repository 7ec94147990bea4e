"""The engine, predict and training on a CUDA device, against the CPU's fp32 answers.

Marked ``cuda`` and skipped without a CUDA device; ``scripts/gpu_check.sh`` runs them (with
the demo benchmark and the engine benchmark) on a machine that has one.
"""

from __future__ import annotations

import json

import magseg.cli.predict  # noqa: F401  (registers the command)
import numpy as np
import pytest
import torch
from geotiff import smooth_image, write_raster
from magseg.cli.app import app
from test_datasets import make_deepglobe
from typer.testing import CliRunner

from magseg.checkpoint import load_checkpoint
from magseg.segmenter import Segmenter
from magseg.training.trainer import TrainOptions, train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


def _labels(checkpoint, device, precision, images):
    segmenter = Segmenter.from_checkpoint(checkpoint, [f"engine.device={device}",
                                                       f"engine.precision={precision}"])
    return [segmenter.segment(segmenter.normalize(i)).labels for i in images]


@pytest.mark.parametrize("precision, agreement", [("fp32", 0.999), ("fp16", 0.99), ("bf16", 0.99)])
def test_cuda_labels_agree_with_the_cpus_fp32_labels(fitted_checkpoint, precision, agreement):
    # cuDNN's kernels round differently from the CPU's even at fp32 (and may use TF32):
    # compare by agreement, as the CPU precision tests do.
    images = [smooth_image(3, h, w, seed=s) for s, (h, w) in enumerate([(64, 64), (150, 170)])]
    reference = _labels(fitted_checkpoint, "cpu", "fp32", images)
    labels = _labels(fitted_checkpoint, "cuda", precision, images)
    agree = sum(int((a == b).sum()) for a, b in zip(labels, reference))
    total = sum(r.numel() for r in reference)
    assert all(lab.device.type == "cpu" and lab.dtype == torch.uint8 for lab in labels)
    assert agree / total >= agreement, agree / total


def test_predict_on_cuda_names_the_gpu_and_precision(tmp_path, fitted_checkpoint):
    path = write_raster(tmp_path / "scene.tif", smooth_image(3, 100, 120, seed=3))
    result = CliRunner().invoke(app, ["predict", str(fitted_checkpoint), str(path), "-o",
                                      str(tmp_path / "out"), "--device", "cuda"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[0])
    assert record["status"] == "ok" and record["device"].startswith("cuda")
    assert record["precision"] == "fp16" and record["gpu"] == torch.cuda.get_device_name(0)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_training_on_cuda_at_each_precision(tmp_path, tiny_config, precision):
    config = tiny_config.override({
        "data.mean": [80, 100, 100], "data.std": [80, 80, 80], "train.samples_per_epoch": 16,
        "train.batch_size": 4, "train.epochs": 1, "train.refiner_epochs": 1,
        "engine.device": "cuda", "train.precision": precision,
    })
    data = make_deepglobe(tmp_path / "data", config)
    result = train(config, TrainOptions(out=tmp_path / "run", data_root=data))
    assert all(np.isfinite(r["loss"]) for r in result.records)
    ckpt = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert all(t.device.type == "cpu" and (not t.is_floating_point() or t.dtype == torch.float32)
               for t in ckpt.backbone.values())


def test_the_local_crf_on_cuda_agrees_with_the_cpu(fitted_checkpoint):
    # The CRF's kernels and mean-field steps are plain tensor arithmetic: the same marginals
    # on the GPU up to float rounding (exp, sums in another order).
    from magseg.config import CrfConfig
    from magseg.engine.crf import local_crf

    gen = torch.Generator().manual_seed(0)
    probs = torch.rand((2, 5, 70, 90), generator=gen).softmax(1)
    image = torch.rand((2, 3, 70, 90), generator=gen) * 40
    cfg = CrfConfig(enabled=True)
    cpu = local_crf(probs, image, cfg)
    gpu = local_crf(probs.cuda(), image.cuda(), cfg).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)
    segmenter = Segmenter.from_checkpoint(fitted_checkpoint, ["engine.device=cuda", "engine.precision=fp32",
                                                              "refine.crf.enabled=true"])
    x = segmenter.normalize(smooth_image(3, 150, 170, seed=3))
    assert segmenter.segment(x).labels.shape == (150, 170)
