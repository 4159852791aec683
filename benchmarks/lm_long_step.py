"""Peak memory and time of one training step of the tiny LM on one long sequence (CPU).

    .venv/bin/python benchmarks/lm_long_step.py                  # 32K, 56K and 64K tokens
    .venv/bin/python benchmarks/lm_long_step.py --lengths 57344 --checkpointing

Each length runs in a fresh subprocess: forward, next-token loss, backward and one AdamW step of the
configs/lm/tiny.yaml model on a single random sequence. Peak memory is the growth of the process's maximum
resident set (ru_maxrss) over the step, above the model, optimizer and inputs, without warm-up. Linear memory
in the sequence length gives a 64K / 32K ratio near 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEP = textwrap.dedent(
    """
    import json, resource, sys, time, torch, yaml
    from lact.models.lm import LMConfig
    from modules.lm import LMModule
    from modules.task import OptimConfig
    torch.set_num_threads(1)
    length, checkpointing = int(sys.argv[1]), sys.argv[2] == "1"
    spec = yaml.safe_load(open("configs/lm/tiny.yaml"))["model"]["init_args"]
    config = LMConfig(**{**spec["net"], "activation_checkpointing": checkpointing})
    module = LMModule(config, optim=OptimConfig(total_steps=10))
    optimizer = module.configure_optimizers()["optimizer"]
    tokens = torch.randint(0, 256, (1, length + 1))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    # The step's peak above the memory in use now: the process's high-water mark after the step minus its
    # current resident set before it (not minus the earlier high-water mark, which imports or first-time
    # bytecode compilation may have raised above the current use, under-counting short steps).
    with open("/proc/self/statm") as statm:
        before = int(statm.read().split()[1]) * resource.getpagesize() // 1024  # KiB, as ru_maxrss
    start = time.perf_counter()
    losses, scored, _ = module.token_losses(batch)
    loss = losses.sum() / scored.sum()
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": (after - before) / 1024, "seconds": seconds, "loss": loss.item()}))
    """
)


def measure(length: int, checkpointing: bool = False) -> dict:
    """One step at `length` tokens in a fresh subprocess -> {"peak_mib", "seconds", "loss"}."""
    out = subprocess.run(
        [sys.executable, "-c", STEP, str(length), "1" if checkpointing else "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 57344, 65536])
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    args = parser.parse_args(argv)
    rows = {n: measure(n, args.checkpointing) for n in args.lengths}
    print(f"tiny config, 1 thread, activation checkpointing {'on' if args.checkpointing else 'off'}")
    print("| tokens | peak MiB above model and inputs | MiB per 1K tokens | step s |")
    print("|---:|---:|---:|---:|")
    for n, r in rows.items():
        print(f"| {n} | {r['peak_mib']:.0f} | {1024 * r['peak_mib'] / n:.1f} | {r['seconds']:.1f} |")
    if 32768 in rows and 65536 in rows:
        print(f"peak memory 64K / 32K: {rows[65536]['peak_mib'] / rows[32768]['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
