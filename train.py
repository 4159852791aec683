"""LightningCLI entry point: ``python train.py {fit,validate,test,predict} --config configs/<task>/<size>.yaml``.

Model and data are given as class paths (subclass mode), so every task plugs in through its YAML:

    model:
      class_path: modules.nvs.NVSModule
      init_args: {...}
    data:
      class_path: datamodules.nvs.SceneDataModule

Every run writes its resolved config next to its logs. Checkpoints go to ``<trainer.default_root_dir>/checkpoints``
(a fixed directory, so ``--ckpt_path last`` finds the last checkpoint of the run instead of silently starting
from scratch in a new logger version).
"""

from __future__ import annotations

import os
import sys

import jsonargparse
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from modules.resilience import CheckpointError, RunCheckpoint, prepare_ckpt_path


def checkpoint_dir(default_root_dir: str | None) -> str:
    """The fixed checkpoint directory of a run directory."""
    return os.path.join(default_root_dir or os.getcwd(), "checkpoints")


class LaCTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # --- resilience (modules/resilience.py): atomic saves, save on signals/exceptions, step checkpoints ---
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": "link",  # a sharded checkpoint is written once; `last` links to it
                "checkpoint.save_on_exception": True,
                "checkpoint.filename": "{step:08d}",
                "checkpoint.enable_version_counter": False,  # one run per directory: a resumed run rewrites
            }
        )
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)
        # --- end resilience ---

    def _parse_ckpt_path(self) -> None:
        # --- resilience: `--ckpt_path last` with no checkpoint fails (`last_or_fresh` starts fresh), and a
        # corrupt or foreign checkpoint fails with a message naming the file and the config fields that differ.
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        try:
            resolved = prepare_ckpt_path(self.config[subcommand])
        except CheckpointError as error:
            sys.exit(f"error: {error}")
        super()._parse_ckpt_path()  # Lightning: an explicit file's hyperparameters replace the model's args
        self.config[subcommand]["ckpt_path"] = resolved
        # --- end resilience ---


def main(args: list[str] | None = None, run: bool = True) -> LaCTCLI:
    # "omegaconf+" resolves ${...} after merging all configs and command-line overrides;
    # relative paths keep `${model.init_args...}` interpolations working inside subclass specs.
    jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    return LaCTCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
