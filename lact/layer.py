"""The layer around the operator (docs/architecture.md, The layer): projections in, fast-weight schedule, normalised gated output.

q, k, v = Linear(D, 3D)(x)                    (or given, when shared with attention)
q, k    = q * s_q + b_q, k * s_k + b_k        (optional per-channel scale and offset: qk_affine)
q, k    = l2norm(silu(.)) per head            (silu optional: off for the video layer)
v       = silu(v)
lr      = floor + softplus(Linear(D, 3 heads)(x) + softplus^-1(base_lr - floor)), in fp32 (floor = LR_FLOOR)
o       = schedule(W0, q, k, v, lr)            causal | bidirectional | interleaved
y       = o_proj( RMSNorm_head(o) * silu(Linear(D, heads)(x)) )   (the gate optional, with or without bias)

W0 are the initial (slow) fast weights, N(0, init_gain^2 / fan_in), or for W_gate and W_up optionally a
low-rank product plus half the identity (low_rank), as in the published language model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lact.documents import PackedDocuments
from lact.nn import RotaryEmbedding
from lact.ops import (
    MUON_COEFFICIENTS,
    FastWeightInputs,
    FastWeights,
    run_bidirectional,
    run_causal,
    run_interleaved,
    swiglu_apply,
)

Schedule = Literal["causal", "bidirectional", "interleaved"]

# The inner learning rates never go below this (see LaCTLayer): softplus underflows to exactly 0 in fp32 for
# pre-activations below about -104, and the operator needs every rate > 0.
LR_FLOOR = 1e-6


@dataclass
class LaCTConfig:
    """The LaCT settings of a network, the same fields in every task (each network config holds one as `lact`).

    heads: fast-weight heads; head dim d = dim / heads.
    inter_multi: hidden width of the fast-weight SwiGLU MLP, h = int(inter_multi * d).
    chunk_size: tokens per fast-weight update; None = one update on all input tokens (bidirectional only).
    base_lr: the inner learning rate at initialisation (softplus offset of the lr projection).
    momentum: learned per-chunk momentum on the updates (causal and interleaved schedules).
    muon: None (raw step), "fixed" or "schedule" (Newton-Schulz orthogonalised updates) or "normalize" (every
        update divided by its Frobenius norm, no Newton-Schulz iteration: the published NVS code's update
        with zero Newton-Schulz steps).
    rotary: rotary position embedding on the fast-weight q and k.
    output_gate: "silu" (per-head silu gate), "zero" (the same, zero-initialised: the branch starts switched
        off) or None (no gate: the published NVS layer).

    Options of the published models (docs/fidelity.md maps them; all off by default):
    init_gain: initial fast weights ~ N(0, init_gain^2 / fan_in) (published NVS: sqrt 2).
    low_rank: None, or a rank r: the initial W_gate and W_up are left @ right + 0.5 I with factors of rank r
        (published LM: 32); W_down stays a full matrix.
    low_rank_gain: init gain of those factors (published: 0.5).
    qk_affine: learnable per-channel scale (init 1) and offset (init 0) on the fast q and k before the silu.
    output_gate_bias: the output gate's Linear has a bias (init 0) (published LM's silu(Linear(x)) scale).
    rotary_dim: with rotary, rotate q and k in consecutive groups of this many channels (the attention head
        dim reproduces the published LM); None = the fast-weight head dim. Even, dividing the head dim.
    prenorm: the pre-norm update (`lact.ops.update_step`), causal schedule only.

    Every error names the field (`LaCTConfig.<field>`; a network config re-labels it `<Net>.lact.<field>`).
    """

    heads: int = 1
    inter_multi: float = 1.0
    chunk_size: int | None = 2048
    base_lr: float = 1e-3
    momentum: bool = False
    muon: str | None = None
    rotary: bool = False
    output_gate: str | None = "silu"
    init_gain: float = 1.0
    low_rank: int | None = None
    low_rank_gain: float = 0.5
    qk_affine: bool = False
    output_gate_bias: bool = False
    rotary_dim: int | None = None
    prenorm: bool = False

    def __post_init__(self) -> None:
        for name in ("heads", "chunk_size", "low_rank", "rotary_dim"):
            value = getattr(self, name)
            if name != "heads" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LaCTConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("inter_multi", "base_lr", "init_gain", "low_rank_gain"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"LaCTConfig.{name} must be a positive number, got {value!r}")
        if not self.base_lr > LR_FLOOR:
            raise ValueError(
                f"LaCTConfig.base_lr must exceed the inner lr floor {LR_FLOOR:g}, got {self.base_lr!r}"
            )
        for name in ("momentum", "rotary", "qk_affine", "output_gate_bias", "prenorm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LaCTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.muon is not None and self.muon not in MUON_COEFFICIENTS:
            raise ValueError(
                f"LaCTConfig.muon must be None or one of {sorted(MUON_COEFFICIENTS)}, got {self.muon!r}"
            )
        if self.output_gate not in ("silu", "zero", None):
            raise ValueError(
                f"LaCTConfig.output_gate must be 'silu', 'zero' or None, got {self.output_gate!r}"
            )
        if self.output_gate_bias and self.output_gate is None:
            raise ValueError("LaCTConfig.output_gate_bias needs an output gate, but output_gate is None")
        if self.rotary_dim is not None and not self.rotary:
            raise ValueError(
                f"LaCTConfig.rotary_dim={self.rotary_dim} needs rotary: true (or set rotary_dim to None)"
            )

    def check_dim(self, dim: int) -> None:
        """Checks that apply once the model width is known: heads divide dim, an even head dim for rotary,
        a rotary_dim that is even and divides the head dim, at least one hidden unit."""
        if dim % self.heads:
            raise ValueError(f"LaCTConfig.heads={self.heads} must divide dim={dim}")
        head_dim = dim // self.heads
        if self.rotary and head_dim % 2:
            raise ValueError(
                f"LaCTConfig.heads={self.heads} gives an odd head dim {head_dim}, which rotary (rotary=True) "
                "cannot rotate"
            )
        if self.rotary_dim is not None and (self.rotary_dim % 2 or head_dim % self.rotary_dim):
            raise ValueError(
                f"LaCTConfig.rotary_dim={self.rotary_dim} must be even and divide the fast-weight head dim "
                f"{head_dim} (dim={dim} / heads={self.heads})"
            )
        if int(self.inter_multi * head_dim) < 1:
            raise ValueError(
                f"LaCTConfig.inter_multi={self.inter_multi} leaves the fast-weight MLP no hidden unit"
            )


def lact_config(value: LaCTConfig | dict, default: LaCTConfig, owner: str, dim: int) -> LaCTConfig:
    """A network config's `lact` field as a checked LaCTConfig.

    value: a LaCTConfig, or a dict of some of its fields (checkpoints and YAML store plain dicts), which
    overrides the network's `default`. owner: the network config's name; errors say `<owner>.lact.<field>`.
    dim: the network width the heads divide.
    """
    prefix = f"{owner}.lact"
    try:
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in fields(LaCTConfig)})
            if unknown:
                raise ValueError(
                    f"LaCTConfig has no field {unknown[0]!r}; fields: {[f.name for f in fields(LaCTConfig)]}"
                )
            value = LaCTConfig(**{**asdict(default), **value})
        elif isinstance(value, LaCTConfig):
            value = LaCTConfig(**asdict(value))  # a checked copy: a caller may have edited the fields
        else:
            raise ValueError(
                f"LaCTConfig must be given as a LaCTConfig or a dict, got {type(value).__name__}"
            )
        value.check_dim(dim)
    except ValueError as error:
        raise ValueError(str(error).replace("LaCTConfig", prefix, 1)) from None
    return value


def finish_lact_init(network: nn.Module) -> None:
    """Call last in a network's init: every LaCTLayer inside re-applies its own init (`reset_owned`)."""
    for module in network.modules():
        if isinstance(module, LaCTLayer):
            module.reset_owned()


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


