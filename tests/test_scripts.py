"""The launchers: torchrun starts a real 2-process (gloo, CPU) run of train.py; the SLURM script parses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def fake_slurm(tmp_path: Path, status: int) -> tuple[dict, Path]:
    """`srun` and `scontrol` stand-ins on PATH: srun records its arguments and exits with `status`."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    for name, body in (
        ("srun", f'echo "srun $*" >> {calls}; exit {status}'),
        ("scontrol", f'echo "scontrol $*" >> {calls}'),
    ):
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(
        os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(ROOT)
    )
    return env, calls


def test_slurm_script_requeues_after_the_time_limit_signal_only(tmp_path):
    """Exit status 138 (tasks stopped by SIGUSR1 with a checkpoint) requeues the job; 143 (SIGTERM: preempted
    or cancelled) and 0 do not; fit resumes with last_or_fresh unless given a --ckpt_path."""
    for status, requeued in ((138, True), (143, False), (0, False)):
        run_dir = tmp_path / str(status)
        run_dir.mkdir()
        env, calls = fake_slurm(run_dir, status)
        out = subprocess.run(["bash", "scripts/slurm.sbatch", "fit", "--config", "c.yaml"], cwd=ROOT, env=env)
        assert out.returncode == status
        log = calls.read_text()
        assert "--ckpt_path=last_or_fresh" in log
        assert ("scontrol requeue 4242" in log) == requeued, log
    (tmp_path / "explicit").mkdir()
    env, calls = fake_slurm(tmp_path / "explicit", 0)
    subprocess.run(
        ["bash", "scripts/slurm.sbatch", "fit", "--ckpt_path", "x.ckpt"], cwd=ROOT, env=env, check=True
    )
    assert "last_or_fresh" not in calls.read_text()


def test_demo_generates_every_split_its_config_reads():
    """scripts/demo_nvs.py generates the data configs/nvs/demo.yaml reads (the curriculum's one-primitive
    scenes too), with one primitive per scene in that stage and 2-4 in the held-out test scenes."""
    import yaml

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import demo_nvs
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    data = yaml.safe_load((ROOT / demo_nvs.CONFIG).read_text())["data"]["init_args"]
    assert demo_nvs.used_splits(data) == ["train", "train_single", "val", "test"]
    assert demo_nvs.SPLITS["train_single"][2] == (1, 1) and demo_nvs.SPLITS["test"][2] == (2, 4)
    assert demo_nvs.used_splits({"train_shards": "x/data/train"}) == ["train", "test"]
    with pytest.raises(SystemExit, match="data/\\['other'\\]"):
        demo_nvs.used_splits({"train_shards": "x/data/other"})


def test_script_overrides_reach_what_the_scripts_measure():
    """The NVS scripts time and build the network the --override options ask for (e.g. the LVSM baseline),
    not the config's: dotted train.py options are set in the parsed config, values read as YAML."""
    import yaml

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import demo_nvs
        from nvs_eval import apply_overrides
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    config = yaml.safe_load((ROOT / demo_nvs.CONFIG).read_text())
    lvsm = ["--model.init_args.net.token_mixer=attention", "--model.init_args.net.colour_values=false"]
    net = apply_overrides(config, [*lvsm, "--trainer.max_steps=7", "--other", "positional"])["model"]
    assert net["init_args"]["net"]["token_mixer"] == "attention"
    assert net["init_args"]["net"]["colour_values"] is False
    assert config["trainer"]["max_steps"] == 7
    assert config["model"]["init_args"]["net"]["lact"]["heads"] == 4  # the rest of the config is kept
    with pytest.raises(SystemExit, match="'max_steps' is not a section"):
        apply_overrides(config, ["--trainer.max_steps.x=1"])


def test_out_moves_the_run_directory_and_user_overrides_still_win():
    """Both NVS scripts parse the same options; --out elsewhere than the default moves the run directory
    (every config path derives from it), put before the user's overrides so that theirs are applied last."""
    import argparse

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from nvs_eval import add_run_options, run_folder
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    parser = argparse.ArgumentParser()
    add_run_options(parser, "outputs/demo", "fit and test")
    args = parser.parse_args([])
    assert run_folder(args, "outputs/demo") == ROOT / "outputs/demo" and args.override == []
    mine = "--trainer.default_root_dir=/elsewhere"
    args = parser.parse_args(["--out", "outputs/b", f"--override={mine}", "--minutes", "2"])
    assert run_folder(args, "outputs/demo") == ROOT / "outputs/b" and args.minutes == 2.0
    assert args.override == [f"--trainer.default_root_dir={ROOT / 'outputs/b/run'}", mine]


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc/stat")
def test_busy_cores_sees_other_jobs_now():
    """The CPU demos pick one torch thread when other jobs keep the cores busy: a process spinning on one
    core while the measurement sleeps counts as (about) one busy core, whatever ran a minute ago."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from cpu_threads import busy_cores
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert busy_cores(1.0) >= 0.7
    finally:
        spinner.kill()
        spinner.wait()
