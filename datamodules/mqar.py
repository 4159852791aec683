"""Multi-query associative recall (MQAR): key-value pairs early in a sequence, queries much later.

Layout of one sequence of `seq_len` tokens (vocabulary: 0 = filler, keys [1, 1 + K), values [1 + K, V)):

    k_1 v_1 k_2 v_2 ... k_P v_P | gap filler tokens | k_a v_a k_b v_b ... (every key once, shuffled) | filler

Keys are distinct; values are drawn independently. The model must predict v_i at the position of the
queried k_i: `labels` hold v_i there and -100 everywhere else, so the accuracy over labelled positions is
the answer accuracy (chance = 1 / number of values). The first query stands `gap + 1` positions after the
last pair and `2 P + gap` after the first, so with gap >= 4 windows a sliding-window model cannot see any
pair from any query.

Sample i of a split is a pure function of (seed, split, i): the training stream of a resumed run continues
where it stopped, because every pass starts at sample global_step * batch_size of the training split.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from datamodules.base import StepPositionedLoader, check_sizes, consumed_batches

IGNORE = -100
TRAIN, VAL = 0, 1


def check_mqar(vocab_size: int, num_pairs: int, gap: int, seq_len: int) -> None:
    """Raise ValueError naming the field when the parameters cannot form an MQAR sequence."""
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    keys, values = mqar_vocab(vocab_size)
    if keys < num_pairs:
        raise ValueError(
            f"vocab_size={vocab_size} gives {keys} keys, fewer than num_pairs={num_pairs} (keys are distinct)"
        )
    if values < 2:
        raise ValueError(f"vocab_size={vocab_size} leaves {values} values; need at least 2")
    needed = 4 * num_pairs + gap
    if seq_len < needed:
        raise ValueError(f"seq_len={seq_len} is too short: 4 * num_pairs + gap = {needed} tokens are needed")


def mqar_vocab(vocab_size: int) -> tuple[int, int]:
    """(number of keys K, number of values) for a vocabulary of `vocab_size` ids; id 0 is the filler."""
    keys = (vocab_size - 1) // 2
    return keys, vocab_size - 1 - keys


def mqar_sample(
    seed: int, split: int, index: int, *, vocab_size: int, num_pairs: int, gap: int, seq_len: int
) -> dict[str, torch.Tensor]:
    """One MQAR sequence: ``input_ids`` [seq_len] and ``labels`` [seq_len] (int64), and ``query_start``
    (position of the first query key)."""
    rng = np.random.default_rng([seed, split, index])
    num_keys, num_values = mqar_vocab(vocab_size)
    keys = rng.choice(num_keys, size=num_pairs, replace=False) + 1
    values = rng.integers(0, num_values, size=num_pairs) + 1 + num_keys
    tokens = np.zeros(seq_len, dtype=np.int64)
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    tokens[0 : 2 * num_pairs : 2], tokens[1 : 2 * num_pairs : 2] = keys, values
    order = rng.permutation(num_pairs)
    start = 2 * num_pairs + gap
    query_keys = start + 2 * np.arange(num_pairs)
    tokens[query_keys], tokens[query_keys + 1] = keys[order], values[order]
    labels[query_keys] = values[order]  # predicted at the key: the next token is its value
    return {
        "input_ids": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "query_start": torch.tensor(start),
    }


class MQARValSet(Dataset):
    """A fixed validation set: samples 0 .. size-1 of the validation split."""

    def __init__(self, size: int, seed: int, **task):
        self.size, self.seed, self.task = size, seed, task

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return mqar_sample(self.seed, VAL, index, **self.task)


class MQARStream(IterableDataset):
    """`samples` training samples starting at sample `start` of the training split; rank r of R takes
    every R-th one, and worker w of W every W-th of those."""

    def __init__(self, samples: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1, **task):
        self.samples, self.seed, self.start = samples, seed, start
        self.rank, self.world_size, self.task = rank, world_size, task

    def __len__(self) -> int:
        return self.samples

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for j in range(worker, self.samples, workers):
            index = (self.start + j) * self.world_size + self.rank
            yield mqar_sample(self.seed, TRAIN, index, **self.task)


class MQARDataModule(LightningDataModule):
    """MQAR batches ``input_ids`` / ``labels`` [B, seq_len], generated on the fly (no shards).

    Args:
        vocab_size: ids in [0, vocab_size): filler 0, then keys and values (half each).
        num_pairs: key-value pairs per sequence.       gap: filler tokens between the pairs and the queries.
        seq_len: tokens per sequence (4 num_pairs + gap at least; up to 56K and beyond).
        batch_size: sequences per batch (per rank).    batches_per_epoch: training batches per epoch.
        val_samples: size of the fixed validation set.  seed: base seed of both splits.
    """

    def __init__(
        self,
        vocab_size: int = 64,
        num_pairs: int = 8,
        gap: int = 128,
        seq_len: int = 256,
        batch_size: int = 32,
        batches_per_epoch: int = 100,
        val_samples: int = 256,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        check_mqar(vocab_size, num_pairs, gap, seq_len)
        name = type(self).__name__
        check_sizes(name, batch_size=batch_size, batches_per_epoch=batches_per_epoch, val_samples=val_samples)
        check_sizes(name, 0, num_workers=num_workers)
        self.vocab_size = vocab_size
        self.task = {"vocab_size": vocab_size, "num_pairs": num_pairs, "gap": gap, "seq_len": seq_len}
        self.batch_size, self.batches_per_epoch, self.val_samples = batch_size, batches_per_epoch, val_samples
        self.seed, self.num_workers = seed, num_workers

    def train_dataloader(self) -> DataLoader:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        stream = MQARStream(
            self.batches_per_epoch * self.batch_size, self.seed, rank=rank, world_size=world, **self.task
        )
        return StepPositionedLoader(
            stream,
            lambda: consumed_batches(self.trainer) * self.batch_size,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            MQARValSet(self.val_samples, self.seed, **self.task),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )
