"""Forward + backward of the causal LaCT schedule on packed documents (`lact.ops.run_causal_documents`),
optionally against another version of lact/ops.py on the same inputs (gradients compared, runs alternated).

    .venv/bin/python benchmarks/lact_documents.py                          # 56K tokens, median document 1,024
    .venv/bin/python benchmarks/lact_documents.py --median 8192            # fewer, longer documents: more steps
    git show <commit>:lact/ops.py > /tmp/ops_before.py
    .venv/bin/python benchmarks/lact_documents.py --baseline /tmp/ops_before.py

The documents are benchmarks/lm_packed.py's (log-normal lengths, fixed seed); one layer's shapes: 4 heads of
d = h = 128, chunk 2048, momentum, fp32, loss = mean of the squared output. Times are process CPU seconds
(best of --repeats; on a shared machine CPU time moves less than wall time), 1 thread by default.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lm_packed import EOD, packed_sequence  # noqa: E402

from lact import ops  # noqa: E402
from lact.documents import pack_documents  # noqa: E402


def load_ops(path: str):
    spec = importlib.util.spec_from_file_location("ops_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=57344)
    parser.add_argument("--median", type=float, default=1024.0)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", help="another lact/ops.py to time against this checkout's")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    heads, d = 4, 128
    tokens, lengths = packed_sequence(args.length, args.median, 1.0, 0)
    docs = pack_documents(tokens, EOD, chunk_size=args.chunk)
    print(f"{len(lengths)} documents, {len(docs.docs_per_step)} schedule steps, {args.length} tokens")
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    weights = [leaf(heads, d, d, scale=d**-0.5) for _ in range(3)]
    qkv = [leaf(heads, args.length, d) for _ in range(3)]
    rates = [torch.full((heads, args.length, 1), v).requires_grad_() for v in (0.01, 0.01, 0.01, 0.5)]
    leaves = [*weights, *qkv, *rates]

    def step(module) -> list[torch.Tensor]:
        inputs = module.FastWeightInputs(*qkv, *rates)
        out = module.run_causal_documents(tuple(weights), inputs, docs, chunk_size=args.chunk)
        return torch.autograd.grad(out.square().mean(), leaves)

    versions = {"this checkout": ops}
    if args.baseline:
        versions["baseline"] = load_ops(args.baseline)
        diff = max((a - b).abs().max().item() for a, b in zip(step(ops), step(versions["baseline"])))
        print(f"largest gradient difference against the baseline: {diff:.3g}")
    times = {name: [] for name in versions}
    for _ in range(args.repeats):
        for name, module in versions.items():
            start = time.process_time()
            step(module)
            times[name].append(time.process_time() - start)
    for name, ts in times.items():
        print(f"{name}: forward + backward {min(ts):.3f} s CPU (best of {args.repeats})")
    if args.baseline:
        print(f"this checkout / baseline: {min(times['this checkout']) / min(times['baseline']):.3f}")


if __name__ == "__main__":
    main()
