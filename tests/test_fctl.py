"""FCtL: context crop geometry, locality-aware correlation, zero-gate reduction, learning."""

import dataclasses

import pytest
import torch
from stage_cuts import backbone_inputs
from torch import nn

from magseg.config import PyramidConfig, RefineConfig
from magseg.engine.pyramid import context_windows, crop_boxes, crop_windows, extract_windows
from magseg.engine.stages import segment
from magseg.errors import ModelError
from magseg.geometry import Rect
from magseg.models.fctl import MultiContextFusion, aligned_windows, create_fctl


def test_context_windows_at_scene_borders_by_hand():
    # A 100x100 stage tiled by 40 px crops: starts 0, 40, 60.
    boxes = crop_boxes((100, 100), (40, 40))
    corner, middle, last = boxes[0], boxes[4], boxes[8]
    assert (corner.window.top, middle.window.top, last.window.top) == (0, 40, 60)
    windows = crop_windows([corner, middle, last], (40, 40))
    # x2: 80 px centred on the crop -> starts 20 px before it
    assert context_windows(windows, 2) == [Rect(-20, -20, 80, 80), Rect(20, 20, 80, 80), Rect(40, 40, 80, 80)]
    # x3: 120 px -> starts 40 px before it
    assert context_windows(windows, 3) == [Rect(-40, -40, 120, 120), Rect(0, 0, 120, 120), Rect(20, 20, 120, 120)]
    # x1.5 of a 5 px window: round(7.5) = 8 px, 1 px before (rounded down)
    assert context_windows([Rect(10, 10, 5, 5)], 1.5) == [Rect(9, 9, 8, 8)]


def test_context_crops_are_clipped_and_zero_padded_at_the_border():
    image = torch.arange(1, 100 * 100 + 1, dtype=torch.float32).view(1, 100, 100)
    (corner,) = extract_windows(image, [Rect(-20, -20, 80, 80)])
    assert torch.all(corner[:, :20, :] == 0) and torch.all(corner[:, :, :20] == 0)
    assert torch.equal(corner[:, 20:, 20:], image[:, :60, :60])
    (last,) = extract_windows(image, [Rect(40, 40, 80, 80)])
    assert torch.equal(last[:, :60, :60], image[:, 40:, 40:]) and torch.all(last[:, 60:, :] == 0)
    crops, contexts = backbone_inputs(image, [Rect(60, 60, 40, 40)], (2.0, 3.0))
    assert crops.shape == (1, 1, 40, 40) and [c.shape[-1] for c in contexts] == [80, 120]


def test_aligned_windows_pick_the_central_part_of_the_context_by_hand():
    # ratio 2 on a 4x4 map: local rows 0..3 sit over context rows 1, 1, 2, 2 (the middle half)
    feats = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    centre = aligned_windows(feats, 2, 1)[:, :, 0]
    assert torch.equal(centre[0, 0], feats[0, 0][[1, 1, 2, 2]][:, [1, 1, 2, 2]])
    # ratio 1, window 3: the 3x3 neighbourhood of each cell (zero outside)
    win = aligned_windows(feats, 1, 3)
    assert win.shape == (1, 1, 9, 4, 4)
    assert win[0, 0, :, 1, 1].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert win[0, 0, :, 0, 0].tolist() == [0, 0, 0, 0, 0, 1, 0, 4, 5]


def test_fusion_shapes_and_zero_gate_reduces_to_the_local_features():
    fusion = MultiContextFusion(16, ratios=(2, 3), key_channels=8, window=3)
    local = torch.randn(2, 16, 5, 7)
    contexts = [torch.randn(2, 16, 5, 7), torch.randn(2, 16, 5, 7)]
    assert torch.equal(fusion(local, contexts), local)
    nn.init.normal_(fusion.gate.weight)
    out = fusion(local, contexts)
    assert out.shape == local.shape and not torch.equal(out, local)
    with pytest.raises(ValueError, match="2 context maps"):
        fusion(local, contexts[:1])


