"""Per-token generation time of the LaCT LM: the state cache against recomputing the whole prefix.

    .venv/bin/python benchmarks/lm_generation.py                       # tiny config, 1K/4K/8K context
    .venv/bin/python benchmarks/lm_generation.py --config configs/lm/tiny.yaml --contexts 1024 8192 --new 128

For each context length n: a random prompt of n tokens fills the cache (prefill, timed separately), then
`--new` tokens are decoded one at a time with the cache (every `chunk_size` of them completes a chunk and
updates the fast weights, so the mean includes those updates). Full recompute is what decoding without a
cache costs per token: one forward pass over all n tokens, timed `--repeats` times. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lact.models.lm import LaCTLM, LMConfig  # noqa: E402
from lact.models.lm_cache import extend, init_cache  # noqa: E402


def cache_bytes(cache) -> int:
    """Bytes held by the decoding cache (attention window, fast weights, momentum, pending chunk)."""
    total = 0
    for block in cache.blocks:
        tensors = [block.k, block.v]
        if block.lact is not None and block.lact.state is not None:
            state = block.lact.state
            tensors += [*state.weights, *state.row_norms, *(state.momentum or ())]
            tensors += list(block.lact.pending.values())
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


@torch.no_grad()
def measure(model: LaCTLM, context: int, new: int, repeats: int, generator: torch.Generator) -> dict:
    vocab = model.cfg.vocab_size
    prompt = torch.randint(0, vocab, (1, context), generator=generator)
    cache = init_cache(model)
    start = time.perf_counter()
    logits = extend(model, prompt, cache)[:, -1]
    prefill = time.perf_counter() - start
    steps = []
    for _ in range(new):
        token = logits.argmax(-1, keepdim=True)
        start = time.perf_counter()
        logits = extend(model, token, cache)[:, -1]
        steps.append(time.perf_counter() - start)
    full = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(prompt)
        full.append(time.perf_counter() - start)
    cached = statistics.mean(steps)
    recompute = statistics.median(full)
    return {
        "context": context,
        "prefill_s": prefill,
        "cached_ms": 1e3 * cached,
        "cached_max_ms": 1e3 * max(steps),
        "recompute_ms": 1e3 * recompute,
        "speedup": recompute / cached,
        "cache_kib": cache_bytes(cache) / 1024,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default="configs/lm/tiny.yaml", help="a configs/lm YAML (its model.config)"
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--new", type=int, default=128, help="tokens decoded per context (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="full-recompute forwards per context")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = yaml.safe_load(Path(args.config).read_text())
    cfg = LMConfig(**spec["model"]["init_args"]["net"])
    torch.manual_seed(0)
    model = LaCTLM(cfg).eval()
    generator = torch.Generator().manual_seed(0)
    measure(model, 256, 8, 1, generator)  # warm-up: first-call allocations and kernel selection
    rows = [measure(model, n, args.new, args.repeats, generator) for n in args.contexts]
    print(
        f"config {args.config}: D {cfg.dim}, {cfg.num_layers} blocks, window {cfg.window}, chunk {cfg.chunk_size}, "
        f"{args.new} decoded tokens per context, {args.threads} thread(s), {torch.__version__}"
    )
    print("| context | cached ms/token (max) | full recompute ms/token | speed-up | prefill s | cache KiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['context']} | {r['cached_ms']:.2f} ({r['cached_max_ms']:.1f}) | {r['recompute_ms']:.0f} | "
            f"{r['speedup']:.0f}x | {r['prefill_s']:.2f} | {r['cache_kib']:.0f} |"
        )
    return rows


if __name__ == "__main__":
    main()
