"""Progress bars: on stderr only when it is a terminal and --quiet is not given; one overall
bar for a batch of inputs above each input's own."""

from __future__ import annotations

import io
import json

import magseg.cli.predict as predict_cli
import pytest
from geotiff import smooth_image, write_raster
from magseg.cli.app import app
from magseg.cli.common import progress_bar
from typer.testing import CliRunner

SMALL_SCENE = {"pyramid": {"scales": [32, 64], "crop": 32, "input": 32}}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_show_on_a_terminal_only_and_never_with_quiet(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with progress_bar(3, "x", quiet=False) as bar:
        assert bar.disable
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with progress_bar(3, "x", quiet=True) as bar:
        assert bar.disable
    with progress_bar(3, "inputs", quiet=False, unit="input") as bar:
        assert not bar.disable
        bar.update(3)
    assert "inputs:" in terminal.getvalue() and "0/3" in terminal.getvalue()  # the total, for an ETA


class _Recorder:
    """Stands in for progress_bar: records each bar's total, description and progress."""

    def __init__(self):
        self.bars = []

    def __call__(self, total, desc, quiet, unit="it"):
        recorder = self

        class Bar:
            def __init__(self):
                self.total, self.desc, self.quiet, self.n = total, desc, quiet, 0
                recorder.bars.append(self)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def update(self, n=1):
                self.n += n

            def write(self, *args, **kwargs):
                pass

        return Bar()


@pytest.mark.parametrize("inputs", [1, 3])
def test_a_batch_of_inputs_has_one_overall_bar(tmp_path, make_checkpoint, monkeypatch, inputs):
    ckpt = make_checkpoint(SMALL_SCENE)
    paths = [write_raster(tmp_path / f"s{i}.tif", smooth_image(3, 40, 50, seed=i)) for i in range(inputs)]
    recorder = _Recorder()
    monkeypatch.setattr(predict_cli, "progress_bar", recorder)
    result = CliRunner().invoke(app, ["predict", str(ckpt), *map(str, paths), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert len([json.loads(line) for line in result.stdout.splitlines()]) == inputs
    overall = [b for b in recorder.bars if b.desc == "inputs"]
    assert len(overall) == 1 and overall[0].total == inputs and overall[0].n == inputs
    # A single input needs no batch bar: it is silenced (its own crop bar says it all).
    assert overall[0].quiet is (inputs < 2)
    assert [b.desc for b in recorder.bars if b.desc != "inputs"] == [p.name for p in paths]
