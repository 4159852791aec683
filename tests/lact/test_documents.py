"""Packed documents: boundaries by cumulative sums, the per-document chunk layout, and the causal schedule and
window attention on packed sequences against each document run alone."""

from __future__ import annotations

import pytest
import torch

from lact.attention import sliding_window_attention
from lact.documents import document_positions, pack_documents
from lact.ops import FastWeightInputs, run_causal
from tests.lact.models.test_lm import packed_rows
from tests.lact.test_ops import make_inputs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

EOD = 9


def packed(lengths: list[list[int]], seed: int = 0) -> torch.Tensor:
    """Rows of documents of the given lengths (each ends with EOD; a row's last one may be cut off)."""
    return packed_rows(lengths, seed, eod=EOD)


def spans(tokens: torch.Tensor, row: int) -> list[tuple[int, int]]:
    """The [start, end) of every document of one row, by a plain loop (the reference)."""
    out, start = [], 0
    for t, token in enumerate(tokens[row].tolist()):
        if token == EOD:
            out.append((start, t + 1))
            start = t + 1
    if start < tokens.shape[1]:
        out.append((start, tokens.shape[1]))
    return out


def test_ids_and_positions_restart_after_every_end_id():
    tokens = torch.tensor([[1, EOD, EOD, 2, 3, EOD, 4], [EOD, 5, 6, 7, 8, 9 - 1, EOD]])
    ids, positions = document_positions(tokens, EOD)
    assert ids.tolist() == [[0, 0, 1, 2, 2, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    assert positions.tolist() == [[0, 1, 0, 0, 1, 2, 0], [0, 0, 1, 2, 3, 4, 5]]


def test_layout_holds_every_token_once_and_inverts():
    tokens = packed([[3, 15, 1, 1, 7, 14, 2], [30, 13]])
    docs = pack_documents(tokens, EOD, chunk_size=7)
    real = docs.gather[docs.gather < tokens.numel()]
    assert torch.equal(real.sort().values, torch.arange(tokens.numel()))
    assert torch.equal(docs.gather[docs.scatter], torch.arange(tokens.numel()))
    # chunks per document, most first: 30 -> 5, 15 -> 3, 14 -> 2, 13 -> 2 (cut to 12 by the row end), ...
    assert docs.docs_per_step == (9, 4, 2, 1, 1)
    x = torch.randn(tokens.shape[0] * 3, tokens.shape[1], 4)  # 3 heads
    gather, scatter = docs.slot_indices(3)
    chunks = docs.to_chunks(x, gather)
    assert chunks.shape == (3 * sum(docs.docs_per_step), 7, 4)
    assert torch.equal(docs.from_chunks(chunks, scatter), x)
    # the first step's first document is row 1's (30 tokens): its chunk 0 for head 2 is tokens 0..6
    assert torch.equal(chunks[2], x[3 + 2, :7])


@pytest.mark.parametrize(("momentum", "muon"), [(True, "schedule"), (False, None)])
def test_causal_schedule_on_packed_documents_equals_each_alone(momentum, muon):
    # chunk 7: documents shorter than a chunk, of several chunks, ending on a chunk boundary (14), empty (1)
    tokens = packed([[3, 15, 1, 1, 7, 14, 2], [30, 13]])
    heads, length = 2, tokens.shape[1]
    args = make_inputs(batch=2 * heads, length=length)
    w = args[:3]
    inputs = FastWeightInputs(*args[3:9], args[9] if momentum else None)
    docs = pack_documents(tokens, EOD, chunk_size=7)
    out = run_causal(w, inputs, chunk_size=7, muon=muon, documents=docs)
    for b in range(2):
        rows = slice(b * heads, (b + 1) * heads)
        for start, end in spans(tokens, b):
            part = FastWeightInputs(*(None if t is None else t[rows, start:end] for t in inputs))
            alone = run_causal(tuple(t[rows] for t in w), part, chunk_size=7, muon=muon)
            torch.testing.assert_close(out[rows, start:end], alone, rtol=1e-12, atol=1e-12)


def test_packed_documents_backward_equals_each_document_alone():
    # The schedule splits its write chunks into per-step groups of rows; their gradients must land in the
    # right rows of every input, momentum and Muon included.
    tokens = packed([[3, 15, 1, 1, 7, 14, 2], [30, 13]])
    heads, length = 2, tokens.shape[1]
    args = [t.requires_grad_() for t in make_inputs(batch=2 * heads, length=length)]
    w, inputs = args[:3], FastWeightInputs(*args[3:10])
    docs = pack_documents(tokens, EOD, chunk_size=7)
    weight = torch.randn(2 * heads, length, inputs.q.shape[-1], dtype=torch.float64)
    out = run_causal(w, inputs, chunk_size=7, muon="schedule", documents=docs)
    packed_grads = torch.autograd.grad((out * weight).sum(), args)
    alone = 0
    for b in range(2):
        rows = slice(b * heads, (b + 1) * heads)
        for start, end in spans(tokens, b):
            part = FastWeightInputs(*(t[rows, start:end] for t in inputs))
            o = run_causal(tuple(t[rows] for t in w), part, chunk_size=7, muon="schedule")
            alone = alone + (o * weight[rows, start:end]).sum()
    for got, expected in zip(packed_grads, torch.autograd.grad(alone, args)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_causal_schedule_refuses_a_layout_of_another_chunk_size():
    tokens = packed([[5, 9]])
    args = make_inputs(batch=1, length=tokens.shape[1])
    with pytest.raises(ValueError, match="chunk_size=4"):
        docs = pack_documents(tokens, EOD, chunk_size=7)
        run_causal(args[:3], FastWeightInputs(*args[3:9]), chunk_size=4, documents=docs)


@pytest.mark.parametrize("length", [4, 6, 23])  # within one window, one window and a bit, several windows
def test_window_attention_never_crosses_a_document(length):
    tokens = packed([[2, 1, 9, 3, 12], [6, 1, 1, 20]])[:, :length]
    q, k, v = torch.randn(3, 2, 3, length, 4, dtype=torch.float64).unbind(0)
    ids, _ = document_positions(tokens, EOD)
    out = sliding_window_attention(q, k, v, 5, ids)
    for b in range(2):
        for start, end in spans(tokens, b):
            alone = sliding_window_attention(*(t[b : b + 1, :, start:end] for t in (q, k, v)), 5)
            torch.testing.assert_close(out[b : b + 1, :, start:end], alone)


@pytest.mark.parametrize(("chunk", "tail_block"), [(7, 3), (8, 4), (5, 2), (16, 5), (7, 7)])
def test_compact_layout_pads_tails_to_the_tail_block_and_the_schedule_still_equals_each_alone(
    chunk, tail_block
):
    """Tails (last chunks) rounded up to multiples of tail_block: every token once, padding below one block
    per document, and outputs and all input gradients (fp64) those of every document run alone."""
    tokens = packed([[3, 15, 1, 1, 7, 14, 2, 16, 8], [30, 13, 5, 17, 9]])
    heads, length = 2, tokens.shape[1]
    docs = pack_documents(tokens, EOD, chunk, tail_block=tail_block)
    gather, scatter, tail_rows = docs.compact_indices(heads)
    assert torch.equal(gather[scatter], torch.arange(tokens.numel() * heads))
    documents = len(docs.rows)
    assert gather.numel() < heads * (tokens.numel() + documents * tail_block)
    assert all(size % tail_block == 0 for _, size in docs.tail_groups)
    assert sum(count for count, _ in docs.tail_groups) == documents
    assert sorted(tail_rows.tolist()) == list(range(documents * heads))

    args = [t.requires_grad_() for t in make_inputs(batch=2 * heads, length=length)]
    inputs = FastWeightInputs(*args[3:10])
    out = run_causal(tuple(args[:3]), inputs, chunk_size=chunk, documents=docs)
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe).sum(), args)
    expected = [torch.zeros_like(a) for a in args]
    for b in range(2):
        rows = slice(b * heads, (b + 1) * heads)
        for start, end in spans(tokens, b):
            part = FastWeightInputs(*(t[rows, start:end] for t in inputs))
            alone = run_causal(tuple(t[rows] for t in args[:3]), part, chunk_size=chunk)
            torch.testing.assert_close(out[rows, start:end], alone, rtol=1e-12, atol=1e-12)
            for total, g in zip(
                expected, torch.autograd.grad((alone * probe[rows, start:end]).sum(), args, allow_unused=True)
            ):
                if g is not None:
                    total += g
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_tail_block_is_checked():
    with pytest.raises(ValueError, match="tail_block"):
        pack_documents(packed([[5, 9]]), EOD, chunk_size=4, tail_block=5)
