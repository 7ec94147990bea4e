"""The benchmark report's calibration parts: the ECE table, the reliability diagram, and the
refinement choice training stored in the checkpoint (each candidate's validation gain over
patch-only with its bootstrap interval). Made from ``report.json``'s dict, as the rest of
the report (magseg.evaluation.report)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from magseg.checkpoint import Checkpoint

PLOT_RELIABILITY = "reliability.png"


def training_choice(checkpoint: "str | Path | Checkpoint") -> dict[str, Any] | None:
    """What training chose and why (``meta.refiner_choice`` of the checkpoint, a file or
    one loaded already), with the temperature it stored; None for a checkpoint without either."""
    from magseg.checkpoint import Checkpoint, load_checkpoint

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    choice = ckpt.meta.get("refiner_choice")
    if choice is None and ckpt.calibration is None:
        return None
    return {"refiner_choice": choice, "calibration": ckpt.calibration}


def _ece(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def calibration_markdown(report: dict[str, Any]) -> list[str]:
    """``report.md``'s calibration section (and the training choice, when known)."""
    rows = [(n, m["calibration"]) for n, m in report["methods"].items() if m.get("calibration")]
    lines: list[str] = []
    if rows:
        t = rows[0][1]["temperature"]
        lines += ["## Calibration", "",
                  f"Expected calibration error (15 bins, % of pixels; lower is better) of each method's "
                  f"final probabilities, with the checkpoint's temperature T = {t:.3f} and without it "
                  f"(T = 1). Reliability diagram: `{PLOT_RELIABILITY}`.", "",
                  "| method | ECE, T = 1 | ECE, T = %.3f | backbone runs per crop |" % t, "|---|---|---|---|"]
        for name, cal in rows:
            runs = report["methods"][name].get("backbone_runs_per_crop", 1)
            lines.append(f"| {name} | {_ece(cal['ece_uncalibrated'])} | {_ece(cal['ece'])} | {runs} |")
        lines.append("")
    lines += _choice_markdown(report.get("training_choice"))
    return lines


def _choice_markdown(stored: dict[str, Any] | None) -> list[str]:
    choice = (stored or {}).get("refiner_choice")
    if not choice or "sweep" not in choice:
        return []
    lines = ["## Refinement chosen in training", ""]
    if "interval" in choice:
        lines += [f"Rule: {choice.get('rule', '')}. Chosen: K = {choice['points']}, refiner "
                  f"{'on' if choice['enabled'] else 'off'}, validation mIoU {100 * choice['val_miou']:.1f}"
                  + ("" if choice.get("gain") is None else f" ({100 * choice['gain']:+.1f} points over patch-only)")
                  + ".", "",
                  "| refiner | K | val mIoU | gain over patch-only | 95% interval | beats the noise |",
                  "|---|---|---|---|---|---|"]
        for s in choice["sweep"]:
            lo, hi = s["interval"]
            gain = "n/a" if s.get("gain") is None else f"{100 * s['gain']:+.2f}"
            mark = " (chosen)" if (s["refiner"], s["k"]) == (choice["enabled"], choice["points"]) else ""
            lines.append(f"| {'on' if s['refiner'] else 'off'} | {s['k']}{mark} | {100 * s['val_miou']:.1f} | "
                         f"{gain} | {100 * lo:+.2f} .. {100 * hi:+.2f} | {'yes' if s['beats_noise'] else 'no'} |")
    else:  # a checkpoint chosen by the point estimate alone
        lines += [f"Chosen by the validation mIoU alone: K = {choice['points']}, refiner "
                  f"{'on' if choice['enabled'] else 'off'} (val mIoU {100 * choice['val_miou']:.1f})."]
    return lines + [""]


def reliability_figure(report: dict[str, Any], plt):
    """Accuracy against confidence per bin for every method (the diagonal is calibrated):
    with the checkpoint's temperature (solid) and without it (dotted)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linewidth=1, label="calibrated")
    for k, (name, m) in enumerate(report["methods"].items()):
        cal = m.get("calibration")
        if not cal:
            continue
        for key, style, suffix in (("bins", "-", f"T={cal['temperature']:.2f}"), ("bins_uncalibrated", ":", "T=1")):
            pts = [(b["confidence"], b["accuracy"]) for b in cal[key] if b["pixels"]]
            if pts and (key == "bins" or cal["temperature"] != 1.0):
                ax.plot(*zip(*pts), style, marker="o", markersize=3, color=f"C{k}",
                        label=f"{name}, {suffix} (ECE {_ece(cal['ece' if key == 'bins' else 'ece_uncalibrated'])})")
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Reliability (15 bins)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    return fig
