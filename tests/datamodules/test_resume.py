"""Exact resume after kill -9: the per-step training losses of a resumed run equal the uninterrupted run's
bit for bit (CPU), for every task's tiny config, with DataLoader workers where the task has them.

Each test runs ``train.py fit`` three times as subprocesses: uninterrupted; killed with SIGKILL right after
its checkpoint at step K; resumed with ``--ckpt_path last``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules import prepare

ROOT = Path(__file__).resolve().parents[2]
K, STEPS = 4, 8  # checkpoint (and kill) at step K; both runs go to STEPS
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    f"--trainer.max_steps={STEPS}",
    f"--checkpoint.every_n_train_steps={K}",
]


def fit(
    config: str | list[str],
    args: list[str],
    root: Path,
    log: Path,
    kill_after: int | None = None,
    resume=False,
):
    callback = {"class_path": "tests.datamodules.resume_helpers.LossLog", "init_args": {"path": str(log)}}
    if kill_after is not None:
        callback["init_args"]["kill_after_step"] = kill_after
    cmd = [
        sys.executable, "train.py", "fit", *(f"--config={c}" for c in ([config] if isinstance(config, str) else config)),
        *QUIET, *args,
        f"--trainer.default_root_dir={root}", f"--trainer.callbacks+={json.dumps(callback)}",
    ]  # fmt: skip
    if resume:
        cmd.append("--ckpt_path=last")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def losses(log: Path) -> dict[int, str]:
    return {r["step"]: r["loss"] for r in map(json.loads, log.read_text().splitlines())}


def check_exact_resume(tmp_path: Path, config: str | list[str], args: list[str]) -> None:
    full = fit(config, args, tmp_path / "full", tmp_path / "full.jsonl")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = fit(config, args, tmp_path / "cut", tmp_path / "cut.jsonl", kill_after=K)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert max(losses(tmp_path / "cut.jsonl")) == K
    resumed = fit(config, args, tmp_path / "cut", tmp_path / "resumed.jsonl", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = losses(tmp_path / "full.jsonl"), losses(tmp_path / "resumed.jsonl")
    assert sorted(got) == list(range(K + 1, STEPS + 1)), "the resumed run continues at step K + 1"
    assert losses(tmp_path / "cut.jsonl") == {s: want[s] for s in range(1, K + 1)}
    assert got == {s: want[s] for s in got}, "resumed losses differ from the uninterrupted run"


@pytest.mark.slow
def test_lm_tiny_resumes_exactly_with_workers(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: fast weights are updated per chunk of tokens.\n" for i in range(400)))
    args = [
        f"--data.init_args.text=[{text}]", f"--data.init_args.data_dir={tmp_path / 'data'}",
        "--data.init_args.seq_len=64", "--data.init_args.batch_size=2", "--data.init_args.batches_per_epoch=3",
        "--data.init_args.num_workers=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
    ]  # fmt: skip
    check_exact_resume(tmp_path, "configs/lm/tiny.yaml", args)


@pytest.mark.slow
def test_nvs_tiny_resumes_exactly_with_workers(tmp_path):
    for split, seed in (("train", 0), ("val", 1)):
        prepare.main(
            ["scenes", "--out", str(tmp_path / split), "--num-scenes", "6", "--views", "4", "--height", "16",
             "--width", "16", "--samples-per-shard", "2", "--seed", str(seed)]
        )  # fmt: skip
    args = [
        f"--data.init_args.train_shards={tmp_path / 'train'}", f"--data.init_args.val_shards={tmp_path / 'val'}",
        "--data.init_args.batch_size=2", "--data.init_args.batches_per_epoch=3", "--data.init_args.num_workers=2",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
    ]  # fmt: skip
    check_exact_resume(tmp_path, "configs/nvs/tiny.yaml", args)


@pytest.mark.slow
def test_icl_tiny_resumes_exactly(tmp_path):
    check_exact_resume(tmp_path, ["configs/icl/base.yaml", "configs/icl/tiny.yaml"], [])


@pytest.mark.slow
def test_video_tiny_resumes_exactly_with_workers(tmp_path):
    # The training noise is drawn per clip from (seed, global step, sample key), so it resumes with the data.
    for split, seed in (("train", 0), ("val", 1)):
        prepare.main(
            ["videos", "--out", str(tmp_path / split), "--num-videos", "8", "--frames", "8", "--height", "16",
             "--width", "16", "--samples-per-shard", "2", "--seed", str(seed)]
        )  # fmt: skip
    args = [
        f"--data.init_args.train_shards={tmp_path / 'train'}", f"--data.init_args.val_shards={tmp_path / 'val'}",
        "--data.init_args.batch_size=2", "--data.init_args.batches_per_epoch=3", "--data.init_args.num_workers=2",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--data.init_args.val_batch_size=2",
        "--model.init_args.sample_every_n_val=0",
    ]  # fmt: skip
    check_exact_resume(tmp_path, "configs/video/tiny.yaml", args)
