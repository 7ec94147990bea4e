"""Bad input to `magseg train`: a clear message naming the file, a non-zero exit, nothing
written that looks finished."""

from __future__ import annotations

import magseg.cli.train  # noqa: F401  (registers the command)
import numpy as np
import pytest
from magseg.cli.app import app
from PIL import Image
from test_datasets import CONFIGS_TINY, make_deepglobe
from typer.testing import CliRunner


@pytest.fixture
def data(tmp_path, tiny_config):
    return make_deepglobe(tmp_path / "data", tiny_config, counts=(("train", 2), ("val", 1)))


def _train(data, out, *extra):
    return CliRunner().invoke(app, ["train", "-c", str(CONFIGS_TINY), "--data-root", str(data),
                                    "--out-dir", str(out), "--epochs", "1", "-q",
                                    "--set", "train.samples_per_epoch=4", *extra])


def _fails(result, code, *needles):
    assert result.exit_code == code, result.output
    assert result.stdout == ""  # no epoch line for a run that did not train
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_missing_split_file(data, tmp_path):
    (data / "val.txt").unlink()
    _fails(_train(data, tmp_path / "out"), 1, "split file", "val.txt", "does not exist")


def test_empty_split(data, tmp_path):
    (data / "train.txt").write_text("# nothing yet\n\n")
    _fails(_train(data, tmp_path / "out"), 1, "train.txt", "lists no scene ids")


def test_missing_files(data, tmp_path):
    (data / "1_mask.png").unlink()
    (data / "train.txt").write_text("0\n1\nmissing_id\n")
    _fails(_train(data, tmp_path / "out"), 1, "3 missing file(s)", "1_mask.png",
           "missing_id_sat.jpg", "missing_id_mask.png")


def test_mismatched_sizes(data, tmp_path):
    Image.new("RGB", (100, 128), (255, 255, 0)).save(data / "0_mask.png")
    _fails(_train(data, tmp_path / "out"), 1, "0_mask.png: mask is 100x128 but its image", "0_sat.jpg")


def test_corrupt_image(data, tmp_path):
    (data / "1_sat.jpg").write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    _fails(_train(data, tmp_path / "out"), 1, "1_sat.jpg")


def test_unknown_mask_colour(data, tmp_path):
    mask = np.array(Image.open(data / "0_mask.png"))
    mask[:5, :5] = (255, 0, 0)  # red is no class of configs/tiny.yaml
    Image.fromarray(mask).save(data / "0_mask.png")
    out = tmp_path / "out"
    result = _train(data, out)
    _fails(result, 1, "0_mask.png", "(255, 0, 0)", "25 pixels", "known colours")
    assert not (out / "last.ckpt").exists() and not (out / "best.ckpt").exists()


def test_bad_override_is_a_usage_error(data, tmp_path):
    _fails(_train(data, tmp_path / "out", "--set", "train.epochz=3"), 2, "train.epochz", "unknown key")
    _fails(_train(data, tmp_path / "out", "--phase", "refine"), 2, "unknown phase 'refine'")


def test_refiner_phase_without_backbone(data, tmp_path):
    # No checkpoint to build on: the run cannot start as asked (exit 2, as for any checkpoint).
    _fails(_train(data, tmp_path / "out", "--phase", "refiner"), 2, "needs a trained backbone",
           "--phase backbone")


def test_offline_imagenet_for_other_encoder(data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = _train(data, tmp_path / "out", "--encoder-weights", "imagenet",
                    "--set", "model.encoder=resnet18", "--set", "model.kwargs={}")
    _fails(result, 1, "cannot download 'imagenet' weights for encoder 'resnet18'", "encoder_weights=none")


def test_config_classes_that_are_not_the_datas_fail_before_the_first_step(tmp_path, monkeypatch):
    """configs/tiny.yaml (4 classes) on scripts/make_synthetic.py output (DeepGlobe's 7
    colours): refused with the colours named before any epoch is set up."""
    import magseg.training.backbone_phase as backbone_phase
    from synthetic import SceneSpec, write_dataset

    data = tmp_path / "synthetic"
    write_dataset(data, {"train": 2, "val": 1}, SceneSpec(size=(128, 128)), seed=0)

    def no_epoch(*args, **kwargs):
        raise AssertionError("the first epoch was set up before the mask colours were checked")

    monkeypatch.setattr(backbone_phase, "BackboneSamples", no_epoch)
    out = tmp_path / "out"
    _fails(_train(data, out), 1, "_mask.png: mask has colours that are no class's", "known colours")
    assert not (out / "last.ckpt").exists()


def test_resuming_the_backbone_phase_after_the_refiner_phase_explains(tmp_path, data, make_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    import shutil

    from magseg.checkpoint import load_checkpoint, save_checkpoint
    from magseg.segmenter import Segmenter

    ckpt = load_checkpoint(make_checkpoint())
    seg = Segmenter.from_checkpoint(ckpt)
    save_checkpoint(out / "last.ckpt", ckpt.config, seg.backbone, seg.refiner,
                    training={"phase": "refiner", "epoch": 1})
    before = (out / "last.ckpt").read_bytes()
    result = _train(data, out, "--phase", "backbone", "--resume")
    _fails(result, 2, "last.ckpt is from the refiner phase (epoch 1)", "--phase refiner or --phase all")
    assert (out / "last.ckpt").read_bytes() == before
    shutil.rmtree(out)
