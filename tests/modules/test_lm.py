"""LMModule: schedule, optimizer groups, validation by position bucket, generation, fitting the tiny config,
resuming it, bad configs failing before training, and a 56K-token training step on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

import train
from benchmarks.lm_long_step import measure
from datamodules.mqar import MQARDataModule
from lact.models.lm import LMConfig
from modules.lm import LMModule, bucket_edges, bucket_name
from modules.task import OptimConfig
from tests.modules.schedule_helpers import lr_factor

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


TINY = str(ROOT / "configs" / "lm" / "tiny.yaml")


OPTIM_FIELDS = {f for f in OptimConfig.__dataclass_fields__}


def tiny_module(eod_id: int | None = None, **kwargs) -> LMModule:
    config = LMConfig(
        vocab_size=64,
        dim=32,
        num_layers=2,
        num_heads=4,
        lact={"heads": 2, "chunk_size": 16},
        window=8,
        eod_id=eod_id,
    )
    optim = OptimConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in OPTIM_FIELDS})
    return LMModule(config, optim=optim, **kwargs)


def quiet_trainer(**kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )  # fmt: skip


def test_lr_schedule_warms_up_then_follows_a_cosine():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 100, 0.1) == pytest.approx(0.1)


def test_position_buckets_double():
    assert bucket_edges(5000, 1024) == [0, 1024, 2048, 4096, 5000]
    assert bucket_edges(1024, 1024) == [0, 1024]
    assert [bucket_name(a, b) for a, b in [(0, 1024), (1024, 2048), (2048, 4096)]] == [
        "0-1K",
        "1K-2K",
        "2K-4K",
    ]
    assert bucket_name(64, 128) == "64-128"


def test_weight_decay_on_matrices_only():
    module = tiny_module(weight_decay=0.1, total_steps=10)
    optimizer = module.configure_optimizers()["optimizer"]
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["matrices"]["weight_decay"] == 0.1 and groups["vectors"]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in groups["matrices"]["params"])
    assert all(p.ndim < 2 for p in groups["vectors"]["params"])
    counted = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert counted == sum(p.numel() for p in module.parameters())


class GradNormAfterStep(Callback):
    norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad.norm() for p in pl_module.parameters() if p.grad is not None]
        GradNormAfterStep.norms.append(float(torch.stack(grads).norm()))


def test_gradients_are_clipped_to_grad_clip():
    GradNormAfterStep.norms = []
    module = tiny_module(grad_clip=1e-3, total_steps=2)
    data = MQARDataModule(vocab_size=64, num_pairs=2, gap=8, seq_len=32, batch_size=2, batches_per_epoch=2)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[GradNormAfterStep()])
    trainer.fit(module, datamodule=data)
    assert len(GradNormAfterStep.norms) == 2
    assert all(n == pytest.approx(1e-3, rel=1e-3) for n in GradNormAfterStep.norms), GradNormAfterStep.norms
    assert trainer.callback_metrics["train/grad_norm"] > 1e-2  # the logged norm is the one before clipping


def test_validation_logs_loss_by_position_bucket():
    torch.manual_seed(0)
    module = tiny_module(bucket_size=64)
    data = MQARDataModule(vocab_size=64, num_pairs=4, gap=150, seq_len=300, batch_size=4, val_samples=8)
    metrics = quiet_trainer().validate(module, datamodule=data, verbose=False)[0]
    # MQAR labels only the answers: 4 queries at positions 158..164, all in the 128-256 bucket
    assert set(metrics) == {"val/loss", "val/ppl", "val/accuracy", "val/loss_pos_128-256"}, metrics
    assert metrics["val/loss_pos_128-256"] == pytest.approx(metrics["val/loss"], rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-4)


def test_every_position_bucket_is_logged_and_they_average_to_the_loss():
    torch.manual_seed(0)
    module = tiny_module(bucket_size=64)
    tokens = torch.randint(0, 64, (4, 301))
    batches = [{"input_ids": tokens[i : i + 2, :-1], "labels": tokens[i : i + 2, 1:]} for i in (0, 2)]
    metrics = quiet_trainer().validate(
        module, dataloaders=DataLoader(batches, batch_size=None), verbose=False
    )[0]
    sizes = {"0-64": 64, "64-128": 64, "128-256": 128, "256-300": 44}
    assert set(metrics) == {"val/loss", "val/ppl", "val/accuracy"} | {f"val/loss_pos_{k}" for k in sizes}
    mean = sum(metrics[f"val/loss_pos_{k}"] * n for k, n in sizes.items()) / 300
    assert mean == pytest.approx(metrics["val/loss"], rel=1e-5)
    assert metrics["val/loss"] == pytest.approx(math.log(64), rel=0.05)  # untrained: near uniform


@pytest.mark.parametrize("score_after_eod", [False, True])
def test_packed_documents_are_scored_and_bucketed_by_position_in_the_document(score_after_eod):
    torch.manual_seed(0)
    eod = 63
    module = tiny_module(eod_id=eod, bucket_size=32, score_after_eod=score_after_eod)
    tokens = torch.randint(0, eod, (2, 161))
    for row, ends in ((0, (20, 21, 99)), (1, (70,))):  # documents of 21, 1 (empty), 78, 61 / 71, 90 tokens
        tokens[row, list(ends)] = eod
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    metrics = quiet_trainer().validate(
        module, dataloaders=DataLoader([batch], batch_size=None), verbose=False
    )[0]
    # reference: per-token losses of the full forward, positions within documents by a plain loop
    with torch.no_grad():
        logits = module.net(batch["input_ids"])
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
    positions = torch.zeros(2, 160, dtype=torch.long)
    for b in range(2):
        for t in range(1, 160):
            positions[b, t] = 0 if tokens[b, t - 1] == eod else positions[b, t - 1] + 1
    scored = torch.ones(2, 160, dtype=torch.bool) if score_after_eod else batch["input_ids"] != eod
    assert scored.sum() == (320 if score_after_eod else 316)
    assert metrics["val/loss"] == pytest.approx(losses[scored].mean().item(), rel=1e-5)
    for lo, hi in ((0, 32), (32, 64), (64, 128)):  # no document reaches 128 tokens: no 128-160 bucket
        inside = scored & (positions >= lo) & (positions < hi)
        assert metrics[f"val/loss_pos_{lo}-{hi}"] == pytest.approx(losses[inside].mean().item(), rel=1e-5)
    assert "val/loss_pos_128-160" not in metrics


def test_predict_generates_text_with_the_cache():
    module = tiny_module(max_new_tokens=7, temperature=0.0)
    prompts = [{"input_ids": torch.tensor([[40, 41, 33]]), "prompt": ["()!"]}]
    out = quiet_trainer().predict(module, dataloaders=DataLoader(prompts, batch_size=None))
    (result,) = out[0]
    assert result["prompt"] == "()!" and len(result["tokens"]) == 7
    assert isinstance(result["completion"], str)


def test_predict_on_the_tiny_config_writes_completions(tmp_path):
    train.main(["fit", *tiny_args(tmp_path, 2)])
    args = [a for a in tiny_args(tmp_path, 2) if "max_steps" not in a]
    train.main(["predict", *args, "--model.init_args.max_new_tokens=5", "--ckpt_path=last"])
    lines = (tmp_path / "completions.jsonl").read_text(encoding="utf-8").splitlines()
    results = [json.loads(line) for line in lines]
    assert [r["prompt"] for r in results] == ["def forward(self", "The LaCT operator"]
    assert all(len(r["tokens"]) == 5 for r in results)


def test_checkpoint_hyperparameters_load_weights_only(tmp_path):
    module = tiny_module()
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    data = MQARDataModule(vocab_size=64, num_pairs=2, gap=8, seq_len=32, batch_size=2, batches_per_epoch=1)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["hyper_parameters"]["net"]["window"] == 8
    restored = LMModule.load_from_checkpoint(path, weights_only=True)
    assert restored.config == module.config


class LossRecorder(Callback):
    losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        LossRecorder.losses.append(float(outputs["loss"]))


class StartState(Callback):
    """At fit start: the global step and a copy of the optimizer state tensors."""

    seen: list[tuple[int, dict]] = []

    def on_train_start(self, trainer, pl_module):
        state = trainer.optimizers[0].state_dict()["state"]
        copy = {i: {k: v.clone() for k, v in s.items()} for i, s in state.items()}
        StartState.seen.append((trainer.global_step, copy))


def tiny_args(root: Path, steps: int) -> list[str]:
    # The tiny config, shrunk so a fit takes seconds; shards prepared from the repo's README and lact/.
    return [
        f"--config={TINY}",
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={steps}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=0",
        "--model.init_args.optim.warmup_steps=5",
        f"--data.init_args.text=[{ROOT / 'README.md'}, {ROOT / 'lact'}]",
        f"--data.init_args.data_dir={root / 'data'}",
        "--data.init_args.seq_len=64",
        "--data.init_args.batch_size=4",
    ]


def test_twenty_steps_of_tiny_lower_the_loss(tmp_path):
    LossRecorder.losses = []
    train.main(["fit", *tiny_args(tmp_path, 20), "--trainer.callbacks+=tests.modules.test_lm.LossRecorder"])
    losses = LossRecorder.losses
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses


def test_resume_continues_at_the_same_step_with_the_same_optimizer_state(tmp_path):
    train.main(["fit", *tiny_args(tmp_path, 3)])
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 3
    StartState.seen = []
    cli = train.main(
        [
            "fit",
            *tiny_args(tmp_path, 5),
            "--trainer.callbacks+=tests.modules.test_lm.StartState",
            "--ckpt_path=last",
        ]
    )
    ((step, state),) = StartState.seen
    assert step == 3
    expected = saved["optimizer_states"][0]["state"]
    assert state.keys() == expected.keys() and len(state) > 10
    for i in expected:
        for name, value in expected[i].items():
            torch.testing.assert_close(state[i][name], value, rtol=0, atol=0)
    assert cli.trainer.global_step == 5


@pytest.mark.parametrize(("override", "field"), [("window=0", "window"), ("num_heads=3", "num_heads")])
def test_bad_config_fails_before_training_naming_the_field(tmp_path, capsys, override, field):
    with pytest.raises((SystemExit, ValueError)) as failure:
        train.main(["fit", *tiny_args(tmp_path, 5), f"--model.init_args.net.{override}"])
    message = str(failure.value) + capsys.readouterr().err
    assert f"LMConfig.{field}" in message, message[-2000:]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "data").exists()


def test_an_eod_id_other_than_the_shards_one_fails_before_the_first_step(tmp_path):
    """The tiny config's shards are packed by the byte tokenizer (end-of-document id 256, recorded in every
    sample's meta.json); net.eod_id=10 would split documents at a byte: setup refuses, naming both."""
    LossRecorder.losses = []
    with pytest.raises(ValueError) as failure:
        train.main(
            [
                "fit",
                *tiny_args(tmp_path, 2),
                "--model.init_args.net.eod_id=10",
                "--trainer.callbacks+=tests.modules.test_lm.LossRecorder",
            ]
        )
    message = str(failure.value)
    assert "net.eod_id=10 (model.init_args.net.eod_id)" in message, message
    assert "eod_id=256 in the meta.json of sample" in message and str(tmp_path / "data" / "train") in message
    assert "model.init_args.net.eod_id: 256" in message
    assert LossRecorder.losses == []


