"""Chunk-by-chunk sampling of the video network with diffusers' flow-matching schedulers.

For chunk i = 0, 1, ...: start from noise, run the scheduler's steps with `VideoNet.denoise_chunk` (which reads
the cache of the clean chunks < i), then `VideoNet.append_clean_chunk` runs the finished chunk once at t = 0 so
that every block updates its fast weights and keeps its keys/values for chunk i + 1. Work per chunk is
O(steps x window) whatever the video length. `use_cache=False` instead recomputes the whole prefix with the
training `forward` at every step: the reference the cache is tested against.

Schedulers are built from arguments (nothing is downloaded): "euler" = FlowMatchEulerDiscreteScheduler(shift),
"unipc" = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift). Both
take the network's output as the flow eps - x0 for x_t = (1 - sigma) x0 + sigma eps, so the network is called
at t = sigma of the step. Classifier-free guidance, when the network is conditioned and guidance_scale != 1:
flow = uncond + g (cond - uncond), the two branches run as one batch of 2B with their own cache rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from torch import Tensor

from lact.models.video import VideoNet

SCHEDULERS = ("euler", "unipc")


@dataclass
class SamplerConfig:
    """scheduler: "euler" or "unipc"; steps: denoising steps per chunk; shift: the flow shift s of the noise
    levels (sigma' = s sigma / (1 + (s - 1) sigma)); guidance_scale: classifier-free guidance weight (1 = off)."""

    scheduler: str = "euler"
    steps: int = 20
    shift: float = 3.0
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"SamplerConfig.scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"SamplerConfig.steps must be a positive int, got {self.steps!r}")
        if not self.shift > 0:
            raise ValueError(f"SamplerConfig.shift must be positive, got {self.shift!r}")


def build_scheduler(cfg: SamplerConfig, device: torch.device | str | None = None):
    """A fresh diffusers scheduler with its timesteps set (one per chunk: multistep solvers keep history)."""
    if cfg.scheduler == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg.shift)
    else:
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=cfg.shift
        )
    scheduler.set_timesteps(cfg.steps, device=device)
    return scheduler


@torch.no_grad()
def sample_video(
    net: VideoNet,
    noise: Tensor,
    cfg: SamplerConfig | None = None,
    *,
    prefix: Tensor | None = None,
    context: Tensor | None = None,
    null_context: Tensor | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Generate a clip chunk by chunk.

    noise [B, C, n F, h, w]: the starting noise of every chunk (its first `prefix` chunks are unused).
    prefix [B, C, p F, h, w]: given clean chunks to continue (None = generate from the first chunk).
    context, null_context [B, Lc, text_dim]: caption embeddings and the unconditional ones (default zeros),
    for conditioned networks. Returns the clip [B, C, n F, h, w] (prefix included), in noise's dtype.
    """
    cfg = cfg or SamplerConfig()
    frames = net.cfg.frames_per_chunk
    net.check_latents("noise", noise)
    chunks = noise.shape[2] // frames
    done = 0 if prefix is None else prefix.shape[2] // frames
    if prefix is not None:
        net.check_latents("prefix", prefix)
        if done >= chunks:
            raise ValueError(f"prefix has {done} chunks, noise only {chunks}: nothing left to generate")
    guided = net.cfg.text_dim is not None and cfg.guidance_scale != 1.0
    if net.cfg.text_dim is not None:
        if context is None:
            raise ValueError("the network is conditioned (text_dim set): pass caption embeddings as context")
        if guided:
            null = torch.zeros_like(context) if null_context is None else null_context
            context = torch.cat([context, null])

    def doubled(x: Tensor) -> Tensor:
        return torch.cat([x, x]) if guided else x

    def guide(flow: Tensor) -> Tensor:
        if not guided:
            return flow
        cond, uncond = flow.chunk(2)
        return uncond + cfg.guidance_scale * (cond - uncond)

    clip = [prefix[:, :, i * frames : (i + 1) * frames] for i in range(done)]
    cache = net.new_cache() if use_cache else None
    if cache is not None:
        for chunk in clip:
            net.append_clean_chunk(doubled(chunk), cache, context)
    for i in range(done, chunks):
        x = noise[:, :, i * frames : (i + 1) * frames]
        scheduler = build_scheduler(cfg, noise.device)
        for step, timestep in enumerate(scheduler.timesteps):
            sigma = scheduler.sigmas[step].to(noise.device, torch.float32)
            t = sigma.expand(x.shape[0] * (2 if guided else 1))
            if cache is not None:
                flow = net.denoise_chunk(doubled(x), t, cache, context)
            else:
                flow = recompute_prefix(net, doubled(x), t, [doubled(c) for c in clip], context)
            x = scheduler.step(guide(flow).to(x.dtype), timestep, x, return_dict=False)[0]
        clip.append(x)
        if cache is not None and i + 1 < chunks:
            net.append_clean_chunk(doubled(x), cache, context)
    return torch.cat(clip, dim=2)


def recompute_prefix(net: VideoNet, x_t: Tensor, t: Tensor, clean: list[Tensor], context) -> Tensor:
    """The flow of the chunk after `clean` (a list of [B, C, F, h, w] chunks) from the full training
    forward over the whole prefix; the noisy inputs of the earlier chunks do not reach it (zeros)."""
    n = len(clean) + 1
    noisy = torch.cat([torch.zeros_like(x_t)] * (n - 1) + [x_t], dim=2)
    clean_frames = torch.cat(clean, dim=2) if clean else x_t[:, :, :0]
    times = torch.cat([torch.zeros(x_t.shape[0], n - 1, device=x_t.device), t[:, None].float()], dim=1)
    return net(noisy, clean_frames, times, context)[:, :, -x_t.shape[2] :]
