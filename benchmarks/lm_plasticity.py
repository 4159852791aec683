"""Language plasticity of a LaCT LM after plain pretraining and after active forgetting (issue 14).

The experiment of Chen et al. (2023), "Improving Language Plasticity via Pretraining with Active Forgetting",
at CPU scale:

1. Pretrain: ``train.py fit --config configs/lm/tiny.yaml`` (plain) and the same with the overlay
   ``configs/lm/active.yaml`` (the ForgettingSchedule callback re-draws the tied token embedding / LM head and
   zeroes its Adam state after every K-th step): same seed, same data, same steps. The data is the repository's
   own text, byte-level (tiny.yaml's list), tokenized once per invocation into ``<out>/data``, so every run of
   one invocation reads the same shards.
2. Re-learn: for each pretrained model, a fresh token embedding (the model's initialiser, the same draw for
   both arms) is trained with everything else frozen (``modules.forgetting.freeze_all_but_embeddings``; the
   benchmark checks afterwards that no other parameter moved, bit for bit) on the same text under a fixed
   random permutation of the byte ids (``datamodules.lm.vocabulary_permutation``; the end-of-document id is
   kept, the LM reads it as document structure): a new vocabulary on the same language. A Lightning Trainer
   runs ``LMModule.training_step``; the permuted validation split is scored every ``--eval-every`` steps.

Writes ``<out>/lm_plasticity.png`` (pretraining and re-learning validation loss), ``<out>/lm_plasticity.md``
(steps to each loss threshold and final loss, per seed and arm) and ``<out>/seed<s>/<arm>/relearn.json``.
Each process runs on one CPU thread; ``--jobs`` arms at a time.

Usage:
    .venv/bin/python benchmarks/lm_plasticity.py [--seeds 0 1 2] [--pretrain-steps 3000] [--every-k 100]
        [--relearn-steps 300] [--relearn-lr 3e-3] [--thresholds 3.0 2.8 2.7] [--jobs 2] [--out DIR]
        [--reuse-pretrain] [--embedding-start fresh|pretrained] [--plot-only]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository's packages
    sys.path.insert(0, str(ROOT))

BASE = "configs/lm/tiny.yaml"
ARMS = {"plain": [], "active": ["configs/lm/active.yaml"]}
EMBEDDING_SEED_STREAM = 1  # seeded_generator(seed, stream): the fresh embedding of the re-learning phase
PERMUTATION_SEED_OFFSET = 1000  # the new vocabulary is seeded apart from the model and data seeds


def one_thread_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def base_config() -> dict:
    import yaml

    return yaml.safe_load((ROOT / BASE).read_text())


def prepare_data(out: Path) -> Path:
    """Tokenize tiny.yaml's text list (byte-level, its seq_len) once into ``out/data/{train,val}``."""
    from datamodules.lm import prepare_text_shards

    data = base_config()["data"]["init_args"]
    cwd = os.getcwd()
    os.chdir(ROOT)  # the config's paths are relative to the repository
    try:
        prepare_text_shards(data["text"], str(out / "data"), seq_len=data["seq_len"])
    finally:
        os.chdir(cwd)
    return out / "data"


