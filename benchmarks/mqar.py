"""MQAR with the key-value pairs more than 4 windows before their queries: LaCT hybrid against SWA only.

    .venv/bin/python benchmarks/mqar.py                      # configs/lm/mqar.yaml, both models, CPU
    .venv/bin/python benchmarks/mqar.py --steps 200 --out outputs/mqar_quick
    .venv/bin/python benchmarks/mqar.py --only hybrid --set short_conv=0 --out outputs/mqar_no_conv  # ablation

Both models are built from configs/lm/mqar.yaml by the same code; the baseline only sets lact_ratio = 0
(no LaCT branch), so its attention-only receptive field (num_layers * (window - 1) tokens) ends before the
pairs. Both train for the same steps on the same stream (LMModule + MQARDataModule + Trainer), validated
on the same held-out sequences. Writes <out>/mqar.json, <out>/mqar.png (answer accuracy against step) and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402

from datamodules.mqar import MQARDataModule  # noqa: E402
from lact.models.lm import LMConfig, parameter_count  # noqa: E402
from modules.lm import LMModule  # noqa: E402


class AccuracyCurve(Callback):
    """(step, answer accuracy, validation loss, seconds since fit start) after every validation."""

    def __init__(self):
        self.points: list[dict] = []
        self.start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        self.points.append(
            {
                "step": trainer.global_step,
                "accuracy": float(m["val/accuracy"]),
                "loss": float(m["val/loss"]),
                "seconds": time.perf_counter() - self.start,
            }
        )
        print(
            f"  step {trainer.global_step:5d}  answer accuracy {self.points[-1]['accuracy']:.3f}", flush=True
        )


def with_overrides(config: dict, overrides: dict | None) -> dict:
    """The YAML's LMConfig fields with --set overrides; "lact.FIELD" sets a field of the nested LaCT config."""
    config = {**config, "lact": dict(config.get("lact", {}))}
    for key, value in (overrides or {}).items():
        if key.startswith("lact."):
            config["lact"][key.removeprefix("lact.")] = value
        else:
            config[key] = value
    return config


def run(spec: dict, lact_ratio: float, steps: int | None, overrides: dict | None = None) -> dict:
    seed_everything(spec.get("seed_everything", 0))
    model_args = dict(spec["model"]["init_args"])
    config = LMConfig(**{**with_overrides(model_args.pop("net"), overrides), "lact_ratio": lact_ratio})
    trainer_args = dict(spec["trainer"])
    if steps is not None:
        trainer_args["max_steps"] = steps
    data_args = dict(spec["data"]["init_args"])
    data_args["batches_per_epoch"] = trainer_args[
        "max_steps"
    ]  # one epoch: validation every val_check_interval
    curve = AccuracyCurve()
    trainer_args.pop("default_root_dir", None)
    trainer = Trainer(
        **trainer_args,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[curve],
    )
    module = LMModule(config, **model_args)
    data = MQARDataModule(**data_args)
    trainer.fit(module, datamodule=data)
    return {
        "lact_ratio": lact_ratio,
        "parameters": parameter_count(config),
        "curve": curve.points,
        "by_query": accuracy_by_query(module, data, data_args["num_pairs"]),
    }


@torch.no_grad()
def accuracy_by_query(module: LMModule, data: MQARDataModule, num_pairs: int) -> list[float]:
    """Held-out answer accuracy of the j-th query of each sequence, j = 0 .. num_pairs - 1. Recall through the
    fast weights scores the same at every j; guessing among the values not yet answered in the window (which
    holds the earlier queries and their answers) scores about 1 / (num_pairs - j)."""
    module.eval()
    hits, total = torch.zeros(num_pairs), 0
    for batch in data.val_dataloader():
        logits = module.net(batch["input_ids"])
        scored = (batch["labels"] != -100).nonzero()  # [n, 2]: (row, position), in query order per row
        right = logits.argmax(-1)[scored[:, 0], scored[:, 1]] == batch["labels"][scored[:, 0], scored[:, 1]]
        hits += right.view(-1, num_pairs).float().sum(0)
        total += batch["input_ids"].shape[0]
    return (hits / total).tolist()


