"""Text to packed token sequences: documents, tokenizers, packing.

Documents come from ``.txt`` files (one document per file) and ``.jsonl`` files (one document per line,
its ``text`` field), or folders holding them (recursively, sorted by path). Each document is tokenized,
followed by the end-of-document id, and the concatenated stream is cut into sequences of
``seq_len + 1`` tokens that overlap by one token: sequence i is ``stream[i*seq_len : (i+1)*seq_len + 1]``,
so inputs ``x = s[:-1]`` and targets ``y = s[1:]`` cover every token of the stream exactly once as a
target. The tail that does not fill a sequence is dropped and counted.

Tokenizers: :class:`ByteTokenizer` (UTF-8 bytes 0..255, end-of-document 256; nothing to download) or a
local ``tokenizer.json`` through the ``tokenizers`` library (:class:`JsonTokenizer`).

:func:`write_text_shards` is the one path from text files to token shards, used by
``python -m datamodules.prepare text`` and by the LM DataModule's ``text=`` option.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from datamodules.formats import token_dtype
from datamodules.writers import TokenWriter, shard_folder

TEXT_SUFFIXES = (".txt", ".jsonl")
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


def bytes_decode(ids: Sequence[int]) -> str:
    """Byte-level detokenisation: ids in [0, 256) are UTF-8 bytes; anything else (end-of-document, special
    tokens) is dropped, and invalid UTF-8 becomes U+FFFD."""
    return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and 256 as the end-of-document id (vocab_size 257)."""

    name = "bytes"
    vocab_size = 257
    eod_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes_decode(ids)


class JsonTokenizer:
    """A local ``tokenizer.json`` (Hugging Face tokenizers). The end-of-document id is ``eod_token``'s,
    or the first of ``<|endoftext|>``, ``</s>``, ``<eos>``, ``<|eos|>``, ``[SEP]`` in the vocabulary."""

    def __init__(self, path: str, eod_token: str | None = None):
        from tokenizers import Tokenizer  # optional path: only this tokenizer needs the library

        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as exn:  # the library raises a bare Exception without the file name
            raise ValueError(f"{path}: not a readable tokenizer.json ({exn})") from exn
        self.name = os.path.basename(os.path.dirname(os.path.abspath(path))) + "/" + os.path.basename(path)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        candidates = (eod_token,) if eod_token is not None else EOD_CANDIDATES
        ids = [self.tokenizer.token_to_id(t) for t in candidates]
        found = [(t, i) for t, i in zip(candidates, ids) if i is not None]
        if not found:
            raise ValueError(f"{path}: none of {list(candidates)} is in the vocabulary; pass eod_token=")
        self.eod_token, self.eod_id = found[0]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str = "bytes", eod_token: str | None = None):
    """``"bytes"`` for :class:`ByteTokenizer`, else the path of a local tokenizer.json."""
    if spec == "bytes":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"tokenizer {spec!r} is neither 'bytes' nor an existing tokenizer.json file")
    return JsonTokenizer(spec, eod_token)


def list_text_files(inputs: Iterable[str], suffixes: Sequence[str] = TEXT_SUFFIXES) -> list[str]:
    """The files named in ``inputs`` or found (recursively, sorted) in its folders, each ending in one of
    ``suffixes`` (.txt and .jsonl by default; anything other than .jsonl is read as one plain-text document)."""
    suffixes = tuple(suffixes)
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(d, f) for d, _, names in os.walk(item) for f in names if f.endswith(suffixes)
            )
            if not found:
                raise FileNotFoundError(f"folder {item} holds no {'/'.join(suffixes)} files")
            files.extend(found)
        elif os.path.isfile(item):
            if not item.endswith(suffixes):
                raise ValueError(f"{item}: expected a {' or '.join(suffixes)} file")
            files.append(item)
        else:
            raise FileNotFoundError(f"text input {item} does not exist")
    return files


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as exn:
        raise ValueError(f"{path}: not UTF-8 text ({exn}); convert it to UTF-8 or leave it out") from exn


def iter_documents(files: Iterable[str], jsonl_field: str = "text") -> Iterator[tuple[str, str]]:
    """``(source, text)`` per document: a .jsonl line (its ``jsonl_field``) is one, any other file is one."""
    for path in files:
        if not path.endswith(".jsonl"):
            yield path, _read_text(path)
            continue
        try:
            with open(path, encoding="utf-8") as f:  # streamed: JSONL corpora can be large
                yield from _jsonl_documents(path, f, jsonl_field)
        except UnicodeDecodeError as exn:
            raise ValueError(f"{path}: not UTF-8 text ({exn}); convert it to UTF-8 or leave it out") from exn


def _jsonl_documents(path: str, lines: Iterable[str], field: str) -> Iterator[tuple[str, str]]:
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)[field]
        except (json.JSONDecodeError, KeyError, TypeError) as exn:
            raise ValueError(
                f"{path}:{line_no}: expected a JSON object with a {field!r} string ({exn})"
            ) from exn
        if not isinstance(text, str):
            raise ValueError(f"{path}:{line_no}: field {field!r} is {type(text).__name__}, expected a string")
        yield path, text


