"""Window attention equals masked full attention, and its memory grows linearly with length."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lact.attention import interleaved_block_attention, sliding_window_attention

ROOT = Path(__file__).resolve().parents[2]


def naive(q, k, v, allowed):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


@pytest.mark.parametrize(("length", "window"), [(16, 4), (19, 4), (7, 8), (8, 8), (33, 5), (12, 1)])
def test_sliding_window_equals_masked_attention(length, window):
    q, k, v = torch.randn(3, 2, 3, length, 8, dtype=torch.float64).unbind(0)
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = (j <= i) & (j > i - window)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window), naive(q, k, v, allowed))


@pytest.mark.parametrize("segments", [1, 2, 5, 6])
def test_interleaved_block_attention_equals_masked_attention(segments):
    chunk = 3
    length = segments * chunk
    q, k, v = torch.randn(3, 2, 2, length, 4, dtype=torch.float64).unbind(0)
    seg = torch.arange(length) // chunk
    si, sj = seg[:, None], seg[None, :]
    # Same segment, or sj the latest clean segment before si (noisy 2i+2 -> clean 2i+1, clean s -> clean s-2).
    latest_clean = torch.where(si % 2 == 0, si - 1, si - 2)
    allowed = (si == sj) | ((sj == latest_clean) & (sj >= 1))
    torch.testing.assert_close(interleaved_block_attention(q, k, v, chunk), naive(q, k, v, allowed))


@pytest.mark.parametrize(("segments", "window"), [(1, 2), (5, 2), (7, 3), (8, 2), (9, 5)])
def test_interleaved_block_attention_with_a_window_of_several_chunks(segments, window):
    chunk = 2
    length = segments * chunk
    q, k, v = torch.randn(3, 2, 2, length, 4, dtype=torch.float64).unbind(0)
    seg = torch.arange(length) // chunk
    si, sj = seg[:, None], seg[None, :]
    ci, cj = si // 2, sj // 2
    # Itself, or a clean segment of one of the `window` chunks before its own.
    allowed = (si == sj) | ((sj % 2 == 1) & (cj < ci) & (cj >= ci - window))
    torch.testing.assert_close(interleaved_block_attention(q, k, v, chunk, window), naive(q, k, v, allowed))


def test_window_attention_rejects_bad_arguments():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention(q, q, q, 0)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        interleaved_block_attention(q, q, q, 3)
    with pytest.raises(ValueError, match="window"):
        interleaved_block_attention(q, q, q, 4, window=0)


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from lact.attention import sliding_window_attention
    from tests.peak_memory import peak_rss_increase_kib
    torch.set_num_threads(1)
    length, window = int(sys.argv[1]), int(sys.argv[2])
    q, k, v = (torch.randn(1, 4, length, 32, requires_grad=True) for _ in range(3))
    peak = peak_rss_increase_kib(lambda: sliding_window_attention(q, k, v, window).square().sum().backward())
    print(json.dumps({"peak_kib": peak}))
    """
)


def peak_kib(length: int, window: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(length), str(window)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"]


def test_sliding_window_memory_grows_linearly():
    # Forward + backward peak memory above the inputs, at 16K and 64K tokens with window 1024. Linear growth
    # gives a ratio near 4; an L x L mask or score matrix would give 16.
    # (Large heads keep the process's fixed start-up allocations small next to what is measured.)
    small, large = peak_kib(16384, 1024), peak_kib(65536, 1024)
    assert small > 50_000, f"16K tokens should need more than 50 MB above the inputs, measured {small} KiB"
    assert large / small < 6, f"peak KiB 16K: {small}, 64K: {large}"
