"""A diffusers VAE from a local directory: encode clips to the latents the video task trains on, decode back.

    vae = load_vae("checkpoints/Wan2.1_VAE")         # a folder with config.json + weights (save_pretrained)
    latents = encode_frames(vae, frames)              # uint8 [T, H, W, 3] -> float16 [C, t, h, w], normalised
    frames = decode_latents(vae, latents[None])       # -> uint8 [1, T', H, W, 3]

Two kinds, told apart by `_class_name` in config.json:
- `AutoencoderKLWan` (video VAE, Wan 2.1): the clip is encoded at once, t = 1 + (T - 1) / 4 for the real
  model; latents are normalised per channel with the config's `latents_mean` / `latents_std`.
- `AutoencoderKL` (image VAE): every frame on its own, t = T; latents are (z - shift_factor) * scaling_factor.
The mean of the latent distribution is stored (no sampling), so a clip always gives the same latents.
Nothing is downloaded: `from_pretrained(..., local_files_only=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

KINDS = ("AutoencoderKLWan", "AutoencoderKL")


def load_vae(directory: str | Path):
    """The VAE saved in `directory` (diffusers `save_pretrained` layout), in eval mode on the CPU."""
    directory = Path(directory)
    config = directory / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"VAE directory {str(directory)!r} has no config.json: give a local diffusers VAE folder "
            "(AutoencoderKL or AutoencoderKLWan, saved with save_pretrained); nothing is downloaded"
        )
    kind = json.loads(config.read_text()).get("_class_name")
    if kind not in KINDS:
        raise ValueError(f"VAE {str(directory)!r} is a {kind!r}; expected one of {KINDS}")
    import diffusers

    return getattr(diffusers, kind).from_pretrained(str(directory), local_files_only=True).eval()


def _is_video_vae(vae) -> bool:
    return type(vae).__name__ == "AutoencoderKLWan"


def _stats(vae, like: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, std) [1, C, 1, 1, 1] of the Wan normalisation."""
    mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device)
    std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device)
    return mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)


@torch.no_grad()
def encode_frames(vae, frames: np.ndarray | Tensor) -> np.ndarray:
    """uint8 frames [T, H, W, 3] -> normalised float16 latents [C, t, h, w]."""
    x = torch.as_tensor(np.asarray(frames)).float().div(127.5).sub(1)
    param = next(vae.parameters())
    x = x.permute(3, 0, 1, 2)[None].to(param)  # [1, 3, T, H, W]
    if _is_video_vae(vae):
        z = vae.encode(x).latent_dist.mean
        mean, std = _stats(vae, z)
        z = (z - mean) / std
    else:
        z = vae.encode(x[0].transpose(0, 1)).latent_dist.mean  # frames as a batch: [T, C, h, w]
        z = ((z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).transpose(0, 1)[None]
    return z[0].float().cpu().numpy().astype(np.float16)


@torch.no_grad()
def decode_latents(vae, latents: Tensor) -> Tensor:
    """Normalised latents [B, C, t, h, w] -> uint8 frames [B, T, H, W, 3] on the CPU."""
    param = next(vae.parameters())
    z = latents.to(param)
    if _is_video_vae(vae):
        mean, std = _stats(vae, z)
        x = vae.decode(z * std + mean).sample  # [B, 3, T, H, W]
    else:
        b, c, t = z.shape[:3]
        flat = z.transpose(1, 2).flatten(0, 1) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        x = vae.decode(flat).sample.unflatten(0, (b, t)).transpose(1, 2)
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()
