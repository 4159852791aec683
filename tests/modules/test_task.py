"""The shared training layer (modules/task.py) in every task: one schedule, one step-skipping policy, plain
hyperparameters in checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from lact.models.lm import LMConfig
from modules.ema import EMA, averaged_weights
from modules.lm import LMModule
from modules.mlm import MaskedLMModule
from modules.nvs import NVSModule
from modules.resilience import DivergenceError
from modules.task import OptimConfig, as_config, parameter_groups
from modules.video import VideoModule
from tests.modules.nvs_helpers import TINY, make_batch
from tests.modules.schedule_helpers import lr_factors

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TASKS = ("lm", "nvs", "mlm", "video")
VIDEO_TINY = Path(__file__).resolve().parents[2] / "configs" / "video" / "tiny.yaml"


def build(task: str, optim: OptimConfig) -> torch.nn.Module:
    if task == "lm":
        net = LMConfig(
            vocab_size=32, dim=32, num_layers=1, num_heads=4, lact={"heads": 2, "chunk_size": 8}, window=8
        )
        return LMModule(net, optim=optim)
    if task == "nvs":
        return NVSModule(net=TINY, optim=optim)
    if task == "video":
        net = yaml.safe_load(VIDEO_TINY.read_text())["model"]["init_args"]["net"]
        return VideoModule(net={**net, "num_layers": 1}, optim=optim)
    return MaskedLMModule(
        net={"vocab_size": 32, "dim": 16, "depth": 1, "num_heads": 2, "max_len": 8}, optim=optim
    )


def batches(task: str, count: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    if task == "nvs":
        items = [make_batch(seed) for seed in range(count)]
    elif task == "video":  # 8-frame 16x16 clips, as configs/video/tiny.yaml expects
        items = [
            {
                "frames": torch.randint(0, 256, (2, 8, 16, 16, 3), dtype=torch.uint8, generator=g),
                "key": [f"clip_{b}_{i}" for i in range(2)],
            }
            for b in range(count)
        ]
    else:
        items = []
        for _ in range(count):
            ids = torch.randint(3, 32, (4, 8), generator=g)
            items.append({"input_ids": ids, "labels": torch.roll(ids, -1, dims=1)})
    return DataLoader(items, batch_size=None)


def quiet_trainer(**kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, **kwargs,
    )  # fmt: skip


def test_the_same_optim_config_builds_the_same_schedule_in_every_task():
    optim = OptimConfig(lr=2e-3, warmup_steps=3, total_steps=12, min_lr_ratio=0.2)
    expected = [2e-3 * f for f in lr_factors(3, 12, 0.2, 16)]
    # The schedule itself: linear warmup, cosine to lr * min_lr_ratio at total_steps, then flat.
    assert expected[:3] == pytest.approx([2e-3 / 3, 4e-3 / 3, 2e-3])
    cosine = [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (s - 3) / 9)) for s in range(3, 13)]
    assert expected[3:13] == pytest.approx([2e-3 * c for c in cosine])
    assert expected[12:] == pytest.approx([2e-3 * 0.2] * 4)
    for task in TASKS:
        config = build(task, optim).configure_optimizers()
        optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
        assert config["lr_scheduler"]["interval"] == "step"
        seen = []
        for _ in range(16):
            assert len({g["lr"] for g in optimizer.param_groups}) == 1, task  # every group follows it
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        assert seen == pytest.approx(expected, rel=1e-6), task


def test_schedule_state_round_trips_through_a_state_dict():
    module = build("lm", OptimConfig(warmup_steps=2, total_steps=10))
    first = module.configure_optimizers()
    for _ in range(5):
        first["optimizer"].step()
        first["lr_scheduler"]["scheduler"].step()
    second = module.configure_optimizers()  # restored as Lightning does: optimizer, then scheduler
    second["optimizer"].load_state_dict(first["optimizer"].state_dict())
    second["lr_scheduler"]["scheduler"].load_state_dict(first["lr_scheduler"]["scheduler"].state_dict())
    for config in (first, second):
        config["optimizer"].step()
        config["lr_scheduler"]["scheduler"].step()
    assert second["optimizer"].param_groups[0]["lr"] == first["optimizer"].param_groups[0]["lr"]


def test_total_steps_default_to_the_trainer_and_an_unbounded_run_is_refused():
    module = build("mlm", OptimConfig(warmup_steps=1))
    quiet_trainer(max_steps=7).fit(module, batches("mlm", 1))
    assert module.total_steps() == 7
    with pytest.raises(ValueError, match="optim.total_steps"):
        quiet_trainer(max_steps=-1, max_epochs=-1).fit(build("mlm", OptimConfig()), batches("mlm", 1))


def test_weight_decay_groups_follow_the_documented_rule():
    module = build("mlm", OptimConfig(no_decay=["net.pos"]))
    groups = {g["name"]: g for g in parameter_groups(module, 0.1, ["net.pos"])}
    assert [p is module.net.embed.weight for p in groups["embeddings"]["params"]] == [True]  # tied head too
    assert groups["embeddings"]["weight_decay"] == groups["vectors"]["weight_decay"] == 0.0
    assert any(p is module.net.pos for p in groups["vectors"]["params"])
    assert groups["matrices"]["weight_decay"] == 0.1
    assert all(p.ndim >= 2 for p in groups["matrices"]["params"])


def test_lact_parameters_train_at_their_own_learning_rate():
    module = build("video", OptimConfig(lr=2e-3, warmup_steps=2, total_steps=10, lact_lr_scale=5.0))
    lact = {id(p) for layer in module.lact_layers().values() for p in layer.parameters()}
    config = module.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"matrices", "vectors", "lact_matrices", "lact_vectors"}
    assert {id(p) for n in ("lact_matrices", "lact_vectors") for p in groups[n]["params"]} == lact
    assert groups["lact_matrices"]["weight_decay"] == groups["matrices"]["weight_decay"] > 0
    assert groups["lact_vectors"]["weight_decay"] == 0.0
    floor = 2e-3 * OptimConfig().min_lr_ratio  # the cosine's one floor: the smaller group's
    for step in range(8):  # warmup: the LaCT groups at 5x the others; cosine: 5x lr down to the same floor
        other = groups["matrices"]["lr"]
        for name in ("lact_matrices", "lact_vectors"):
            if step < 2:
                assert groups[name]["lr"] == pytest.approx(5 * other)
            else:
                expected = (5 * 2e-3 - floor) / (2e-3 - floor)
                assert (groups[name]["lr"] - floor) / (other - floor) == pytest.approx(expected)
        optimizer.step()
        schedule.step()
    assert floor < groups["matrices"]["lr"] < 2e-3  # the schedule moved
    plain_run = build("video", OptimConfig(total_steps=10)).configure_optimizers()
    default = {g["name"] for g in plain_run["optimizer"].param_groups}
    assert default == {"matrices", "vectors"}  # scale 1: the usual groups
    with pytest.raises(ValueError, match="OptimConfig.lact_lr_scale"):
        OptimConfig(lact_lr_scale=0)


class Poison(Callback):
    """Snapshots the parameters around the poisoned batch and after the last one."""

    def __init__(self, poisoned: int):
        self.poisoned, self.before, self.after, self.final = poisoned, None, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.poisoned:
            self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        snapshot = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        if batch_idx == self.poisoned:
            self.after = snapshot
        self.final = snapshot


@pytest.mark.parametrize(
    ("task", "poison"), [("lm", "nan"), ("nvs", "inf"), ("mlm", "nan"), ("video", "nan")]
)
def test_a_non_finite_loss_skips_the_step_and_training_goes_on(task, poison, tmp_path):
    """nan: NaN gradients too. inf: a non-finite constant added to the loss, so the gradients stay finite and
    only the loss tells that the step is bad."""
    torch.manual_seed(0)
    module = build(task, OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1))
    original = module.training_step

    def training_step(batch, batch_idx):
        loss = original(batch, batch_idx)
        if batch_idx != 1:
            return loss
        return loss * float("nan") if poison == "nan" else loss + float("inf")

    module.training_step = training_step
    record = Poison(poisoned=1)
    trainer = quiet_trainer(max_steps=4, callbacks=[record])
    with pytest.warns(UserWarning, match="optimizer step skipped"):
        trainer.fit(module, batches(task, 4))
    assert trainer.global_step == 4 and module.skipped_steps == 1
    for name, value in record.before.items():
        assert torch.equal(record.after[name], value), name  # not even weight decay touched them
    assert any(not torch.equal(record.final[n], record.after[n]) for n in record.after)  # later steps train
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0

    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # plain data only: dataclasses are stored as dicts
    assert ckpt["skipped_steps"] == 1 and ckpt["hyper_parameters"]["optim"]["lr"] == 1e-2
    restored = type(module).load_from_checkpoint(path, weights_only=True)
    assert restored.skipped_steps == 1 and restored.optim == module.optim


class EMARecord(Callback):
    """The EMA callback's averages after every batch (placed after the EMA in the callback list)."""

    def __init__(self, ema: EMA):
        self.ema, self.averages = ema, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.averages.append({n: t.clone() for n, t in self.ema.averages.items()})


