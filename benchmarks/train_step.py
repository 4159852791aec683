"""Training-step throughput, eager against `net.compile: true` (torch.compile per block), on the CPU.

    .venv/bin/python benchmarks/train_step.py                      # lm/tiny, nvs/tiny, nvs/demo, video/tiny
    .venv/bin/python benchmarks/train_step.py --configs nvs/demo --rounds 8 --steps 5
    .venv/bin/python benchmarks/train_step.py --configs lm/mid --rounds 3 --steps 2   # 27.5M parameters

A step is what the trainer runs per batch without data loading and logging: the task's forward and loss,
backward, and the AdamW step of `configure_optimizers`, on a random batch of the config's shapes (LM:
data.batch_size x data.seq_len tokens; NVS: data.batch_size scenes of num_input_views + num_target_views
views at data.image_size; video: data.batch_size clips of net.num_frames latent frames, with noise and flow
times drawn once, so that every step of both sides computes the same per-chunk flow loss). Compilation goes through the task's own `configure_model`, as in training.

Both modules are built from the same seed. The compiled one's first steps (until a step is within 2x of the
eager step time, at most 3) are its compile time, reported separately. Then eager and compiled alternate
`--rounds` times, `--steps` steps each, so that load from other jobs on a shared machine hits both alike;
each side's time is its median round. Ratios are compiled / eager from this one run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lact.geometry import look_at  # noqa: E402
from modules.lm import LMModule  # noqa: E402
from modules.nvs import NVSModule  # noqa: E402
from modules.task import OptimConfig  # noqa: E402
from modules.video import VideoModule  # noqa: E402

TASKS = {"lm": LMModule, "nvs": NVSModule, "video": VideoModule}
UNITS = {"lm": "tokens", "nvs": "views", "video": "frames"}


def load(name: str) -> tuple[str, dict, dict]:
    """configs/<name>.yaml -> (task, model init args, data init args)."""
    spec = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    task = name.split("/")[0]
    if task not in TASKS:
        raise SystemExit(f"--configs {name}: expected one of {sorted(TASKS)} / <config>, e.g. lm/tiny")
    return task, spec["model"]["init_args"], spec["data"]["init_args"]


def make_batch(task: str, module, data: dict, generator: torch.Generator) -> tuple[dict, int]:
    """A random batch of the config's shapes and how many tokens (LM), views (NVS) or frames (video) it holds."""
    batch = data["batch_size"]
    if task == "video":
        cfg = module.net.cfg
        shape = (batch, cfg.in_channels, cfg.num_frames, *cfg.latent_size)
        latents = torch.randn(shape, generator=generator)
        noise = torch.randn(shape, generator=generator)
        t = torch.rand(batch, cfg.num_chunks, generator=generator)
        return {"latents": latents, "noise": noise, "t": t}, batch * cfg.num_frames
    if task == "lm":
        length, vocab = data["seq_len"], module.net.cfg.vocab_size
        tokens = torch.randint(0, vocab, (batch, length + 1), generator=generator)
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}, batch * length
    inputs, targets, size = data["num_input_views"], data["num_target_views"], data["image_size"]
    views = inputs + targets
    angle = torch.rand(batch, views, generator=generator) * 2 * math.pi
    eyes = torch.stack([2.5 * angle.cos(), 2.5 * angle.sin(), torch.full_like(angle, 0.8)], dim=-1)
    w2c = look_at(eyes, torch.zeros_like(eyes), torch.tensor([0.0, 0.0, 1.0]).expand_as(eyes))
    intrinsics = torch.tensor([size * 1.1, size * 1.1, size / 2, size / 2]).expand(batch, views, 4)
    images = torch.rand(batch, views, 3, size, size, generator=generator)
    split = {"input": slice(0, inputs), "target": slice(inputs, views)}
    out = {}
    for prefix, part in split.items():
        out[f"{prefix}_images"] = images[:, part]
        out[f"{prefix}_intrinsics"] = intrinsics[:, part]
        out[f"{prefix}_w2c"] = w2c[:, part]
    return out, batch * views


def loss_of(task: str, module, batch: dict) -> torch.Tensor:
    """The training loss without Lightning's logging (the same forward and loss as training_step)."""
    if task == "lm":
        losses, scored, _ = module.token_losses(batch)
        return losses.sum() / scored.sum().clamp(min=1)
    if task == "video":
        return module.flow_loss(batch["latents"], batch["t"], batch["noise"], None).mean()
    return torch.nn.functional.mse_loss(module(batch).float(), batch["target_images"].float())


class Stepper:
    """A task module with its optimizer; `step()` runs one training step and returns its seconds."""

    def __init__(self, task: str, model_args: dict, compile: bool, batch: dict):
        torch.manual_seed(0)
        net = {**model_args["net"], "compile": compile}
        optim = {**model_args.get("optim", {}), "total_steps": 10**6}
        self.task, self.batch = task, batch
        self.module = TASKS[task](net=net, optim=OptimConfig(**optim))
        self.module.configure_model()  # compiles each block when net.compile
        self.optimizer = self.module.configure_optimizers()["optimizer"]

    def step(self) -> float:
        start = time.perf_counter()
        loss = loss_of(self.task, self.module, self.batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def bench(name: str, rounds: int, steps: int) -> dict:
    task, model_args, data = load(name)
    torch._dynamo.reset()
    probe = TASKS[task](net=model_args["net"])
    batch, items = make_batch(task, probe, data, torch.Generator().manual_seed(0))
    eager = Stepper(task, model_args, False, batch)
    compiled = Stepper(task, model_args, True, batch)
    eager_first = [eager.step() for _ in range(2)][-1]
    compile_s, warm = 0.0, 0
    while warm < 3:
        seconds = compiled.step()
        compile_s += seconds
        warm += 1
        if seconds < 2 * eager_first:
            break
    times = {"eager": [], "compiled": []}
    for _ in range(rounds):
        for label, stepper in (("eager", eager), ("compiled", compiled)):
            times[label].append(sum(stepper.step() for _ in range(steps)) / steps)
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {
        "config": name,
        "unit": UNITS[task],
        "items": items,
        "eager_s": eager_s,
        "compiled_s": compiled_s,
        "compile_s": compile_s,
        "warm_steps": warm,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["lm/tiny", "nvs/tiny", "nvs/demo", "video/tiny"])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of eager and compiled")
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, {args.threads} thread(s), fp32; median of {args.rounds} rounds")
    print("| config | eager steps/s | compiled steps/s | eager items/s | compiled items/s | compiled / eager "
          "| compile s (warm-up steps) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.configs:
        r = bench(name, args.rounds, args.steps)
        unit = r["unit"]
        print(
            f"| {r['config']} | {1 / r['eager_s']:.3g} | {1 / r['compiled_s']:.3g} "
            f"| {r['items'] / r['eager_s']:,.0f} {unit} | {r['items'] / r['compiled_s']:,.0f} {unit} "
            f"| **{r['eager_s'] / r['compiled_s']:.2f}x** | {r['compile_s']:.0f} ({r['warm_steps']}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
