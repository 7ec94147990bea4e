"""Which modules a setting passes through from the CLI to the engine: the call stack where it is
parsed and the call stack where the engine reads it, in one in-process ``magseg predict``.

    .venv/bin/python scripts/trace_setting.py                 # K: refine.points, read by num_points
    .venv/bin/python scripts/trace_setting.py --set refine.points=0.25 \\
        --reads magseg.engine.refine_step.num_points --json k_path.json

A fresh tiny model (configs/tiny.yaml) predicts one 128 px GeoTIFF with ``--set KEY=VALUE``.
A profile hook watches every call into magseg: the stack is taken (a) at the deepest call of
``magseg.config`` that receives the ``KEY=VALUE`` string (where the setting is parsed) and (b) at
the first call of ``--reads`` (where the engine uses it). Each stack is read from the command's
function down, as the list of modules it enters (a module twice when it is entered again,
``climbs`` counting a return to a module already on the stack). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stack(frame) -> list[str]:
    """``module.function`` of each magseg frame on ``frame``'s stack, outermost first."""
    calls = []
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name == "magseg" or name.startswith("magseg."):
            calls.append(f"{name}.{frame.f_code.co_name}")
        frame = frame.f_back
    return calls[::-1]


def _summary(calls: list[str]) -> dict:
    """Modules entered along ``calls`` (consecutive frames of one module merged), how many
    distinct, and how many entries return to a module already on the stack."""
    modules = [c.rpartition(".")[0] for c in calls]
    path = [m for i, m in enumerate(modules) if i == 0 or modules[i - 1] != m]
    climbs = sum(m in path[:i] for i, m in enumerate(path))
    return {"modules": len(set(path)), "entries": len(path), "climbs": climbs, "functions": len(calls),
            "path": path, "calls": calls}


def _inputs(tmp: Path) -> tuple[Path, Path]:
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    from magseg.checkpoint import save_checkpoint
    from magseg.config import load_config
    from magseg.segmenter import create_refiner, create_segmenter_model

    config = load_config(ROOT / "configs" / "tiny.yaml")
    ckpt = save_checkpoint(tmp / "tiny.ckpt", config, create_segmenter_model(config), create_refiner(config))
    image = np.random.default_rng(0).integers(0, 255, (3, 128, 128), dtype=np.uint8)
    raster = tmp / "scene.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=128, height=128, count=3, dtype="uint8",
                       crs="EPSG:32631", transform=from_origin(500000, 4000000, 1, 1)) as dst:
        dst.write(image)
    return ckpt, raster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="setting", default="refine.points=0.25", help="KEY=VALUE")
    parser.add_argument("--reads", default="magseg.engine.refine_step.num_points",
                        help="module.function where the engine reads the setting")
    parser.add_argument("--json", type=Path, help="also write the object here")
    args = parser.parse_args()
    module, _, function = args.reads.rpartition(".")

    import torch
    from typer.testing import CliRunner

    import magseg.cli.predict  # noqa: F401  (registers the command)
    from magseg.cli.app import app

    torch.manual_seed(0)
    stacks: dict[str, list[str]] = {}

    def hook(frame, event, _arg):
        if event != "call":
            return
        name = frame.f_globals.get("__name__", "")
        if name == "magseg.config" and any(
                isinstance(v, (list, tuple)) and args.setting in v for v in frame.f_locals.values()):
            stacks["parsed"] = _stack(frame)
        elif "read" not in stacks and name == module and frame.f_code.co_name == function:
            stacks["read"] = _stack(frame)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, raster = _inputs(Path(tmp))
        sys.setprofile(hook)
        try:
            result = CliRunner().invoke(app, ["predict", str(ckpt), str(raster), "-o", str(Path(tmp) / "out"),
                                              "--quiet", "--set", args.setting])
        finally:
            sys.setprofile(None)
    if result.exit_code != 0 or "read" not in stacks or "parsed" not in stacks:
        raise SystemExit(f"predict exit {result.exit_code}, stacks seen: {sorted(stacks)}\n{result.output}")
    parsed, read = _summary(stacks["parsed"]), _summary(stacks["read"])
    out = {"setting": args.setting, "reads": args.reads,
           "modules_in_all": len(set(parsed["path"]) | set(read["path"])),
           "parsed": parsed, "read": read}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        from magseg.io.atomic import atomic_write

        with atomic_write(args.json) as tmp_path:
            tmp_path.write_text(text + "\n")


if __name__ == "__main__":
    main()
