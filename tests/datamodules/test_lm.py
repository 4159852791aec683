"""LM data: the MQAR generator and datamodule, and text files prepared into token shards (byte-level)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules.lm import LMDataModule, prepare_text_shards
from datamodules.mqar import IGNORE, MQARDataModule, MQARStream, check_mqar, mqar_sample, mqar_vocab
from datamodules.readers import iter_tokens

TASK = {"vocab_size": 41, "num_pairs": 6, "gap": 30, "seq_len": 80}


def test_mqar_sample_structure():
    s = mqar_sample(0, 0, 7, **TASK)
    tokens, labels = s["input_ids"].numpy(), s["labels"].numpy()
    keys_n, values_n = mqar_vocab(41)
    assert (keys_n, values_n) == (20, 20) and tokens.shape == labels.shape == (80,)
    keys, values = tokens[0:12:2], tokens[1:12:2]
    assert len(set(keys.tolist())) == 6 and np.all((1 <= keys) & (keys <= 20))
    assert np.all((21 <= values) & (values <= 40))
    start = int(s["query_start"])
    assert start == 12 + 30 and np.all(tokens[12:start] == 0) and np.all(tokens[start + 12 :] == 0)
    answer = dict(zip(keys.tolist(), values.tolist()))
    query_keys = tokens[start : start + 12 : 2]
    assert sorted(query_keys.tolist()) == sorted(keys.tolist())  # every key queried once
    scored = np.flatnonzero(labels != IGNORE)
    assert scored.tolist() == list(range(start, start + 12, 2))
    for pos in scored:
        assert labels[pos] == answer[tokens[pos]] == tokens[pos + 1]  # the next token is the answer
    assert scored.min() - 11 > 30  # every pair lies more than `gap` tokens before every query


def test_mqar_is_a_pure_function_of_seed_split_and_index():
    a, b = mqar_sample(3, 0, 5, **TASK), mqar_sample(3, 0, 5, **TASK)
    assert torch.equal(a["input_ids"], b["input_ids"])
    for other in (mqar_sample(3, 0, 6, **TASK), mqar_sample(3, 1, 5, **TASK), mqar_sample(4, 0, 5, **TASK)):
        assert not torch.equal(a["input_ids"], other["input_ids"])


def test_mqar_reaches_56k_tokens():
    s = mqar_sample(0, 0, 0, vocab_size=64, num_pairs=16, gap=50_000, seq_len=56 * 1024)
    assert s["input_ids"].shape == (57344,) and int((s["labels"] != IGNORE).sum()) == 16


@pytest.mark.parametrize(
    ("task", "field"),
    [
        ({**TASK, "num_pairs": 21}, "num_pairs"),
        ({**TASK, "seq_len": 50}, "seq_len"),
        ({**TASK, "gap": -1}, "gap"),
        ({**TASK, "vocab_size": 4}, "vocab_size"),
    ],
)
def test_mqar_rejects_impossible_tasks_naming_the_field(task, field):
    with pytest.raises(ValueError, match=field):
        check_mqar(**task)


def test_mqar_stream_splits_ranks_and_resumes_at_the_step():
    ranks = [list(MQARStream(4, 0, rank=r, world_size=2, **TASK)) for r in (0, 1)]
    ids = {tuple(s["input_ids"].tolist()) for samples in ranks for s in samples}
    assert len(ids) == 8  # no sample shared between ranks

    data = MQARDataModule(**TASK, batch_size=2, batches_per_epoch=5)
    fresh = [b["input_ids"] for b in data.train_dataloader()]
    assert len(fresh) == 5 and fresh[0].shape == (2, 80)
    data.trainer = SimpleNamespace(global_step=3, accumulate_grad_batches=1)  # as after resuming at step 3
    resumed = next(iter(data.train_dataloader()))["input_ids"]
    assert torch.equal(resumed, fresh[3])
    val = next(iter(data.val_dataloader()))
    assert val["labels"].shape == (2, 80) and not torch.equal(val["input_ids"], fresh[0])


TEXTS = {"docs/a.md": "# Notes\n" + "fast weights " * 300, "docs/b.py": "def f(x):\n    return x\n" * 100}
TEXTS["c.txt"] = "héllo wörld " * 200


def write_corpus(root) -> list[str]:
    (root / "docs").mkdir()
    for name, text in TEXTS.items():
        (root / name).write_text(text, encoding="utf-8")
    return [str(root / "docs"), str(root / "c.txt")]


def test_text_files_become_byte_level_shards_once(tmp_path):
    inputs = write_corpus(tmp_path)
    record = prepare_text_shards(inputs, str(tmp_path / "out"), seq_len=32, val_every=4)
    stream = sum(len(t.encode("utf-8")) + 1 for t in TEXTS.values())  # bytes + one end-of-document id each
    sequences = (stream - 1) // 32  # sequences of 33 tokens overlapping by one
    assert record["counts"] == {"train": sequences - sequences // 4, "val": sequences // 4}
    assert record["vocab_size"] == 257
    shards = sorted((tmp_path / "out" / "train").glob("*.tar"))
    mtime = shards[0].stat().st_mtime_ns
    assert prepare_text_shards(inputs, str(tmp_path / "out"), seq_len=32, val_every=4) == record
    assert shards[0].stat().st_mtime_ns == mtime  # unchanged inputs: nothing rewritten
    changed = prepare_text_shards(inputs, str(tmp_path / "out"), seq_len=16, val_every=4)
    assert changed["seq_len"] == 16 and changed["counts"]["train"] > record["counts"]["train"]
    lengths = {len(s["tokens"]) for s in iter_tokens(str(tmp_path / "out" / "train"))}
    assert lengths == {17}  # the seq_len 32 shards are gone, not mixed in


def test_lm_datamodule_trains_on_any_text_file(tmp_path):
    data = LMDataModule(
        text=write_corpus(tmp_path), data_dir=str(tmp_path / "out"), seq_len=32, batch_size=3,
        batches_per_epoch=2, val_every=4, prompts=["héllo"],
    )  # fmt: skip
    data.prepare_data()
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 32)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert int(batch["input_ids"].max()) < data.vocab_size == 257
    val = next(iter(data.val_dataloader()))
    assert val["input_ids"].shape[1] == 32
    (prompt,) = list(data.predict_dataloader())
    assert prompt["input_ids"].shape == (1, 6) and data.decode(prompt["input_ids"][0].tolist()) == "héllo"


def test_vocabulary_permutation_is_a_seeded_permutation_keeping_the_kept_ids():
    from datamodules.lm import vocabulary_permutation

    perm = vocabulary_permutation(257, seed=3, keep=[256])
    assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(257))  # a bijection
    assert perm[256] == 256  # the end-of-document id keeps its meaning
    assert (
        perm[:256] != torch.arange(256)
    ).sum() > 200  # the rest really moves (a few fixed points by chance)
    assert torch.equal(perm, vocabulary_permutation(257, seed=3, keep=[256]))
    assert not torch.equal(perm, vocabulary_permutation(257, seed=4, keep=[256]))
    with pytest.raises(ValueError, match="keep"):
        vocabulary_permutation(10, seed=0, keep=[10])


def test_permuted_lm_sample_renames_inputs_and_labels_alike():
    from datamodules.lm import permuted_lm_sample, to_lm_sample, vocabulary_permutation

    tokens = torch.tensor([5, 1, 9, 5, 0, 9])
    perm = vocabulary_permutation(10, seed=0, keep=[9])
    plain, renamed = to_lm_sample({"tokens": tokens}), permuted_lm_sample({"tokens": tokens}, perm)
    assert torch.equal(renamed["input_ids"], perm[plain["input_ids"]])
    assert torch.equal(renamed["labels"], perm[plain["labels"]])
    assert renamed["input_ids"][2] == 9 and not torch.equal(renamed["input_ids"], plain["input_ids"])
