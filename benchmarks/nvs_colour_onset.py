"""NVS colour onset: how soon a small model learns to carry the input views' colours, per training variant.

A tiny NVSNet (patch 4, D 32, 2 blocks, 2 fast-weight heads, inner lr 1, output bias 2) trains on 64
procedural one-primitive scenes (datamodules/scenes.py, 16x16, 2 input + 2 target views, batch 8, AdamW);
every 100 steps the colour transfer (modules.nvs.colour_transfer: prediction change under an R/B swap of the
inputs over the input change, object pixels) is measured on 16 held-out scenes. Each variant changes one
setting of the base (lr 3e-3, colour_values on, no chroma loss), from the same seed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/nvs_colour_onset.py                 # all variants, ~1 min each
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/nvs_colour_onset.py --only base chroma_4
"""

from __future__ import annotations

import argparse
import time

import torch

from datamodules.scenes import single_primitive_batches
from lact.models.nvs import NVSConfig, NVSNet
from modules.nvs import chroma_mse, colour_transfer

BASE = {"lr": 3e-3, "colour_values": True, "base_lr": 1.0, "chroma_weight": 0.0}
VARIANTS = {
    "base": {},
    "lr_1e-3": {"lr": 1e-3},
    "chroma_4": {"chroma_weight": 4.0},
    "chroma_16": {"chroma_weight": 16.0},
    "no_colour_values": {"colour_values": False},
    "base_lr_4": {"base_lr": 4.0},
}


def onset(train: list[dict], val: dict, steps: int, lr, colour_values, base_lr, chroma_weight) -> list[float]:
    """Colour transfer on `val` after every 100 training steps."""
    torch.manual_seed(0)
    net = NVSNet(
        NVSConfig(
            patch_size=4, dim=32, num_layers=2, num_heads=2, mlp_ratio=2.0, output_bias=2.0,
            lact={"heads": 2, "inter_multi": 2.0, "base_lr": base_lr}, colour_values=colour_values,
        )
    )  # fmt: skip
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    transfers = []
    for step in range(1, steps + 1):
        batch = train[step % len(train)]
        net.train()
        cameras = [batch[k] for k in ("input_intrinsics", "input_w2c", "target_intrinsics", "target_w2c")]
        pred = net(batch["input_images"], *cameras)
        loss = (pred - batch["target_images"]).square().mean()
        if chroma_weight:
            loss = loss + chroma_weight * chroma_mse(pred, batch["target_images"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            transfers.append(colour_transfer(net.eval(), val))
    return transfers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, val = single_primitive_batches(8, seed=1), single_primitive_batches(1, seed=2, batch=16)[0]
    print(f"colour transfer after every 100 steps ({', '.join(f'{k}={v}' for k, v in BASE.items())})")
    for name in args.only:
        start = time.perf_counter()
        transfers = onset(train, val, args.steps, **{**BASE, **VARIANTS[name]})
        row = " ".join(f"{t:.3f}" for t in transfers)
        print(f"{name:18s} {row}   ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
