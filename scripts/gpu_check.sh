#!/usr/bin/env bash
# GPU readiness in one run, on a machine with one CUDA device (about 5-8 minutes), needing
# only `make install` (which this script runs):
#   1. the tests marked `cuda` (they skip cleanly where there is no GPU);
#   2. the demo's data, a short training on the GPU, then `magseg benchmark` of that
#      checkpoint on CUDA at fp16 and at fp32 (mIoU and s/image of every method);
#   3. scripts/bench_engine.py --device cuda at fp16 and fp32 (engine overhead b/a).
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
demo_rc=0 bench_rc=0
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
fi

$py - "$out" "$cuda" "$tests_rc" "$demo_rc" "$bench_rc" <<'PY'
import json, re, sys
from pathlib import Path

import torch

from magseg.engine.precision import runtime_info

out, cuda, tests_rc, demo_rc, bench_rc = Path(sys.argv[1]), sys.argv[2] == "1", *map(int, sys.argv[3:])
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
    summary["exit_codes"] = {"demo": demo_rc, "bench_engine": bench_rc}
print(json.dumps(summary, indent=1))
PY
[[ $tests_rc == 0 && $demo_rc == 0 && $bench_rc == 0 ]]
