"""The structural-ICL data: vocabulary layout, Zipf sampling, sequence format and evaluation sets."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import Callback

from datamodules.pos import (
    COP,
    IGNORE,
    MASK,
    N_SPECIAL,
    PAD,
    POSDataModule,
    PosSampler,
    PosVocab,
    make_sequences,
    seeded_generator,
    zipf_probs,
)
from modules.mlm import MaskedLMModule
from tests.lightning_helpers import quiet_trainer


@pytest.fixture(scope="module")
def dm() -> POSDataModule:
    return POSDataModule(
        class_size=50, alpha=1.0, ambiguous_frac=0.2, holdout_size=12, batch_size=256, eval_size=256
    )


def test_vocabulary_layout(dm):
    v = dm.vocab
    assert dm.vocab_size == 3 + 2 * 50 - 10 + 12 == v.vocab_size
    content = torch.cat([v.nouns, v.adjs]).unique()
    specials = torch.tensor([PAD, MASK, COP])
    assert len(content) == 90 and content.min() >= N_SPECIAL
    assert not torch.isin(content, specials).any() and not torch.isin(v.holdout, specials).any()
    assert not torch.isin(v.holdout, content).any() and v.holdout.max() == dm.vocab_size - 1
    assert len(v.nouns.unique()) == len(v.adjs.unique()) == 50
    # exactly the ambiguous tokens are in both classes: 20% of each class
    assert torch.equal(v.nouns[torch.isin(v.nouns, v.adjs)].sort().values, v.ambiguous)
    assert len(v.ambiguous) == 10


def test_zipf_probabilities_start_at_the_first_rank():
    p = zipf_probs(5, 1.0)
    assert p[0] == p.max() and torch.allclose(p[0] / p[1], torch.tensor(2.0, dtype=torch.float64))
    assert torch.allclose(zipf_probs(4, 0.0), torch.full((4,), 0.25, dtype=torch.float64))


def test_training_nouns_follow_zipf_from_rank_zero(dm):
    batch = dm.sampler.sample("train", 20000, seeded_generator(0))
    nouns = batch["labels"][:, 5][batch["labels"][:, 4] != batch["labels"][:, 5]]  # noun queries: [a, n, n]
    rank_of = torch.full((dm.vocab_size,), -1)
    rank_of[dm.vocab.nouns] = torch.arange(50)
    ranks = rank_of[nouns]
    freq = torch.bincount(ranks, minlength=50).double() / len(ranks)
    expected = zipf_probs(50, 1.0)
    assert freq.argmax() == 0  # the most frequent token is rank 0, not rank 1
    assert abs(freq[0] - expected[0]) < 0.03 and abs(freq[1] - expected[1]) < 0.03


def test_sequence_format():
    n, a = torch.tensor([10, 10, 11, 11]), torch.tensor([20, 20, 21, 21])
    form = torch.tensor([False, True, False, True])
    query_noun = torch.tensor([False, True, True, False])
    out = make_sequences(n, a, form, query_noun)
    ids, labels = out["input_ids"], out["labels"]
    assert ids.shape == labels.shape == (4, 7)
    assert ids[0, :4].tolist() == [COP, 20, 10, 20] and labels[0, 4:].tolist() == [20, 20, 20]  # ADJ query
    assert ids[1, :4].tolist() == [10, COP, 20, 10] and labels[1, 4:].tolist() == [20, 10, 10]  # NOUN query
    assert (ids[:, 4:] == MASK).all() and (labels[:, :4] == IGNORE).all()


def test_training_data_never_uses_holdout_tokens_and_masks_the_last_three(dm):
    for i in range(3):
        b = dm.train_dataloader().dataset[i]
        assert b["input_ids"].shape == (256, 7)
        assert not torch.isin(b["input_ids"], dm.vocab.holdout).any()
        assert (b["input_ids"][:, 4:] == MASK).all() and (b["labels"][:, 4:] != IGNORE).all()


def test_ambiguous_fraction_of_training_tokens(dm):
    b = dm.sampler.sample("train", 4000, seeded_generator(1))
    adjs = b["labels"][:, 4]
    frac = torch.isin(adjs, dm.vocab.ambiguous).float().mean().item()
    # Ambiguous ids hold random ranks; their share of draws is the Zipf mass of those ranks, about 20%.
    expected = zipf_probs(50, 1.0)[torch.isin(dm.vocab.adjs, dm.vocab.ambiguous)].sum().item()
    assert abs(frac - expected) < 0.03


def test_evaluation_sets(dm):
    data = {name: batch for name, batch in zip(dm.eval_sets, (dl.dataset[0] for dl in dm.val_dataloader()))}
    v, s = dm.vocab, dm.sampler
    assert set(data) == {"val", "tail", "switch_head", "switch_tail", "holdout"}
    adj_slot = {k: d["labels"][:, 4] for k, d in data.items()}  # position 4 is always the adjective slot
    assert torch.isin(adj_slot["tail"], v.adjs[-s.n_tail :]).all()
    # switch: the adjective slot holds a noun (unambiguous, head / tail band), labels follow the slot
    assert torch.isin(adj_slot["switch_head"], v.nouns[: s.n_head]).all()
    assert not torch.isin(adj_slot["switch_head"], v.adjs).any()
    assert torch.isin(adj_slot["switch_tail"], v.nouns[-s.n_tail :]).all()
    assert not torch.isin(adj_slot["switch_tail"], v.adjs).any()
    hold = data["holdout"]["input_ids"][:, :4]
    assert torch.isin(hold[hold != COP], v.holdout).all()
    assert (data["holdout"]["labels"][:, 4] != data["holdout"]["labels"][:, 5]).any()


def test_seeded_and_resumable(dm):
    again = POSDataModule(
        class_size=50, alpha=1.0, ambiguous_frac=0.2, holdout_size=12, batch_size=256, eval_size=256
    )
    assert torch.equal(again.vocab.nouns, dm.vocab.nouns)
    assert torch.equal(
        dm.train_dataloader().dataset[5]["input_ids"], again.train_dataloader().dataset[5]["input_ids"]
    )
    other = POSDataModule(class_size=50, ambiguous_frac=0.2, holdout_size=12, seed=1)
    assert not torch.equal(other.vocab.nouns, dm.vocab.nouns)


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="ambiguous_frac=1.5"):
        PosVocab.build(50, 1.5, 10, 0)
    with pytest.raises(ValueError, match="kind='nope'"):
        PosSampler(PosVocab.build(50, 0.1, 10, 0), 1.0).sample("nope", 2, seeded_generator(0))


class SeenBatches(Callback):
    def __init__(self):
        self.ids = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.append(batch["input_ids"].clone())


def test_a_run_resumed_mid_epoch_continues_the_stream_without_warning(tmp_path):
    """The generated stream's epochs never end, so every resume is mid-epoch: the resumed run must see the
    batches the uninterrupted one saw, and Lightning must not warn that the loader cannot resume."""

    def fit(max_steps: int, ckpt=None):
        torch.manual_seed(0)
        data = POSDataModule(class_size=20, holdout_size=4, batch_size=4, eval_size=4)
        net = {"vocab_size": data.vocab_size, "dim": 16, "depth": 1, "num_heads": 2, "max_len": 8}
        seen = SeenBatches()
        trainer = quiet_trainer(tmp_path, max_steps=max_steps, limit_val_batches=0, callbacks=[seen])
        trainer.fit(MaskedLMModule(net), datamodule=data, ckpt_path=ckpt)
        return trainer, seen.ids

    _, uninterrupted = fit(5)
    first, _ = fit(3)
    first.save_checkpoint(tmp_path / "step3.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, resumed = fit(5, tmp_path / "step3.ckpt")
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert len(resumed) == 2
    assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[3:], strict=True))
