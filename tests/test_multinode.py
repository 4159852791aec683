"""Multi-node, proven on one machine: two torchrun "nodes" (two `torch.distributed.run` agents, --nnodes 2, a
c10d rendezvous on localhost, gloo, one process each) started through scripts/torchrun.sh train the tiny LM,
NVS, video and ICL configs sharded with FSDP2 (ModelParallelStrategy), write sharded checkpoints, and match a 1-process run
with the same global batch; the 2-process checkpoint resumes on 1 and on 2 processes (resharding), the
video task's EMA of the weights (modules/ema.py) included.

The data (tests/resilience_helpers.GlobalBatchData) gives global step s the same global batch on any number
of processes, so the losses of all runs must agree step by step."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from tests.resilience_helpers import read_steps

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 4, 2
TASKS = {
    "lm": [
        "--config=configs/lm/tiny.yaml",
        "--data=tests.resilience_helpers.GlobalBatchData",
        "--data.task=lm",
    ],
    "nvs": [
        "--config=configs/nvs/tiny.yaml",
        "--data=tests.resilience_helpers.GlobalBatchData",
        "--data.task=nvs",
    ],
    "video": [  # its EMA callback's averages are sharded like the weights and must reshard with them
        "--config=configs/video/tiny.yaml",
        "--data=tests.resilience_helpers.GlobalBatchData",
        "--data.task=video",
    ],
    "icl": [
        "--config=configs/icl/base.yaml",
        "--config=configs/icl/tiny.yaml",
        "--data=tests.resilience_helpers.GlobalBatchData",
        "--data.task=icl",
        "--data.seq_len=7",
        "--data.vocab_size=51",
    ],
}


def ema_averages(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The EMA callback's averages in a checkpoint: a file (callback state) or a sharded directory (its
    `state_dict` keys `ema.<name>`, gathered from every rank's shards)."""
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)["callbacks"]
        return next(v for k, v in state.items() if k.startswith("EMA"))["averages"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = tmp / f"{checkpoint.parent.parent.name}_{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, whole)
    state = torch.load(whole, weights_only=True)["state_dict"]
    return {k.removeprefix("ema."): v for k, v in state.items() if k.startswith("ema.")}


def assert_same_ema(got: dict, expected: dict) -> None:
    assert got and sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_args(task: str, root: Path, steps_file: Path, world: int | None) -> list[str]:
    """`train.py fit` arguments; world: FSDP2 over that many processes (ModelParallelStrategy), None: plain."""
    args = ["fit", *TASKS[task], f"--trainer.default_root_dir={root}", f"--trainer.max_steps={STEPS}"]
    args += [
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    args += [f"--checkpoint.every_n_train_steps={SAVE_EVERY}", "--checkpoint.save_top_k=-1"]
    args += [
        "--trainer.callbacks+=tests.resilience_helpers.StepRecorder",
        f"--trainer.callbacks.path={steps_file}",
    ]
    if world is not None:
        args += ["--trainer.strategy=ModelParallelStrategy", f"--trainer.strategy.data_parallel_size={world}"]
        args += ["--trainer.strategy.tensor_parallel_size=1"]
    return args


def env(**extra: str) -> dict:
    base = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")
    }
    return dict(base, OMP_NUM_THREADS="1", PYTHON=sys.executable, PYTHONPATH=str(ROOT), **extra)


def torchrun(args: list[str], log: Path, nnodes: int, nproc: int, port: int) -> subprocess.Popen:
    e = env(NNODES=str(nnodes), NPROC_PER_NODE=str(nproc), MASTER_PORT=str(port), RDZV_ID=f"test{port}")
    cmd = ["bash", "scripts/torchrun.sh", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=log.open("w"), stderr=subprocess.STDOUT)


def plain(args: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "train.py", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(runs: list[tuple[subprocess.Popen, Path]]) -> None:
    """Wait for every process; on failure show each failed one's log (a torchrun agent that lost its peer
    fails too, so the other node's log may hold the cause)."""
    for proc, _ in runs:
        proc.wait(timeout=300)
    failed = [(proc, log) for proc, log in runs if proc.returncode != 0]
    assert not failed, "\n\n".join(
        f"{log.name} (exit {proc.returncode}):\n{failure_excerpt(log.read_text())}" for proc, log in failed
    )


def failure_excerpt(text: str) -> str:
    """The first tracebacks (a worker's, then torchrun's own, which can fill any tail) and the tail."""
    parts, start = [], 0
    while len(parts) < 2 and (first := text.find("Traceback", start)) >= 0:
        parts.append(text[first : first + 3000] + "\n[...]\n")
        start = first + 3000
    return "".join(parts) + text[-2000:]


def assert_losses_equal(got: dict[int, float], expected: dict[int, float], steps) -> None:
    assert sorted(got) == list(steps), got
    torch.testing.assert_close([got[s] for s in steps], [expected[s] for s in steps], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module", params=sorted(TASKS))
def two_nodes(request, tmp_path_factory) -> dict:
    """A 2-node sharded run and, alongside, the 1-process reference with the same global batches."""
    task, tmp = request.param, tmp_path_factory.mktemp(f"nodes_{request.param}")
    single = plain(fit_args(task, tmp / "single", tmp / "single.jsonl", world=None), tmp / "single.log")
    for attempt in (1, 2):
        port, args = free_port(), fit_args(task, tmp / "run", tmp / "nodes.jsonl", world=2)
        nodes = [
            (torchrun(args, tmp / f"node{i}.log", nnodes=2, nproc=1, port=port), tmp / f"node{i}.log")
            for i in (0, 1)
        ]
        for proc, _ in nodes:
            proc.wait(timeout=300)
        logs = "".join(log.read_text() for _, log in nodes)
        # Open, cause not found: in about one fresh-clone run in three, one torchrun agent lost the c10d
        # store while polling it (RendezvousConnectionError in the agent's monitor loop). Such a run is
        # repeated once from scratch, with a warning that carries both nodes' tracebacks (the store's host
        # may show why it went away); any other failure fails.
        if attempt == 1 and any(p.returncode for p, _ in nodes) and "RendezvousConnectionError" in logs:
            excerpts = "\n\n".join(
                f"{log.name} (exit {proc.returncode}):\n{failure_excerpt(log.read_text())}"
                for proc, log in nodes
            )
            warnings.warn(
                f"{task}: a torchrun agent lost its rendezvous store; the 2-node run is repeated. The failed "
                f"attempt's logs:\n{excerpts}",
                stacklevel=2,
            )
            for _, log in nodes:
                log.rename(log.with_suffix(".attempt1.log"))
            shutil.rmtree(tmp / "run", ignore_errors=True)
            (tmp / "nodes.jsonl").unlink(missing_ok=True)
            continue
        break
    finish([*nodes, (single, tmp / "single.log")])
    return {"task": task, "tmp": tmp, "checkpoints": tmp / "run" / "checkpoints"}


@pytest.mark.slow  # three training processes and two torchrun agents on a shared 2-core machine
def test_two_torchrun_nodes_match_one_process(two_nodes):
    tmp = two_nodes["tmp"]
    logs = (tmp / "node0.log").read_text() + (tmp / "node1.log").read_text()
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs, logs[-3000:]
    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):  # sharded: one file of tensors per rank
        shards = sorted(p.name for p in (two_nodes["checkpoints"] / f"step={step:08d}.ckpt").iterdir())
        assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"], shards
    starts, sharded = read_steps(tmp / "nodes.jsonl")
    _, single = read_steps(tmp / "single.jsonl")
    assert starts == [0]
    assert_losses_equal(sharded, single, range(1, STEPS + 1))
    if two_nodes["task"] == "video":  # both ranks' halves of the averages were saved, and they are right
        got = ema_averages(two_nodes["checkpoints"] / "last.ckpt", tmp)
        assert_same_ema(got, ema_averages(tmp / "single" / "checkpoints" / "last.ckpt", tmp))


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_and_on_two_processes(two_nodes):
    task, tmp = two_nodes["task"], two_nodes["tmp"]
    checkpoint = two_nodes["checkpoints"] / f"step={SAVE_EVERY:08d}.ckpt"
    _, uninterrupted = read_steps(tmp / "nodes.jsonl")
    runs = {}
    for world in (1, 2):
        args = fit_args(task, tmp / f"resume{world}", tmp / f"resume{world}.jsonl", world=world)
        args.append(f"--ckpt_path={checkpoint}")
        log = tmp / f"resume{world}.log"
        proc = plain(args, log) if world == 1 else torchrun(args, log, nnodes=1, nproc=2, port=free_port())
        runs[world] = (proc, log)
    finish(list(runs.values()))
    for world in (1, 2):
        starts, resumed = read_steps(tmp / f"resume{world}.jsonl")
        assert starts == [SAVE_EVERY], f"resumed on {world}: the step count continues"
        assert_losses_equal(resumed, uninterrupted, range(SAVE_EVERY + 1, STEPS + 1))
        saved = torch.load(
            tmp / f"resume{world}" / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True
        )
        assert saved["global_step"] == STEPS
        if task == "video":  # the averages were resharded on resume and went on from the saved ones
            last = tmp / f"resume{world}" / "checkpoints" / "last.ckpt"
            assert_same_ema(
                ema_averages(last, tmp), ema_averages(two_nodes["checkpoints"] / "last.ckpt", tmp)
            )


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_a_sharded_checkpoint_and_exits_nonzero(tmp_path):
    """torchrun forwards SIGTERM to both workers; they agree at the end of a step, save their shards
    collectively and exit (with 143), and torchrun fails instead of reporting success."""
    marker, log = tmp_path / "training", tmp_path / "torchrun.log"
    args = fit_args("lm", tmp_path / "run", tmp_path / "steps.jsonl", world=2)
    args += ["--trainer.max_steps=100000", "--checkpoint.every_n_train_steps=100000"]
    args += [
        "--trainer.callbacks+=tests.resilience_helpers.MarkAndPace",
        f"--trainer.callbacks.marker={marker}",
    ]
    proc = torchrun(args, log, nnodes=1, nproc=2, port=free_port())
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    text = log.read_text()
    assert "received SIGTERM; saved step" in text, text[-4000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    saved = torch.load(last / "meta.pt", weights_only=True)["global_step"]
    assert saved >= 3
    _, losses = read_steps(tmp_path / "steps.jsonl")
    assert max(losses) == saved, "the checkpoint holds the last step that was trained"
