"""The public API named in magseg/__init__ resolves, and the docs' Python example runs."""

from __future__ import annotations

import torch
from conftest import CONFIGS

import magseg


def test_every_public_name_resolves():
    for name in magseg.__all__:
        assert getattr(magseg, name) is not None, name


def test_the_python_example_runs_on_a_tiny_model():
    config = magseg.load_config(CONFIGS / "tiny.yaml")
    segmenter = magseg.Segmenter.from_config(config)
    result = segmenter.segment(torch.randn(3, 100, 90), return_stages=True)
    assert result.labels.shape == (100, 90) and result.labels.dtype == torch.uint8
    assert [tuple(s.refined.shape) for s in result.stages[1:]] == [s.size for s in result.stages[1:]]
