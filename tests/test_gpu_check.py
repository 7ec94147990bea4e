"""scripts/gpu_check.sh and its ONNX Runtime step (scripts/ort_providers.py) on a machine
without a GPU: what they can check there they do, and what needs CUDA is reported as skipped,
with the reason, instead of failing. A GPU is lent rarely and briefly; a script that broke in
between would spend that time on its own bug."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from magseg.checkpoint import load_checkpoint
from magseg.engine import runtime as rt

REPO = Path(__file__).resolve().parents[1]
needs_onnx = pytest.mark.skipif(not rt.installed("onnxruntime"),
                                reason="onnxruntime, onnx and onnxscript not installed (magseg[onnx])")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny checkpoint and its exported backbone, made once for the module's tests."""
    from conftest import CONFIGS

    from magseg.checkpoint import save_checkpoint
    from magseg.config import load_config
    from magseg.export import export_model
    from magseg.segmenter import create_refiner, create_segmenter_model

    root = tmp_path_factory.mktemp("exported")
    config = load_config(CONFIGS / "tiny.yaml")
    ckpt = save_checkpoint(root / "tiny.ckpt", config, create_segmenter_model(config), create_refiner(config))
    export_model(ckpt, root / "tiny.onnx")
    return ckpt, root / "tiny.onnx"


@needs_onnx
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without CUDA")
def test_the_onnxruntime_step_runs_the_exported_graph_on_a_cpu_and_says_why_the_gpu_parts_are_skipped(
        exported, tmp_path, capsys):
    import ort_providers

    ckpt, model = exported
    assert ort_providers.main([str(ckpt), str(model), "--json", str(tmp_path / "o.json"), "--batch", "3",
                               "--repeat", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "o.json").read_text()) == result
    import onnxruntime as ort

    config = load_checkpoint(ckpt).config
    bands, classes = config.model.in_channels, len(config.classes)
    shape = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    assert result["batch"] == [3, bands, *shape[2:]]
    assert result["cpu_output_shape"] == [3, classes, *shape[2:]]
    assert result["torch_cuda_seconds_per_batch"] == {"skipped": "torch sees no CUDA device"}
    for name in ort_providers.GPU_PROVIDERS:
        if name not in ort.get_available_providers():  # the CPU package has neither
            assert "pip install onnxruntime-gpu" in result["providers"][name]["skipped"]


@needs_onnx
def test_a_provider_listed_but_not_taken_by_the_session_is_reported_as_a_fallback(exported, monkeypatch, capsys):
    """onnxruntime builds a session with the providers it has when one asked for is missing
    (a warning, not an error): the step then says so rather than timing the CPU as CUDA."""
    import onnxruntime as ort
    import ort_providers

    ckpt, model = exported
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        assert ort_providers.main([str(ckpt), str(model), "--batch", "2", "--repeat", "1"]) == 0
    cuda = json.loads(capsys.readouterr().out)["providers"]["CUDAExecutionProvider"]
    assert cuda == {"skipped": "the session fell back to ['CPUExecutionProvider']"}


@needs_onnx
def test_a_provider_that_fails_on_the_graph_fails_the_step(exported, monkeypatch, capsys):
    import onnxruntime as ort
    import ort_providers

    ckpt, model = exported
    real = ort.InferenceSession

    def session(path, providers=None, **kwargs):
        if providers and providers[0] == "TensorrtExecutionProvider":
            raise RuntimeError("TensorRT EP could not build an engine")
        return real(path, providers=providers, **kwargs)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    assert ort_providers.main([str(ckpt), str(model), "--batch", "2", "--repeat", "1"]) == 1
    providers = json.loads(capsys.readouterr().out)["providers"]
    assert providers["TensorrtExecutionProvider"] == {"error": "RuntimeError: TensorRT EP could not build an engine"}
    assert "skipped" in providers["CUDAExecutionProvider"]


def _venv_is_current() -> bool:
    """Whether this test runs in the checkout's .venv and ``make install`` would do nothing
    (the script runs it: it must not reinstall the environment the tests run in)."""
    venv = REPO / ".venv"
    if Path(sys.prefix).resolve() != venv.resolve():
        return False
    return subprocess.run(["make", "-q", "install"], cwd=REPO, capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs its whole pipeline (minutes)")
def test_gpu_check_on_a_machine_without_cuda_runs_the_cuda_tests_as_skips_and_reports_json(tmp_path):
    if not _venv_is_current():
        pytest.skip("runs only inside the checkout's up-to-date .venv (the script would run make install)")
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "GPU_CHECK_OUT": str(tmp_path / "out")}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    marked = len(re.findall(r"^def test_", (REPO / "tests" / "test_cuda.py").read_text(), flags=re.M))
    assert summary["cuda_available"] is False and summary["runtime"]["device"] == "cpu"
    assert summary["tests"]["exit_code"] == 0 and summary["tests"].get("failed", 0) == 0
    assert summary["tests"]["skipped"] >= marked > 0  # every cuda test collected, each skipped
    assert summary["onnxruntime_gpu"] == {"skipped": "torch sees no CUDA device"}
    assert summary["work_dir"] == str(tmp_path / "out")
    assert summary["environment"] == {"python": ".".join(map(str, sys.version_info[:3])),
                                      "installed": ".venv (make install)", "missing": []}
