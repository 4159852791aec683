"""The cost of packed documents (LMConfig.eod_id): one long sequence of many documents against the same
tokens as one stream (eod_id None), for sliding-window attention, the causal LaCT layer and a whole LM
training step (forward + backward).

    .venv/bin/python benchmarks/lm_packed.py                       # 56K tokens (57,344), 1 thread
    .venv/bin/python benchmarks/lm_packed.py --length 16384 --repeats 3
    .venv/bin/python benchmarks/lm_packed.py --rows lact --repeats 4   # the LaCT layer alone

Documents: log-normal lengths, median 1,024 tokens (mu = ln 1024, sigma = 1, so a mean of about 1.7K and
a long tail), drawn with a fixed seed until the sequence is full, the last one cut. Model: 1 hybrid block of
the published per-head shapes (D 512, 4 attention heads and 4 LaCT heads of d = h = 128, chunk 2048, window
2048, momentum), vocabulary 1,024. Times are the best of `--repeats` runs.

Cost model (L tokens, N documents of lengths n_j, chunk C, window W, per LaCT head d x h, tail block T):
- Attention: the same [W, 2W] block pairs as the stream, each with a [W, 2W] boolean mask (band and
  same document) per sequence instead of one shared mask: the FLOPs are equal (SDPA does not skip masked
  entries); the extra work is building L x 2W booleans per layer, O(L W) like the scores themselves.
- LaCT: document j takes c_j = ceil(n_j / C) chunks counted from its start; its last chunk (the tail,
  t_j = n_j - (c_j - 1) C tokens) is apply-only. Write chunks are full and run step by step; tails run after
  the steps, rounded up to a multiple of T (C / 16) and batched by rounded length (at most C / T groups).
  Apply costs 6dh per slot, P = C sum_j (c_j - 1) + T sum_j ceil(t_j / T) <= L + N (T - 1) slots (a tail
  padded to the whole chunk would give up to L + N (C - 1)). Update costs 12dh per token of every write
  chunk: U = C sum_j (c_j - 1) <= L - C (the stream's). Forward FLOPs are 6dhP + 12dhU against
  6dhL + 12dh(L - C): a little more apply when documents are short, less update. Calls: max_j c_j - 1
  schedule steps (one batched apply and update over all documents still writing) plus one apply per tail
  group, against the stream's L / C. Extra memory traffic: gathering q into the P slots and k, v, the rates
  and momentum into the U write slots (the stream slices them in place), the outputs back, the final
  weights of every document (3 dh per head) for its tail, and one fast-weight state per write chunk kept for
  the backward pass (sum_j (c_j - 1) states against L / C - 1).
- Bookkeeping: boundaries, positions and the layouts once per forward (cumsum, two sorts, a few host
  syncs), shared by all layers.
The benchmark prints P / L and U against the stream's update tokens next to the times. Packed and stream
runs alternate, so both see the same machine load; each time is the best of `--repeats`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lact.attention import sliding_window_attention  # noqa: E402
from lact.documents import pack_documents  # noqa: E402
from lact.models.lm import LaCTLM, LMConfig  # noqa: E402

EOD = 1023


def packed_sequence(length: int, median: float, sigma: float, seed: int) -> tuple[torch.Tensor, list[int]]:
    """tokens [1, length] of log-normal-length documents, each ending with EOD (the last one cut to fit), and
    the document lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < length:
        n = max(1, round(math.exp(math.log(median) + sigma * torch.randn(1, generator=g).item())))
        n = min(n, length - total)
        lengths.append(n)
        total += n
    tokens = torch.randint(0, EOD, (length,), generator=g)
    tokens[torch.tensor(lengths).cumsum(0) - 1] = EOD
    return tokens[None], lengths


def best(packed, stream, repeats: int) -> tuple[float, float]:
    """The best time in seconds of each of two functions over `repeats` alternating runs of both."""
    times = ([], [])
    for _ in range(repeats):
        for fn, out in zip((packed, stream), times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=57344)
    parser.add_argument("--median", type=float, default=1024.0)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rows", nargs="+", choices=("attention", "lact", "step"), default=["attention", "lact", "step"]
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    tokens, lengths = packed_sequence(args.length, args.median, args.sigma, args.seed)
    stream_tokens = torch.where(tokens == EOD, 0, tokens)  # the same sequence without boundaries
    base = dict(vocab_size=1024, dim=512, num_layers=1, num_heads=4, window=2048)
    lact = dict(heads=4, chunk_size=2048, momentum=True)
    packed = LaCTLM(LMConfig(**base, lact=lact, eod_id=EOD))
    stream = LaCTLM(LMConfig(**base, lact=lact))
    stream.load_state_dict(packed.state_dict())
    chunk, length = 2048, args.length
    docs = pack_documents(tokens, EOD, chunk)
    slots = chunk * docs.write_chunks + sum(n * size for n, size in docs.tail_groups)
    chunks = [math.ceil(n / chunk) for n in lengths]
    update_tokens = sum((c - 1) * chunk for c in chunks)  # every chunk but each document's last
    stream_update = (math.ceil(length / chunk) - 1) * chunk
    print(
        f"L = {length}, {len(lengths)} documents (median {sorted(lengths)[len(lengths) // 2]}, "
        f"longest {max(lengths)}), {args.threads} thread(s), best of {args.repeats}"
    )
    print(
        f"LaCT apply slots P / L = {slots / length:.3f} (tails padded to the chunk: "
        f"{chunk * sum(docs.docs_per_step) / length:.2f}); update tokens {update_tokens} "
        f"(stream {stream_update}); schedule steps {len(docs.docs_per_step) - 1} + "
        f"{len(docs.tail_groups)} tail groups (stream {math.ceil(length / chunk)} chunks)"
    )

    block = packed.blocks[0]
    x = torch.randn(1, length, 512)
    q, k, v = torch.randn(3, 1, 4, length, 128).unbind(0)
    rows = []
    with torch.no_grad():
        xn = block.attn_norm(x)
        qkv = block.qkv(xn)
        if "attention" in args.rows:
            rows.append(
                (
                    "sliding-window attention, forward",
                    *best(
                        lambda: sliding_window_attention(q, k, v, 2048, docs.ids),
                        lambda: sliding_window_attention(q, k, v, 2048),
                        args.repeats,
                    ),
                )
            )
        positions = torch.arange(length)

        def lact_packed():
            layout = pack_documents(tokens, EOD, chunk)  # its bookkeeping is part of the cost
            block.lact(xn, qkv=qkv, positions=layout.positions, documents=layout)

        if "lact" in args.rows:
            rows.append(
                (
                    "LaCT layer (causal, momentum), forward, with the layout bookkeeping",
                    *best(lact_packed, lambda: block.lact(xn, qkv=qkv, positions=positions), args.repeats),
                )
            )

    def step(model, ids):
        model.zero_grad()
        model(ids).float().logsumexp(-1).mean().backward()

    if "step" in args.rows:
        rows.append(
            (
                "LM step (1 block), forward + backward",
                *best(lambda: step(packed, tokens), lambda: step(stream, stream_tokens), args.repeats),
            )
        )
    print("| | packed s | stream s | packed / stream |")
    print("|---|---:|---:|---:|")
    for name, a, b in rows:
        print(f"| {name} | {a:.2f} | {b:.2f} | **{a / b:.2f}** |")


if __name__ == "__main__":
    main()