def pack_tokens(
    docs: Iterable[tuple[str, np.ndarray]], seq_len: int, eod_id: int
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Pack tokenized documents ``(source, ids)`` into sequences of ``seq_len + 1`` int64 ids.

    Yields ``(sequence, sources)`` where ``sources`` are the distinct sources with tokens in it. The
    generator's return value (``StopIteration.value``) is the number of tail tokens stored in no sequence.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    pieces: list[np.ndarray] = []  # pending tokens, kept as chunks so long documents are not re-copied
    owners: list[str] = []  # the source of each piece
    pending = 0
    emitted = False
    for source, ids in docs:
        pieces.append(np.concatenate([np.asarray(ids, dtype=np.int64), [eod_id]]))
        owners.append(source)
        pending += len(pieces[-1])
        if pending < seq_len + 1:
            continue
        stream = np.concatenate(pieces)
        ends = np.cumsum([len(p) for p in pieces])  # where each piece ends in `stream`
        start = 0
        while start + seq_len + 1 <= len(stream):
            end = start + seq_len + 1
            first, last = np.searchsorted(ends, [start, end - 1], "right")
            yield stream[start:end], sorted(set(owners[first : last + 1]))
            emitted = True
            start += seq_len  # the last token of this sequence is the first of the next
        first = int(np.searchsorted(ends, start, "right"))
        pieces = [stream[start : ends[first]], *pieces[first + 1 :]]
        owners = owners[first:]
        pending = len(stream) - start
    # With a sequence emitted, the first pending token is already stored (as that sequence's last).
    return max(pending - 1, 0) if emitted else pending


def write_text_shards(
    inputs: Sequence[str],
    out: str,
    *,
    seq_len: int,
    tokenizer: str = "bytes",
    eod_token: str | None = None,
    jsonl_field: str = "text",
    suffixes: Sequence[str] = TEXT_SUFFIXES,
    val_every: int | None = None,
    samples_per_shard: int = 100,
    key_prefix: str = "seq",
    overwrite: bool = False,
    reuse: bool = False,
    args: dict | None = None,
) -> dict:
    """Tokenize, pack and write text files as token shards in ``out``; returns what ``out/meta.json`` says.

    Sequence i (packed as in :func:`pack_tokens`) gets the key ``<key_prefix><i:09d>``. Without
    ``val_every`` all sequences go to ``out/shard-*.tar``; with it, sequence i goes to ``out/val`` when
    ``i % val_every == val_every - 1`` and to ``out/train`` otherwise (meta.json's ``counts``). The folder
    is written atomically (:func:`datamodules.writers.shard_folder`). ``reuse``: return the existing
    meta.json without writing when it records the same input files (paths, sizes, modification times)
    and arguments; otherwise ``out`` is replaced. ``args`` are stored in meta.json as given.
    """
    if val_every is not None and val_every < 2:
        raise ValueError(f"val_every must be >= 2 (one in val_every sequences is held out), got {val_every}")
    files = list_text_files(inputs, suffixes)
    settings = {
        "files": [[f, os.path.getsize(f), os.path.getmtime(f)] for f in files],
        **{"seq_len": seq_len, "tokenizer": tokenizer, "eod_token": eod_token, "jsonl_field": jsonl_field},
        **{"val_every": val_every, "samples_per_shard": samples_per_shard, "key_prefix": key_prefix},
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    meta_path = os.path.join(out, "meta.json")
    if reuse and os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old.get("inputs_digest") == digest:
            return old
    tok = load_tokenizer(tokenizer, eod_token)
    dtype = token_dtype(tok.vocab_size)
    sample_meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id}
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])  # sources named below it
    counted = {"documents": 0, "tokens": 0}

    def tokenized():
        for source, text in tqdm(iter_documents(files, jsonl_field), desc="text documents", unit="doc"):
            ids = tok.encode(text)
            counted["documents"] += 1
            counted["tokens"] += len(ids) + 1  # + the end-of-document id
            yield os.path.relpath(os.path.abspath(source), root), ids

    splits = ("train", "val") if val_every is not None else ("",)
    with shard_folder(out, overwrite=overwrite or reuse) as tmp:
        writers = {s: TokenWriter(os.path.join(tmp, s), samples_per_shard=samples_per_shard) for s in splits}
        packer = pack_tokens(tokenized(), seq_len, tok.eod_id)
        i = 0
        while True:
            try:
                sequence, sources = next(packer)
            except StopIteration as stop:
                dropped = stop.value
                break
            split = splits[0] if val_every is None else ("val" if i % val_every == val_every - 1 else "train")
            writers[split].write(
                f"{key_prefix}{i:09d}", sequence.astype(dtype), {**sample_meta, "sources": sources}
            )
            i += 1
        for writer in writers.values():
            writer.close()
        counts = {s: w.count for s, w in writers.items()}
        if any(n == 0 for n in counts.values()):
            wanted = "one sequence" if val_every is None else "one training and one validation sequence"
            raise ValueError(
                f"text inputs {list(inputs)} give {i} sequences of seq_len={seq_len} + 1 tokens "
                f"({counts if val_every else i} written); need at least {wanted} (more text or a smaller seq_len)"
            )
        meta = {
            "format": "tokens",
            "samples": i,
            "shards": [os.path.relpath(p, tmp) for w in writers.values() for p in w.shards],
            **({"counts": counts} if val_every is not None else {}),
            **sample_meta,
            "dtype": dtype.name,
            "seq_len": seq_len,
            "sequence_length": seq_len + 1,
            "documents": counted["documents"],
            "stream_tokens": counted["tokens"],
            "dropped_tail_tokens": dropped,
            "inputs_digest": digest,
            "args": args if args is not None else {k: v for k, v in settings.items() if k != "files"},
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    with open(meta_path) as f:
        return json.load(f)
