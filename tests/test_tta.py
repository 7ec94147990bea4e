"""Test-time augmentation at the backbone call (magseg.engine.tta): an equivariant backbone
gains nothing from it, a non-equivariant one is averaged as computed by hand, and the
engine's crop counts and streamed/in-memory equality hold."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from magseg.config import EngineConfig
from magseg.engine.stages import segment
from magseg.engine.tta import TTABackbone, forward, inverse, transforms, with_tta
from magseg.io.raster import VALUE_MAX


class Pointwise(nn.Module):
    """A 1x1 convolution: the same output whatever flips and rotations the input had."""

    def __init__(self, c_in: int = 3, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(c_in, classes, 1)

    def forward(self, x):
        return self.conv(x)


class ColumnRamp(nn.Module):
    """Two classes; class 0's logit is the column index, class 1's is 0: the output depends
    on where a pixel is, not on the image."""

    def forward(self, x):
        b, _, h, w = x.shape
        col = torch.arange(w, dtype=torch.float32).expand(b, 1, h, w)
        return torch.cat([col, torch.zeros_like(col)], dim=1)


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


@pytest.mark.parametrize("mode, count", [("none", 1), ("flip", 2), ("d4", 8)])
def test_transforms_are_undone(mode, count):
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    ts = transforms(mode)
    assert len(ts) == count and len(set(ts)) == count
    for t in ts:
        assert torch.equal(inverse(forward(x, t), t), x)
    if mode == "d4":  # 8 different images of a square
        sq = torch.arange(9.0).view(1, 1, 3, 3)
        assert len({tuple(forward(sq, t).flatten().tolist()) for t in ts}) == 8


def test_flip_average_by_hand():
    # Columns 0, 1, 2: class 0 has sigmoid(j) unflipped and sigmoid(2 - j) flipped back.
    out = TTABackbone(ColumnRamp(), "flip")(torch.zeros(1, 3, 2, 3)).softmax(1)
    s0, s1, s2 = sigmoid(0), sigmoid(1), sigmoid(2)
    expected = torch.tensor([(s0 + s2) / 2, s1, (s0 + s2) / 2])
    torch.testing.assert_close(out[0, 0, 0], expected)
    torch.testing.assert_close(out[0, 0, 1], expected)
    torch.testing.assert_close(out[0, 1], 1 - out[0, 0])


def test_d4_average_by_hand():
    # On a 2x2 image each pixel is in column 0 under 4 of the 8 transforms and in column 1
    # under the other 4: class 0 has (sigmoid(0) + sigmoid(1)) / 2 everywhere.
    out = TTABackbone(ColumnRamp(), "d4")(torch.zeros(1, 3, 2, 2)).softmax(1)
    torch.testing.assert_close(out[0, 0], torch.full((2, 2), (sigmoid(0) + sigmoid(1)) / 2))


class RampProbabilities(ColumnRamp):
    """ColumnRamp's softmax, as a runtime's graph gives it (``returns_probabilities``)."""

    returns_probabilities = True

    def forward(self, x):
        return super().forward(x).softmax(1)


@pytest.mark.parametrize("mode", ["flip", "d4"])
def test_around_a_backbone_of_probabilities_the_mean_comes_out_as_it_is(mode):
    # Columns 0, 1, 2 flipped: class 0 has (sigmoid(0) + sigmoid(2)) / 2 at the edges,
    # sigmoid(1) in the middle; with d4 on 3x3, the same mean whichever backbone is inside.
    from magseg.engine.backbone import gives_probabilities

    x = torch.zeros(1, 3, 3, 3)
    wrapped = TTABackbone(RampProbabilities(), mode)
    assert gives_probabilities(wrapped) and not gives_probabilities(TTABackbone(ColumnRamp(), mode))
    out = wrapped(x)
    torch.testing.assert_close(out, TTABackbone(ColumnRamp(), mode)(x).softmax(1))
    torch.testing.assert_close(out.sum(1), torch.ones(1, 3, 3))
    if mode == "flip":
        s0, s1, s2 = sigmoid(0), sigmoid(1), sigmoid(2)
        torch.testing.assert_close(out[0, 0, 0], torch.tensor([(s0 + s2) / 2, s1, (s0 + s2) / 2]))


def test_wrapper_keeps_what_the_engine_reads():
    from magseg.engine.backbone import context_ratios, input_multiple

    class Strided(Pointwise):
        requires_divisible_input_shape = True
        encoder = type("E", (), {"output_stride": 16})()

    wrapped = with_tta(Strided(), "flip")
    assert input_multiple(wrapped) == 16 and context_ratios(wrapped) == ()
    assert with_tta(Pointwise(), "none").__class__ is Pointwise
    assert input_multiple(with_tta(Pointwise(), "d4")) == 1


class Counting(nn.Module):
    """Counts the images the backbone is run on."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.images = inner, 0

    def forward(self, x):
        self.images += x.shape[0]
        return self.inner(x)


