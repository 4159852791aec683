"""Packed documents: where each document of a packed token sequence starts, and the per-document chunk layout
the causal LaCT schedule runs on (architecture.md, "Packed documents").

A document is its tokens up to and including its end-of-document id; a row also starts a document at its first
token (packing cuts documents at sequence edges). Everything here is computed with cumulative sums and
two sorts, without a Python loop over documents.

The chunk layout. Document j of length n_j is cut into c_j = ceil(n_j / C) chunks counted from its own start
(C = chunk_size); only its last chunk can be partial, and the causal schedule never writes with a last chunk,
so padding never writes. Documents are sorted by c_j, most chunks first, so at schedule step s (chunk s of
every document) the documents still running are a prefix of that order, n_s = #{j : c_j > s} of them. The
layout stores, step after step, the n_s documents' chunk s as C slots each:

    slot(token) = C * (n_0 + ... + n_{s-1} + rank(j)) + (p mod C),   s = p div C,  p = position in document j

so step s is one contiguous block of n_s * C slots: one batched matmul over all documents of the batch that
are still running.

The schedule reads a compact selection of that layout. Chunk s of document j is a write chunk when
s < c_j - 1: it is full (C tokens), and the schedule applies then updates with it at step s. The last chunk,
the tail, of t_j = n_j - (c_j - 1) C tokens (1 <= t_j <= C) is only read, with the weights after c_j - 1
updates, so its apply need not happen at step s at all: all tails run after the steps, grouped by their
length rounded up to a multiple of a block of T tokens (`tail_block`, C / 16 by default), one batched apply
per group. The compact layout is

    [write chunks, step after step (C slots each)] [tails of group 0 (k_0 T slots each)] [group 1] ...

groups by k = ceil(t_j / T), most blocks first. It holds sum_j (c_j - 1) C + sum_j T ceil(t_j / T) slots,
at most L + N (T - 1), where the layout above holds C sum_j c_j (up to L + N (C - 1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def document_starts(tokens: Tensor, eod_id: int) -> Tensor:
    """tokens [B, L] -> [B, L] bool: True at the first token of every document (column 0 and after an end id)."""
    starts = torch.ones_like(tokens, dtype=torch.bool)
    starts[:, 1:] = tokens[:, :-1] == eod_id
    return starts


def document_positions(tokens: Tensor, eod_id: int) -> tuple[Tensor, Tensor]:
    """tokens [B, L] -> (ids, positions), both [B, L] int64: the document index of every token within its row
    (0, 1, ...) and its position within its document (0 at the document's first token)."""
    starts = document_starts(tokens, eod_id)
    ids = starts.long().cumsum(dim=1) - 1
    index = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    first = torch.where(starts, index, 0).cummax(dim=1).values  # the start of each token's document
    return ids, index - first


@dataclass(eq=False)
class PackedDocuments:
    """Document boundaries of a batch of packed sequences [B, L] and their chunk layout (module docstring).

    ids, positions: [B, L] int64, as `document_positions`.
    chunk_size: C of the layout.
    gather: [S] int64, S = C * sum(docs_per_step): the flat token (b * L + t) in every slot, B * L for padding.
    scatter: [B * L] int64: the slot of every token.
    rows: [N] int64: the batch row of every document, in layout order (most chunks first).
    docs_per_step: (n_0, n_1, ...): documents with more than s chunks; n_0 = N, the number of documents.

    The compact layout the schedule runs on (module docstring), per chunk-row r of the layout above (R =
    sum_s n_s rows, row = n_0 + ... + n_{s-1} + rank):
    tail_block: T, the tokens that tails are rounded up to.
    row_start, row_size: [R] int64: where row r's slots start in the compact layout and how many it has
        (C for a write chunk, k T for a tail), in tokens per head.
    tail_groups: ((count, size), ...): the tail groups in compact order, documents and slots per tail.
    tail_weights: [N] int64: for every tail in compact order, its document's index among the documents in the
        order they finish (all those whose last chunk is chunk 0, by rank, then chunk 1, ...), which is the
        order in which the schedule sets aside their final weights.

    A dataclass, not a tuple: a compiled block passes it on to the (eager) schedule, and a tuple it passes
    on gets guarded field by field (the length of tail_groups, the sizes of the layout tensors), which
    recompiled for every new layout; an object is passed on as it is (lact/nn.py compile_blocks).
    """

    ids: Tensor
    positions: Tensor
    chunk_size: int
    gather: Tensor
    scatter: Tensor
    rows: Tensor
    docs_per_step: tuple[int, ...]
    tail_block: int
    row_start: Tensor
    row_size: Tensor
    tail_groups: tuple[tuple[int, int], ...]
    tail_weights: Tensor

    @property
    def batch(self) -> int:
        return self.ids.shape[0]

    def slot_indices(self, heads: int) -> tuple[Tensor, Tensor]:
        """Row indices for `to_chunks` and `from_chunks` with `heads` rows per token (operator layout, batch
        x heads first): ([(sum n_s) * heads * C] into [B * heads * L] token rows, [B * heads * L] into slot
        rows). Padding slots point at token row 0: they are only ever read by an apply whose output is
        dropped (a document's last chunk never updates), so their content never reaches an output, a weight
        or a gradient."""
        batch, length = self.ids.shape
        size = self.chunk_size
        token = self.gather.masked_fill(self.gather == batch * length, 0)
        row, col = (token // length).view(-1, 1, size), (token % length).view(-1, 1, size)
        head = torch.arange(heads, device=token.device).view(1, heads, 1)
        gather = ((row * heads + head) * length + col).flatten()  # [chunk, head, offset] order
        chunk, offset = (
            (self.scatter // size).view(batch, 1, length),
            (self.scatter % size).view(batch, 1, length),
        )
        scatter = ((chunk * heads + head) * size + offset).flatten()  # [row, head, token] order
        return gather, scatter

    def to_chunks(self, t: Tensor, gather: Tensor) -> Tensor:
        """Operator layout [B * H, L, x] -> [(sum n_s) * H, C, x]: step s's documents' chunk s, rows (rank, head)
        within each step; gather: `slot_indices(H)[0]`."""
        return t.flatten(0, 1).index_select(0, gather).unflatten(0, (-1, self.chunk_size))

    def from_chunks(self, o: Tensor, scatter: Tensor) -> Tensor:
        """The inverse of `to_chunks` for outputs: [(sum n_s) * H, C, x] -> [B * H, L, x] (padding dropped);
        scatter: `slot_indices(H)[1]`, or `compact_indices(H)[1]` for the compact layout's slots [S * H, x]."""
        return o.reshape(-1, o.shape[-1]).index_select(0, scatter).unflatten(0, (-1, self.ids.shape[1]))

    @property
    def write_chunks(self) -> int:
        """Write chunks (every document's chunks but its last), the first rows of the compact layout."""
        return sum(self.docs_per_step[1:])

    def compact_indices(self, heads: int) -> tuple[Tensor, Tensor, Tensor]:
        """Row indices of the compact layout (module docstring) with `heads` rows per token, every segment
        (a write chunk or a tail) in [head, offset] order: (gather [S * heads] into [B * heads * L] token rows,
        padding at row 0; scatter [B * heads * L] into slots; tail_rows [N * heads]: for every tail's
        (document, head), its row among the final weights set aside in finishing order).

        Padding slots (the ends of tails) are only read by an apply whose outputs there are dropped."""
        batch, length = self.ids.shape
        size = self.chunk_size
        row, offset = (
            (self.scatter // size).view(batch, 1, length),
            (self.scatter % size).view(batch, 1, length),
        )
        head = torch.arange(heads, device=row.device).view(1, heads, 1)
        scatter = (self.row_start[row] * heads + head * self.row_size[row] + offset).flatten()
        slots = heads * (self.write_chunks * size + sum(n * tail for n, tail in self.tail_groups))
        gather = torch.zeros(slots, dtype=torch.long, device=row.device)
        gather[scatter] = torch.arange(batch * heads * length, device=row.device)
        tail_rows = (self.tail_weights[:, None] * heads + head.view(1, heads)).flatten()
        return gather, scatter, tail_rows


def pack_documents(
    tokens: Tensor, eod_id: int, chunk_size: int, tail_block: int | None = None
) -> PackedDocuments:
    """The documents of tokens [B, L] split at `eod_id` and their layout in chunks of `chunk_size` tokens;
    tails rounded up to multiples of `tail_block` tokens (default ceil(chunk_size / 16)).

    A few host syncs, once per forward (the number of documents, schedule steps, documents per step and the
    tail groups are sizes and Python ints, which the schedule's loop and slices need); the network builds it
    once for all its layers.
    """
    if tail_block is None:
        tail_block = -(-chunk_size // 16)
    if not isinstance(tail_block, int) or not 1 <= tail_block <= chunk_size:
        raise ValueError(f"tail_block must be an int in [1, chunk_size={chunk_size}], got {tail_block!r}")
    batch, length = tokens.shape
    ids, positions = document_positions(tokens, eod_id)
    starts = document_starts(tokens, eod_id).flatten()
    first = starts.nonzero().squeeze(1)  # [N] flat index of every document's first token, row-major
    ends = torch.cat([first[1:], first.new_tensor([batch * length])])
    chunks = (ends - first + chunk_size - 1) // chunk_size  # c_j >= 1
    order = torch.sort(chunks, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=order.device)
    sorted_chunks = chunks[order]
    steps = torch.arange(int(sorted_chunks[0]), device=tokens.device)
    per_step = (sorted_chunks[None, :] > steps[:, None]).sum(dim=1)  # n_s
    docs_per_step = tuple(per_step.tolist())
    before = torch.cumsum(per_step, dim=0) - per_step  # n_0 + ... + n_{s-1}
    doc = starts.long().cumsum(dim=0) - 1  # global document index of every token
    flat_positions = positions.flatten()
    step = flat_positions // chunk_size
    scatter = chunk_size * (before[step] + rank[doc]) + flat_positions % chunk_size
    gather = torch.full(
        (chunk_size * sum(docs_per_step),), batch * length, dtype=torch.long, device=tokens.device
    )
    gather[scatter] = torch.arange(batch * length, device=tokens.device)

    # The compact layout. Chunk-row r of the layout above is (step s, rank) with rank < n_s; it is a write
    # chunk when rank < n_{s+1}, else the tail of document `rank`.
    device = tokens.device
    count = order.shape[0]
    after = torch.cat([per_step[1:], per_step.new_zeros(1)])  # n_{s+1}
    row_step = torch.repeat_interleave(torch.arange(per_step.shape[0], device=device), per_step)
    row_rank = torch.arange(row_step.shape[0], device=device) - before[row_step]
    writes = row_rank < after[row_step]
    row_start = (writes.long().cumsum(0) - 1) * chunk_size
    row_size = torch.full_like(row_start, chunk_size)
    tails = (ends - first)[order] - (sorted_chunks - 1) * chunk_size  # t_j in [1, C], by rank
    blocks = (tails + tail_block - 1) // tail_block
    tail_order = torch.sort(blocks, descending=True, stable=True).indices  # ranks, in compact order
    sizes, counts = torch.unique_consecutive(blocks[tail_order] * tail_block, return_counts=True)
    tail_groups = tuple(zip(counts.tolist(), sizes.tolist()))
    tail_sizes = blocks[tail_order] * tail_block
    tail_rows = before[sorted_chunks[tail_order] - 1] + tail_order  # their chunk-rows
    row_start[tail_rows] = chunk_size * sum(docs_per_step[1:]) + torch.cumsum(tail_sizes, 0) - tail_sizes
    row_size[tail_rows] = tail_sizes
    last = sorted_chunks[tail_order] - 1  # the step at which each tail's document finishes
    tail_weights = (count - per_step[last]) + (tail_order - after[last])
    return PackedDocuments(
        ids=ids,
        positions=positions,
        chunk_size=chunk_size,
        gather=gather,
        scatter=scatter,
        rows=(first // length)[order],
        docs_per_step=docs_per_step,
        tail_block=tail_block,
        row_start=row_start,
        row_size=row_size,
        tail_groups=tail_groups,
        tail_weights=tail_weights,
    )
