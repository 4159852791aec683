"""Real renders: train on 48 views of one scanned object for at most 10 CPU minutes, evaluate on 16 held out.

    .venv/bin/python scripts/gso_toy_nvs.py [--source ../shared/data/gso_toy] [--size 64] [--minutes 10]
        [--out outputs/gso_toy] [--override=<train.py option> ...] [--skip-train [--ckpt <out>/run/checkpoints/step=<8 digits>.ckpt]]

1. imports ../shared/data/gso_toy (64 renders, opencv_cameras.json) with the data layer's camera-JSON
   importer into outputs/gso_toy/data, resized to --size (the source stays where it is);
2. trains configs/nvs/gso_toy.yaml: inputs and targets drawn among the 48 training views only;
3. scores the 16 held-out views (held_out_views in the config) with `train.py test`: PSNR / SSIM against the
   nearest-input-view baseline, once from the config's num_input_views inputs (as in training) and once
   from all 48 training views (any number of input views works at run time). Writes outputs/gso_toy/:
   heldout.png (rows: ground truth | prediction | nearest input view), turntable.gif, summary.json.

With one object, a network can memorise it and render the held-out views whatever its inputs are; summary.json's
`render_change_all_inputs` (mean absolute change of the held-out renders, pixels in [0, 1], when the
num_input_views inputs become all 48) says how much the renders depend on the inputs, next to `mean_abs_error`
(of the renders from num_input_views inputs).
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
    write_turntable,
)
from torch.nn.functional import interpolate
from torchvision.utils import make_grid

from datamodules.nvs import NVSDataModule
from modules.nvs_outputs import save_png

CONFIG = "configs/nvs/gso_toy.yaml"  # its paths point into OUT
OUT = "outputs/gso_toy"


def import_scene(source: Path, out: Path, size: int) -> None:
    """The data layer's importer, re-run only when the import is missing or was made at another size."""
    meta = out / "meta.json"
    if meta.exists():
        args = json.loads(meta.read_text())["args"]
        if (args["height"], args["width"], Path(args["from_json"]).resolve()) == (
            size,
            size,
            source.resolve(),
        ):
            return
    run([sys.executable, "-m", "datamodules.prepare", "scenes", "--out", str(out), "--from-json", str(source),
         "--height", str(size), "--width", str(size), "--overwrite"])  # fmt: skip


def held_out_loader(data: Path, data_args: dict, size: int, inputs: int):
    """The 16 held-out views of the scene as targets, `inputs` of the other 48 as inputs (drawn by key)."""
    dm = NVSDataModule(
        val_shards=str(data),
        image_size=size,
        num_input_views=inputs,
        held_out_views=data_args["held_out_views"],
        val_batch_size=1,
    )
    return dm.val_dataloader()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source", default=str(ROOT.parent / "shared" / "data" / "gso_toy"), help="camera-JSON folder"
    )
    parser.add_argument("--size", type=int, default=64, help="image height = width (64 or 128)")
    add_run_options(parser, OUT, "fit and test")
    parser.add_argument(
        "--ckpt",
        default=None,
        help="with --skip-train: the checkpoint to evaluate (default <out>/run/checkpoints/last.ckpt)",
    )
    args = parser.parse_args(argv)
    if args.ckpt and not args.skip_train:
        raise SystemExit("--ckpt names a checkpoint to evaluate: pass --skip-train with it")
    source, out = Path(args.source), run_folder(args, OUT)
    if not (source / "opencv_cameras.json").is_file():
        raise SystemExit(
            f"{source}/opencv_cameras.json not found: pass --source <folder with the gso_toy renders>"
        )
    config = apply_overrides(yaml.safe_load((ROOT / CONFIG).read_text()), args.override)
    data_args = config["data"]["init_args"]
    data_args["image_size"] = args.size
    import_scene(source, out / "data", args.size)
    checkpoint = Path(args.ckpt) if args.ckpt else out / "run" / "checkpoints" / "last.ckpt"
    size = f"--data.init_args.image_size={args.size}"
    threads = args.threads or 1  # evaluation only: no step timing
    if not args.skip_train:
        threads, step_seconds = pick_threads(args.threads, config)
        shutil.rmtree(out / "run", ignore_errors=True)
        fit_within(CONFIG, args.minutes, step_seconds, threads, [size, *args.override])

    if not checkpoint.is_file():
        found = sorted(p.name for p in checkpoint.parent.glob("*.ckpt")) if checkpoint.parent.is_dir() else []
        raise SystemExit(
            f"checkpoint {checkpoint} not found; {checkpoint.parent} holds {found or 'no checkpoints'}"
        )
    torch.set_num_threads(threads)
    net, steps = load_net(checkpoint)
    tag = "" if args.ckpt is None else f"_step{steps}"  # an earlier checkpoint's files sit next to the last's
    held_out = len(data_args["held_out_views"])
    results, renders = {}, []
    for inputs in (data_args["num_input_views"], 64 - held_out):
        batches = render(net, held_out_loader(out / "data", data_args, args.size, inputs))
        renders.append(batches[0])
        overrides = [size, f"--data.init_args.num_input_views={inputs}", *args.override]
        summary = test_scores(CONFIG, checkpoint, overrides)  # train.py test: the held-out views
        results[f"{inputs}_inputs"] = summary
        print_summary(
            summary,
            f"gso_toy, {held_out} held-out views at {args.size}x{args.size} from {inputs} input views "
            f"(model trained {steps} steps on the other {64 - held_out} views)",
        )
        if inputs == data_args["num_input_views"]:
            batch = batches[0]
            rows = torch.cat([batch["target_images"][0], batch["prediction"][0], batch["nearest"][0]])
            grid = make_grid(rows.clamp(0, 1), nrow=held_out, padding=2, pad_value=1.0)
            save_png(interpolate(grid[None], scale_factor=2, mode="nearest")[0], out / f"heldout{tag}.png")
            write_turntable(net, batch, out / f"turntable{tag}.gif", scenes=1, scale=2)
    few, many = (r["prediction"].clamp(0, 1) for r in renders)  # the same held-out targets, 8 and 48 inputs
    change = (many - few).abs().mean().item()
    error = (few - renders[0]["target_images"]).abs().mean().item()
    print(f"held-out renders: mean |from {64 - held_out} - from {data_args['num_input_views']} inputs| "
          f"{change:.4f}, mean |error| from {data_args['num_input_views']} inputs {error:.4f} (pixels in [0, 1])")  # fmt: skip
    results.update(
        render_change_all_inputs=change,
        mean_abs_error=error,
        global_step=steps,
        threads=threads,
        size=args.size,
        config=CONFIG,
        checkpoint=str(checkpoint),
        overrides=args.override,
    )
    summary_path = out / f"summary{tag}.json"
    summary_path.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}/heldout.png (rows: ground truth | prediction | nearest input view), "
          f"{args.out}/turntable.gif, {summary_path.relative_to(ROOT)}; "
          f"TensorBoard: .venv/bin/tensorboard --logdir {args.out}/run")  # fmt: skip


if __name__ == "__main__":
    main()
