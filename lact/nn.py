"""Small building blocks shared by the networks: SwiGLU MLP and rotary position embedding.

RMSNorm is torch.nn.RMSNorm; these are the pieces torch does not ship.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLUMLP(nn.Module):
    """y = W_down (silu(W_gate x) * W_up x), bias-free.  x [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)  # one matmul for both branches
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) on the last dimension, rotating pairs (x_i, x_{i + dim/2})."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim}")
        self.dim = dim
        self.base = base

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x [..., L, dim]; positions [L] integer token positions -> x rotated, same shape and dtype."""
        inv_freq = self.base ** (
            -torch.arange(0, self.dim, 2, device=x.device, dtype=torch.float32) / self.dim
        )
        angles = positions.to(torch.float32)[:, None] * inv_freq  # [L, dim/2]
        cos, sin = angles.cos(), angles.sin()
        first, second = x.float().chunk(2, dim=-1)
        rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
        return rotated.to(x.dtype)
