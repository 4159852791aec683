"""The LaCT language model (DESIGN §3.2): token embedding -> N hybrid blocks -> RMSNorm -> LM head.

Hybrid block, pre-norm, one qkv projection shared by both token mixers:

    x' = RMSNorm(x);  q, k, v = ShortConv(Linear(D, 3D)(x'))      (the short convolution is optional)
    h  = x + o_proj( SWA(rotary(q), rotary(k), v)  +  gate(x') * RMSNorm_head(LaCT_causal(q', k', v')) )
    y  = h + SwiGLU_MLP(RMSNorm(h))

SWA is causal sliding-window attention over `num_heads` heads (token t sees t - window < s <= t); the LaCT
branch (lact/layer.py) reads q', k', v' from the same qkv over `lact_heads` fast-weight heads (silu, L2 norm,
optional rotary), with apply-then-update chunks of `chunk_size` tokens: token t reads fast weights written
by the chunks before its own, and the window covers the rest. `lact_ratio` < 1 drops the LaCT branch from
some blocks; 0 gives the sliding-window-only baseline from the same code. `short_conv` > 0 adds a causal
depthwise convolution of that many taps over qkv (identity at init; off in the paper configs), which lets
the LaCT keys of a token carry the tokens just before it (see configs/lm/mqar.yaml).

Incremental decoding with a state cache is in lact/models/lm_cache.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lact.attention import sliding_window_attention
from lact.layer import LaCTLayer
from lact.nn import RotaryEmbedding, ShortConv, SwiGLUMLP
from lact.ops import MUON_COEFFICIENTS


def _check_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"LMConfig.{name} must be an int >= {minimum}, got {value!r}")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"LMConfig.{name} must be a positive number, got {value!r}")


@dataclass
class LMConfig:
    """Shape and options of the hybrid LM. Checked on construction; every error names the field.

    vocab_size: token ids in [0, vocab_size).          dim: model width D.
    num_layers: hybrid blocks N.                        num_heads: attention heads (head dim D / num_heads).
    lact_heads: fast-weight heads (head dim d = D / lact_heads, hidden h = int(inter_multi * d)).
    window: sliding-window size W in tokens (the token itself and W - 1 before it).
    chunk_size: LaCT chunk C in tokens.                 mlp_hidden: SwiGLU MLP width; None = 8D/3 rounded
                                                         up to a multiple of 64.
    base_lr: initial inner learning rate (softplus offset, DESIGN §2.4).
    momentum: learned per-chunk momentum on the fast-weight updates.     muon: None, "fixed" or "schedule".
    lact_rotary: rotary embedding on the LaCT q', k' too (attention q, k always get it).
    lact_ratio: fraction of blocks with a LaCT branch, spread evenly (1 = all, 0 = SWA-only baseline).
    tie_embeddings: LM head shares the token-embedding matrix.
    short_conv: taps of the causal depthwise convolution over qkv; 0 = none (the published model).
    init_std: std of every linear and embedding weight at init (fast weights follow DESIGN §2.4).

    Options of the published LM (all off by default; configs/lm/760m.yaml and 3b.yaml turn them on):
    lact_low_rank: rank r of the initial W_gate and W_up (left @ right + 0.5 I); None = full matrices.
    lact_low_rank_gain: init gain of those factors.
    lact_qk_affine: per-channel learnable scale and offset on the LaCT q', k' before the silu.
    lact_gate_bias: the LaCT output gate silu(Linear(x)) has a bias.
    lact_rotary_dim: rotate the LaCT q', k' in groups of this many channels (the attention head dim D /
        num_heads reproduces the published model); None = the LaCT head dim.
    lact_prenorm: the pre-norm fast-weight update (lact.ops.update_step).
    """

    vocab_size: int = 256
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    lact_heads: int = 2
    window: int = 128
    chunk_size: int = 128
    mlp_hidden: int | None = None
    inter_multi: float = 1.0
    base_lr: float = 1e-3
    momentum: bool = True
    muon: str | None = None
    lact_rotary: bool = True
    lact_ratio: float = 1.0
    tie_embeddings: bool = True
    short_conv: int = 0
    rope_base: float = 10000.0
    init_std: float = 0.02
    norm_eps: float = 1e-5
    lact_low_rank: int | None = None
    lact_low_rank_gain: float = 0.5
    lact_qk_affine: bool = False
    lact_gate_bias: bool = False
    lact_rotary_dim: int | None = None
    lact_prenorm: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "lact_heads", "window", "chunk_size"):
            _check_int(name, getattr(self, name))
        if self.mlp_hidden is not None:
            _check_int("mlp_hidden", self.mlp_hidden)
        _check_int("short_conv", self.short_conv, minimum=0)
        if self.short_conv == 1:
            raise ValueError("LMConfig.short_conv must be 0 (no convolution) or >= 2 taps, got 1")
        for name in ("inter_multi", "base_lr", "rope_base", "init_std", "norm_eps"):
            _check_positive(name, getattr(self, name))
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(
                f"LMConfig.num_heads={self.num_heads} must divide dim={self.dim} into an even head dim "
                "(rotary rotates pairs)"
            )
        if self.dim % self.lact_heads:
            raise ValueError(f"LMConfig.lact_heads={self.lact_heads} must divide dim={self.dim}")
        if self.lact_rotary and (self.dim // self.lact_heads) % 2:
            raise ValueError(
                f"LMConfig.lact_heads={self.lact_heads} gives an odd LaCT head dim {self.dim // self.lact_heads}, "
                "which rotary (lact_rotary=True) cannot rotate"
            )
        if int(self.inter_multi * self.dim // self.lact_heads) < 1:
            raise ValueError(
                f"LMConfig.inter_multi={self.inter_multi} leaves the fast-weight MLP no hidden unit"
            )
        if self.muon is not None and self.muon not in MUON_COEFFICIENTS:
            raise ValueError(
                f"LMConfig.muon must be None or one of {sorted(MUON_COEFFICIENTS)}, got {self.muon!r}"
            )
        if self.lact_low_rank is not None:
            _check_int("lact_low_rank", self.lact_low_rank)
        _check_positive("lact_low_rank_gain", self.lact_low_rank_gain)
        if self.lact_rotary_dim is not None:
            _check_int("lact_rotary_dim", self.lact_rotary_dim, minimum=2)
            if self.lact_rotary_dim % 2 or (self.dim // self.lact_heads) % self.lact_rotary_dim:
                raise ValueError(
                    f"LMConfig.lact_rotary_dim={self.lact_rotary_dim} must be even and divide the LaCT head dim "
                    f"{self.dim // self.lact_heads} (the attention head dim {self.dim // self.num_heads} does "
                    "when num_heads is a multiple of lact_heads)"
                )
        if isinstance(self.lact_ratio, bool) or not 0 <= self.lact_ratio <= 1:
            raise ValueError(f"LMConfig.lact_ratio must be a number in [0, 1], got {self.lact_ratio!r}")

    @property
    def mlp_width(self) -> int:
        """The SwiGLU MLP hidden width F (8D/3 rounded up to a multiple of 64 unless given)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 64 * math.ceil(8 * self.dim / 3 / 64)

    def lact_layers(self) -> list[bool]:
        """Which blocks carry a LaCT branch: block i iff floor((i + 1) r) > floor(i r), r = lact_ratio, so
        round(N r) blocks spread evenly, the last one included whenever r > 0."""
        r = self.lact_ratio
        return [math.floor((i + 1) * r + 1e-9) > math.floor(i * r + 1e-9) for i in range(self.num_layers)]


