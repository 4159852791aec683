"""Language-model data: token shards from the data layer, or any text files tokenized on first use.

Batches: ``input_ids`` [B, seq_len] and ``labels`` [B, seq_len] (int64), cut from stored sequences of
seq_len + 1 tokens (labels are the inputs shifted by one). Predict batches: ``input_ids`` [1, P] and
``prompt`` (its text), one prompt at a time.

Two sources:
- ``train_shards`` / ``val_shards``: token shards written by ``python -m datamodules.prepare text ...``;
- ``text``: files or folders of any UTF-8 text (``.jsonl`` read one document per line); on first use they
  are tokenized (byte-level by default: nothing to download), packed into seq_len + 1 sequences and
  written as shards under ``data_dir`` by the same code as ``python -m datamodules.prepare text`` (every
  ``val_every``-th sequence to ``data_dir/val``, the rest to ``data_dir/train``). The shards are rewritten
  only when the inputs or the arguments change.

Resume: the training stream of every epoch is seeded by the global step at which the epoch starts, and the
training loader's position is in every checkpoint (see datamodules/base.py): a run resumed anywhere, also
mid-epoch, sees exactly the batches of the uninterrupted run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader

from datamodules.base import TokenShardDataModule, check_sizes
from datamodules.readers import iter_tokens
from datamodules.shards import seeded_generator
from datamodules.text import load_tokenizer, write_text_shards

LM_TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")


def to_lm_sample(sample: dict) -> dict:
    """A decoded token sample (``tokens`` [L + 1]) -> ``input_ids`` [L] and next-token ``labels`` [L]."""
    tokens = sample["tokens"]
    return {"input_ids": tokens[:-1], "labels": tokens[1:]}


def vocabulary_permutation(vocab_size: int, seed: int, keep: Sequence[int] = ()) -> torch.Tensor:
    """A fixed random permutation of the token ids: ``perm`` [vocab_size] (int64) with ``perm[i]`` the new id
    of token i, a function of ``seed`` alone. Ids in ``keep`` (e.g. the end-of-document id, which the LM
    reads as document structure) map to themselves; the others are shuffled among themselves.

    The same text under ``perm`` is a language with the same structure and a new vocabulary: the setting of
    Chen et al. (2023) for re-learning token embeddings on top of a pretrained body.
    """
    check_sizes("vocabulary_permutation", vocab_size=vocab_size)
    kept = sorted(set(keep))
    if kept and (kept[0] < 0 or kept[-1] >= vocab_size):
        raise ValueError(f"vocabulary_permutation: keep={kept} must be token ids in [0, {vocab_size})")
    moved = torch.tensor(sorted(set(range(vocab_size)) - set(kept)), dtype=torch.long)
    perm = torch.arange(vocab_size)
    perm[moved] = moved[torch.randperm(len(moved), generator=seeded_generator(seed))]
    return perm


def permuted_lm_sample(sample: dict, permutation: torch.Tensor) -> dict:
    """`to_lm_sample` of the sample's tokens renamed by ``permutation`` [V] (token i becomes
    ``permutation[i]``; see `vocabulary_permutation`). Picklable with functools.partial."""
    return to_lm_sample({**sample, "tokens": permutation[sample["tokens"]]})


def prepare_text_shards(
    inputs: Sequence[str],
    out_dir: str,
    *,
    seq_len: int,
    tokenizer: str = "bytes",
    val_every: int = 20,
    suffixes: Sequence[str] = LM_TEXT_SUFFIXES,
) -> dict:
    """Tokenize and pack text files into ``out_dir/train`` and ``out_dir/val`` token shards
    (:func:`datamodules.text.write_text_shards`, the same path as ``python -m datamodules.prepare text``).

    Sequence i goes to val when i % val_every == val_every - 1. Skips the work when ``out_dir/meta.json``
    records the same files (with sizes and modification times) and arguments. Returns that record.
    """
    return write_text_shards(
        inputs,
        out_dir,
        seq_len=seq_len,
        tokenizer=tokenizer,
        suffixes=suffixes,
        val_every=val_every,
        samples_per_shard=256,
        reuse=True,
    )


class LMDataModule(TokenShardDataModule):
    """Next-token batches from token shards or from text files (see the module docstring).

    Args:
        train_shards, val_shards: token shards (brace pattern, glob, folder or list); ignored when `text`
            is given.
        test_shards: token shards `train.py test` scores (default: the validation sequences).
        text: files or folders of text to train on (byte-level unless `tokenizer` names a tokenizer.json).
        data_dir: where shards prepared from `text` are written.
        tokenizer: "bytes" or the path of a local tokenizer.json; also used to encode prompts and decode
            generated text.
        val_every: one in `val_every` prepared sequences is held out for validation.
        seq_len: tokens per training sequence (the shards store seq_len + 1).
        prompts: texts that `predict` continues.
        batch_size, val_batch_size, num_workers, batches_per_epoch, shuffle_buffer, seed, max_bad_samples:
            as in datamodules.base.ShardDataModule.
        vocab_limit: token ids must be below it (default: the trained model's vocabulary, see
            datamodules.base.TokenShardDataModule).
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        text: list[str] | None = None,
        test_shards: str | list[str] | None = None,
        data_dir: str = "outputs/data/lm",
        tokenizer: str = "bytes",
        val_every: int = 20,
        seq_len: int = 512,
        prompts: list[str] | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        batches_per_epoch: int = 1000,
        shuffle_buffer: int = 64,
        seed: int = 0,
        max_bad_samples: int = 16,
        vocab_limit: int | None = None,
    ):
        check_sizes(type(self).__name__, seq_len=seq_len)
        check_sizes(type(self).__name__, 2, val_every=val_every)
        if text is None and train_shards is None:
            raise ValueError("give train_shards (token shards) or text (files or folders to train on)")
        super().__init__(
            train_shards,
            val_shards,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            batches_per_epoch=batches_per_epoch,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            max_bad_samples=max_bad_samples,
            seq_len=seq_len,
            vocab_limit=vocab_limit,
        )
        self.text, self.data_dir, self.val_every = text, data_dir, val_every
        self.test_shards = test_shards
        self.tokenizer_spec, self.prompts = tokenizer, list(prompts or [])
        self._tokenizer = None
        if text is not None:
            self.train_shards = os.path.join(data_dir, "train")
            self.val_shards = os.path.join(data_dir, "val")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_spec)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def packed_eod_ids(self, stage: str) -> list[tuple[int, str]]:
        """The end-of-document ids the shards of `stage` ("fit": train and val shards; "validate"; "test")
        were packed with, as the first sample of each records it (its meta.json's ``eod_id``, written by
        datamodules/text.py), each with where it was read. Shards that record none give nothing."""
        specs = {
            "fit": [self.train_shards, self.val_shards],
            "validate": [self.val_shards],
            "test": [self.test_shards or self.val_shards],
        }.get(stage, [])
        found = []
        for spec in specs:
            if spec is None:
                continue
            sample = next(iter_tokens(spec, max_bad_samples=self.max_bad_samples), None)
            eod_id = None if sample is None else sample["meta"].get("eod_id")
            if eod_id is not None:
                found.append((int(eod_id), f"meta.json of sample {sample['key']} in {sample['shard']}"))
        return found

    def prepare_data(self) -> None:
        if self.text is not None:
            prepare_text_shards(
                self.text,
                self.data_dir,
                seq_len=self.seq_len,
                tokenizer=self.tokenizer_spec,
                val_every=self.val_every,
            )

    def sample_transform(self, train: bool):
        return to_lm_sample

    def predict_dataloader(self) -> DataLoader:
        if not self.prompts:
            raise ValueError("LMDataModule.prompts is empty: give the texts to continue (data.prompts)")
        encoded = [
            {"input_ids": torch.as_tensor(self.tokenizer.encode(p), dtype=torch.long)[None], "prompt": [p]}
            for p in self.prompts
        ]
        for p, e in zip(self.prompts, encoded):
            if e["input_ids"].shape[1] == 0:
                raise ValueError(f"prompt {p!r} encodes to no tokens")
        return DataLoader(encoded, batch_size=None)
