"""The reset on FSDP2-sharded (DTensor) parameters: 2 CPU processes with gloo, as at scale but tiny."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modules.forgetting import seeded_generator

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("fsdp_forgetting_script.py")


@pytest.mark.slow  # two processes start Lightning: about 40 s on a shared 2-core machine
def test_reset_gives_identical_full_embeddings_on_both_ranks(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["is_dtensor"] and r1["is_dtensor"], (
        "the embedding must be sharded for this test to mean anything"
    )
    expected = torch.empty(12, 4).normal_(0.0, 1.0, generator=seeded_generator(11, 0, 1, 0))
    expected[0] = 0  # padding row
    assert torch.equal(r0["full"], r1["full"]) and torch.equal(r0["full"], expected)
    assert torch.equal(torch.cat([r0["local"], r1["local"]]), expected)  # each rank wrote its own rows
    assert len(r0["local"]) == len(r1["local"]) == 6
    assert r0["tied"] and r1["tied"]
    assert r0["exp_avg_norm"] == r1["exp_avg_norm"] == 0.0 and r0["step"] == 0.0
    # probabilistic phase (steps 1-2): the same rows replaced on both ranks, restored and frozen after
    for i in range(2):
        assert torch.equal(r0["during"][i], r1["during"][i])
        replaced = (r0["during"][i] != r0["after"][i]).any(1)
        assert replaced.any() and not replaced.all() and not replaced[0]
    assert torch.equal(r0["after"][0], r0["after"][1])
    assert not torch.equal(r0["after"][1], r0["after"][2])  # trained again at step 3, then reset
