"""FSDP2 through Lightning's ModelParallelStrategy, on 2 CPU processes over gloo (docs/architecture.md, Training, checkpoints and scale)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def train(devices: int, out: Path, task: str = "lact", compile: bool = False, timeout: int = 300) -> dict:
    cmd = [sys.executable, "tests/modules/fsdp_worker.py", "--devices", str(devices), "--out", str(out)]
    cmd += ["--task", task] + (["--compile"] if compile else [])
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
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


@pytest.mark.slow  # four Lightning starts on a shared 2-core machine: about a minute
def test_nvs_module_fsdp2_on_two_processes_matches_one_process(tmp_path):
    """NVSModule.configure_model (one unit per NVSBlock, then the root), with activation checkpointing, AdamW,
    its own clipping and predict's reconstruct/render, on 2 gloo processes: the same run as on one."""
    single = train(1, tmp_path / "single.pt", task="nvs")
    sharded = train(2, tmp_path / "sharded.pt", task="nvs")
    assert sharded["sharded"] and not single["sharded"], "the 2-process run must really hold DTensor shards"
    # Same global batch of 4 scenes, gradients averaged across ranks: the same loss, gradients, norm.
    torch.testing.assert_close(sharded["losses"], single["losses"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sharded["grad_norms"], single["grad_norms"], rtol=1e-4, atol=1e-6)
    assert single["grads"].keys() == sharded["grads"].keys() and single["grads"]
    for name, grad in single["grads"].items():
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for name, weight in single["weights"].items():
        torch.testing.assert_close(sharded["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)
    for name, images in single["predict"].items():  # uint8 renders: at most one level apart
        diff = (sharded["predict"][name].int() - images.int()).abs().max()
        assert diff <= 1, (name, diff)


@pytest.mark.slow  # inductor compiles each block's forward and backward in both processes: minutes on 2 cores
def test_compiled_nvs_module_fsdp2_on_two_processes_matches_eager_one_process(tmp_path):
    """net.compile with FSDP2 (compile each block, then fully_shard) and activation checkpointing on 2 gloo
    processes: the same losses, gradients and weights as the eager single-process run, up to float rounding."""
    single = train(1, tmp_path / "single.pt", task="nvs")
    compiled = train(2, tmp_path / "compiled.pt", task="nvs", compile=True, timeout=900)
    assert compiled["sharded"] and compiled["compiled_graphs"] >= 1 and single["compiled_graphs"] == 0
    torch.testing.assert_close(compiled["losses"], single["losses"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(compiled["grad_norms"], single["grad_norms"], rtol=1e-4, atol=1e-6)
    for name, grad in single["grads"].items():
        torch.testing.assert_close(compiled["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for name, weight in single["weights"].items():
        torch.testing.assert_close(compiled["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)
