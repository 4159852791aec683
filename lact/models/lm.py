"""The LaCT language model (docs/architecture.md, The three networks): token embedding -> N hybrid blocks -> RMSNorm -> LM head.

Hybrid block, pre-norm, one qkv projection shared by both token mixers:

    x' = RMSNorm(x);  q, k, v = ShortConv(Linear(D, 3D)(x'))      (the short convolution is optional)
    h  = x + o_proj( SWA(rotary(q), rotary(k), v)  +  gate(x') * RMSNorm_head(LaCT_causal(q', k', v')) )
    y  = h + SwiGLU_MLP(RMSNorm(h))

SWA is causal sliding-window attention over `num_heads` heads (token t sees t - window < s <= t); the LaCT
branch (lact/layer.py) reads q', k', v' from the same qkv over `lact.heads` fast-weight heads (silu, L2 norm,
optional rotary), with apply-then-update chunks of `lact.chunk_size` tokens: token t reads fast weights written
by the chunks before its own, and the window covers the rest. `lact_ratio` < 1 drops the LaCT branch from
some blocks; 0 gives the sliding-window-only baseline from the same code. `short_conv` > 0 adds a causal
depthwise convolution of that many taps over qkv (identity at init; off in the paper configs), which lets
the LaCT keys of a token carry the tokens just before it (see configs/lm/mqar.yaml).

Packed documents: with `eod_id` set, every document of a sequence (its tokens up to and including the
end-of-document id) is processed as if alone: attention masked to the document, fast weights restarting
from W0 with chunks counted from the document start, positions from 0, no convolution tap across a start
(lact/documents.py; architecture.md, "Packed documents").

Incremental decoding with a state cache is in lact/models/lm_cache.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lact.attention import sliding_window_attention
from lact.documents import PackedDocuments, pack_documents
from lact.layer import LaCTConfig, LaCTLayer, finish_lact_init, lact_config
from lact.nn import RotaryEmbedding, ShortConv, SwiGLUMLP, run_block


def _check_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"LMConfig.{name} must be an int >= {minimum}, got {value!r}")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"LMConfig.{name} must be a positive number, got {value!r}")


def default_lact() -> LaCTConfig:
    """The LM's LaCT defaults: 2 heads, chunk 128, inner lr 1e-3, momentum, rotary on the fast q/k."""
    return LaCTConfig(heads=2, chunk_size=128, base_lr=1e-3, momentum=True, rotary=True)


