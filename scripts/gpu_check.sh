#!/usr/bin/env bash
# GPU readiness in one run, on a machine with one CUDA device (about 5-8 minutes), needing
# only `make install` (which this script runs):
#   1. the tests marked `cuda` (they skip cleanly where there is no GPU);
#   2. the demo's data, a short training on the GPU, then `magseg benchmark` of that
#      checkpoint on CUDA at fp16 and at fp32 (mIoU and s/image of every method);
#   3. scripts/bench_engine.py --device cuda at fp16 and fp32 (engine overhead b/a);
#   4. ONNX Runtime on the GPU: that checkpoint exported (`magseg export`), run by the CUDA and
#      TensorRT execution providers where the installed onnxruntime has them (onnxruntime-gpu,
#      which replaces the CPU package: pip uninstall onnxruntime && pip install
#      onnxruntime-gpu), each against the CPU provider's output and torch CUDA's time on the
#      same batch; a provider that is absent is reported as skipped, with the reason.
# Prints one JSON summary on stdout (progress on stderr) and exits non-zero if a step failed.
#
#   bash scripts/gpu_check.sh                 # work files under a temporary directory
#   GPU_CHECK_OUT=/tmp/gpu bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

out=${GPU_CHECK_OUT:-$(mktemp -d -t magseg-gpu-check.XXXXXX)}
mkdir -p "$out"
make install >&2 || { echo '{"error": "make install failed"}'; exit 1; }
py=.venv/bin/python
magseg=.venv/bin/magseg
step() { echo "== gpu_check: $*" >&2; }

step "tests marked cuda"
$py -m pytest -q -m cuda -rs tests/ >"$out/pytest.log" 2>&1
tests_rc=$?
tail -n 3 "$out/pytest.log" >&2

cuda=$($py -c 'import torch; print(int(torch.cuda.is_available()))')
demo_rc=0 bench_rc=0 ort_rc=0
if [[ "$cuda" == 1 ]]; then
    step "demo data and a short training on cuda"
    # The demo's recipe with fewer epochs: a checkpoint that segments, in about a minute.
    $py scripts/demo.py --out "$out/demo" --epochs 3 engine.device=cuda >"$out/demo.log" 2>&1 || demo_rc=$?
    ckpt="$out/demo/run/best.ckpt"
    for p in fp16 fp32; do
        step "demo benchmark on cuda at $p"
        $magseg benchmark "$ckpt" --data-root "$out/demo/data" --split test --out-dir "$out/bench_$p" \
            --overwrite --quiet --device cuda --set "engine.precision=$p" \
            >"$out/bench_$p.ndjson" 2>>"$out/demo.log" || demo_rc=$?
    done
    for p in fp16 fp32; do
        step "bench_engine on cuda at $p"
        $py scripts/bench_engine.py --device cuda --precision "$p" --repeat 5 \
            --json "$out/engine_$p.json" >/dev/null 2>>"$out/engine.log" || bench_rc=$?
    done
    step "onnxruntime CUDA / TensorRT providers"
    if [[ -f "$ckpt" ]] && $magseg export "$ckpt" -o "$out/demo.onnx" --overwrite --quiet \
            >/dev/null 2>>"$out/ort.log"; then
        $py - "$ckpt" "$out/demo.onnx" "$out/ort_gpu.json" 2>>"$out/ort.log" <<'PY' || ort_rc=$?
import json, sys, time

import numpy as np

ckpt, model, out = sys.argv[1:]
try:
    import onnxruntime as ort
except ImportError:
    json.dump({"skipped": "onnxruntime is not installed (pip install onnxruntime-gpu)"}, open(out, "w"))
    sys.exit(0)
import torch

from magseg.checkpoint import load_checkpoint, load_state
from magseg.segmenter import create_segmenter_model

available = ort.get_available_providers()
result = {"onnxruntime": ort.__version__, "available_providers": available, "providers": {}}
cpu = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
inp = cpu.get_inputs()[0]
x = np.random.default_rng(0).standard_normal((8, *inp.shape[1:])).astype(np.float32)
want = cpu.run(None, {inp.name: x})[0]


