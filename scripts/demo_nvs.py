"""`make demo`: novel view synthesis end to end on the CPU in about 10 minutes of training.

1. generates procedural scenes (datamodules.prepare scenes): train, validation and held-out test scenes;
2. trains configs/nvs/demo.yaml with `python train.py fit` for at most --minutes (progress bar, TensorBoard);
3. scores the last checkpoint on the held-out scenes against the nearest-input-view baseline with
   `train.py test --data.init_args.test_shards=outputs/demo/data/test` and writes
   outputs/demo/: heldout_grid.png (per scene: inputs | ground truth | prediction | nearest input view),
   turntable.gif (reconstruct once, render an orbit), predict/ (train.py predict: PNGs and a GIF per scene),
   summary.json, and the TensorBoard run in run/ (the run directory).

    .venv/bin/python scripts/demo_nvs.py [--minutes 10] [--threads N] [--skip-train]

The nearest-input-view baseline copies, for every target camera, the input view whose camera centre is
closest. Training time is capped by the trainer's max_time; on a CPU shared with other jobs one torch thread
is often much faster than several, so the script times both and trains with the faster.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml
from nvs_eval import (
    ROOT,
    add_run_options,
    apply_overrides,
    fit_within,
    load_net,
    pick_threads,
    print_summary,
    render,
    run,
    run_folder,
    test_scores,
    write_grid,
    write_turntable,
)

from datamodules.nvs import NVSDataModule
from modules.nvs import colour_transfer

CONFIG = "configs/nvs/demo.yaml"  # its paths point into OUT
OUT = "outputs/demo"
# split: (seed, scenes, primitives per scene (inclusive range)). Held-out scenes have 2-4 primitives of
# different hues; `train_single` (one primitive per scene) is the first stage of the config's curriculum.
SPLITS = {
    "train": (1, 2000, (2, 4)),
    "train_single": (4, 1000, (1, 1)),
    "val": (2, 32, (2, 4)),
    "test": (3, 64, (2, 4)),
}
VIEWS, SIZE = 10, 32


def used_splits(data_args: dict) -> list[str]:
    """The SPLITS the config's data section reads (train/val shards, curriculum stages), and the test split."""
    paths = [data_args.get("train_shards"), data_args.get("val_shards")]
    paths += [stage["shards"] for stage in data_args.get("curriculum") or []]
    names = {Path(str(p)).name for p in paths if p is not None} | {"test"}
    unknown = names - set(SPLITS)
    if unknown:
        raise SystemExit(
            f"{CONFIG} reads data/{sorted(unknown)}, which this script does not generate: {list(SPLITS)}"
        )
    return [name for name in SPLITS if name in names]


def generate_data(out: Path, splits: list[str]) -> None:
    """Procedural scenes, regenerated only when missing or made with other settings."""
    for split in splits:
        seed, scenes, primitives = SPLITS[split]
        folder = out / "data" / split
        meta = folder / "meta.json"
        if meta.exists():
            args = json.loads(meta.read_text())["args"]
            made = (
                args["seed"],
                args["num_scenes"],
                args["views"],
                args["height"],
                tuple(args["primitives"]),
            )
            if made == (seed, scenes, VIEWS, SIZE, primitives):
                continue
        run([sys.executable, "-m", "datamodules.prepare", "scenes", "--out", str(folder), "--num-scenes",
             str(scenes), "--views", str(VIEWS), "--height", str(SIZE), "--width", str(SIZE), "--seed", str(seed),
             "--primitives", *map(str, primitives), "--overwrite"])  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser, OUT, "fit, predict and test")
    args = parser.parse_args(argv)
    out = run_folder(args, OUT)
    config = apply_overrides(yaml.safe_load((ROOT / CONFIG).read_text()), args.override)
    data_args = config["data"]["init_args"]
    generate_data(out, used_splits(data_args))
    checkpoint = out / "run" / "checkpoints" / "last.ckpt"
    threads = args.threads or 1  # evaluation only: no step timing
    if not args.skip_train:
        threads, step_seconds = pick_threads(args.threads, config)
        shutil.rmtree(out / "run", ignore_errors=True)  # a fresh run, not a resumed one
        fit_within(CONFIG, args.minutes, step_seconds, threads, list(args.override))
    # Per-scene PNGs and turntable GIFs through the CLI (reconstruct once, render many).
    run([sys.executable, "train.py", "predict", "--config", CONFIG, f"--ckpt_path={checkpoint}",
         f"--data.init_args.predict_shards={out / 'data' / 'test'}",
         "--trainer.logger=false", *args.override], threads)  # fmt: skip

    torch.set_num_threads(threads)
    net, steps = load_net(checkpoint)
    test = NVSDataModule(
        predict_shards=str(out / "data" / "test"),
        image_size=data_args["image_size"],
        num_input_views=data_args["num_input_views"],
        num_target_views=data_args["num_target_views"],
        val_batch_size=16,
    )
    batches = render(net, test.predict_dataloader())
    test_shards = f"--data.init_args.test_shards={out / 'data' / 'test'}"
    summary = test_scores(
        CONFIG, checkpoint, [test_shards, "--data.init_args.val_batch_size=16", *args.override]
    )
    summary["target_views"] = sum(b["target_images"].shape[:2].numel() for b in batches)
    summary["scenes"] = sum(len(b["key"]) for b in batches)
    write_grid(batches[0], out / "heldout_grid.png")
    write_turntable(net, batches[0], out / "turntable.gif")
    summary.update(
        global_step=steps, threads=threads, config=CONFIG, num_input_views=data_args["num_input_views"]
    )
    summary["psnr_gain_db"] = summary["model"]["psnr"] - summary["nearest_input_view"]["psnr"]
    # R/B swap of the input views: predicted object-pixel change / input change, mean over the test batches
    transfers = [colour_transfer(net, batch) for batch in batches]
    summary["colour_transfer"] = sum(transfers) / len(transfers)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_summary(
        summary,
        f"Held-out procedural scenes: {summary['scenes']} scenes, {summary['target_views']} target views, "
        f"{data_args['num_input_views']} input views each, {SIZE}x{SIZE}; model after {steps} steps",
    )
    gain, transfer = summary["psnr_gain_db"], summary["colour_transfer"]
    print(
        f"psnr_gain_db {gain:+.2f} (goal >= +3 dB over the nearest input view: {'met' if gain >= 3 else 'NOT met'})"
    )
    print(f"colour_transfer {transfer:.3f} (goal >= 0.5: {'met' if transfer >= 0.5 else 'NOT met'})")
    print(f"wrote {args.out}/heldout_grid.png (rows: inputs | ground truth | prediction | nearest input view), "
          f"{args.out}/turntable.gif, {args.out}/predict/<scene>/, {args.out}/summary.json")  # fmt: skip
    print(f"TensorBoard: .venv/bin/tensorboard --logdir {args.out}/run")


if __name__ == "__main__":
    main()
