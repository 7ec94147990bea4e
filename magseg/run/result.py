"""One input's outcome in predict: ``PredictResult``, and the NDJSON line it becomes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PredictResult:
    """One input's outcome; ``to_record`` is the NDJSON line ``magseg predict`` prints."""

    input: Path
    output: Path
    status: str  # "ok", "skipped" (outputs exist) or "failed"
    seconds: float = 0.0
    width: int | None = None
    height: int | None = None
    histogram: dict[str, int] | None = None
    windows: int = 0  # 1 when the raster was segmented (the whole raster is one scene)
    crops: int = 0  # crops that went through the backbone, all stages
    scratch_bytes: int = 0  # the most the stage maps took on disk at once
    outputs: dict[str, Path] = field(default_factory=dict)
    error: str | None = None
    # Done, but the result is suspect: the pixels look unlike the training data's.
    warnings: list[str] = field(default_factory=list)
    # What computed it: device, resolved precision, CPU (magseg.engine.precision.runtime_info).
    runtime: dict[str, Any] = field(default_factory=dict)
    # The finest stage's seam score on the class map and uncertainty (magseg.run.seam_record).
    seam_score: dict[str, Any] | None = None
    # Outputs of this input another model (or no magseg run) made, removed so that all of
    # the input's outputs come from this run's model (--overwrite).
    removed: list[Path] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        return {
            "input": str(self.input),
            "output": str(self.output),
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "width": self.width,
            "height": self.height,
            "histogram": self.histogram,
            "windows": self.windows,
            "crops": self.crops,
            "scratch_bytes": self.scratch_bytes,
            "outputs": {k: str(v) for k, v in self.outputs.items()},
            "error": self.error,
            "warnings": list(self.warnings),
            "seam_score": self.seam_score,
            "removed": [str(p) for p in self.removed],
            **self.runtime,
        }

    def warn(self, warnings: list[str], on_warning: Callable[[str], None] | None) -> None:
        """Add ``warnings`` to the record, and tell ``on_warning`` each at once."""
        for warning in warnings:
            self.warnings.append(warning)
            if on_warning:
                on_warning(warning)
