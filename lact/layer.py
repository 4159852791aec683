"""The layer around the operator (DESIGN §2.4): projections in, fast-weight schedule, normalised gated output.

q, k, v = Linear(D, 3D)(x)                    (or given, when shared with attention)
q, k    = q * s_q + b_q, k * s_k + b_k        (optional per-channel scale and offset: qk_affine)
q, k    = l2norm(silu(.)) per head            (silu optional: off for the video layer)
v       = silu(v)
lr      = softplus(Linear(D, 3 heads)(x) + softplus^-1(base_lr)), in fp32
o       = schedule(W0, q, k, v, lr)            causal | bidirectional | interleaved
y       = o_proj( RMSNorm_head(o) * silu(Linear(D, heads)(x)) )   (the gate optional, with or without bias)

W0 are the initial (slow) fast weights, N(0, init_gain^2 / fan_in), or for W_gate and W_up optionally a
low-rank product plus half the identity (low_rank), as in the published language model.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lact.nn import RotaryEmbedding
from lact.ops import FastWeights, bidirectional_lact, causal_lact, interleaved_lact, swiglu_apply

Schedule = Literal["causal", "bidirectional", "interleaved"]


def inverse_softplus(y: float) -> float:
    """softplus^-1(y) = y + log(-expm1(-y)), so softplus(0 + inverse_softplus(base_lr)) = base_lr."""
    return y + math.log(-math.expm1(-y))


class LowRankFastWeight(nn.Module):
    """An initial fast weight of rank <= r plus half the identity: W0 = left @ right + 0.5 I, per head.

    left [heads, rows, r] ~ N(0, gain^2 / r), right [heads, r, cols] ~ N(0, gain^2 / cols); forward() returns
    W0 [heads, rows, cols]. It stores (rows + cols) r numbers per head instead of rows * cols; only the initial
    weights are low-rank, the fast weights that the updates produce are full matrices.
    """

    def __init__(self, heads: int, rows: int, cols: int, rank: int, gain: float = 0.5):
        super().__init__()
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"low_rank must be a positive int (the rank r), got {rank!r}")
        self.rank, self.gain = rank, gain
        self.left = nn.Parameter(torch.empty(heads, rows, rank))
        self.right = nn.Parameter(torch.empty(heads, rank, cols))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.left, std=self.gain / math.sqrt(self.rank))
        nn.init.normal_(self.right, std=self.gain / math.sqrt(self.right.shape[-1]))

    def forward(self) -> Tensor:
        rows, cols = self.left.shape[1], self.right.shape[2]
        eye = torch.eye(rows, cols, device=self.left.device, dtype=self.left.dtype)
        return self.left @ self.right + 0.5 * eye


class FastWeightInputs(NamedTuple):
    """The operator's inputs for one layer call, in operator layout (B * heads first)."""

    q: Tensor  # [B*H, L, d]
    k: Tensor  # [B*H, L, d]
    v: Tensor  # [B*H, L, d]
    lr_gate: Tensor  # [B*H, L, 1] fp32
    lr_up: Tensor
    lr_down: Tensor
    momentum: Tensor | None  # [B*H, L, 1] fp32 in (0, 1), or None


