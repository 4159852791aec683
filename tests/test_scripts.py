"""The launchers: torchrun starts a real 2-process (gloo, CPU) run of train.py; the SLURM script parses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_launcher_runs_two_processes(tmp_path):
    env = dict(os.environ, NPROC_PER_NODE="2", MASTER_PORT="29517", PYTHON=sys.executable)
    args = [
        "fit",
        "--model=lightning.pytorch.demos.boring_classes.BoringModel",
        "--data=lightning.pytorch.demos.boring_classes.BoringDataModule",
        "--trainer.accelerator=cpu",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=2",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    out = subprocess.run(
        ["bash", "scripts/torchrun.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "Starting with 2 processes" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_slurm_script_is_valid_bash():
    out = subprocess.run(["bash", "-n", "scripts/slurm.sbatch"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
