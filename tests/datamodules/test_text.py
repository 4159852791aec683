"""Text -> tokens: tokenizers, documents, packing, and the `prepare text` command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datamodules import prepare
from datamodules.readers import iter_tokens
from datamodules.text import ByteTokenizer, iter_documents, list_text_files, load_tokenizer, pack_tokens


def drain(generator):
    """(items, return value) of a generator."""
    items = []
    while True:
        try:
            items.append(next(generator))
        except StopIteration as stop:
            return items, stop.value


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    assert ids.max() < 256 and len(ids) == len("héllo ✓".encode())
    assert tok.decode([*ids, tok.eod_id]) == "héllo ✓"


@pytest.mark.parametrize("seq_len", [1, 3, 8, 50])
def test_packing_keeps_the_stream_and_overlaps_by_one(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [(f"d{i}", rng.integers(0, 200, rng.integers(0, 20))) for i in range(12)]
    stream = np.concatenate([np.append(ids, 999) for _, ids in docs])
    sequences, dropped = drain(pack_tokens(iter(docs), seq_len, eod_id=999))
    assert all(len(s) == seq_len + 1 for s, _ in sequences)
    for i, (seq, _) in enumerate(sequences):
        assert seq.tolist() == stream[i * seq_len : i * seq_len + seq_len + 1].tolist()
    stored = len(sequences) * seq_len + 1 if sequences else 0
    assert dropped == len(stream) - stored


def test_packing_names_the_sources_of_each_sequence():
    docs = [("a", np.arange(3)), ("b", np.arange(2)), ("c", np.arange(6))]  # stream: 4 + 3 + 7 tokens
    sequences, _ = drain(pack_tokens(iter(docs), 4, eod_id=9))
    assert [s for _, s in sequences] == [["a", "b"], ["b", "c"], ["c"]]  # tokens 0-4, 4-8, 8-12


def test_documents_from_txt_jsonl_and_folders(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "b.txt").write_text("second file")
    (tmp_path / "corpus" / "sub" / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    (tmp_path / "corpus" / "ignored.csv").write_text("x")
    files = list_text_files([str(tmp_path / "corpus")])
    assert [f.split("corpus/")[1] for f in files] == ["b.txt", "sub/a.jsonl"]
    assert [t for _, t in iter_documents(files)] == ["second file", "one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object with a 'text' string"):
        list(iter_documents([str(tmp_path / "bad.jsonl")]))


def test_prepare_text_with_bytes_writes_exact_packed_sequences(tmp_path):
    docs = ["first document", "zweites Dokument ✓", "3"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare.main(
        [
            "text",
            str(tmp_path / "in.jsonl"),
            "--out",
            str(tmp_path / "out"),
            "--seq-len",
            "8",
            "--samples-per-shard",
            "2",
        ]
    )
    stream = [i for d in docs for i in [*d.encode(), 256]]
    samples = list(iter_tokens(tmp_path / "out", length=9))
    assert len(samples) == (len(stream) - 1) // 8 == meta["samples"]
    for i, s in enumerate(samples):
        assert s["tokens"].tolist() == stream[i * 8 : i * 8 + 9]
        assert s["meta"]["tokenizer"] == "bytes" and s["meta"]["eod_id"] == 256
    assert meta["dtype"] == "uint16" and meta["dropped_tail_tokens"] == len(stream) - (8 * len(samples) + 1)
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["samples"] == len(samples)


def write_word_tokenizer(path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(vocab_size - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


@pytest.mark.parametrize("vocab_size,dtype", [(100, "uint16"), (70_000, "uint32")])
def test_prepare_text_with_a_local_tokenizer_json(tmp_path, vocab_size, dtype):
    write_word_tokenizer(tmp_path / "tokenizer.json", vocab_size)
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (tok.vocab_size, tok.eod_token, tok.eod_id) == (vocab_size, "</s>", 1)
    top = vocab_size - 3
    (tmp_path / "doc.txt").write_text(f"w0 w5 w{top} unknown w1")
    meta = prepare.main(
        [
            "text",
            str(tmp_path / "doc.txt"),
            "--out",
            str(tmp_path / "out"),
            "--seq-len",
            "3",
            "--tokenizer",
            str(tmp_path / "tokenizer.json"),
        ]
    )
    assert meta["dtype"] == dtype and meta["vocab_size"] == vocab_size
    (sample,) = iter_tokens(tmp_path / "out", length=4)
    assert sample["tokens"].tolist() == [2, 7, top + 2, 0]
    with pytest.raises(ValueError, match="none of"):
        load_tokenizer(str(tmp_path / "tokenizer.json"), eod_token="<|endoftext|>")