def timed(run, repeat=10):
    run()  # warm-up: cuDNN autotuning, TensorRT's engine build
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


failed = False
for name in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
    if name not in available:
        result["providers"][name] = {"skipped": f"not among onnxruntime's providers {available} "
                                               "(pip install onnxruntime-gpu; TensorRT also needs its libraries)"}
        continue
    try:
        session = ort.InferenceSession(model, providers=[name, "CPUExecutionProvider"])
        if session.get_providers()[0] != name:
            result["providers"][name] = {"skipped": f"session fell back to {session.get_providers()}"}
            continue
        got = session.run(None, {inp.name: x})[0]
        result["providers"][name] = {
            "seconds_per_batch": timed(lambda: session.run(None, {inp.name: x})),
            "max_abs_prob_diff_vs_cpu": float(np.abs(got - want).max()),
            "label_agreement_vs_cpu": float((got.argmax(1) == want.argmax(1)).mean()),
        }
    except Exception as error:  # noqa: BLE001 - reported, and the step fails
        result["providers"][name] = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
        failed = True
checkpoint = load_checkpoint(ckpt)
backbone = create_segmenter_model(checkpoint.config, pretrained=False)
load_state(backbone, checkpoint.backbone, "backbone", checkpoint.path)
backbone = backbone.cuda().eval()
batch = torch.from_numpy(x).cuda()


def torch_run(dtype):
    def run():
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = backbone(batch)
            (out[0] if isinstance(out, (tuple, list)) else out).softmax(1)
        torch.cuda.synchronize()
    return run


result["torch_cuda_seconds_per_batch"] = {"fp32": timed(torch_run(torch.float32)),
                                          "fp16": timed(torch_run(torch.float16))}
result["batch"] = list(x.shape)
json.dump(result, open(out, "w"))
sys.exit(1 if failed else 0)
PY
    else
        ort_rc=1
        echo "magseg export of $ckpt failed (see $out/ort.log)" >&2
    fi
fi

$py - "$out" "$cuda" "$tests_rc" "$demo_rc" "$bench_rc" "$ort_rc" <<'PY'
import json, re, sys
from pathlib import Path

import torch

from magseg.engine.precision import runtime_info

out, cuda, tests_rc, demo_rc, bench_rc, ort_rc = Path(sys.argv[1]), sys.argv[2] == "1", *map(int, sys.argv[3:])
log = (out / "pytest.log").read_text()
counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", log)}
summary = {
    "cuda_available": cuda,
    "runtime": runtime_info("cuda" if cuda else "cpu", "auto"),
    "torch": torch.__version__,
    "tests": {"exit_code": tests_rc, **counts},
    "work_dir": str(out),
}
if cuda:
    summary["demo_benchmark"] = {}
    for p in ("fp16", "fp32"):
        report = out / f"bench_{p}" / "report.json"
        if report.exists():
            methods = json.loads(report.read_text())["methods"]
            summary["demo_benchmark"][p] = {
                name: {"miou": round(100 * m["miou"], 2) if m["miou"] is not None else None,
                       "seconds_per_image": round(m["seconds_per_image"], 4)}
                for name, m in methods.items()}
    summary["bench_engine"] = {}
    for p in ("fp16", "fp32"):
        path = out / f"engine_{p}.json"
        if path.exists():
            figures = json.loads(path.read_text())
            summary["bench_engine"][p] = {k: v for k, v in figures.items()
                                          if not isinstance(v, (dict, list))}
    ort_json = out / "ort_gpu.json"
    summary["onnxruntime_gpu"] = (json.loads(ort_json.read_text()) if ort_json.exists()
                                  else {"error": f"no result; see {out / 'ort.log'}"})
    summary["exit_codes"] = {"demo": demo_rc, "bench_engine": bench_rc, "onnxruntime_gpu": ort_rc}
else:
    summary["onnxruntime_gpu"] = {"skipped": "torch sees no CUDA device"}
print(json.dumps(summary, indent=1))
PY
[[ $tests_rc == 0 && $demo_rc == 0 && $bench_rc == 0 && $ort_rc == 0 ]]
