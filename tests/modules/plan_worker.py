"""Peak memory of one real training step on CPU (fp32), next to the planner's estimate for it. Run by
tests/modules/test_plan.py as a subprocess, one per rank (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the
environment for two gloo processes, which shard the network with modules/scale.py's shard_model).

    MALLOC_MMAP_THRESHOLD_=65536 python tests/modules/plan_worker.py --config configs/lm/tiny.yaml \\
        --seq-len 1024 --batch 2 --checkpointing off --out result.json

How the peak is measured: glibc's malloc serves every allocation of at least MALLOC_MMAP_THRESHOLD_ bytes
with its own mapping and unmaps it on free (fixing the threshold also stops glibc from raising it after
frees), so the process's resident set follows the live tensor bytes; tensors of the tiny model are all
64 KiB and more apart from biases and norms. The kernel's high-water mark VmHWM is reset to the current RSS
through /proc/self/clear_refs (tests/peak_memory.py) right before the measured step, after a first step that
creates AdamW's state. Peak = the bytes of the tensors alive before the step (weights, AdamW state, counted
exactly) + (VmHWM - RSS before the step). torch's own CPU memory profiler reports allocations per operator
but not frees in order, so it cannot give a peak; tracemalloc does not see torch's allocations at all.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from modules import plan as planner  # noqa: E402
from modules.scale import shard_model  # noqa: E402
from tests.peak_memory import peak_rss_increase_kib  # noqa: E402


def set_checkpointing(net: torch.nn.Module, on: bool) -> None:
    """Switch per-block recomputation on the built network (its config's activation_checkpointing)."""
    config = getattr(net, "config", None) or getattr(net, "cfg", None)
    config.activation_checkpointing = on


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--checkpointing", choices=("on", "off"), required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    module, _ = planner.build_from_config(["--config", args.config], device="cpu")
    net = planner.network(module)
    set_checkpointing(net, args.checkpointing == "on")
    # Planned from the full network, before sharding (the planner reads shapes only).
    work = planner.Workload(args.batch, args.seq_len)
    setup = planner.Setup(gpus=world, compute_bytes=4, activation_checkpointing=args.checkpointing == "on")
    estimate = planner.make_plan(net, work, setup)
    vocab = net.token_embedding.num_embeddings
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        torch.distributed.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
        shard_model(net, net.blocks, mesh)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(int(os.environ.get("RANK", "0")))
    tokens = torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=generator)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def step() -> None:
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's state exists from here on
    gc.collect()
    live = sum(local_bytes(p) for p in module.parameters())
    live += sum(local_bytes(t) for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    peak = live + 1024 * peak_rss_increase_kib(step)
    result = {"measured": peak, "planned": estimate.total, "lines": estimate.lines, "world": world}
    if world > 1:
        torch.distributed.destroy_process_group()
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
