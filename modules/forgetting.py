"""Forgetting schedules as a Lightning Callback: active and temporary forgetting (docs/architecture.md, Forgetting).

Active forgetting (Chen et al., 2023) re-initialises the token embedding after every K-th optimizer step;
temporary forgetting (Anand et al., 2024) does so only before step N and trains plainly afterwards.

Protocol the LightningModule implements (duck-typed; only what the configuration uses is required). It names
no parameter paths: the callback finds the parameters through these methods, and names given as targets
are those of ``named_parameters()`` (``net.*`` in every task module, see modules/task.py)::

    def token_embedding(self) -> nn.Embedding
        # the input token embedding; target "input", its ``padding_idx`` row is zeroed after a reset,
        # and probabilistic mode replaces its rows
    def output_embedding(self) -> nn.Parameter | nn.Module   # target "output" (an untied LM head; a
        # module is taken by its ``.weight``); when tied it is the same Parameter and is reset once
    def init_parameter_(self, param: Tensor, out: Tensor, generator: torch.Generator) -> None
        # init="model": fill ``out`` (float32, CPU, the full unsharded shape of ``param``, one of the
        # module's own parameters, identified by identity) in place with a fresh draw of the model's own
        # initialiser, drawing every random number from ``generator`` so that all ranks draw the same values

Targets may also be parameter names or fnmatch patterns (``"net.embed.weight"``, ``"*.pos"``); one that
matches nothing fails at fit start, naming it. Parameters are always modified in place under
``torch.no_grad()``: a tied output embedding stays the same tensor, and optimizer references stay valid.
FSDP2-sharded parameters (DTensors) get the full tensor drawn identically on every rank, of which each
rank copies its own shard.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from datamodules.shards import seeded_generator

INIT_MODES = ("model", "normal", "match")
OPTIMIZER_STATE_MODES = ("none", "targets", "all")
_RESET_STREAM, _PROB_STREAM = 0, 1


def full_value(p: torch.Tensor) -> torch.Tensor:
    """The whole (unsharded) value of a parameter, detached; a DTensor is all-gathered."""
    p = p.detach()
    return p.full_tensor() if isinstance(p, DTensor) else p


def local_part(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` (same global shape as ``p``) that this rank holds of ``p``, on p's device/dtype.

    Every rank passes the same ``full``, so no communication is needed: ``src_data_rank=None`` makes
    ``distribute_tensor`` cut this rank's shard from its local copy.
    """
    full = full.to(p.device, p.dtype)
    if not isinstance(p, DTensor):
        return full
    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The storage this rank owns of ``p`` (the shard of a DTensor, else ``p`` itself), for in-place writes."""
    return p.to_local() if isinstance(p, DTensor) else p


@dataclass
class _Target:
    name: str  # as in named_parameters() (the first name of a tied parameter)
    param: nn.Parameter
    pad_row: int | None  # zeroed after every reset


class ForgettingSchedule(Callback):
    """Re-initialise target parameters after optimizer steps ``start + K, start + 2K, ...`` below ``stop_after``.

    The check runs in ``on_train_batch_end`` and fires only when ``trainer.global_step`` advanced, so
    under gradient accumulation it happens once per optimizer step, after the step, before the next
    forward.

    Args:
        every_k: K, optimizer steps between resets; 0 disables the periodic resets (probabilistic only).
        stop_after: N, temporary forgetting: reset only at steps < N; ``None`` = active forgetting forever.
        start: no reset at or before this step; the first one is after step ``start + K``.
        targets: ``"input"`` (token embedding, default), ``"output"`` (output embedding when untied),
            or parameter names / fnmatch patterns.
        init: ``"model"`` (the module's ``init_parameter_``), ``"normal"`` (N(0, std²)) or ``"match"``
            (normal with the current mean and std of the parameter, pad row excluded).
        std: standard deviation for ``init="normal"``.
        optimizer_state: ``"targets"`` zeroes every state tensor (Adam moments and the step count) of the
            reset parameters, ``"all"`` of every parameter, ``"none"`` leaves it.
        lr_restart: scale the learning rate of the param groups holding the targets by a per-episode
            factor: linear warmup over ``lr_warmup_steps`` steps, then linear decay to ``lr_min_ratio`` at
            the episode's last step. Episodes are the K steps ending in a reset; the factor multiplies
            whatever lr the group has (scheduler included) for the step and is undone right after.
            The groups must hold nothing but targets.
        prob: probabilistic mode: for each of the first ``prob_steps`` optimizer steps, each token id's
            embedding row is replaced with probability ``prob`` by a fresh draw (of ``init``) for that
            batch only, then restored; the embedding gets no update meanwhile (its grads are dropped).
            With tied embeddings the replaced rows are also the output rows of those ids.
        prob_steps: length of the probabilistic phase in optimizer steps.
        keep_rows: first-dim indices (token ids) whose rows a reset or probabilistic replacement leaves
            as they are, e.g. special tokens that carry the structure (mask, separator); their optimizer
            state is still reset with the rest of the parameter.
        seed: run seed; draws use (seed, reset index). ``None`` takes ``PL_GLOBAL_SEED`` (set by
            ``seed_everything``) or 0. A resumed run keeps the checkpoint's seed.
    """

    def __init__(
        self,
        every_k: int,
        stop_after: int | None = None,
        start: int = 0,
        targets: list[str] | None = None,
        init: str = "model",
        std: float = 0.02,
        optimizer_state: str = "targets",
        lr_restart: bool = False,
        lr_warmup_steps: int = 0,
        lr_min_ratio: float = 0.0,
        prob: float = 0.0,
        prob_steps: int = 0,
        keep_rows: list[int] | None = None,
        seed: int | None = None,
    ) -> None:
        if every_k < 0:
            raise ValueError(f"every_k={every_k} must be >= 0 (0 disables periodic resets)")
        if stop_after is not None and stop_after <= 0:
            raise ValueError(f"stop_after={stop_after} must be a positive step count or None")
        if start < 0:
            raise ValueError(f"start={start} must be >= 0")
        if init not in INIT_MODES:
            raise ValueError(f"init={init!r}: expected one of {INIT_MODES}")
        if optimizer_state not in OPTIMIZER_STATE_MODES:
            raise ValueError(f"optimizer_state={optimizer_state!r}: expected one of {OPTIMIZER_STATE_MODES}")
        if lr_restart and not (every_k > 0 and 0 <= lr_warmup_steps < every_k and 0 <= lr_min_ratio <= 1):
            raise ValueError(
                f"lr_restart needs every_k > 0, 0 <= lr_warmup_steps < every_k and lr_min_ratio in [0, 1]; "
                f"got every_k={every_k}, lr_warmup_steps={lr_warmup_steps}, lr_min_ratio={lr_min_ratio}"
            )
        if not 0.0 <= prob <= 1.0 or prob_steps < 0:
            raise ValueError(f"prob={prob} must be in [0, 1] and prob_steps={prob_steps} >= 0")
        self.every_k, self.stop_after, self.start = every_k, stop_after, start
        self.targets_spec = list(targets) if targets is not None else ["input"]
        if not self.targets_spec:
            raise ValueError("targets is empty: name at least one parameter (default ['input'])")
        self.init, self.std, self.optimizer_state = init, std, optimizer_state
        self.lr_restart, self.lr_warmup_steps, self.lr_min_ratio = lr_restart, lr_warmup_steps, lr_min_ratio
        self.prob, self.prob_steps = prob, prob_steps
        self.keep_rows = sorted(set(keep_rows or []))
        self.seed = seed
        # Checkpointed counters.
        self.resets = 0
        self.last_reset_step = 0
        # Runtime state.
        self._targets: list[_Target] = []
        self._seen_step = -1
        self._hooks: list = []
        self._lr_groups: dict[int, list[dict]] = {}
        self._saved_lrs: list[tuple[dict, float]] = []
        self._trainer: Trainer | None = None
        self._prob_saved: torch.Tensor | None = None
        self._prob_target: _Target | None = None

    # ---- schedule --------------------------------------------------------------------------------------
    def is_reset_step(self, step: int) -> bool:
        """Whether a reset follows optimizer step ``step`` (1-based count, = global_step after it)."""
        if self.every_k == 0 or step <= self.start or (step - self.start) % self.every_k:
            return False
        return self.stop_after is None or step < self.stop_after

    def lr_factor(self, step: int) -> float | None:
        """LR multiplier for optimizer step ``step`` (1-based), or None outside the forgetting episodes."""
        if not self.lr_restart or step <= self.start:
            return None
        k = self.every_k
        episode_end = self.start + -(-(step - self.start) // k) * k  # ceil to the next multiple
        if not self.is_reset_step(episode_end):
            return None
        t = step - (episode_end - k) - 1  # 0 .. K-1: steps already taken in this episode
        if t < self.lr_warmup_steps:
            return (t + 1) / self.lr_warmup_steps
        span = k - self.lr_warmup_steps
        return 1.0 - (1.0 - self.lr_min_ratio) * (t - self.lr_warmup_steps) / span

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            every_k=self.every_k, stop_after=self.stop_after, start=self.start, targets=self.targets_spec
        )

    # ---- setup -----------------------------------------------------------------------------------------
    def _resolve_targets(self, pl_module: LightningModule) -> list[_Target]:
        names = {id(p): n for n, p in pl_module.named_parameters()}  # tied: first name only
        emb = pl_module.token_embedding() if hasattr(pl_module, "token_embedding") else None
        pad_of = {id(emb.weight): emb.padding_idx} if emb is not None else {}
        found: dict[int, nn.Parameter] = {}
        for spec in self.targets_spec:
            if spec in ("input", "output"):
                method = "token_embedding" if spec == "input" else "output_embedding"
                if not hasattr(pl_module, method):
                    raise ValueError(
                        f"ForgettingSchedule target {spec!r} needs {type(pl_module).__name__}.{method}()"
                    )
                obj = getattr(pl_module, method)()
                params = [obj if isinstance(obj, nn.Parameter) else obj.weight]
            else:
                params = [p for n, p in pl_module.named_parameters() if fnmatch.fnmatchcase(n, spec)]
                if not params:
                    raise ValueError(
                        f"ForgettingSchedule target {spec!r} matches no parameter of "
                        f"{type(pl_module).__name__}; its parameters are {sorted(names.values())[:20]}"
                    )
            for p in params:
                if id(p) not in names:
                    raise ValueError(f"ForgettingSchedule target {spec!r} is not a parameter of the module")
                found[id(p)] = p
        return [_Target(names[i], p, pad_of.get(i)) for i, p in found.items()]

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        self._trainer = trainer
        self._targets = self._resolve_targets(pl_module)
        if self.init == "model" and not callable(getattr(pl_module, "init_parameter_", None)):
            raise ValueError(
                f"init='model' needs {type(pl_module).__name__}.init_parameter_(param, out, generator); "
                "implement it or use init='normal'/'match'"
            )
        if self.prob > 0:
            if not hasattr(pl_module, "token_embedding"):
                raise ValueError(f"prob > 0 needs {type(pl_module).__name__}.token_embedding()")
            emb = pl_module.token_embedding()
            name = next(n for n, p in pl_module.named_parameters() if p is emb.weight)
            self._prob_target = _Target(name, emb.weight, emb.padding_idx)
        if self.lr_restart:
            self._setup_lr_restart(trainer)

    def _setup_lr_restart(self, trainer: Trainer) -> None:
        ids = {id(t.param) for t in self._targets}
        for opt in trainer.optimizers:
            groups = []
            for i, g in enumerate(opt.param_groups):
                held = sum(id(p) in ids for p in g["params"])
                if held and held < len(g["params"]):
                    raise ValueError(
                        f"lr_restart needs the reset parameters in their own param group; group {i} of "
                        f"{type(opt).__name__} also holds {len(g['params']) - held} other parameter(s)"
                    )
                if held:
                    groups.append(g)
            if groups:
                self._lr_groups[id(opt)] = groups
                self._hooks += [
                    opt.register_step_pre_hook(self._pre_step),
                    opt.register_step_post_hook(self._post_step),
                ]

    def _pre_step(self, optimizer, args, kwargs) -> None:
        factor = self.lr_factor(self._trainer.global_step + 1)  # global_step counts completed steps
        if factor is None:
            return
        for g in self._lr_groups.get(id(optimizer), []):
            self._saved_lrs.append((g, g["lr"]))
            g["lr"] = g["lr"] * factor

    def _post_step(self, optimizer, args, kwargs) -> None:
        for g, lr in self._saved_lrs:
            g["lr"] = lr
        self._saved_lrs = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._seen_step = trainer.global_step

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._lr_groups = [], {}

    # ---- drawing ---------------------------------------------------------------------------------------
    def _draw(self, pl_module: LightningModule, t: _Target, g: torch.Generator) -> torch.Tensor:
        """A fresh full-shape float32 CPU value for target ``t`` (pad row zero), identical on every rank."""
        out = torch.empty(t.param.shape, dtype=torch.float32)
        if self.init == "model":
            pl_module.init_parameter_(t.param, out, g)
        elif self.init == "normal":
            out.normal_(0.0, self.std, generator=g)
        else:
            cur = full_value(t.param).float().cpu()
            if t.pad_row is not None:
                cur = torch.cat([cur[: t.pad_row], cur[t.pad_row + 1 :]])
            out.normal_(cur.mean().item(), cur.std().item(), generator=g)
        if t.pad_row is not None:
            out[t.pad_row] = 0.0
        if self.keep_rows:
            rows = torch.tensor(self.keep_rows)
            if out.ndim == 0 or rows.max() >= out.shape[0]:
                raise ValueError(
                    f"keep_rows={self.keep_rows} out of range for {t.name} of shape {tuple(out.shape)}"
                )
            out[rows] = full_value(t.param)[rows.to(t.param.device)].float().cpu()
        return out

    @torch.no_grad()
    def reset(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """Re-initialise every target in place (reset number ``resets + 1``) and its optimizer state."""
        self.resets += 1
        self.last_reset_step = step
        for i, t in enumerate(self._targets):
            fresh = self._draw(pl_module, t, seeded_generator(self.seed, _RESET_STREAM, self.resets, i))
            local_tensor(t.param).copy_(local_part(t.param, fresh))
        if self.optimizer_state != "none":
            ids = {id(t.param) for t in self._targets}
            for opt in trainer.optimizers:
                for p, state in opt.state.items():
                    if self.optimizer_state == "all" or id(p) in ids:
                        _zero_state_(state)

    # ---- hooks -----------------------------------------------------------------------------------------
    def _prob_active(self, trainer: Trainer) -> bool:
        return self.prob > 0 and trainer.global_step < self.prob_steps

    @torch.no_grad()
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if not self._prob_active(trainer):
            return
        t = self._prob_target
        w = t.param
        g = seeded_generator(self.seed, _PROB_STREAM, trainer.global_step, trainer.current_epoch, batch_idx)
        replace = torch.rand(w.shape[0], generator=g) < self.prob  # [V], same on every rank
        if t.pad_row is not None:
            replace[t.pad_row] = False
        replace[self.keep_rows] = False
        fresh = self._draw(pl_module, t, g)
        local = local_tensor(w)
        self._prob_saved = local.clone()
        mask = local_part(w, replace[:, None].expand_as(fresh).float()) > 0.5
        local.copy_(torch.where(mask, local_part(w, fresh), local))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._prob_active(trainer):
            self._prob_target.param.grad = None  # optimizers skip params without grad: frozen

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._prob_saved is not None:
            local_tensor(self._prob_target.param).copy_(self._prob_saved)
            self._prob_saved = None
        step = trainer.global_step
        if step == self._seen_step:  # accumulating: no optimizer step happened in this batch
            return
        self._seen_step = step
        did_reset = self.is_reset_step(step)
        if did_reset:
            self.reset(trainer, pl_module, step)
        if did_reset or step % max(1, trainer.log_every_n_steps) == 0:
            self._log(trainer, pl_module, step)

    def _log(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        metrics = {
            "forgetting/resets": float(self.resets),
            "forgetting/steps_since_reset": float(step - self.last_reset_step),
        }
        if self.lr_restart:
            metrics["forgetting/lr_factor"] = float(self.lr_factor(step) or 1.0)
        if hasattr(pl_module, "token_embedding"):
            emb = pl_module.token_embedding()
            norms = full_value(emb.weight).float().norm(dim=1)  # [V] row L2 norms (a DTensor is gathered)
            if emb.padding_idx is not None:
                norms = torch.cat([norms[: emb.padding_idx], norms[emb.padding_idx + 1 :]])
            metrics["forgetting/embedding_row_norm"] = norms.mean().item()
        for k, v in metrics.items():
            pl_module.log(k, v, on_step=True, on_epoch=False)

    # ---- checkpoint ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "resets": self.resets, "last_reset_step": self.last_reset_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seed = state_dict["seed"]
        self.resets = state_dict["resets"]
        self.last_reset_step = state_dict["last_reset_step"]


def freeze_all_but_embeddings(pl_module: LightningModule) -> list[str]:
    """Leave only the token embedding and the output embedding trainable (``requires_grad``); returns the
    names (as in ``named_parameters()``) of the parameters still trained.

    The adaptation step of Chen et al. (2023): on a new language only the embeddings are re-learnt and the
    body stays as pretrained. Uses the callback's protocol (``token_embedding()``, and
    ``output_embedding()`` when the module has it; tied, both are one Parameter). The task modules' optimizer
    (modules/task.py ``parameter_groups``) leaves frozen parameters out, so call this before ``fit``.
    """
    if not callable(getattr(pl_module, "token_embedding", None)):
        raise ValueError(
            f"freeze_all_but_embeddings needs {type(pl_module).__name__}.token_embedding() (the input embedding)"
        )
    keep = {id(pl_module.token_embedding().weight)}
    if callable(getattr(pl_module, "output_embedding", None)):
        out = pl_module.output_embedding()
        keep.add(id(out if isinstance(out, nn.Parameter) else out.weight))
    trained = []
    for name, p in pl_module.named_parameters():  # a tied parameter is listed once
        p.requires_grad_(id(p) in keep)
        if id(p) in keep:
            trained.append(name)
    return trained


def _zero_state_(state: dict) -> None:
    """Zero every tensor (moments, ``step``) of one parameter's optimizer state in place."""
    for k, v in state.items():
        if torch.is_tensor(v):
            v.zero_()
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            state[k] = type(v)(0)
