"""Masked-LM training of the structural in-context-learning toy (docs/architecture.md, Forgetting).

Loss: cross-entropy on the masked positions only. Metric: a sequence counts as right when all its masked
tokens are predicted exactly (argmax over the whole vocabulary); logged as ``val/<set>_acc`` for every
evaluation set of the datamodule, and ``val/<set>_ctx_acc`` with the argmax restricted to the ids visible in
the sequence (which context token the model picks, whatever the rest of the vocabulary scores).

What this module needs from the datamodule (duck-typed, datamodules never import modules):
``eval_sets`` (names of the validation dataloaders, in order), ``holdout_token_ids`` ([H] int64 ids never
trained) and ``vocab_size``.

The forgetting protocol (see ``modules/forgetting.py``) is implemented here: ``token_embedding()`` and
``init_parameter_(param, out, generator)``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.shards import seeded_generator
from lact.models.mlm import MaskedLMConfig, MaskedLMEncoder
from lact.nn import IGNORE_INDEX
from modules.task import OptimConfig, TaskModule, as_config

HOLDOUT_INITS = ("model", "match", "keep")


class MaskedLMModule(TaskModule):
    """Args:
    net: the encoder (MaskedLMConfig, or a dict of its fields).
    optim: OptimConfig (lr, betas, weight decay, warmup + cosine, grad_clip, ...). The token embedding is
        never decayed (modules.task.parameter_groups); list the learned positions in ``optim.no_decay``
        (``["net.pos"]``) to keep them undecayed too.
    eval_seed: seeds the per-evaluation re-draw of the held-out rows (mixed with the global step).
    holdout_init: what the never-trained (held-out) rows are at evaluation: ``"model"`` a fresh draw of the
        token-embedding initialiser, ``"match"`` a fresh normal draw with the current mean and std of the
        trained rows (pad and held-out rows excluded), ``"keep"`` the rows as the model holds them (never
        trained as inputs; with a tied output they drift in the softmax, and forgetting resets redraw them).
    """

    throughput_unit = "tokens"

    def __init__(
        self,
        net: MaskedLMConfig,
        optim: OptimConfig | None = None,
        eval_seed: int = 1234,
        holdout_init: str = "model",
    ) -> None:
        if holdout_init not in HOLDOUT_INITS:
            raise ValueError(f"holdout_init={holdout_init!r}: expected one of {HOLDOUT_INITS}")
        super().__init__(optim)
        self.net = MaskedLMEncoder(**dataclasses.asdict(as_config(MaskedLMConfig, net)))
        self._saved_rows: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        return self.net.embed.num_embeddings

    def throughput_items(self, batch: dict) -> int:
        return batch["input_ids"].numel()

    # ---- forgetting protocol -------------------------------------------------------------------------
    def token_embedding(self) -> nn.Embedding:
        """The input token embedding (its weight is also the tied output projection)."""
        return self.net.embed

    def output_embedding(self) -> nn.Parameter:
        """The output projection's weight [V, D] (the token embedding's own when tied)."""
        return self.net.head.weight

    def init_parameter_(self, param: torch.Tensor, out: torch.Tensor, generator: torch.Generator) -> None:
        """Fill ``out`` (full shape of ``param``) with a fresh draw of its initialiser."""
        if param is not self.net.embed.weight and param is not self.net.head.weight:
            raise ValueError(
                "init_parameter_: MaskedLMModule re-draws only the token embedding and the output projection"
            )
        self.net.init_embedding_(out, generator)

    # ---- training ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and getattr(dm, "vocab_size", self.vocab_size) != self.vocab_size:
            raise ValueError(
                f"model vocab_size={self.vocab_size} but the datamodule's vocabulary has "
                f"{dm.vocab_size} ids: set model.init_args.net.vocab_size to {dm.vocab_size}"
            )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [B, L] int64 -> logits [B, L, V]."""
        return self.net(input_ids)

    def _loss_and_acc(
        self, batch: dict[str, torch.Tensor], context_acc: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Loss (scalar) and accuracy per sequence ([B], 1.0 where every masked token is right).

        With ``context_acc`` also the accuracy of the argmax taken only over the ids visible in the
        sequence's input ([B]): it asks which context token the model picks, leaving out whether that
        token's logit beats the rest of the vocabulary.
        """
        ids, labels = batch["input_ids"], batch["labels"]
        logits = self(ids)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        masked = labels != IGNORE_INDEX

        def acc(lg: torch.Tensor) -> torch.Tensor:
            return ((lg.argmax(-1) == labels) | ~masked).all(1).float()

        if not context_acc:
            return loss, acc(logits)
        visible = torch.zeros(ids.shape[0], logits.shape[-1], dtype=torch.bool, device=ids.device)
        visible.scatter_(1, ids, True)  # [B, V]; the mask id is visible too and never a label
        return loss, acc(logits), acc(logits.masked_fill(~visible[:, None, :], float("-inf")))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, acc = self._loss_and_acc(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", acc.mean())
        return loss

    def on_validation_epoch_start(self) -> None:
        # Held-out rows were never trained, yet in a tied model they drift (they sit in the output softmax
        # and decay); by default evaluate them as truly unseen tokens: a fresh draw (holdout_init).
        ids = self._holdout_ids()
        if ids is None or self.hparams.holdout_init == "keep":
            return
        w = self.net.embed.weight
        self._saved_rows = w.detach()[ids].clone()
        fresh = torch.empty(len(ids), w.shape[1], dtype=torch.float32)
        g = seeded_generator(self.hparams.eval_seed, self.global_step)
        if self.hparams.holdout_init == "model":
            self.net.init_embedding_(fresh, g)
        else:
            trained = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
            trained[ids] = False
            trained[self.net.embed.padding_idx] = False
            rows = w.detach()[trained].float()
            fresh.normal_(rows.mean().item(), rows.std().item(), generator=g)
        with torch.no_grad():
            w[ids] = fresh.to(w.device, w.dtype)

    def on_validation_epoch_end(self) -> None:
        # Restore here, not in on_validation_end: ModelCheckpoint saves in its on_validation_end, which
        # Lightning calls before the module's, and must see the trained rows.
        if self._saved_rows is not None:
            with torch.no_grad():
                self.net.embed.weight[self._holdout_ids()] = self._saved_rows
            self._saved_rows = None

    def _holdout_ids(self) -> torch.Tensor | None:
        dm = getattr(self.trainer, "datamodule", None)
        ids = getattr(dm, "holdout_token_ids", None)
        return None if ids is None else ids.to(self.device)

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.evaluate(batch, dataloader_idx, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """`train.py test`: the evaluation sets scored as in validation, logged as test/<set>_acc, ..."""
        self.evaluate(batch, dataloader_idx, "test")

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()  # held-out rows as in validation (holdout_init)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def evaluate(self, batch: dict[str, torch.Tensor], dataloader_idx: int, stage: str) -> None:
        loss, acc, ctx_acc = self._loss_and_acc(batch, context_acc=True)
        dm = getattr(self.trainer, "datamodule", None)
        name = dm.eval_sets[dataloader_idx] if dm is not None and hasattr(dm, "eval_sets") else dataloader_idx
        self.log(f"{stage}/{name}_acc", acc.mean(), add_dataloader_idx=False, batch_size=len(acc))
        self.log(f"{stage}/{name}_loss", loss, add_dataloader_idx=False, batch_size=len(acc))
        self.log(f"{stage}/{name}_ctx_acc", ctx_acc.mean(), add_dataloader_idx=False, batch_size=len(acc))
