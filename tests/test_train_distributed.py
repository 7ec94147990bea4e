"""`torchrun --nproc_per_node 2` on the CPU (gloo): sharded data, summed confusion matrix,
one writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_datasets import CONFIGS_TINY, make_deepglobe

from magseg.checkpoint import load_checkpoint
from magseg.segmenter import Segmenter


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, tiny_config):
    data = make_deepglobe(tmp_path / "data", tiny_config, counts=(("train", 3), ("val", 3)))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "magseg.cli.app", "train", "-c", str(CONFIGS_TINY), "--data-root", str(data),
           "--out-dir", str(out), "--epochs", "1", "--set", "train.samples_per_epoch=16",
           "--set", "train.batch_size=4", "--set", "data.mean=null", "--set", "data.std=null"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Only rank 0 writes stdout: one line per epoch, not two.
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    records = [r for r in lines if "epoch" in r]
    assert [(r["phase"], r["epoch"]) for r in records] == [("backbone", 1), ("refiner", 1)]
    # ... and one line for the refinement chosen on validation, whose sweep both ranks ran.
    [choice] = [r for r in lines if "choice" in r]
    assert len(choice["sweep"]) == 2 * len({*tiny_config.train.choose_k, tiny_config.refine.points})
    # Each rank validated some of the 3 val scenes (2 + 1); the matrix was summed across ranks.
    assert all(r["val_pixels"] == 3 * 128 * 128 for r in records)
    log = (out / "train.log").read_text()
    assert "on 2 process(es)" in log
    # 16 samples split over 2 ranks in batches of 4: 2 steps per epoch on each rank.
    assert "backbone phase: epochs 1..1 of 1, 2 steps per epoch" in log
    assert log.count("backbone epoch 1/1") == 1  # one log writer

    ckpt = load_checkpoint(out / "best.ckpt")
    assert ckpt.config.data.mean is not None and ckpt.refiner is not None
    assert not any(k.startswith("module.") for k in ckpt.backbone)  # DDP wrapper not saved
    labels = Segmenter.from_checkpoint(ckpt).segment(torch.zeros(3, 64, 64)).labels
    assert labels.shape == (64, 64)
