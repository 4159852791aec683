"""The training layer every task shares: optimisation config, parameter groups, warmup + cosine schedule,
one clipping and step-skipping policy, gradient-norm logging, FSDP2 `configure_model`, checkpointable
hyperparameters, and the run-wide callbacks (learning-rate monitor, throughput).

A task module subclasses `TaskModule` and keeps only its loss, metrics and outputs:

    class MyTask(TaskModule):
        forward_methods = ("render",)        # extra methods FSDP2 must gather parameters for (optional)
        cast_root_inputs = True              # cast the root's float inputs to the FSDP2 param dtype (optional)
        throughput_unit = "tokens"           # what throughput counts: train/<unit>_per_s (optional)

        def __init__(self, net: MyNetConfig, optim: OptimConfig | None = None, my_arg: int = 3):
            super().__init__(optim)          # saves every init arg as plain data (weights_only checkpoints)
            self.net = MyNet(as_config(MyNetConfig, net))   # must have `.blocks` for FSDP2
        def training_step(self, batch, batch_idx):
            ...; return loss                 # the base skips the step when it is not finite
        def throughput_items(self, batch) -> int: ...     # tokens (or views) in the batch (optional)

The network is always `self.net` and exposes `self.net.blocks` (the FSDP2 shard units).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import time
import typing
from dataclasses import dataclass, field

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, Timer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LambdaLR, LinearLR, SequentialLR

from lact.layer import LaCTLayer
from lact.nn import compile_blocks
from modules.resilience import DivergenceError
from modules.scale import parse_param_dtype, shard_model

T = typing.TypeVar("T")


@dataclass
class OptimConfig:
    """AdamW, its schedule and the step policy (YAML: ``model.init_args.optim``).

    lr: peak learning rate.                      betas, eps: AdamW.
    weight_decay: applied to matrices only: parameters with 2 or more dimensions, except the weights of
        ``nn.Embedding`` modules (token tables, also a tied output head) and any parameter whose name
        (as in ``named_parameters()``, e.g. ``net.pos``) matches a pattern of `no_decay` (fnmatch).
        Vectors (biases, norm scales, learned scalars) never decay.
    no_decay: fnmatch patterns of further parameter names without weight decay.
    lact_lr_scale: the parameters of the LaCT layers (every `lact.layer.LaCTLayer`: its projections, lr and
        gate projections, initial fast weights) train at lr * lact_lr_scale, in groups of their own
        ("lact_matrices", "lact_vectors"); the warmup and the cosine scale every group alike (the cosine's
        floor is min(lr, lr * lact_lr_scale) * min_lr_ratio for every group with schedule "steps": one
        floor per schedule; with "time" each group ends at its own lr * min_lr_ratio).
    warmup_steps: linear warmup from lr / warmup_steps to lr over this many optimizer steps (0: none).
    min_lr_ratio: a cosine then decays to lr * min_lr_ratio at `total_steps` and stays there
        (1.0 = constant after warmup).
    total_steps: the schedule's length in optimizer steps; None = trainer.max_steps, else the trainer's
        estimate for max_epochs. A run bounded by neither is refused.
    schedule: what the cosine runs over. "steps": optimizer steps, to `total_steps`. "time": the training
        wall-clock time, to trainer.max_time (Lightning's Timer, which checkpoints carry over a resume):
        a run given a fixed time (a demo, a comparison at equal wall time) anneals exactly when its time
        runs out, however fast the machine is, and max_steps only bounds it. Warmup is in steps either
        way. The learning rate then depends on the machine's speed, so two such runs are not bitwise equal.
    grad_clip: clip the global gradient L2 norm to this; None or 0 = no clipping.
    skip_grad_norm: skip the optimizer step when the unclipped norm is above this (None: only when
        non-finite). A step with a non-finite loss or gradient norm is always skipped.
    max_consecutive_skips: stop the run (raising `modules.resilience.DivergenceError`, which saves the last good state) after this many skipped steps in a
        row; None = never.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay: list[str] = field(default_factory=list)
    lact_lr_scale: float = 1.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    total_steps: int | None = None
    schedule: str = "steps"
    grad_clip: float | None = 1.0
    skip_grad_norm: float | None = None
    max_consecutive_skips: int | None = 20

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.no_decay = list(self.no_decay)

        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"OptimConfig.{name}={getattr(self, name)!r}: expected {expected}")

        if not self.lr > 0:
            raise bad("lr", "a positive learning rate")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", "two numbers in [0, 1)")
        if self.weight_decay < 0:
            raise bad("weight_decay", ">= 0")
        if isinstance(self.lact_lr_scale, bool) or not self.lact_lr_scale > 0:
            raise bad("lact_lr_scale", "a positive factor on lr for the LaCT layers' parameters")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", ">= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", "a ratio in [0, 1]")
        if self.total_steps is not None and self.total_steps < 1:
            raise bad("total_steps", "None (the trainer's max_steps) or a positive step count")
        if self.schedule not in ("steps", "time"):
            raise bad("schedule", '"steps" (cosine to total_steps) or "time" (cosine to trainer.max_time)')
        if self.grad_clip is not None and self.grad_clip < 0:
            raise bad("grad_clip", "None, 0 (off) or a positive norm")
        if self.skip_grad_norm is not None and not self.skip_grad_norm > 0:
            raise bad("skip_grad_norm", "None or a positive norm")
        if self.max_consecutive_skips is not None and self.max_consecutive_skips < 1:
            raise bad("max_consecutive_skips", "None or >= 1")


