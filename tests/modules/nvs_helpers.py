"""A tiny NVS network and synthetic NVS batches, shared by tests/modules/test_nvs.py and the FSDP2 worker
(tests/modules/fsdp_worker.py): a scene whose colour is a function of the ray direction, so all views agree."""

from __future__ import annotations

import math

import torch

from lact.geometry import camera_rays, look_at

TINY = {"patch_size": 4, "dim": 32, "num_layers": 2, "num_heads": 2, "lact": {"heads": 1}, "mlp_ratio": 2.0}


def make_batch(seed: int, batch: int = 2, inputs: int = 2, targets: int = 1, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    views = inputs + targets
    azimuth = torch.rand(batch, views, generator=g) * 2 * math.pi
    elevation = torch.rand(batch, views, generator=g) * 0.8
    eyes = 2.7 * torch.stack(
        [elevation.cos() * azimuth.cos(), elevation.cos() * azimuth.sin(), elevation.sin()], dim=-1
    )
    w2c = look_at(eyes, torch.zeros_like(eyes), torch.tensor([0.0, 0.0, 1.0]).expand_as(eyes))
    focal = size / (2 * math.tan(math.radians(25)))
    intrinsics = torch.tensor([focal, focal, size / 2, size / 2]).expand(batch, views, 4)
    _, directions = camera_rays(intrinsics, w2c, size, size)  # [B, V, H, W, 3]
    tint = torch.rand(batch, 1, 1, 1, 3, generator=g)
    images = (0.5 + 0.5 * directions * tint).movedim(-1, 2)  # [B, V, 3, H, W]
    return {
        "input_images": images[:, :inputs],
        "input_intrinsics": intrinsics[:, :inputs],
        "input_w2c": w2c[:, :inputs],
        "target_images": images[:, inputs:],
        "target_intrinsics": intrinsics[:, inputs:],
        "target_w2c": w2c[:, inputs:],
        "key": [f"scene{seed}_{i}" for i in range(batch)],
    }
