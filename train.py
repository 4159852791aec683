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

import jsonargparse
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


def checkpoint_dir(default_root_dir: str | None) -> str:
    """The fixed checkpoint directory of a run directory."""
    return os.path.join(default_root_dir or os.getcwd(), "checkpoints")


class LaCTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "{step:08d}"})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)


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
