"""A tiny language model implementing the forgetting protocol, and callbacks that record what happened."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB, DIM, PAD = 12, 4, 0


class TinyLM(LightningModule):
    """Embedding -> Linear -> output projection (tied to the embedding unless ``tied=False``)."""

    def __init__(self, tied: bool = True, lr: float = 0.1, n_batches: int = 64, accumulate: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=PAD)
        self.proj = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        self.lr, self.n_batches = lr, n_batches
        self.seen_in_forward: list[torch.Tensor] = []

    def token_embedding(self) -> nn.Embedding:
        return self.embed

    def output_embedding(self) -> nn.Linear:
        return self.head

    def init_parameter_(self, param: torch.Tensor, out: torch.Tensor, generator: torch.Generator) -> None:
        out.normal_(0.0, 1.0, generator=generator)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        self.seen_in_forward.append(self.embed.weight.detach().clone())
        logits = self.head(torch.tanh(self.proj(self.embed(ids))))
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        emb = {id(self.embed.weight), id(self.head.weight)}
        rest = [p for p in self.parameters() if id(p) not in emb]
        groups = [{"params": [self.embed.weight]}, {"params": rest}]
        if self.head.weight is not self.embed.weight:
            groups.append({"params": [self.head.weight]})
        return torch.optim.Adam(groups, lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, VOCAB, (self.n_batches * 4, 6), generator=g)
        return DataLoader(TensorDataset(ids), batch_size=4, shuffle=False)


class Snapshots(Callback):
    """After every training batch (placed after the ForgettingSchedule): step, embedding and optimizer state."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.embeds: list[torch.Tensor] = []
        self.opt_steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(trainer.global_step)
        self.embeds.append(pl_module.embed.weight.detach().clone())
        opt = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.opt_steps.append({names[id(p)]: float(s["step"]) for p, s in opt.state.items() if "step" in s})


class LrRecorder(Callback):
    """Registers, after the schedule's hook, an optimizer pre-step hook recording the lr actually used."""

    def __init__(self) -> None:
        self.used: list[float] = []  # group 0 lr inside each optimizer step
        self.after: list[float] = []  # group 0 lr after the batch

    def on_fit_start(self, trainer, pl_module) -> None:
        trainer.optimizers[0].register_step_pre_hook(
            lambda opt, a, k: self.used.append(opt.param_groups[0]["lr"])
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(trainer.optimizers[0].param_groups[0]["lr"])
