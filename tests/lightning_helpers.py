"""Small Lightning helpers shared by the task tests."""

from __future__ import annotations

from lightning.pytorch import Callback, Trainer


def quiet_trainer(tmp_path, **kwargs) -> Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary, writing under tmp_path."""
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return Trainer(**{**defaults, **kwargs})


class Losses(Callback):
    """Records the training loss of every batch."""

    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))
