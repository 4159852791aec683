"""Nothing lost (modules/resilience.py through train.py): signals save and exit non-zero, a crash during a save
keeps the previous `last`, exceptions save the last good state, and bad resume paths fail with clear messages.

Runs that must receive a signal or be killed are subprocesses; the others run in-process (BoringModel)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from modules.resilience import CheckpointError, check_checkpoint
from tests.resilience_helpers import Diverging
from tests.test_train import BORING, RecordStartStep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_start_steps():
    """RecordStartStep keeps the start steps in a class attribute: leave none behind for other modules."""
    RecordStartStep.started_at.clear()
    yield
    RecordStartStep.started_at.clear()


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_a_checkpoint_exits_nonzero_and_the_run_resumes(tmp_path, signum):
    root, marker, log = tmp_path / "run", tmp_path / "training", tmp_path / "log.txt"
    args = ["fit", *BORING, f"--trainer.default_root_dir={root}", "--trainer.max_steps=100000"]
    args += ["--trainer.limit_train_batches=50", "--trainer.limit_val_batches=0"]
    args += ["--checkpoint.every_n_train_steps=100000"]  # the only checkpoint is the signal's
    args += [
        "--trainer.callbacks+=tests.resilience_helpers.MarkAndPace",
        f"--trainer.callbacks.marker={marker}",
    ]
    proc = start(args, log)
    wait_for(marker, proc, log)
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == 128 + signum, log.read_text()[-3000:]
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and last.exists(), log.read_text()[-3000:]
    saved = load(last)["global_step"]
    assert 3 <= saved < 100000

    cli = train.main(
        [
            "fit",
            *BORING,
            f"--trainer.default_root_dir={root}",
            f"--trainer.max_steps={saved + 2}",
            "--trainer.limit_val_batches=0",
            "--trainer.callbacks+=tests.test_train.RecordStartStep",
            "--ckpt_path=last",
        ]
    )
    assert RecordStartStep.started_at[-1] == saved, "the resumed run starts at the step the signal saved"
    assert cli.trainer.global_step == saved + 2
    assert load(last)["global_step"] == saved + 2, "the end of training is saved too"


def test_kill_during_a_save_leaves_the_previous_last_loadable(tmp_path):
    root, marker, log = tmp_path / "run", tmp_path / "saving", tmp_path / "log.txt"
    args = ["fit", *BORING, f"--trainer.default_root_dir={root}", "--trainer.max_steps=10"]
    args += ["--trainer.limit_val_batches=0", "--checkpoint.every_n_train_steps=2"]
    args += ["--trainer.plugins=tests.resilience_helpers.SlowCheckpointIO"]
    args += [f"--trainer.plugins.marker={marker}", "--trainer.plugins.slow_from_step=4"]
    proc = start(args, log)
    wait_for(marker, proc, log)  # the checkpoint of step 4 is half written
    proc.kill()
    proc.wait(timeout=60)
    checkpoints = root / "checkpoints"
    assert (checkpoints / ".step=00000004.ckpt.partial").exists(), sorted(os.listdir(checkpoints))
    assert not (checkpoints / "step=00000004.ckpt").exists(), (
        "a checkpoint appears under its name only when whole"
    )
    assert load(checkpoints / "last.ckpt")["global_step"] == 2, "the previous last checkpoint is intact"

    train.main(
        [
            "fit",
            *BORING,
            f"--trainer.default_root_dir={root}",
            "--trainer.max_steps=5",
            "--trainer.limit_val_batches=0",
            "--trainer.callbacks+=tests.test_train.RecordStartStep",
            "--ckpt_path=last",
        ]
    )
    assert RecordStartStep.started_at[-1] == 2
    assert not (checkpoints / ".step=00000004.ckpt.partial").exists(), "the next run removes the partial save"
    assert load(checkpoints / "last.ckpt")["global_step"] == 5


@pytest.mark.parametrize("error", ["divergence", "runtime"])
def test_an_exception_during_fit_saves_the_last_good_state(tmp_path, error):
    root = tmp_path / "run"
    args = ["fit", *BORING[1:], "--model=tests.resilience_helpers.Diverging", f"--model.error={error}"]
    args += [f"--trainer.default_root_dir={root}", "--trainer.max_steps=50", "--trainer.limit_val_batches=0"]
    with pytest.raises(Exception, match="test") as raised:
        train.main(args)
    assert type(raised.value).__name__ == ("DivergenceError" if error == "divergence" else "RuntimeError")
    saved = load(root / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 2
    assert saved["state_dict"].keys() == Diverging.last_good.keys()
    for name, weight in Diverging.last_good.items():
        torch.testing.assert_close(saved["state_dict"][name], weight, rtol=0, atol=0, msg=name)


def test_ckpt_path_last_without_a_checkpoint_fails_unless_asked_to_start_fresh(tmp_path, capsys):
    root = tmp_path / "run"
    common = ["fit", *BORING, f"--trainer.default_root_dir={root}", "--trainer.max_steps=2"]
    with pytest.raises(SystemExit) as exited:
        train.main([*common, "--ckpt_path=last"])
    message = str(exited.value.code)
    assert (
        "no checkpoint in" in message and str(root / "checkpoints") in message and "last_or_fresh" in message
    )
    assert not (root / "checkpoints").exists(), "nothing was trained"

    train.main(
        [*common, "--ckpt_path=last_or_fresh", "--trainer.callbacks+=tests.test_train.RecordStartStep"]
    )
    assert RecordStartStep.started_at[-1] == 0
    train.main([*common, "--trainer.max_steps=3", "--ckpt_path=last_or_fresh"])
    assert load(root / "checkpoints" / "last.ckpt")["global_step"] == 3, "last_or_fresh resumes when it can"


def test_a_last_link_to_a_missing_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").symlink_to("step=00000007.ckpt")
    with pytest.raises(SystemExit) as exited:
        train.main(
            ["fit", *BORING, f"--trainer.default_root_dir={tmp_path / 'run'}", "--ckpt_path=last_or_fresh"]
        )
    assert "step=00000007.ckpt, which does not exist" in str(exited.value.code)


class Opaque:
    """Not loadable with weights_only=True."""


def test_corrupt_or_foreign_checkpoints_fail_naming_the_file_without_advice_to_unpickle(tmp_path):
    root = tmp_path / "run"
    train.main(["fit", *BORING, f"--trainer.default_root_dir={root}", "--trainer.max_steps=2"])
    good = (root / "checkpoints" / "last.ckpt").read_bytes()
    truncated, pickled, foreign = (
        tmp_path / "truncated.ckpt",
        tmp_path / "pickled.ckpt",
        tmp_path / "foreign.ckpt",
    )
    truncated.write_bytes(good[: len(good) // 2])
    torch.save({"global_step": 1, "thing": Opaque()}, pickled)
    torch.save({"model": {"weight": torch.zeros(2)}}, foreign)
    expected = {
        truncated: "truncated or corrupt",
        pickled: "pickled Python objects",
        foreign: "not a Lightning training checkpoint",
    }
    for path, what in expected.items():
        with pytest.raises(SystemExit) as exited:
            train.main(["fit", *BORING, f"--trainer.default_root_dir={root}", f"--ckpt_path={path}"])
        message = str(exited.value.code)
        assert str(path) in message and what in message, message
        assert "weights_only" not in message and "Traceback" not in message


def test_a_checkpoint_of_another_network_names_the_fields_that_differ(tmp_path):
    """The LM tiny config against a checkpoint whose network config differs in one field (built from the
    config itself, so the test follows renames of the fields)."""
    root = tmp_path / "run"
    common = ["--config", "configs/lm/tiny.yaml", f"--trainer.default_root_dir={root}"]
    cli = train.main([*common, f"--data.init_args.data_dir={tmp_path / 'data'}"], run=False)
    hparams = dict(cli.model.hparams)
    group = next(k for k, v in hparams.items() if isinstance(v, dict) and "dim" in v)
    hparams[group] = {**hparams[group], "dim": hparams[group]["dim"] * 2}
    state = {"pytorch-lightning_version": "2.6.6", "global_step": 4, "loops": {}, "state_dict": {}}
    torch.save({**state, "hyper_parameters": hparams}, tmp_path / "other.ckpt")
    with pytest.raises(SystemExit) as exited:
        train.main(["fit", *common, f"--ckpt_path={tmp_path / 'other.ckpt'}"])
    message = str(exited.value.code)
    dim = hparams[group]["dim"]
    assert str(tmp_path / "other.ckpt") in message
    assert f"{group}.dim: checkpoint {dim}, config {dim // 2}" in message, message


def test_sampler_and_optimisation_settings_may_differ_from_the_checkpoints(tmp_path):
    """Sampling a trained video model with another scheduler, step count or shift (or resuming with another
    lr) loads the checkpoint; a network field that differs is still refused."""
    net = {"dim": 64, "lact": {"heads": 2}}
    hparams = {
        "net": net,
        "optim": {"lr": 1e-3},
        "sampler": {"scheduler": "unipc", "steps": 10, "shift": 3.0},
    }
    state = {"pytorch-lightning_version": "2.6.6", "global_step": 4, "loops": {}, "state_dict": {}}
    torch.save({**state, "hyper_parameters": hparams}, tmp_path / "run.ckpt")
    other_sampler = {
        "net": net,
        "optim": {"lr": 1e-4},
        "sampler": {"scheduler": "euler", "steps": 40, "shift": 1.0},
    }
    check_checkpoint(str(tmp_path / "run.ckpt"), {"init_args": other_sampler})
    other_net = {**other_sampler, "net": {"dim": 64, "lact": {"heads": 4}}}
    with pytest.raises(CheckpointError, match="net.lact.heads: checkpoint 2, config 4"):
        check_checkpoint(str(tmp_path / "run.ckpt"), {"init_args": other_net})


def test_an_explicit_checkpoint_file_runs_with_the_configs_sampler_and_optim(tmp_path, monkeypatch):
    """`predict --ckpt_path FILE --model.init_args.sampler.steps=40` samples with 40 steps (Lightning's CLI
    would replace the model's arguments with the checkpoint's hyperparameters and sample with the trained 10)."""
    common = ["--config", "configs/video/tiny.yaml", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    common += [f"--data.init_args.train_shards={tmp_path}", f"--data.init_args.val_shards={tmp_path}"]
    cli = train.main(common, run=False)
    state = {"pytorch-lightning_version": "2.6.6", "global_step": 4, "loops": {}, "state_dict": {}}
    torch.save({**state, "hyper_parameters": dict(cli.model.hparams)}, tmp_path / "run.ckpt")
    seen = {}
    monkeypatch.setattr(
        train.LaCTCLI, "_run_subcommand", lambda self, name: seen.setdefault("model", self.model)
    )
    steps, lr = cli.model.sampler.steps + 30, cli.model.optim.lr / 10
    overrides = [f"--model.init_args.sampler.steps={steps}", f"--model.init_args.optim.lr={lr}"]
    train.main(["predict", *common, f"--ckpt_path={tmp_path / 'run.ckpt'}", *overrides])
    assert seen["model"].sampler.steps == steps and seen["model"].optim.lr == lr


def test_a_run_resumed_with_a_lower_lr_trains_at_it_on_the_same_schedule(tmp_path):
    """Restoring the optimizer and schedule would bring the checkpoint's lr back; the config's wins, and the
    warmup + cosine goes on from the step it reached, scaled to the new peak."""

    def fit(root, steps, *extra):
        args = ["fit", "--config", "configs/icl/base.yaml", "--config", "configs/icl/tiny.yaml"]
        args += [
            f"--trainer.default_root_dir={root}",
            "--trainer.logger=false",
            f"--trainer.max_steps={steps}",
        ]
        args += ["--model.init_args.optim.warmup_steps=2", "--model.init_args.optim.min_lr_ratio=0.1"]
        args += ["--model.init_args.optim.total_steps=8", *extra]
        optimizer = train.main(args).trainer.optimizers[0]
        return [group["lr"] for group in optimizer.param_groups], optimizer.param_groups[0]["weight_decay"]

    straight, _ = fit(tmp_path / "a", 6)
    fit(tmp_path / "b", 4)
    with pytest.warns(UserWarning, match="lr 0.001 -> 0.0001"):
        resumed, decay = fit(
            tmp_path / "b",
            6,
            "--ckpt_path=last",
            "--model.init_args.optim.lr=1e-4",
            "--model.init_args.optim.weight_decay=0.5",
        )
    assert resumed == pytest.approx([lr / 10 for lr in straight], rel=1e-6)
    assert decay == 0.5  # the matrices' group takes the config's weight decay too
