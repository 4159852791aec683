"""Video diffusion: does the LaCT branch carry memory past the attention window, and what does it cost?

    .venv/bin/python benchmarks/video_memory.py                     # both parts, one CPU thread
    .venv/bin/python benchmarks/video_memory.py --only quality --steps 1500
    .venv/bin/python benchmarks/video_memory.py --only cost --chunks 4 8 16 32

quality: the same network (lact.models.video.VideoNet, 2 blocks, window 1 chunk) trained for the same steps
on the same procedural clips (datamodules/videos.py: shapes that bounce, fall, or wander out of the frame and
back) with and without its LaCT branch (`net.lact: null` = window attention only), with the task's own loss
(modules/video.py); then the per-chunk validation loss (flow MSE at fixed noise levels 0.3/0.6/0.9, the same
seeded noise for both) on held-out clips. With 2 blocks and a window of 1 chunk, the attention path of chunk c
reaches clean chunks c - 1 and c - 2 only; everything older reaches it only through the fast weights. Writes
benchmarks/results/video_memory.json and .png.

cost: one training step (forward, backward, AdamW) of LaCT + window attention (window 1) against full block
attention without LaCT (window = chunks - 1: every chunk sees all clean chunks before it) as the number of
chunks doubles; time and peak resident memory above the model and inputs, each in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NET = dict(
    in_channels=3,
    num_frames=24,
    frames_per_chunk=2,
    latent_size=[16, 16],
    patch_size=[1, 4, 4],
    dim=64,
    num_layers=2,
    num_heads=4,
    ffn_dim=192,
    window=1,
    freq_dim=64,
    lact=dict(heads=2, inter_multi=2.0, base_lr=1e-2, momentum=True),
)


def clips(count: int, seed: int, batch: int) -> list[dict]:
    import numpy as np
    import torch

    from datamodules.videos import generate_video

    out = []
    for b in range(count):
        videos = [
            generate_video([seed, b, i], num_frames=24, height=16, width=16)["frames"] for i in range(batch)
        ]
        keys = [f"s{seed}_{b}_{i}" for i in range(batch)]
        out.append({"frames": torch.from_numpy(np.stack(videos)), "key": keys})
    return out


def train_and_validate(lact: bool, steps: int, train: list[dict], val: list[dict]) -> dict:
    import torch
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from modules.video import VideoModule

    torch.manual_seed(0)
    net = {**NET, "lact": NET["lact"] if lact else None}
    module = VideoModule(net=net, optim=dict(lr=2e-3, warmup_steps=50, total_steps=steps), num_samples=0)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(module, DataLoader(train, batch_size=None))
    seconds = time.perf_counter() - start
    evaluator = Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    metrics = evaluator.validate(module, DataLoader(val, batch_size=None), verbose=False)[0]
    chunks = [metrics[f"val/loss_chunk_{i:02d}"] for i in range(NET["num_frames"] // NET["frames_per_chunk"])]
    return {"val_loss": metrics["val/loss"], "chunks": chunks, "train_seconds": seconds}


def quality(steps: int, batch: int) -> dict:
    train = clips(steps, seed=0, batch=batch)  # a fresh batch every step
    val = clips(8, seed=1, batch=16)
    results = {
        name: train_and_validate(name == "lact", steps, train, val) for name in ("lact", "window_only")
    }
    lact, window = results["lact"]["chunks"], results["window_only"]["chunks"]
    print(f"\nper-chunk validation loss after {steps} steps (batch {batch}), 2 blocks, window 1 chunk")
    print("| chunk | LaCT + window | window only | ratio |")
    print("|---|---|---|---|")
    for i, (a, b) in enumerate(zip(lact, window)):
        print(f"| {i} | {a:.4f} | {b:.4f} | {a / b:.3f} |")
    far = slice(3, None)  # chunks with clean context beyond the attention path (c - 3 and older)
    mean_l, mean_w = sum(lact[far]) / len(lact[far]), sum(window[far]) / len(window[far])
    print(f"| mean of chunks 3+ | {mean_l:.4f} | {mean_w:.4f} | {mean_l / mean_w:.3f} |")
    for name, r in results.items():
        print(f"{name}: val/loss {r['val_loss']:.4f}, training {r['train_seconds']:.0f} s")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "video_memory.json").write_text(json.dumps({"steps": steps, "batch": batch, **results}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(lact, "o-", label="LaCT + window attention")
    ax.plot(window, "s--", label="window attention only")
    ax.axvline(2.5, color="grey", lw=0.8)
    ax.set_xlabel("chunk (2 latent frames each)")
    ax.set_ylabel("validation flow MSE")
    ax.set_title(f"{steps} steps, window 1 chunk, 2 blocks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "video_memory.png", dpi=120)
    return results


STEP = textwrap.dedent(
    """
    import json, resource, sys, time, torch
    from modules.video import VideoModule
    torch.set_num_threads(1)
    chunks, lact = int(sys.argv[1]), sys.argv[2] == "1"
    net = dict(in_channels=3, num_frames=chunks, frames_per_chunk=1, latent_size=[32, 32], patch_size=[1, 2, 2],
               dim=64, num_layers=2, num_heads=4, ffn_dim=192, freq_dim=64,
               window=1 if lact else chunks - 1, lact=dict(heads=2, momentum=True) if lact else None)
    module = VideoModule(net=net)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    torch.manual_seed(0)
    x0 = torch.rand(1, 3, chunks, 32, 32) * 2 - 1
    noise, t, _ = module.draw_noise(x0, None)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = module.flow_loss(x0, t, noise, None).mean()
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": (after - before) / 1024, "seconds": seconds,
                      "tokens": module.net.cfg.sequence_length}))
    """
)


def measure(chunks: int, lact: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", STEP, str(chunks), "1" if lact else "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def cost(chunk_counts: list[int]) -> list[dict]:
    rows = []
    print("\none training step, 1 frame of 16x16 tokens per chunk, 2 blocks of width 64, one CPU thread")
    print("| chunks | tokens | LaCT+window s | full attn s | LaCT+window MiB | full attn MiB |")
    print("|---|---|---|---|---|---|")
    for n in chunk_counts:
        a, b = measure(n, True), measure(n, False)
        rows.append({"chunks": n, "lact_window": a, "full_attention": b})
        print(
            f"| {n} | {a['tokens']} | {a['seconds']:.2f} | {b['seconds']:.2f} | {a['peak_mib']:.0f} | "
            f"{b['peak_mib']:.0f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("quality", "cost"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16, 32])
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.only in (None, "quality"):
        quality(args.steps, args.batch)
    if args.only in (None, "cost"):
        cost(args.chunks)


if __name__ == "__main__":
    main()
