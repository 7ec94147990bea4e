"""Shared CLI conventions: input lists, NDJSON lines."""

import io
import json

import pytest
import typer
from magseg.cli.common import emit, expand_inputs


def test_expand_inputs_files_globs_dirs_and_stdin(tmp_path):
    for name in ("a.tif", "b.TIF", "c.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "d.tif").write_bytes(b"x")
    stdin = io.StringIO(f"{sub / 'd.tif'}\n# a comment\n\n{tmp_path / 'c.png'}\n")
    got = expand_inputs(
        [str(tmp_path / "a.tif"), str(tmp_path / "*.png"), str(sub), "-", str(tmp_path)],
        (".tif", ".png"), stdin=stdin,
    )
    # order kept, duplicates dropped, the directory's files sorted and filtered by suffix
    assert [p.name for p in got] == ["a.tif", "c.png", "d.tif", "b.TIF"]


def test_a_named_missing_file_is_kept_to_be_reported_later(tmp_path):
    assert expand_inputs([str(tmp_path / "missing.tif")], (".tif",)) == [tmp_path / "missing.tif"]


def test_a_glob_matching_nothing_is_a_usage_error(tmp_path):
    with pytest.raises(typer.BadParameter, match="no file matches"):
        expand_inputs([str(tmp_path / "*.tif")], (".tif",))


def test_an_unsearchable_directory_does_not_crash_the_expansion(tmp_path, monkeypatch):
    # What stat() raises under a directory we may not search (root never sees it, so the
    # error is raised on purpose here).
    from pathlib import Path

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_dir", denied)
    assert expand_inputs([str(tmp_path / "x.tif")], (".tif",)) == [tmp_path / "x.tif"]


def test_emit_writes_one_json_line_with_nan_as_null(capsys):
    emit({"miou": float("nan"), "ok": 1, "path": tmp_path_like()})
    line = capsys.readouterr().out
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == {"miou": None, "ok": 1, "path": "/x/y"}


def tmp_path_like():
    from pathlib import Path

    return Path("/x/y")


def test_a_file_whose_name_has_glob_characters_is_taken_as_named(tmp_path):
    (tmp_path / "br[1].tif").write_bytes(b"x")
    (tmp_path / "b1.tif").write_bytes(b"x")   # what the pattern would match
    assert expand_inputs([str(tmp_path / "br[1].tif")], (".tif",)) == [tmp_path / "br[1].tif"]
    # A pattern that names no file is still a pattern.
    assert expand_inputs([str(tmp_path / "b[1].tif")], (".tif",)) == [tmp_path / "b1.tif"]


def test_a_nul_byte_on_stdin_or_in_a_name_is_a_usage_error(tmp_path):
    with pytest.raises(typer.BadParameter, match="line 2 of stdin holds a NUL byte"):
        expand_inputs(["-"], (".tif",), stdin=io.StringIO("a.tif\nb\0c.tif\n"))
    with pytest.raises(typer.BadParameter, match="holds a NUL byte"):
        expand_inputs(["a\0.tif"], (".tif",))