def _fctl_config(tiny_config, **kwargs):
    model = dataclasses.replace(tiny_config.model, arch="fctl",
                                kwargs={"decoder": "Unet", "contexts": [2, 3], "key_channels": 8,
                                        "decoder_channels": [16, 16, 16, 16, 16], **kwargs})
    return model


def test_untrained_fctl_is_its_smp_model_on_the_local_crop(tiny_config):
    torch.manual_seed(0)
    fctl = create_fctl(_fctl_config(tiny_config), tiny_config.num_classes).eval()
    x = torch.randn(2, 3, 64, 64)
    contexts = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)]
    with torch.no_grad():
        # the same encoder, decoder and head run as a plain smp model on the local crop
        expected = fctl.segmentation_head(fctl.decoder(fctl.encoder(x)))
        assert torch.allclose(fctl(x, contexts), expected, atol=1e-5)


def test_create_fctl_rejects_bad_settings(tiny_config):
    with pytest.raises(ModelError, match="ratios >= 1"):
        create_fctl(_fctl_config(tiny_config, contexts=[0.5]), 4)
    with pytest.raises(ModelError, match="odd"):
        create_fctl(_fctl_config(tiny_config, window=2), 4)


class _ContextProbe(nn.Module):
    """A fake multi-context backbone: class 1 logit = mean of the x2 context crop."""

    context_ratios = (2.0,)

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, contexts):
        self.seen.append((tuple(x.shape), [tuple(c.shape) for c in contexts]))
        score = contexts[0].mean(dim=(1, 2, 3), keepdim=True).expand(-1, 1, *x.shape[-2:])
        return torch.cat([torch.zeros_like(score), score], dim=1)


def test_engine_feeds_context_crops_to_a_multi_context_backbone():
    probe = _ContextProbe()
    pyramid = PyramidConfig(scales=[32, 64], crop=32, input=16)
    # Left half dark, right half bright: the context of a crop decides its class.
    image = torch.zeros(1, 64, 64)
    image[:, :, 32:] = 1.0
    result = segment(image, probe, pyramid, refine=RefineConfig(points=1.0, kernel=1))
    # every call got one context batch resized to the input size (16, or 20 for a crop
    # window grown by the default margin of 4)
    assert all(ctx == [(shape[0], 1, *shape[2:])] and shape[2:] in ((16, 16), (20, 20)) for shape, ctx in probe.seen)
    assert {shape[2:] for shape, _ in probe.seen} == {(16, 16), (20, 20)}
    # at the finest stage the left crops' x2 contexts hold some bright pixels -> mean > 0
    assert result.labels.shape == (64, 64) and (result.labels == 1).all()


def test_a_tiny_fctl_learns_what_only_the_context_can_tell(tiny_config):
    # The local crop is always the same grey; only the ring around it (seen by the x3
    # context) tells class 1 (red ring) from class 2 (blue ring).
    torch.manual_seed(0)
    fctl = create_fctl(_fctl_config(tiny_config, contexts=[3]), 3)
    opt = torch.optim.Adam(fctl.parameters(), lr=3e-3)

    def batch(n):
        labels = torch.randint(1, 3, (n,))
        scenes = torch.zeros(n, 3, 96, 96)
        scenes[labels == 1, 0] = 1.0
        scenes[labels == 2, 2] = 1.0
        scenes[:, :, 32:64, 32:64] = 0.5
        crops, contexts = [], []
        for scene in scenes:
            c, ctx = backbone_inputs(scene, [Rect(32, 32, 32, 32)], (3.0,))
            crops.append(c)
            contexts.append(torch.nn.functional.interpolate(ctx[0], size=(32, 32), mode="area"))
        target = labels.view(n, 1, 1).expand(n, 32, 32)
        return torch.cat(crops), [torch.cat(contexts)], target

    losses = []
    for _ in range(40):
        x, ctx, target = batch(8)
        loss = nn.functional.cross_entropy(fctl(x, ctx), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    fctl.eval()
    x, ctx, target = batch(16)
    with torch.no_grad():
        accuracy = (fctl(x, ctx).argmax(1) == target).float().mean().item()
    assert losses[-1] < 0.5 * losses[0]
    assert accuracy > 0.95  # a plain model on the grey crop alone is at 0.5 at best
