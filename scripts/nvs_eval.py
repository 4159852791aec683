"""Helpers shared by scripts/demo_nvs.py and scripts/gso_toy_nvs.py. The scores come from `train.py test`
(NVSModule.test_step: PSNR, SSIM and, with its weights on disk, LPIPS of held-out views and of the
nearest-input-view baseline); this file only runs it, renders the figures (image grid, turntable GIF) and
prints the table."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from torch.nn.functional import interpolate

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # scripts/ run as files: make the suite's packages importable
    sys.path.insert(0, str(ROOT))

from cpu_threads import fastest_threads  # noqa: E402

from lact.geometry import orbit_cameras  # noqa: E402
from lact.models.nvs import NVSConfig, NVSNet  # noqa: E402
from lact.nn import compile_blocks  # noqa: E402
from modules.ema import averaged_weights  # noqa: E402
from modules.nvs import nearest_input_view  # noqa: E402
from modules.nvs_outputs import image_grid, save_gif, save_png, to_uint8  # noqa: E402

METHODS = ("model", "nearest_input_view")


def run(cmd: list[str], threads: int | None = None) -> None:
    """Run a command from the repository root (OMP_NUM_THREADS=threads when given); fail when it fails."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """`config` (a parsed YAML config) with the dotted `--a.b.c=value` train.py options of `overrides` set in
    it (values parsed as YAML), so that what a script measures or generates before `train.py` runs (the step
    time of the network, the data splits) is that of the variant the overrides ask for. Options in another
    form (`--a.b.c value`) are not read here; they still reach train.py."""
    for option in overrides:
        key, sep, value = option.removeprefix("--").partition("=")
        if not sep or not option.startswith("--"):
            continue
        *parents, name = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SystemExit(f"--override {option}: {part!r} is not a section of the config")
        node[name] = yaml.safe_load(value)
    return config


def add_run_options(parser, default_out: str, commands: str) -> None:
    """The options both NVS scripts take: time limit, threads, evaluation only, output folder and train.py
    options for `commands` (e.g. "fit and test"). `run_folder(args, default_out)` applies --out."""
    parser.add_argument("--minutes", type=float, default=10.0, help="training time limit (default 10)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: the faster of 1 and all cores)"
    )
    parser.add_argument("--skip-train", action="store_true", help="evaluate the existing checkpoint only")
    parser.add_argument(
        "--out",
        default=default_out,
        help=f"output folder (default {default_out}); e.g. to run two variants side by side",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help=f"a train.py option for {commands}, e.g. --override=--model.init_args.net.colour_values=true",
    )


def run_folder(args, default_out: str) -> Path:
    """The output folder of `args.out`. Every path of the configs derives from the run directory, so another
    folder than the default moves it there (an override put first, so the user's own ones still win)."""
    out = ROOT / args.out
    if args.out != default_out:
        args.override.insert(0, f"--trainer.default_root_dir={out / 'run'}")
    return out


def fit_within(config: str, minutes: float, step_seconds: float, threads: int, extra: list[str]) -> None:
    """`train.py fit --config config` capped at `minutes` of wall time. With the config's `optim.schedule:
    time` the cosine runs over those minutes, however fast the steps are. Otherwise (steps) it is sized from
    the measured step time, keeping a fifth of the budget for the optimizer, data loading and validation:
    on a machine shared with other jobs steps get slower than measured and max_time (the hard cap) ends
    training before the schedule; on a quiet one the schedule ends before the time does."""
    limit = time.strftime("%H:%M:%S", time.gmtime(round(minutes * 60)))
    optim = yaml.safe_load((ROOT / config).read_text())["model"]["init_args"].get("optim", {})
    schedule = optim.get("schedule", "steps")
    for option in extra:  # a command-line override wins, as in train.py
        if option.startswith("--model.init_args.optim.schedule="):
            schedule = option.split("=", 1)[1]
    if schedule == "time":
        steps = -1  # only the time ends the run, and the learning rate anneals over it
        print(f"training for {minutes:g} minutes (the cosine runs over the time)", flush=True)
    else:
        steps = max(100, int(0.8 * minutes * 60 / step_seconds))
        print(f"training for min({steps} steps, {minutes:g} minutes)", flush=True)
    start = time.time()
    limits = [f"--trainer.max_time=00:{limit}", f"--trainer.max_steps={steps}"]
    run([sys.executable, "train.py", "fit", "--config", config, *limits, *extra], threads)
    print(f"fit took {(time.time() - start) / 60:.1f} min (start-up, data loading and validation included)")


def load_net(checkpoint: Path) -> tuple[NVSNet, int]:
    """(the network of a Lightning checkpoint in eval mode, its global step), loaded with weights_only=True;
    with the EMA callback's averaged weights when the run had one (what `train.py test` and predict use)."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    net = NVSNet(NVSConfig(**ckpt["hyper_parameters"]["net"]))
    weights = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict({**weights, **(averaged_weights(ckpt) or {})})
    return net.eval(), int(ckpt["global_step"])


def step_time(net: NVSNet, data_args: dict, threads: int) -> float:
    """Seconds per training step (forward and backward) of `net` on a random batch shaped like `data_args`'."""
    torch.set_num_threads(threads)
    batch, inputs, targets = (data_args[k] for k in ("batch_size", "num_input_views", "num_target_views"))
    size = data_args["image_size"]
    views = inputs + targets
    intrinsics = torch.tensor([size, size, size / 2, size / 2]).expand(batch, views, 4)
    w2c = torch.eye(4).repeat(batch, views, 1, 1)
    w2c[..., 2, 3] = 2.7  # the world origin 2.7 units in front of the camera
    images = torch.rand(batch, inputs, 3, size, size)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        pred = net(images, intrinsics[:, :inputs], w2c[:, :inputs], intrinsics[:, inputs:], w2c[:, inputs:])
        pred.square().mean().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])  # the first steps pay one-off allocations (and compilation)


