"""Training logic of the language model (issue 5): next-token cross-entropy, AdamW + warmup/cosine, clipping,
loss by position bucket, generation in `predict_step`. The network is lact/models/lm.py.

Batches are dicts with ``input_ids`` [B, L] (int64) and ``labels`` [B, L] (int64, the token that should follow
each position; -100 where no loss is taken, e.g. everything but the answers in MQAR).
Predict batches carry ``input_ids`` [1, P] (a prompt) and optionally ``prompt`` (its text).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor, nn

from datamodules.text import bytes_decode
from lact.models.lm import LaCTLM, LMConfig
from lact.models.lm_cache import generate
from modules.scale import parse_param_dtype, shard_model

IGNORE = -100


def bucket_edges(length: int, first: int) -> list[int]:
    """Position bucket edges 0, first, 2 first, 4 first, ... up to `length` (the last edge is `length`)."""
    edges, hi = [0], first
    while hi < length:
        edges.append(hi)
        hi *= 2
    return [*edges, length]


def bucket_name(lo: int, hi: int) -> str:
    """'0-1K', '1K-2K', ... for multiples of 1024, plain token counts otherwise."""

    def short(n: int) -> str:
        return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)

    return f"{short(lo)}-{short(hi)}"


class LMModule(LightningModule):
    """Trains `LaCTLM(config)` by next-token prediction.

    Args:
        config: the network (LMConfig; a dict with its fields is accepted too).
        lr: AdamW peak learning rate.            weight_decay: applied to matrices (ndim >= 2) only.
        betas, eps: AdamW.                        warmup_steps: linear warmup from lr / warmup_steps.
        min_lr_ratio: the cosine ends at lr * min_lr_ratio at `total_steps` (default: trainer.max_steps,
            else the trainer's estimate of the run's optimizer steps).
        grad_clip: max global L2 norm of the gradients (None: no clipping); the trainer's
            gradient_clip_val, when set, takes precedence.
        bucket_size: the first validation position bucket [0, bucket_size); then doubling: [b, 2b), [2b, 4b)...
        activation_checkpointing: recompute each block's activations in backward (memory for compute).
        fsdp_param_dtype: under FSDP2, the dtype parameters are gathered and computed in ("bfloat16"), None
            for their own dtype.
        max_new_tokens, temperature, top_k: generation in `predict_step` (temperature 0 = greedy).
    """

    def __init__(
        self,
        config: LMConfig,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        total_steps: int | None = None,
        grad_clip: float | None = 1.0,
        bucket_size: int = 1024,
        activation_checkpointing: bool = False,
        fsdp_param_dtype: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int | None = 40,
        seed: int = 0,
    ):
        super().__init__()
        if isinstance(config, dict):
            config = LMConfig(**config)
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if warmup_steps < 0 or bucket_size < 1:
            raise ValueError(
                f"warmup_steps must be >= 0 and bucket_size >= 1, got {warmup_steps}, {bucket_size}"
            )
        parse_param_dtype(fsdp_param_dtype)  # fails here on a bad name, not at sharding time
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip}")
        self.save_hyperparameters()
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.hparams["config"] = dataclasses.asdict(config)
        self.config = config
        self.model = LaCTLM(config)
        self.model.checkpoint_blocks = activation_checkpointing
        self._last_step_end: float | None = None
        self._val_sums: dict[tuple[int, int], Tensor] = {}

    # ---- forgetting-callback protocol (modules/forgetting.py) ------------------------------------------
    def token_embedding(self) -> nn.Embedding:
        """The input token embedding (also the LM head when tied)."""
        return self.model.token_embedding

    def output_embedding(self) -> nn.Parameter:
        """The LM head's weight: the embedding's own Parameter when tied."""
        head = self.model.lm_head
        return self.model.token_embedding.weight if head is None else head.weight

    def init_parameter_(self, name: str, out: Tensor, generator: torch.Generator) -> None:
        """Fill `out` with a fresh draw of the model's initialiser for parameter `name` (embedding or head)."""
        if name not in ("model.token_embedding.weight", "model.lm_head.weight"):
            raise ValueError(
                f"init_parameter_: no initialiser for {name!r}; only the embedding and the LM head"
            )
        out.normal_(0.0, self.config.init_std, generator=generator)

    # ---- scale -----------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """FSDP2 under ModelParallelStrategy: one shard unit per block, then the root (embedding, head)."""
        dtype = parse_param_dtype(self.hparams.fsdp_param_dtype)
        shard_model(self.model, self.model.blocks, self.device_mesh, param_dtype=dtype)

    # ---- training --------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        vocab = getattr(getattr(self.trainer, "datamodule", None), "vocab_size", None)
        if isinstance(vocab, int) and vocab > self.config.vocab_size:
            raise ValueError(
                f"config.vocab_size={self.config.vocab_size} is smaller than the data's vocabulary of {vocab} ids"
            )

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def token_losses(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """Per-position cross-entropy [B, L] (0 where ignored), the mask of scored positions [B, L] and
        whether the argmax was right [B, L]."""
        logits = self.model(batch["input_ids"])
        labels = batch["labels"]
        losses = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none"
        ).view_as(labels)
        scored = labels != IGNORE
        correct = (logits.argmax(-1) == labels) & scored
        return losses, scored, correct

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses, scored, _ = self.token_losses(batch)
        loss = losses.sum() / scored.sum().clamp(min=1)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/ppl", loss.detach().exp(), batch_size=batch_size)
        self._tokens_in_step = batch["input_ids"].numel()
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Wall time between consecutive steps: includes data loading and the optimizer, i.e. real throughput.
        now = time.perf_counter()
        if self._last_step_end is not None:
            self.log("train/tokens_per_s", self._tokens_in_step / (now - self._last_step_end))
        self._last_step_end = now

    def on_train_epoch_start(self) -> None:
        self._last_step_end = None  # validation between epochs is not training time

    def on_validation_start(self) -> None:
        self._last_step_end = None  # nor is validation in the middle of an epoch

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log("train/grad_norm", norm)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = gradient_clip_val if gradient_clip_val is not None else self.hparams.grad_clip
        if clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    # ---- validation: overall loss, perplexity, accuracy and loss by position bucket --------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        losses, scored, correct = self.token_losses(batch)
        edges = bucket_edges(losses.shape[1], self.hparams.bucket_size)
        # per range: (loss sum, scored tokens, correct tokens); (0, L) is the whole sequence
        ranges = [(0, losses.shape[1]), *zip(edges[:-1], edges[1:])]
        for lo, hi in ranges:
            row = torch.stack(
                [losses[:, lo:hi].sum(), scored[:, lo:hi].sum().float(), correct[:, lo:hi].sum().float()]
            ).detach()
            key = ("all", 0) if (lo, hi) == ranges[0] else (lo, hi)
            self._val_sums[key] = self._val_sums.get(key, 0) + row

    def on_validation_epoch_end(self) -> None:
        # Sums are reduced over ranks here, so every rank logs the same value (sync_dist averages equals).
        for key in sorted(self._val_sums, key=str):
            total = self.trainer.strategy.reduce(self._val_sums[key].clone(), reduce_op="sum")
            loss_sum, count, correct = total.tolist()
            if count == 0:
                continue
            loss = loss_sum / count
            if key == ("all", 0):
                self.log("val/loss", loss, prog_bar=True, sync_dist=True)
                self.log("val/ppl", math.exp(min(loss, 50.0)), sync_dist=True)
                self.log("val/accuracy", correct / count, sync_dist=True)
            else:
                self.log(f"val/loss_pos_{bucket_name(*key)}", loss, sync_dist=True)

    # ---- optimisation ----------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": hp.weight_decay, "name": "matrices"},
                {"params": no_decay, "weight_decay": 0.0, "name": "vectors"},
            ],
            lr=hp.lr,
            betas=tuple(hp.betas),
            eps=hp.eps,
        )
        total = hp.total_steps
        if total is None:
            total = (
                self.trainer.max_steps
                if self.trainer.max_steps > 0
                else self.trainer.estimated_stepping_batches
            )
        if not math.isfinite(total) or total < 1:
            raise ValueError(
                f"the cosine schedule needs a finite length, got {total} steps: "
                "set trainer.max_steps or total_steps"
            )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, hp.warmup_steps, int(total), hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- generation ------------------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Continue each prompt of batch["input_ids"] [B, P] by max_new_tokens sampled tokens (state cache).

        Returns one dict per prompt: ``prompt`` (text), ``completion`` (decoded new tokens), ``tokens`` (ids).
        Text is decoded by the datamodule's ``decode(ids)`` if it has one, else byte-level.
        """
        hp = self.hparams
        prompt = batch["input_ids"]
        generator = torch.Generator(device=prompt.device).manual_seed(hp.seed + batch_idx)
        out = generate(
            self.model,
            prompt,
            hp.max_new_tokens,
            temperature=hp.temperature,
            top_k=hp.top_k,
            generator=generator,
        )
        datamodule = getattr(self.trainer, "datamodule", None)
        decode = getattr(datamodule, "decode", bytes_decode)
        results = []
        for i, row in enumerate(out.tolist()):
            new = row[prompt.shape[1] :]
            text = batch["prompt"][i] if "prompt" in batch else decode(row[: prompt.shape[1]])
            results.append({"prompt": text, "completion": decode(new), "tokens": new})
        return results


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step`: linear warmup over `warmup` steps, then a cosine
    from 1 down to `min_ratio` at `total` steps, flat afterwards."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class CompletionWriter(BasePredictionWriter):
    """Writes the completions of ``predict`` as JSON lines ({prompt, completion, tokens}) to `path`
    (default <trainer.default_root_dir>/completions.jsonl, rewritten by every predict run) and prints them."""

    def __init__(self, path: str | None = None):
        super().__init__(write_interval="batch")
        self.path = path

    def _file(self, trainer) -> str:
        return self.path or os.path.join(trainer.default_root_dir, "completions.jsonl")

    def on_predict_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            os.makedirs(os.path.dirname(os.path.abspath(self._file(trainer))), exist_ok=True)
            open(self._file(trainer), "w").close()

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        with open(self._file(trainer), "a", encoding="utf-8") as f:
            for result in prediction:
                f.write(json.dumps(result, ensure_ascii=False) + "\n")
                print(f"{result['prompt']!r} -> {result['completion']!r}")
