"""How the measuring scripts report: one JSON object on stdout (and in ``--json``), always with
the CPU that produced it (model, torch's kernel level, native bf16, AMX), since figures from
different CPUs do not compare."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def report(figures: dict[str, Any], path: Path | None = None) -> None:
    """Print ``figures`` plus ``cpu`` as one JSON line; also write it to ``path``."""
    from magseg.engine.precision import cpu_info

    text = json.dumps({**figures, "cpu": cpu_info()})
    print(text)
    if path:
        path.write_text(text + "\n")
