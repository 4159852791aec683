"""Training logic of the autoregressive video diffusion task (the network is lact.models.video.VideoNet).

Batches (datamodules.base.VideoShardDataModule) hold ``frames`` uint8 [B, T, H, W, 3] (pixels are the
"latents": [-1, 1], C = 3) or ``latents`` float [B, C, T, h, w] (VAE latents, already normalised by
`prepare videos --vae`); conditioned networks also need ``caption_embedding`` [B, Lc, text_dim].

Loss: teacher-forced flow matching. Every chunk i of a clip draws its own t_i (uniform, or logit-normal:
sigmoid of a standard normal), shifted t' = s t / (1 + (s - 1) t); x_t = (1 - t') x0 + t' eps; the network
sees all noisy chunks and all clean chunks interleaved and predicts eps - x0 for the noisy ones; the loss is
the MSE over the noisy chunks only (the clean ones are context).

Validation: the same MSE at fixed noise levels (`val_noise_levels`, the same seeded noise at every
validation), reported per chunk, so a model that remembers earlier chunks shows a flatter curve over the clip:
val/loss (mean), val/loss_chunk_00, val/loss_chunk_01, ... Every `sample_every_n_val` validations, the first
`num_samples` validation clips are continued from their first `prefix_chunks` chunks with the cached
sampler, decoded (through the VAE when `vae_dir` is set) and written as GIF files (ground truth | sample)
under `<log dir>/samples/` and to TensorBoard. An EMA of the weights (modules/ema.py, a callback) is used for
validation and sampling when the trainer has one. `predict_step` returns generated clips; VideoPredictionWriter
writes them as GIFs.

Optimisation, clipping and step skipping are the shared layer of modules/task.py (TaskModule); throughput
is logged in latent frames per second (train/frames_per_s). Under Lightning's ModelParallelStrategy the
network is sharded with FSDP2, one unit per VideoBlock; the cached sampler's entry points gather parameters
like `forward`.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torchmetrics import MeanMetric

from datamodules.shards import seeded_generator
from lact.models.video import VideoConfig, VideoNet
from lact.models.video_sampling import SamplerConfig, sample_video
from modules.nvs_outputs import save_gif
from modules.task import OptimConfig, TaskModule, as_config, plain


def shift_time(t: Tensor, shift: float) -> Tensor:
    """The flow time shift t' = s t / (1 + (s - 1) t): s > 1 spends more of training at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def frames_to_latents(frames: Tensor) -> Tensor:
    """uint8 frames [B, T, H, W, 3] -> pixel "latents" [B, 3, T, H, W] in [-1, 1]."""
    return frames.float().div(127.5).sub(1).permute(0, 4, 1, 2, 3)


