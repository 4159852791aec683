"""Test-only pieces loaded by class path into `train.py` runs (often in subprocesses) by the resilience tests."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.demos.boring_classes import BoringModel
from torch.utils.data import DataLoader, IterableDataset

from modules.resilience import DivergenceError


class MarkAndPace(Callback):
    """Touches `marker` once `after_step` optimizer steps are done, then sleeps `pause` s per step, so a test
    can signal the process while it is training (the signal comes from outside; no timing is asserted)."""

    def __init__(self, marker: str, after_step: int = 3, pause: float = 0.05):
        self.marker, self.after_step, self.pause = marker, after_step, pause

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.after_step:
            Path(self.marker).touch()
            time.sleep(self.pause)


class SlowCheckpointIO(TorchCheckpointIO):
    """Writes checkpoints of steps >= `slow_from_step` halfway, touches `marker` and sleeps for `pause` s before
    writing the rest, so a test can kill the process in the middle of a save."""

    def __init__(self, marker: str, slow_from_step: int, pause: float = 120.0):
        self.marker, self.slow_from_step, self.pause = marker, slow_from_step, pause

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if checkpoint["global_step"] < self.slow_from_step:
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            Path(self.marker).touch()
            time.sleep(self.pause)
            f.write(data[len(data) // 2 :])


class Diverging(BoringModel):
    """BoringModel that raises `error` ("divergence" -> DivergenceError, else RuntimeError) in the training
    step after `good_steps` optimizer steps, and remembers its weights after every good step (class attribute,
    the tests run it in-process)."""

    last_good: dict[str, torch.Tensor] = {}

    def __init__(self, good_steps: int = 2, error: str = "divergence"):
        super().__init__()
        self.good_steps, self.error = good_steps, error

    def training_step(self, batch, batch_idx):
        if self.global_step >= self.good_steps:
            if self.error == "divergence":
                raise DivergenceError("loss non-finite for 3 consecutive steps (test)")
            raise RuntimeError("operator failure (test)")
        return super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        Diverging.last_good = {k: v.detach().clone() for k, v in self.state_dict().items()}


class StepRecorder(Callback):
    """Appends {"step", "loss"} (the loss averaged over ranks) of every training step to the JSON-lines file
    `path` (rank 0), and {"start": global_step} when training starts."""

    def __init__(self, path: str):
        self.path = path

    def _write(self, trainer, row: dict) -> None:
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_train_start(self, trainer, pl_module):
        self._write(trainer, {"start": trainer.global_step})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.strategy.reduce(outputs["loss"].detach().float(), reduce_op="mean")
        self._write(trainer, {"step": trainer.global_step, "loss": float(loss)})


def read_steps(path: str | os.PathLike) -> tuple[list[int], dict[int, float]]:
    """(the start steps, {global step after the batch: loss}) recorded by StepRecorder."""
    starts, losses = [], {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if "start" in row:
            starts.append(row["start"])
        else:
            losses[row["step"]] = row["loss"]
    return starts, losses


class _GlobalBatches(IterableDataset):
    def __init__(self, make, step_fn, rank: int, world: int):
        self.make, self.step_fn, self.rank, self.world = make, step_fn, rank, world

    def __iter__(self):
        step = self.step_fn()
        while True:  # the batch of global step s is a pure function of s: resuming at s continues the stream
            batch = self.make(step)
            yield {k: v[self.rank :: self.world] for k, v in batch.items()}
            step += 1


class GlobalBatchData(LightningDataModule):
    """Training batches of `global_batch` samples, the batch of global step s drawn from a generator seeded
    by s, rank r taking samples r, r + world, ...: a run on any number of processes sees the same global
    batches, and a resumed run continues where it stopped. task "lm": random byte sequences of `seq_len` + 1
    tokens; "nvs": random scenes of tests/modules/nvs_helpers.py at 16x16; "video": procedural 8-frame clips;
    "icl": masked-LM sequences (pass seq_len and vocab_size of the ICL config)."""

    def __init__(self, task: str = "lm", global_batch: int = 4, seq_len: int = 64, vocab_size: int = 257):
        super().__init__()
        self.task, self.global_batch, self.seq_len, self.vocab_size = task, global_batch, seq_len, vocab_size

    def _make(self, step: int) -> dict:
        if self.task == "nvs":
            from tests.modules.nvs_helpers import make_batch

            batch = make_batch(step, batch=self.global_batch)
            return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if self.task == "video":  # the tiny video config's clips: 8 frames of 16x16, keyed for their noise
            from datamodules.videos import generate_video

            clips = [
                generate_video([step, i], num_frames=8, height=16, width=16) for i in range(self.global_batch)
            ]
            frames = torch.stack([torch.from_numpy(c["frames"]) for c in clips])
            return {"frames": frames, "key": [f"step{step}_clip{i}" for i in range(self.global_batch)]}
        generator = torch.Generator().manual_seed(step)
        if self.task == "icl":  # masked-LM sequences of the ICL toy's length, one masked position each
            ids = torch.randint(3, self.vocab_size, (self.global_batch, self.seq_len), generator=generator)
            labels = torch.full_like(ids, -100)
            where = torch.randint(0, self.seq_len, (self.global_batch,), generator=generator)
            labels[torch.arange(self.global_batch), where] = ids[torch.arange(self.global_batch), where]
            ids[torch.arange(self.global_batch), where] = 1  # the mask id
            return {"input_ids": ids, "labels": labels}
        tokens = torch.randint(0, self.vocab_size, (self.global_batch, self.seq_len + 1), generator=generator)
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def train_dataloader(self):
        trainer = self.trainer
        dataset = _GlobalBatches(
            self._make, lambda: trainer.global_step, trainer.global_rank, trainer.world_size
        )
        return DataLoader(dataset, batch_size=None)
