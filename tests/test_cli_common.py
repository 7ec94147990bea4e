"""Shared CLI conventions: input lists, NDJSON lines."""

import io
import json
import subprocess
import sys
import textwrap

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


# ------------------------------------------------------------------------------------------
# The option registry: a shared flag is one definition, used by every command that takes it.

def _commands():
    from magseg.cli.app import _register, app

    _register()
    return typer.main.get_command(app).commands


SHARED = {  # cli.common's definition -> the commands that take it
    "SETTINGS": ("train", "predict", "benchmark", "suggest"),
    "DEVICE": ("train", "predict", "benchmark", "suggest"),
    "QUIET": ("train", "predict", "benchmark", "suggest"),
    "BATCH_SIZE": ("predict", "benchmark", "suggest"),
    "TTA": ("predict", "benchmark", "suggest"),
    "RUNNER": ("predict", "benchmark"),
    "RAY_ADDRESS": ("predict", "benchmark"),
    "WORKERS": ("predict", "benchmark"),
    "REMOVED_ENGINE": ("predict", "benchmark"),
    "OVERWRITE": ("train", "predict", "benchmark", "export", "vectorize", "suggest"),
    "ADAPTIVE_THRESHOLD": ("predict", "benchmark"),
    "ADAPTIVE_MAX_CROPS": ("predict", "benchmark"),
    "DATA_ROOT": ("train", "benchmark"),
}


@pytest.mark.parametrize("name", list(SHARED))
def test_a_shared_option_is_the_registrys_object_in_every_command(name):
    import inspect

    from magseg.cli import common

    commands = _commands()
    for command in SHARED[name]:
        defaults = [p.default for p in inspect.signature(commands[command].callback).parameters.values()]
        assert any(d is getattr(common, name) for d in defaults), (name, command)
    # ... and so the parser sees the same flag, help and default in each.
    flag = getattr(common, name).param_decls[0]
    seen = {(tuple(p.opts), p.help, p.default, p.hidden)
            for c in SHARED[name] for p in commands[c].params if flag in p.opts}
    assert len(seen) == 1, seen


# Commands that write one named file, where -o names that file (--output), not a directory.
ONE_FILE = {"export"}
# Write into the graph cache, or remove from it (engine.cache_dir, where predict reads it),
# so they take no -o.
INTO_THE_CACHE = {"quantize", "cache"}


def test_out_dir_is_the_same_flag_in_every_command():
    """-o is where a command's outputs go: the directory (--out-dir) of every command that
    writes several files per input; export writes one model file (--output), as
    ``gdal_translate`` or ``torch.onnx.export`` name theirs; quantize writes into the cache
    and cache prunes it."""
    for name, command in _commands().items():
        if name in INTO_THE_CACHE:
            assert not [p for p in command.params if "-o" in p.opts], name
            continue
        (param,) = [p for p in command.params if "-o" in p.opts]
        if name in ONE_FILE:
            assert param.opts == ["--output", "-o"] and param.required, name
            continue
        assert param.opts == ["--out-dir", "-o"] and param.help.startswith("Directory (created if missing) for"), name


@pytest.mark.parametrize("command, flags", [
    ("train", ["--set", "-o, --out-dir", "--device", "--quiet", "--data-root"]),
    ("predict", ["--set", "-o, --out-dir", "--device", "--quiet", "--runner", "--workers", "--batch-size"]),
    ("benchmark", ["--set", "-o, --out-dir", "--device", "--quiet", "--runner", "--workers", "--batch-size",
                   "--data-root"]),
])
def test_help_lists_the_shared_flags_and_hides_the_old_ones(command, flags):
    from magseg.cli.app import _register, app
    from typer.testing import CliRunner

    _register()
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for flag in flags:
        assert flag in result.stdout, (command, flag)
    for old in ("--engine", "--margin", "--out ", "--adaptive "):
        assert old not in result.stdout, (command, old)


def test_flags_become_overrides_after_set_so_a_flag_wins():
    from conftest import CONFIGS
    from magseg.cli.common import config_overrides

    from magseg.config import load_config

    items = config_overrides(["engine.batch_size=2", "refine.points=0.5"],
                             {"engine.batch_size": 7, "engine.device": None})
    assert items == ["engine.batch_size=2", "refine.points=0.5", "engine.batch_size=7"]
    config = load_config(CONFIGS / "tiny.yaml", items)
    assert config.engine.batch_size == 7 and config.refine.points == 0.5


