"""The structural in-context-learning toy of "Dual Process Learning" (Anand et al., 2024), docs/architecture.md, Forgetting.

Vocabulary (ids): ``0`` pad, ``1`` mask, ``2`` copula, then the content tokens (nouns and adjectives; a
fraction ``ambiguous_frac`` of each class is shared by both), then a block of ``holdout_size`` tokens never
used in training. Inside each class a token's Zipf rank is random; rank ``r`` (0-based, rank 0 the most
frequent) is drawn with probability proportional to ``(r + 1) ** -alpha`` (uniform for alpha = 0).

A sequence has 7 tokens: a prefix ``[cop, ADJ, NOUN]`` or ``[NOUN, cop, ADJ]``, then a query repeating one
of the two prefix tokens and a continuation, ``[ADJ, ADJ, ADJ, ADJ]`` for an adjective query or
``[NOUN, ADJ, NOUN, NOUN]`` for a noun query (the slots are filled with the prefix's adjective and noun).
Positions 4-6 are masked and predicted, so the answer ``[adj, query, query]`` needs the adjective of the
prefix: from the context (the token after the copula) or from memory (which of the two tokens was learned
as an adjective). The evaluation sets separate the two routes:

``val``          the training distribution;
``tail``         nouns and adjectives from the rarest ``tail_frac`` of each class's ranks;
``switch_head``  unambiguous frequent (top ``head_frac``) nouns in the adjective slot and adjectives in the
                 noun slot, labels following the slots: high accuracy = context used, ``1 - switch`` =
                 in-weights preference;
``switch_tail``  the same with tail tokens;
``holdout``      two distinct never-trained tokens (the model re-draws their embedding rows at evaluation).

A batch is a dict: ``input_ids`` [B, 7] int64 with positions 4-6 replaced by the mask id, ``labels``
[B, 7] int64 holding the true ids at positions 4-6 and -100 (ignored) elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.base import StepPositionedLoader, check_sizes, consumed_batches
from datamodules.shards import seeded_generator

PAD, MASK, COP = 0, 1, 2
N_SPECIAL = 3
SEQ_LEN = 7
MASKED_POSITIONS = (4, 5, 6)
IGNORE = -100
EVAL_SETS = ("val", "tail", "switch_head", "switch_tail", "holdout")


def zipf_probs(n: int, alpha: float) -> torch.Tensor:
    """[n] float64 probabilities of ranks 0..n-1, proportional to (rank + 1) ** -alpha."""
    w = torch.arange(1, n + 1, dtype=torch.float64) ** -alpha
    return w / w.sum()


@dataclass(frozen=True)
class PosVocab:
    """Token ids of each role. ``nouns``/``adjs``: [C] int64 ids in Zipf-rank order (index 0 most frequent)."""

    nouns: torch.Tensor
    adjs: torch.Tensor
    ambiguous: torch.Tensor  # [A] ids in both classes
    holdout: torch.Tensor  # [H] ids never used in training
    vocab_size: int

    @staticmethod
    def build(class_size: int, ambiguous_frac: float, holdout_size: int, seed: int) -> PosVocab:
        if class_size < 10:
            raise ValueError(f"class_size={class_size} must be at least 10 (head and tail are 10% each)")
        if not 0.0 <= ambiguous_frac < 1.0:
            raise ValueError(f"ambiguous_frac={ambiguous_frac} must be in [0, 1)")
        if holdout_size < 2:
            raise ValueError(f"holdout_size={holdout_size} must be at least 2 (two per holdout sequence)")
        n_amb = round(ambiguous_frac * class_size)
        n_content = 2 * class_size - n_amb
        g = seeded_generator(seed, 0)
        ids = torch.randperm(n_content, generator=g) + N_SPECIAL
        amb, noun_only, adj_only = ids[:n_amb], ids[n_amb:class_size], ids[class_size:]
        # Ranks are shuffled so that an ambiguous token has unrelated frequencies in its two roles.
        nouns = torch.cat([amb, noun_only])[torch.randperm(class_size, generator=g)]
        adjs = torch.cat([amb, adj_only])[torch.randperm(class_size, generator=g)]
        first_holdout = N_SPECIAL + n_content
        holdout = torch.arange(first_holdout, first_holdout + holdout_size)
        return PosVocab(nouns, adjs, amb.sort().values, holdout, first_holdout + holdout_size)


def make_sequences(
    noun_slot: torch.Tensor, adj_slot: torch.Tensor, form: torch.Tensor, query_noun: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Build masked sequences from the tokens placed in the noun and adjective slots.

    Args:
        noun_slot, adj_slot: [B] int64 token ids (the labels follow the slots, whatever the tokens are).
        form: [B] bool, False -> prefix ``[cop, ADJ, NOUN]``, True -> ``[NOUN, cop, ADJ]``.
        query_noun: [B] bool, True -> the query is the noun (continuation ``[N, A, N, N]``), else ``[A, A, A, A]``.
    Returns:
        ``{"input_ids": [B, 7], "labels": [B, 7]}`` int64.
    """
    cop = torch.full_like(noun_slot, COP)
    prefix = torch.where(
        form[:, None], torch.stack([noun_slot, cop, adj_slot], 1), torch.stack([cop, adj_slot, noun_slot], 1)
    )
    noun_cont = torch.stack([noun_slot, adj_slot, noun_slot, noun_slot], 1)
    adj_cont = adj_slot[:, None].expand(-1, 4)
    seq = torch.cat([prefix, torch.where(query_noun[:, None], noun_cont, adj_cont)], 1)
    labels = torch.full_like(seq, IGNORE)
    inputs = seq.clone()
    for p in MASKED_POSITIONS:
        labels[:, p] = seq[:, p]
        inputs[:, p] = MASK
    return {"input_ids": inputs, "labels": labels}


