"""Small building blocks shared by the networks: SwiGLU and GELU MLPs, rotary position embedding, short
convolution, the block loop's optional activation checkpointing and per-block compilation, and the ignore
index of token losses.

RMSNorm is torch.nn.RMSNorm; these are the pieces torch does not ship.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Label of a position that takes no token loss (torch's cross_entropy default ignore_index); every task's
# labels and losses use this one constant.
IGNORE_INDEX = -100


def run_block(fn: Callable, *args, checkpointing: bool):
    """fn(*args) for one block of a network's block loop; with `checkpointing` (and grad enabled) the block's
    activations are recomputed in the backward pass instead of being kept.

    fn: the block module itself for its forward, so that the call goes through nn.Module.__call__ and module
    hooks (FSDP2's parameter gathering) run; or a bound method of the block (e.g. NVS reconstruct/render).
    """
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def compile_blocks(blocks: Iterable[nn.Module], **options) -> None:
    """Compile each block's forward in place with torch.compile (`nn.Module.compile`; `options` go to
    torch.compile, e.g. a test's `backend`), leaving the blocks the same modules.

    Per block, not the whole network: the block stays the unit that FSDP2 shards (compile first, then
    `fully_shard`, whose hooks dynamo runs outside the compiled graphs) and that `run_block` checkpoints,
    and one compiled graph serves every block of the same shape. Shapes are automatic-dynamic: the first
    call compiles for its shapes; a call with another sequence length or view count recompiles once with
    those sizes symbolic. A Python loop over chunks unrolls, so a new *number* of chunks compiles again
    (bounded by torch._dynamo.config.recompile_limit, then that block runs eagerly). Only `forward` is
    compiled (NVS `reconstruct` / `render` run eagerly). A block compiled already is left alone. The LM's
    packed-document schedule runs eagerly inside a compiled block (lact/ops.py `run_causal_documents`), so
    a new document layout does not recompile.
    """
    for block in blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(**options)


class SwiGLUMLP(nn.Module):
    """y = W_down (silu(W_gate x) * W_up x), bias-free.  x [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)  # one matmul for both branches
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """y = W_proj gelu(W_fc x), bias-free, exact (erf) GELU: the published NVS model's MLP.  x [..., dim] -> same."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) on the last dimension, rotating pairs (x_i, x_{i + dim/2})."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim}")
        self.dim = dim
        self.base = base

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x [..., L, dim]; positions [L] integer token positions, or [B, L] per row for x [B, ..., L, dim]
        (positions within packed documents) -> x rotated, same shape and dtype."""
        inv_freq = self.base ** (
            -torch.arange(0, self.dim, 2, device=x.device, dtype=torch.float32) / self.dim
        )
        angles = positions.to(torch.float32)[..., None] * inv_freq  # [L, dim/2] or [B, L, dim/2]
        cos, sin = angles.cos(), angles.sin()
        if positions.dim() == 2:  # per row: broadcast over the dims between B and L of x [B, ..., L, dim]
            shape = (cos.shape[0],) + (1,) * (x.dim() - 3) + tuple(cos.shape[1:])
            cos, sin = cos.view(shape), sin.view(shape)
        first, second = x.float().chunk(2, dim=-1)
        rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
        return rotated.to(x.dtype)


class ShortConv(nn.Module):
    """Causal depthwise convolution over the sequence: y[t] = sum_j w[:, j] * x[t - (kernel - 1) + j].

    x [B, L, channels] -> y [B, L, channels]. Initialised to the identity (last tap 1, the others 0), so a
    network starts as if it had none. In the LM it runs over the qkv projection, as the short convolutions of
    DeltaNet- and Mamba-style token mixers do: a token's key can then carry the tokens just before it, which
    is what writing "key -> value" pairs of adjacent tokens into the fast weights needs.

    `forward(x, past)` continues a sequence: past [B, p, channels] are the p <= kernel - 1 inputs right before
    x (fewer only at the start of the sequence); returns y and the last kernel - 1 inputs to pass next time.
    `forward(x, positions=...)` with the positions [B, L] of x's tokens within packed documents: taps that
    would reach before a token's document start read zeros, as at the start of a sequence.
    """

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        if kernel < 2:
            raise ValueError(f"ShortConv kernel must be >= 2, got {kernel}")
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(channels, kernel))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, -1] = 1.0

    def forward(
        self, x: Tensor, past: Tensor | None = None, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if positions is not None:
            if past is not None:
                raise ValueError("ShortConv: pass past or positions, not both")
            return self.within_documents(x, positions), x[:, -(self.kernel - 1) :]
        past_len = 0 if past is None else past.shape[1]
        if past is not None:
            x = torch.cat([past.to(x.dtype), x], dim=1)
        # zeros stand for the inputs before the sequence start, exactly as in a full forward
        padded = F.pad(x.transpose(1, 2), (self.kernel - 1 - past_len, 0))
        y = F.conv1d(padded, self.weight.to(x.dtype).unsqueeze(1), groups=self.weight.shape[0])
        return y.transpose(1, 2), x[:, -(self.kernel - 1) :]

    def within_documents(self, x: Tensor, positions: Tensor) -> Tensor:
        """y [B, L, channels] for x [B, L, channels] whose tokens sit at `positions` [B, L] in their documents:
        one shifted, masked multiply-add per tap (kernel - 1 taps back at most), so no tap crosses a start."""
        weight = self.weight.to(x.dtype)
        y = x * weight[:, -1]
        for shift in range(1, self.kernel):
            shifted = F.pad(x, (0, 0, shift, 0))[:, : x.shape[1]]
            reaches = (positions >= shift).unsqueeze(-1).to(x.dtype)  # the tap stays in the document
            y = y + shifted * reaches * weight[:, -1 - shift]
        return y