def latents_to_frames(x: Tensor) -> Tensor:
    """Pixel latents [B, 3, T, H, W] in [-1, 1] -> uint8 frames [B, T, H, W, 3]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()


def add_video_summary(writer, tag: str, frames: Tensor, step: int, fps: float) -> None:
    """The summary SummaryWriter.add_video writes (an animated GIF in TensorBoard's image tab), encoded with
    PIL, since add_video itself needs moviepy. frames: uint8 [T, H, W, 3]."""
    buffer = io.BytesIO()
    images = [Image.fromarray(f, mode="RGB") for f in frames.numpy()]
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
    )
    t, h, w, c = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=buffer.getvalue())
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


class VideoModule(TaskModule):
    """Args:
    net: the network config (VideoConfig or a dict of its fields).
    optim: OptimConfig (lr, betas, weight decay, warmup + cosine, grad_clip, skip_grad_norm, ...).
    sampler: the sampling scheduler (SamplerConfig or a dict: scheduler "euler"/"unipc", steps, shift,
        guidance_scale).
    shift: the training time shift s.  logit_normal: draw t from sigmoid(N(0, 1)) instead of U(0, 1).
    caption_dropout: probability of replacing a clip's caption embeddings by zeros (the unconditional input
        that classifier-free guidance uses), conditioned networks only.
    val_noise_levels: the fixed noise levels t' of the validation MSE.
    sample_every_n_val, num_samples, prefix_chunks: sampling during validation (0 = never).
    vae_dir: a local diffusers VAE directory that decodes latents for samples and predictions (None: the
        latents are pixels).
    fps: frame rate of the GIFs.
    seed: seed of the training noise (drawn per clip from seed, step and sample key).
    fsdp_param_dtype: under FSDP2 (ModelParallelStrategy), the dtype parameters are gathered and computed in
        ("bfloat16"); None for their own dtype.
    """

    # FSDP2: the cached sampler's entry points gather parameters like `forward`. The root's inputs keep
    # their dtype: flow times enter the sinusoidal embedding in fp32 (the network casts the rest itself).
    forward_methods = ("denoise_chunk", "append_clean_chunk")
    cast_root_inputs = False
    throughput_unit = "frames"

    def __init__(
        self,
        net: VideoConfig | None = None,
        optim: OptimConfig | None = None,
        sampler: SamplerConfig | dict | None = None,
        shift: float = 3.0,
        logit_normal: bool = False,
        caption_dropout: float = 0.1,
        val_noise_levels: tuple[float, ...] = (0.3, 0.6, 0.9),
        sample_every_n_val: int = 1,
        num_samples: int = 2,
        prefix_chunks: int = 1,
        vae_dir: str | None = None,
        fps: float = 8.0,
        seed: int = 0,
        fsdp_param_dtype: str | None = None,
    ):
        super().__init__(optim, fsdp_param_dtype)
        # VideoConfig(**dict) rather than as_config: a `lact` dict then overrides the video defaults
        net = VideoConfig(**net) if isinstance(net, dict) else as_config(VideoConfig, net)
        sampler = as_config(SamplerConfig, sampler)
        # the checked configs as plain data (a partial `lact` dict stored with the defaults it got)
        self.hparams["net"], self.hparams["sampler"] = plain(net), plain(sampler)
        if not shift > 0:
            raise ValueError(f"VideoModule.shift must be positive, got {shift}")
        if not all(0 < level <= 1 for level in val_noise_levels):
            raise ValueError(f"VideoModule.val_noise_levels must lie in (0, 1], got {val_noise_levels}")
        if not 0 <= prefix_chunks < net.num_chunks:
            raise ValueError(
                f"VideoModule.prefix_chunks={prefix_chunks} must be in [0, {net.num_chunks - 1}] "
                f"(the clip has {net.num_chunks} chunks)"
            )
        self.net = VideoNet(net)
        self.sampler = sampler
        self.val_chunk_loss = torch.nn.ModuleList(MeanMetric() for _ in range(net.num_chunks))
        self.validations = 0
        self._vae = None
        self._sample_batch: dict | None = None

    # ------------------------------------------------------------------------------------------ data

    def latents(self, batch: dict) -> Tensor:
        """The clip as latents [B, C, T, h, w] in fp32, from pixel frames or stored latents."""
        if "latents" in batch:
            return batch["latents"].float()
        if "frames" in batch:
            return frames_to_latents(batch["frames"])
        raise ValueError(f"a video batch needs 'frames' or 'latents', got keys {sorted(batch)}")

    def context(self, batch: dict, keep: Tensor | None = None) -> Tensor | None:
        """Caption embeddings [B, Lc, text_dim] of a conditioned network (None otherwise); clips whose `keep`
        flag is False get zeros, the unconditional input."""
        if self.net.cfg.text_dim is None:
            return None
        if "caption_embedding" not in batch:
            raise ValueError(
                f"the network is conditioned (net.text_dim={self.net.cfg.text_dim}) but the batch has no "
                "'caption_embedding' [B, tokens, text_dim]; set net.text_dim: null for unconditional training"
            )
        context = batch["caption_embedding"].float()
        return context if keep is None else context * keep[:, None, None]

    def vae(self):
        if self._vae is None and self.hparams.vae_dir is not None:
            from datamodules.vae import load_vae

            self._vae = [
                load_vae(self.hparams.vae_dir)
            ]  # a list: kept out of the module tree and checkpoints
        return None if self._vae is None else self._vae[0]

    def decode(self, x: Tensor) -> Tensor:
        """Latents [B, C, T, h, w] -> uint8 frames [B, T', H, W, 3] (through the VAE when configured)."""
        vae = self.vae()
        if vae is None:
            return latents_to_frames(x)
        from datamodules.vae import decode_latents

        return decode_latents(vae, x)

    # ------------------------------------------------------------------------------------------ training

    def throughput_items(self, batch: dict) -> int:
        """Latent frames per batch (clips x frames)."""
        x = batch["latents"] if "latents" in batch else batch["frames"]
        return x.shape[0] * self.net.cfg.num_frames

    def draw_noise(self, x0: Tensor, keys: list[str] | None) -> tuple[Tensor, Tensor, Tensor]:
        """Per clip: noise like x0, shifted flow times t' [B, N] (one per chunk) and a caption-keep flag [B].

        With sample keys, clip j draws from a generator seeded by (seed, global step, key), so a step's noise
        does not depend on how the batch is split over ranks or on a resume; without, the global RNG."""
        batch, chunks = x0.shape[0], self.net.cfg.num_chunks
        if keys is None:
            generators = [None] * batch
        else:
            generators = [
                seeded_generator(self.hparams.seed, self.global_step, zlib.crc32(str(k).encode()))
                for k in keys
            ]
        noise, t, keep = [], [], []
        for generator in generators:
            noise.append(torch.randn(x0.shape[1:], generator=generator))
            if self.hparams.logit_normal:
                t.append(torch.sigmoid(torch.randn(chunks, generator=generator)))
            else:
                t.append(torch.rand(chunks, generator=generator))
            keep.append(torch.rand((), generator=generator) >= self.hparams.caption_dropout)
        t = shift_time(torch.stack(t), self.hparams.shift)
        return torch.stack(noise).to(x0), t.to(x0.device), torch.stack(keep).to(x0.device)

    def flow_loss(self, x0: Tensor, t: Tensor, noise: Tensor, context: Tensor | None) -> Tensor:
        """Per-chunk MSE [B, N] of the flow prediction at times t [B, N] with the given noise."""
        frames = self.net.cfg.frames_per_chunk
        t_frames = t.repeat_interleave(frames, dim=1)[:, None, :, None, None]  # [B, 1, N F, 1, 1]
        x_t = (1 - t_frames) * x0 + t_frames * noise
        pred = self.net(x_t, x0, t, context).float()
        error = (pred - (noise - x0)).square()
        return error.unflatten(2, (-1, frames)).mean(dim=(1, 3, 4, 5))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x0 = self.latents(batch)
        self.net.check_latents("the batch's clip", x0, self.net.cfg.num_frames)
        noise, t, keep = self.draw_noise(x0, batch.get("key"))
        loss = self.flow_loss(x0, t, noise, self.context(batch, keep)).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["video_validations"] = self.validations

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.validations = checkpoint.get("video_validations", 0)

    # ------------------------------------------------------------------------------------------ validation

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x0, context, per_chunk = self.held_out_losses(batch, batch_idx)
        self.log("val/loss", per_chunk.mean(), sync_dist=True, batch_size=len(x0), prog_bar=True)
        if batch_idx == 0:
            self._sample_batch = {"x0": x0[: self.hparams.num_samples], "context": context}

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """`train.py test`: the validation measure on the test split, test/loss and test/loss_chunk_XX."""
        x0, _, per_chunk = self.held_out_losses(batch, batch_idx)
        self.log("test/loss", per_chunk.mean(), sync_dist=True, batch_size=len(x0))

    def on_test_epoch_end(self) -> None:
        for i, metric in enumerate(self.val_chunk_loss):
            self.log(f"test/loss_chunk_{i:02d}", metric.compute(), sync_dist=False)
            metric.reset()

    def held_out_losses(self, batch: dict, batch_idx: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """(clean latents, captions, per-chunk denoising MSE [B, N] averaged over the fixed noise levels),
        the chunk metrics updated."""
        x0 = self.latents(batch)
        self.net.check_latents("the batch's clip", x0, self.net.cfg.num_frames)
        batch_size, chunks = x0.shape[0], self.net.cfg.num_chunks
        context = self.context(batch)
        # the same noise at every validation: seeded by the batch index only
        generator = seeded_generator(batch_idx)
        per_chunk = 0
        for level in self.hparams.val_noise_levels:
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            t = torch.full((batch_size, chunks), float(level), device=x0.device)
            per_chunk = per_chunk + self.flow_loss(x0, t, noise, context)
        per_chunk = per_chunk / len(self.hparams.val_noise_levels)  # [B, N]
        for i, metric in enumerate(self.val_chunk_loss):
            metric.update(per_chunk[:, i])
        return x0, context, per_chunk

    def on_validation_epoch_end(self) -> None:
        for i, metric in enumerate(self.val_chunk_loss):
            self.log(f"val/loss_chunk_{i:02d}", metric.compute(), sync_dist=False)
            metric.reset()
        every = self.hparams.sample_every_n_val
        if not self.trainer.sanity_checking:
            self.validations += 1
            if every > 0 and self.hparams.num_samples > 0 and self._sample_batch is not None:
                if self.validations % every == 0:
                    self.write_samples(self._sample_batch)
        self._sample_batch = None

    def generate(self, x0: Tensor, context: Tensor | None, seed: int) -> Tensor:
        """Continue clips x0 [B, C, T, h, w] from their first `prefix_chunks` chunks (seeded noise)."""
        prefix = self.hparams.prefix_chunks
        frames = self.net.cfg.frames_per_chunk
        noise = torch.randn(x0.shape, generator=seeded_generator(seed)).to(x0)
        given = x0[:, :, : prefix * frames] if prefix else None
        if context is not None:
            context = context[: x0.shape[0]]
        return sample_video(self.net, noise, self.sampler, prefix=given, context=context)

    def run_dir(self) -> Path:
        logger = self.logger
        if logger is not None and logger.log_dir is not None:
            return Path(logger.log_dir)
        return Path(self.trainer.default_root_dir)

    def write_samples(self, sample: dict) -> None:
        # Every rank samples (the sharded network needs all of them); rank 0 writes.
        clips = self.generate(sample["x0"], sample["context"], seed=0)
        if self.trainer.global_rank != 0:
            return
        truth, generated = self.decode(sample["x0"]), self.decode(clips)
        side_by_side = torch.cat([truth, generated], dim=3)  # [B, T, H, 2W, 3]
        folder = self.run_dir() / "samples" / f"step_{self.global_step:08d}"
        for i, clip in enumerate(side_by_side):
            save_gif(clip.numpy(), folder / f"sample_{i:02d}.gif", self.hparams.fps)
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                for i, clip in enumerate(side_by_side):
                    add_video_summary(
                        logger.experiment,
                        f"val/truth|sample_{i:02d}",
                        clip,
                        self.global_step,
                        self.hparams.fps,
                    )

    # ------------------------------------------------------------------------------------------ predict

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Continuations of the batch's clips from their first `prefix_chunks` chunks: uint8 frames of the
        ground truth and the generated clip, [B, T, H, W, 3] each, and the keys."""
        x0 = self.latents(batch)
        clips = self.generate(x0, self.context(batch), seed=batch_idx)
        keys = batch.get("key", [f"{batch_idx:06d}_{i:03d}" for i in range(x0.shape[0])])
        return {"key": list(keys), "generated": self.decode(clips), "ground_truth": self.decode(x0)}


class VideoPredictionWriter(BasePredictionWriter):
    """Writes VideoModule.predict_step's clips into `output_dir/<key>/`: generated.gif and ground_truth.gif."""

    def __init__(self, output_dir: str = "outputs/predict", fps: float = 8.0):
        super().__init__(write_interval="batch")
        self.output_dir, self.fps = Path(output_dir), fps

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        for i, key in enumerate(prediction["key"]):
            for name in ("generated", "ground_truth"):
                save_gif(prediction[name][i].numpy(), self.output_dir / str(key) / f"{name}.gif", self.fps)