class PosSampler:
    """Draws batches of every evaluation set (and the training distribution) for one vocabulary."""

    def __init__(self, vocab: PosVocab, alpha: float, head_frac: float = 0.1, tail_frac: float = 0.1) -> None:
        self.vocab = vocab
        c = len(vocab.nouns)
        self.probs = zipf_probs(c, alpha)
        self.n_head, self.n_tail = max(1, math.ceil(head_frac * c)), max(1, math.ceil(tail_frac * c))
        amb = vocab.ambiguous

        def unambiguous(ids: torch.Tensor) -> torch.Tensor:
            keep = ~torch.isin(ids, amb)
            if not keep.any():
                raise ValueError("a head/tail band holds only ambiguous tokens: lower ambiguous_frac")
            return ids[keep]

        self.head = {k: unambiguous(v[: self.n_head]) for k, v in (("n", vocab.nouns), ("a", vocab.adjs))}
        self.tail = {k: v[-self.n_tail :] for k, v in (("n", vocab.nouns), ("a", vocab.adjs))}
        self.tail_unamb = {k: unambiguous(v) for k, v in self.tail.items()}

    @staticmethod
    def _uniform(ids: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
        return ids[torch.randint(len(ids), (n,), generator=g)]

    def sample(self, kind: str, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        """n sequences of set ``kind`` ("train" or one of EVAL_SETS)."""
        form = torch.rand(n, generator=g) < 0.5
        query_noun = torch.rand(n, generator=g) < 0.5
        v = self.vocab
        if kind in ("train", "val"):
            nouns = v.nouns[torch.multinomial(self.probs, n, replacement=True, generator=g)]
            adjs = v.adjs[torch.multinomial(self.probs, n, replacement=True, generator=g)]
        elif kind == "tail":
            nouns, adjs = self._uniform(self.tail["n"], n, g), self._uniform(self.tail["a"], n, g)
        elif kind in ("switch_head", "switch_tail"):
            band = self.head if kind == "switch_head" else self.tail_unamb
            # Swap roles: a noun goes into the adjective slot and an adjective into the noun slot.
            nouns, adjs = self._uniform(band["a"], n, g), self._uniform(band["n"], n, g)
        elif kind == "holdout":
            pair = torch.rand(n, len(v.holdout), generator=g).argsort(1)[:, :2]  # two distinct tokens
            nouns, adjs = v.holdout[pair[:, 0]], v.holdout[pair[:, 1]]
        else:
            raise ValueError(f"kind={kind!r}: expected 'train' or one of {EVAL_SETS}")
        return make_sequences(nouns, adjs, form, query_noun)


class _GeneratedBatches(Dataset):
    """Index i -> the training batch number ``start + i``, a pure function of (seed, start + i); the loader
    sets ``start`` when a pass begins."""

    def __init__(self, sampler: PosSampler, batch_size: int, seed: int, length: int) -> None:
        self.sampler, self.batch_size, self.seed, self.length = sampler, batch_size, seed, length
        self.start = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.sampler.sample("train", self.batch_size, seeded_generator(self.seed, 1, self.start + i))


class _FixedBatches(Dataset):
    def __init__(self, data: dict[str, torch.Tensor], batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.data["input_ids"]) / self.batch_size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return {k: v[sl] for k, v in self.data.items()}


class POSDataModule(LightningDataModule):
    """Seeded structural-ICL data: an endless stream of training batches and fixed evaluation sets.

    The validation dataloaders come in the order of ``eval_sets``; ``holdout_token_ids`` are the ids the
    model must re-draw before evaluating. ``vocab_size = 3 + 2*class_size - round(ambiguous_frac*class_size)
    + holdout_size``; the model's vocabulary must match it.

    Resuming: training batch number n is a pure function of (seed, n) and the stream restarts at the
    number of batches already consumed (global step x accumulation), so a resumed run sees the same data.

    Args:
        class_size: C, nouns and adjectives per class (ambiguous tokens counted in both).
        alpha: Zipf exponent of the rank frequencies (0 = uniform).
        ambiguous_frac: fraction of each class shared with the other class.
        holdout_size: number of never-trained tokens.
        batch_size: training sequences per batch.
        eval_size: sequences per evaluation set.
        seed: seeds the vocabulary layout, the training stream and the evaluation sets.
        num_batches: length of one training "epoch" of generated batches.
    """

    def __init__(
        self,
        class_size: int = 500,
        alpha: float = 1.0,
        ambiguous_frac: float = 0.1,
        holdout_size: int = 100,
        batch_size: int = 128,
        eval_size: int = 1024,
        head_frac: float = 0.1,
        tail_frac: float = 0.1,
        seed: int = 0,
        num_batches: int = 1_000_000,
    ) -> None:
        super().__init__()
        check_sizes(type(self).__name__, batch_size=batch_size, eval_size=eval_size, num_batches=num_batches)
        self.save_hyperparameters()
        self.vocab = PosVocab.build(class_size, ambiguous_frac, holdout_size, seed)
        self.sampler = PosSampler(self.vocab, alpha, head_frac, tail_frac)
        self.batch_size, self.eval_size, self.seed, self.num_batches = (
            batch_size,
            eval_size,
            seed,
            num_batches,
        )
        self.eval_sets = EVAL_SETS
        self._eval_data = {
            name: self.sampler.sample(name, eval_size, seeded_generator(seed, 2, i))
            for i, name in enumerate(EVAL_SETS)
        }

    @property
    def vocab_size(self) -> int:
        return self.vocab.vocab_size

    @property
    def pad_id(self) -> int:
        return PAD

    @property
    def holdout_token_ids(self) -> torch.Tensor:
        """[H] int64 ids never seen in training."""
        return self.vocab.holdout

    def train_dataloader(self) -> DataLoader:
        data = _GeneratedBatches(self.sampler, self.batch_size, self.seed, self.num_batches)
        return StepPositionedLoader(
            data, lambda: consumed_batches(self.trainer), batch_size=None, shuffle=False
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(_FixedBatches(self._eval_data[n], self.eval_size), batch_size=None) for n in EVAL_SETS
        ]

    def test_dataloader(self) -> list[DataLoader]:
        """`train.py test` scores the same fixed evaluation sets as validation."""
        return self.val_dataloader()
