"""VideoModule: fitting lowers the flow-matching loss, the CLI resumes from `last` (EMA included), predict
writes GIFs, validation reports a per-chunk curve and writes samples, bad configs fail before the first step."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

import train
from datamodules.prepare import main as prepare
from datamodules.readers import collate, iter_videos
from datamodules.videos import generate_video
from datamodules.writers import VideoWriter
from modules.ema import EMA
from modules.video import VideoModule, VideoPredictionWriter, shift_time
from tests.lightning_helpers import Losses, quiet_trainer

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "configs" / "video" / "tiny.yaml"
TINY = yaml.safe_load(TINY_YAML.read_text())["model"]["init_args"]


def clips(count: int, batch: int = 4, seed: int = 0) -> list[dict]:
    """`count` batches of procedural 8-frame 16x16 clips (uint8 frames, as the shards hold them)."""
    out = []
    for b in range(count):
        videos = [generate_video([seed, b, i], num_frames=8, height=16, width=16) for i in range(batch)]
        frames = torch.from_numpy(torch.stack([torch.from_numpy(v["frames"]) for v in videos]).numpy())
        out.append({"frames": frames, "key": [f"clip_{seed}_{b}_{i}" for i in range(batch)]})
    return out


def test_shift_time_keeps_the_ends_and_raises_the_middle():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    shifted = shift_time(t, 3.0)
    torch.testing.assert_close(shifted, torch.tensor([0.0, 0.5, 0.75, 1.0]))


def test_fit_20_steps_lowers_the_loss(tmp_path, one_thread):
    torch.manual_seed(0)
    module = VideoModule(**TINY)
    losses = Losses()
    batches = clips(2)
    quiet_trainer(tmp_path, max_steps=20, callbacks=[losses], limit_val_batches=0).fit(
        module, DataLoader(batches, batch_size=None)
    )
    assert len(losses.values) == 20
    assert sum(losses.values[-5:]) / 5 < 0.7 * sum(losses.values[:5]) / 5, losses.values


def test_validation_reports_every_chunk_and_writes_sample_gifs(tmp_path, one_thread):
    torch.manual_seed(0)
    module = VideoModule(**{**TINY, "num_samples": 2})
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[EMA(decay=0.5)], num_sanity_val_steps=0)
    val = DataLoader(clips(1, batch=2, seed=9), batch_size=None)
    trainer.fit(module, DataLoader(clips(2), batch_size=None), val)
    metrics = trainer.callback_metrics
    chunk_losses = [float(metrics[f"val/loss_chunk_{i:02d}"]) for i in range(4)]
    assert float(metrics["val/loss"]) == pytest.approx(sum(chunk_losses) / 4, rel=1e-5)
    gifs = sorted((tmp_path / "samples").rglob("*.gif"))
    assert len(gifs) == 2
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames == 8 and gif.size == (32, 16)  # ground truth | sample, side by side
    # validation is deterministic: the same weights give the same per-chunk losses
    again = trainer.validate(module, val, verbose=False)[0]
    assert again["val/loss"] == pytest.approx(float(metrics["val/loss"]), rel=1e-6)


def test_ema_is_used_for_validation_and_survives_a_checkpoint(tmp_path, one_thread):
    torch.manual_seed(0)
    module = VideoModule(**TINY)
    ema = EMA(decay=0.9)
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[ema], limit_val_batches=0)
    trainer.fit(module, DataLoader(clips(3), batch_size=None))
    weights = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    averages = {n: a.clone() for n, a in ema.averages.items()}
    assert any(not torch.equal(weights[n], averages[n]) for n in weights)
    ema.swap_in(module)
    assert all(torch.equal(p, averages[n]) for n, p in module.net.named_parameters())
    ema.swap_out(module)
    assert all(torch.equal(p, weights[n]) for n, p in module.net.named_parameters())
    restored = EMA(decay=0.9)
    restored.load_state_dict(ema.state_dict())
    restored.ensure(VideoModule(**TINY))  # a fresh model: the average comes from the checkpoint, not from it
    assert all(torch.equal(restored.averages[n], averages[n]) for n in averages)


def test_cli_fit_resume_from_last_test_and_predict_write_gifs(tmp_path, one_thread):
    data = tmp_path / "videos"
    prepare(
        [
            "videos",
            "--out",
            str(data),
            "--num-videos",
            "8",
            "--frames",
            "8",
            "--height",
            "16",
            "--width",
            "16",
        ]
    )
    root = tmp_path / "run"
    common = [
        f"--config={TINY_YAML}",
        f"--trainer.default_root_dir={root}",
        f"--data.init_args.train_shards={data}",
        f"--data.init_args.val_shards={data}",
        "--data.init_args.val_batch_size=2",
        "--trainer.limit_val_batches=1",
    ]
    train.main(["fit", *common, "--trainer.max_steps=4", "--trainer.val_check_interval=4"])
    last = root / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 4
    ema_state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("EMA"))
    cli = train.main(
        ["fit", *common, "--trainer.max_steps=6", "--trainer.val_check_interval=2", "--ckpt_path=last"]
    )
    assert cli.trainer.global_step == 6
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 6
    assert not torch.equal(
        resumed["state_dict"]["net.head.weight"], checkpoint["state_dict"]["net.head.weight"]
    )  # training went on from the checkpoint
    ema_after = next(v for k, v in resumed["callbacks"].items() if k.startswith("EMA"))["averages"]
    # the average continued from the saved one: 2 more steps of decay 0.9 from the checkpoint's average
    key = "head.weight"
    assert not torch.equal(ema_after[key], ema_state["averages"][key])
    tested = train.main(["test", *common, "--ckpt_path=last"])  # the per-chunk measure on the test split
    metrics = tested.trainer.callback_metrics
    chunks = [metrics[f"test/loss_chunk_{i:02d}"] for i in range(tested.model.net.cfg.num_chunks)]
    assert torch.isfinite(metrics["test/loss"]) and all(torch.isfinite(c) for c in chunks)
    train.main(["predict", *common, "--ckpt_path=last"])
    gifs = sorted((root / "predict").rglob("generated.gif"))
    assert len(gifs) == 8
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames == 8 and gif.size == (16, 16)
    assert (gifs[0].parent / "ground_truth.gif").exists()


def test_predict_continues_the_given_prefix(tmp_path, one_thread):
    torch.manual_seed(0)
    module = VideoModule(**TINY)
    batch = clips(1, batch=2)[0]
    out = tmp_path / "predict"
    predictions = quiet_trainer(tmp_path, callbacks=[VideoPredictionWriter(str(out))]).predict(
        module, DataLoader([batch], batch_size=None)
    )
    generated = predictions[0]["generated"]
    assert generated.shape == (2, 8, 16, 16, 3) and generated.dtype == torch.uint8
    # the first chunk (2 frames) is the given prefix, decoded back to the same pixels
    assert torch.equal(generated[:, :2], batch["frames"][:, :2])
    assert (out / "clip_0_0_1" / "generated.gif").exists()


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"num_frames": 7}, "num_frames"),
        ({"latent_size": [16, 15]}, "patch_size"),
        ({"window": 4}, "window"),
    ],
)
def test_bad_config_fails_before_the_first_step_naming_the_field(tmp_path, capsys, override, field):
    net = {**TINY["net"], **override}
    with pytest.raises(ValueError, match=f"VideoConfig.{field}"):
        VideoModule(**{**TINY, "net": net})
    # and through the CLI: the config is refused while parsing, before any data or training step
    with pytest.raises((SystemExit, ValueError)) as info:
        train.main(
            [
                "fit",
                f"--config={TINY_YAML}",
                f"--trainer.default_root_dir={tmp_path}",
                *[f"--model.init_args.net.{k}={v}" for k, v in override.items()],
            ]
        )
    assert f"VideoConfig.{field}" in str(info.value) + capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


def test_clips_of_the_wrong_length_are_refused_with_the_shape(tmp_path):
    module = VideoModule(**TINY)
    batch = clips(1)[0]
    batch["frames"] = batch["frames"][:, :6]
    with pytest.raises(ValueError, match="6 frames, expected 8"):
        module.training_step(batch, 0)


@pytest.mark.slow  # about 35 s on one CPU thread
def test_training_step_on_one_56k_token_interleaved_sequence(tmp_path, one_thread):
    # 50 one-frame chunks of 48x48 pixels, patch 1x2x2: 99 segments of 576 tokens = 57,024 tokens in one
    # sequence; per-block activation checkpointing keeps the step at about 3 GB.
    net = dict(
        in_channels=3, num_frames=50, frames_per_chunk=1, latent_size=[48, 48], dim=32, num_layers=2,
        num_heads=2, ffn_dim=64, freq_dim=32, activation_checkpointing=True, lact=dict(heads=2, momentum=True),
    )  # fmt: skip
    module = VideoModule(net=net, optim=dict(warmup_steps=1))
    assert module.net.cfg.sequence_length >= 56_000
    with torch.no_grad():  # a non-zero head (zero at init), so the first step's gradient reaches every block
        module.net.head.weight.normal_(std=0.02)
    frames = torch.from_numpy(generate_video(0, num_frames=50, height=48, width=48)["frames"])[None]
    before = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    losses = Losses()
    quiet_trainer(tmp_path, max_steps=1, callbacks=[losses], limit_val_batches=0).fit(
        module, DataLoader([{"frames": frames, "key": ["long"]}], batch_size=None)
    )
    assert len(losses.values) == 1 and math.isfinite(losses.values[0])
    for name, p in module.net.named_parameters():
        assert torch.isfinite(p).all(), name
    changed = [n for n, p in module.net.named_parameters() if not torch.equal(p, before[n])]
    assert any(".lact.gate_proj" in n for n in changed)  # the LaCT branch got a gradient through its gate
    assert "head.weight" in changed


def test_conditioned_model_trains_on_caption_embeddings_from_the_shards(tmp_path, one_thread):
    rng = np.random.default_rng(0)
    with VideoWriter(str(tmp_path / "shards")) as writer:
        for i, batch in enumerate(clips(1)):
            for j, frames in enumerate(batch["frames"]):
                embedding = rng.standard_normal((5, 12)).astype(np.float16)
                writer.write(f"clip{i}_{j}", frames=frames.numpy(), caption="c", caption_embedding=embedding)
    samples = list(iter_videos(tmp_path / "shards"))
    assert samples[0]["caption_embedding"].shape == (5, 12)
    batch = collate(samples)
    net = {**TINY["net"], "text_dim": 12}
    module = VideoModule(**{**TINY, "net": net, "sampler": {"steps": 2, "guidance_scale": 4.0}})
    losses = Losses()
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[losses], limit_val_batches=0)
    trainer.fit(module, DataLoader([batch], batch_size=None))
    assert len(losses.values) == 2 and all(math.isfinite(v) for v in losses.values)
    (prediction,) = trainer.predict(module, DataLoader([batch], batch_size=None))
    assert prediction["generated"].shape == (4, 8, 16, 16, 3)
    batch.pop("caption_embedding")
    with pytest.raises(ValueError, match="caption_embedding"):
        module.training_step(batch, 0)
