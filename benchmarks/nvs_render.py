"""NVS: reconstruct once, render many. Time rendering T target views of one scene from Vi input views

    full     T full forward passes, each over the Vi input views + 1 target view (what a model without a
             reusable state has to do: every new camera re-reads all inputs)
    render   one `reconstruct` of the Vi input views, then T `render` calls of one view each
    render*  one `reconstruct`, then one `render` call of all T views

and check that all three give the same images. Expected ratio full / render ~ T(Vi + 1) / (Vi + T) in
per-view costs, so it grows with the number of input views. The per-view cost of rendering is measured
after the reconstruct: (render* - reconstruct) / T, next to one `render` call per view, (render - reconstruct) / T.

    .venv/bin/python benchmarks/nvs_render.py                       # demo model, 32x32, Vi = 4, 8, 16, T = 32
    .venv/bin/python benchmarks/nvs_render.py --config configs/nvs/tiny.yaml --size 16 --inputs 8
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

from lact.geometry import look_at
from lact.models.nvs import NVSConfig, NVSNet

ROOT = Path(__file__).resolve().parents[1]


def cameras(views: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, V, 4] intrinsics and [1, V, 4, 4] w2c of cameras 2.7 units from the origin, looking at it."""
    g = torch.Generator().manual_seed(seed)
    azimuth = torch.rand(views, generator=g) * 2 * math.pi
    elevation = torch.rand(views, generator=g) - 0.2
    eyes = 2.7 * torch.stack(
        [elevation.cos() * azimuth.cos(), elevation.cos() * azimuth.sin(), elevation.sin()], -1
    )
    w2c = look_at(eyes, torch.zeros_like(eyes), torch.tensor([0.0, 0.0, 1.0]).expand_as(eyes))
    focal = size / (2 * math.tan(math.radians(25)))
    return torch.tensor([focal, focal, size / 2, size / 2]).expand(1, views, 4), w2c[None]


def timed(fn, repeats: int, *args) -> tuple[float, torch.Tensor]:
    """(median seconds of fn(*args) over `repeats` runs after one warm-up run, the last result)."""
    out = fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def full_passes(net, images, k_in, w_in, k_out, w_out) -> torch.Tensor:
    """T forward passes over all input views and one target view each -> [1, T, 3, H, W]."""
    views = [net(images, k_in, w_in, k_out[:, t : t + 1], w_out[:, t : t + 1]) for t in range(k_out.shape[1])]
    return torch.cat(views, dim=1)


def render_each(net, images, k_in, w_in, k_out, w_out) -> torch.Tensor:
    """One reconstruct, then one render call per target view."""
    state = net.reconstruct(images, k_in, w_in)
    return torch.cat(
        [net.render(state, k_out[:, t : t + 1], w_out[:, t : t + 1]) for t in range(k_out.shape[1])], 1
    )


def reconstruct_only(net, images, k_in, w_in, k_out, w_out):
    return net.reconstruct(images, k_in, w_in)


def render_all(net, images, k_in, w_in, k_out, w_out) -> torch.Tensor:
    """One reconstruct, then one render call for all target views."""
    return net.render(net.reconstruct(images, k_in, w_in), k_out, w_out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default="configs/nvs/demo.yaml", help="YAML whose model.init_args.net is used"
    )
    parser.add_argument("--size", type=int, default=32, help="image height = width in pixels")
    parser.add_argument("--inputs", type=int, nargs="+", default=[4, 8, 16], help="input views Vi")
    parser.add_argument("--targets", type=int, default=32, help="target views T")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = yaml.safe_load((ROOT / args.config).read_text())["model"]["init_args"]["net"]
    torch.manual_seed(0)
    net = NVSNet(NVSConfig(**spec)).eval()
    params = sum(p.numel() for p in net.parameters())
    print(
        f"model {args.config} ({params / 1e6:.2f}M parameters), {args.size}x{args.size}, T={args.targets} target "
        f"views, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    print(
        "| input views Vi | full: T forward passes | reconstruct + T renders | reconstruct + 1 render of T "
        "| speed-up (one view per render) | speed-up (all at once) | reconstruct alone "
        "| per view, one per call | per view, batched | max abs diff |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    k_out, w_out = cameras(args.targets, args.size, seed=1)
    for vi in args.inputs:
        k_in, w_in = cameras(vi, args.size, seed=2)
        images = torch.rand(1, vi, 3, args.size, args.size, generator=torch.Generator().manual_seed(3))
        scene = (net, images, k_in, w_in, k_out, w_out)
        with torch.no_grad():
            t_full, out_full = timed(full_passes, args.repeats, *scene)
            t_each, out_each = timed(render_each, args.repeats, *scene)
            t_all, out_all = timed(render_all, args.repeats, *scene)
            t_rec, _ = timed(reconstruct_only, args.repeats, *scene)
        diff = max((out_each - out_full).abs().max().item(), (out_all - out_full).abs().max().item())
        per_each, per_all = (max(t - t_rec, 0.0) / args.targets for t in (t_each, t_all))
        print(
            f"| {vi} | {t_full * 1e3:.0f} ms | {t_each * 1e3:.0f} ms | {t_all * 1e3:.0f} ms "
            f"| {t_full / t_each:.1f}x | {t_full / t_all:.1f}x | {t_rec * 1e3:.1f} ms "
            f"| {per_each * 1e3:.2f} ms | {per_all * 1e3:.2f} ms | {diff:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
