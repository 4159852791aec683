"""Two CPU processes (gloo), FSDP2 ``fully_shard`` through Lightning's ModelParallelStrategy; run by
tests/modules/test_forgetting_fsdp.py as ``python tests/modules/fsdp_forgetting_script.py OUT_DIR``.

After the reset at step 3 every rank writes to OUT_DIR/rank<r>.pt: the gathered full embedding, its local
shard, whether the output projection is still the embedding's Parameter, and the norm of the Adam moments
of the embedding shard (zero right after the reset). The probabilistic mode runs for the first two
steps: the gathered embedding inside those batches ("during") and after them ("after") are recorded too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from modules.forgetting import ForgettingSchedule, full_value  # noqa: E402

VOCAB, DIM, PAD, RESET_AT = 12, 4, 0, 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=PAD)
        self.proj = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(self.embed(ids))))


class ShardedLM(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net.proj, mesh=mesh)
        fully_shard(self.net, mesh=mesh)  # root unit: the tied embedding/head lives here

    def token_embedding(self) -> nn.Embedding:
        return self.net.embed

    def init_parameter_(self, param: torch.Tensor, out: torch.Tensor, generator: torch.Generator) -> None:
        out.normal_(0.0, 1.0, generator=generator)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self.net(ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        ids = torch.randint(1, VOCAB, (64, 6), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(ids), batch_size=4)


class Dump(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.during: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.during.append(full_value(pl_module.net.embed.weight).clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(full_value(pl_module.net.embed.weight).clone())
        if trainer.global_step != RESET_AT:
            return
        w = pl_module.net.embed.weight
        state = trainer.optimizers[0].state[w]
        torch.save(
            {
                "is_dtensor": isinstance(w, DTensor),
                "full": full_value(w).clone(),
                "local": w.to_local().detach().clone(),
                "tied": pl_module.net.head.weight is w,
                "exp_avg_norm": float(state["exp_avg"].to_local().norm()),
                "step": float(full_value(state["step"])),
                "during": self.during,
                "after": self.after,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main(out: Path) -> None:
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=RESET_AT,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ForgettingSchedule(every_k=RESET_AT, prob=0.5, prob_steps=2, seed=11), Dump(out)],
    )
    trainer.fit(ShardedLM())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
