#!/usr/bin/env python
"""An exported backbone (``magseg export``) on ONNX Runtime's GPU execution providers, CUDA
and TensorRT, each against the CPU provider's answer, beside the torch backbone on CUDA at
fp32 and fp16 on the same batch: the ONNX Runtime step of ``scripts/gpu_check.sh``.

A provider the installed onnxruntime lacks (the CPU package has neither; ``pip install
onnxruntime-gpu`` replaces it, and TensorRT needs its own libraries too) is reported as
skipped with the reason, and so is torch's timing where torch sees no CUDA device: on a CPU
the script still checks that the exported file loads and runs, which is how CI keeps it
working (``tests/test_gpu_check.py``). Writes one JSON object to ``--json`` (and stdout):

    python scripts/ort_providers.py run/best.ckpt model.onnx --json ort_gpu.json

Exit status 1 if a provider that is there failed to run the graph, else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def timed(run: Callable[[], object], repeat: int) -> float:
    """The median seconds of ``repeat`` calls, after one untimed call (cuDNN's autotuning,
    TensorRT's engine build)."""
    run()
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def provider_results(model: str, cpu: Any, x: np.ndarray, repeat: int) -> tuple[dict, bool]:
    """Each GPU provider's time per batch and agreement with the CPU provider's session
    ``cpu`` on ``x``, or why it was skipped; and whether one that is there failed."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    name = cpu.get_inputs()[0].name
    want = cpu.run(None, {name: x})[0]
    result: dict = {"onnxruntime": ort.__version__, "available_providers": available,
                    "cpu_output_shape": list(want.shape), "providers": {}}
    failed = False
    for provider in GPU_PROVIDERS:
        if provider not in available:
            result["providers"][provider] = {
                "skipped": f"not among onnxruntime's providers {available} (pip install onnxruntime-gpu; "
                           "TensorRT also needs its libraries)"}
            continue
        try:
            session = ort.InferenceSession(model, providers=[provider, "CPUExecutionProvider"])
            if session.get_providers()[0] != provider:
                result["providers"][provider] = {"skipped": f"the session fell back to {session.get_providers()}"}
                continue
            got = session.run(None, {name: x})[0]
            result["providers"][provider] = {
                "seconds_per_batch": timed(lambda: session.run(None, {name: x}), repeat),
                "max_abs_prob_diff_vs_cpu": float(np.abs(got - want).max()),
                "label_agreement_vs_cpu": float((got.argmax(1) == want.argmax(1)).mean()),
            }
        except Exception as error:  # noqa: BLE001 - reported, and the run fails
            result["providers"][provider] = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
            failed = True
    return result, failed


def torch_cuda_seconds(checkpoint_path: str, x: np.ndarray, repeat: int) -> dict:
    """The checkpoint's torch backbone on CUDA, seconds per batch at fp32 and fp16 (the
    softmax included, as the exported graph has it), or why not."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device"}
    from magseg.checkpoint import load_checkpoint, load_state
    from magseg.segmenter import create_segmenter_model

    checkpoint = load_checkpoint(checkpoint_path)
    backbone = create_segmenter_model(checkpoint.config, pretrained=False)
    load_state(backbone, checkpoint.backbone, "backbone", checkpoint.path)
    backbone = backbone.cuda().eval()
    batch = torch.from_numpy(x).cuda()

    def run(dtype: torch.dtype) -> Callable[[], None]:
        def once() -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                out = backbone(batch)
                (out[0] if isinstance(out, (tuple, list)) else out).softmax(1)
            torch.cuda.synchronize()
        return once

    return {"fp32": timed(run(torch.float32), repeat), "fp16": timed(run(torch.float16), repeat)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the checkpoint the model was exported from (for torch's timing)")
    parser.add_argument("model", help="the exported ONNX file (magseg export CKPT -o model.onnx)")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--batch", type=int, default=8, help="inputs per batch")
    parser.add_argument("--repeat", type=int, default=10, help="timed calls per figure")
    args = parser.parse_args(argv)

    try:
        import onnxruntime as ort
    except ImportError:
        result, failed = {"skipped": "onnxruntime is not installed (pip install onnxruntime-gpu)"}, False
    else:
        cpu = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
        # The exported input is (batch, bands, h, w), the batch dynamic: a random batch of it.
        x = np.random.default_rng(0).standard_normal((args.batch, *cpu.get_inputs()[0].shape[1:]))
        x = x.astype(np.float32)
        result, failed = provider_results(args.model, cpu, x, args.repeat)
        result["torch_cuda_seconds_per_batch"] = torch_cuda_seconds(args.checkpoint, x, args.repeat)
        result["batch"] = list(x.shape)
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as file:
            file.write(text + "\n")
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