def parameter_count(cfg: LMConfig) -> int:
    """Number of parameters of `LaCTLM(cfg)`, in closed form.

    With V = vocab_size, D = dim, N = num_layers, F = mlp_width, n = blocks with a LaCT branch,
    H = lact_heads, d = D / H, h = int(inter_multi * d), m = 1 with momentum else 0, t = 1 if tied else 0,
    K = short_conv, r = lact_low_rank, a = 1 with lact_qk_affine else 0, g = 1 with lact_gate_bias else 0:

        P = (2 - t) V D + D                                    embedding, LM head, final norm
          + N (4 D^2 + 3 D F + 2 D + 3 D K)                    qkv, o_proj, MLP, two norms, short conv
          + n (3 H d h + (3 + m) (D + 1) H + D H + d)          fast weights W0, lr (+ momentum) projections
                                                               with bias, output gate, per-head RMSNorm
          + n (4 a D + g H)                                    q/k scale and offset, output gate bias
          - n 2 H (h d - r (h + d))                            with low-rank W0_gate, W0_up (r given)
    """
    vocab, dim, layers, mlp = cfg.vocab_size, cfg.dim, cfg.num_layers, cfg.mlp_width
    heads = cfg.lact_heads
    d = dim // heads
    h = int(cfg.inter_multi * d)
    m = 1 if cfg.momentum else 0
    n = sum(cfg.lact_layers())
    total = (1 if cfg.tie_embeddings else 2) * vocab * dim + dim
    total += layers * (4 * dim * dim + 3 * dim * mlp + 2 * dim + 3 * dim * cfg.short_conv)
    total += n * (3 * heads * d * h + (3 + m) * (dim + 1) * heads + dim * heads + d)
    total += n * (4 * dim * cfg.lact_qk_affine + heads * cfg.lact_gate_bias)
    if cfg.lact_low_rank is not None:
        total -= n * 2 * heads * (h * d - cfg.lact_low_rank * (h + d))
    return total