def test_the_ema_of_the_weights_ignores_a_skipped_step():
    torch.manual_seed(0)
    module = build("video", OptimConfig(lr=1e-2, warmup_steps=0))
    original = module.training_step

    def training_step(batch, batch_idx):
        return original(batch, batch_idx) * (float("nan") if batch_idx == 2 else 1.0)

    module.training_step = training_step
    ema = EMA(decay=0.5)
    record = EMARecord(ema)
    with pytest.warns(UserWarning, match="optimizer step skipped"):
        quiet_trainer(max_steps=4, callbacks=[ema, record]).fit(module, batches("video", 4))
    assert module.skipped_steps == 1
    before, skipped, after = record.averages[1], record.averages[2], record.averages[3]
    assert all(torch.equal(skipped[n], before[n]) for n in before)  # the skipped step left it alone
    assert any(not torch.equal(after[n], skipped[n]) for n in before)  # the next good step moved it


class WeightsSeen(Callback):
    """The network's weights when each test batch starts (after every callback's on_test_start)."""

    def __init__(self):
        self.seen = []

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen.append({n: p.detach().clone() for n, p in pl_module.net.named_parameters()})


def test_test_scores_the_averaged_weights_and_scripts_read_them_from_the_checkpoint(tmp_path):
    """`train.py test` scores what predict renders (the EMA averages), the training weights come back
    afterwards, and a script building the network from the checkpoint file gets the same averages."""
    torch.manual_seed(0)
    module = build("nvs", OptimConfig(lr=1e-2, warmup_steps=0))
    ema, seen = EMA(decay=0.5), WeightsSeen()
    trainer = quiet_trainer(max_steps=3, callbacks=[ema, seen], default_root_dir=tmp_path)
    trainer.fit(module, batches("nvs", 3))
    trained = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    assert any(not torch.equal(trained[n], ema.averages[n]) for n in trained)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    trainer.test(module, batches("nvs", 1), verbose=False)
    assert all(torch.equal(seen.seen[0][n], ema.averages[n]) for n in trained)
    assert all(torch.equal(p, trained[n]) for n, p in module.net.named_parameters())
    averages = averaged_weights(torch.load(tmp_path / "last.ckpt", weights_only=True))
    assert averages.keys() >= trained.keys()
    assert all(torch.equal(averages[n], ema.averages[n]) for n in trained)
    plain = quiet_trainer(max_steps=1, default_root_dir=tmp_path / "plain")
    plain.fit(build("nvs", OptimConfig()), batches("nvs", 1))
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    assert averaged_weights(torch.load(tmp_path / "plain.ckpt", weights_only=True)) is None


