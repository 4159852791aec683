"""Window attention at O(L * window) cost (docs/architecture.md, Attention): every query block attends to a fixed number of key
blocks through `scaled_dot_product_attention`; no L x L mask is ever built.

Layout: q, k, v [B, H, L, D] (batch, heads, tokens, head dim); outputs [B, H, L, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, documents: Tensor | None = None
) -> Tensor:
    """Causal attention where token i sees tokens j with i - window < j <= i (itself and window - 1 before).

    Queries are cut into blocks of `window` tokens; block c attends to key blocks c - 1 and c under one
    [window, 2 * window] mask shared by all blocks, so memory is O(L * window).

    documents: [B, L] document index of every token (packed sequences, lact/documents.py), or None. When
    given, token i also needs j in its own document: each block pair gets the band mask and the same-document
    mask, [B, blocks, window, 2 * window] booleans in all, still O(L * window).
    """
    if window < 1:
        raise ValueError(f"window must be a positive int, got {window}")
    if documents is not None:
        return document_window_attention(q, k, v, window, documents)
    length = q.shape[-2]
    if length <= window:  # every causal pair is within the window
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    pad = (-length) % window
    if pad:  # padded keys sit after every real query, so the causal mask hides them
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    batch, heads, padded, dim = q.shape
    blocks = padded // window
    qb, kb, vb = (t.reshape(batch, heads, blocks, window, dim) for t in (q, k, v))
    # Block 0 has no previous block: plain causal attention within it.
    first = F.scaled_dot_product_attention(qb[:, :, 0], kb[:, :, 0], vb[:, :, 0], is_causal=True)
    # Blocks 1..n-1: keys of the previous and the current block; query r (absolute cW + r) sees key column j
    # (absolute (c-1)W + j) iff r < j <= W + r.
    rows = torch.arange(window, device=q.device)[:, None]
    cols = torch.arange(2 * window, device=q.device)[None, :]
    mask = (cols > rows) & (cols <= rows + window)
    k_ctx = torch.cat([kb[:, :, :-1], kb[:, :, 1:]], dim=3).flatten(1, 2)  # [B, H*(n-1), 2W, D]
    v_ctx = torch.cat([vb[:, :, :-1], vb[:, :, 1:]], dim=3).flatten(1, 2)
    rest = F.scaled_dot_product_attention(qb[:, :, 1:].flatten(1, 2), k_ctx, v_ctx, attn_mask=mask)
    rest = rest.unflatten(1, (heads, blocks - 1))
    out = torch.cat([first.unsqueeze(2), rest], dim=2).reshape(batch, heads, padded, dim)
    return out[:, :, :length]


def document_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, documents: Tensor) -> Tensor:
    """`sliding_window_attention` with a same-document mask; documents [B, L] int64."""
    batch, heads, length, dim = q.shape
    if tuple(documents.shape) != (batch, length):
        raise ValueError(f"documents must be [B={batch}, L={length}], got {tuple(documents.shape)}")
    if length <= window:
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        same = documents[:, :, None] == documents[:, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(causal & same).unsqueeze(1))
    pad = (-length) % window
    if pad:  # padded tokens form a document of their own after every real query: no real query sees them
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        documents = F.pad(documents, (0, pad), value=-1)
    blocks = q.shape[2] // window
    qb, kb, vb = (t.reshape(batch, heads, blocks, window, dim) for t in (q, k, v))
    ids = documents.reshape(batch, blocks, window)
    causal = torch.ones(window, window, dtype=torch.bool, device=q.device).tril()
    mask = causal & (ids[:, 0, :, None] == ids[:, 0, None, :])  # [B, W, W]
    first = F.scaled_dot_product_attention(qb[:, :, 0], kb[:, :, 0], vb[:, :, 0], attn_mask=mask.unsqueeze(1))
    rows = torch.arange(window, device=q.device)[:, None]
    cols = torch.arange(2 * window, device=q.device)[None, :]
    band = (cols > rows) & (cols <= rows + window)
    ctx_ids = torch.cat([ids[:, :-1], ids[:, 1:]], dim=2)  # [B, n-1, 2W]
    mask = band & (ids[:, 1:, :, None] == ctx_ids[:, :, None, :])  # [B, n-1, W, 2W]; a query sees itself
    # block pairs become batch entries (the mask differs per pair and row, not per head)
    k_ctx = (
        torch.cat([kb[:, :, :-1], kb[:, :, 1:]], dim=3).transpose(1, 2).flatten(0, 1)
    )  # [B(n-1), H, 2W, D]
    v_ctx = torch.cat([vb[:, :, :-1], vb[:, :, 1:]], dim=3).transpose(1, 2).flatten(0, 1)
    q_rest = qb[:, :, 1:].transpose(1, 2).flatten(0, 1)
    rest = F.scaled_dot_product_attention(q_rest, k_ctx, v_ctx, attn_mask=mask.flatten(0, 1).unsqueeze(1))
    rest = rest.unflatten(0, (batch, blocks - 1)).transpose(1, 2)  # [B, H, n-1, W, D]
    out = torch.cat([first.unsqueeze(2), rest], dim=2).reshape(batch, heads, blocks * window, dim)
    return out[:, :, :length]


def interleaved_block_attention(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, window: int = 1) -> Tensor:
    """Block attention for the AR video layout [noisy_0, clean_0, noisy_1, clean_1, ...] of `chunk_size`-token
    segments. Segment s belongs to video chunk c = s // 2 (noisy_c = segment 2c, clean_c = segment 2c + 1);
    it attends bidirectionally to itself and to the clean segments of the `window` chunks before its own,
    c - window .. c - 1 (so noisy_{i+1} sees clean_{i-window+1} .. clean_i, and clean_i sees the same window
    shifted by one; a noisy chunk never sees its own clean twin). Memory O(L * window * chunk_size).
    """
    length = q.shape[-2]
    if chunk_size < 1 or length % chunk_size:
        raise ValueError(f"L={length} must be a positive multiple of chunk_size={chunk_size}")
    if window < 1:
        raise ValueError(f"window must be a positive number of chunks, got {window}")
    batch, heads, _, dim = q.shape
    segments = length // chunk_size
    qs, ks, vs = (t.reshape(batch, heads, segments, chunk_size, dim) for t in (q, k, v))
    # Segments of chunk c see min(c, window) clean chunks before their own. Grouped by that count (chunks
    # 0 .. window - 1 alone, then all the rest), every group is one attention call without a mask, so the
    # fused kernels run and no [T, (window + 1) T] probability matrix is kept for backward.
    groups = [(2 * c, 2 * c + 2, c) for c in range(window)] + [(2 * window, segments, window)]
    groups = [(start, min(end, segments), seen) for start, end, seen in groups if start < segments]
    chunk = torch.arange(segments, device=q.device) // 2
    outputs = []
    for start, end, seen in groups:
        qg = qs[:, :, start:end]
        count = qg.shape[2]
        k_ctx, v_ctx = ks[:, :, start:end], vs[:, :, start:end]
        if seen:  # the clean segments 2 (c - j) + 1 of chunks c - seen .. c - 1, for every segment's chunk c
            context = 2 * (chunk[start:end, None] - torch.arange(seen, 0, -1, device=q.device)) + 1
            k_ctx = torch.cat([ks[:, :, context].flatten(3, 4), k_ctx], dim=3)  # [B, H, n, (seen + 1) T, D]
            v_ctx = torch.cat([vs[:, :, context].flatten(3, 4), v_ctx], dim=3)
        out = F.scaled_dot_product_attention(
            qg.flatten(1, 2), k_ctx.flatten(1, 2), v_ctx.flatten(1, 2)
        )  # [B, H n, T, D]: 4-d inputs reach the fused kernels
        outputs.append(out.unflatten(1, (heads, count)))
    return torch.cat(outputs, dim=2).reshape(batch, heads, length, dim)