class LaCTLayer(nn.Module):
    """A LaCT layer over x [B, L, dim] with `num_heads` fast-weight heads of width d = dim / num_heads and a
    SwiGLU fast-weight MLP of hidden width h = inter_multi * d.

    Args:
        schedule: "causal" (LM), "bidirectional" (NVS; pass `update_len` to forward) or "interleaved" (video).
        chunk_size: tokens per update (causal, interleaved); for bidirectional, None updates on all input
            tokens at once.
        base_lr: the inner learning rate at initialisation (1e-3 LM / video, 1e-2 NVS). The rates are
            LR_FLOOR + softplus(...), so they never reach 0 whatever the lr projection learns.
        qk_silu: silu before the L2 normalisation of q and k.
        momentum: learn a per-token momentum coefficient (causal and interleaved only).
        muon: None (raw step), "fixed" or "schedule" (Newton-Schulz on every update), or "normalize" (every
            update divided by its Frobenius norm, no Newton-Schulz iteration).
        output_gate: "silu" (per-head silu gate), "zero" (the same, zero-initialised so the branch starts off)
            or None (no gate: the published NVS layer).
        rotary: rotary position embedding on q and k (LM).
        own_qkv: False when the caller passes a shared qkv projection to forward (LM hybrid block).
        out_proj: False when the caller applies its own output projection (LM hybrid block).
        init_gain: initial fast weights ~ N(0, init_gain^2 / fan_in) (fan_in d for W_gate, W_up; h for W_down).
        low_rank: None, or a rank r: the initial W_gate and W_up are `LowRankFastWeight`s (left @ right + 0.5 I,
            factors initialised with `low_rank_gain`), W_down stays a full matrix.
        low_rank_gain: the gain of the low-rank factors.
        qk_affine: a learnable per-channel scale (init 1) and offset (init 0) on q and k before the silu,
            `qk_scale`, `qk_offset` [2, dim] (row 0: q, row 1: k).
        output_gate_bias: the output gate's Linear has a bias (init 0).
        rotary_dim: with rotary, rotate q and k in consecutive groups of this many channels; None = the
            fast-weight head dim. Must be even and divide the fast-weight head dim.
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
        if not base_lr > LR_FLOOR:
            raise ValueError(f"base_lr must exceed the inner lr floor LR_FLOOR={LR_FLOOR:g}, got {base_lr!r}")
        if prenorm and schedule != "causal":
            raise ValueError(f"prenorm is defined for the causal schedule only, got schedule={schedule!r}")
        head_dim = dim // num_heads
        if rotary_dim is not None and (rotary_dim < 2 or rotary_dim % 2 or head_dim % rotary_dim):
            raise ValueError(
                f"rotary_dim={rotary_dim} must be even and divide the fast-weight head dim {head_dim}"
            )
        if output_gate_bias and output_gate is None:
            raise ValueError("output_gate_bias needs an output gate, but output_gate is None")
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
        # Diagnostics (see `record_update_stats`): off by default, so a training step pays nothing for them.
        self.record_stats = False
        self.stats: dict[str, Tensor] = {}
        self.reset_fast_weights()
        self.reset_owned()

    @classmethod
    def from_config(cls, dim: int, config: LaCTConfig, *, schedule: Schedule, **options) -> LaCTLayer:
        """The layer a network builds from its `lact: LaCTConfig`; `options` are the remaining keyword
        arguments of __init__ (qk_silu, rope_base, own_qkv, out_proj)."""
        # every LaCTConfig field is an __init__ keyword of the same name, except heads (num_heads)
        return cls(
            dim,
            config.heads,
            schedule=schedule,
            chunk_size=config.chunk_size,
            inter_multi=config.inter_multi,
            base_lr=config.base_lr,
            momentum=config.momentum,
            muon=config.muon,
            output_gate=config.output_gate,
            rotary=config.rotary,
            init_gain=config.init_gain,
            low_rank=config.low_rank,
            low_rank_gain=config.low_rank_gain,
            qk_affine=config.qk_affine,
            output_gate_bias=config.output_gate_bias,
            rotary_dim=config.rotary_dim,
            prenorm=config.prenorm,
            **options,
        )

    def reset_fast_weights(self) -> None:
        """W_gate, W_up ~ N(0, g^2/d), W_down ~ N(0, g^2/h), g = init_gain (g = 1 by default), or the low-rank
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

    def reset_owned(self) -> None:
        """Re-apply the parts of the initialisation that belong to the layer and that a network's blanket
        init (every nn.Linear drawn by one rule) would otherwise overwrite: the lr bias at zero (the inner lr
        starts at base_lr), the output gate's bias at zero and, with output_gate="zero", the zero gate (the
        branch starts switched off). Draws no random numbers, so calling it after a network's init changes
        nothing else."""
        nn.init.zeros_(self.lr_proj.bias)
        if self.gate_proj is not None and self.gate_proj.bias is not None:
            nn.init.zeros_(self.gate_proj.bias)
        if self.zero_gate:
            nn.init.zeros_(self.gate_proj.weight)

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
        """x [B, L, D] (and optionally a shared qkv [B, L, 3D]; positions [L], or [B, L] per row, for rotary)
        -> FastWeightInputs."""
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
        # the floor keeps every rate > 0 (the operator's requirement) even where softplus underflows to 0
        lr = LR_FLOOR + F.softplus(self.lr_proj(x).float() + inverse_softplus(self.base_lr - LR_FLOOR))
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
        documents: PackedDocuments | None = None,
    ) -> Tensor:
        """x [B, L, D] -> [B, L, D]. `update_len` (bidirectional only): the first update_len tokens write the
        memory, all L tokens read it. `documents` (causal only; lact/documents.py): packed sequences, every
        document processed as if alone (pass its in-document `positions` [B, L] for rotary too)."""
        if documents is not None and self.schedule != "causal":
            raise ValueError(f"documents are supported by the causal schedule only, not {self.schedule!r}")
        inputs = self.fast_weight_inputs(x, qkv, positions)
        weights = tuple(w.to(inputs.q.dtype) for w in self.initial_weights(x.shape[0]))
        writers = inputs.length
        if self.schedule == "causal":
            stats = self.record_stats and documents is None  # no diagnostics on packed documents
            out = run_causal(
                weights,
                inputs,
                chunk_size=self.chunk_size,
                muon=self.muon,
                prenorm=self.prenorm,
                return_weights=stats,
                documents=documents,
            )
            o, final = out if stats else (out, None)
        elif self.schedule == "bidirectional":
            if update_len is None:
                raise ValueError(
                    "the bidirectional schedule needs update_len (the number of input-view tokens)"
                )
            o, final = run_bidirectional(
                weights, inputs, update_len=update_len, chunk_size=self.chunk_size, muon=self.muon
            )
            writers = update_len
        else:
            o, state = run_interleaved(weights, inputs, chunk_size=self.chunk_size, muon=self.muon)
            final = state.weights
        if self.record_stats and final is not None:
            self.record_update_stats(weights, final, inputs.slice(0, writers))
        return self.read_out(o, x)

    @torch.no_grad()
    def record_update_stats(self, initial: FastWeights, final: FastWeights, inputs: FastWeightInputs) -> None:
        """Fast-weight diagnostics of one forward, as detached scalars in `self.stats`:

        update_ratio: ||W_after - W_0|| / ||W_0|| over the three matrices of a head, averaged over sequences
            and heads (W_0 the slow weights; 0 = the memory is not used; the weight norm keeps it below 2).
        inner_lr: the mean per-token inner learning rate of the three matrices over `inputs` (the tokens
            that write: the input views for the bidirectional schedule, all tokens for the others).

        Only computed while `record_stats` is True (a trainer sets it at its logging steps)."""
        change = sum((a.float() - b.float()).square().sum(dim=(1, 2)) for a, b in zip(final, initial))
        size = sum(b.float().square().sum(dim=(1, 2)) for b in initial)
        lr = torch.stack([t.float().mean() for t in (inputs.lr_gate, inputs.lr_up, inputs.lr_down)]).mean()
        self.stats = {"update_ratio": (change / size).sqrt().mean(), "inner_lr": lr}

    def reconstruct(self, x: Tensor, qkv: Tensor | None = None) -> tuple[Tensor, FastWeights]:
        """Bidirectional: update on all tokens of x [B, L, D] (optionally with a given qkv [B, L, 3D]) and
        read them back. Returns (y [B, L, D], the updated fast weights), which `render` applies to any other
        tokens."""
        inputs = self.fast_weight_inputs(x, qkv)
        initial = tuple(w.to(inputs.q.dtype) for w in self.initial_weights(x.shape[0]))
        o, weights = run_bidirectional(
            initial, inputs, update_len=x.shape[1], chunk_size=self.chunk_size, muon=self.muon
        )
        if self.record_stats:
            self.record_update_stats(initial, weights, inputs)
        return self.read_out(o, x), weights

    def render(self, x: Tensor, weights: FastWeights) -> Tensor:
        """Read fast weights from `reconstruct` with the queries of x [B, L, D] -> [B, L, D]."""
        inputs = self.fast_weight_inputs(x)
        return self.read_out(swiglu_apply(*weights, inputs.q), x)
