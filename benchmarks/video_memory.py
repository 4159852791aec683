"""Video diffusion: does the LaCT branch carry memory past the attention window, and what does it cost?

    .venv/bin/python benchmarks/video_memory.py                     # both parts, one CPU thread
    .venv/bin/python benchmarks/video_memory.py --only quality --steps 1500 --base-lr 1e-2
    .venv/bin/python benchmarks/video_memory.py --only cost --chunks 4 8 16 32

quality: the same network (lact.models.video.VideoNet, 1 block, window 1 chunk) trained for the same steps on
the same clips with and without its LaCT branch (`net.lact: null` = window attention only), with the task's
own loss (modules/video.py), from the same start (the window-only model takes the LaCT model's shared weights;
with the zero output gate both compute the same function at step 0); then the validation flow MSE at fixed
noise levels 0.3/0.6/0.9 (the same seeded noise for both) on held-out clips, per chunk and on "re-entry"
chunks. Clips (datamodules/videos.py, motions=("wrap",), colors="random"): one shape of a random RGB colour
crossing the frame, leaving it and re-entering after 3-8 frames out of view. With 1 block and a window of 1
chunk, the attention path of chunk c reaches clean chunk c - 1 only; a re-entry chunk shows the shape while
chunk c - 1 does not, so its colour is known only through the fast weights. The LaCT run logs its output
gate (mean |silu(gate)|, 0 at init) and the fast weights' update ratio during training. Writes
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
    num_layers=1,
    num_heads=4,
    ffn_dim=192,
    window=1,
    freq_dim=64,
    lact=dict(heads=2, inter_multi=2.0, base_lr=1e-2, momentum=True, output_gate="zero"),
)
# one shape per clip, random RGB colour, crossing the frame and re-entering after 3-8 frames out of view
CLIP = dict(num_frames=24, height=16, width=16, num_objects=(1, 1), motions=("wrap",), colors="random")


def clips(count: int, seed: int, batch: int) -> list[dict]:
    import numpy as np
    import torch

    from datamodules.videos import generate_video

    out = []
    for b in range(count):
        videos = [generate_video([seed, b, i], **CLIP) for i in range(batch)]
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


def train_and_validate(module, steps: int, train: list[dict], val: list[dict], probe_every: int) -> dict:
    import torch
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader

    trace = []

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % probe_every == 0 or step == steps:
                row = {"step": step, "loss": float(outputs["loss"]), **gate_probe(pl_module, batch)}
                trace.append(row)
                print(json.dumps(row), flush=True)

    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
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
    module.eval()
    losses, recall = [], []
    with torch.no_grad():
        for b, batch in enumerate(val):  # the validation MSE of modules/video.py, kept per clip
            x0 = module.latents(batch)
            generator = torch.Generator().manual_seed(b)
            per_chunk = 0
            for level in module.hparams.val_noise_levels:
                noise = torch.randn(x0.shape, generator=generator)
                t = torch.full((x0.shape[0], NET["num_frames"] // NET["frames_per_chunk"]), level)
                per_chunk = per_chunk + module.flow_loss(x0, t, noise, None)
            losses.append(per_chunk / len(module.hparams.val_noise_levels))
            recall.append(batch["recall"])
    losses, recall = torch.cat(losses), torch.cat(recall)  # [clips, chunks]
    reach = NET["num_layers"] * NET["window"]
    past = losses[:, reach + 1 :]
    return {
        "chunks": losses.mean(0).tolist(),
        "recall_chunks": float(losses[recall].mean()),
        "other_chunks_past_window": float(past[~recall[:, reach + 1 :]].mean()),
        "num_recall": int(recall.sum()),
        "num_past": int(past.numel()),
        "train_seconds": seconds,
        "trace": trace,
    }


def build(lact: bool, steps: int, base_lr: float, lr: float):
    import torch

    from modules.video import VideoModule

    net = {**NET, "lact": {**NET["lact"], "base_lr": base_lr} if lact else None}
    torch.manual_seed(0)
    return VideoModule(net=net, optim=dict(lr=lr, warmup_steps=50, total_steps=steps), num_samples=0)


def quality(steps: int, batch: int, base_lr: float, lr: float) -> dict:
    train = clips(steps, seed=0, batch=batch)  # a fresh batch every step
    val = clips(8, seed=1, batch=32)
    lact_model, window_model = build(True, steps, base_lr, lr), build(False, steps, base_lr, lr)
    # the same start: the window-only model takes every shared weight of the LaCT one; with the zero gate
    # both compute the same function at step 0 and differ only by what the LaCT branch learns
    missing = window_model.load_state_dict(
        {k: v for k, v in lact_model.state_dict().items() if ".lact." not in k}, strict=True
    )
    assert not missing.missing_keys and not missing.unexpected_keys
    results = {}
    for name, module in (("lact", lact_model), ("window_only", window_model)):
        print(f"-- training {name}", flush=True)
        results[name] = train_and_validate(module, steps, train, val, probe_every=max(steps // 8, 1))
    lact, window = results["lact"]["chunks"], results["window_only"]["chunks"]
    reach = NET["num_layers"] * NET["window"]
    print(
        f"\nper-chunk validation loss after {steps} steps (batch {batch}), {NET['num_layers']} block(s), "
        f"window {NET['window']} chunk, LaCT base_lr {base_lr:g}"
    )
    print("| chunk | LaCT + window | window only | ratio |")
    print("|---|---|---|---|")
    for i, (a, b) in enumerate(zip(lact, window)):
        print(f"| {i} | {a:.4f} | {b:.4f} | {a / b:.3f} |")
    far = slice(reach + 1, None)  # chunks with clean context beyond the attention path
    mean_l, mean_w = sum(lact[far]) / len(lact[far]), sum(window[far]) / len(window[far])
    print(f"| mean of chunks {reach + 1}+ | {mean_l:.4f} | {mean_w:.4f} | {mean_l / mean_w:.3f} |")
    for key in ("recall_chunks", "other_chunks_past_window"):
        a, b = results["lact"][key], results["window_only"][key]
        print(f"| {key} | {a:.4f} | {b:.4f} | {a / b:.3f} |")
    print(f"recall chunks: {results['lact']['num_recall']} of {results['lact']['num_past']} past the window")
    for name, r in results.items():
        print(f"{name}: training {r['train_seconds']:.0f} s")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    payload = {"steps": steps, "batch": batch, "base_lr": base_lr, "lr": lr, "net": NET, "clip": CLIP}
    (out / "video_memory.json").write_text(json.dumps({**payload, **results}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax.plot(lact, "o-", label="LaCT + window attention")
    ax.plot(window, "s--", label="window attention only")
    ax.axvline(reach + 0.5, color="grey", lw=0.8)
    ax.set_xlabel("chunk (2 latent frames each)")
    ax.set_ylabel("validation flow MSE")
    ax.set_title(f"{steps} steps, window {NET['window']}, {NET['num_layers']} block(s)")
    ax.legend()
    names = ("recall_chunks", "other_chunks_past_window")
    for k, name in enumerate(("lact", "window_only")):
        bx.bar([i + 0.38 * k for i in range(2)], [results[name][n] for n in names], 0.38, label=name)
    bx.set_xticks([0.19, 1.19], ["re-entry chunks\n(colour only in memory)", "other chunks\npast the window"])
    bx.set_ylabel("validation flow MSE")
    bx.legend()
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
    parser.add_argument("--base-lr", type=float, default=1e-2, help="LaCT inner learning rate at init")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.only in (None, "quality"):
        quality(args.steps, args.batch, args.base_lr, args.lr)
    if args.only in (None, "cost"):
        cost(args.chunks)


if __name__ == "__main__":
    main()