# ---- phase 1: pretraining through train.py -------------------------------------------------------------
def pretrain(arm: str, seed: int, run_dir: Path, data: Path, steps: int, every_k: int) -> float:
    """``train.py fit`` of tiny.yaml (+ the arm's overlay) into ``run_dir``; returns wall seconds."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "train.py", "fit", f"--config={BASE}"]
    cmd += [f"--config={c}" for c in ARMS[arm]]
    cmd += [
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.max_steps={steps}",
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        "--data.init_args.text=null",
        f"--data.init_args.train_shards={data / 'train'}",
        f"--data.init_args.val_shards={data / 'val'}",
        f"--checkpoint.every_n_train_steps={steps}",
    ]
    if arm == "active":
        cmd += [f"--trainer.callbacks.init_args.every_k={every_k}"]
    t0 = time.time()
    with open(run_dir / "train.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=one_thread_env(), stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.time() - t0


def pretrain_curve(run_dir: Path) -> list[tuple[int, float]]:
    """``val/loss`` of a train.py run from its TensorBoard events: [(optimizer step, loss)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    if "val/loss" not in events.Tags()["scalars"]:  # a run shorter than tiny.yaml's val_check_interval
        return []
    return [(e.step + 1, e.value) for e in events.Scalars("val/loss")]


# ---- phase 2: re-learning the embeddings on a permuted vocabulary --------------------------------------
def relearn(
    ckpt: Path,
    data: Path,
    out_json: Path,
    seed: int,
    steps: int,
    lr: float,
    warmup: int,
    eval_every: int,
    val_batches: int,
    embedding_start: str,
) -> None:
    """Re-learn only the token embedding of the checkpoint's LM on permuted text; writes the curves to
    ``out_json``: {"val": [[step, loss], ...], "train": [[step, loss], ...], "pretrained_val": loss on the
    unpermuted text before anything changed, "trained": the names of the trained parameters, "wall_s"}."""
    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything

    from datamodules.lm import LMDataModule, permuted_lm_sample, vocabulary_permutation
    from datamodules.shards import seeded_generator
    from modules.forgetting import freeze_all_but_embeddings
    from modules.lm import LMModule
    from modules.task import OptimConfig

    torch.set_num_threads(1)
    t0 = time.time()

    class PermutedText(LMDataModule):
        def __init__(self, permutation: torch.Tensor, **kwargs):
            super().__init__(**kwargs)
            self.permutation = permutation

        def sample_transform(self, train: bool):
            return functools.partial(permuted_lm_sample, permutation=self.permutation)

    class Curves(Callback):
        def __init__(self) -> None:
            self.val: list[tuple[int, float]] = []
            self.train: list[tuple[int, float]] = []

        def on_validation_end(self, trainer, pl_module) -> None:  # after the module logged val/loss
            if not trainer.sanity_checking:
                self.val.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.train.append((trainer.global_step, float(outputs["loss"])))

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    hp = state["hyper_parameters"]
    module = LMModule(
        net=hp["net"],
        # Constant lr after a short warmup, so both arms re-learn under the same step sizes throughout.
        optim=OptimConfig(lr=lr, warmup_steps=warmup, min_lr_ratio=1.0, weight_decay=0.0, grad_clip=1.0),
        bucket_size=hp["bucket_size"],
    )
    module.load_state_dict(state["state_dict"])
    eod = module.config.eod_id
    data_args = dict(
        train_shards=str(data / "train"),
        val_shards=str(data / "val"),
        seq_len=base_config()["data"]["init_args"]["seq_len"],
        batch_size=base_config()["data"]["init_args"]["batch_size"],
        batches_per_epoch=steps,
        seed=seed,
    )
    trainer_args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=val_batches,
        num_sanity_val_steps=0,
    )
    identity = torch.arange(module.config.vocab_size)
    pretrained_val = Trainer(**trainer_args).validate(
        module, datamodule=PermutedText(identity, **data_args), verbose=False
    )[0]["val/loss"]

    permutation = vocabulary_permutation(
        module.config.vocab_size, seed + PERMUTATION_SEED_OFFSET, keep=[] if eod is None else [eod]
    )
    embedding = module.token_embedding().weight
    with torch.no_grad():
        if embedding_start == "fresh":  # Chen et al.: a new embedding for the new language
            fresh = torch.empty(embedding.shape)
            module.init_parameter_(embedding, fresh, seeded_generator(seed, EMBEDDING_SEED_STREAM))
            embedding.copy_(fresh)
        # "pretrained": the rows stay, so every byte id now starts from another byte's row.
    trained = freeze_all_but_embeddings(module)
    frozen_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}

    seed_everything(seed)
    curves = Curves()
    datamodule = PermutedText(permutation, **data_args)
    trainer = Trainer(**trainer_args, max_steps=steps, val_check_interval=eval_every, callbacks=[curves])
    trainer.validate(module, datamodule=datamodule, verbose=False)  # step 0
    trainer.fit(module, datamodule=datamodule)
    if curves.val[-1][0] != steps:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    moved = [
        n for n, p in module.named_parameters() if n in frozen_before and not torch.equal(p, frozen_before[n])
    ]
    if moved:
        raise RuntimeError(f"re-learning changed frozen parameters: {moved}")
    out_json.write_text(
        json.dumps(
            {
                "val": curves.val,
                "train": curves.train,
                "pretrained_val": pretrained_val,
                "trained": trained,
                "frozen_checked": len(frozen_before),
                "wall_s": time.time() - t0,
            }
        )
    )


