"""Re-evaluate the saved checkpoints of one structural-ICL run under each held-out-row rule (issue 14).

Training does not depend on ``holdout_init`` (what the never-trained rows are at evaluation), so one run saved with
``--checkpoint.every_n_train_steps=250 --checkpoint.save_top_k=-1`` is evaluated under every rule here.

Usage:
    .venv/bin/python benchmarks/structural_icl_rows.py RUN_DIR [--rules model match keep] [--min-step 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.pos import POSDataModule  # noqa: E402
from modules.mlm import HOLDOUT_INITS, MaskedLMModule  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="trainer.default_root_dir of a train.py run with step checkpoints")
    p.add_argument("--rules", nargs="+", default=list(HOLDOUT_INITS), choices=HOLDOUT_INITS)
    p.add_argument("--min-step", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = args.run / "config.yaml"  # the run directory (trainer.default_root_dir)
    dm = POSDataModule(**yaml.safe_load(cfg.read_text())["data"]["init_args"])
    ckpts = [(int(c.stem), c) for c in args.run.glob("checkpoints/*.ckpt") if c.stem.isdigit()]
    print("| step | " + " | ".join(f"holdout, `{r}` rows" for r in args.rules) + " | switch head | val |")
    print("|---" * (len(args.rules) + 3) + "|")
    for step, path in sorted(ckpts):
        if step < args.min_step:
            continue
        model = MaskedLMModule.load_from_checkpoint(path, map_location="cpu")
        accs, m = [], {}
        for rule in args.rules:
            model.hparams.holdout_init = rule
            trainer = Trainer(
                accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
            )
            trainer.validate(model, datamodule=dm, verbose=False)
            m = trainer.callback_metrics
            accs.append(m["val/holdout_acc"].item())
        cells = " | ".join(f"{a:.3f}" for a in accs)
        print(
            f"| {step} | {cells} | {m['val/switch_head_acc'].item():.3f} | {m['val/val_acc'].item():.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