def as_config(cls: type[T], value: T | dict | None) -> T:
    """`value` as a `cls` dataclass: instances pass through, dicts (as checkpoints store them) are converted,
    nested dataclass fields included; None gives the defaults."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"expected a {cls.__name__} or a dict of its fields, got {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields are {sorted(names)}")
    kwargs = {}
    for key, item in value.items():
        nested = [t for t in (hints[key], *typing.get_args(hints[key])) if dataclasses.is_dataclass(t)]
        kwargs[key] = as_config(nested[0], item) if nested and isinstance(item, dict) else item
    return cls(**kwargs)


def plain(value):
    """Dataclasses (nested too) as dicts, so that hyperparameters load with torch.load(weights_only=True)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def parameter_groups(
    module: nn.Module,
    weight_decay: float,
    no_decay: list[str] = (),
    lact_lr: float | None = None,
) -> list[dict]:
    """AdamW groups of `module`'s trainable parameters, each named: "matrices" (weight decay), "embeddings"
    (the weights of nn.Embedding modules, no decay; their own group so that a callback can scale their lr
    alone) and "vectors" (ndim < 2, or a name matching `no_decay`: no decay). With `lact_lr`, the parameters
    of LaCTLayer modules go to "lact_matrices" and "lact_vectors" (the same decay rule) with that "lr".
    Empty groups are left out."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    lact = set()
    if lact_lr is not None:
        lact = {id(p) for m in module.modules() if isinstance(m, LaCTLayer) for p in m.parameters()}
    groups = {"matrices": [], "embeddings": [], "vectors": [], "lact_matrices": [], "lact_vectors": []}
    for name, p in module.named_parameters():  # a tied parameter is listed once
        if not p.requires_grad:
            continue
        prefix = "lact_" if id(p) in lact else ""
        if id(p) in embeddings:
            groups["embeddings"].append(p)
        elif p.ndim >= 2 and not any(fnmatch.fnmatchcase(name, pat) for pat in no_decay):
            groups[prefix + "matrices"].append(p)
        else:
            groups[prefix + "vectors"].append(p)
    out = [
        {"name": k, "params": v, "weight_decay": group_weight_decay(k, weight_decay)}
        for k, v in groups.items()
        if v
    ]
    for group in out:
        if group["name"].startswith("lact_"):
            group["lr"] = lact_lr
    return out


def group_weight_decay(name: str, weight_decay: float) -> float:
    """The weight decay of a `parameter_groups` group: `weight_decay` for matrices, none for the rest."""
    return weight_decay if name in ("matrices", "lact_matrices") else 0.0


def peak_lr(name: str, optim: OptimConfig) -> float:
    """The lr a `parameter_groups` group reaches after the warmup under `optim`."""
    return optim.lr * (optim.lact_lr_scale if name.startswith("lact_") else 1.0)


def resume_with(optimizer: torch.optim.Optimizer, schedule, trained: OptimConfig, now: OptimConfig) -> None:
    """Make a resumed run follow the config's optimisation settings `now` where the checkpoint, trained under
    `trained`, restored its own: restoring an optimizer and a schedule brings back their lr, betas, eps and
    weight decay, so a run resumed with a lower lr would otherwise train on at the old one. Every lr of a
    group (the current one, the schedule's base and last values) is scaled by the ratio of the two peaks, so
    the schedule goes on from the same point at the new height (a callback's own scaling of a group is
    kept); weight decay, betas and eps are set from `now`. The schedule's shape (warmup, length, floor ratio)
    stays the checkpoint's."""
    ratios = []
    for group in optimizer.param_groups:
        name = group.get("name", "matrices")
        ratio = peak_lr(name, now) / peak_lr(name, trained)
        ratios.append(ratio)
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
        group.update(
            weight_decay=group_weight_decay(name, now.weight_decay), betas=tuple(now.betas), eps=now.eps
        )
    for scheduler in [schedule, *getattr(schedule, "_schedulers", [])]:
        for key in ("base_lrs", "_last_lr"):
            if getattr(scheduler, key, None) is not None:
                setattr(scheduler, key, [lr * r for lr, r in zip(getattr(scheduler, key), ratios)])
        if isinstance(scheduler, CosineAnnealingLR):
            scheduler.eta_min *= min(ratios)  # one floor for every group (warmup_cosine's choice)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float
) -> SequentialLR:
    """Per optimizer step s: lr * (s + 1) / warmup for s < warmup, then a cosine from lr down to
    lr * min_ratio at s = total, then flat (a total within the warmup: one cosine step after it). Built from
    torch schedulers, so its state is checkpointed with the trainer's."""
    total = max(total, warmup + 1)
    # The peak lr of each group, read before LinearLR scales it down for step 0.
    eta_min = [g.get("initial_lr", g["lr"]) * min_ratio for g in optimizer.param_groups]
    phases, milestones = [], []
    if warmup > 0:
        phases.append(LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1))
        milestones.append(warmup)
    phases.append(CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=min(eta_min)))
    milestones.append(total)
    phases.append(ConstantLR(optimizer, factor=min_ratio, total_iters=2**62))  # flat after the cosine
    return SequentialLR(optimizer, phases, milestones=milestones)