class LaCTLayer(nn.Module):
    """A LaCT layer over x [B, L, dim] with `num_heads` fast-weight heads of width d = dim / num_heads and a
    SwiGLU fast-weight MLP of hidden width h = inter_multi * d.

    Args:
        schedule: "causal" (LM), "bidirectional" (NVS; pass `update_len` to forward) or "interleaved" (video).
        chunk_size: tokens per update (causal, interleaved); for bidirectional, None updates on all input
            tokens at once.
        base_lr: the inner learning rate at initialisation (1e-3 LM / video, 1e-2 NVS).
        qk_silu: silu before the L2 normalisation of q and k.
        momentum: learn a per-token momentum coefficient (causal and interleaved only).
        muon: None (raw step), "fixed" or "schedule" (Newton-Schulz on every update), or "normalize" (every
            update divided by its Frobenius norm, no Newton-Schulz iteration: the published NVS code's update
            when it runs zero Newton-Schulz steps).
        output_gate: "silu" (per-head silu gate), "zero" (the same, zero-initialised so the branch starts off)
            or None (no gate: the published NVS layer).
        rotary: rotary position embedding on q and k (LM).
        own_qkv: False when the caller passes a shared qkv projection to forward (LM hybrid block).
        out_proj: False when the caller applies its own output projection (LM hybrid block).
        init_gain: initial fast weights ~ N(0, init_gain^2 / fan_in) (fan_in d for W_gate, W_up; h for W_down).
            1 by default; the published NVS layer uses sqrt(2).
        low_rank: None, or a rank r: the initial W_gate and W_up are `LowRankFastWeight`s (left @ right + 0.5 I,
            factors initialised with `low_rank_gain`), W_down stays a full matrix (the published LM, r = 32).
        low_rank_gain: the gain of the low-rank factors (published: 0.5).
        qk_affine: a learnable per-channel scale (init 1) and offset (init 0) on q and k before the silu,
            `qk_scale`, `qk_offset` [2, dim] (row 0: q, row 1: k) (the published LM).
        output_gate_bias: the output gate's Linear has a bias (init 0) (the published LM's per-head output
            scale silu(Linear(x))).
        rotary_dim: with rotary, rotate q and k in consecutive groups of this many channels, i.e. with the
            attention's head dim as the published LM does; None = the fast-weight head dim. Must be even and
            divide the fast-weight head dim.
        prenorm: the pre-norm update (`lact.ops.update_step`), causal schedule only.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        schedule: Schedule = "causal",
        chunk_size: int | None = 2048,
        inter_multi: float = 1.0,
        base_lr: float = 1e-3,
        qk_silu: bool = True,
        momentum: bool = False,
        muon: str | None = None,
        output_gate: Literal["silu", "zero"] | None = "silu",
        rotary: bool = False,
        rope_base: float = 10000.0,
        own_qkv: bool = True,
        out_proj: bool = True,
        init_gain: float = 1.0,
        low_rank: int | None = None,
        low_rank_gain: float = 0.5,
        qk_affine: bool = False,
        output_gate_bias: bool = False,
        rotary_dim: int | None = None,
        prenorm: bool = False,
    ):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must be positive and divide dim={dim}")
        if schedule not in ("causal", "bidirectional", "interleaved"):
            raise ValueError(f"schedule must be causal, bidirectional or interleaved, got {schedule!r}")
        if schedule != "bidirectional" and (chunk_size is None or chunk_size < 1):
            raise ValueError(
                f"chunk_size must be a positive int for the {schedule} schedule, got {chunk_size}"
            )
        if momentum and schedule == "bidirectional":
            raise ValueError("momentum is defined for the causal and interleaved schedules only")
        if output_gate not in ("silu", "zero", None):
            raise ValueError(f"output_gate must be 'silu', 'zero' or None, got {output_gate!r}")
        if prenorm and schedule != "causal":
            raise ValueError(f"prenorm is defined for the causal schedule only, got schedule={schedule!r}")
        head_dim = dim // num_heads
        if rotary_dim is not None and (rotary_dim < 2 or rotary_dim % 2 or head_dim % rotary_dim):
            raise ValueError(
                f"rotary_dim={rotary_dim} must be even and divide the fast-weight head dim {head_dim}"
            )
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.hidden = int(inter_multi * self.head_dim)
        self.schedule, self.chunk_size, self.muon = schedule, chunk_size, muon
        self.base_lr, self.qk_silu = base_lr, qk_silu
        self.init_gain, self.prenorm = init_gain, prenorm

        self.qkv = nn.Linear(dim, 3 * dim, bias=False) if own_qkv else None
        self.lr_proj = nn.Linear(dim, 3 * num_heads)
        self.momentum_proj = nn.Linear(dim, num_heads) if momentum else None
        self.rotary = RotaryEmbedding(rotary_dim or self.head_dim, rope_base) if rotary else None
        if low_rank is None:
            self.w_gate = nn.Parameter(torch.empty(num_heads, self.hidden, self.head_dim))
            self.w_up = nn.Parameter(torch.empty(num_heads, self.hidden, self.head_dim))
        else:
            self.w_gate = LowRankFastWeight(num_heads, self.hidden, self.head_dim, low_rank, low_rank_gain)
            self.w_up = LowRankFastWeight(num_heads, self.hidden, self.head_dim, low_rank, low_rank_gain)
        self.w_down = nn.Parameter(torch.empty(num_heads, self.head_dim, self.hidden))
        self.qk_scale = nn.Parameter(torch.ones(2, dim)) if qk_affine else None
        self.qk_offset = nn.Parameter(torch.zeros(2, dim)) if qk_affine else None
        self.out_norm = nn.RMSNorm(self.head_dim, eps=1e-5)
        self.gate_proj = nn.Linear(dim, num_heads, bias=output_gate_bias) if output_gate else None
        self.zero_gate = output_gate == "zero"
        self.o_proj = nn.Linear(dim, dim, bias=False) if out_proj else None
        self.reset_fast_weights()
        if self.zero_gate:
            nn.init.zeros_(self.gate_proj.weight)

    def reset_fast_weights(self) -> None:
        """W_gate, W_up ~ N(0, g^2/d), W_down ~ N(0, g^2/h), g = init_gain (DESIGN §2.4: g = 1), or the low-rank
        factors' own init; the lr bias, the gate bias and the q/k offsets start at zero, the q/k scales at one."""
        for w in (self.w_gate, self.w_up):
            if isinstance(w, LowRankFastWeight):
                w.reset_parameters()
            else:
                nn.init.normal_(w, std=self.init_gain * self.head_dim**-0.5)
        nn.init.normal_(self.w_down, std=self.init_gain * self.hidden**-0.5)
        nn.init.zeros_(self.lr_proj.bias)
        if self.qk_scale is not None:
            nn.init.ones_(self.qk_scale)
            nn.init.zeros_(self.qk_offset)
        if self.gate_proj is not None and self.gate_proj.bias is not None:
            nn.init.zeros_(self.gate_proj.bias)

    @property
    def state_size(self) -> int:
        """Fast-weight parameters per sequence: 3 * heads * d * h."""
        return 3 * self.num_heads * self.head_dim * self.hidden

    def initial_weights(self, batch: int) -> FastWeights:
        """The slow weights copied per sequence: ([B*H, h, d], [B*H, h, d], [B*H, d, h])."""
        return tuple(w.repeat(batch, 1, 1) for w in self.initial_matrices())

    def initial_matrices(self) -> FastWeights:
        """The slow weights per head: (W_gate [H, h, d], W_up [H, h, d], W_down [H, d, h])."""
        return tuple(w() if callable(w) else w for w in (self.w_gate, self.w_up, self.w_down))

    def fast_weight_inputs(self, x: Tensor, qkv: Tensor | None = None, positions: Tensor | None = None):
        """x [B, L, D] (and optionally a shared qkv [B, L, 3D]; positions [L] for rotary) -> FastWeightInputs."""
        if qkv is None:
            if self.qkv is None:
                raise ValueError(
                    "this LaCTLayer has no qkv projection (own_qkv=False): pass qkv [B, L, 3*dim]"
                )
            qkv = self.qkv(x)
        if self.qk_scale is not None:
            q, k, v = qkv.chunk(3, dim=-1)
            q = q * self.qk_scale[0] + self.qk_offset[0]
            k = k * self.qk_scale[1] + self.qk_offset[1]
            qkv = torch.cat([q, k, v], dim=-1)
        batch, length, _ = x.shape
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(
            2, 0, 3, 1, 4
        )  # [B,H,L,d] each
        if self.qk_silu:
            q, k = F.silu(q), F.silu(k)
        if self.rotary is not None:
            if positions is None:
                positions = torch.arange(length, device=x.device)
            q, k = self.rotate(q, positions), self.rotate(k, positions)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        v = F.silu(v)
        lr = F.softplus(self.lr_proj(x).float() + inverse_softplus(self.base_lr))  # [B, L, 3H]
        lr_gate, lr_up, lr_down = (self.to_heads(t) for t in lr.chunk(3, dim=-1))
        momentum = None
        if self.momentum_proj is not None:
            momentum = self.to_heads(torch.sigmoid(self.momentum_proj(x).float()))
        q, k, v = (t.flatten(0, 1) for t in (q, k, v))
        return FastWeightInputs(q, k, v, lr_gate, lr_up, lr_down, momentum)

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotary on x [B, H, L, d], in groups of `rotary.dim` channels (the whole head when they are equal)."""
        group = self.rotary.dim
        if group == x.shape[-1]:
            return self.rotary(x, positions)
        grouped = x.unflatten(-1, (-1, group)).transpose(-3, -2)  # [B, H, d/group, L, group]
        return self.rotary(grouped, positions).transpose(-3, -2).flatten(-2)

    def to_heads(self, t: Tensor) -> Tensor:
        """[B, L, H] per-head scalars -> [B*H, L, 1]."""
        return t.permute(0, 2, 1).reshape(-1, t.shape[1], 1)

    def read_out(self, o: Tensor, x: Tensor) -> Tensor:
        """Operator output o [B*H, L, d] -> [B, L, D]: per-head RMSNorm, per-head gate, output projection."""
        batch, length, _ = x.shape
        o = self.out_norm(o).unflatten(0, (batch, self.num_heads))  # [B, H, L, d]
        if self.gate_proj is not None:
            o = o * F.silu(self.gate_proj(x)).permute(0, 2, 1).unsqueeze(-1)
        o = o.permute(0, 2, 1, 3).reshape(batch, length, self.dim)
        return self.o_proj(o) if self.o_proj is not None else o

    def forward(
        self,
        x: Tensor,
        *,
        qkv: Tensor | None = None,
        update_len: int | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """x [B, L, D] -> [B, L, D]. `update_len` (bidirectional only): the first update_len tokens write the
        memory, all L tokens read it."""
        inputs = self.fast_weight_inputs(x, qkv, positions)
        weights = self.initial_weights(x.shape[0])
        weights = tuple(w.to(inputs.q.dtype) for w in weights)
        lrs = (inputs.lr_gate, inputs.lr_up, inputs.lr_down)
        if self.schedule == "causal":
            o = causal_lact(
                *weights, inputs.q, inputs.k, inputs.v, *lrs,
                chunk_size=self.chunk_size, momentum=inputs.momentum, muon=self.muon, prenorm=self.prenorm,
            )  # fmt: skip
        elif self.schedule == "bidirectional":
            if update_len is None:
                raise ValueError(
                    "the bidirectional schedule needs update_len (the number of input-view tokens)"
                )
            o, _ = bidirectional_lact(
                *weights, inputs.q, inputs.k, inputs.v, *lrs,
                update_len=update_len, chunk_size=self.chunk_size, muon=self.muon,
            )  # fmt: skip
        else:
            o, _ = interleaved_lact(
                *weights, inputs.q, inputs.k, inputs.v, *lrs,
                chunk_size=self.chunk_size, momentum=inputs.momentum, muon=self.muon,
            )  # fmt: skip
        return self.read_out(o, x)

    def reconstruct(self, x: Tensor) -> tuple[Tensor, FastWeights]:
        """Bidirectional: update on all tokens of x [B, L, D] and read them back. Returns (y [B, L, D], the
        updated fast weights), which `render` applies to any other tokens."""
        inputs = self.fast_weight_inputs(x)
        weights = tuple(w.to(inputs.q.dtype) for w in self.initial_weights(x.shape[0]))
        o, weights = bidirectional_lact(
            *weights, inputs.q, inputs.k, inputs.v, inputs.lr_gate, inputs.lr_up, inputs.lr_down,
            update_len=x.shape[1], chunk_size=self.chunk_size, muon=self.muon,
        )  # fmt: skip
        return self.read_out(o, x), weights

    def render(self, x: Tensor, weights: FastWeights) -> Tensor:
        """Read fast weights from `reconstruct` with the queries of x [B, L, D] -> [B, L, D]."""
        inputs = self.fast_weight_inputs(x)
        return self.read_out(swiglu_apply(*weights, inputs.q), x)
