"""The shared warmup + cosine schedule (modules.task.warmup_cosine) read as a multiplier of the peak lr."""

from __future__ import annotations

import torch

from modules.task import warmup_cosine


def lr_factors(warmup: int, total: int, min_ratio: float, steps: int) -> list[float]:
    """The lr multiplier at optimizer steps 0 .. steps - 1 (peak lr 1), stepping the real torch schedulers."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(optimizer, warmup, total, min_ratio)
    factors = []
    for _ in range(steps):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return factors


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The multiplier at optimizer step `step`."""
    return lr_factors(warmup, total, min_ratio, step + 1)[step]


class WarmupCosine:
    """lr_factor with the schedule's arguments bound: WarmupCosine(warmup, total, min_ratio)(step)."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup, self.total, self.min_ratio)
