"""Nothing lost: checkpoints that survive signals, crashes during a save, divergence and bad resume paths.

Used by train.py for every task (docs/resilience.md is the user's guide):

- ``RunCheckpoint``, the CLI's ``checkpoint`` callback (a Lightning ``ModelCheckpoint``):
  * every save is atomic: the checkpoint (a file, or the directory of a sharded FSDP2 checkpoint) is written
    under a hidden temporary name ``.<name>.partial`` and renamed when complete; ``last.ckpt`` is a symlink
    (``save_last: link``) replaced atomically, and the checkpoint it points to is deleted only after the link
    points to the new one. A process killed while saving leaves the previous ``last.ckpt`` loadable; the
    partial file is removed by the next run.
  * SIGTERM (what SLURM, Kubernetes and torchrun send before stopping a job) and SIGUSR1 (SLURM's
    ``--signal=USR1@<s>`` warning before the time limit) are recorded by a handler that does nothing else;
    at the end of the current training step all ranks agree (one all-reduce of the signal number), save a
    checkpoint and exit with status 128 + signal number (143 for SIGTERM, 138 for SIGUSR1), so schedulers
    and scripts see that training did not finish. Lightning's own SIGTERM handling ends ``fit`` with status
    0 and no checkpoint.
  * an exception during fit saves the last good state before the process ends (``save_on_exception``):
    ``DivergenceError`` (raised by a task after too many consecutive non-finite steps, whose optimizer steps
    were skipped, so the weights are the last good ones) and any other exception in a single-process run. In
    a multi-process run only exceptions raised on every rank at the same step (``DivergenceError``, the
    signals above) save: saving is a collective, and an exception on one rank alone would hang it.
  * the final state of a run is saved when training ends, whatever ``every_n_train_steps`` is.
- ``resolve_ckpt_path`` / ``check_checkpoint``: ``--ckpt_path last`` fails with a clear message when the run
  has no checkpoint, ``--ckpt_path last_or_fresh`` starts a new run in that case (what a requeued job wants);
  a checkpoint that is truncated, corrupt, not written by train.py, or written for another network fails
  with a message naming the file and, for a network mismatch, the config fields that differ.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import threading
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

# `--ckpt_path` values resolved here; anything else (a path, "best", "hpc") goes to Lightning unchanged.
LAST = "last"
LAST_OR_FRESH = "last_or_fresh"
PARTIAL_SUFFIX = ".partial"
# Sharded (FSDP2 / torch.distributed.checkpoint) checkpoints are directories holding these two files.
SHARDED_META = "meta.pt"  # Lightning's non-tensor state (loops, callbacks, hyper_parameters)
SHARDED_INDEX = ".metadata"  # torch.distributed.checkpoint's index of the tensor shards
# Hyperparameter groups that may change when a run is resumed or a checkpoint is loaded (lower the lr after a
# divergence, sample with another scheduler or step count, ...): they hold no network parameter.
RESUMABLE_GROUPS = ("optim", "sampler")
# Network-config fields that change how the network is computed, not its parameters.
RUNTIME_FIELDS = ("activation_checkpointing", "compile")
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class DivergenceError(RuntimeError):
    """Training diverged: the loss or gradient norm was non-finite for the configured number of consecutive
    steps (their optimizer steps were skipped). Tasks raise it on every rank at the same step (the decision
    comes from the all-reduced gradient norm), so ``RunCheckpoint`` saves the last good state collectively."""


class CheckpointError(ValueError):
    """A checkpoint path that cannot be resumed from; the message names the file and what is wrong."""


class Interrupted(SystemExit):
    """Training stopped by a signal after saving a checkpoint; the process exits with 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


# ---------------------------------------------------------------------------------------------- file ops


def partial_path(path: str) -> str:
    """The hidden temporary name a checkpoint is written under before it is renamed to `path`."""
    head, tail = os.path.split(os.path.normpath(path))
    return os.path.join(head, f".{tail}{PARTIAL_SUFFIX}")


