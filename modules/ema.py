"""An exponential moving average of the network's weights, as a Lightning Callback.

After every optimizer step that changed the weights: ema <- decay * ema + (1 - decay) * weight, for every floating-point parameter and
buffer of `pl_module.net`, kept in fp32 (a DTensor shard under FSDP2: each rank averages its own shard).
Validation and predict run with the averaged weights swapped in, and the training weights are swapped back
afterwards, so a task needs no EMA code of its own. The average is saved in checkpoints (the callback's
state) and restored on resume instead of being restarted from the weights.

Batches without an optimizer step (gradient accumulation) and steps that modules/task.py's policy skipped
(non-finite loss or gradient norm: the module's `consecutive_skips` is then above 0) leave the average alone.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor


class EMA(Callback):
    """Args:
    decay: weight of the old average per step (0.999: an average over roughly the last 1000 steps).
    start_step: steps before which the average just copies the weights (the early weights are noise).
    validate: run validation with the averaged weights; predict always uses them.
    """

    def __init__(self, decay: float = 0.999, start_step: int = 0, validate: bool = True):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.start_step, self.validate = decay, start_step, validate
        self.averages: dict[str, Tensor] = {}
        self._saved: dict[str, Tensor] | None = None
        self._loaded: dict[str, Tensor] | None = None
        self._last_step: int | None = None  # trainer.global_step at the last update

    @staticmethod
    def tracked(pl_module: LightningModule) -> dict[str, Tensor]:
        net = pl_module.net
        named = {**dict(net.named_parameters()), **dict(net.named_buffers())}
        return {name: t for name, t in named.items() if t.is_floating_point()}

    def ensure(self, pl_module: LightningModule) -> None:
        """Create the average (from a restored checkpoint when there is one, else from the weights)."""
        if self.averages:
            return
        source = self._loaded or {}
        self.averages = {}
        for name, t in self.tracked(pl_module).items():
            value = source.get(name, t)
            self.averages[name] = value.detach().to(device=t.device, dtype=torch.float32).clone()
        self._loaded = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.ensure(pl_module)

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx
    ) -> None:
        self.ensure(pl_module)
        step = trainer.global_step
        stepped, self._last_step = step != self._last_step, step
        if not stepped or getattr(pl_module, "consecutive_skips", 0) > 0:
            return  # no optimizer step in this batch, or a skipped one: the weights did not change
        decay = self.decay if step > self.start_step else 0.0
        for name, t in self.tracked(pl_module).items():
            self.averages[name].lerp_(t.detach().float(), 1 - decay)

    @torch.no_grad()
    def swap_in(self, pl_module: LightningModule) -> None:
        self.ensure(pl_module)
        if self._saved is not None:
            return
        self._saved = {}
        for name, t in self.tracked(pl_module).items():
            self._saved[name] = t.detach().clone()
            t.copy_(self.averages[name].to(t.dtype))

    @torch.no_grad()
    def swap_out(self, pl_module: LightningModule) -> None:
        if self._saved is None:
            return
        for name, t in self.tracked(pl_module).items():
            t.copy_(self._saved[name])
        self._saved = None

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.validate:
            self.swap_in(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.swap_out(pl_module)

    def on_predict_start(self, trainer, pl_module) -> None:
        self.swap_in(pl_module)

    def on_predict_end(self, trainer, pl_module) -> None:
        self.swap_out(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # A checkpoint written during validation must hold the training weights, not the average.
        if self._saved is not None:
            state = checkpoint.get("state_dict", {})
            for name, t in self._saved.items():
                key = f"net.{name}"
                if key in state:
                    state[key] = t.clone()

    def state_dict(self) -> dict:
        return {"decay": self.decay, "averages": dict(self.averages)}

    # Known bug (open): under FSDP2 the averages are DTensor shards, and ModelParallelStrategy writes callback
    # states only from rank 0 (torch.save of the checkpoint's metadata), so a sharded checkpoint holds rank 0's
    # shards alone: resuming on another process count fails in the first update ("different meshes"), and on
    # the same count ranks > 0 would restore rank 0's shard. Single-process runs are unaffected. The fix is to
    # keep the averages in the module's state dict (saved and resharded by the distributed checkpoint).
    def load_state_dict(self, state_dict: dict) -> None:
        self._loaded = dict(state_dict["averages"])
        self.averages = {}
