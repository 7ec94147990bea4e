"""magseg.allocator: large blocks come from the heap (not mmap) once the setting is on.

Each case runs in a fresh interpreter, since the setting is process-wide and one-way. What it
reads back is glibc's own account (mallinfo2): bytes currently held in mmap'd blocks.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

_PROBE = r"""
import ctypes, json
import torch
from magseg.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
kept = keep_freed_memory()
big = torch.empty(64 * 2**20, dtype=torch.uint8)  # 64 MB: above any mmap threshold
big.fill_(1)
held = libc.mallinfo2()
del big
after = libc.mallinfo2()
print(json.dumps({"kept": kept, "mmapped": held.hblkhd, "heap": held.arena, "heap_after_free": after.arena}))
"""


def _probe(**env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_large_blocks_come_from_the_heap_and_stay_there() -> None:
    info = _probe(MAGSEG_SYSTEM_MALLOC="0")
    assert info["kept"] is True
    assert info["mmapped"] < 64 * 2**20  # the 64 MB tensor is not an mmap'd block ...
    assert info["heap"] >= 64 * 2**20  # ... it is in the heap,
    assert info["heap_after_free"] == info["heap"]  # which is not trimmed when it is freed


def test_opt_out_keeps_glibc_defaults() -> None:
    info = _probe(MAGSEG_SYSTEM_MALLOC="1")
    assert info["kept"] is False
    assert info["mmapped"] >= 64 * 2**20  # glibc's default: a block this large is mmap'd


def test_the_command_turns_it_on() -> None:
    # `magseg` itself calls keep_freed_memory before any command runs.
    code = ("import sys; from magseg.cli import app; from magseg import allocator;\n"
            "sys.argv = ['magseg', '--version']\n"
            "try:\n    app.main()\nexcept SystemExit:\n    pass\n"
            "print(allocator.keep_freed_memory.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MAGSEG_SYSTEM_MALLOC": "0"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "1"