def pick_threads(requested: int, config: dict) -> tuple[int, float]:
    """(threads, seconds per training step) for the config's model and batch (cpu_threads.fastest_threads)."""
    net = NVSNet(NVSConfig(**config["model"]["init_args"]["net"]))
    if net.config.compile:  # time the step training will run (its compile time is not budgeted here)
        compile_blocks(net.blocks)
    return fastest_threads(requested, lambda threads: step_time(net, config["data"]["init_args"], threads))


def test_scores(config: str, checkpoint: Path, overrides: list[str]) -> dict:
    """`train.py test` of `checkpoint` (in this process) -> {"model": {"psnr", "ssim"[, "lpips"]},
    "nearest_input_view": {...}}, the metrics NVSModule.test_step logs (and Lightning prints)."""
    import train

    args = ["test", "--config", config, f"--ckpt_path={checkpoint}", "--trainer.logger=false", *overrides]
    metrics = {k: float(v) for k, v in train.main(args).trainer.callback_metrics.items()}
    return {
        name: {
            m: metrics[f"test/{m}{suffix}"]
            for m in ("psnr", "ssim", "lpips")
            if f"test/{m}{suffix}" in metrics
        }
        for name, suffix in zip(METHODS, ("", "_nearest_view"))
    }


@torch.no_grad()
def render(net: NVSNet, loader) -> list[dict]:
    """The batches of `loader` with the model's `prediction` and the baseline's `nearest` [B, Vt, 3, H, W]
    (for the figures; the scores come from `test_scores`)."""
    batches = []
    for batch in loader:
        pred = net(
            batch["input_images"], batch["input_intrinsics"], batch["input_w2c"],
            batch["target_intrinsics"], batch["target_w2c"],
        )  # fmt: skip
        nearest = nearest_input_view(batch["input_images"], batch["input_w2c"], batch["target_w2c"])
        batches.append({**batch, "prediction": pred, "nearest": nearest})
    return batches


def write_grid(batch: dict, path: Path, scenes: int = 6, scale: int = 4) -> None:
    """Rows of scenes: input views | ground truth | prediction | nearest input view, upscaled `scale` times."""
    grid = image_grid(
        batch["input_images"][:scenes],
        batch["target_images"][:scenes],
        torch.cat([batch["prediction"][:scenes], batch["nearest"][:scenes]], dim=1),
    )
    save_png(interpolate(grid[None], scale_factor=scale, mode="nearest")[0], path)


@torch.no_grad()
def write_turntable(
    net: NVSNet, batch: dict, path: Path, scenes: int = 3, frames: int = 36, scale: int = 4
) -> None:
    """Reconstruct each of the first `scenes` scenes once from its input views, render `frames` cameras on an
    orbit around it, and tile the scenes side by side in one GIF."""
    tiles = []
    for i in range(min(scenes, len(batch["key"]))):
        one = slice(i, i + 1)
        state = net.reconstruct(
            batch["input_images"][one], batch["input_intrinsics"][one], batch["input_w2c"][one]
        )
        orbit = orbit_cameras(batch["input_w2c"][i], frames)[None]
        tiles.append(net.render(state, batch["input_intrinsics"][one, :1].expand(1, frames, 4), orbit)[0])
    video = interpolate(torch.cat(tiles, dim=-1), scale_factor=scale, mode="nearest")  # [frames, 3, H, W']
    save_gif(to_uint8(video).numpy(), path, fps=12)


def print_summary(summary: dict, title: str) -> None:
    gain = summary["model"]["psnr"] - summary["nearest_input_view"]["psnr"]
    print(f"\n{title}")
    lpips = "lpips" in summary["model"]
    print(
        "| method | PSNR (dB) | SSIM |"
        + (" LPIPS |" if lpips else "")
        + "\n|---|---:|---:|"
        + ("---:|" if lpips else "")
    )
    for name in METHODS:
        row = f"| {name.replace('_', ' ')} | {summary[name]['psnr']:.2f} | {summary[name]['ssim']:.3f} |"
        print(row + (f" {summary[name]['lpips']:.3f} |" if lpips else ""))
    print(f"model - nearest input view: {gain:+.2f} dB PSNR")