@pytest.mark.parametrize("mode", ["flip", "d4"])
def test_equivariant_backbone_tta_equals_no_tta_and_crops_are_counted(tiny_config, mode):
    image = torch.randn(3, 100, 90, generator=torch.Generator().manual_seed(0))
    engine = EngineConfig(batch_size=3, precision="fp32", channels_last=False)
    plain, tta = Counting(Pointwise()), Counting(Pointwise())
    a = segment(image, plain, tiny_config.pyramid, refine=tiny_config.refine, engine=engine,
                return_probs=True, return_stages=True)
    b = segment(image, TTABackbone(tta, mode), tiny_config.pyramid, refine=tiny_config.refine, engine=engine,
                return_probs=True, return_stages=True)
    torch.testing.assert_close(b.probs, a.probs, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.labels, b.labels)
    # The engine ran the same crops; the backbone ran each one once per transform.
    assert [s.crops_run for s in b.stages] == [s.crops_run for s in a.stages]
    crops = sum(s.crops_run for s in a.stages)
    assert plain.images == crops and tta.images == len(transforms(mode)) * crops


def test_non_equivariant_backbone_changes_with_tta(tiny_config):
    image = torch.zeros(3, 64, 64)
    engine = EngineConfig(batch_size=4, precision="fp32", channels_last=False)
    a = segment(image, ColumnRamp(), tiny_config.pyramid, refine=tiny_config.refine, engine=engine,
                return_probs=True)
    b = segment(image, TTABackbone(ColumnRamp(), "flip"), tiny_config.pyramid, refine=tiny_config.refine,
                engine=engine, return_probs=True)
    assert float((a.probs - b.probs).abs().max()) > 0.1


def test_predict_with_tta_equals_the_in_memory_engine(tmp_path, fitted_checkpoint):
    # The streamed raster path and the in-memory engine give the same labels and
    # probabilities with TTA on (the engine's invariant holds through the wrapper).
    import numpy as np
    import rasterio
    from geotiff import smooth_image, write_raster
    from magseg.cli.app import _register, app
    from typer.testing import CliRunner

    from magseg.segmenter import Segmenter

    _register()
    scene = write_raster(tmp_path / "scene.tif", smooth_image(3, 70, 90, seed=2))
    result = CliRunner().invoke(app, ["predict", str(fitted_checkpoint), str(scene), "-o", str(tmp_path / "out"),
                                      "--probs", "--tta", "d4", "--set", "engine.precision=fp32"])
    assert result.exit_code == 0, result.output
    seg = Segmenter.from_checkpoint(fitted_checkpoint, ["engine.precision=fp32", "engine.tta=d4"])
    with rasterio.open(scene) as src:
        x = seg.normalize(src.read())
    mem = seg.segment(x, return_probs=True)
    plain = Segmenter.from_checkpoint(fitted_checkpoint, ["engine.precision=fp32"]).segment(x, return_probs=True)
    with rasterio.open(tmp_path / "out" / "scene.tif") as src:
        assert np.array_equal(src.read(1), mem.labels.numpy())
    with rasterio.open(tmp_path / "out" / "scene_probs.tif") as src:
        probs = src.read().astype(np.float64) / VALUE_MAX
    assert np.abs(probs - mem.probs.numpy()).max() <= 1 / VALUE_MAX + 1e-6
    assert float((mem.probs - plain.probs).abs().max()) > 0.01  # TTA did something
