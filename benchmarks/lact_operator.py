"""Throughput of the LaCT operator against this machine's own matmul peak, measured in the same run.

    python benchmarks/lact_operator.py [--quick] [--threads N] [--dtype float32|bfloat16]
    python benchmarks/lact_operator.py --backward [--lengths 8192 32768 57344] [--threads 1] [--rounds 2]
        [--malloc keep|default]

Prints one markdown table per section:
  1. matmul peak (same dtype and thread count), the reference every percentage below divides by;
  2. causal_lact at L = 8192, chunk 2048, 4 heads, d = h = 128: forward and forward+backward, Muon off / on;
  3. chunk sweep 16 ... 4096 at that L (forward+backward tokens/s) and the ratio chunk 2048 / chunk 16;
  4. length sweep: LaCT + sliding-window attention against full causal attention, time and t(2L) / t(L).
With --backward, only section 5: the operator's backwards side by side (lact/ops.py set_lean_backward):
plain autograd, "lean" (LeanApply/LeanUpdate recomputing every [b, h] activation) and "keep" (the same
nodes, the updates keeping their G, U, P): forward+backward time and peak memory of causal_lact at each L
(chunk 2048, 4 heads, d = h = 128, momentum on, Muon off and "schedule"), each measurement in a fresh
subprocess (peak resident memory only grows within a process), the variants alternating over --rounds
rounds, and the matmul utilisation of forward+backward relative to the forward's, measured in the same
subprocess (forward alone under no_grad, alternating with forward+backward). Forward+backward backpropagates a
fixed upstream gradient of the output (no loss of its own); --malloc keep runs the subprocesses with glibc's
malloc thresholds fixed (see MALLOC).

Matmul FLOPs, counted from the shapes (B = batch x heads rows, L tokens, chunks of C, n_c = ceil(L / C),
n_u = n_c - 1 updates since the last chunk only reads, d = head dim, h = hidden width):
  forward  F = B [ 6 d h L  +  12 d h C n_u  +  n_u 3 s (4 m^2 n + 2 m^3) ]
    apply: 3 matmuls of [L, d] x [d, h] size (W_gate x, W_up x, W_down hidden) = 6 d h L;
    update: per chunk the same 3 to recompute G, U, P = V^T W_down plus the 3 products giving dW = 12 d h C;
    Muon (s Newton-Schulz iterations, s = 5, per update and per matrix m x n, m <= n): A = Y Y^T (2 m^2 n),
    A A (2 m^3), (bA + cA^2) Y (2 m^2 n), three matrices.
  forward+backward  3 F: every forward matmul Z = X Y costs two of the same size in the backward
    (dX = dZ Y^T, dY = X^T dZ), which is what autograd runs. The hand-derived backwards' recomputation
    (lean: 5 of the 9 [C, d] x [d, h] matmuls per chunk that the forward had already done; keep: the 2 of
    the read; both: bA + cA^2 per Newton-Schulz iteration) and all non-matmul work count as time, not FLOPs.
The utilisation ratio is (3 F / t_fwd+bwd) / (F / t_fwd) = 3 t_fwd / t_fwd+bwd: 1 means the forward+backward
runs its matmul FLOPs as efficiently as the forward runs its own (issue 13's target: at least 0.85).
Only ratios inside one run mean anything: the machines are shared and noisy. Every time is the best of
several runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lact.attention import sliding_window_attention  # noqa: E402
from lact.ops import causal_lact  # noqa: E402

HEADS, HEAD_DIM, HIDDEN = 4, 128, 128


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Best wall time of fn() over `repeats` runs, in seconds: on a shared machine other jobs only ever add
    time, so the minimum is the least disturbed measurement (as the standard library's timeit advises)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(dtype: torch.dtype, repeats: int) -> tuple[float, str]:
    """Best FLOP/s over square matmuls and the operator's own batched shapes."""
    best, where = 0.0, ""
    for n in (1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        rate = 2 * n**3 / timeit(lambda a=a, b=b: a @ b, repeats)
        if rate > best:
            best, where = rate, f"{n}x{n} @ {n}x{n}"
    a = torch.randn(HEADS, 2048, HEAD_DIM, dtype=dtype)
    w = torch.randn(HEADS, HEAD_DIM, 2 * HIDDEN, dtype=dtype)
    rate = 2 * HEADS * 2048 * HEAD_DIM * 2 * HIDDEN / timeit(lambda: a @ w, repeats)
    if rate > best:
        best, where = rate, f"bmm {HEADS}x2048x{HEAD_DIM} @ {HEAD_DIM}x{2 * HIDDEN}"
    return best, where


def operator_inputs(length: int, dtype: torch.dtype, requires_grad: bool):
    g = torch.Generator().manual_seed(0)
    b, d, h = HEADS, HEAD_DIM, HIDDEN
    tensors = [
        torch.randn(b, h, d, generator=g) * d**-0.5,
        torch.randn(b, h, d, generator=g) * d**-0.5,
        torch.randn(b, d, h, generator=g) * h**-0.5,
        F.normalize(torch.randn(b, length, d, generator=g), dim=-1),
        F.normalize(torch.randn(b, length, d, generator=g), dim=-1),
        torch.randn(b, length, d, generator=g),
    ]
    tensors = [t.to(dtype).requires_grad_(requires_grad) for t in tensors]
    lrs = [torch.full((b, length, 1), 1e-3, requires_grad=requires_grad) for _ in range(3)]
    return tensors + lrs


def upstream_gradient(length: int, dtype: torch.dtype) -> torch.Tensor:
    """A fixed gradient for the operator's output [HEADS, L, d], made once: forward+backward is the operator's
    alone. (A scalar loss such as out.square().mean() adds its own forward and backward over the whole
    output, about 0.2 s of fresh 64 MiB buffers at 32K on the development CPU, 9% of the step.)"""
    return torch.randn(HEADS, length, HEAD_DIM, generator=torch.Generator().manual_seed(1)).to(dtype)


def operator_flops(length: int, chunk: int, muon: bool) -> float:
    """Forward matmul FLOPs of causal_lact on HEADS rows (the formula of this module's docstring): apply 6dhL
    on every token, update 12dhC on every chunk but the last (apply-only), and with Muon 5 (4 m^2 n + 2 m^3)
    per update and per matrix (m <= n). Forward+backward is 3x this."""
    d, h = HEAD_DIM, HIDDEN
    updates = -(-length // chunk) - 1  # every chunk but the last writes memory
    flops = 6 * d * h * length + 12 * d * h * updates * chunk
    if muon:
        m, n = min(d, h), max(d, h)
        flops += updates * 3 * 5 * (4 * m * m * n + 2 * m**3)
    return HEADS * flops


def run_operator(length, chunk, dtype, muon, backward):
    inputs = operator_inputs(length, dtype, requires_grad=backward)
    grad_out = upstream_gradient(length, dtype)

    def step():
        out = causal_lact(*inputs, chunk_size=chunk, muon=muon)
        if backward:
            out.backward(grad_out)

    return step


BACKWARD_STEP = textwrap.dedent(
    """
    import json, resource, sys, time, torch
    sys.path.insert(0, sys.argv[1])
    from benchmarks.lact_operator import operator_inputs, upstream_gradient
    from lact.ops import causal_lact, set_lean_backward
    length, mode, muon, threads = int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4] or None, int(sys.argv[5])
    torch.set_num_threads(threads)
    set_lean_backward(mode)
    inputs = operator_inputs(length, torch.float32, requires_grad=True)
    momentum = torch.full((inputs[0].shape[0], length, 1), 0.5, requires_grad=True)
    grad_out = upstream_gradient(length, torch.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu, fwd_wall, fwd_cpu = [], [], [], []
    for _ in range(3):  # the first run sets the peak; the best of the three is the time
        start, start_cpu = time.perf_counter(), time.process_time()
        causal_lact(*inputs, chunk_size=2048, momentum=momentum, muon=muon).backward(grad_out)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        for t in [*inputs, momentum]:
            t.grad = None
        # The forward alone (it peaks lower), alternating with forward+backward so both see the same load.
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            causal_lact(*inputs, chunk_size=2048, momentum=momentum, muon=muon)
        fwd_wall.append(time.perf_counter() - start)
        fwd_cpu.append(time.process_time() - start_cpu)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"seconds": min(wall), "cpu_seconds": min(cpu), "peak_mib": peak,
                      "fwd_seconds": min(fwd_wall), "fwd_cpu_seconds": min(fwd_cpu)}))
    """
)

# The backwards compared (name, lact.ops.set_lean_backward mode), autograd first: every ratio divides by it.
BACKWARDS = (("autograd", False), ("lean", True), ("keep", "keep"), ("keep_all", "keep_all"))


# glibc malloc returns freed blocks to the OS (blocks above a threshold that starts at 128 KiB and at most 32 MiB
# always; the top of the heap past a trim threshold) and page-faults them in again at the next allocation: on the
# development VM that is 2-8 us per 4 KiB page, so a fresh [4, 2048, 128] fp32 buffer costs 2-8 ms against ~1 ms
# for the product written into it, and the backward allocates more fresh buffers per matmul than the forward.
# "keep" fixes the thresholds (glibc's documented environment variables): blocks up to 32 MiB come from a heap
# that is never trimmed, which is what jemalloc/tcmalloc (PyTorch's CPU tuning advice) and the CUDA caching
# allocator give. Blocks above 32 MiB (the [4, L, 128] inputs' gradients) still fault in either setting.
MALLOC = {
    "default": {},
    "keep": {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**40)},
}


def measure_backward(length: int, mode: bool | str, muon: str | None, threads: int, malloc: str) -> dict:
    """Forward+backward time (s) and peak memory growth (MiB) of causal_lact in a fresh process, under
    set_lean_backward(mode), with the malloc settings MALLOC[malloc]."""
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", BACKWARD_STEP, root, str(length), json.dumps(mode), muon or "", str(threads)],
        check=True,
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": str(threads), "PATH": "", **MALLOC[malloc]},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_of_rounds(length: int, muon: str | None, threads: int, rounds: int, malloc: str) -> dict[str, dict]:
    """Every backward of BACKWARDS measured `rounds` times, alternating (forward order in even rounds,
    reversed in odd ones, so no variant always runs first after another's process): per backward the least
    time of each kind (other jobs only add time) and the largest peak."""
    results: dict[str, list[dict]] = {name: [] for name, _ in BACKWARDS}
    for r in range(rounds):
        for name, mode in BACKWARDS if r % 2 == 0 else BACKWARDS[::-1]:
            results[name].append(measure_backward(length, mode, muon, threads, malloc))
    return {
        name: {key: (max if key == "peak_mib" else min)(run[key] for run in runs) for key in runs[0]}
        for name, runs in results.items()
    }


def backward_section(
    lengths: list[int], threads: int, rounds: int, muons: list[str | None], malloc: str
) -> None:
    names = [name for name, _ in BACKWARDS]
    rows, util_rows = [], []
    for muon in muons:
        for n in lengths:
            res = best_of_rounds(n, muon, threads, rounds, malloc)
            auto = res["autograd"]
            rows.append(
                ["on" if muon else "off", str(n)]
                + [f"{res[k]['cpu_seconds']:.2f} ({res[k]['seconds']:.2f})" for k in names]
                + [
                    f"**{res[k]['cpu_seconds'] / auto['cpu_seconds']:.2f}** ({res[k]['seconds'] / auto['seconds']:.2f})"
                    for k in names[1:]
                ]
                + [f"{res[k]['peak_mib']:.0f}" for k in names]
                + [f"**{res[k]['peak_mib'] / auto['peak_mib']:.2f}**" for k in names[1:]]
            )
            print("|", " | ".join(rows[-1]), "|", flush=True)
            flops = operator_flops(n, 2048, muon is not None)
            cells = ["on" if muon else "off", str(n), f"{flops / 1e9:.1f}", f"{3 * flops / 1e9:.1f}"]
            for k in names:
                r = res[k]
                cells += [
                    f"{flops / r['fwd_cpu_seconds'] / 1e9:.1f} / {3 * flops / r['cpu_seconds'] / 1e9:.1f}",
                    f"**{3 * r['fwd_cpu_seconds'] / r['cpu_seconds']:.2f}** ({3 * r['fwd_seconds'] / r['seconds']:.2f})",
                ]
            util_rows.append(cells)
            print("|", " | ".join(util_rows[-1]), "|", flush=True)
    print(
        f"\nbackwards of causal_lact fwd+bwd (autograd; lean = set_lean_backward(True); keep, keep_all = "
        f'set_lean_backward("keep"), ("keep_all")), fp32, chunk 2048, {HEADS} heads, d=h={HEAD_DIM}, momentum on, '
        f"{threads} thread(s), malloc {malloc}, best of {rounds} alternating rounds; times in s of process CPU time (wall in "
        "brackets), which other jobs on a shared machine disturb less than wall time; peak = largest growth "
        "of the maximum resident set\n"
    )
    header = ["Muon", "L"] + [f"{k} s" for k in names] + [f"time {k}/autograd" for k in names[1:]]
    header += [f"{k} peak MiB" for k in names] + [f"peak {k}/autograd" for k in names[1:]]
    print(table(header, rows))
    print(
        "\nmatmul utilisation (FLOPs per the docstring; GFLOP/s from CPU time): ratio = fwd+bwd FLOP/s over "
        "forward FLOP/s of the same process = 3 t_fwd / t_fwd+bwd, CPU time (wall time in brackets); "
        "target >= 0.85\n"
    )
    header = ["Muon", "L", "fwd GFLOP", "fwd+bwd GFLOP"]
    for k in names:
        header += [f"{k}: GFLOP/s fwd / fwd+bwd", "ratio"]
    print(table(header, util_rows))


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats, lengths up to 16K (smoke run)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--backward", action="store_true", help="only the backward section (autograd, lean, keep)"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 57344])
    parser.add_argument("--rounds", type=int, default=2, help="--backward: alternating rounds per variant")
    parser.add_argument("--muon", nargs="+", default=["off", "on"], choices=["off", "on"], help="--backward")
    parser.add_argument(
        "--malloc",
        default="default",
        choices=sorted(MALLOC),
        help="--backward: glibc malloc thresholds of the measuring processes (see MALLOC)",
    )
    args = parser.parse_args()
    if args.backward:
        muons = [None if m == "off" else "schedule" for m in args.muon]
        backward_section(args.lengths, args.threads, args.rounds, muons, args.malloc)
        return
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    repeats = 2 if args.quick else 5
    length, chunk = 8192, 2048

    print(f"# LaCT operator benchmark: torch {torch.__version__}, {args.threads} threads, {args.dtype}\n")
    peak, where = matmul_peak(dtype, repeats)
    print(table(["matmul peak GFLOP/s", "shape"], [[f"{peak / 1e9:.1f}", where]]), "\n")

    rows = []
    for muon in (None, "schedule"):
        flops = operator_flops(length, chunk, muon is not None)
        fwd = timeit(run_operator(length, chunk, dtype, muon, backward=False), repeats)
        both = timeit(run_operator(length, chunk, dtype, muon, backward=True), repeats)
        # forward+backward is counted as 3x the forward FLOPs (the backward of every matmul is two matmuls).
        rows.append(
            [
                "on" if muon else "off",
                f"{length / fwd:,.0f}",
                f"{flops / fwd / 1e9:.1f}",
                f"{100 * flops / fwd / peak:.0f}%",
                f"{length / both:,.0f}",
                f"{100 * 3 * flops / both / peak:.0f}%",
            ]
        )
    print(f"causal_lact, L={length}, chunk={chunk}, {HEADS} heads, d=h={HEAD_DIM}\n")
    print(
        table(["Muon", "fwd tok/s", "fwd GFLOP/s", "fwd % peak", "fwd+bwd tok/s", "fwd+bwd % peak"], rows),
        "\n",
    )

    rows, rates = [], {}
    for c in (16, 64, 256, 1024, 2048, 4096):
        t = timeit(run_operator(length, c, dtype, None, backward=True), max(1, repeats // 2))
        rates[c] = length / t
        rows.append([str(c), f"{rates[c]:,.0f}"])
    print(f"chunk sweep, forward+backward, L={length}\n")
    print(table(["chunk", "fwd+bwd tok/s"], rows))
    print(f"\nchunk 2048 / chunk 16 = {rates[2048] / rates[16]:.1f}x\n")

    lengths = [4096, 8192, 16384] if args.quick else [4096, 8192, 16384, 32768, 65536]
    window = 2048
    rows, lact_t, full_t = [], {}, {}
    for n in lengths:
        inputs = operator_inputs(n, dtype, requires_grad=False)
        q, k, v = (t.unsqueeze(0) for t in inputs[3:6])  # [1, heads, L, d]

        def lact_swa(inputs=inputs, q=q, k=k, v=v):
            causal_lact(*inputs, chunk_size=chunk)
            sliding_window_attention(q, k, v, window)

        lact_t[n] = timeit(lact_swa, max(1, repeats // 2))
        full_t[n] = timeit(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True), 1)
        prev = n // 2
        rows.append(
            [
                str(n),
                f"{lact_t[n] * 1e3:.0f}",
                f"{lact_t[n] / lact_t[prev]:.2f}" if prev in lact_t else "",
                f"{full_t[n] * 1e3:.0f}",
                f"{full_t[n] / full_t[prev]:.2f}" if prev in full_t else "",
            ]
        )
    print(
        f"length sweep, forward: LaCT (chunk {chunk}) + sliding-window attention (window {window}) vs full causal SDPA\n"
    )
    print(table(["L", "LaCT+SWA ms", "t(L)/t(L/2)", "full attn ms", "t(L)/t(L/2)"], rows))


if __name__ == "__main__":
    main()