# ---- reporting ---------------------------------------------------------------------------------------
def steps_to(curve: list[list[float]], threshold: float) -> int | None:
    """The first evaluated step whose loss is at or below ``threshold`` (None: never)."""
    return next((int(s) for s, v in curve if v <= threshold), None)


def table(results: dict[int, dict[str, dict]], thresholds: list[float], relearn_steps: int) -> str:
    arms = list(next(iter(results.values())))
    head = (
        "| seed | arm | pretrain val loss (own embedding) | re-learn val loss at 0 | "
        + " | ".join(f"steps to {t:g}" for t in thresholds)
        + f" | val loss at {relearn_steps} |"
    )
    lines = [head, "|" + "---|" * (5 + len(thresholds))]
    for seed, by_arm in results.items():
        for arm in arms:
            r = by_arm[arm]
            cells = []
            for t in thresholds:
                s = steps_to(r["val"], t)
                cells.append(f"> {relearn_steps}" if s is None else str(s))
            lines.append(
                f"| {seed} | {arm} | {r['pretrained_val']:.3f} | {r['val'][0][1]:.3f} | "
                + " | ".join(cells)
                + f" | {r['val'][-1][1]:.3f} |"
            )
    if len(results) > 1:
        lines += ["", "| arm | " + " | ".join(f"steps to {t:g}: mean [min, max]" for t in thresholds)]
        lines[-1] += " | final val loss: mean [min, max] |"
        lines.append("|" + "---|" * (2 + len(thresholds)))
        for arm in arms:
            cells = []
            for t in thresholds:
                v = [steps_to(results[s][arm]["val"], t) for s in results]
                if any(x is None for x in v):
                    cells.append(f"{sum(x is None for x in v)} of {len(v)} not reached")
                else:
                    cells.append(f"{statistics.mean(v):.0f} [{min(v)}, {max(v)}]")
            f = [results[s][arm]["val"][-1][1] for s in results]
            cells.append(f"{statistics.mean(f):.3f} [{min(f):.3f}, {max(f):.3f}]")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[int, dict[str, dict]], pre: dict, thresholds: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"plain": "tab:blue", "active": "tab:orange"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (seed, by_arm) in enumerate(results.items()):
        for arm, r in by_arm.items():
            label = arm if i == 0 else None
            if pre.get((seed, arm)):
                a.plot(*zip(*pre[(seed, arm)]), color=colors.get(arm), alpha=0.8, label=label)
            b.plot(*zip(*r["val"]), color=colors.get(arm), alpha=0.8, label=label)
    for t in thresholds:
        b.axhline(t, color="gray", ls=":", lw=0.8)
    a.set(title="pretraining: val loss (own vocabulary)", xlabel="optimizer step", ylabel="loss (nats/byte)")
    b.set(
        title="re-learning the embedding only: val loss, permuted vocabulary",
        xlabel="re-learning step",
        ylabel="loss (nats/byte)",
    )
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{len(results)} seed(s); dotted: loss thresholds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--pretrain-steps", type=int, default=3000)
    p.add_argument("--every-k", type=int, default=100, help="K of active forgetting in pretraining")
    p.add_argument("--relearn-steps", type=int, default=300)
    p.add_argument("--relearn-lr", type=float, default=3e-3)
    p.add_argument("--relearn-warmup", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--val-batches", type=int, default=8, help="validation batches per evaluation")
    p.add_argument("--embedding-start", choices=["fresh", "pretrained"], default="fresh")
    p.add_argument("--thresholds", nargs="+", type=float, default=[3.0, 2.8, 2.7])
    p.add_argument("--jobs", type=int, default=2, help="arms at a time, one CPU thread each")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "lm_plasticity")
    p.add_argument(
        "--pretrained", type=Path, default=None, help="read pretrained runs from here (default --out)"
    )
    p.add_argument("--reuse-pretrain", action="store_true", help="keep existing pretrained checkpoints")
    p.add_argument("--plot-only", action="store_true", help="re-read relearn.json files and re-plot")
    # internal: one re-learning process
    p.add_argument(
        "--relearn-only", nargs=4, metavar=("CKPT", "DATA", "OUT_JSON", "SEED"), help=argparse.SUPPRESS
    )
    args = p.parse_args()

    if args.relearn_only:
        ckpt, data, out_json, seed = args.relearn_only
        relearn(
            Path(ckpt), Path(data), Path(out_json), int(seed), args.relearn_steps, args.relearn_lr,
            args.relearn_warmup, args.eval_every, args.val_batches, args.embedding_start,
        )  # fmt: skip
        return

    out = args.out.resolve()
    pre_root = (args.pretrained or args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = pre_root / "data"
    if not args.plot_only and not args.reuse_pretrain:
        data = prepare_data(pre_root)
    jobs = [(seed, arm) for seed in args.seeds for arm in args.arms]

    def one(job: tuple[int, str]) -> None:
        seed, arm = job
        pre_dir = pre_root / f"seed{seed}" / arm / "pretrain"
        ckpt = pre_dir / "checkpoints" / "last.ckpt"
        if not (args.reuse_pretrain and ckpt.exists()):
            wall = pretrain(arm, seed, pre_dir, data, args.pretrain_steps, args.every_k)
            print(f"seed {seed} {arm}: pretrained in {wall:.0f} s", flush=True)
        out_json = out / f"seed{seed}" / arm / "relearn.json"
        out_json.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--relearn-only", str(ckpt), str(data), str(out_json), str(seed)]
        cmd += ["--relearn-steps", str(args.relearn_steps), "--relearn-lr", str(args.relearn_lr)]
        cmd += ["--relearn-warmup", str(args.relearn_warmup), "--eval-every", str(args.eval_every)]
        cmd += ["--val-batches", str(args.val_batches), "--embedding-start", args.embedding_start]
        with open(out_json.with_suffix(".log"), "w") as log:
            subprocess.run(
                cmd, cwd=ROOT, env=one_thread_env(), stdout=log, stderr=subprocess.STDOUT, check=True
            )
        wall = json.loads(out_json.read_text())["wall_s"]
        print(f"seed {seed} {arm}: re-learned in {wall:.0f} s", flush=True)

    if not args.plot_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(one, jobs))  # list: re-raise a failed run
    results = {
        seed: {arm: json.loads((out / f"seed{seed}" / arm / "relearn.json").read_text()) for arm in args.arms}
        for seed in args.seeds
    }
    pre = {
        (seed, arm): pretrain_curve(pre_root / f"seed{seed}" / arm / "pretrain")
        for seed in args.seeds
        for arm in args.arms
    }
    plot(results, pre, args.thresholds, out / "lm_plasticity.png")
    text = table(results, args.thresholds, args.relearn_steps)
    (out / "lm_plasticity.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
