"""What `magseg <command> --help` shows and how a bad command line is answered: examples kept
whole, readable metavars, GDAL's `-co` spelling, one error style, one kind of --overwrite."""

from __future__ import annotations

import re

import pytest
from magseg.cli.app import _register, app
from typer.testing import CliRunner

_register()
COMMANDS = ("train", "predict", "benchmark")


def _help(command: str, columns: int = 60) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_examples_are_never_rewrapped_in_the_middle_of_a_flag(command):
    text = _help(command)
    examples = text.split("Examples:", 1)[1].strip("\n").split("\n\n")[0].splitlines()
    assert len(examples) >= 4
    for line in examples:
        # Each example one line, whole: it starts a command and ends where the command does.
        assert re.match(r"^    (magseg|find|torchrun) ", line), line
        assert not line.rstrip().endswith(("-", "--adaptive-", "-o")), line
    if command == "benchmark":
        assert "    magseg benchmark runs/demo/best.ckpt --data-root data/synthetic -o bench/ " \
               "--adaptive-max-crops 4 --limit 20" in examples
    if command == "train":
        assert any(line.endswith("-o runs/dg") for line in examples)


@pytest.mark.parametrize("command", COMMANDS)
def test_metavars_read_as_words_not_python_types(command):
    text = _help(command, columns=100)
    assert not re.search(r"<(str|path|int|float|list|dir|file|text)[^>]*>", text), text
    assert not re.search(r"\{[a-z_]+\}", text)
    if command != "train":
        assert re.search(rf"^Usage: magseg {command} \[OPTIONS\] CHECKPOINT\b", text, re.M), text
    assert "--out-dir DIR" in text and "--device DEVICE" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_overwrite_is_the_same_plain_flag_everywhere(command):
    text = _help(command, columns=100)
    assert re.search(r"^  --overwrite  ", text, re.M) and "--no-overwrite" not in text


def test_gdal_spelling_of_creation_options_is_accepted(tmp_path, make_checkpoint):
    runner = CliRunner()
    ckpt = str(make_checkpoint())
    # -co as GDAL spells it reaches magseg's own check of the option (before any file is read).
    bad = runner.invoke(app, ["predict", ckpt, str(tmp_path / "a.tif"),
                              "-o", str(tmp_path / "out"), "-co", "NOT_AN_OPTION=1"])
    assert bad.exit_code == 2 and "No such option" not in bad.output
    assert "--co" in bad.output and "NOT_AN_OPTION" in bad.output
    assert not (tmp_path / "out").exists()
    good = runner.invoke(app, ["predict", ckpt, str(tmp_path / "a.tif"),
                               "-o", str(tmp_path / "out"), "-co", "COMPRESS=LZW"])
    assert "No such option" not in good.output and "a.tif" in good.output  # next: the input


@pytest.mark.parametrize("args, says", [
    (["predict", "--no-such-flag"], "No such option: --no-such-flag"),
    (["predict"], "Missing argument 'CHECKPOINT'"),
    (["benchmark", "a", "--data-root", "b", "-o", "x", "--limit", "zero"], "Invalid value for '--limit'"),
    (["train", "-c"], "Option '-c' requires an argument"),
])
def test_command_line_errors_come_in_magseg_style(args, says):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("magseg: error: ") and says in lines[0], result.output
    assert "Error:" not in result.output and "Usage:" not in result.output
    assert f"(see 'magseg {args[0]} --help')" in lines[0]
