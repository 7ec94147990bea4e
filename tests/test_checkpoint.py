"""The checkpoint: one file, weights + resolved config + resume state, read with
``torch.load(weights_only=True)``; what does not fit is refused with a clear error."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from magseg.checkpoint import load_checkpoint, load_state, save_checkpoint
from magseg.errors import CheckpointError, WriteError
from magseg.segmenter import Segmenter, create_refiner, create_segmenter_model
from magseg.training.resume import rng_state, set_rng_state


def _trained_optimizer(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / 10)
    for _ in range(2):
        loss = sum((p * p).sum() for p in model.parameters())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return opt, sched


def test_round_trip_with_resume_state(tmp_path, tiny_config):
    backbone = create_segmenter_model(tiny_config)
    refiner = create_refiner(tiny_config)
    opt, sched = _trained_optimizer(refiner)
    training = {"phase": "refiner", "epoch": 3, "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "best_miou": 0.5, "rng": rng_state()}
    path = save_checkpoint(tmp_path / "a.ckpt", tiny_config, backbone, refiner,
                           meta={"epoch": 3}, training=training)

    raw = torch.load(path, map_location="cpu", weights_only=True)  # no code unpickled
    assert raw["training"]["epoch"] == 3
    ckpt = load_checkpoint(path)
    assert ckpt.config == tiny_config
    assert ckpt.meta["epoch"] == 3 and "magseg_version" in ckpt.meta
    for module, state in ((backbone, ckpt.backbone), (refiner, ckpt.refiner)):
        own = module.state_dict()
        assert state.keys() == own.keys()
        assert all(torch.equal(state[k], own[k]) for k in own)

    # Optimizer and scheduler continue exactly.
    twin = create_refiner(tiny_config)
    load_state(twin, ckpt.refiner, "refiner", path)
    opt2 = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda step: 1 - step / 10)
    opt2.load_state_dict(ckpt.training["optimizer"])
    sched2.load_state_dict(ckpt.training["scheduler"])
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_rng_state_survives_the_file(tmp_path, tiny_config):
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    state = rng_state()
    want = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    path = save_checkpoint(tmp_path / "r.ckpt", tiny_config, create_segmenter_model(tiny_config),
                           training={"rng": state})
    torch.rand(5), np.random.rand(5), random.random()  # move every generator on
    set_rng_state(load_checkpoint(path).training["rng"])
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


def test_predict_needs_only_the_checkpoint(tmp_path, tiny_config):
    config = tiny_config.override({"data.mean": [10.0, 20.0, 30.0], "data.std": [2.0, 4.0, 8.0]})
    backbone = create_segmenter_model(config)
    path = save_checkpoint(tmp_path / "p.ckpt", config, backbone, create_refiner(config))
    segmenter = Segmenter.from_checkpoint(path)
    raw = torch.full((3, 40, 50), 30.0)
    expected = torch.tensor([10.0, 2.5, 0.0]).view(3, 1, 1).expand(3, 40, 50)
    torch.testing.assert_close(segmenter.normalize(raw), expected)
    image = torch.randn(3, 40, 50)
    want = Segmenter(config, backbone.eval(), segmenter.refiner).segment(image).labels
    assert torch.equal(segmenter.segment(image).labels, want)


def test_weights_that_do_not_fit_are_refused(tmp_path, tiny_config):
    path = save_checkpoint(tmp_path / "w.ckpt", tiny_config, create_segmenter_model(tiny_config),
                           create_refiner(tiny_config))
    ckpt = load_checkpoint(path)
    other = tiny_config.override({"classes": [c.__dict__ for c in tiny_config.classes]
                                  + [{"id": 4, "name": "extra"}]})
    with pytest.raises(CheckpointError, match=r"backbone weights in .*w.ckpt do not fit.*of another shape"):
        load_state(create_segmenter_model(other), ckpt.backbone, "backbone", path)
    wider = tiny_config.override({"refiner.channels": 16})
    with pytest.raises(CheckpointError, match="refiner weights"):
        load_state(create_refiner(wider), ckpt.refiner, "refiner", path)
    partial = {k: v for i, (k, v) in enumerate(ckpt.backbone.items()) if i % 2}
    with pytest.raises(CheckpointError, match="missing"):
        load_state(create_segmenter_model(tiny_config), partial, "backbone", path)


def test_truncated_checkpoint_is_a_clear_error(tmp_path, tiny_config):
    path = save_checkpoint(tmp_path / "t.ckpt", tiny_config, create_segmenter_model(tiny_config))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"t.ckpt is damaged: it is cut short \(the zip directory"):
        load_checkpoint(path)


def _save_then(action):
    """A torch.save that writes the file and then fails as a full disk makes it fail."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        action(f)

    return save


def _raise_write_failed(f):
    os.truncate(f, os.path.getsize(f) // 2)
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 478144 vs 478040")


def _cut_short_silently(f):
    os.truncate(f, os.path.getsize(f) - 100)


@pytest.mark.parametrize("failure", [_raise_write_failed, _cut_short_silently],
                         ids=["torch-raises", "silently-short"])
def test_a_checkpoint_that_cannot_be_written_keeps_the_previous_one(tmp_path, tiny_config,
                                                                     monkeypatch, failure):
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, tiny_config, create_segmenter_model(tiny_config), meta={"epoch": 1})
    before = path.read_bytes()
    monkeypatch.setattr("torch.save", _save_then(failure))
    with pytest.raises(WriteError) as caught:
        save_checkpoint(path, tiny_config, create_segmenter_model(tiny_config), meta={"epoch": 2})
    assert str(caught.value).startswith(f"{path}: not written")
    assert f"the existing {path} is unchanged" in str(caught.value)
    assert path.read_bytes() == before and load_checkpoint(path).meta["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_the_digest_is_of_the_bytes_loaded_though_the_file_is_replaced_meanwhile(tmp_path, tiny_config,
                                                                                 monkeypatch):
    # A training run replaces best.ckpt (a rename) whenever validation improves; a predict
    # reading it at that moment must tag its outputs, and key its graph cache, with the
    # digest of the weights it loaded, not of the file that took their place.
    import hashlib

    import magseg.checkpoint as checkpoint

    path = save_checkpoint(tmp_path / "best.ckpt", tiny_config, create_segmenter_model(tiny_config),
                           create_refiner(tiny_config))
    first = path.read_bytes()
    torch.manual_seed(5)
    newer = save_checkpoint(tmp_path / "newer.ckpt", tiny_config, create_segmenter_model(tiny_config),
                            create_refiner(tiny_config))
    real_load = torch.load

    def load_then_replace(*args, **kwargs):
        payload = real_load(*args, **kwargs)
        if newer.exists():
            os.replace(newer, path)  # the new best lands while this one is being read
        return payload

    monkeypatch.setattr(torch, "load", load_then_replace)
    segmenter = Segmenter.from_checkpoint(path)
    assert path.read_bytes() != first
    assert segmenter.checkpoint_sha256 == hashlib.sha256(first).hexdigest()
    assert checkpoint.load_checkpoint(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
