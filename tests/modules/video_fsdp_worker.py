"""Trains the tiny video model for a few steps, sharded with FSDP2 over N CPU processes (gloo) or in one plain
process, then samples; saves the full weights, per-step losses and gradient norms, and the samples. Run by
tests/modules/test_video_fsdp.py as a subprocess (the pattern of tests/modules/fsdp_worker.py).

    python tests/modules/video_fsdp_worker.py --devices 2 --out result.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from datamodules.videos import generate_video  # noqa: E402
from modules.ema import EMA  # noqa: E402
from modules.video import VideoModule  # noqa: E402
from tests.modules.fsdp_worker import Record, full  # noqa: E402


def batches(steps: int, rank: int, world: int) -> list[dict]:
    """One global batch of 4 clips per step (keys fix each clip's noise), rank r taking clips r, r + world."""
    out = []
    for step in range(steps):
        videos = [generate_video([7, step, i], num_frames=8, height=16, width=16)["frames"] for i in range(4)]
        frames = torch.stack([torch.from_numpy(v) for v in videos])
        keys = [f"clip_{step}_{i}" for i in range(4)]
        out.append({"frames": frames[rank::world], "key": keys[rank::world]})
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    seed_everything(0)
    init = yaml.safe_load((ROOT / "configs" / "video" / "tiny.yaml").read_text())["model"]["init_args"]
    init["net"]["activation_checkpointing"] = True
    init["optim"] = {**init["optim"], "warmup_steps": 1, "total_steps": args.steps}
    module = VideoModule(**init)  # the same init on every rank (same seed)
    record, ema = Record(), EMA(decay=0.5)
    if args.devices > 1:  # a single-file checkpoint: the EMA's sharded averages are gathered into it
        strategy = ModelParallelStrategy(
            data_parallel_size=args.devices, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
    else:
        strategy = "auto"
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[record, ema],
    )
    data = batches(args.steps, trainer.global_rank, trainer.world_size)
    trainer.fit(module, DataLoader(data, batch_size=None))
    clip = batches(1, 0, 1)[0]["frames"][:2]
    with torch.no_grad():  # cached sampling on the sharded network (every rank takes part)
        samples = module.generate(module.latents({"frames": clip}), None, seed=3)
    state = module.net.state_dict()
    checkpoint = Path(args.out).with_suffix(".ckpt")
    trainer.save_checkpoint(checkpoint)  # collective under FSDP2
    result = {
        "weights": {k: full(v) for k, v in state.items()},
        "sharded": any(hasattr(v, "full_tensor") for v in state.values()),
        "losses": record.losses,
        "grad_norms": record.grad_norms,
        "grads": record.grads,
        "samples": samples,
    }
    if trainer.global_rank == 0:
        callbacks = torch.load(checkpoint, weights_only=True)["callbacks"]
        result["ema"] = next(v for k, v in callbacks.items() if k.startswith("EMA"))["averages"]
        torch.save(result, args.out)


if __name__ == "__main__":
    main()
