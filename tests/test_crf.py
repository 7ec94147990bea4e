"""The CRF over the final probabilities (magseg.engine.crf): a noisy edge snapped to the image
edge by the bilateral term, finite reach (tiles with the margin equal the whole image), the
in-memory engine, and predict streamed from disk equal to segment in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from geotiff import read_raster, smooth_image, write_raster
from hypothesis import given, settings
from hypothesis import strategies as st

from magseg.config import CrfConfig, RefineConfig
from magseg.engine import crf as crf_module
from magseg.engine.crf import dense_crf, local_crf, reach
from magseg.errors import ConfigError
from magseg.run.predict import PredictOptions, predict_raster
from magseg.io.provenance import config_sha256
from magseg.io.raster import NODATA, VALUE_MAX
from magseg.segmenter import Segmenter

CRF = CrfConfig(enabled=True)
# Per row, the column where the prediction's class 1 starts: 1 to 3 px left of the image's
# edge at column 8.
NOISY_EDGE = [5, 6, 7, 6, 5, 7, 6, 6, 5, 7, 6, 5, 6, 7, 6, 5]


def _noisy_edge() -> tuple[torch.Tensor, torch.Tensor]:
    """A 16 x 16 image, dark left of column 8 and bright from it, and probabilities whose
    edge wanders left of it: 0.7 class 0 left of ``NOISY_EDGE``, 0.35 right of it."""
    image = torch.zeros((1, 3, 16, 16))
    image[..., 8:] = 200.0
    left = torch.arange(16)[None, :] < torch.tensor(NOISY_EDGE)[:, None]
    p0 = torch.where(left, 0.7, 0.35)
    return torch.stack([p0, 1 - p0])[None], image


def test_the_bilateral_term_snaps_a_noisy_edge_to_the_image_edge():
    probs, image = _noisy_edge()
    assert (probs.argmax(1)[0, :, 5:8] == 1).any()  # the input is wrong on columns 5-7
    labels = local_crf(probs, image, CRF).argmax(1)[0]
    want = torch.zeros((16, 16), dtype=torch.long)
    want[:, 8:] = 1
    assert torch.equal(labels, want)


def test_without_the_bilateral_term_the_edge_does_not_move_to_the_image_edge():
    probs, image = _noisy_edge()
    gaussian_only = CrfConfig(enabled=True, bilateral_compat=0.0)
    labels = local_crf(probs, image, gaussian_only).argmax(1)[0]
    assert (labels[:, :8] == 1).any()  # the image is not what moves it
    # The image is not used at all: any other image gives the same result.
    other = local_crf(probs, torch.rand_like(image) * 255, gaussian_only)
    torch.testing.assert_close(local_crf(probs, image, gaussian_only), other)


def test_marginals_are_distributions_and_a_flat_image_keeps_a_confident_map():
    probs = torch.rand((2, 4, 12, 10)).softmax(1)
    q = local_crf(probs, torch.zeros((2, 3, 12, 10)), CRF)
    torch.testing.assert_close(q.sum(1), torch.ones((2, 12, 10)))
    confident = torch.full((1, 3, 9, 9), 0.01)
    confident[:, 2] = 0.98
    assert (local_crf(confident, torch.zeros((1, 3, 9, 9)), CRF).argmax(1) == 2).all()


@settings(max_examples=15, deadline=None)
@given(h=st.integers(6, 30), w=st.integers(6, 30), iterations=st.integers(1, 3), window=st.sampled_from([3, 5]),
       seed=st.integers(0, 2**16), data=st.data())
def test_a_tile_with_the_reach_as_margin_equals_the_whole_image(h, w, iterations, window, seed, data):
    cfg = CrfConfig(enabled=True, iterations=iterations, window=window, bilateral_srgb=20.0)
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand((1, 3, h, w), generator=gen).softmax(1)
    image = torch.rand((1, 3, h, w), generator=gen) * 60
    top, left = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    bottom, right = data.draw(st.integers(top + 1, h)), data.draw(st.integers(left + 1, w))
    m = reach(cfg)
    r0, c0, r1, c1 = max(0, top - m), max(0, left - m), min(h, bottom + m), min(w, right + m)
    tile = local_crf(probs[..., r0:r1, c0:c1], image[..., r0:r1, c0:c1], cfg)
    whole = local_crf(probs, image, cfg)
    torch.testing.assert_close(tile[..., top - r0 : bottom - r0, left - c0 : right - c0],
                               whole[..., top:bottom, left:right], atol=1e-6, rtol=1e-5)


def test_segment_with_the_crf_is_the_crf_of_its_probabilities_whatever_the_tiles(fitted_checkpoint, monkeypatch):
    seg = Segmenter.from_checkpoint(fitted_checkpoint, ["engine.precision=fp32"])
    image = torch.from_numpy(smooth_image(3, 70, 90, cell=16, seed=2))
    x = seg.normalize(image)
    cfg = CrfConfig(enabled=True, iterations=3, window=5)
    plain = seg.segment(x, return_probs=True)
    guide = x * torch.tensor(seg.config.data.std).view(-1, 1, 1)  # back to pixel units
    want = local_crf(plain.probs[None], guide[None], cfg)[0]
    monkeypatch.setattr(crf_module, "TILE", 24)  # 3 x 4 tiles, each with a 6 px margin
    got = seg.segment(x, return_probs=True, return_stages=True,
                      refine=RefineConfig(points=seg.config.refine.points, kernel=seg.config.refine.kernel,
                                          crf=cfg))
    torch.testing.assert_close(got.probs, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(got.labels, want.argmax(0).to(torch.uint8))
    # The last stage's own labels are the engine's, before the CRF.
    assert torch.equal(got.stages[-1].labels, plain.labels)


@pytest.mark.parametrize("size", [(101, 67), (40, 130)])
def test_streamed_predict_with_the_crf_equals_segment_in_memory(tmp_path, fitted_checkpoint, monkeypatch, size):
    monkeypatch.setattr(crf_module, "TILE", 32)  # several tiles, margins crossing chunk files
    seg = Segmenter.from_checkpoint(fitted_checkpoint, ["engine.precision=fp32", "refine.crf.enabled=true",
                                                        "refine.crf.iterations=4", "refine.crf.window=5"])
    height, width = size
    image = smooth_image(3, height, width, cell=16, seed=height)
    image[:, height // 3 : height // 3 + 4, : width // 2] = 0  # nodata
    valid = image.any(axis=0)
    result = predict_raster(seg, write_raster(tmp_path / "scene.tif", image, nodata=0), tmp_path / "out",
                            PredictOptions(probs=True, scratch_dir=tmp_path / "scratch"))
    assert result.status == "ok"
    x = seg.normalize(image)
    x[:, torch.from_numpy(~valid)] = 0
    want = seg.segment(x, return_probs=True)
    want_labels = want.labels.numpy().copy()
    want_labels[~valid] = NODATA
    np.testing.assert_array_equal(read_raster(tmp_path / "out" / "scene.tif")[0][0], want_labels)
    probs = read_raster(tmp_path / "out" / "scene_probs.tif")[0]
    expected = (want.probs.clamp(0, 1) * VALUE_MAX).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(probs[:, valid], expected[:, valid])
    # The CRF's map at the image size was in the scratch space too, and is gone.
    assert list((tmp_path / "scratch").iterdir()) == []


def test_crf_settings_are_checked(tiny_config):
    with pytest.raises(ConfigError, match="refine.crf.window"):
        tiny_config.override(["refine.crf.window=4"])
    with pytest.raises(ConfigError, match="refine.crf.iterations"):
        tiny_config.override(["refine.crf.iterations=0"])


def test_the_crf_is_in_the_provenance_only_when_on(tiny_config):
    off = config_sha256(tiny_config)
    assert config_sha256(tiny_config.override(["refine.crf.iterations=3"])) == off
    assert config_sha256(tiny_config.override(["refine.crf.enabled=true"])) != off


def _has_pydensecrf() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_pydensecrf(), reason="pydensecrf2 (the magseg[densecrf] extra, built with "
                                                  "a C++ compiler) is not installed")
def test_the_dense_crf_snaps_the_noisy_edge_too():
    probs, image = _noisy_edge()
    labels = dense_crf(probs, image, CrfConfig(enabled=True, method="dense")).argmax(1)[0]
    want = torch.zeros((16, 16), dtype=torch.long)
    want[:, 8:] = 1
    assert torch.equal(labels, want)


@pytest.mark.skipif(_has_pydensecrf(), reason="pydensecrf2 is installed: the missing-extra error cannot happen")
def test_a_dense_crf_without_its_extra_names_the_fix(fitted_checkpoint):
    with pytest.raises(ConfigError, match=r"magseg\[densecrf\]"):
        Segmenter.from_checkpoint(fitted_checkpoint, ["refine.crf.enabled=true", "refine.crf.method=dense"])