def warmup_cosine_over_time(
    optimizer: torch.optim.Optimizer, warmup: int, min_ratio: float, progress: typing.Callable[[], float]
) -> LambdaLR:
    """Per optimizer step s: lr * (s + 1) / warmup for s < warmup, then lr times a cosine from 1 down to
    min_ratio over `progress()`, the fraction of the time budget spent (0 to 1, read at every step)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        spent = min(max(progress(), 0.0), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * spent))

    return LambdaLR(optimizer, factor)


def training_time_spent(trainer) -> float:
    """The fraction of trainer.max_time that training has used (validation within fit included), from the
    Timer callback Lightning adds for max_time; its state survives a resume."""
    timers = [c for c in trainer.callbacks if isinstance(c, Timer)]
    if not timers or timers[0].time_remaining("train") is None:
        raise ValueError(
            'model.init_args.optim.schedule="time" anneals over trainer.max_time, which is not set: '
            'set trainer.max_time (e.g. "00:00:10:00") or use schedule="steps"'
        )
    spent = timers[0].time_elapsed("train")
    fraction = spent / (spent + timers[0].time_remaining("train"))
    # Every rank must step with the same lr, and their clocks differ: rank 0's reading decides.
    return trainer.strategy.broadcast(fraction) if trainer.world_size > 1 else fraction


class TaskModule(LightningModule):
    """The shared LightningModule base (see the module docstring for what a task implements).

    Args:
        optim: the optimisation config (OptimConfig or a dict of its fields).
        fsdp_param_dtype: under FSDP2 (ModelParallelStrategy), the dtype parameters are gathered and
            computed in ("bfloat16"); None for their own dtype.

    Subclasses set ``self.net`` (with ``.blocks``) in their __init__ after calling ``super().__init__``.
    Class attributes: ``forward_methods`` (net methods FSDP2 gathers parameters for besides forward),
    ``cast_root_inputs`` (cast the net's float inputs to the FSDP2 dtype), ``throughput_unit``.
    """

    forward_methods: tuple[str, ...] = ()
    cast_root_inputs: bool = True
    throughput_unit: str = "samples"

    def __init__(self, optim: OptimConfig | dict | None = None, fsdp_param_dtype: str | None = None):
        super().__init__()
        self.optim = as_config(OptimConfig, optim)
        parse_param_dtype(fsdp_param_dtype)  # fails here on a bad name, not at sharding time
        self.fsdp_param_dtype = fsdp_param_dtype
        # Collects the init args of the whole __init__ chain (the subclass's too); plain data only.
        self.save_hyperparameters()
        for key, value in list(self.hparams.items()):
            self.hparams[key] = plain(value)
        self.hparams["optim"] = dataclasses.asdict(self.optim)
        self.skipped_steps = 0  # checkpointed
        self.consecutive_skips = 0  # checkpointed
        self._nonfinite_loss = False

    # ---- scale -----------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """With ``net.compile``, torch.compile each block of ``self.net`` in place; then FSDP2 under
        ModelParallelStrategy: one shard unit per block, then the net. Compile first, then shard (as
        torchtitan orders per-block compile and FSDP2); FSDP2's hooks are excluded from dynamo and run
        eagerly between the compiled graphs."""
        net = self.hparams.get("net")
        if isinstance(net, dict) and net.get("compile", False):
            compile_blocks(self.net.blocks)
        shard_model(
            self.net,
            self.net.blocks,
            self.device_mesh,
            param_dtype=parse_param_dtype(self.fsdp_param_dtype),
            cast_root_inputs=self.cast_root_inputs,
            forward_methods=self.forward_methods,
        )

    # ---- throughput ------------------------------------------------------------------------------------
    def throughput_items(self, batch) -> int:
        """How many `throughput_unit`s one batch holds (default: its length)."""
        first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
        return len(first)

    # ---- optimisation ----------------------------------------------------------------------------------
    def total_steps(self) -> int:
        """The schedule's length: optim.total_steps, else trainer.max_steps, else the trainer's estimate."""
        if self.optim.total_steps is not None:
            return self.optim.total_steps
        trainer = self._trainer
        total = trainer.max_steps if trainer is not None and trainer.max_steps > 0 else None
        if total is None and trainer is not None:
            total = trainer.estimated_stepping_batches
        if total is None or not math.isfinite(total) or total < 1:
            raise ValueError(
                f"the learning-rate schedule needs a finite length, got {total}: set "
                "model.init_args.optim.total_steps or trainer.max_steps (or a finite trainer.max_epochs)"
            )
        return int(total)

    def configure_optimizers(self):
        o = self.optim
        lact_lr = o.lr * o.lact_lr_scale if o.lact_lr_scale != 1 else None
        groups = parameter_groups(self, o.weight_decay, o.no_decay, lact_lr)
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)
        if o.schedule == "time":
            training_time_spent(self.trainer)  # fails now, not at the first step, without max_time
            schedule = warmup_cosine_over_time(
                optimizer, o.warmup_steps, o.min_lr_ratio, lambda: training_time_spent(self.trainer)
            )
        else:
            schedule = warmup_cosine(optimizer, o.warmup_steps, self.total_steps(), o.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_start(self) -> None:
        clip = self.trainer.gradient_clip_val
        if clip:
            raise ValueError(
                f"trainer.gradient_clip_val={clip}: gradient clipping is one policy for every task, set "
                "model.init_args.optim.grad_clip (and optim.skip_grad_norm) instead and leave "
                "trainer.gradient_clip_val unset"
            )

    def on_before_backward(self, loss: Tensor) -> None:
        # Remembered per optimizer step (any micro-batch of an accumulation counts).
        self._nonfinite_loss = self._nonfinite_loss or not bool(torch.isfinite(loss.detach()).all())

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """The one step policy: log the unclipped global gradient norm, clip it to optim.grad_clip, and skip
        the step (drop every gradient, so AdamW leaves parameters and moments untouched) when the loss or
        the norm is not finite or the norm is above optim.skip_grad_norm."""
        o = self.optim
        params = [p for p in self.parameters() if p.grad is not None]
        max_norm = o.grad_clip if o.grad_clip else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        self.log("train/grad_norm", norm.detach().float())
        bad = self._nonfinite_loss or not bool(torch.isfinite(norm))
        bad = bad or (o.skip_grad_norm is not None and norm.item() > o.skip_grad_norm)
        # Every rank takes the same decision (a NaN on one rank must not let the others step alone).
        bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        self._nonfinite_loss = False
        if bad:
            for p in params:
                p.grad = None  # torch optimizers skip parameters without a gradient
            self.skipped_steps += 1
            self.consecutive_skips += 1
            rank_zero_warn(
                f"step {self.global_step}: loss non-finite or gradient norm {norm.item():.4g} non-finite or "
                f"above skip_grad_norm={o.skip_grad_norm}; optimizer step skipped "
                f"({self.skipped_steps} so far, {self.consecutive_skips} in a row)"
            )
        else:
            self.consecutive_skips = 0
        self.log("train/skipped_steps", float(self.skipped_steps))
        if o.max_consecutive_skips is not None and self.consecutive_skips >= o.max_consecutive_skips:
            raise DivergenceError(
                f"{self.consecutive_skips} optimizer steps in a row were skipped (non-finite loss or gradient "
                f"norm, or norm above optim.skip_grad_norm={o.skip_grad_norm}) at step {self.global_step}: "
                "training has diverged or the data is broken. Resume from the last good checkpoint with a "
                "lower model.init_args.optim.lr, or raise optim.max_consecutive_skips"
            )

    # ---- fast-weight diagnostics --------------------------------------------------------------------------
    def lact_layers(self) -> dict[str, LaCTLayer]:
        """The network's LaCT layers by diagnostic name: `block{i}` for the layer in self.net.blocks[i]
        (`block{i}.{j}` when a block holds several)."""
        named = {}
        for i, block in enumerate(getattr(self.net, "blocks", ())):
            layers = [m for m in block.modules() if isinstance(m, LaCTLayer)]
            for j, layer in enumerate(layers):
                named[f"block{i}" if len(layers) == 1 else f"block{i}.{j}"] = layer
        return named

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Only at the trainer's logging steps (log_every_n_steps) and with a logger: otherwise the layers
        # compute nothing extra.
        record = bool(self.trainer.loggers) and self.trainer._logger_connector.should_update_logs
        for layer in self.lact_layers().values():
            layer.record_stats = record

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Logs `lact/block{i}/update_ratio` (||W_after - W_0|| / ||W_0|| of the fast weights) and
        `lact/block{i}/inner_lr` (mean inner learning rate) of every LaCT layer, every log_every_n_steps
        (LaCTLayer.record_update_stats). A user sees whether a LaCT model uses its memory."""
        for name, layer in self.lact_layers().items():
            for key, value in layer.stats.items():
                self.log(f"lact/{name}/{key}", value, on_step=True, on_epoch=False)
            layer.stats, layer.record_stats = {}, False

    # ---- checkpoints -----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint["consecutive_skips"] = self.consecutive_skips

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
        self.consecutive_skips = checkpoint.get("consecutive_skips", 0)
        trained = (checkpoint.get("hyper_parameters") or {}).get("optim")
        # only a checkpoint that restores an optimizer (an imported one starts a fresh optimizer)
        restores = bool(checkpoint.get("optimizer_states")) and trained is not None
        self._trained_optim = as_config(OptimConfig, trained) if restores else None

    def on_train_start(self) -> None:
        # The optimizer and schedule states are restored by now: a resumed run switches to the config's settings.
        trained, now = getattr(self, "_trained_optim", None), self.optim
        fields = ("lr", "lact_lr_scale", "weight_decay", "eps")
        if trained is not None and (
            any(getattr(trained, f) != getattr(now, f) for f in fields)
            or tuple(trained.betas) != tuple(now.betas)
        ):
            optimizer = self.trainer.optimizers[0]
            schedule = (
                self.trainer.lr_scheduler_configs[0].scheduler if self.trainer.lr_scheduler_configs else None
            )
            resume_with(optimizer, schedule, trained, self.optim)
            rank_zero_warn(
                f"resuming with the config's optimisation settings, which differ from the checkpoint's: lr "
                f"{trained.lr} -> {self.optim.lr}, weight_decay {trained.weight_decay} -> {self.optim.weight_decay}"
                " (the schedule continues from its step, scaled to the new lr)"
            )
        self._trained_optim = None


class LRMonitor(LearningRateMonitor):
    """Lightning's LearningRateMonitor (one curve per named param group), silent when the run has no logger
    (tests run with ``trainer.logger: false``) instead of failing."""

    def on_train_start(self, trainer: Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class Throughput(Callback):
    """Logs ``train/<unit>_per_s``: the module's `throughput_items(batch)` (e.g. tokens, views) over the wall
    time between consecutive training batch ends (data loading and the optimizer included), times the
    number of data-parallel ranks. Validation in between is not counted."""

    def __init__(self) -> None:
        self._last: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        count = getattr(pl_module, "throughput_items", None)
        if self._last is not None and count is not None:
            unit = getattr(pl_module, "throughput_unit", "samples")
            rate = count(batch) * trainer.world_size / (now - self._last)
            pl_module.log(f"train/{unit}_per_s", float(rate), on_step=True, on_epoch=False)
        self._last = now
