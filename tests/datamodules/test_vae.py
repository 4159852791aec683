"""`prepare videos --vae DIR` with tiny random-weight diffusers VAEs saved to a temp dir (nothing downloaded):
the shards hold the VAE's normalised latents, the video task trains on them and decodes samples through the
same VAE, and a missing VAE directory is named in the error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLWan
from lightning.pytorch import Trainer
from PIL import Image
from torch.utils.data import DataLoader

from datamodules import prepare
from datamodules.readers import iter_videos
from datamodules.vae import decode_latents, encode_frames, load_vae
from datamodules.videos import generate_video


def save_tiny_vae(path, kind: str) -> None:
    torch.manual_seed(0)
    if kind == "wan":
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 2],
            num_res_blocks=1,
            temperal_downsample=[True],
            latents_mean=[0.1, -0.2, 0.0, 0.3],
            latents_std=[1.5, 0.5, 1.0, 2.0],
        )
    else:
        vae = AutoencoderKL(
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=4,
            scaling_factor=0.5,
        )
    vae.save_pretrained(str(path))


@pytest.mark.parametrize(("kind", "latent_frames"), [("wan", 5), ("kl", 9)])
def test_prepare_stores_the_vae_latents(tmp_path, kind, latent_frames, one_thread):
    vae_dir = tmp_path / "vae"
    save_tiny_vae(vae_dir, kind)
    out = tmp_path / "shards"
    args = [
        "videos",
        "--out",
        str(out),
        "--num-videos",
        "2",
        "--frames",
        "9",
        "--height",
        "16",
        "--width",
        "16",
    ]
    meta = prepare.main([*args, "--vae", str(vae_dir)])
    assert meta["field"] == "latents" and meta["vae"] in ("AutoencoderKLWan", "AutoencoderKL")
    vae = load_vae(vae_dir)
    samples = list(iter_videos(out, field="latents"))
    for i, sample in enumerate(samples):
        frames = generate_video([0, i], num_frames=9, height=16, width=16)["frames"]
        assert sample["latents"].shape == (4, latent_frames, 8, 8)
        assert np.array_equal(sample["latents"].numpy(), encode_frames(vae, frames))
    decoded = decode_latents(vae, samples[0]["latents"][None].float())
    assert decoded.shape == (1, 9, 16, 16, 3) and decoded.dtype == torch.uint8
    if kind == "wan":  # the per-channel normalisation is undone before decoding
        raw = vae.encode(torch.zeros(1, 3, 9, 16, 16)).latent_dist.mean
        normalised = encode_frames(vae, np.full((9, 16, 16, 3), 127.5, dtype=np.float32))
        mean = torch.tensor([0.1, -0.2, 0.0, 0.3]).view(4, 1, 1, 1)
        std = torch.tensor([1.5, 0.5, 1.0, 2.0]).view(4, 1, 1, 1)
        torch.testing.assert_close(
            torch.from_numpy(normalised).float(), ((raw[0] - mean) / std).float(), atol=2e-3, rtol=1e-2
        )


def test_a_missing_vae_directory_is_named(tmp_path):
    missing = tmp_path / "no_such_vae"
    with pytest.raises(SystemExit, match="no_such_vae"):
        prepare.main(["videos", "--out", str(tmp_path / "out"), "--num-videos", "1", "--vae", str(missing)])
    with pytest.raises(FileNotFoundError, match="no_such_vae"):
        load_vae(missing)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_video_task_trains_on_vae_latents_and_decodes_predictions_through_the_vae(tmp_path, one_thread):
    from modules.video import VideoModule, VideoPredictionWriter

    vae_dir = tmp_path / "vae"
    save_tiny_vae(vae_dir, "wan")
    out = tmp_path / "shards"
    prepare.main(
        ["videos", "--out", str(out), "--num-videos", "4", "--frames", "9", "--height", "16", "--width", "16"]
        + ["--vae", str(vae_dir)]
    )
    batch = {"latents": torch.stack([s["latents"] for s in iter_videos(out, field="latents")])}
    batch["key"] = [f"clip{i}" for i in range(4)]
    net = dict(
        in_channels=4, num_frames=5, frames_per_chunk=1, latent_size=[8, 8], dim=32, num_layers=1, num_heads=2,
        ffn_dim=64, freq_dim=32, lact=dict(heads=1),
    )  # fmt: skip
    module = VideoModule(net=net, sampler=dict(steps=2), vae_dir=str(vae_dir), optim=dict(warmup_steps=1))
    trainer = Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[VideoPredictionWriter(str(tmp_path / "predict"))],
    )
    trainer.fit(module, DataLoader([batch], batch_size=None))
    (prediction,) = trainer.predict(module, DataLoader([batch], batch_size=None))
    assert prediction["generated"].shape == (4, 9, 16, 16, 3)  # 5 latent frames decode to 9 frames
    with Image.open(tmp_path / "predict" / "clip0" / "generated.gif") as gif:
        assert gif.n_frames == 9 and gif.size == (16, 16)
    # the ground truth GIF is the VAE's decoding of the stored latents
    expected = decode_latents(load_vae(vae_dir), batch["latents"][:1].float())
    assert torch.equal(prediction["ground_truth"][:1], expected)
