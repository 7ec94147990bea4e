"""The benchmark's calibration (ECE, reliability) and test-time augmentation rows, checked
against the engine run by hand."""

from __future__ import annotations

import json

import pytest
import torch
from test_benchmark import ckpt, data, run  # noqa: F401  (fixtures)

from magseg.checkpoint import load_checkpoint, save_checkpoint
from magseg.data.scenes import list_scenes, read_scene
from magseg.evaluation.calibration import ReliabilityBins, apply_temperature, scored_pixels
from magseg.evaluation.metrics import ConfusionMatrix
from magseg.segmenter import Segmenter, create_refiner, create_segmenter_model


def _with_temperature(path, temperature):
    ck = load_checkpoint(path)
    backbone = create_segmenter_model(ck.config, pretrained=False)
    backbone.load_state_dict(ck.backbone)
    refiner = create_refiner(ck.config)
    refiner.load_state_dict(ck.refiner)
    return save_checkpoint(path.with_name("hot.ckpt"), ck.config, backbone, refiner,
                           calibration={"temperature": temperature})


def test_ece_per_method_with_and_without_the_temperature(ckpt, data, tmp_path):  # noqa: F811
    hot = _with_temperature(ckpt, 0.5)
    out = tmp_path / "bench"
    result, _ = run(hot, "--data-root", data, "--out-dir", out, "--samples", "0", "--set", "engine.precision=fp32")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    seg = Segmenter.from_checkpoint(hot, ["engine.precision=fp32"])
    in_mean = [c.in_mean for c in seg.config.classes]
    raw, tempered = ReliabilityBins(), ReliabilityBins()
    for scene in list_scenes(seg.config.data, "test", data):
        image, mask = read_scene(scene, seg.config)
        target = torch.from_numpy(mask)
        res = seg.segment(image, normalized=False, return_probs=True, calibrated=False)
        scored = scored_pixels(target, in_mean)
        raw.update(res.probs, target, scored, res.labels)
        tempered.update(apply_temperature(res.probs, 0.5), target, scored, res.labels)
    cal = report["methods"]["progressive"]["calibration"]
    assert cal["temperature"] == 0.5
    assert cal["ece_uncalibrated"] == pytest.approx(raw.ece(), abs=1e-6)
    assert cal["ece"] == pytest.approx(tempered.ece(), abs=1e-6)
    assert cal["ece"] != pytest.approx(cal["ece_uncalibrated"])
    assert sum(b["pixels"] for b in cal["bins"]) == int(raw.count.sum())
    assert "reliability.png" in report["plots"] and (out / "reliability.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "## Calibration" in md and f"| progressive | {100 * raw.ece():.2f} | {100 * tempered.ece():.2f} | 1 |" in md


def test_tta_rows_score_the_engine_with_tta(ckpt, data, tmp_path):  # noqa: F811
    out = tmp_path / "bench"
    result, _ = run(ckpt, "--data-root", data, "--out-dir", out, "--samples", "0", "--tta", "flip",
                    "--set", "engine.precision=fp32")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    methods = report["methods"]
    assert {"progressive + TTA flip", "patch + TTA flip"} <= set(methods)
    assert methods["progressive"]["tta"] == "none" and methods["progressive"]["backbone_runs_per_crop"] == 1
    row = methods["progressive + TTA flip"]
    assert row["tta"] == "flip" and row["backbone_runs_per_crop"] == 2
    # The engine's crop counts are the crops it ran, with or without TTA.
    assert [s["crops_run"] for s in row["stages"]] == [s["crops_run"] for s in methods["progressive"]["stages"]]
    seg = Segmenter.from_checkpoint(ckpt, ["engine.precision=fp32", "engine.tta=flip"])
    acc = ConfusionMatrix(seg.num_classes, [c.in_mean for c in seg.config.classes])
    for scene in list_scenes(seg.config.data, "test", data):
        image, mask = read_scene(scene, seg.config)
        acc.update(seg.segment(image, normalized=False).labels, torch.from_numpy(mask))
    assert row["miou"] == pytest.approx(acc.scores()["miou"])


def test_a_bad_tta_is_a_usage_error(ckpt, data, tmp_path):  # noqa: F811
    result, _ = run(ckpt, "--data-root", data, "--out-dir", tmp_path / "bench", "--tta", "rot")
    assert result.exit_code == 2 and "engine.tta" in result.output
