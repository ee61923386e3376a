"""Data parallelism: two gloo processes under torchrun follow exactly the loss curve of one
process with their combined batch (same data rows, gradients averaged by all-reduce)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from train_helpers import options
from zili.train.presets import PRESETS
from zili.train.trainer import train

STEPS = 6


def test_two_gloo_processes_match_one_process_with_the_combined_batch(corpus_file, val_file, tmp_path):
    shape = dict(vocab_size=300, context_length=32, max_steps=STEPS, eval_interval=3, warmup_steps=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "zili.cli", "train", "--corpus", str(corpus_file), "--val-file", str(val_file),
               "--preset", "tiny", "-o", str(tmp_path / "ddp"), "--precision", "fp32", "--save-dtype", "float32",
               "--batch-size", "2", "--keep-checkpoint", "--no-progress",
               *[arg for k, v in shape.items() for arg in (f"--{k.replace('_', '-')}", str(v))],
               "--sample-prompt", "The"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((tmp_path / "ddp" / "checkpoint" / "state.json").read_text())
    report = json.loads((tmp_path / "ddp" / "training_report.json").read_text())
    assert report["training"]["processes"] == 2 and report["training"]["steps"] == STEPS

    single = train(options(corpus_file, tmp_path / "single", val_file,
                           config=PRESETS["tiny"].with_overrides(batch_size=4, **shape)))
    torch.testing.assert_close([h["loss"] for h in state["history"]], [h["loss"] for h in single.history],
                               rtol=1e-4, atol=0)
    torch.testing.assert_close([v["loss"] for v in state["val_history"]],
                               [v["loss"] for v in single.val_history], rtol=1e-4, atol=0)
    assert state["tokens"] == STEPS * 4 * 32
