"""The graph cache as a whole (magseg.cache) and ``magseg cache``: what it lists, what pruning
removes by last use, and what it never touches."""

from __future__ import annotations

import json
import os
import time

import pytest
from typer.testing import CliRunner

from magseg import cache as mc
from magseg.cli.app import _register, app

_register()
DAY = 86_400.0
A, B, C = "a" * 32, "b" * 32, "c" * 32


def _file(path, size, age_days):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    when = time.time() - age_days * DAY
    os.utime(path, (when, when))
    return path


@pytest.fixture
def tree(tmp_path):
    """A cache: model A unused for 40 days; model B with an old graph, a compiled graph last
    used 40 days ago and one used an hour ago; beside them a file and a link magseg did not
    make (the link to an old model-like folder outside)."""
    graphs = tmp_path / "cache" / "graphs"
    _file(graphs / A / "32x32.onnx", 1000, 40)
    _file(graphs / A / "32x32.json", 10, 40)
    _file(graphs / A / "int8.xml", 5, 40)
    _file(graphs / A / "refiner-int8.xml", 3, 40)
    _file(graphs / B / "64x64.probs.onnx", 2000, 40)
    _file(graphs / B / "64x64.probs.json", 20, 40)
    _file(graphs / B / "compiled" / "old.blob", 300, 40)
    _file(graphs / B / "compiled" / "old.json", 3, 40)
    _file(graphs / B / "compiled" / "new.blob", 400, 40)
    _file(graphs / B / "compiled" / "new.json", 4, 1 / 24)  # its sidecar marks the last use
    _file(graphs / "notes.txt", 7, 40)
    outside = tmp_path / "elsewhere" / C
    _file(outside / "32x32.onnx", 50, 40)
    (graphs / C).symlink_to(outside, target_is_directory=True)
    return graphs


def test_entries_report_sizes_graphs_and_last_use(tree):
    found = mc.entries(tree)
    assert [e.path.name for e in found] == [A, B]  # the least recently used first; no link, no file
    a, b = found
    assert (a.bytes, a.graphs, a.compiled, a.int8) == (1018, ("32x32",), 0, ("backbone", "refiner"))
    assert (b.bytes, b.graphs, b.compiled, b.int8) == (2727, ("64x64.probs",), 2, ())
    assert a.last_used == pytest.approx(time.time() - 40 * DAY, abs=60)
    assert b.last_used == pytest.approx(time.time() - DAY / 24, abs=60)


def test_prune_removes_unused_models_and_compiled_graphs_only(tree):
    would = mc.prune(tree, 30 * DAY, dry_run=True)
    assert [(r.path, r.kind, r.bytes, r.error) for r in would] == [
        (tree / A, "model", 1018, None), (tree / B / "compiled" / "old.blob", "compiled", 303, None)]
    assert (tree / A).is_dir() and (tree / B / "compiled" / "old.blob").is_file()  # a dry run removes nothing

    assert [(r.path, r.kind) for r in mc.prune(tree, 30 * DAY)] == [(r.path, r.kind) for r in would]
    assert not (tree / A).exists()
    assert sorted(p.name for p in (tree / B / "compiled").iterdir()) == ["new.blob", "new.json"]
    assert (tree / B / "64x64.probs.onnx").is_file()  # a model in use keeps its graphs
    assert (tree / "notes.txt").is_file() and (tree / C).is_symlink() and (tree / C / "32x32.onnx").is_file()
    assert mc.prune(tree, 30 * DAY) == []


def test_prune_all_removes_every_model_and_nothing_else(tree):
    assert sorted(r.path.name for r in mc.prune(tree, None)) == [A, B]
    assert sorted(p.name for p in tree.iterdir()) == [C, "notes.txt"]