def test_shards_without_a_recorded_eod_id_are_not_checked(tmp_path):
    from datamodules.lm import LMDataModule
    from datamodules.writers import TokenWriter

    for meta, expected in (({}, []), ({"eod_id": 7}, [7, 7])):
        writer = TokenWriter(str(tmp_path / str(len(meta))), samples_per_shard=4)
        writer.write("seq000000000", np.arange(9, dtype=np.uint16), meta)
        writer.close()
        data = LMDataModule(train_shards=writer.shards, val_shards=writer.shards, seq_len=8)
        assert [eod for eod, _ in data.packed_eod_ids("fit")] == expected
        assert [eod for eod, _ in data.packed_eod_ids("validate")] == expected[:1]
        assert [eod for eod, _ in data.packed_eod_ids("test")] == expected[:1]  # test shards: the val ones
        assert data.packed_eod_ids("predict") == []


@pytest.mark.slow
def test_56k_token_training_step_runs_on_cpu_with_linear_memory():
    # One fwd + bwd + AdamW step of the tiny model on one 56K-token sequence; peak memory above the model and
    # inputs grows linearly: doubling the length (28K -> 56K) about doubles it, where anything quadratic in
    # the length gives ~4. The 32K / 56K / 64K table is benchmarks/lm_long_step.py (kept out of the suite:
    # three such steps take minutes), whose subprocess step this test runs.
    # The peak resident set of a process varies from run to run (measured ratios 1.93-2.09 with the tiny
    # config's packed-document path), so the bound is 2.3 and an over-limit ratio is measured once more before
    # failing. The peak is taken above the resident set in use before the step (benchmarks/lm_long_step.py):
    # measured from the earlier high-water mark instead, a fresh clone gave 2.4-2.6.
    ratios = []
    for _ in range(2):
        step = measure(56 * 1024)
        assert math.isfinite(step["loss"]) and step["peak_mib"] > 1000, step  # > 1 GB: the step was measured
        half = measure(28 * 1024)
        ratios.append(step["peak_mib"] / half["peak_mib"])
        if ratios[-1] <= 2.3:
            break
    assert ratios[-1] <= 2.3, f"peak 56K / 28K = {ratios}; last 56K step {step}, 28K step {half}"


