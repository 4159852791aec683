"""FSDP2 through Lightning's ModelParallelStrategy, on 2 CPU processes over gloo (DESIGN §6)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def train(devices: int, out: Path) -> dict:
    cmd = [sys.executable, "tests/modules/fsdp_worker.py", "--devices", str(devices), "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_fsdp2_on_two_processes_matches_one_process(tmp_path):
    single = train(1, tmp_path / "single.pt")
    sharded = train(2, tmp_path / "sharded.pt")
    assert sharded["sharded"] and not single["sharded"], "the 2-process run must really hold DTensor shards"
    assert single["weights"].keys() == sharded["weights"].keys()
    for name, weight in single["weights"].items():
        # Same global batch, gradients averaged across ranks: the same three SGD steps.
        torch.testing.assert_close(sharded["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)
