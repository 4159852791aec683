"""Memory plan of a training config on a cluster, from the network built on the meta device (no GPU needed).

    python scripts/plan.py --config configs/lm/760m.yaml --config configs/lm/3b.yaml --nodes 8 --gpus-per-node 8 --seq-len 56000 \\
        --gpu-memory 80GiB [--micro-batch 1] [--activation-checkpointing on|off] [train.py overrides ...]

Prints the parameters by module kind; per GPU the sharded parameters, gradients and AdamW state, the
fast-weight state and the activations per block with and without activation checkpointing; the total, whether
it fits, the longest sequence and the largest micro-batch that fit, and which setting makes it fit when it
does not. The assumptions and formulas are in modules/plan.py. Arguments it does not know go to the training
CLI's parser, as overrides of the config (e.g. --model.init_args.config.num_layers 32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules import plan as planner  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        required=True,
        action="append",
        help="a training config (configs/<task>/<size>.yaml); repeat for a base and its overlays, as train.py",
    )
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sample (default: the data config's)"
    )
    parser.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB or 141GB")
    parser.add_argument(
        "--micro-batch", type=int, default=None, help="samples per GPU (default: the data config's)"
    )
    parser.add_argument(
        "--activation-checkpointing", choices=("on", "off"), default=None, help="default: as configured"
    )
    parser.add_argument(
        "--headroom", type=float, default=0.10, help="share of GPU memory kept free (context, NCCL)"
    )
    args, overrides = parser.parse_known_args(argv)
    for name in ("nodes", "gpus_per_node", "seq_len", "micro_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if not 0 <= args.headroom < 1:
        parser.error(f"--headroom must be in [0, 1), got {args.headroom}")
    for config in args.config:
        if not Path(config).is_file():
            parser.error(f"--config {config}: no such file")
    try:
        gpu_memory = planner.parse_bytes(args.gpu_memory)
    except ValueError as error:
        parser.error(f"--gpu-memory: {error}")
    configs = [arg for config in args.config for arg in ("--config", config)]
    module, config = planner.build_from_config([*configs, *overrides])
    net = planner.network(module)
    work, text = planner.configured_workload(net, config, args.seq_len, args.micro_batch)
    checkpointing = planner.configured_checkpointing(net)
    if args.activation_checkpointing is not None:
        checkpointing = args.activation_checkpointing == "on"
    setup = planner.Setup(
        gpus=args.nodes * args.gpus_per_node,
        gpu_memory=gpu_memory,
        compute_bytes=planner.compute_bytes_of(config),
        activation_checkpointing=checkpointing,
        headroom=args.headroom,
    )
    result = planner.make_plan(net, work, setup)
    text = planner.report(module, result, text, args.nodes, args.gpus_per_node)
    print(text)
    return text


if __name__ == "__main__":
    main()