class HybridBlock(nn.Module):
    """One hybrid block over x [B, L, D] (see the module docstring); `use_lact=False` drops the LaCT branch."""

    def __init__(self, cfg: LMConfig, use_lact: bool):
        super().__init__()
        dim = cfg.dim
        self.num_heads, self.head_dim, self.window = cfg.num_heads, dim // cfg.num_heads, cfg.window
        self.attn_norm = nn.RMSNorm(dim, eps=cfg.norm_eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.qkv_conv = ShortConv(3 * dim, cfg.short_conv) if cfg.short_conv else None
        self.rotary = RotaryEmbedding(self.head_dim, cfg.rope_base)
        self.lact = None
        if use_lact:
            self.lact = LaCTLayer(
                dim,
                cfg.lact_heads,
                schedule="causal",
                chunk_size=cfg.chunk_size,
                inter_multi=cfg.inter_multi,
                base_lr=cfg.base_lr,
                momentum=cfg.momentum,
                muon=cfg.muon,
                output_gate="silu",
                rotary=cfg.lact_rotary,
                rope_base=cfg.rope_base,
                own_qkv=False,
                out_proj=False,
                low_rank=cfg.lact_low_rank,
                low_rank_gain=cfg.lact_low_rank_gain,
                qk_affine=cfg.lact_qk_affine,
                output_gate_bias=cfg.lact_gate_bias,
                rotary_dim=cfg.lact_rotary_dim,
                prenorm=cfg.lact_prenorm,
            )
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = nn.RMSNorm(dim, eps=cfg.norm_eps)
        self.mlp = SwiGLUMLP(dim, cfg.mlp_width)

    def project_qkv(self, xn: Tensor, past: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """xn [B, n, D] (normed) -> qkv [B, n, 3D], through the short convolution when there is one; past and
        the second output are the convolution's carried inputs (ShortConv.forward; None without one)."""
        qkv = self.qkv(xn)
        if self.qkv_conv is None:
            return qkv, None
        return self.qkv_conv(qkv, past)

    def attention_inputs(self, qkv: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """qkv [B, L, 3D], positions [L] -> q, k, v [B, heads, L, head_dim], rotary applied to q and k."""
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return self.rotary(q, positions), self.rotary(k, positions), v

    def merge_heads(self, o: Tensor) -> Tensor:
        """[B, heads, L, head_dim] -> [B, L, D]."""
        return o.transpose(1, 2).flatten(2)

    def finish(self, x: Tensor, mixed: Tensor) -> Tensor:
        """The residual and MLP half: mixed [B, L, D] (attention + gated LaCT, before o_proj) -> y [B, L, D]."""
        h = x + self.o_proj(mixed)
        return h + self.mlp(self.mlp_norm(h))

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x [B, L, D], positions [L] (absolute token positions) -> [B, L, D]."""
        xn = self.attn_norm(x)
        qkv, _ = self.project_qkv(xn)
        q, k, v = self.attention_inputs(qkv, positions)
        mixed = self.merge_heads(sliding_window_attention(q, k, v, self.window))
        if self.lact is not None:
            mixed = mixed + self.lact(xn, qkv=qkv, positions=positions)
        return self.finish(x, mixed)


class LaCTLM(nn.Module):
    """The hybrid LM: tokens [B, L] (int64) -> logits [B, L, vocab_size] (next-token scores).

    `token_embedding` is the input nn.Embedding (also the LM head's weight when tied); set
    `checkpoint_blocks = True` to recompute each block's activations in the backward pass.
    """

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(HybridBlock(cfg, use) for use in cfg.lact_layers())
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.checkpoint_blocks = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear and embedding weights N(0, init_std), biases 0, norms 1, short convolutions the identity;
        fast weights as DESIGN §2.4."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, LaCTLayer):
                module.reset_fast_weights()
            elif isinstance(module, ShortConv):
                module.reset_parameters()

    def head(self, x: Tensor) -> Tensor:
        """Final norm and LM head: [B, L, D] -> logits [B, L, vocab_size]."""
        x = self.norm(x)
        if self.lm_head is None:
            return F.linear(x, self.token_embedding.weight)
        return self.lm_head(x)

    def forward(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        """tokens [B, L] -> logits [B, L, vocab_size]; positions [L] default to 0..L-1."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tuple(tokens.shape)}")
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens)
        for block in self.blocks:
            if self.checkpoint_blocks and torch.is_grad_enabled():
                x = checkpoint(block, x, positions, use_reentrant=False)
            else:
                x = block(x, positions)
        return self.head(x)
