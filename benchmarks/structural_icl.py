"""Structural in-context learning under plain training, active forgetting and temporary forgetting (issue 6).

Runs ``configs/icl/base.yaml`` alone (plain) and with the overlays ``configs/icl/{active,temporary}.yaml``
through ``train.py`` (same seed, same data, same number of steps), each in its own process on one CPU thread
(``--jobs`` of them at a time), then writes

    <out>/structural_icl.png   holdout accuracy and head-token in-weights preference (1 - switch) vs step
    <out>/structural_icl.md    the table of final values (also printed); with several seeds, the spread

With ``--seeds 0 1 2`` every schedule runs once per seed (``seed_everything`` and the data seed: model init,
vocabulary roles and data stream all change); seed s trains into ``<out>/seed<s>/<run>``, the plot and the
first table show the first seed, a second table the mean and range over seeds of the final values.

Usage:
    .venv/bin/python benchmarks/structural_icl.py [--max-steps N] [--out DIR] [--runs plain active temporary]
                                                   [--seeds 0 1 2] [--jobs 2]
                                                   [-- extra train.py overrides applied to every run]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_ROOT = ROOT / "outputs" / "structural_icl"  # set from --out
SETS = ("val", "tail", "switch_head", "switch_tail", "holdout")


def run(name: str, out: Path, max_steps: int | None, extra: list[str], seed: int | None = None) -> float:
    """Train one configuration into ``out/name`` (with ``seed``: its seed for model and data); returns wall
    seconds."""
    root = out / name
    shutil.rmtree(root, ignore_errors=True)
    cmd = [sys.executable, "train.py", "fit", "--config=configs/icl/base.yaml"]
    if name != "plain":  # plain training is the base alone; the others are overlays
        cmd += [f"--config=configs/icl/{name}.yaml"]
    cmd += [f"--trainer.default_root_dir={root}"]
    if seed is not None:
        cmd += [f"--seed_everything={seed}", f"--data.init_args.seed={seed}"]
    if max_steps is not None:
        cmd += [f"--trainer.max_steps={max_steps}"]
    cmd += extra
    # One thread: on a small shared CPU, intra-op threads of a 64-wide model cost more than they give.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.time()
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    wall = time.time() - t0
    (root / "wall_s.txt").write_text(f"{wall:.1f}\n")
    return wall


def read_curves(root: Path) -> dict[str, list[tuple[int, float]]]:
    """``val/<set>_acc`` and ``val/<set>_ctx_acc`` of the run's TensorBoard events (in the run directory) as
    {"<set>" or "<set>_ctx": [(step, acc), ...]}; steps are 1-based optimizer-step counts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    keys = [*SETS, *(f"{s}_ctx" for s in SETS)]
    return {k: [(e.step + 1, e.value) for e in events.Scalars(f"val/{k}_acc")] for k in keys}


def stop_after(name: str) -> int | None:
    """N of the run's ForgettingSchedule (temporary forgetting), read from its resolved config."""
    import yaml

    cfg = next(OUT_ROOT.glob(f"**/{name}/config.yaml"))
    for cb in yaml.safe_load(cfg.read_text())["trainer"].get("callbacks") or []:
        if cb["class_path"].endswith("ForgettingSchedule"):
            return cb["init_args"].get("stop_after")
    return None