def plot(results: dict, chance: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, r in results.items():
        ax.plot(
            [p["step"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]], marker="o", ms=3, label=name
        )
    ax.axhline(chance, color="gray", ls="--", lw=1, label=f"chance ({chance:.3f})")
    ax.axhline(0.9, color="gray", ls=":", lw=1, label="90%")
    ax.set(xlabel="optimizer step", ylabel="answer accuracy (held-out)", ylim=(0, 1.02), title=title)
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "lm" / "mqar.yaml"))
    parser.add_argument("--steps", type=int, default=None, help="override trainer.max_steps")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override an LMConfig field of both models (YAML value), e.g. --set tie_embeddings=true",
    )
    parser.add_argument("--seed", type=int, default=None, help="initialisation and data seed")
    parser.add_argument("--only", choices=["hybrid", "swa"], help="train one of the two models")
    parser.add_argument("--plot-only", action="store_true", help="redraw <out>/mqar.png from <out>/mqar.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.plot_only:
        saved = json.loads((out / "mqar.json").read_text())
        args.config = str(ROOT / saved["config"])
    spec = yaml.safe_load(Path(args.config).read_text())
    if args.seed is not None:
        spec["seed_everything"] = args.seed
        spec["data"]["init_args"]["seed"] = args.seed
    task = spec["data"]["init_args"]
    overrides = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects FIELD=VALUE, got {item!r}")
        overrides[field] = yaml.safe_load(value)
    cfg = with_overrides(spec["model"]["init_args"]["net"], overrides)
    values = task["vocab_size"] - 1 - (task["vocab_size"] - 1) // 2
    reach = cfg["num_layers"] * (cfg["window"] - 1)
    print(
        f"MQAR: {task['num_pairs']} pairs, gap {task['gap']} (pairs >= {task['gap'] + 1} tokens before queries; "
        f"window {cfg['window']}, attention reach {reach}), seq_len {task['seq_len']}, chance {1 / values:.3f}"
    )
    title = (
        f"MQAR, {task['num_pairs']} pairs {task['gap'] + 1}+ tokens before queries, window {cfg['window']}"
    )
    if args.plot_only:
        plot(saved["results"], 1 / values, out / "mqar.png", title)
        return saved["results"]
    models = {"hybrid": ("LaCT hybrid", 1.0), "swa": ("SWA only", 0.0)}
    results = {}
    for key, (name, ratio) in models.items():
        if args.only in (None, key):
            print(f"{name}:", flush=True)
            results[name] = run(spec, ratio, args.steps, overrides)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mqar.json").write_text(
        json.dumps(
            {
                "config": os.path.relpath(args.config, ROOT),
                "overrides": overrides,
                "task": task,
                "results": results,
            },
            indent=1,
        )
    )
    plot(results, 1 / values, out / "mqar.png", title)
    names = list(results)
    print(f"\n| step | {' | '.join(names)} |\n|---:|{'---:|' * len(names)}")
    for i, point in enumerate(results[names[0]]["curve"]):
        cells = [f"{results[n]['curve'][i]['accuracy']:.3f}" for n in names]
        print(f"| {point['step']} | {' | '.join(cells)} |")
    print(f"\n| answer accuracy by query index | {' | '.join(str(j) for j in range(task['num_pairs']))} |")
    print(f"|---|{'---:|' * task['num_pairs']}")
    for n in names:
        print(f"| {n} | {' | '.join(f'{a:.2f}' for a in results[n]['by_query'])} |")
    for n in names:
        r = results[n]
        last = r["curve"][-1]
        print(
            f"{n}: {r['parameters']:,} parameters, final accuracy {last['accuracy']:.3f} in {last['seconds']:.0f} s"
        )
    return results


if __name__ == "__main__":
    main()
