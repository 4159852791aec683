"""Training logic of the language model (issue 5): next-token cross-entropy, loss and perplexity by position
bucket (validation and test), generation in `predict_step`. The network is lact/models/lm.py; optimisation
is the shared layer of modules/task.py.

Batches are dicts with ``input_ids`` [B, L] (int64) and ``labels`` [B, L] (int64, the token that should follow
each position; IGNORE_INDEX (-100) where no loss is taken, e.g. everything but the answers in MQAR).
Predict batches carry ``input_ids`` [1, P] (a prompt) and optionally ``prompt`` (its text).
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor, nn

from datamodules.text import bytes_decode
from lact.documents import document_positions
from lact.models.lm import LaCTLM, LMConfig
from lact.models.lm_cache import generate
from lact.nn import IGNORE_INDEX
from modules.task import OptimConfig, TaskModule, as_config


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


class LMModule(TaskModule):
    """Trains `LaCTLM(net)` by next-token prediction; optimisation, clipping and step skipping are the shared
    policy of modules/task.py (`optim`).

    Args:
        net: the network (LMConfig; a dict with its fields is accepted too).
        optim: OptimConfig (lr, betas, weight decay, warmup + cosine, grad_clip, skip_grad_norm, ...).
        bucket_size: the first position bucket [0, bucket_size) of validation and test; then doubling:
            [b, 2b), [2b, 4b)...
        fsdp_param_dtype: under FSDP2, the dtype parameters are gathered and computed in ("bfloat16"), None
            for their own dtype.
        max_new_tokens, temperature, top_k, seed: generation in `predict_step` (temperature 0 = greedy).
        score_after_eod: with net.eod_id (packed documents), whether the end-of-document position is scored
            on predicting the next document's first token. False (default): not, since every document is
            processed alone and nothing in it says what the next one is. Without eod_id every position with a
            label is scored.

    With net.eod_id, validation and test buckets are by position within the document, not in the sequence.
    """

    throughput_unit = "tokens"

    def __init__(
        self,
        net: LMConfig,
        optim: OptimConfig | None = None,
        bucket_size: int = 1024,
        fsdp_param_dtype: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int | None = 40,
        seed: int = 0,
        score_after_eod: bool = False,
    ):
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
        super().__init__(optim, fsdp_param_dtype)
        self.config = as_config(LMConfig, net)
        self.net = LaCTLM(self.config)
        self._sums: dict[tuple, Tensor] = {}

    # ---- forgetting-callback protocol (modules/forgetting.py) ------------------------------------------
    def token_embedding(self) -> nn.Embedding:
        """The input token embedding (also the LM head when tied)."""
        return self.net.token_embedding

    def output_embedding(self) -> nn.Parameter:
        """The LM head's weight: the embedding's own Parameter when tied."""
        head = self.net.lm_head
        return self.net.token_embedding.weight if head is None else head.weight

    def init_parameter_(self, param: Tensor, out: Tensor, generator: torch.Generator) -> None:
        """Fill `out` with a fresh draw of the network's initialiser for `param` (embedding or head)."""
        if param is not self.token_embedding().weight and param is not self.output_embedding():
            raise ValueError("init_parameter_: LMModule re-draws only the token embedding and the LM head")
        out.normal_(0.0, self.config.init_std, generator=generator)

    # ---- training --------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        vocab = getattr(getattr(self.trainer, "datamodule", None), "vocab_size", None)
        if isinstance(vocab, int) and vocab > self.config.vocab_size:
            raise ValueError(
                f"net.vocab_size={self.config.vocab_size} is smaller than the data's vocabulary of {vocab} ids"
            )
        self.check_eod_id(stage)

    def check_eod_id(self, stage: str) -> None:
        """With net.eod_id set, the shards of `stage` must have been packed with that end-of-document id
        where they record one (LMDataModule.packed_eod_ids); otherwise documents would be split at the wrong
        token, which trains without any error."""
        eod_id = self.config.eod_id
        recorded = getattr(getattr(self.trainer, "datamodule", None), "packed_eod_ids", None)
        if eod_id is None or not callable(recorded):
            return
        for packed, where in recorded(stage):
            if packed != eod_id:
                raise ValueError(
                    f"net.eod_id={eod_id} (model.init_args.net.eod_id) is not the end-of-document id the "
                    f"data was packed with: eod_id={packed} in the {where}. Set "
                    f"model.init_args.net.eod_id: {packed}, or re-pack the data with a tokenizer whose "
                    f"end-of-document id is {eod_id}"
                )

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.net(input_ids)

    def throughput_items(self, batch: dict) -> int:
        return batch["input_ids"].numel()

    def token_losses(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """Per-position cross-entropy [B, L] (0 where ignored), the mask of scored positions [B, L] and
        whether the argmax was right [B, L]."""
        logits = self.net(batch["input_ids"])
        labels = batch["labels"]
        eod_id = self.config.eod_id
        if eod_id is not None and not self.hparams.score_after_eod:
            labels = labels.masked_fill(batch["input_ids"] == eod_id, IGNORE_INDEX)
        losses = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(labels)
        scored = labels != IGNORE_INDEX
        correct = (logits.argmax(-1) == labels) & scored
        return losses, scored, correct

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses, scored, _ = self.token_losses(batch)
        loss = losses.sum() / scored.sum().clamp(min=1)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/ppl", loss.detach().exp(), batch_size=batch_size)
        return loss

    # ---- validation and test: overall loss, perplexity, accuracy and loss by position bucket -----------
    def _accumulate(self, batch: dict) -> None:
        losses, scored, correct = self.token_losses(batch)
        edges = bucket_edges(losses.shape[1], self.hparams.bucket_size)
        # per range: (loss sum, scored tokens, correct tokens); (0, L) is the whole sequence
        ranges = [(0, losses.shape[1]), *zip(edges[:-1], edges[1:])]
        if self.config.eod_id is not None:  # buckets by position within the document
            _, positions = document_positions(batch["input_ids"], self.config.eod_id)
        for lo, hi in ranges:
            if self.config.eod_id is None:
                parts = losses[:, lo:hi], scored[:, lo:hi], correct[:, lo:hi]
            else:
                inside = (positions >= lo) & (positions < hi)
                parts = losses * inside, scored & inside, correct & inside
            row = torch.stack([parts[0].sum(), parts[1].sum().float(), parts[2].sum().float()]).detach()
            key = ("all", 0) if (lo, hi) == ranges[0] else (lo, hi)
            self._sums[key] = self._sums.get(key, 0) + row

    def _log_sums(self, stage: str) -> None:
        # Sums are reduced over ranks here, so every rank logs the same value (sync_dist averages equals).
        for key in sorted(self._sums, key=str):
            total = self.trainer.strategy.reduce(self._sums[key].clone(), reduce_op="sum")
            loss_sum, count, correct = total.tolist()
            if count == 0:
                continue
            loss = loss_sum / count
            if key == ("all", 0):
                self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True)
                self.log(f"{stage}/ppl", math.exp(min(loss, 50.0)), sync_dist=True)
                self.log(f"{stage}/accuracy", correct / count, sync_dist=True)
            else:
                name = bucket_name(*key)
                self.log(f"{stage}/loss_pos_{name}", loss, sync_dist=True)
                if stage == "test":
                    self.log(f"test/ppl_pos_{name}", math.exp(min(loss, 50.0)), sync_dist=True)
        self._sums = {}

    def on_validation_epoch_start(self) -> None:
        self._sums = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._accumulate(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_sums("val")

    def on_test_epoch_start(self) -> None:
        self._sums = {}

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """The held-out split (the datamodule's test_dataloader): loss, perplexity and accuracy overall and
        loss and perplexity per position bucket, as test/... metrics."""
        self._accumulate(batch)

    def on_test_epoch_end(self) -> None:
        self._log_sums("test")

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
            self.net,
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