def test_too_many_consecutive_skips_stop_the_run_naming_the_field():
    module = build("nvs", OptimConfig(skip_grad_norm=1e-9, max_consecutive_skips=2))
    with pytest.warns(UserWarning), pytest.raises(DivergenceError, match="max_consecutive_skips"):
        quiet_trainer(max_steps=5).fit(module, batches("nvs", 5))
    assert module.skipped_steps == 2


def test_trainer_gradient_clipping_is_refused_in_every_task():
    for task in ("lm", "mlm"):
        with pytest.raises(ValueError, match="optim.grad_clip"):
            quiet_trainer(max_steps=1, gradient_clip_val=1.0).fit(
                build(task, OptimConfig()), batches(task, 1)
            )


def test_configs_accept_dicts_and_nested_dataclasses():
    assert as_config(OptimConfig, {"lr": 0.5, "betas": [0.8, 0.9]}) == OptimConfig(lr=0.5, betas=(0.8, 0.9))
    with pytest.raises(ValueError, match="no field"):
        as_config(OptimConfig, {"learning_rate": 0.5})
    with pytest.raises(ValueError, match="OptimConfig.min_lr_ratio"):
        OptimConfig(min_lr_ratio=2.0)


def lact_scalars(logdir) -> dict[str, list[float]]:
    """Every `lact/...` scalar the TensorBoard logger wrote under logdir, by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith("lact/"):
                values.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return values


@pytest.mark.parametrize("task", ["lm", "nvs"])
def test_fast_weight_diagnostics_reach_tensorboard_every_log_step(task, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    logged = {}
    for base_lr in (2e-6, 1.0):
        torch.manual_seed(0)
        module = build(task, OptimConfig(lr=1e-3, warmup_steps=0))
        for layer in module.lact_layers().values():
            layer.base_lr = base_lr  # the lr projection's offset: inner lr ~ base_lr at init
            if layer.schedule == "causal":
                layer.chunk_size = 4  # two chunks of the 8-token batches: one update (the last only reads)
        logdir = tmp_path / f"{task}_{base_lr}"
        Trainer(
            accelerator="cpu", logger=TensorBoardLogger(logdir), enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, max_steps=4,
            log_every_n_steps=2,
        ).fit(module, batches(task, 4))  # fmt: skip
        logged[base_lr] = lact_scalars(logdir)
        # off again after the logging steps: no layer keeps recording
        assert not any(layer.record_stats for layer in module.lact_layers().values())
    blocks = list(build(task, OptimConfig()).lact_layers())
    assert blocks == [f"block{i}" for i in range(len(blocks))] and blocks
    for base_lr, values in logged.items():
        assert sorted(values) == sorted(f"lact/{b}/{k}" for b in blocks for k in ("update_ratio", "inner_lr"))
        assert all(len(v) == 2 for v in values.values()), values  # steps 2 and 4 of 4
        for b in blocks:
            ratio, lr = values[f"lact/{b}/update_ratio"], values[f"lact/{b}/inner_lr"]
            if base_lr < 1e-5:  # an inner lr near the floor leaves the memory untouched
                assert max(ratio) < 1e-4 and max(lr) < 1e-5, (ratio, lr)
            else:
                assert min(ratio) > 1e-2 and 0.2 < min(lr) < 2, (ratio, lr)


class FakeClock:
    """Replaces time.monotonic in Lightning's Timer: `seconds` advance only when told."""

    def __init__(self):
        self.seconds = 1000.0

    def __call__(self) -> float:
        return self.seconds


