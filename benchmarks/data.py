"""Data-layer throughput: long token sequences through the reader, and procedural scene generation.
``python benchmarks/data.py [--parts tokens scenes]``.

Writes 64 samples of 56K + 1 tokens (uint16) into temporary shards, then streams 1,000 samples through
the LM training reader (resampled shards, shuffle buffer, batches of 8) with 0, 1 and 2 DataLoader
workers. Prints samples/s and tokens/s (after the first batch, so worker start-up is excluded) and the
resident memory of the main process plus its workers: after the first 100 samples and the peak over all
1,000, which must stay flat (no growth with the number of samples read).

Scenes: seconds to generate (ray cast) one 32-view 64x64 procedural scene, the cost per sample of
``python -m datamodules.prepare scenes``, averaged over 5 scenes after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from datamodules.readers import token_dataset, train_loader
from datamodules.scenes import generate_scene
from datamodules.writers import TokenWriter


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:  # field 4: parent pid
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue  # the process ended while we looked
    return found


def _field_kib(path: str, name: str) -> int:
    try:
        with open(path) as f:
            return next(int(line.split()[1]) for line in f if line.startswith(name))
    except (OSError, StopIteration):
        return 0


def memory() -> tuple[int, int]:
    """(RSS of this process, PSS of this process + its DataLoader workers), bytes, from /proc (Linux).

    PSS splits shared pages (torch's libraries, forked memory) between the processes that map them, so
    the sum is the real footprint; summing RSS would count them once per worker.
    """
    me = os.getpid()
    rss = _field_kib(f"/proc/{me}/status", "VmRSS:")
    pss = sum(_field_kib(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in [me, *_children(me)])
    return rss * 1024, pss * 1024


def write_shards(folder: str, samples: int, seq_len: int) -> None:
    rng = np.random.default_rng(0)
    with TokenWriter(folder, samples_per_shard=8) as writer:
        for i in range(samples):
            tokens = rng.integers(0, 50_000, seq_len + 1).astype(np.uint16)
            writer.write(f"seq_{i:05d}", tokens, {"tokenizer": "random", "vocab_size": 50_000})


def measure(folder: str, workers: int, samples: int, seq_len: int, batch_size: int) -> dict:
    dataset = token_dataset(folder, train=True, length=seq_len + 1, shuffle_buffer=16)
    loader = train_loader(
        dataset, batch_size=batch_size, batches_per_epoch=samples // batch_size, num_workers=workers
    )
    seen, checksum, busy = 0, 0, 0.0
    at_100, peak = (0, 0), (0, 0)
    start = None
    for batch in loader:
        checksum += int(batch["tokens"][:, -1].sum())  # touch the data, as a training step would
        seen += len(batch["tokens"])
        if start is None:
            start, first = time.perf_counter(), seen
        if seen % 40 == 0 or seen <= 100 < seen + batch_size:  # reading /proc takes time: sample it
            probe = time.perf_counter()
            mem = memory()
            busy += time.perf_counter() - probe  # not counted as loading time
            peak = (max(peak[0], mem[0]), max(peak[1], mem[1]))
            if seen <= 100:
                at_100 = mem
    rate = (seen - first) / (time.perf_counter() - start - busy)
    return {"samples/s": rate, "tokens/s": rate * (seq_len + 1), "at_100": at_100, "peak": peak}


def scene_seconds(count: int = 5, views: int = 32, size: int = 64) -> float:
    """Mean seconds to generate one procedural scene of ``views`` views of ``size`` x ``size`` pixels."""
    generate_scene(0, num_views=views, height=size, width=size)  # warm-up (imports, allocator)
    start = time.perf_counter()
    for seed in range(count):
        generate_scene(seed, num_views=views, height=size, width=size)
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seq-len", type=int, default=56 * 1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", nargs="+", choices=("tokens", "scenes"), default=["tokens", "scenes"])
    args = parser.parse_args()
    if "scenes" in args.parts:
        print(f"procedural scene, 32 views of 64x64: {scene_seconds():.3f} s per scene\n", flush=True)
    if "tokens" not in args.parts:
        return
    with tempfile.TemporaryDirectory() as folder:
        write_shards(folder, 64, args.seq_len)
        print(
            f"{args.samples} samples of {args.seq_len + 1} tokens, batch {args.batch_size}, {os.cpu_count()} CPUs\n"
        )
        print(
            "| workers | samples/s | tokens/s | main RSS: after 100 -> peak | PSS main + workers: after 100 -> peak |"
        )
        print(
            "|--------:|----------:|---------:|----------------------------:|--------------------------------------:|"
        )
        mib = 2**20
        for workers in args.workers:
            r = measure(folder, workers, args.samples, args.seq_len, args.batch_size)
            print(
                f"| {workers} | {r['samples/s']:,.0f} | {r['tokens/s'] / 1e6:,.1f} M | "
                f"{r['at_100'][0] / mib:,.0f} -> {r['peak'][0] / mib:,.0f} MiB | "
                f"{r['at_100'][1] / mib:,.0f} -> {r['peak'][1] / mib:,.0f} MiB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
