"""Video diffusion: does the LaCT branch carry memory past the attention window, and what does it cost?

    .venv/bin/python benchmarks/video_memory.py --only quality --steps 1500 --radius 0.25 0.35 --tag NAME
    .venv/bin/python benchmarks/video_memory.py --only quality ... --variant full_attention --result FILE
    .venv/bin/python benchmarks/video_memory.py --only quality ... --variants --reference A --reference B
    .venv/bin/python benchmarks/video_memory.py --only quality ... --net '{"lact_qkv": "own"}' --optim '{"lact_lr_scale": 5}'
    .venv/bin/python benchmarks/video_memory.py --only cost --chunks 4 8 16 32 64

quality: the same network (lact.models.video.VideoNet, --layers blocks, window 1 chunk) trained for the same
steps on the same clips with the same noise, in concurrent one-thread processes, as `--variants`: "lact"
(LaCT + window attention), "window_only" (`net.lact: null`) and "full_attention" (no LaCT, every earlier
chunk in the window: the control that shows what direct access to the past buys with the same training). All
start from the same weights (the others take the LaCT model's shared weights; with the zero output gate all
compute the same function at step 0). Then the held-out flow MSE at noise levels t' = 0.3/0.6/0.9 (the task's
validation levels) and 1.0 (the same seeded noise for every model), per chunk, on chunk 0 (no past), on
"re-entry" chunks and on the other chunks past the window. Clips (datamodules/videos.py, motions=("wrap",),
colors="random", shape radius --radius): one shape of a random RGB colour crossing the frame, leaving it and
re-entering after 3-8 frames out of view. A re-entry chunk shows the shape while every chunk the attention
path reaches (layers x window chunks back) does not, so its colour is known only from older chunks. The LaCT
run logs its output gate (mean |silu(gate)|, 0 at init) and the fast weights' update ratio. Every run is
deterministic given its settings, so a `--variant` run written to `--result` can stand in (`--reference`)
for the same variant of a later comparison. Writes benchmarks/results/video_memory[_TAG].json and .png.

cost: a training step (forward, backward, AdamW) of LaCT + window attention (window 1) against full block
attention without LaCT (window = chunks - 1: every chunk sees all clean chunks before it) as the number of
chunks doubles, each in a fresh subprocess: peak resident memory of the first step above the model and
inputs, time as the mean of the next two steps.
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
    num_layers=1,
    num_heads=4,
    ffn_dim=192,
    window=1,
    freq_dim=64,
    lact=dict(heads=2, inter_multi=2.0, base_lr=1e-2, momentum=True, output_gate="zero"),
)
# one shape per clip, random RGB colour, crossing the frame and re-entering after 3-8 frames out of view
CLIP = dict(num_frames=24, height=16, width=16, num_objects=(1, 1), motions=("wrap",), colors="random")
# noise levels of the held-out measure: the task's fixed levels, then 1.0 (pure noise: the model supplies
# the whole content of the chunk, so what it recalls is all that separates the two models there)
LEVELS = (0.3, 0.6, 0.9, 1.0)
# lact: LaCT + window attention; window_only: the LaCT branch off; full_attention: no LaCT, window = every
# earlier chunk (the control: the same network when nothing is out of the attention path's reach)
VARIANTS = ("lact", "window_only", "full_attention")
# settings a window_only or full_attention run depends on: a --reference run must agree on them
SHARED = ("steps", "batch", "lr", "radius", "seed", "optim", "net", "momentum")  # momentum: the start
# OptimConfig fields that act on LaCT parameters only: a run without LaCT does not depend on them
LACT_OPTIM = ("lact_lr_scale",)


def shared_value(run: dict, key: str):
    """A SHARED setting of a run as compared between runs (LaCT-only optimiser fields left out)."""
    value = run.get(key)
    if key == "optim" and value is not None:
        value = {k: v for k, v in value.items() if k not in LACT_OPTIM}
    return json.dumps(value)


def clips(count: int, seed: int, batch: int, radius) -> list[dict]:
    import numpy as np
    import torch

    from datamodules.videos import generate_video

    out = []
    for b in range(count):
        videos = [generate_video([seed, b, i], **CLIP, radius=tuple(radius)) for i in range(batch)]
        keys = [f"s{seed}_{b}_{i}" for i in range(batch)]
        out.append(
            {
                "frames": torch.from_numpy(np.stack([v["frames"] for v in videos])),
                "key": keys,
                "recall": torch.from_numpy(np.stack([recall_chunks(v) for v in videos])),
            }
        )
    return out


def recall_chunks(video: dict):
    """Bool [chunks]: chunk c shows a shape that is fully out of view in every frame the attention path of
    chunk c reaches (clean chunks c - num_layers * window .. c - 1) but was in view before them, so its colour
    is known only from older chunks."""
    import numpy as np

    frames, reach = NET["frames_per_chunk"], NET["num_layers"] * NET["window"]
    tracks, radii, extent = video["tracks"], video["radii"], video["extent"]
    visible = ~((tracks < -radii[:, None, None]) | (tracks > extent + radii[:, None, None])).any(-1)  # [K, T]
    visible = visible.reshape(len(radii), -1, frames).any(-1)  # [K, chunks]
    flags = np.zeros(visible.shape[1], dtype=bool)
    for c in range(reach + 1, visible.shape[1]):
        window = visible[:, c - reach : c].any(-1)
        older = visible[:, : c - reach].any(-1)
        flags[c] = (visible[:, c] & ~window & older).any()
    return flags


def gate_probe(module, batch: dict) -> dict:
    """Mean |silu(gate)| of the LaCT output gate over a batch's tokens and the fast weights' update ratio
    (||W_after - W_0|| / ||W_0||), one no-grad forward."""
    import torch
    import torch.nn.functional as F

    from modules.video import frames_to_latents

    layers = list(module.lact_layers().values())
    if not layers:
        return {}
    seen = []
    hooks = [
        layer.gate_proj.register_forward_hook(lambda m, i, o: seen.append(F.silu(o).abs().mean()))
        for layer in layers
    ]
    for layer in layers:
        layer.record_stats = True
    x0 = frames_to_latents(batch["frames"])
    with torch.no_grad():
        noise, t, _ = module.draw_noise(x0, None)
        module.flow_loss(x0, t, noise, None)
    for hook in hooks:
        hook.remove()
    ratios = [float(layer.stats["update_ratio"]) for layer in layers]
    for layer in layers:
        layer.record_stats, layer.stats = False, {}
    return {"gate": float(torch.stack(seen).mean()), "update_ratio": sum(ratios) / len(ratios)}


def held_out(module, val: list[dict]) -> dict:
    """Flow MSE [levels, clips, chunks] at each of LEVELS (the same seeded noise for every model) and the
    re-entry flags [clips, chunks]."""
    import torch

    module.eval()
    losses, recall = [], []
    with torch.no_grad():
        for b, batch in enumerate(val):
            x0 = module.latents(batch)
            generator = torch.Generator().manual_seed(b)
            rows = []
            for level in LEVELS:
                noise = torch.randn(x0.shape, generator=generator)
                t = torch.full((x0.shape[0], module.net.cfg.num_chunks), level)
                rows.append(module.flow_loss(x0, t, noise, None))
            losses.append(torch.stack(rows))
            recall.append(batch["recall"])
    return {"losses": torch.cat(losses, dim=1), "recall": torch.cat(recall)}


def summarise(losses, recall) -> dict:
    """Per-chunk curve (mean over the task's fixed levels 0.3/0.6/0.9) and, per level, the mean loss on
    chunk 0 (no past), on re-entry chunks and on the other chunks past the attention path."""
    reach = NET["num_layers"] * NET["window"]
    fixed = [i for i, level in enumerate(LEVELS) if level < 1.0]
    out = {"chunks": losses[fixed].mean(0).mean(0).tolist(), "levels": {}}
    other = ~recall
    other[:, : reach + 1] = False
    for i, level in enumerate(LEVELS):
        out["levels"][str(level)] = {
            "chunk0": float(losses[i, :, 0].mean()),
            "reentry": float(losses[i][recall].mean()),
            "other_past": float(losses[i][other].mean()),
        }
    out["reentry_fixed"] = float(losses[fixed][:, recall].mean())
    out["other_past_fixed"] = float(losses[fixed][:, other].mean())
    out["num_reentry"], out["num_past"] = int(recall.sum()), int(recall[:, reach + 1 :].numel())
    return out


def build(lact: bool, args, window: int | None = None):
    import torch

    from modules.video import VideoModule

    lact_cfg = {**NET["lact"], "base_lr": args.base_lr, "momentum": not args.no_momentum}
    net = {**NET, "lact": lact_cfg if lact else None, "window": window or NET["window"]}
    torch.manual_seed(args.seed)
    optim = dict(lr=args.lr, warmup_steps=50, total_steps=args.steps, **json.loads(args.optim))
    return VideoModule(net=net, optim=optim, num_samples=0, seed=args.seed)


def train_variant(variant: str, args) -> dict:
    """Train one variant (from the common start) and measure it on the held-out clips."""
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader

    lact_model = build(True, args)
    if variant == "lact":
        module = lact_model
    else:  # the same start: every weight the LaCT model shares; with the zero gate the same function
        window = NET["num_frames"] // NET["frames_per_chunk"] - 1 if variant == "full_attention" else None
        module = build(False, args, window)
        module.load_state_dict(
            {k: v for k, v in lact_model.state_dict().items() if ".lact." not in k}, strict=True
        )
    train = clips(args.steps, seed=args.seed, batch=args.batch, radius=args.radius)  # a fresh batch a step
    val = clips(8, seed=10_000 + args.seed, batch=32, radius=args.radius)
    trace, probe_every = [], max(args.steps // 8, 1)

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % probe_every == 0 or step == args.steps:
                row = {"step": step, "loss": float(outputs["loss"]), **gate_probe(pl_module, batch)}
                trace.append(row)
                print(variant, json.dumps(row), flush=True)

    trainer = Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Probe()],
    )
    start = time.perf_counter()
    trainer.fit(module, DataLoader(train, batch_size=None))
    seconds = time.perf_counter() - start
    measured = held_out(module, val)
    return {**summarise(measured["losses"], measured["recall"]), "train_seconds": seconds, "trace": trace}


def settings(args) -> dict:
    out = {"steps": args.steps, "batch": args.batch, "base_lr": args.base_lr, "lr": args.lr}
    out.update(radius=list(args.radius), seed=args.seed, optim=json.loads(args.optim), layers=args.layers)
    out.update(momentum=not args.no_momentum, levels=LEVELS, net=NET, clip=CLIP)
    return out


def quality(args) -> dict:
    """The chosen variants in concurrent processes (same steps, same clips and noise, sharing the load);
    variants taken from a --reference results file instead must have been run with the same SHARED settings
    (every run is deterministic given them, whatever the load)."""
    import tempfile

    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = "video_memory" + (f"_{args.tag}" if args.tag else "")
    results, sources = {}, {}
    mine = settings(args)
    for reference_path in args.reference or ():
        reference = json.loads(Path(reference_path).read_text())
        differ = [k for k in SHARED if shared_value(reference, k) != shared_value(mine, k)]
        if differ:
            raise SystemExit(f"--reference {reference_path} was run with other {differ}")
        for variant in VARIANTS:
            if variant not in reference or variant in args.variants or variant in results:
                continue
            lact_settings = ("base_lr", "momentum", "optim")  # optim in full: lact_lr_scale included
            if variant == "lact" and any(reference.get(k) != mine[k] for k in lact_settings):
                continue  # another LaCT setting: not this run's
            results[variant], sources[variant] = reference[variant], reference_path
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for variant in args.variants:
            path = str(Path(tmp) / f"{variant}.json")
            command = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--result", path]
            procs[variant] = (subprocess.Popen(command, cwd=ROOT), path)
        for variant, (proc, path) in procs.items():
            if proc.wait():
                raise RuntimeError(f"the {variant} run failed (exit {proc.returncode})")
            results[variant] = json.loads(Path(path).read_text())[variant]
    if "window_only" not in results:
        raise SystemExit("no window_only results: run that variant or pass a --reference that has it")
    window = results["window_only"]
    others = [v for v in VARIANTS if v in results and v != "window_only"]
    reach = NET["num_layers"] * NET["window"]
    print(
        f"\nheld-out flow MSE after {args.steps} steps (batch {args.batch}), {NET['num_layers']} block(s), "
        f"window {NET['window']} chunk, radius {args.radius}, LaCT base_lr {args.base_lr:g}, lr {args.lr:g}"
    )
    head = " | ".join(f"{v} | ratio" for v in others)
    print(f"| chunk (mean of 0.3/0.6/0.9) | window_only | {head} |")
    print("|---:|---:|" + "---:|---:|" * len(others))
    for i, w in enumerate(window["chunks"]):
        cells = " | ".join(
            f"{results[v]['chunks'][i]:.4f} | {results[v]['chunks'][i] / w:.3f}" for v in others
        )
        print(f"| {i} | {w:.4f} | {cells} |")
    far = slice(reach + 1, None)

    def mean(v):
        return sum(results[v]["chunks"][far]) / len(results[v]["chunks"][far])

    cells = " | ".join(f"{mean(v):.4f} | {mean(v) / mean('window_only'):.3f}" for v in others)
    print(f"| mean of chunks {reach + 1}+ | {mean('window_only'):.4f} | {cells} |")
    print(f"\n| noise level | where | window_only | {head} |")
    print("|---:|---|---:|" + "---:|---:|" * len(others))
    for level in window["levels"]:
        for key in ("chunk0", "reentry", "other_past"):
            w = window["levels"][level][key]
            cells = " | ".join(
                f"{results[v]['levels'][level][key]:.4f} | {results[v]['levels'][level][key] / w:.3f}"
                for v in others
            )
            print(f"| {level} | {key} | {w:.4f} | {cells} |")
    print(f"re-entry chunks: {window['num_reentry']} of {window['num_past']} past the window")
    for variant, r in results.items():
        source = f" (from {sources[variant]})" if variant in sources else ""
        print(f"{variant}: training {r['train_seconds']:.0f} s{source}")
    payload = {**settings(args), "sources": sources}
    (out / f"{name}.json").write_text(json.dumps({**payload, **results}, indent=1))
    plot(results, args, out / f"{name}.png")
    return results


def plot(results: dict, args, path: Path) -> None:
    """Left: the per-chunk curve of every variant. Right, one panel per variant against window_only: the loss
    ratio at each noise level on chunk 0, on re-entry chunks and on the other chunks past the window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = results["window_only"]
    others = [v for v in VARIANTS if v in results and v != "window_only"]
    reach = NET["num_layers"] * NET["window"]
    fig, axes = plt.subplots(1, 1 + len(others), figsize=(5 + 4.5 * len(others), 3.6), squeeze=False)
    ax = axes[0][0]
    for variant, style in zip(VARIANTS, ("o-", "s--", "^:")):
        if variant in results:
            ax.plot(results[variant]["chunks"], style, label=variant)
    ax.axvline(reach + 0.5, color="grey", lw=0.8)
    ax.set_xlabel(f"chunk ({NET['frames_per_chunk']} frames each)")
    ax.set_ylabel("flow MSE (mean of t' 0.3/0.6/0.9)")
    ax.set_title(f"{args.steps} steps, window {NET['window']}, {NET['num_layers']} block(s)")
    ax.legend(fontsize=8)
    keys = ("chunk0", "reentry", "other_past")
    labels = ("chunk 0 (no past)", "re-entry chunks", "other chunks past window")
    levels = list(window["levels"])
    width = 0.8 / len(keys)
    for bx, variant in zip(axes[0][1:], others):
        ratios = {
            key: [results[variant]["levels"][lv][key] / window["levels"][lv][key] for lv in levels]
            for key in keys
        }
        for k, (key, label) in enumerate(zip(keys, labels)):
            bx.bar([i + width * k for i in range(len(levels))], ratios[key], width, label=label)
        bx.axhline(1.0, color="grey", lw=0.8)
        bx.set_xticks([i + width for i in range(len(levels))], [f"t' = {lv}" for lv in levels])
        bx.set_ylabel(f"loss ratio {variant} / window_only")
        lo = min(min(r) for r in ratios.values())
        hi = max(max(r) for r in ratios.values())
        bx.set_ylim(min(0.95, lo - 0.02), max(1.03, hi + 0.02))
        bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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

    def step():
        optimizer.zero_grad(set_to_none=True)
        module.flow_loss(x0, t, noise, None).mean().backward()
        optimizer.step()

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # the first step: its peak memory (a later step's peak stays under the high-water mark it set)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for _ in range(2):  # warm steps: the time without first-call overheads
        step()
    seconds = (time.perf_counter() - start) / 2
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
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--base-lr", type=float, default=1e-2, help="LaCT inner learning rate at init")
    parser.add_argument("--no-momentum", action="store_true", help="LaCT without momentum")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument("--optim", default="{}", help="more OptimConfig fields, as JSON")
    parser.add_argument(
        "--net",
        default="{}",
        help='VideoConfig fields over the probe network, as JSON (a "lact" dict updates the LaCT fields), e.g. '
        '\'{"lact_qkv": "own"}\'',
    )
    parser.add_argument("--radius", type=float, nargs=2, default=[0.09, 0.18], help="shape radius range")
    parser.add_argument(
        "--layers", type=int, default=1, help="blocks (the attention path reaches layers x window)"
    )
    parser.add_argument("--seed", type=int, default=0, help="initialisation, clips and noise")
    parser.add_argument("--tag", default="", help="results go to benchmarks/results/video_memory_<tag>.*")
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=["lact", "window_only"])
    parser.add_argument(
        "--reference",
        action="append",
        help="a results JSON (repeatable) whose runs of variants not in --variants are reused; it must share "
        "the settings those runs depend on (and base_lr, momentum for lact)",
    )
    parser.add_argument(
        "--variant", choices=VARIANTS, help="train this one variant only and write it to --result"
    )
    parser.add_argument("--result", help="the JSON file of a --variant run (usable as a --reference)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    NET["num_layers"] = args.layers
    for key, value in json.loads(args.net).items():
        NET[key] = {**NET[key], **value} if key == "lact" else value
    if args.variant is not None:
        # with the settings, so that the file can serve as a --reference
        result = {**settings(args), args.variant: train_variant(args.variant, args)}
        Path(args.result).write_text(json.dumps(result))
        return
    if args.only in (None, "quality"):
        quality(args)
    if args.only in (None, "cost"):
        cost(args.chunks)


if __name__ == "__main__":
    main()