def plot(curves: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for name, c in curves.items():
        steps, acc = zip(*c["holdout"])
        (line,) = a.plot(steps, acc, label=name)
        if c["holdout_ctx"]:
            steps_c, acc_c = zip(*c["holdout_ctx"])
            a.plot(steps_c, acc_c, color=line.get_color(), ls=":", lw=1.2, label=f"{name}: among context ids")
        steps, sw = zip(*c["switch_head"])
        b.plot(steps, [1 - x for x in sw], label=name)
        n = stop_after(name)
        for ax in (a, b):
            if n is not None:
                ax.axvline(
                    n, color=line.get_color(), ls="--", lw=0.8, label=f"{name}: forgetting stops (N = {n})"
                )
    a.set(
        title="unseen tokens: holdout accuracy (dotted: among context ids)",
        xlabel="optimizer step",
        ylabel="accuracy",
        ylim=(-0.02, 1.02),
    )
    b.set(
        title="head tokens: in-weights preference (1 - switch)", xlabel="optimizer step", ylim=(-0.02, 1.02)
    )
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.legend(*a.get_legend_handles_labels(), loc="lower center", ncol=4, frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=110)


def table(curves: dict[str, dict], out: Path) -> str:
    head = (
        "| run | wall s | val | tail | holdout (peak) | holdout (final) | holdout among context ids (final) "
        "| switch head | 1 - switch head | switch tail |"
    )
    lines = [head, "|" + "---|" * 10]
    for name, c in curves.items():
        wall_file = out / name / "wall_s.txt"
        wall = float(wall_file.read_text()) if wall_file.exists() else float("nan")
        last = {s: c[s][-1][1] for s in SETS}
        peak_step, peak = max(c["holdout"], key=lambda sv: sv[1])
        ctx = f"{c['holdout_ctx'][-1][1]:.3f}" if c["holdout_ctx"] else "-"
        lines.append(
            f"| {name} | {wall:.0f} | {last['val']:.3f} | {last['tail']:.3f} | "
            f"{peak:.3f} @ {peak_step} | {last['holdout']:.3f} | {ctx} | {last['switch_head']:.3f} | "
            f"{1 - last['switch_head']:.3f} | {last['switch_tail']:.3f} |"
        )
    return "\n".join(lines)


def spread(finals: dict[int, dict[str, dict]]) -> str:
    """Mean and range over seeds of the final values: ``finals[seed][run] = curves``."""
    seeds = sorted(finals)
    cols = [
        ("val", lambda c: c["val"][-1][1]),
        ("holdout (final)", lambda c: c["holdout"][-1][1]),
        ("1 - switch head (final)", lambda c: 1 - c["switch_head"][-1][1]),
        ("switch tail (final)", lambda c: c["switch_tail"][-1][1]),
    ]
    lines = [
        f"| run ({len(seeds)} seeds: {', '.join(map(str, seeds))}) | "
        + " | ".join(f"{n}: mean [min, max]" for n, _ in cols)
        + " | per seed: holdout / 1 - switch head |",
        "|" + "---|" * (len(cols) + 2),
    ]
    for name in finals[seeds[0]]:
        cells = []
        for _, f in cols:
            v = [f(finals[s][name]) for s in seeds]
            cells.append(f"{statistics.mean(v):.3f} [{min(v):.3f}, {max(v):.3f}]")
        per = ", ".join(
            f"{finals[s][name]['holdout'][-1][1]:.2f} / {1 - finals[s][name]['switch_head'][-1][1]:.2f}"
            for s in seeds
        )
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {per} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-steps", type=int, default=None, help="override trainer.max_steps of every run")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "structural_icl")
    p.add_argument("--runs", nargs="+", default=["plain", "active", "temporary"])
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="one run per schedule and seed")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, one CPU thread each")
    p.add_argument("--plot-only", action="store_true", help="re-plot existing runs without training")
    p.add_argument("extra", nargs="*", help="train.py overrides for every run (after --)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    global OUT_ROOT
    OUT_ROOT = args.out
    seeds = args.seeds or [None]
    dirs = {s: args.out if s is None else args.out / f"seed{s}" for s in seeds}
    if not args.plot_only:
        jobs = [(name, s) for s in seeds for name in args.runs]
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)

        def one(job: tuple[str, int | None]) -> None:
            name, s = job
            wall = run(name, dirs[s], args.max_steps, args.extra, s)
            print(f"{name}{'' if s is None else f' seed {s}'}: {wall:.0f} s", flush=True)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(one, jobs))  # list: re-raise a failed run
    finals = {s: {name: read_curves(dirs[s] / name) for name in args.runs} for s in seeds}
    first = finals[seeds[0]]
    plot(first, args.out / "structural_icl.png")
    t = table(first, dirs[seeds[0]])
    if len(seeds) > 1:
        t += "\n\n" + spread(finals)
    (args.out / "structural_icl.md").write_text(t + "\n")
    print(t)


if __name__ == "__main__":
    main()
