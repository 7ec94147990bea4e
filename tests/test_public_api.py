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


def test_the_version_and_config_tools_need_no_torch():
    # `magseg --version` and load_config must not pay for torch, smp and rasterio.
    import subprocess
    import sys

    code = ("import sys; from magseg.cli.app import main; import magseg; magseg.load_config; "
            "sys.argv = ['magseg', '--version']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'rasterio', 'segmentation_models_pytorch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "[]", out.stdout + out.stderr
    assert "magseg " + magseg.__version__ in out.stdout


def test_all_names_each_public_name_once():
    assert len(set(magseg.__all__)) == len(magseg.__all__)
    assert all(not name.startswith("_") for name in magseg.__all__)


def test_magsegs_refiner_meets_the_refiner_contracts_and_a_plain_one_only_the_first():
    from magseg.engine.refiner_network import Refiner
    from magseg.engine.stages import refine_probs

    class Plain(torch.nn.Module):  # logits only: the engine takes their softmax
        def forward(self, fine, coarse):
            return (fine + coarse).log()

    fine = torch.softmax(torch.randn(2, 4, 8, 8), 1)
    coarse = torch.softmax(torch.randn(2, 4, 8, 8), 1)
    assert isinstance(Refiner(4, channels=4), magseg.ProbsRefiner)
    assert not isinstance(Plain(), magseg.ProbsRefiner)
    torch.testing.assert_close(refine_probs(Plain(), fine, coarse), ((fine + coarse) / 2))
    torch.testing.assert_close(refine_probs(Refiner(4, channels=4), fine, coarse), fine)


def test_a_backbone_with_context_ratios_is_multi_context(tiny_config):
    import dataclasses

    from magseg.engine.backbone import context_ratios
    from magseg.models.smp import create_backbone
    from magseg.models.fctl import create_fctl

    model = dataclasses.replace(tiny_config.model, arch="fctl", kwargs={
        "decoder": "Unet", "contexts": [2, 3], "key_channels": 8, "decoder_channels": [16] * 5})
    fctl = create_fctl(model, tiny_config.num_classes)
    plain = create_backbone(tiny_config.model, tiny_config.num_classes)
    assert isinstance(fctl, magseg.MultiContextBackbone) and context_ratios(fctl) == (2.0, 3.0)
    assert not isinstance(plain, magseg.MultiContextBackbone) and context_ratios(plain) == ()
