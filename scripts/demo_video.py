"""Autoregressive video diffusion end to end on the CPU in at most --minutes of training (default 10).

1. generates procedural clips (datamodules.prepare videos: 12 frames of 32x32, shapes bouncing, falling,
   wandering out of the frame and back) into outputs/video/demo/data/{train,val};
2. trains configs/video/demo.yaml with `python train.py fit`, capped by the trainer's max_time;
3. validates the last checkpoint (EMA weights) and prints the per-chunk validation loss;
4. runs `train.py predict` (continuations of the validation clips from their first 2 chunks, GIFs in
   outputs/video/demo/predict/) and writes outputs/video/demo/continuations.gif: one row per clip, ground
   truth | continuation.

    .venv/bin/python scripts/demo_video.py [--minutes 10] [--threads N] [--skip-train]

Training uses one torch thread when other jobs keep the cores busy, else whichever of 1 thread and all cores
(up to 8) steps faster (on an idle 2-core machine: 2 threads, about 1.5x the steps of one).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpu_threads import fastest_threads  # noqa: E402

import train  # noqa: E402
from datamodules.prepare import main as prepare  # noqa: E402
from modules.nvs_outputs import save_gif  # noqa: E402

CONFIG = str(ROOT / "configs" / "video" / "demo.yaml")
OUT = ROOT / "outputs" / "video" / "demo"
SPLITS = {"train": (0, 2000), "val": (1, 64)}  # seed, clips


def generate_data() -> None:
    for split, (seed, count) in SPLITS.items():
        folder = OUT / "data" / split
        if (folder / "meta.json").exists():
            continue
        prepare(
            ["videos", "--out", str(folder), "--num-videos", str(count), "--frames", "12", "--height", "32"]
            + ["--width", "32", "--seed", str(seed), "--overwrite"]
        )


def read_gif(path: Path) -> np.ndarray:
    with Image.open(path) as gif:
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("RGB")))
    return np.stack(frames)


def continuation_grid(predict_dir: Path, rows: int = 4) -> np.ndarray:
    """uint8 [T, rows * H, 2 W + 2, 3]: per clip, ground truth | continuation, a white gap between."""
    clips = sorted(p for p in predict_dir.iterdir() if (p / "generated.gif").exists())[:rows]
    lines = []
    for clip in clips:
        truth, generated = read_gif(clip / "ground_truth.gif"), read_gif(clip / "generated.gif")
        gap = np.full((truth.shape[0], truth.shape[1], 2, 3), 255, np.uint8)
        lines.append(np.concatenate([truth, gap, generated], axis=2))
    return np.concatenate(lines, axis=1)


def step_timer():
    """A function threads -> wall seconds of one training step (flow loss, backward, AdamW) of the demo network
    on a random batch shaped like the demo's, with that many torch threads (median of 3 after 2 warm-up steps,
    which pay one-off allocations)."""
    module = train.main(["--config", CONFIG], run=False).model
    data = yaml.safe_load(Path(CONFIG).read_text())["data"]["init_args"]
    frames, height, width, channels = data["shape"]
    x0 = torch.rand(data["batch_size"], channels, frames, height, width) * 2 - 1
    optimizer = torch.optim.AdamW(module.net.parameters(), 1e-4)

    def step_seconds(threads: int) -> float:
        torch.set_num_threads(threads)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            t = torch.rand(x0.shape[0], module.net.cfg.num_chunks)
            loss = module.flow_loss(x0, t, torch.randn_like(x0), None).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        return statistics.median(times[2:])

    return step_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training time cap")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: pick, see above)")
    parser.add_argument("--skip-train", action="store_true", help="reuse the last checkpoint")
    args = parser.parse_args()
    threads = args.threads or 1  # evaluation only: no step timing
    if not args.skip_train:
        threads, _ = fastest_threads(args.threads, step_timer())
    torch.set_num_threads(threads)
    generate_data()
    common = ["--config", CONFIG]
    if not args.skip_train:
        minutes = int(args.minutes)
        seconds = round((args.minutes - minutes) * 60)
        resume = ["--ckpt_path=last"] if (OUT / "checkpoints" / "last.ckpt").exists() else []
        train.main(["fit", *common, f"--trainer.max_time=00:00:{minutes:02d}:{seconds:02d}", *resume])
    cli = train.main(["validate", *common, "--ckpt_path=last"])
    metrics = cli.trainer.callback_metrics
    chunks = sorted(k for k in metrics if k.startswith("val/loss_chunk_"))
    print("\nper-chunk validation loss (flow MSE at noise levels 0.3 / 0.6 / 0.9, EMA weights):")
    for name in chunks:
        print(f"  chunk {int(name.rsplit('_', 1)[1]):2d}: {float(metrics[name]):.4f}")
    print(f"  mean: {float(metrics['val/loss']):.4f}")
    train.main(
        [
            "predict",
            *common,
            "--ckpt_path=last",
            "--data.init_args.val_batch_size=4",
            "--trainer.limit_predict_batches=2",
        ]
    )
    grid = continuation_grid(OUT / "predict")
    save_gif(grid, OUT / "continuations.gif", fps=4)
    print(f"wrote {OUT / 'continuations.gif'} (rows: ground truth | continuation from the first 2 chunks)")


if __name__ == "__main__":
    main()
