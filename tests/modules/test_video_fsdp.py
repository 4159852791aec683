"""The video task under FSDP2 (ModelParallelStrategy, 2 CPU processes over gloo) equals one process: the same
losses, gradients and weights after 3 AdamW steps, the same cached samples from the sharded network, and the same
EMA averages in a single-file checkpoint (the sharded-checkpoint case is in tests/test_multinode.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run(devices: int, out: Path) -> dict:
    cmd = [sys.executable, "tests/modules/video_fsdp_worker.py", "--devices", str(devices), "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow  # three Lightning starts on a shared 2-core machine
def test_video_fsdp2_on_two_processes_matches_one_process(tmp_path):
    single = run(1, tmp_path / "single.pt")
    sharded = run(2, tmp_path / "sharded.pt")
    assert sharded["sharded"] and not single["sharded"], "the 2-process run must really hold DTensor shards"
    # Same global batch of 4 clips with the same per-clip noise, gradients averaged across ranks.
    torch.testing.assert_close(sharded["losses"], single["losses"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sharded["grad_norms"], single["grad_norms"], rtol=1e-4, atol=1e-6)
    assert single["grads"].keys() == sharded["grads"].keys() and single["grads"]
    for name, grad in single["grads"].items():
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for name, weight in single["weights"].items():
        torch.testing.assert_close(sharded["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(sharded["samples"], single["samples"], rtol=1e-3, atol=1e-4)
    # The EMA callback's averages, written to a single-file checkpoint: the 2-process one gathers both ranks'
    # shards into whole tensors (not DTensors), equal to the 1-process averages, which moved off the weights.
    assert sorted(sharded["ema"]) == sorted(single["ema"])
    for name, average in single["ema"].items():
        assert type(sharded["ema"][name]) is torch.Tensor, name
        torch.testing.assert_close(sharded["ema"][name], average, rtol=1e-4, atol=1e-5, msg=name)
    assert any(
        not torch.equal(single["ema"][n], w) for n, w in single["weights"].items() if n in single["ema"]
    )
