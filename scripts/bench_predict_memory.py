"""Peak memory of `magseg predict` on a small and a large GeoTIFF with the same checkpoint.

    python scripts/bench_predict_memory.py                       # 4096^2 and 16384^2
    python scripts/bench_predict_memory.py --sizes 1024 4096     # a quicker check
    python scripts/bench_predict_memory.py --json bench/predict_memory.json

For each size: a synthetic 3-band uint8 GeoTIFF is written tile by tile (so generating it is
flat in memory too), then `magseg predict` runs on it in a fresh process and that process's
peak resident set size (``ru_maxrss`` from ``wait4``) is recorded with its wall time. The
target: the larger raster needs at most 1.3 x the memory of the smaller, and under 2 GB.

The checkpoint (made here unless --checkpoint is given) is a real smp model, Unet with a
ResNet-18 encoder (random weights: memory and time do not depend on them), on the design's
4-stage pyramid 256 -> 512 -> 1024 -> 2048 (crop 256, input 256: a 2048 px scene), 5 classes.
By default the engine runs in adaptive mode (``engine.adaptive.max_crops=2``): the memory
of a window is the same (the stage images and probability maps are full size either way),
but a 16384^2 raster then takes minutes instead of an hour on two CPU cores. Pass
``--set engine.adaptive.max_crops=null`` for the full method.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(path: Path) -> Path:
    """Unet/ResNet-18 on the 256..2048 pyramid, random weights, stored normalisation."""
    from magseg.checkpoint import save_checkpoint
    from magseg.config import load_config
    from magseg.segmenter import create_refiner, create_segmenter_model

    config = load_config(REPO / "configs" / "pyramid256.yaml", [
        "model.arch=Unet", "model.encoder=resnet18", "model.encoder_weights=none",
        "data.mean=[110.0,115.0,100.0]", "data.std=[50.0,48.0,45.0]",
    ])
    return save_checkpoint(path, config, create_segmenter_model(config), create_refiner(config))


def make_geotiff(path: Path, size: int) -> Path:
    """A ``size`` x ``size`` 3-band uint8 GeoTIFF of smooth synthetic land, written one
    512 px tile at a time (its content is a function of the global pixel position, so tiles
    join without seams)."""
    from rasterio.crs import CRS
    from rasterio.transform import Affine

    from magseg.io.raster import BLOCK, GeoInfo, PixelWindow, RasterWriter, io_env

    geo = GeoInfo(CRS.from_epsg(32633), Affine(0.5, 0, 500_000.0, 0, -0.5, 5_000_000.0))
    rng = np.random.default_rng(0)
    freqs = rng.uniform(0.002, 0.02, size=(3, 4, 2))
    phases = rng.uniform(0, 2 * np.pi, size=(3, 4))
    with io_env(), RasterWriter(path, (size, size), 3, geo, nodata=None) as writer:
        for row in range(0, size, BLOCK):
            for col in range(0, size, BLOCK):
                h, w = min(BLOCK, size - row), min(BLOCK, size - col)
                y, x = np.mgrid[row : row + h, col : col + w].astype(np.float32)
                bands = []
                for b in range(3):
                    v = sum(np.sin(freqs[b, k, 0] * x + freqs[b, k, 1] * y + phases[b, k])
                            for k in range(4))
                    bands.append(np.clip(120 + 30 * v, 1, 255))
                writer.write(np.stack(bands).astype(np.uint8), PixelWindow(row, col, h, w))
    return path


def run_predict(checkpoint: Path, raster: Path, out_dir: Path, settings: list[str],
                threads: int | None) -> dict:
    """`magseg predict` in a fresh process: its peak RSS (MB), wall time and NDJSON record."""
    cmd = [sys.executable, "-m", "magseg.cli.app", "predict", str(checkpoint), str(raster),
           "--out-dir", str(out_dir), "--overwrite", "--quiet"]
    for item in settings:
        cmd += ["--set", item]
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    # wait4 gives this child's own rusage (not the sum over every child reaped so far).
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"predict failed on {raster} (exit {code}):\n{stderr}")
    return {
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),   # Linux: ru_maxrss in KiB
        "wall_s": round(wall, 1),
        "record": json.loads(stdout.splitlines()[-1]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[4096, 16384], metavar=("SMALL", "LARGE"))
    parser.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of making one")
    parser.add_argument("--work-dir", type=Path, help="where rasters and outputs go (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--set", dest="settings", action="append",
                        default=None, help="run-time override for predict (repeatable)")
    parser.add_argument("--threads", type=int, help="OMP/MKL threads of the predict process")
    args = parser.parse_args(argv)
    settings = args.settings if args.settings is not None else ["engine.adaptive.max_crops=2"]

    with tempfile.TemporaryDirectory(prefix="magseg-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = args.checkpoint or make_checkpoint(work / "bench.ckpt")
        results = {}
        for size in args.sizes:
            raster = work / f"synthetic_{size}.tif"
            if not raster.exists():
                t = time.perf_counter()
                make_geotiff(raster, size)
                print(f"made {raster.name} ({raster.stat().st_size / 2**20:.0f} MiB) in "
                      f"{time.perf_counter() - t:.0f} s", file=sys.stderr)
            res = run_predict(checkpoint, raster, work / "out", settings, args.threads)
            results[str(size)] = res
            print(f"{size:>6} x {size:<6} peak RSS {res['peak_rss_mb']:8.1f} MB   wall "
                  f"{res['wall_s']:7.1f} s   windows {res['record']['windows']}")
        small, large = (results[str(s)]["peak_rss_mb"] for s in args.sizes)
        ratio = large / small
        ok = ratio <= 1.3 and large < 2048
        print(f"ratio {args.sizes[1]}^2 / {args.sizes[0]}^2: {ratio:.3f} "
              f"(target <= 1.3 and < 2048 MB: {'met' if ok else 'NOT met'})")
        report = {
            "sizes": args.sizes, "results": results, "ratio": round(ratio, 3), "target_met": ok,
            "checkpoint": str(args.checkpoint) if args.checkpoint else
            "Unet/resnet18, pyramid 256-512-1024-2048, crop 256, input 256, 5 classes (random weights)",
            "settings": settings, "threads": args.threads, "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(), "machine": platform.platform(),
        }
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
