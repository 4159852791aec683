"""The CLI entry point: help works, runs write their config, and `--ckpt_path last` resumes the same run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

import train
from datamodules.errors import DataConfigError

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


@pytest.mark.parametrize(
    ("data_args", "error"),
    [
        ([], "NVSDataModule: train_shards is not set: pass --data.train_shards=FOLDER"),
        (["--data.train_shards={tmp}/x"], "shard {tmp}/x (from '{tmp}/x') does not exist"),
        (["--data.train_shards={tmp}"], "folder {tmp} holds no *.tar shards"),
    ],
)
def test_data_options_naming_nothing_usable_are_data_config_errors(tmp_path, data_args, error):
    """Forgotten or mistyped shard folders raise DataConfigError, which train.py prints as one line."""
    args = [a.format(tmp=tmp_path) for a in data_args]
    with pytest.raises(DataConfigError, match=re.escape(error.format(tmp=tmp_path))):
        train.main(
            ["fit", "--config", "configs/nvs/tiny.yaml", *args, f"--trainer.default_root_dir={tmp_path}/run"]
        )


def test_user_errors_end_train_py_in_one_line(tmp_path):
    """A user who forgot the shard folder reads what to pass, not a 40-line traceback."""
    out = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "configs/nvs/tiny.yaml",
         f"--trainer.default_root_dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: DataConfigError: NVSDataModule: train_shards is not set"), out.stderr
    assert "Traceback" not in out.stderr


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


def test_optimizer_and_lr_scheduler_flags_are_refused(capsys):
    # They would replace the task's parameter groups and schedule (model.init_args.optim) silently.
    for flag in ("--optimizer=torch.optim.SGD", "--lr_scheduler=torch.optim.lr_scheduler.StepLR"):
        with pytest.raises(SystemExit):
            train.main(["fit", *BORING, flag])
        assert flag.split("=")[0] in capsys.readouterr().err


@pytest.mark.parametrize(
    ("base", "overlay", "checks"),
    [
        ("icl/base.yaml", "icl/active.yaml", {"trainer.default_root_dir": "outputs/icl/active"}),
        ("icl/base.yaml", "icl/temporary.yaml", {"trainer.default_root_dir": "outputs/icl/temporary"}),
        ("icl/base.yaml", "icl/tiny.yaml", {"model.init_args.net.vocab_size": 51}),
        ("nvs/paper.yaml", "nvs/paper_24l.yaml", {"model.init_args.net.num_layers": 24}),
        ("nvs/paper.yaml", "nvs/paper_14l.yaml", {"model.init_args.net.num_layers": 14}),
        (  # the nested lact merges field by field: the base's published options survive the overlay
            "nvs/paper.yaml",
            "nvs/paper_24l_2x.yaml",
            {
                "model.init_args.net.num_layers": 24,
                "model.init_args.net.lact.inter_multi": 2.0,
                "model.init_args.net.lact.muon": "fixed",
                "model.init_args.net.lact.output_gate": None,
                "model.init_args.net.mlp": "gelu",
            },
        ),
        ("nvs/paper.yaml", "nvs/normalize.yaml", {"model.init_args.net.lact.muon": "normalize"}),
    ],
)
def test_overlay_configs_parse_with_the_cli(base, overlay, checks):
    args = ["--config", str(ROOT / "configs" / base), "--config", str(ROOT / "configs" / overlay)]
    if base.startswith("nvs"):
        # A small width, a CPU trainer and no LPIPS (its weights are not here): this checks the merge.
        args += [
            "--model.init_args.net.dim=96", "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.strategy=auto", "--trainer.precision=32-true", "--model.init_args.lpips_weight=0",
            "--model.init_args.lpips_metric=false",
        ]  # fmt: skip
    cli = train.main(args, run=False)
    for key, value in checks.items():
        assert cli.config[key] == value, key
    root = cli.config["trainer.default_root_dir"]
    # Every path of the config derives from the run directory; the base's fields survive the overlay.
    if base.startswith("nvs"):
        assert cli.config["model.init_args.net.patch_size"] == 8
        assert cli.config["data.init_args.train_shards"] == f"{root}/../data/train"
        assert cli.config["model.init_args.optim.skip_grad_norm"] == 20.0
    else:
        assert cli.config["model.init_args.optim.betas"] == (0.9, 0.98)
        assert cli.config["model.init_args.net.max_len"] == 7
    assert cli.trainer.logger.log_dir.rstrip("/") == root


@pytest.mark.parametrize(("overlay", "stop_after"), [("lm/active.yaml", None), ("lm/temporary.yaml", 25)])
def test_lm_forgetting_overlays_keep_the_completion_writer(overlay, stop_after):
    # The overlay's callback list replaces the base's: it must name the completion writer again, and a
    # command-line K / N reaches the forgetting schedule (the last callback of the list).
    args = ["--config", str(ROOT / "configs/lm/tiny.yaml"), "--config", str(ROOT / "configs" / overlay)]
    args += ["--trainer.callbacks.init_args.every_k=10"]
    if stop_after is not None:
        args += [f"--trainer.callbacks.init_args.stop_after={stop_after}"]
    cli = train.main(args, run=False)
    by_name = {type(c).__name__: c for c in cli.trainer.callbacks}
    assert "CompletionWriter" in by_name
    forget = by_name["ForgettingSchedule"]
    assert (forget.every_k, forget.stop_after, forget.targets_spec) == (10, stop_after, ["input", "output"])
    assert [s for s in range(1, 40) if forget.is_reset_step(s)] == (
        [10, 20, 30] if stop_after is None else [10, 20]
    )
    assert cli.config["model.init_args.net.dim"] == 128  # the base survives the overlay
