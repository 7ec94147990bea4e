"""scripts/refiner_runtime.py times the refiner where the engine calls it: whichever entry
point a stage takes (from the windows' cells with a margin, from the crops without)."""

from __future__ import annotations

import json
import sys

import pytest
from synthetic import DEEPGLOBE_CLASSES_OVERRIDE, SceneSpec, write_dataset

from magseg.engine import runtime as rt

pytestmark = pytest.mark.skipif(not rt.installed("onnxruntime"),
                                reason="onnxruntime, onnx and onnxscript not installed (magseg[onnx])")


@pytest.mark.parametrize("margin,entry", [(0.125, "weights_from_cells"), (0.0, "weights_and_total")],
                         ids=["cells", "crops"])
def test_every_refiner_call_of_the_engine_is_timed_and_replayed(tmp_path, make_checkpoint, monkeypatch, capsys,
                                                                  margin, entry):
    import refiner_runtime

    write_dataset(tmp_path / "data", {"train": 1, "test": 2}, SceneSpec(size=(128, 128)), seed=0)
    ckpt = make_checkpoint({**DEEPGLOBE_CLASSES_OVERRIDE,
                            "pyramid.margin": margin})
    monkeypatch.setattr(sys, "argv", ["refiner_runtime.py", str(ckpt), str(tmp_path / "data"), "--scenes", "1"])
    refiner_runtime.main()
    share, replay = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert share["scenes"] == 1 and 0 < share["refiner_s"] < share["engine_s"]
    assert share["refiner_calls"] == {entry: replay["batches"]}  # one a refined batch, nested calls not again
    # The tiny pyramid (32 -> 64 -> 128, crops of 32) refines two stages of its one scene.
    assert replay["batches"] >= 2 and replay["batch_shape"][1:] == [7, 32, 32]
    assert all(len(seconds) == 5 for seconds in replay["seconds"].values())
