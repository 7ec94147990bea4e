"""`magseg predict` on large GeoTIFFs: crops run, wall time, peak memory and scratch space,
against a patch-only sliding window over the same raster, in one run.

    python scripts/bench_predict.py                            # 4096^2, 8192^2 and 16384^2
    python scripts/bench_predict.py --sizes 2048 4096 --baseline 4096   # a quicker check
    python scripts/bench_predict.py --json bench/predict.json

For each size a synthetic 3-band uint8 GeoTIFF is written tile by tile (flat in memory too),
then `magseg predict` runs on it in a fresh process: its peak resident set size
(``ru_maxrss`` from ``wait4``), wall time, crops run and ``scratch_bytes`` are recorded. At the
``--baseline`` sizes the same command also runs patch-only (one stage at the finest scale, no
refinement: a plain sliding window of crops, with the same reading and writing), (p).

The model: configs/deepglobe.yaml (612 -> 1224 -> 2448, crop 612, input 512) with Unet and a
ResNet-18 encoder, random weights (time and memory do not depend on them), fp32.

Targets: crops equal one pyramid over the whole raster (84, 261, 974 at 4896^2, 8192^2,
16384^2); predict wall / (p) <= 1.45 at 8192^2; peak RSS at the largest size <= 1.3 x that at
the smallest, and under 2 GB.
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


MODEL = "configs/deepglobe.yaml, Unet/resnet18 (random weights), fp32"


def patch_only_and_label(checkpoint: Path, settings: list[str]) -> tuple[list[str], str]:
    """The settings that make ``checkpoint`` patch-only (its one finest stage, as the other
    settings leave the pyramid) and what to call its model in the report."""
    from magseg.checkpoint import load_checkpoint, run_config

    config = run_config(load_checkpoint(checkpoint), settings)
    h, w = config.pyramid.scales[-1]
    label = (f"{checkpoint}: {config.model.arch}/{config.model.encoder}, pyramid "
             f"{' -> '.join(f'{a}x{b}' for a, b in config.pyramid.scales)}")
    return [f"pyramid.scales=[[{h}, {w}]]"], label


def make_checkpoint(path: Path) -> Path:
    """Unet/ResNet-18 on DeepGlobe's 612..2448 pyramid, random weights, fp32."""
    from magseg.checkpoint import save_checkpoint
    from magseg.config import load_config
    from magseg.segmenter import create_refiner, create_segmenter_model

    config = load_config(REPO / "configs" / "deepglobe.yaml", [
        "model.arch=Unet", "model.encoder=resnet18", "model.encoder_weights=none",
        "data.mean=[110.0,115.0,100.0]", "data.std=[50.0,48.0,45.0]", "engine.precision=fp32",
    ])
    return save_checkpoint(path, config, create_segmenter_model(config), create_refiner(config))


def make_geotiff(path: Path, size: int) -> Path:
    """A ``size`` x ``size`` 3-band uint8 GeoTIFF of smooth synthetic land, written one
    512 px tile at a time (its content is a function of the global pixel position, so tiles
    join without seams)."""
    from rasterio.crs import CRS
    from rasterio.transform import Affine

    from magseg.geometry import Rect
    from magseg.io.raster import BLOCK, GeoInfo, RasterWriter, io_env

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
                writer.write(np.stack(bands).astype(np.uint8), Rect(row, col, h, w))
    return path


def run_predict(checkpoint: Path, raster: Path, out_dir: Path, settings: list[str],
                threads: int | None) -> dict:
    """`magseg predict` in a fresh process: its peak RSS (MB), wall time and NDJSON record."""
    # -P: the working directory is not put first on the path, where a checkout's magseg/
    # folder would stand in for an installed (not editable) magseg, which has magseg.cli.
    cmd = [sys.executable, "-P", "-m", "magseg.cli.app", "predict", str(checkpoint), str(raster),
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
    record = json.loads(stdout.splitlines()[-1])
    return {
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),   # Linux: ru_maxrss in KiB
        "wall_s": round(wall, 1),
        "crops": record["crops"],
        "scratch_bytes": record["scratch_bytes"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--baseline", type=int, nargs="*", default=[8192],
                        help="sizes at which the patch-only sliding window runs too")
    parser.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of making one")
    parser.add_argument("--work-dir", type=Path, help="where rasters and outputs go (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--set", dest="settings", action="append", default=[],
                        help="run-time override for predict (repeatable)")
    parser.add_argument("--threads", type=int, help="OMP/MKL threads of the predict process")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "scripts"))
    from figures import report

    with tempfile.TemporaryDirectory(prefix="magseg-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = args.checkpoint or make_checkpoint(work / "bench.ckpt")
        patch_only, label = patch_only_and_label(checkpoint, args.settings)
        results = {}
        for size in args.sizes:
            raster = work / f"synthetic_{size}.tif"
            if not raster.exists():
                t = time.perf_counter()
                make_geotiff(raster, size)
                print(f"made {raster.name} ({raster.stat().st_size / 2**20:.0f} MiB) in "
                      f"{time.perf_counter() - t:.0f} s", file=sys.stderr)
            res = run_predict(checkpoint, raster, work / "out", args.settings, args.threads)
            if size in args.baseline:
                res["patch_only"] = run_predict(checkpoint, raster, work / "out_p",
                                                args.settings + patch_only, args.threads)
                res["wall_over_patch_only"] = round(res["wall_s"] / res["patch_only"]["wall_s"], 3)
            results[str(size)] = res
            raster.unlink()  # disk: a 16384^2 raster is 768 MiB
            print(f"{size:>6}^2  crops {res['crops']:5d}  wall {res['wall_s']:7.1f} s  peak RSS "
                  f"{res['peak_rss_mb']:7.1f} MB  scratch {res['scratch_bytes'] / 2**20:7.1f} MiB"
                  + (f"  (p) {res['patch_only']['wall_s']:.1f} s, ratio {res['wall_over_patch_only']}"
                     if "patch_only" in res else ""), file=sys.stderr)
        small, large = (results[str(s)]["peak_rss_mb"] for s in (min(args.sizes), max(args.sizes)))
        figures = {
            "model": label if args.checkpoint else MODEL, "settings": args.settings, "threads": args.threads,
            "results": results, "rss_ratio": round(large / small, 3),
            "rss_target_met": large / small <= 1.3 and large < 2048,
            "load_average_at_end": os.getloadavg(), "machine": platform.platform(),
        }
        report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