def remove_path(path: str) -> None:
    """Remove a file, a symlink (not its target) or a directory tree, if there is one."""
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def replace_path(src: str, dst: str) -> None:
    """Rename `src` to `dst`, replacing what is there. Atomic when `dst` is absent, a file or a symlink (the
    reader sees the old or the new one). A directory at `dst` (a sharded checkpoint) cannot be swapped in one
    step: it is renamed aside first and deleted after."""
    if os.path.isfile(src) and not os.path.islink(src):
        with open(src, "rb") as f:  # the bytes reach the disk before the name does
            os.fsync(f.fileno())
    aside = None
    if os.path.isdir(dst) and not os.path.islink(dst) or os.path.isdir(src) and os.path.lexists(dst):
        aside = partial_path(dst) + ".old"
        remove_path(aside)
        os.replace(dst, aside)
    os.replace(src, dst)
    if aside is not None:
        remove_path(aside)


def remove_partials(dirpath: str) -> list[str]:
    """Delete what saves interrupted by a crash left in `dirpath`; returns the removed names."""
    if not os.path.isdir(dirpath):
        return []
    removed = [n for n in os.listdir(dirpath) if n.startswith(".") and PARTIAL_SUFFIX in n]
    for name in removed:
        remove_path(os.path.join(dirpath, name))
    return removed


