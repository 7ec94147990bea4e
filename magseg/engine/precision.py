"""Numeric precision: what ``auto`` means on this machine, the autocast that runs a choice,
and the description of the hardware that every record and report carries.

``fp32`` is the reference: tests that compare with a hand-made fp32 result ask for it by
name. ``bf16`` and ``fp16`` run the backbone under ``torch.autocast``, on any device; a CPU
without native bf16 (AVX512-BF16 or AMX) or fp16 emulates them, slower than fp32 but with
the same rounding, so every precision path can be tested on every CPU.

``auto`` picks the fastest precision the device computes natively: ``fp16`` on CUDA, ``bf16``
on a CPU with AVX512-BF16 or AMX, else ``fp32``; what that costs in accuracy and buys in
speed is in docs/precision.md. The resolved choice is named in every output, so a result can
always be traced to what computed it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from magseg.config import EngineConfig

Precision = Literal["fp32", "bf16", "fp16", "int8"]
# int8 is the backbone's in OpenVINO only (its quantised graph: magseg.engine.int8); the
# engine's own torch work around it runs fp32, as it does for every graph runtime.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_supports(probe: str) -> bool:
    # torch.cpu's feature probes are private; a torch without one answers "no".
    return bool(getattr(torch.cpu, probe, lambda: False)())


# The /proc/cpuinfo flags of int8 dot products summed in int32.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower
    than fp32, so ``auto`` must not pick it elsewhere."""
    return _cpu_supports("_is_avx512_bf16_supported") or _cpu_supports("_is_amx_tile_supported")


def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI's int8 dot products, which sum in int32: AVX512-VNNI
    (torch's probe), or AVX-VNNI or AMX-INT8 (the kernel's flags; torch probes neither).
    Without them, x86 int8 kernels multiply u8 by s8 in pairs summed into int16
    (VPMADDUBSW), which can saturate."""
    return _cpu_supports("_is_vnni_supported") or not VNNI_FLAGS.isdisjoint(cpu_flags())


def resolve_precision(device: torch.device | str, precision: str) -> Precision:
    """``auto`` -> ``fp16`` on CUDA, ``bf16`` on a CPU with native bf16, else ``fp32``;
    any other choice is returned as it is."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose auto, {', '.join(PRECISIONS)}")
        return precision  # type: ignore[return-value]
    device = torch.device(device)
    if device.type == "cuda":
        return "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def precision_context(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``bf16``/``fp16`` (``auto`` resolved first); nothing for ``fp32``."""
    device = torch.device(device)
    return autocast(device, resolve_precision(device, precision))


def autocast(device: torch.device | str, resolved: Precision) -> contextlib.AbstractContextManager:
    """Autocast for a precision already resolved (never ``auto``): nothing for ``fp32``, nor
    for ``int8``, which only a graph runtime computes."""
    if resolved in ("fp32", "int8"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AUTOCAST_DTYPES[resolved])


def resolved_engine(engine: EngineConfig, device: torch.device | str) -> EngineConfig:
    """``engine`` on ``device`` with its precision resolved: a run that segments many times
    (training's validation, refiner inputs and coarse maps) decides what ``auto`` means once,
    not once per crop batch."""
    return dataclasses.replace(engine, device=str(device), precision=resolve_precision(device, engine.precision))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> list[str]:
    """The CPU's flags as the kernel lists them (``/proc/cpuinfo``), sorted; empty where
    there is no such file."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


# The /proc/cpuinfo flags that decide how fast, and in which kernels, each precision runs:
# bf16 natively (AVX512-BF16, AMX-BF16), and int8 with 32-bit accumulation (VNNI, AMX-INT8)
# rather than AVX2's pairs of products summed in int16.
PRECISION_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                   "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def precision_flags() -> list[str]:
    """Which of ``PRECISION_FLAGS`` this CPU has, in that order."""
    present = set(cpu_flags())
    return [flag for flag in PRECISION_FLAGS if flag in present]


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """The CPU as the numbers depend on it: model, torch's kernel level (e.g. ``AVX512``,
    ``AVX2``), native bf16 and AMX, and torch's thread count when first asked."""
    return {
        "model": _cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": _cpu_supports("_is_avx512_bf16_supported"),
        "amx": _cpu_supports("_is_amx_tile_supported"),
    }


def runtime_info(device: torch.device | str, precision: str) -> dict[str, Any]:
    """What computes a result: ``{"device", "precision" (resolved), "cpu", "gpu"}``, the block
    predict records, benchmark reports and training logs all carry."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "device": str(device),
        "precision": resolve_precision(device, precision),
        "cpu": {**cpu_info(), "threads": torch.get_num_threads()},
        "gpu": None,
    }
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