@pytest.mark.parametrize("flags, keys", [
    (["--adaptive-threshold", "0.2"], ["engine.adaptive.threshold=0.2"]),
    (["--adaptive-max-crops", "3"], ["engine.adaptive.max_crops=3"]),
    (["--tta", "flip", "--batch-size", "2"], ["engine.batch_size=2", "engine.tta=flip"]),
])
def test_a_shared_flag_sets_the_same_config_keys_in_every_command(flags, keys, make_checkpoint,
                                                                   tmp_path, monkeypatch):
    """What a shared flag means is the config override it becomes: the same in predict and
    benchmark (benchmark then scores what the run's config says: an 'adaptive' row, TTA rows)."""
    from magseg.cli import benchmark, predict
    from typer.testing import CliRunner

    from magseg.cli.app import app

    ckpt = str(make_checkpoint())
    seen = {}

    def stop_at_the_model(command):
        def load_model(runner, checkpoint, overrides, quiet=False, checked=False):
            seen[command] = sorted(o for o in overrides if not o.endswith("=None"))
            raise typer.Exit(0)
        return load_model

    monkeypatch.setattr(predict, "load_model", stop_at_the_model("predict"))
    monkeypatch.setattr(benchmark, "load_model", stop_at_the_model("benchmark"))
    _commands()
    for command in ("predict", "benchmark"):
        where = [str(tmp_path / "a.tif")] if command == "predict" else ["--data-root", str(tmp_path)]
        result = CliRunner().invoke(app, [command, ckpt, *where, "-o", str(tmp_path / command), *flags])
        assert result.exit_code == 0, result.output
    assert seen["predict"] == seen["benchmark"] == sorted(keys)


def _ended(tmp_path, body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter that ends with ``end_process``, stdout a pipe."""
    code = textwrap.dedent(f"""
        import atexit, sys, threading
        from magseg.cli.app import end_process
        out = {str(tmp_path / "out.txt")!r}
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("code, status", [(None, 0), (0, 0), (1, 1), (2, 2), (130, 130)])
def test_end_process_flushes_runs_the_exit_handlers_and_keeps_the_code(tmp_path, code, status):
    # Buffered, unflushed output on both streams, and a handler that writes a file: all of
    # it must come out, in the normal exit's order (handlers before the process ends).
    done = _ended(tmp_path, f"""
        atexit.register(lambda: (open(out, "w").write("handler ran"), print("from the handler")))
        sys.stdout.write('{{"record": 1}}')
        sys.stderr.write("a log line")
        end_process({code!r})
    """)
    assert done.returncode == status, done.stderr
    assert done.stdout == '{"record": 1}from the handler\n'
    assert done.stderr == "a log line"
    assert (tmp_path / "out.txt").read_text() == "handler ran"


def test_end_process_waits_for_a_running_thread_and_passes_a_message_on(tmp_path):
    # A non-daemon thread still working is waited for (the normal exit), so what it writes
    # lands. The thread writes only once the main thread has stopped (the interpreter's
    # shutdown stops it before it joins the others): an os._exit would end it first,
    # however fast or slow the machine.
    done = _ended(tmp_path, """
        def work():
            threading.main_thread().join()
            open(out, "w").write("thread finished")
        threading.Thread(target=work).start()
        end_process(3)
    """)
    assert done.returncode == 3, done.stderr
    assert (tmp_path / "out.txt").read_text() == "thread finished"
    message = _ended(tmp_path, 'end_process("magseg: stopped")')
    assert (message.returncode, message.stderr) == (1, "magseg: stopped\n")


def test_ray_actors_are_sent_the_bytes_the_driver_loaded(tmp_path, make_checkpoint, monkeypatch):
    # The driver reads the checkpoint once under --runner ray; a best.ckpt that training
    # replaces before the actors start must not give them other weights than the driver's
    # (whose provenance tags the outputs of a raster spread over them).
    import hashlib
    import os

    from magseg.cli.common import Runner, load_model
    from magseg.run import pools

    path = make_checkpoint(name="best.ckpt")
    first = path.read_bytes()
    newer = make_checkpoint(["refiner.channels=4"], name="newer.ckpt")
    model = load_model(Runner.ray, path, [])
    os.replace(newer, path)  # the newer file lands after the driver read it
    sent = {}

    class Recorder:
        def __init__(self, checkpoint, name, overrides, workers, address, quiet=False):
            sent.update(checkpoint=checkpoint, name=name)

    monkeypatch.setattr(pools, "ScenePool", Recorder)
    model.pool(2, None, quiet=True)
    assert path.read_bytes() != first
    assert sent == {"checkpoint": first, "name": str(path)}
    assert model.loaded.sha256 == hashlib.sha256(first).hexdigest()
    assert model.segmenter is None and model.config.refiner.channels != 4
