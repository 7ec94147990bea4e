"""magseg.errors: the fields errors carry are declared, set by their constructors, kept when
pickled, and what magseg.io.atomic reads to tell which output a failure belongs to."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from magseg.errors import MagsegError, RasterWriteError, WriteError
from magseg.io.atomic import atomic_write
from magseg.io.vector import VectorWriteError


@pytest.mark.parametrize("cls", [WriteError, RasterWriteError, VectorWriteError])
def test_write_errors_carry_path_and_target(cls):
    plain = cls("disk full")
    assert (str(plain), plain.path, plain.target) == ("disk full", None, None)
    error = cls("disk full", path="/out/.a.tif.x.partial", target=Path("/out/a.tif"))
    assert isinstance(error, WriteError) and isinstance(error, MagsegError)
    assert error.path == Path("/out/.a.tif.x.partial") and error.target == Path("/out/a.tif")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is cls and str(again) == "disk full"
    assert (again.path, again.target) == (error.path, error.target)


def test_a_failure_of_the_temporary_is_described_for_its_target(tmp_path):
    target = tmp_path / "a.bin"
    with pytest.raises(WriteError) as info, atomic_write(target) as tmp:
        raise WriteError("short write", path=tmp)
    assert info.value.target == target and str(info.value).startswith(f"{target}: not written")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_an_attributed_failure_passes_through_unchanged(tmp_path):
    # An inner step attributed the failure to its own output: the outer block keeps its message.
    other = tmp_path / "other.tif"
    with pytest.raises(WriteError) as info, atomic_write(tmp_path / "a.bin"):
        raise WriteError("stage maps could not be written; nothing was written", target=other)
    assert info.value.target == other and str(info.value) == "stage maps could not be written; nothing was written"


def test_a_failure_of_another_file_is_not_taken_for_this_one(tmp_path):
    with pytest.raises(WriteError) as info, atomic_write(tmp_path / "a.bin"):
        raise WriteError("cannot write", path=tmp_path / "elsewhere" / "b.bin")
    assert info.value.target is None and str(info.value) == "cannot write"
