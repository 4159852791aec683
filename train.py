"""LightningCLI entry point: ``python train.py {fit,validate,test,predict} --config configs/<task>/<size>.yaml``.

Model and data are given as class paths (subclass mode), so every task plugs in through its YAML:

    model:
      class_path: modules.nvs.NVSModule
      init_args: {net: {...}, optim: {...}, ...}
    data:
      class_path: datamodules.nvs.NVSDataModule

Variants are overlays: ``--config configs/icl/base.yaml --config configs/icl/active.yaml`` (later files
override earlier ones).

Every run lives in one fixed run directory, ``trainer.default_root_dir``:

    <root>/config.yaml               the resolved config of the last command
    <root>/events.out.tfevents.*     TensorBoard (one event file per launch, all in the same directory)
    <root>/hparams.yaml
    <root>/checkpoints/last.ckpt     and <step>.ckpt

so ``--ckpt_path last`` continues the same checkpoints and the same TensorBoard curves (no new version per
resume). The learning rate (LRMonitor), the throughput (train/<unit>_per_s) and the last checkpoint are
recorded by default in every task. Optimisation is the task's ``model.init_args.optim`` (modules/task.py):
``--optimizer`` and ``--lr_scheduler`` are not offered, since they would silently replace its parameter
groups and schedule.
"""

from __future__ import annotations

import os
import sys

import jsonargparse
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules.errors import DataConfigError, TooManyBadSamplesError
from modules.resilience import CheckpointError, DivergenceError, RunCheckpoint, prepare_ckpt_path
from modules.task import LRMonitor, Throughput

DEFAULT_ROOT = "outputs/run"
# The fixed run directory: TensorBoard writes straight into trainer.default_root_dir (name and version ""),
# so a resumed run appends to the same directory. "${...default_root_dir}" is relative to
# trainer.logger.init_args: three levels up is trainer.
LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "${...default_root_dir}", "name": "", "version": ""},
}


def checkpoint_dir(default_root_dir: str | None) -> str:
    """The fixed checkpoint directory of a run directory."""
    return os.path.join(default_root_dir or DEFAULT_ROOT, "checkpoints")


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
        parser.add_lightning_class_args(LRMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(Throughput, "throughput")

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
        # Lightning's own step is left out on purpose: for an explicit checkpoint file it replaces the model's
        # arguments with the checkpoint's hyperparameters, which would silently undo the config's sampler and
        # optimisation settings (predict with more steps, resume with a lower lr). The check above has already
        # made sure the config builds the checkpoint's network.
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
        trainer_defaults={"default_root_dir": DEFAULT_ROOT, "logger": LOGGER},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


# Errors whose message is all a user needs (a data option that names nothing usable, more damaged data than
# allowed, a diverged run whose last good state is already saved): printed as one line, not a traceback.
USER_ERRORS = (DataConfigError, TooManyBadSamplesError, DivergenceError)

if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as error:
        sys.exit(f"error: {type(error).__name__}: {error}")