# ---------------------------------------------------------------------------------------------- callback


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with atomic saves, a save on SIGTERM / SIGUSR1 / exceptions and at the end
    of training (see the module docstring). Same arguments as ModelCheckpoint; the CLI defaults are
    ``save_last: link``, ``save_on_exception: true`` and each task config's ``every_n_train_steps``."""

    _signal: int | None = None
    _previous_handlers: dict | None = None
    _pending_removal: list | None = None
    _start_step: int | None = None

    # ---- atomic writes ---------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._pending_removal = []
        if trainer.is_global_zero and self.dirpath is not None:
            for name in remove_partials(str(self.dirpath)):
                rank_zero_warn(
                    f"removed {os.path.join(self.dirpath, name)}, left by a save that was interrupted"
                )
        if stage == "fit":
            # Before Lightning registers its handlers (right after setup): with ours on SIGUSR1, Lightning's
            # SLURM auto-requeue handler (an hpc_ckpt save and a requeue from inside the handler) is not set.
            self._signal = None
            self._install_handlers(trainer)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        partial = partial_path(filepath)
        if trainer.is_global_zero:
            remove_path(partial)
        trainer.strategy.barrier("RunCheckpoint.clean")
        trainer.save_checkpoint(partial, self.save_weights_only)  # every rank: sharded saves are collective
        if trainer.is_global_zero:
            replace_path(partial, filepath)
        trainer.strategy.barrier("RunCheckpoint.rename")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def _link_checkpoint(self, trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            partial = partial_path(linkpath)
            remove_path(partial)
            os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), partial)
            replace_path(partial, linkpath)
        trainer.strategy.barrier("RunCheckpoint.link")
        # Only now that `last` points to the new checkpoint may the one it pointed to go.
        pending, self._pending_removal = self._pending_removal or [], []
        for path in pending:
            if os.path.abspath(path) != os.path.abspath(filepath):
                trainer.strategy.remove_checkpoint(path)

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        if self.save_last == "link":
            self._pending_removal = [*(self._pending_removal or []), filepath]
        else:
            super()._remove_checkpoint(trainer, filepath)

    # ---- signals ---------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._start_step = trainer.global_step
        # Again, replacing the SIGTERM handler Lightning chained in front of ours when fit started: it
        # broadcasts from inside the handler and ends fit with status 0 and no checkpoint.
        self._install_handlers(trainer)

    def _install_handlers(self, trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python only lets the main thread set handlers
        if self._previous_handlers is None:
            self._previous_handlers = {s: signal.getsignal(s) for s in HANDLED_SIGNALS}

        def record(signum, frame):
            if self._signal is None:
                launcher = trainer.strategy.launcher  # processes this one started get the signal too
                if launcher is not None:
                    launcher.kill(signum)
                self._signal = signum

        for s in HANDLED_SIGNALS:
            signal.signal(s, record)

    def _agreed_signal(self, trainer) -> int:
        """The largest signal number any rank received (0 if none); a collective in multi-process runs."""
        mine = torch.tensor(self._signal or 0, device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            mine = trainer.strategy.reduce(mine, reduce_op="max")
        return int(mine)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        signum = self._agreed_signal(trainer)
        finished = 0 < trainer.max_steps <= trainer.global_step
        if signum and not finished:
            raise Interrupted(signum)  # on every rank at this step; on_exception saves

    def on_train_end(self, trainer, pl_module) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # the final step, if not saved yet
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        for s, handler in (self._previous_handlers or {}).items():
            if handler is not None:
                signal.signal(s, handler)
        self._previous_handlers = None

    # ---- exceptions ------------------------------------------------------------------------------------
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and not exception.code:
            # Lightning's own SIGTERM path (a signal before training started): not a finished run either.
            exception.code = 128 + signal.SIGTERM
        collective = isinstance(exception, (Interrupted, SIGTERMException, DivergenceError))
        reason = f"{type(exception).__name__}: {exception}"
        if isinstance(exception, Interrupted):
            reason = f"received {signal.Signals(exception.signum).name}"
        trained = self._start_step is not None and trainer.global_step > self._start_step
        if not (self.save_on_exception and trained) or trainer.sanity_checking:
            return
        if trainer.world_size > 1 and not collective:
            rank_zero_warn(
                f"{reason} on one rank: no checkpoint saved (a sharded save needs every rank); the last one "
                f"is {self.last_model_path or 'none'}"
            )
            return
        if self._last_global_step_saved == trainer.global_step:
            rank_zero_info(f"{reason}; step {trainer.global_step} is already saved in {self.last_model_path}")
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        rank_zero_info(
            f"{reason}; saved step {trainer.global_step} to {self._last_checkpoint_saved}"
            + (f" (last: {self.last_model_path})" if self.last_model_path else "")
        )


# ---------------------------------------------------------------------------------------------- resume


def find_last_checkpoint(dirpath: str) -> str | None:
    """The newest ``last*.ckpt`` in `dirpath` (the names ModelCheckpoint gives; the most recently modified
    wins, as in Lightning), or None. A ``last`` symlink whose target is gone is an error, not a fresh start."""
    if not os.path.isdir(dirpath):
        return None
    found = []
    for name in os.listdir(dirpath):
        if not re.fullmatch(r"last(-\d+)?\.ckpt", name):
            continue
        path = os.path.join(dirpath, name)
        if not os.path.exists(path):
            raise CheckpointError(
                f"{path} is a link to {os.readlink(path)}, which does not exist: pass an existing checkpoint of "
                f"{dirpath} as --ckpt_path, or delete the link to start fresh"
            )
        found.append((os.path.getmtime(path), path))
    return max(found)[1] if found else None


def resolve_ckpt_path(ckpt_path: str | None, dirpath: str) -> str | None:
    """``last``: the run's last checkpoint, an error if it has none; ``last_or_fresh``: the last checkpoint or
    None (a new run); a path: itself, if it exists; None, "best" and "hpc" are returned unchanged."""
    if ckpt_path is None or ckpt_path in ("best", "hpc"):
        return ckpt_path
    ckpt_path = str(ckpt_path)
    if ckpt_path in (LAST, LAST_OR_FRESH):
        last = find_last_checkpoint(dirpath)
        if last is None and ckpt_path == LAST:
            raise CheckpointError(
                f"--ckpt_path last: there is no checkpoint in {dirpath} (the run's checkpoint directory, from "
                f"trainer.default_root_dir). Check trainer.default_root_dir; to start a new run drop --ckpt_path, "
                f"or pass --ckpt_path {LAST_OR_FRESH} to resume when a checkpoint exists and start fresh otherwise"
            )
        if last is None:
            rank_zero_info(f"--ckpt_path {LAST_OR_FRESH}: no checkpoint in {dirpath}, starting a new run")
        return last
    if not os.path.exists(ckpt_path):
        raise CheckpointError(f"--ckpt_path {ckpt_path}: no such file or directory")
    return ckpt_path


def _unreadable(path: str, error: BaseException) -> CheckpointError:
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and "weights_only" in text.lower():
        # torch suggests weights_only=False here, i.e. executing the file's pickled code: never.
        what = (
            "it holds pickled Python objects besides tensors and plain data, so train.py did not write it; "
            "it is not loaded because that would execute code from the file"
        )
    elif (
        isinstance(error, (zipfile.BadZipFile, EOFError))
        or "zip archive" in text
        or "central directory" in text
    ):
        what = (
            "it is truncated or corrupt (not a complete torch archive), e.g. cut off by a crash while written"
        )
    else:
        what = f"it cannot be read ({type(error).__name__}: {text.splitlines()[0] if text else ''})"
    return CheckpointError(
        f"checkpoint {path}: {what}. Pass another checkpoint as --ckpt_path (its directory may hold an earlier "
        "one) or start a new run"
    )


def read_checkpoint_header(path: str) -> dict:
    """The non-tensor part of a Lightning checkpoint (``global_step``, ``loops``, ``hyper_parameters``, ...), loaded with weights_only=True; tensors of a single-file checkpoint are memory-mapped, not
    read. Raises CheckpointError naming the file and what is wrong."""
    if os.path.isdir(path):
        missing = [n for n in (SHARDED_META, SHARDED_INDEX) if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise CheckpointError(
                f"checkpoint {path}: a directory without {' and '.join(missing)}, so not a complete sharded "
                "checkpoint (was its save interrupted?). Pass another checkpoint as --ckpt_path"
            )
        file, required = (
            os.path.join(path, SHARDED_META),
            ("pytorch-lightning_version", "global_step", "loops"),
        )
    else:
        file, required = path, ("pytorch-lightning_version", "global_step", "loops", "state_dict")
    try:
        if not zipfile.is_zipfile(file):  # torch.save writes zip archives; a cut-off one loses its directory
            raise zipfile.BadZipFile(f"{file} is not a complete zip archive")
        header = torch.load(file, map_location="cpu", weights_only=True, mmap=not os.path.isdir(path))
    except Exception as error:  # noqa: BLE001 - every failure becomes one message naming the file
        raise _unreadable(path, error) from None
    if not isinstance(header, Mapping) or any(k not in header for k in required):
        keys = sorted(header) if isinstance(header, Mapping) else type(header).__name__
        raise CheckpointError(
            f"checkpoint {path}: not a Lightning training checkpoint (it needs {', '.join(required)}; "
            f"it holds {keys})"
        )
    return dict(header)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            out |= _flatten(item, f"{prefix}{key}.")
        return out
    if isinstance(value, tuple):
        value = list(value)
    return {prefix[:-1]: value}


def network_fields(hparams: Mapping) -> dict[str, Any]:
    """The fields that decide a network's parameters, flattened to dotted names: every nested config group
    (the network config, e.g. ``net.dim``, ``net.lact.heads``) except the optimisation settings and the fields
    in RUNTIME_FIELDS, plus the module's class path."""
    out = {}
    for key, value in hparams.items():
        if key == "_class_path":
            out[key] = value
        elif key not in RESUMABLE_GROUPS and (isinstance(value, Mapping) or hasattr(value, "as_dict")):
            out |= {
                name: item
                for name, item in _flatten(value, f"{key}.").items()
                if name.rsplit(".", 1)[-1] not in RUNTIME_FIELDS
            }
    return out


def check_checkpoint(path: str, model_config: Mapping) -> dict:
    """Check that the checkpoint at `path` is readable and was written for the network that `model_config`
    (the CLI's ``model`` group: class_path and init_args) builds. Returns the checkpoint's header. The error
    names every network field that differs, with both values."""
    header = read_checkpoint_header(path)
    hparams = dict(header.get("hyper_parameters") or {})
    if hasattr(model_config, "as_dict"):
        model_config = model_config.as_dict()
    init_args = model_config.get("init_args") or {}
    ours = network_fields({"_class_path": model_config.get("class_path"), **init_args})
    theirs = network_fields(hparams)
    if "_class_path" not in theirs:
        ours.pop("_class_path")
    differ = [
        f"{name}: checkpoint {theirs.get(name, '(absent)')!r}, config {ours.get(name, '(absent)')!r}"
        for name in sorted(set(ours) | set(theirs))
        if name != "_instantiator" and theirs.get(name, "(absent)") != ours.get(name, "(absent)")
    ]
    if differ:
        raise CheckpointError(
            f"checkpoint {path} was written for another network than the config builds; fields that differ:\n  "
            + "\n  ".join(differ)
            + "\nUse the config the checkpoint was trained with, or another checkpoint"
        )
    return header


def prepare_ckpt_path(subcommand_config: Any) -> str | None:
    """Resolve and check ``ckpt_path`` of one CLI subcommand's config (needs ``checkpoint.dirpath`` and
    ``model``); returns the path to load (None for a fresh run). Raises CheckpointError."""
    ckpt_path = subcommand_config.get("ckpt_path")
    dirpath = subcommand_config.get("checkpoint", {}).get("dirpath") or os.path.join(
        os.getcwd(), "checkpoints"
    )
    resolved = resolve_ckpt_path(ckpt_path, str(dirpath))
    if resolved not in (None, "best", "hpc"):
        check_checkpoint(resolved, subcommand_config.get("model") or {})
    return resolved
