"""The CLI entry point: help works, runs write their config, and `--ckpt_path last` resumes the same run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

import train

ROOT = Path(__file__).resolve().parents[1]
BORING = [
    "--model=lightning.pytorch.demos.boring_classes.BoringModel",
    "--data=lightning.pytorch.demos.boring_classes.BoringDataModule",
    "--trainer.accelerator=cpu",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


class RecordStartStep(Callback):
    """Remembers the global step at which fitting started (0 for a fresh run)."""

    started_at: list[int] = []

    def on_train_start(self, trainer, pl_module):
        RecordStartStep.started_at.append(trainer.global_step)


def test_help_runs():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "fit" in out.stdout and "predict" in out.stdout


def test_resume_from_last_continues_the_same_run(tmp_path):
    root = str(tmp_path / "run")
    train.main(["fit", *BORING, f"--trainer.default_root_dir={root}", "--trainer.max_steps=3"])
    last = Path(root) / "checkpoints" / "last.ckpt"
    assert last.exists(), "ModelCheckpoint must write last.ckpt into the fixed <root>/checkpoints directory"
    assert torch.load(last, weights_only=False)["global_step"] == 3
    assert (Path(root) / "config.yaml").exists(), "the resolved config is written next to the run"

    cli = train.main(
        [
            "fit",
            *BORING,
            f"--trainer.default_root_dir={root}",
            "--trainer.max_steps=5",
            "--trainer.callbacks+=tests.test_train.RecordStartStep",
            "--ckpt_path=last",
        ]
    )
    assert RecordStartStep.started_at == [3], "resumed runs start at the checkpoint's step, not from scratch"
    assert cli.trainer.global_step == 5
