"""Trains a tiny LaCT stack for a few steps, sharded with FSDP2 over N CPU processes (gloo) or in one plain
process, and saves the full final weights. Run by tests/modules/test_scale.py as a subprocess.

    python tests/modules/fsdp_worker.py --devices 2 --out weights.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lact.layer import LaCTLayer  # noqa: E402
from lact.nn import SwiGLUMLP  # noqa: E402
from modules.scale import shard_model  # noqa: E402


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    seed_everything(0)
    data = TensorDataset(torch.randn(8, 12, 16), torch.randn(8, 12, 16))
    module = Module()  # same init on every rank (same seed)
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
    )
    # Global batch 4 in a fixed order: one process takes samples 0-3 in step 1, two take 0,2 and 1,3.
    mine = Subset(data, range(trainer.global_rank, len(data), trainer.world_size))
    trainer.fit(module, DataLoader(mine, batch_size=4 // args.devices, shuffle=False))
    state = module.net.state_dict()
    full = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()
    }
    if trainer.global_rank == 0:
        sharded = any(hasattr(v, "full_tensor") for v in state.values())
        torch.save({"weights": full, "sharded": sharded}, args.out)


if __name__ == "__main__":
    main()