def test_resume_continues_the_same_tensorboard_run_directory_and_logs_the_lr(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def args(steps: int) -> list[str]:  # the default logger: TensorBoard in the run directory itself
        return [a for a in tiny_args(tmp_path, steps) if a != "--trainer.logger=false"] + [
            "--trainer.log_every_n_steps=1"
        ]

    train.main(["fit", *args(2)])
    train.main(["fit", *args(4), "--ckpt_path=last"])
    assert not list(tmp_path.rglob("version_*")), "a resume must not open a new logger version"
    events = sorted(tmp_path.glob("events.out.tfevents.*"))
    assert len(events) == 2 and (tmp_path / "checkpoints" / "last.ckpt").exists()
    run = EventAccumulator(str(tmp_path))
    run.Reload()
    scalars = run.Tags()["scalars"]
    assert [e.step for e in run.Scalars("train/loss")] == [0, 1, 2, 3]  # one curve across the resume
    lrs = [e.value for e in run.Scalars("lr-AdamW/matrices")]
    assert len(lrs) == 4 and lrs[0] == pytest.approx(0.003 / 5)  # warmup_steps=5: step 0 at lr / 5
    assert "train/tokens_per_s" in scalars and "train/grad_norm" in scalars


def test_train_py_test_reports_loss_and_perplexity_by_position_bucket(tmp_path, capsys):
    train.main(["fit", *tiny_args(tmp_path, 2)])
    args = [a for a in tiny_args(tmp_path, 2) if "limit_val_batches" not in a]
    test = ["test", *args, "--ckpt_path=last", "--trainer.limit_test_batches=2"]
    metrics = {
        k: float(v)
        for k, v in train.main([*test, "--model.init_args.bucket_size=32"]).trainer.callback_metrics.items()
    }
    buckets = {f"test/{m}_pos_{b}" for m in ("loss", "ppl") for b in ("0-32", "32-64")}
    assert {"test/loss", "test/ppl", "test/accuracy"} | buckets == set(metrics)
    assert metrics["test/ppl"] == pytest.approx(math.exp(metrics["test/loss"]), rel=1e-4)
    # two buckets of 32 scored tokens each in every 64-token sequence: they average to the loss
    mean = (metrics["test/loss_pos_0-32"] + metrics["test/loss_pos_32-64"]) / 2
    assert mean == pytest.approx(metrics["test/loss"], rel=1e-5)
    assert metrics["test/ppl_pos_0-32"] == pytest.approx(math.exp(metrics["test/loss_pos_0-32"]), rel=1e-4)
    printed = capsys.readouterr().out
    assert all(name in printed for name in buckets | {"test/loss"})
