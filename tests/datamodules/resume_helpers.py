"""Callbacks for the kill-and-resume tests, loaded by ``train.py fit`` subprocesses via ``--trainer.callbacks+=``."""

from __future__ import annotations

import json
import os
import signal

from lightning.pytorch import Callback


class LossLog(Callback):
    """Appends ``{"step", "loss"}`` per training step to the JSON-lines file ``path``; the loss as
    ``float.hex`` so runs can be compared bit for bit. With ``kill_after_step`` = k the process SIGKILLs
    itself when the next batch starts, i.e. right after step k's checkpoint was written."""

    def __init__(self, path: str, kill_after_step: int | None = None):
        self.path, self.kill_after_step = path, kill_after_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.kill_after_step is not None and trainer.global_step >= self.kill_after_step:
            checkpoint = os.path.join(
                trainer.default_root_dir, "checkpoints", f"step={trainer.global_step:08d}.ckpt"
            )
            if not os.path.exists(checkpoint):
                raise RuntimeError(f"{checkpoint} was not written before the kill")
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(self.path, "a") as f:
            f.write(
                json.dumps({"step": trainer.global_step, "loss": None if loss is None else float(loss).hex()})
            )
            f.write("\n")