def test_a_part_that_cannot_be_removed_is_reported_and_the_others_are_removed(tree, monkeypatch):
    real = mc.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if os.path.basename(path) == A:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(mc.shutil, "rmtree", rmtree)
    removals = mc.prune(tree, None)
    assert [(r.path.name, r.error) for r in removals] == [
        (A, f"Permission denied: {tree / A}"), (B, None)]
    assert (tree / A).is_dir() and not (tree / B).exists()


def test_a_missing_cache_lists_nothing():
    assert mc.entries(mc.cache_root("/nonexistent/magseg")) == []
    assert mc.prune(mc.cache_root("/nonexistent/magseg"), None) == []


def _cli(*args):
    return CliRunner().invoke(app, ["cache", *map(str, args)])


def _lines(result):
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_magseg_cache_lists_then_prunes(tree):
    root = tree.parent
    listed = _cli("--cache-dir", root)
    assert listed.exit_code == 0, listed.output
    assert [(r["path"], r["bytes"], r["graphs"], r["compiled"], r["int8"]) for r in _lines(listed)] == [
        (str(tree / A), 1018, ["32x32"], 0, ["backbone", "refiner"]), (str(tree / B), 2727, ["64x64.probs"], 2, [])]
    assert "2 model(s), 0.0 MB" in listed.stderr

    dry = _cli("--cache-dir", root, "--older-than", 30, "--dry-run")
    assert dry.exit_code == 0 and {r["status"] for r in _lines(dry)} == {"would-remove"}
    assert (tree / A).is_dir()

    pruned = _cli("--cache-dir", root, "--older-than", 30)
    assert pruned.exit_code == 0, pruned.output
    assert [(r["path"], r["kind"], r["status"]) for r in _lines(pruned)] == [
        (str(tree / A), "model", "removed"), (str(tree / B / "compiled" / "old.blob"), "compiled", "removed")]
    assert not (tree / A).exists() and (tree / B / "compiled" / "new.blob").is_file()


def test_magseg_cache_exits_1_when_a_part_cannot_be_removed(tree, monkeypatch):
    monkeypatch.setattr(mc.shutil, "rmtree", lambda path, *a, **k: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", str(path))))
    result = _cli("--cache-dir", tree.parent, "--all")
    assert result.exit_code == 1
    assert [r["status"] for r in _lines(result)] == ["failed", "failed"]
    assert f"cannot remove {tree / A}: Permission denied" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--all", "--older-than", "3"], "give one"),
    (["--dry-run"], "--dry-run goes with --older-than DAYS or --all"),
    (["--older-than", "-1"], "--older-than"),
])
def test_magseg_cache_usage_errors(tree, args, message):
    result = _cli("--cache-dir", tree.parent, *args)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output
    assert (tree / A).is_dir() and (tree / B / "compiled" / "old.blob").is_file()


def test_magseg_cache_refuses_a_file_as_its_directory(tmp_path):
    (tmp_path / "file").write_text("")
    result = _cli("--cache-dir", tmp_path / "file")
    assert result.exit_code == 2 and "is a file, not a directory" in result.stderr


def test_magseg_cache_names_the_folder_to_give_when_given_graphs_itself(tree):
    result = _cli("--cache-dir", tree, "--all")
    assert result.exit_code == 2 and f"pass the folder above it, {tree.parent}" in result.stderr
    assert (tree / A).is_dir() and (tree / B).is_dir()


def test_magseg_cache_answers_without_importing_torch(tree):
    """The command only reads folders: it never pays for torch's import (seconds)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys
        from magseg.cli.app import main
        sys.argv = ["magseg", "cache", "--cache-dir", {str(tree.parent)!r}, "-q"]
        try:
            main()
        except SystemExit as stop:
            assert not stop.code, stop.code
        print("torch" in sys.modules, file=sys.stderr)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr.strip().splitlines()[-1] == "False", out.stderr[-2000:]
    assert [json.loads(line)["path"] for line in out.stdout.splitlines()] == [str(tree / A), str(tree / B)]