class SecondPerStep(Callback):
    """Each training step takes exactly one second of the fake clock; records the lr every step used."""

    def __init__(self, clock: FakeClock):
        self.clock, self.lrs = clock, []

    def on_train_batch_start(self, trainer, *args) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.clock.seconds += 1.0  # by the scheduler's step at its end, step s has used s + 1 seconds


@pytest.mark.parametrize("task", ["lm", "nvs"])
def test_a_time_schedule_anneals_exactly_when_max_time_runs_out(task, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("lightning.pytorch.callbacks.timer.time.monotonic", clock)
    optim = OptimConfig(lr=1e-3, warmup_steps=2, min_lr_ratio=0.1, schedule="time")
    steps = SecondPerStep(clock)
    trainer = quiet_trainer(max_time={"seconds": 8}, max_steps=-1, max_epochs=100, callbacks=[steps])
    trainer.fit(build(task, optim), batches(task, 4))
    # One second per step of an 8-second budget: the time, not a step count, ends the run after 8 steps,
    # and the cosine runs over the fraction of the budget spent before each step (warmup in steps).
    assert trainer.global_step == 8
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8)]
    expected = [1e-3 / 2, 2e-3 / 2] + [1e-3 * c for c in cosine[2:]]
    assert steps.lrs == pytest.approx(expected, rel=1e-6)


def test_a_time_schedule_without_max_time_is_refused_before_training():
    module = build("lm", OptimConfig(schedule="time"))
    with pytest.raises(ValueError, match="trainer.max_time"):
        quiet_trainer(max_steps=3).fit(module, batches("lm", 3))
    with pytest.raises(ValueError, match="OptimConfig.schedule"):
        OptimConfig(schedule="epochs")
