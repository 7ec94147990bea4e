"""--resume: an interrupted run continues from last.ckpt and ends where an uninterrupted run
would (identical weights on CPU with a fixed seed); a failed run keeps its checkpoints."""

from __future__ import annotations

import pytest
import torch
from test_datasets import make_deepglobe

from magseg.checkpoint import load_checkpoint
from magseg.errors import CheckpointError, DataError, OutputExistsError
from magseg.training.trainer import TrainOptions, train


class Interrupted(Exception):
    """Stands in for a kill: raised right after an epoch's checkpoints are written."""


def _config(tiny_config):
    # Augmentation, OHEM and two epochs per phase: every source of randomness in play.
    return tiny_config.override({
        "train.samples_per_epoch": 8, "train.batch_size": 4, "train.epochs": 2,
        "train.refiner_epochs": 2, "train.ohem": 0.5, "data.mean": None, "data.std": None,
    })


def _interrupt_after(phase, epoch):
    def on_epoch(record):
        if (record["phase"], record["epoch"]) == (phase, epoch):
            raise Interrupted

    return on_epoch


def _assert_same_weights(a, b):
    for part in ("backbone", "refiner"):
        sa, sb = getattr(a, part), getattr(b, part)
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{part} {key}"


@pytest.fixture
def data(tmp_path, tiny_config):
    return make_deepglobe(tmp_path / "data", tiny_config, counts=(("train", 3), ("val", 1)))


# FPN has dropout: the torch RNG state must be restored too, not only the sampling.
FPN = {"model.arch": "FPN", "model.kwargs": {"decoder_pyramid_channels": 32,
                                             "decoder_segmentation_channels": 32}, "pyramid.input": 64}


@pytest.mark.parametrize("stop,model", [(("backbone", 1), FPN), (("refiner", 1), {})])
def test_resume_ends_where_an_uninterrupted_run_would(tmp_path, tiny_config, data, stop, model):
    config = _config(tiny_config).override(model)
    whole = train(config, TrainOptions(out=tmp_path / "whole", data_root=data))

    out = tmp_path / "cut"
    with pytest.raises(Interrupted):
        train(config, TrainOptions(out=out, data_root=data, on_epoch=_interrupt_after(*stop)))
    assert load_checkpoint(out / "last.ckpt").training["epoch"] == 1
    resumed = train(config, TrainOptions(out=out, data_root=data, resume=True))

    # The resumed run trains only the epochs that were missing...
    done = [(r["phase"], r["epoch"]) for r in resumed.records]
    all_epochs = [("backbone", 1), ("backbone", 2), ("refiner", 1), ("refiner", 2)]
    assert done == all_epochs[all_epochs.index(stop) + 1 :]
    # ...and ends with the same weights, losses and scores as the uninterrupted run.
    _assert_same_weights(load_checkpoint(out / "last.ckpt"), load_checkpoint(tmp_path / "whole" / "last.ckpt"))
    _assert_same_weights(load_checkpoint(out / "best.ckpt"), load_checkpoint(tmp_path / "whole" / "best.ckpt"))
    assert resumed.records[-1] == {**whole.records[-1], "seconds": resumed.records[-1]["seconds"]}


def test_resume_needs_a_matching_checkpoint(tmp_path, tiny_config, data):
    config = _config(tiny_config).override({"train.epochs": 1, "train.refiner_epochs": 0})
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(config, TrainOptions(out=out, data_root=data, resume=True))
    train(config, TrainOptions(out=out, data_root=data, phase="backbone"))
    other = config.override({"model.kwargs": {"decoder_channels": [8, 8, 8, 8, 8]}})
    with pytest.raises(CheckpointError, match=r"does not match the config asked for:\n"
                       r"  model.kwargs.decoder_channels: asked \[8, 8, 8, 8, 8\], checkpoint has \[16,"):
        train(other, TrainOptions(out=out, data_root=data, resume=True))
    more_classes = config.override({"classes": [c.__dict__ for c in config.classes]
                                    + [{"id": 4, "name": "extra", "color": [255, 0, 0]}]})
    with pytest.raises(CheckpointError, match="classes: asked"):
        train(more_classes, TrainOptions(out=out, data_root=data, phase="refiner"))
    # A new run does not silently replace a finished one.
    with pytest.raises(OutputExistsError, match="--resume to continue .* or --overwrite"):
        train(config, TrainOptions(out=out, data_root=data))
    # Resuming a finished run trains nothing and changes nothing.
    before = (out / "last.ckpt").read_bytes()
    assert train(config, TrainOptions(out=out, data_root=data, resume=True, phase="backbone")).records == []
    assert (out / "last.ckpt").read_bytes() == before


def test_failed_run_leaves_previous_checkpoints_intact(tmp_path, tiny_config, data):
    config = _config(tiny_config).override({"train.epochs": 1, "train.refiner_epochs": 0,
                                            "train.samples_per_epoch": 16})
    out = tmp_path / "run"
    train(config, TrainOptions(out=out, data_root=data, phase="backbone"))
    before = {name: (out / name).read_bytes() for name in ("best.ckpt", "last.ckpt")}
    # A training image whose header is fine but whose pixels are cut short: found only
    # when a sample reads it, in the middle of an epoch.
    jpg = data / "1_sat.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 3])
    with pytest.raises(DataError, match="1_sat.jpg"):
        train(config.override({"train.epochs": 3}),
              TrainOptions(out=out, data_root=data, phase="backbone", resume=True))
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