@dataclass
class LMConfig:
    """Shape and options of the hybrid LM. Checked on construction; every error names the field.

    vocab_size: token ids in [0, vocab_size).          dim: model width D.
    num_layers: hybrid blocks N.                        num_heads: attention heads (head dim D / num_heads).
    lact: the LaCT branch (lact/layer.py LaCTConfig; a dict of some of its fields overrides the LM defaults
        of `default_lact`): heads (fast-weight heads, d = D / heads, h = int(inter_multi * d)), inter_multi,
        chunk_size (tokens per update, required), base_lr, momentum, muon, rotary (on the LaCT q', k'; the
        attention q, k always get it), output_gate, and the published LM's options (off by default;
        configs/lm/760m.yaml and 3b.yaml turn them on): low_rank, low_rank_gain, qk_affine, output_gate_bias,
        rotary_dim (the attention head dim D / num_heads reproduces the published model), prenorm.
    window: sliding-window size W in tokens (the token itself and W - 1 before it).
    mlp_hidden: SwiGLU MLP width; None = 8D/3 rounded up to a multiple of 64.
    lact_ratio: fraction of blocks with a LaCT branch, spread evenly (1 = all, 0 = SWA-only baseline).
    tie_embeddings: LM head shares the token-embedding matrix.
    short_conv: taps of the causal depthwise convolution over qkv; 0 = none (the published model).
    init_std: std of every linear and embedding weight at init (fast weights follow docs/architecture.md, The layer).
    activation_checkpointing: recompute each block's activations in the backward pass (memory for compute).
    eod_id: the end-of-document id of packed sequences; every document is then processed as if alone (see
        the module docstring). None: a sequence is one stream (positions, memory and window run across).
        Training checks it against the `eod_id` the shards record (modules/lm.py `LMModule.check_eod_id`).
    compile: torch.compile each block when training (lact/nn.py compile_blocks, applied by the task's
        configure_model); the numbers are eager's up to float rounding.
    """

    vocab_size: int = 256
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    lact: LaCTConfig = field(default_factory=default_lact)
    window: int = 128
    mlp_hidden: int | None = None
    lact_ratio: float = 1.0
    tie_embeddings: bool = True
    short_conv: int = 0
    rope_base: float = 10000.0
    init_std: float = 0.02
    norm_eps: float = 1e-5
    activation_checkpointing: bool = False
    eod_id: int | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "window"):
            _check_int(name, getattr(self, name))
        if self.mlp_hidden is not None:
            _check_int("mlp_hidden", self.mlp_hidden)
        _check_int("short_conv", self.short_conv, minimum=0)
        if self.short_conv == 1:
            raise ValueError("LMConfig.short_conv must be 0 (no convolution) or >= 2 taps, got 1")
        for name in ("rope_base", "init_std", "norm_eps"):
            _check_positive(name, getattr(self, name))
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(
                f"LMConfig.num_heads={self.num_heads} must divide dim={self.dim} into an even head dim "
                "(rotary rotates pairs)"
            )
        self.lact = lact_config(self.lact, default_lact(), "LMConfig", self.dim)
        if self.lact.chunk_size is None:
            raise ValueError("LMConfig.lact.chunk_size must be an int >= 1 (the causal schedule), got None")
        if isinstance(self.lact_ratio, bool) or not 0 <= self.lact_ratio <= 1:
            raise ValueError(f"LMConfig.lact_ratio must be a number in [0, 1], got {self.lact_ratio!r}")
        if self.eod_id is not None:
            _check_int("eod_id", self.eod_id, minimum=0)
            if self.eod_id >= self.vocab_size:
                raise ValueError(
                    f"LMConfig.eod_id={self.eod_id} must be a token id below vocab_size={self.vocab_size}"
                )
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(
                f"LMConfig.activation_checkpointing must be true or false, got {self.activation_checkpointing!r}"
            )
        if not isinstance(self.compile, bool):
            raise ValueError(f"LMConfig.compile must be true or false, got {self.compile!r}")

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
    H = lact.heads, d = D / H, h = int(lact.inter_multi * d), m = 1 with momentum else 0, g = 1 with an output
    gate else 0, t = 1 if tied else 0, K = short_conv, r = lact.low_rank, a = 1 with lact.qk_affine else 0,
    b = 1 with lact.output_gate_bias else 0:

        P = (2 - t) V D + D                                    embedding, LM head, final norm
          + N (4 D^2 + 3 D F + 2 D + 3 D K)                    qkv, o_proj, MLP, two norms, short conv
          + n (3 H d h + (3 + m) (D + 1) H + g D H + d)        fast weights W0, lr (+ momentum) projections
                                                               with bias, output gate, per-head RMSNorm
          + n (4 a D + b H)                                    q/k scale and offset, output gate bias
          - n 2 H (h d - r (h + d))                            with low-rank W0_gate, W0_up (r given)
    """
    vocab, dim, layers, mlp = cfg.vocab_size, cfg.dim, cfg.num_layers, cfg.mlp_width
    heads = cfg.lact.heads
    d = dim // heads
    h = int(cfg.lact.inter_multi * d)
    m = 1 if cfg.lact.momentum else 0
    g = 0 if cfg.lact.output_gate is None else 1
    n = sum(cfg.lact_layers())
    total = (1 if cfg.tie_embeddings else 2) * vocab * dim + dim
    total += layers * (4 * dim * dim + 3 * dim * mlp + 2 * dim + 3 * dim * cfg.short_conv)
    total += n * (3 * heads * d * h + (3 + m) * (dim + 1) * heads + g * dim * heads + d)
    total += n * (4 * dim * cfg.lact.qk_affine + heads * cfg.lact.output_gate_bias)
    if cfg.lact.low_rank is not None:
        total -= n * 2 * heads * (h * d - cfg.lact.low_rank * (h + d))
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
            self.lact = LaCTLayer.from_config(
                dim, cfg.lact, schedule="causal", rope_base=cfg.rope_base, own_qkv=False, out_proj=False
            )
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = nn.RMSNorm(dim, eps=cfg.norm_eps)
        self.mlp = SwiGLUMLP(dim, cfg.mlp_width)

    def project_qkv(
        self, xn: Tensor, past: Tensor | None = None, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """xn [B, n, D] (normed) -> qkv [B, n, 3D], through the short convolution when there is one; past and
        the second output are the convolution's carried inputs (ShortConv.forward; None without one);
        positions [B, n]: in-document positions of packed documents, which the convolution does not cross."""
        qkv = self.qkv(xn)
        if self.qkv_conv is None:
            return qkv, None
        return self.qkv_conv(qkv, past, positions)

    def attention_inputs(self, qkv: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """qkv [B, L, 3D], positions [L] or [B, L] -> q, k, v [B, heads, L, head_dim], rotary on q and k."""
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return self.rotary(q, positions), self.rotary(k, positions), v

    def merge_heads(self, o: Tensor) -> Tensor:
        """[B, heads, L, head_dim] -> [B, L, D]."""
        return o.transpose(1, 2).flatten(2)

    def finish(self, x: Tensor, mixed: Tensor) -> Tensor:
        """The residual and MLP half: mixed [B, L, D] (attention + gated LaCT, before o_proj) -> y [B, L, D]."""
        h = x + self.o_proj(mixed)
        return h + self.mlp(self.mlp_norm(h))

    def forward(self, x: Tensor, positions: Tensor, documents: PackedDocuments | None = None) -> Tensor:
        """x [B, L, D], positions [L] (absolute token positions) -> [B, L, D]. With `documents` (packed
        sequences), positions are documents.positions [B, L] and every document is processed as if alone."""
        xn = self.attn_norm(x)
        ids, doc_positions = (None, None) if documents is None else (documents.ids, documents.positions)
        qkv, _ = self.project_qkv(xn, positions=doc_positions)
        q, k, v = self.attention_inputs(qkv, positions)
        mixed = self.merge_heads(sliding_window_attention(q, k, v, self.window, ids))
        if self.lact is not None:
            mixed = mixed + self.lact(xn, qkv=qkv, positions=positions, documents=documents)
        return self.finish(x, mixed)


class LaCTLM(nn.Module):
    """The hybrid LM: tokens [B, L] (int64) -> logits [B, L, vocab_size] (next-token scores).

    `token_embedding` is the input nn.Embedding (also the LM head's weight when tied); with
    `cfg.activation_checkpointing` each block's activations are recomputed in the backward pass.
    """

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(HybridBlock(cfg, use) for use in cfg.lact_layers())
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear and embedding weights N(0, init_std), biases 0, norms 1, short convolutions the identity;
        fast weights as docs/architecture.md, The layer; then each LaCT layer's own init (lr bias, zero gate) is re-applied."""
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
        finish_lact_init(self)  # last: the layer's own choices (zero gate) survive the blanket init

    def head(self, x: Tensor) -> Tensor:
        """Final norm and LM head: [B, L, D] -> logits [B, L, vocab_size]."""
        x = self.norm(x)
        if self.lm_head is None:
            return F.linear(x, self.token_embedding.weight)
        return self.lm_head(x)

    def forward(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        """tokens [B, L] -> logits [B, L, vocab_size]; positions [L] default to 0..L-1. With cfg.eod_id the
        positions are those within each document (give none)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tuple(tokens.shape)}")
        documents = None
        if self.cfg.eod_id is not None:
            if positions is not None:
                raise ValueError(
                    "LaCTLM: positions come from the documents when LMConfig.eod_id is set; pass none"
                )
            documents = pack_documents(tokens, self.cfg.eod_id, self.cfg.lact.chunk_size)
            positions = documents.positions
        elif positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens)
        for block in self.blocks:
            x = run_block(block, x, positions, documents, checkpointing=self.cfg.activation_checkpointing)
        return self.head(x)
