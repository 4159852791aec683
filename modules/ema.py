"""An exponential moving average of the network's weights, as a Lightning Callback.

After every optimizer step that changed the weights: ema <- decay * ema + (1 - decay) * weight, for every floating-point parameter and
buffer of `pl_module.net`, kept in fp32 (a DTensor shard under FSDP2: each rank averages its own shard).
Validation, test and predict run with the averaged weights swapped in, and the training weights are swapped back
afterwards, so a task needs no EMA code of its own. The average is saved in checkpoints and restored on resume
instead of being restarted from the weights:
- a single-file checkpoint keeps it in the callback's state (plain tensors; under FSDP2 with
  `save_distributed_checkpoint=False`, the full tensors gathered from every rank);
- a sharded checkpoint (FSDP2's default, a directory) keeps it next to the weights, under the keys
  `ema.<parameter name>` of the distributed checkpoint's `state_dict`, each rank writing its own shards. The
  callback state written by rank 0 then only says so, and on resume every rank reads its part back through
  torch.distributed.checkpoint into averages sharded like the weights, so a checkpoint written by 2 processes
  resumes on 1 or on 4 (resharding), as the weights do.

Batches without an optimizer step (gradient accumulation) and steps that modules/task.py's policy skipped
(non-finite loss or gradient norm: the module's `consecutive_skips` is then above 0) leave the average alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.distributed.tensor import DTensor

SHARDED_PREFIX = "ema."  # key prefix of the averages inside a sharded checkpoint's state_dict


class EMA(Callback):
    """Args:
    decay: weight of the old average per step (0.999: an average over roughly the last 1000 steps).
    start_step: steps before which the average just copies the weights (the early weights are noise).
    validate: run validation with the averaged weights; test and predict always use them.
    """

    def __init__(self, decay: float = 0.999, start_step: int = 0, validate: bool = True):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.start_step, self.validate = decay, start_step, validate
        self.averages: dict[str, Tensor] = {}
        self._saved: dict[str, Tensor] | None = None
        self._loaded: dict[str, Tensor] | None = None
        self._last_step: int | None = None  # trainer.global_step at the last update
        self._sharded_source: Path | None = None  # a sharded checkpoint whose averages are still to be read
        self._checkpoint_path: str | None = None  # the checkpoint being restored (set by on_load_checkpoint)

    @staticmethod
    def tracked(pl_module: LightningModule) -> dict[str, Tensor]:
        net = pl_module.net
        named = {**dict(net.named_parameters()), **dict(net.named_buffers())}
        return {name: t for name, t in named.items() if t.is_floating_point()}

    def ensure(self, pl_module: LightningModule) -> None:
        """Create the average (from a restored checkpoint when there is one, else from the weights)."""
        if self.averages:
            return
        if self._sharded_source is not None:
            self.averages = self.read_sharded(pl_module, self._sharded_source)
            self._sharded_source = None
            return
        source = self._loaded or {}
        self.averages = {}
        for name, t in self.tracked(pl_module).items():
            value = source.get(name, t)
            self.averages[name] = value.detach().to(device=t.device, dtype=torch.float32).clone()
        self._loaded = None

    def read_sharded(self, pl_module: LightningModule, path: Path) -> dict[str, Tensor]:
        """Every rank's part of the averages in the sharded checkpoint at `path` (a collective call), laid out
        like the weights now (DTensor shards of this run's mesh, whatever the mesh that wrote them)."""
        averages = {n: torch.empty_like(t, dtype=torch.float32) for n, t in self.tracked(pl_module).items()}
        wanted = {SHARDED_PREFIX + n: a for n, a in averages.items()}
        try:
            dcp.load({"state_dict": wanted}, checkpoint_id=str(path))
        except Exception as err:  # DCP names the first missing key; add which checkpoint and what to do
            raise RuntimeError(
                f"checkpoint {path}: the EMA callback's averages (keys 'ema.<parameter>') could not be read "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). It was written "
                "without the EMA callback or by another network; resume without the EMA callback, or from a "
                "checkpoint written with it."
            ) from err
        return averages

    def sharded(self) -> bool:
        return any(isinstance(a, DTensor) for a in self.averages.values())

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

    def on_test_start(self, trainer, pl_module) -> None:
        self.swap_in(pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
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
        if not self.sharded():
            return
        # Every rank runs this hook. ModelParallelStrategy writes the checkpoint's "state_dict" through the
        # distributed checkpoint (each rank its shards) but the callback states with torch.save from rank 0
        # only, which would keep rank 0's shards alone: the sharded averages go with the weights instead.
        if getattr(trainer.strategy, "_save_distributed_checkpoint", False):
            checkpoint["state_dict"].update({SHARDED_PREFIX + n: a for n, a in self.averages.items()})
        else:  # one file written by rank 0: the whole averages (gathering is collective: every rank does it)
            full = {n: a.full_tensor().cpu() for n, a in self.averages.items()}
            checkpoint["callbacks"][self.state_key]["averages"] = full

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._checkpoint_path = trainer.ckpt_path  # load_state_dict (called next) may need to read from it

    def state_dict(self) -> dict:
        if self.sharded():  # see on_save_checkpoint: the averages travel with the weights
            return {"decay": self.decay, "averages": {}, "sharded": True}
        return {"decay": self.decay, "averages": dict(self.averages)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.averages = {}
        if state_dict.get("sharded") and not state_dict["averages"]:
            path = self._checkpoint_path
            if path is None or not Path(path).is_dir():
                raise RuntimeError(
                    f"EMA: the checkpoint {path} says its averages are in a sharded checkpoint directory, "
                    "but it is not one; resume from the checkpoint directory that was written with them."
                )
            self._sharded_source = Path(path)  # read in ensure(), once the network is sharded
            return
        self._loaded = dict(state_dict["averages"])


def averaged_weights(checkpoint: dict) -> dict[str, Tensor] | None:
    """The EMA callback's averages of the network's tensors in a single-file Lightning checkpoint (loaded with
    torch.load), keyed like `pl_module.net`'s state dict, or None when the run had no EMA callback. For
    scripts that build the network from a checkpoint without a Trainer; they then see what predict sees."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("EMA") and state.get("averages"):
            return dict(state["averages"])
    return None
