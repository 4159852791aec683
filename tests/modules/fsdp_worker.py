"""Trains a tiny model for a few steps, sharded with FSDP2 over N CPU processes (gloo) or in one plain
process, and saves the full final weights. Run by tests/modules/test_scale.py as a subprocess.

    python tests/modules/fsdp_worker.py --devices 2 --out weights.pt [--task nvs [--compile]]

--task lact (default): a LaCT stack with its own configure_model. --task nvs: modules.nvs.NVSModule (its own
configure_model, AdamW, clipping) with per-block activation checkpointing; it also saves the global loss and
gradient norm of every step, the full gradients of the first step, and the predict_step outputs after training;
with --compile its blocks are compiled (net.compile) and the number of graphs dynamo compiled is saved too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lact.layer import LaCTLayer  # noqa: E402
from lact.nn import SwiGLUMLP  # noqa: E402
from modules.nvs import NVSModule  # noqa: E402
from modules.scale import shard_model  # noqa: E402
from modules.task import OptimConfig  # noqa: E402
from tests.modules.nvs_helpers import TINY, make_batch  # noqa: E402


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank must call it), a plain tensor as it is."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.lact = LaCTLayer(dim, 2, schedule="causal", chunk_size=4, momentum=True, muon="schedule")
        self.mlp = SwiGLUMLP(dim, 2 * dim)

    def forward(self, x):
        x = x + self.lact(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Net(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, dim)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Module(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = Net()

    def configure_model(self):
        shard_model(self.net, self.net.blocks, self.device_mesh)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        # SGD: Adam turns float-rounding differences in near-zero gradients into full-size steps.
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Record(Callback):
    """The loss (averaged over ranks) and gradient norm of every step, the first step's full gradients."""

    def __init__(self):
        self.losses, self.grad_norms, self.grads = [], [], {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:  # before clipping
            self.grads = {n: full(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))
        self.grad_norms.append(float(trainer.callback_metrics["train/grad_norm"]))


def nvs_batches(steps: int, rank: int, world: int) -> tuple[list[dict], dict]:
    """One global batch of 4 scenes per step, rank r taking scenes r, r + world, ...; and a predict batch."""

    def part(batch: dict) -> dict:
        return {k: v[rank::world] for k, v in batch.items()}

    return [part(make_batch(seed, batch=4)) for seed in range(steps)], make_batch(100, batch=2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--task", choices=("lact", "nvs"), default="lact")
    parser.add_argument("--compile", action="store_true", help="--task nvs with net.compile: true")
    args = parser.parse_args()
    seed_everything(0)
    data = TensorDataset(torch.randn(8, 12, 16), torch.randn(8, 12, 16))
    if args.task == "nvs":  # same init on every rank (same seed)
        config = {**TINY, "activation_checkpointing": True, "compile": args.compile}
        module = NVSModule(
            net=config,
            optim=OptimConfig(
                lr=1e-3, weight_decay=0.05, warmup_steps=1, total_steps=args.steps, skip_grad_norm=100.0
            ),
            turntable_frames=4,
        )
    else:
        module = Module()
    record = Record() if args.task == "nvs" else None
    if args.devices > 1:
        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    else:
        strategy = "auto"
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[record] if record else None,
    )
    if args.task == "nvs":
        batches, predict_batch = nvs_batches(args.steps, trainer.global_rank, trainer.world_size)
        trainer.fit(module, DataLoader(batches, batch_size=None))
    else:
        # Global batch 4 in a fixed order: one process takes samples 0-3 in step 1, two take 0,2 and 1,3.
        mine = Subset(data, range(trainer.global_rank, len(data), trainer.world_size))
        trainer.fit(module, DataLoader(mine, batch_size=4 // args.devices, shuffle=False))
    state = module.net.state_dict()
    result = {
        "weights": {k: full(v) for k, v in state.items()},
        "sharded": any(hasattr(v, "full_tensor") for v in state.values()),
    }
    if record:
        predicted = module.predict_step(predict_batch, 0)  # reconstruct + render on the sharded network
        result |= {"losses": record.losses, "grad_norms": record.grad_norms, "grads": record.grads}
        result["predict"] = {k: v for k, v in predicted.items() if k != "key"}
        result["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
    if trainer.global_rank == 0:
        torch.save(result, args.out)


if __name__ == "__main__":
    main()
