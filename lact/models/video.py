"""Autoregressive video diffusion: a Wan-2.1-style diffusion transformer whose self-attention is block window
attention plus LaCT on the interleaved schedule.

A clip of latent frames [B, C, num_frames, h, w] is cut into chunks of `frames_per_chunk` frames; each chunk is
patchified (patch pt x ph x pw) into T tokens. Training is teacher-forced: the token sequence interleaves the
noisy and the clean version of every chunk,

    [noisy_0, clean_0, noisy_1, clean_1, ..., noisy_{N-1}]          S = 2N - 1 segments of T tokens

and the network predicts the flow (eps - x0) of every noisy chunk. Block (pre-norm, adaLN per token):

    shift1, scale1, gate1, shift2, scale2, gate2 = modulation + TimeProj(t of the token's segment)
    y  = LN(x) * (1 + scale1) + shift1
    q, k, v = Linear(D, 3D)(y)                                      attention's projection
    x += gate1 * o_proj( WindowAttn(rope3d(RMSNorm q), rope3d(RMSNorm k), v)
                         + zero_gate(y) * RMSNorm_head(LaCT_interleaved(q', k', v')) )
    q', k', v' = q, k, v (lact_qkv "shared") or LaCT's own Linear(D, 3D, bias=False)(y) (lact_qkv "own"),
                 or of y + WindowAttn(...) (lact_input "attention": tokens mixed before the fast weights)
    x += CrossAttn(LN(x), caption embeddings)                       only with text_dim set
    x += gate2 * FFN(LN(x) * (1 + scale2) + shift2)                 Linear -> GELU(tanh) -> Linear

Clean chunks have t = 0, each noisy chunk its own t. The 3D rotary positions (frame, row, column) of a
clean chunk and of its noisy twin are the same. Segment s of chunk c attends to itself and the clean
segments of chunks c - window .. c - 1 (lact/attention.py); LaCT applies W_0 to noisy_0 and, for each
clean_i, updates the fast weights on clean_i and applies them to clean_i and noisy_{i+1} (lact/ops.py), so
noisy chunk i only ever sees clean chunks < i, and noisy tokens never write memory. The LaCT branch sits
behind a zero-initialised per-head gate: a new model starts as a window-attention model.

Sampling (lact/models/video_sampling.py) runs the same blocks one segment at a time with a `VideoCache`:
the keys/values of the last `window` clean chunks and the fast-weight state of every block.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lact.attention import interleaved_block_attention
from lact.layer import LaCTConfig, LaCTLayer, finish_lact_init, lact_config
from lact.nn import RotaryEmbedding, run_block
from lact.ops import FastWeightState, swiglu_apply, update_step


def default_lact() -> LaCTConfig:
    """The video LaCT defaults: 2 heads, h = 2d, one update per chunk (chunk_size None: the tokens of one chunk,
    fixed by the clip geometry), inner lr 1e-3, and a zero-initialised output gate, so a new model starts as a
    window-attention model."""
    return LaCTConfig(heads=2, inter_multi=2.0, chunk_size=None, base_lr=1e-3, output_gate="zero")


def _check_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"VideoConfig.{name} must be an int >= {minimum}, got {value!r}")


@dataclass
class VideoConfig:
    """Shape and options of the video diffusion transformer; checked on construction, errors name the field.

    in_channels: latent channels C (16 for the Wan VAE, 3 for pixels).
    num_frames: latent frames per training clip; frames_per_chunk: latent frames per AR chunk (paper: 3).
    latent_size: (h, w) of a latent frame.  patch_size: (pt, ph, pw) latent frames/rows/columns per token.
    dim, num_layers, num_heads (attention heads; head dim must be even and >= 6 for the 3D rotary),
    ffn_dim: FFN hidden width.
    window: clean chunks (before a chunk's own) that attention sees; 1 <= window <= chunks per clip - 1.
    lact: the LaCT branches (lact/layer.py LaCTConfig; a dict of some of its fields overrides the video defaults
        of `default_lact`); None = window attention only (the baseline). lact.chunk_size must be None or the
        tokens of one chunk (the interleaved schedule updates once per clean chunk); lact.output_gate "zero"
        (default) starts the branch switched off. Through the CLI (jsonargparse), fields a YAML `lact:` block
        leaves out take LaCTConfig's class defaults (chunk_size 2048, output_gate "silu"), so the configs in
        configs/video/ spell out chunk_size: null and output_gate: zero. lact.rotary gives the fast q/k
        attention's 3D rotary (frame, row, column), applied per attention head as the published video model
        does (so the fast-weight head dim must be a multiple of the attention head dim, rotary_dim null).
    lact_qkv: where the LaCT branch takes its fast-weight q, k, v from: "shared" (attention's projection,
        taken before its RMSNorm and rotary; the published LaCT video model shares attention's q, k, v too) or
        "own" (the LaCT layer's own bias-free Linear(D, 3D): fast-weight keys and values that need not also
        serve attention).
    lact_input: what the LaCT branch reads (its q/k/v with an own projection, and its gate): "block" (y, the
        block's modulated input, beside attention) or "attention" (y + attention's output, so fast-weight keys
        and values carry what attention gathered from the window; needs lact_qkv "own").
    text_dim: width of caption embeddings for cross-attention; None = unconditional.
    freq_dim: sinusoidal time-embedding width.  rope_base: rotary base (with num_heads, a warning names it when
        an axis of the rotary cannot tell its tokens apart: rotary_resolves).  eps: norm epsilon.
    activation_checkpointing: recompute each block in the backward pass.
    compile: torch.compile each block when training (lact/nn.py compile_blocks, applied by the task's
        configure_model; the cached sampler's methods stay eager).
    """

    in_channels: int = 3
    num_frames: int = 8
    frames_per_chunk: int = 2
    latent_size: tuple[int, int] = (16, 16)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 256
    window: int = 1
    lact: LaCTConfig | None = field(default_factory=LaCTConfig)
    lact_qkv: str = "shared"
    lact_input: str = "block"
    text_dim: int | None = None
    freq_dim: int = 256
    rope_base: float = 10000.0
    eps: float = 1e-6
    activation_checkpointing: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        self.latent_size = tuple(self.latent_size)
        self.patch_size = tuple(self.patch_size)
        for name in ("in_channels", "num_frames", "frames_per_chunk", "dim", "num_layers", "num_heads"):
            _check_int(name, getattr(self, name))
        for name in ("ffn_dim", "window", "freq_dim"):
            _check_int(name, getattr(self, name))
        if len(self.latent_size) != 2 or len(self.patch_size) != 3:
            raise ValueError(
                f"VideoConfig.latent_size must be (h, w) and patch_size (pt, ph, pw), got "
                f"{self.latent_size} and {self.patch_size}"
            )
        for p in self.patch_size:
            _check_int("patch_size", p)
        if self.num_frames % self.frames_per_chunk:
            raise ValueError(
                f"VideoConfig.num_frames={self.num_frames} is not divisible into chunks of "
                f"frames_per_chunk={self.frames_per_chunk}: make num_frames a multiple of it"
            )
        if self.frames_per_chunk % self.patch_size[0]:
            raise ValueError(
                f"VideoConfig.patch_size[0]={self.patch_size[0]} must divide frames_per_chunk="
                f"{self.frames_per_chunk} (a token never spans two chunks)"
            )
        for axis, size, p in zip(("h", "w"), self.latent_size, self.patch_size[1:]):
            if size % p:
                raise ValueError(
                    f"VideoConfig.patch_size={self.patch_size} does not divide latent_size={self.latent_size} "
                    f"along {axis}: choose a latent size that is a multiple of the patch"
                )
        if self.num_chunks < 2:
            raise ValueError(
                f"VideoConfig.num_frames={self.num_frames} gives {self.num_chunks} chunk of frames_per_chunk="
                f"{self.frames_per_chunk}; autoregressive training needs at least 2"
            )
        if self.window > self.num_chunks - 1:
            raise ValueError(
                f"VideoConfig.window={self.window} is larger than the clip: a chunk has at most "
                f"{self.num_chunks - 1} chunks before it (num_frames / frames_per_chunk - 1)"
            )
        if self.dim % self.num_heads:
            raise ValueError(f"VideoConfig.num_heads={self.num_heads} must divide dim={self.dim}")
        head_dim = self.dim // self.num_heads
        if head_dim % 2 or head_dim < 6:
            raise ValueError(
                f"VideoConfig.num_heads={self.num_heads} gives head dim {head_dim}; the 3D rotary needs an even "
                "head dim >= 6"
            )
        self._warn_unresolved_rotary(head_dim)
        if self.text_dim is not None:
            _check_int("text_dim", self.text_dim)
        for name in ("activation_checkpointing", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"VideoConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.lact_qkv not in ("shared", "own"):
            raise ValueError(
                f"VideoConfig.lact_qkv must be 'shared' (attention's q, k, v) or 'own' (LaCT's own projection), "
                f"got {self.lact_qkv!r}"
            )
        if self.lact_input not in ("block", "attention"):
            raise ValueError(
                f"VideoConfig.lact_input must be 'block' or 'attention', got {self.lact_input!r}"
            )
        if self.lact_input == "attention" and self.lact_qkv != "own":
            raise ValueError(
                "VideoConfig.lact_input='attention' feeds the fast weights y + attention's output, which attention's "
                "own q/k/v projection does not see: set lact_qkv: own"
            )
        if self.lact is not None:
            self.lact = lact_config(self.lact, default_lact(), "VideoConfig", self.dim)
            if self.lact.chunk_size not in (None, self.tokens_per_chunk):
                raise ValueError(
                    f"VideoConfig.lact.chunk_size={self.lact.chunk_size}: video updates once per chunk, so it "
                    f"must be None or the tokens of one chunk ({self.tokens_per_chunk})"
                )
            fast_head_dim = self.dim // self.lact.heads
            if self.lact.rotary and (self.lact.rotary_dim is not None or fast_head_dim % head_dim):
                raise ValueError(
                    f"VideoConfig.lact.rotary rotates the fast q/k with attention's 3D rotary, one attention head "
                    f"(dim {head_dim}) at a time: lact.heads={self.lact.heads} gives fast-weight heads of "
                    f"{fast_head_dim} channels, which must be a multiple of {head_dim}, and lact.rotary_dim "
                    f"must be null (got {self.lact.rotary_dim})"
                )

    def _warn_unresolved_rotary(self, head_dim: int) -> None:
        """Warn when an axis of the 3D rotary cannot tell apart the token positions attention sees together
        (the frames of a chunk and its window, the rows, the columns; see rotary_resolves)."""
        frames, rows, columns = self.token_grid
        positions = ((self.window + 1) * frames, rows, columns)
        for axis, size, count in zip(("frames", "rows", "columns"), Rotary3D.split(head_dim), positions):
            if not rotary_resolves(size, self.rope_base, count):
                warnings.warn(
                    f"VideoConfig: the 3D rotary turns the {count} {axis} of tokens with {size} of a head's "
                    f"{head_dim} channels (num_heads={self.num_heads}, rope_base={self.rope_base:g}) and none of "
                    f"their frequencies turns by 1 to pi radians across them: tokens about 2 pi positions apart "
                    f"look alike to attention (a trained model paints ghost copies of shapes there). Use fewer "
                    f"heads (a larger head dim) or a smaller rope_base.",
                    stacklevel=4,
                )

    @property
    def num_chunks(self) -> int:
        return self.num_frames // self.frames_per_chunk

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """Tokens of one chunk along (frames, rows, columns)."""
        pt, ph, pw = self.patch_size
        return self.frames_per_chunk // pt, self.latent_size[0] // ph, self.latent_size[1] // pw

    @property
    def tokens_per_chunk(self) -> int:
        return math.prod(self.token_grid)

    @property
    def sequence_length(self) -> int:
        """Tokens of one interleaved training sequence: (2 N - 1) T."""
        return (2 * self.num_chunks - 1) * self.tokens_per_chunk

    def to_dict(self) -> dict:
        return asdict(self)


def parameter_count(cfg: VideoConfig) -> int:
    """Parameters of `VideoNet(cfg)` in closed form (checked against the built model in the tests).

    D = dim, F = ffn_dim, N = num_layers, P = C pt ph pw, f = freq_dim, E = text_dim:

        P D + D                           patch embedding
      + f D + D + D^2 + D + 6 D^2 + 6 D   time embedding MLP and its projection to the 6 modulations
      + E D + D + D^2 + D                 caption embedding MLP (with text_dim)
      + N (4 D^2 + 4 D + 2 D              qkv and output projections, q/k RMSNorm
           + 2 D F + F + D + 6 D          FFN, modulation
           + 4 D^2 + 4 D + 2 D + 2 D)     cross-attention with q/k RMSNorm and its LayerNorm (with text_dim)
      + D P + P + 2 D                     head and its modulation
      + N (3 H d h + 3 (D + 1) H + m (D + 1) H + g D H + d   LaCT: W0, lr (and momentum) projections,
           + o 3 D^2 + a 4 D)                                 gate, per-head RMSNorm, own q/k/v projection,
                                                              q/k scale and offset (H = lact.heads, d = D / H,
                                                              h = int(inter_multi d), m = 1 with momentum,
                                                              g = 1 with an output gate, o = 1 with lact_qkv
                                                              "own", a = 1 with lact.qk_affine)

    Wan 2.1 1.3B (D 1536, F 8960, N 30, E 4096) gives 1.42e9 without LaCT; 14B (D 5120, F 13824, N 40) 14.3e9.
    """
    d_model, ffn, layers = cfg.dim, cfg.ffn_dim, cfg.num_layers
    patch = cfg.in_channels * math.prod(cfg.patch_size)
    total = patch * d_model + d_model
    total += cfg.freq_dim * d_model + d_model + d_model**2 + d_model + 6 * d_model**2 + 6 * d_model
    block = 4 * d_model**2 + 4 * d_model + 2 * d_model + 2 * d_model * ffn + ffn + d_model + 6 * d_model
    if cfg.text_dim is not None:
        total += cfg.text_dim * d_model + d_model + d_model**2 + d_model
        block += 4 * d_model**2 + 4 * d_model + 2 * d_model + 2 * d_model
    total += layers * block + d_model * patch + patch + 2 * d_model
    if cfg.lact is not None:
        heads = cfg.lact.heads
        d = d_model // heads
        h = int(cfg.lact.inter_multi * d)
        m = 1 if cfg.lact.momentum else 0
        g = 1 if cfg.lact.output_gate else 0
        o = 1 if cfg.lact_qkv == "own" else 0
        a = 1 if cfg.lact.qk_affine else 0
        total += layers * (
            3 * heads * d * h
            + (3 + m) * (d_model + 1) * heads
            + g * d_model * heads
            + d
            + o * 3 * d_model**2
            + a * 4 * d_model
        )
    return total


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """t [...] flow times in [0, 1] -> [..., dim] (cos | sin of 1000 t at geometric frequencies), fp32."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def rotary_resolves(size: int, base: float, positions: int) -> bool:
    """Whether rotary channels of `size` (frequencies base^(-2j / size), j < size / 2, in radians per token)
    tell `positions` consecutive token positions apart: some frequency turns by 1 to pi radians across them.
    Faster ones wrap around (a position ~2 pi tokens away looks like the same one), slower ones barely turn. With
    head dim 16 (4 channels per spatial axis: 1 and 0.01 rad per token) an 8-token axis fails and the demo
    network painted ghost copies of shapes 6 tokens away; head dim 32 (0.16 rad per token) resolves it."""
    span = positions - 1
    return span < 1 or any(1.0 <= base ** (-2 * j / size) * span <= math.pi for j in range(size // 2))


class Rotary3D(nn.Module):
    """Rotary embedding over (frame, row, column): the head dim is split like Wan's, d - 4 (d // 6) for time
    and 2 (d // 6) each for rows and columns, each part rotated by its own axis position. ``dim`` is the head
    dim, so a LaCT layer (`LaCTLayer.rotate`) rotates its fast-weight q/k in groups of attention heads."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.dim = head_dim
        self.sizes = self.split(head_dim)
        self.axes = nn.ModuleList(RotaryEmbedding(size, base) for size in self.sizes)

    @staticmethod
    def split(head_dim: int) -> tuple[int, int, int]:
        """Channels of a head rotated by (frame, row, column) position."""
        part = 2 * (head_dim // 6)
        return head_dim - 2 * part, part, part

    def forward(self, x: Tensor, positions: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """x [..., L, head_dim], positions three [L] integer tensors -> x rotated."""
        parts = x.split(self.sizes, dim=-1)
        return torch.cat([rot(p, pos) for rot, p, pos in zip(self.axes, parts, positions)], dim=-1)


@dataclass
class BlockCache:
    """One block's sampling state: keys/values [B, heads, T, head_dim] of the last `window` clean chunks
    (oldest first, rotary applied) and the LaCT fast-weight state after the last clean chunk."""

    k: list[Tensor] = field(default_factory=list)
    v: list[Tensor] = field(default_factory=list)
    state: FastWeightState | None = None


@dataclass
class VideoCache:
    """The whole network's sampling state; `chunks` = clean chunks appended so far."""

    blocks: list[BlockCache]
    chunks: int = 0


class CrossAttention(nn.Module):
    """Attention from video tokens to caption tokens (q/k RMSNorm, no positions)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.kv, self.o = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x [B, L, D], context [B, Lc, D] -> [B, L, D]."""
        k, v = self.kv(context).chunk(2, dim=-1)
        q, k = self.norm_q(self.q(x)), self.norm_k(k)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class VideoBlock(nn.Module):
    """One block over x [B, S, T, D] (S segments of T tokens), time modulation e [B, S, 6, D]."""

    def __init__(self, cfg: VideoConfig):
        super().__init__()
        dim = cfg.dim
        self.num_heads, self.head_dim, self.window = cfg.num_heads, dim // cfg.num_heads, cfg.window
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=cfg.eps), nn.RMSNorm(dim, eps=cfg.eps)
        self.rotary = Rotary3D(self.head_dim, cfg.rope_base)
        self.lact = None
        # with its own projection the LaCT branch is given no qkv and projects y itself
        self.lact_shares_qkv = cfg.lact_qkv == "shared"
        self.lact_after_attention = cfg.lact_input == "attention"
        if cfg.lact is not None:
            # the schedule's chunk is always one segment of the interleaved sequence
            self.lact = LaCTLayer.from_config(
                dim,
                replace(cfg.lact, chunk_size=cfg.tokens_per_chunk),
                schedule="interleaved",
                qk_silu=False,
                rope_base=cfg.rope_base,
                own_qkv=not self.lact_shares_qkv,
                out_proj=False,
            )
            if cfg.lact.rotary:
                # the published video model's fast q/k get attention's 3D rotary, head by head
                self.lact.rotary = Rotary3D(self.head_dim, cfg.rope_base)
        self.o_proj = nn.Linear(dim, dim)
        self.cross = None
        if cfg.text_dim is not None:
            self.norm3 = nn.LayerNorm(dim, eps=cfg.eps)
            self.cross = CrossAttention(dim, cfg.num_heads, cfg.eps)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.zeros(6, dim))

    def attention_inputs(self, qkv: Tensor, positions) -> tuple[Tensor, Tensor, Tensor]:
        """qkv [B, L, 3D] -> q, k, v [B, heads, L, head_dim], q/k normalised and rotated."""
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))
        return self.rotary(q, positions), self.rotary(k, positions), v

    def forward(
        self,
        x: Tensor,
        e: Tensor,
        positions: tuple[Tensor, Tensor, Tensor],
        context: Tensor | None = None,
        cache: BlockCache | None = None,
        clean: bool = False,
    ) -> Tensor:
        """x [B, S, T, D], e [B, S, 6, D], positions three [S T] tensors, context [B, Lc, D] or None.

        Without a cache: the whole interleaved sequence. With one: a single segment (S = 1) that attends to
        the cached clean chunks and reads the cached fast weights; `clean=True` also writes it into the
        cache (keys/values, fast-weight update), as the training schedule does for clean segments."""
        batch, segments, tokens, dim = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (
            (self.modulation.to(e.dtype) + e).unsqueeze(3).unbind(2)
        )
        y = (self.norm1(x) * (1 + scale1) + shift1).flatten(1, 2)  # [B, S T, D]
        qkv = self.qkv(y)
        q, k, v = self.attention_inputs(qkv, positions)
        if cache is None:
            attn = interleaved_block_attention(q, k, v, tokens, self.window)
        else:
            attn = F.scaled_dot_product_attention(
                q, torch.cat([*cache.k, k], dim=2), torch.cat([*cache.v, v], dim=2)
            )
            if clean:
                cache.k, cache.v = [*cache.k, k][-self.window :], [*cache.v, v][-self.window :]
        mixed = attn.transpose(1, 2).flatten(2)
        if self.lact is not None:
            lact_positions = positions if self.lact.rotary is not None else None
            lact_qkv = qkv if self.lact_shares_qkv else None
            lact_x = y + mixed if self.lact_after_attention else y
            if cache is None:
                mixed = mixed + self.lact(lact_x, qkv=lact_qkv, positions=lact_positions)
            else:
                mixed = mixed + self.lact_step(lact_x, lact_qkv, lact_positions, cache, clean)
        x = x + gate1 * self.o_proj(mixed).unflatten(1, (segments, tokens))
        if self.cross is not None:
            x = x + self.cross(self.norm3(x).flatten(1, 2), context).unflatten(1, (segments, tokens))
        y = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.ffn(y)

    def lact_step(self, y: Tensor, qkv: Tensor | None, positions, cache: BlockCache, clean: bool) -> Tensor:
        """One segment of the interleaved schedule from the cached state: a clean segment first updates the
        fast weights on itself (exactly `interleaved_lact`'s step), then every segment reads them. qkv: the
        shared projection, or None when the LaCT layer has its own."""
        layer = self.lact
        inputs = layer.fast_weight_inputs(y, qkv, positions)
        if cache.state is None:
            weights = tuple(w.to(inputs.q.dtype) for w in layer.initial_weights(y.shape[0]))
            cache.state = FastWeightState.initial(*weights)
        if clean:
            cache.state = update_step(cache.state, inputs, muon=layer.muon)
        return layer.read_out(swiglu_apply(*cache.state.weights, inputs.q), y)


class VideoNet(nn.Module):
    """The network: noisy and clean latent chunks -> the flow (eps - x0) of every noisy chunk.

    Latents are [B, C, frames, h, w]; flow times t are in [0, 1] (0 = clean data, 1 = pure noise).
    """

    def __init__(self, cfg: VideoConfig | dict):
        super().__init__()
        cfg = VideoConfig(**cfg) if isinstance(cfg, dict) else cfg
        self.cfg = cfg
        dim = cfg.dim
        patch = cfg.in_channels * math.prod(cfg.patch_size)
        self.patch_embedding = nn.Linear(patch, dim)
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.text_embedding = None
        if cfg.text_dim is not None:
            self.text_embedding = nn.Sequential(
                nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
            )
        self.blocks = nn.ModuleList(VideoBlock(cfg) for _ in range(cfg.num_layers))
        self.head_norm = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(dim, patch)
        self.head_modulation = nn.Parameter(torch.zeros(2, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Wan's init: linear weights Xavier-uniform, biases 0, embedding MLPs N(0, 0.02), modulations
        N(0, 1/D), the output head 0 (the first prediction is 0). The LaCT layers then re-apply what they own
        (finish_lact_init: lr bias, zero output gate), so the branch still starts switched off."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for mlp in (self.time_embedding, self.text_embedding):
            for module in mlp or ():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:
            nn.init.normal_(block.modulation, std=self.cfg.dim**-0.5)
        nn.init.normal_(self.head_modulation, std=self.cfg.dim**-0.5)
        nn.init.zeros_(self.head.weight)
        finish_lact_init(self)  # last: the layers' own choices survive the blanket init above

    # ---------------------------------------------------------------------------------- tokens

    def check_latents(self, name: str, x: Tensor, frames: int | None = None) -> None:
        cfg = self.cfg
        h, w = cfg.latent_size
        if x.dim() != 5 or x.shape[1] != cfg.in_channels or tuple(x.shape[3:]) != (h, w):
            raise ValueError(
                f"{name} must be [B, C={cfg.in_channels}, frames, h={h}, w={w}] (VideoConfig.in_channels, "
                f"latent_size), got {tuple(x.shape)}"
            )
        if x.shape[2] % cfg.frames_per_chunk or (frames is not None and x.shape[2] != frames):
            expected = (
                frames if frames is not None else f"a multiple of frames_per_chunk={cfg.frames_per_chunk}"
            )
            raise ValueError(f"{name} has {x.shape[2]} frames, expected {expected}")

    def patchify(self, x: Tensor) -> Tensor:
        """[B, C, n F, h, w] -> [B, n, T, C pt ph pw] (tokens of each chunk in frame, row, column order)."""
        pt, ph, pw = self.cfg.patch_size
        ft, gh, gw = self.cfg.token_grid
        b, c = x.shape[:2]
        n = x.shape[2] // self.cfg.frames_per_chunk
        x = x.reshape(b, c, n, ft, pt, gh, ph, gw, pw)
        return x.permute(0, 2, 3, 5, 7, 1, 4, 6, 8).reshape(b, n, ft * gh * gw, c * pt * ph * pw)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """[B, n, T, C pt ph pw] -> [B, C, n F, h, w]."""
        pt, ph, pw = self.cfg.patch_size
        ft, gh, gw = self.cfg.token_grid
        b, n = tokens.shape[:2]
        c = self.cfg.in_channels
        x = tokens.reshape(b, n, ft, gh, gw, c, pt, ph, pw).permute(0, 5, 1, 2, 6, 3, 7, 4, 8)
        return x.reshape(b, c, n * ft * pt, gh * ph, gw * pw)

    def embed_patches(self, x: Tensor) -> Tensor:
        """Latents [B, C, n F, h, w] -> tokens [B, n, T, D], computed in the parameters' dtype (bf16 under
        FSDP2 with fsdp_param_dtype, which leaves the root's inputs in fp32 for the time embedding)."""
        return self.patch_embedding(self.patchify(x).to(self.patch_embedding.weight.dtype))

    def positions(self, chunks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Token positions of segments belonging to video chunks `chunks` [S]: three [S T] tensors (frame,
        row, column), frames counted in tokens from the clip start; a clean chunk and its noisy twin agree."""
        ft, gh, gw = self.cfg.token_grid
        frame, row, col = torch.meshgrid(
            torch.arange(ft, device=chunks.device),
            torch.arange(gh, device=chunks.device),
            torch.arange(gw, device=chunks.device),
            indexing="ij",
        )
        frame = chunks[:, None] * ft + frame.flatten()[None]
        count = chunks.shape[0]
        return frame.flatten(), row.flatten().repeat(count), col.flatten().repeat(count)

    def time_modulation(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """t [B, S] -> (e0 [B, S, D] for the head, e [B, S, 6, D] for the blocks)."""
        e0 = self.time_embedding(sinusoidal_embedding(t, self.cfg.freq_dim).to(self.head.weight.dtype))
        return e0, self.time_projection(e0).unflatten(-1, (6, self.cfg.dim))

    def embed_context(self, context: Tensor | None) -> Tensor | None:
        if self.text_embedding is None:
            return None
        if context is None or context.dim() != 3 or context.shape[-1] != self.cfg.text_dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(
                f"this network is conditioned (VideoConfig.text_dim={self.cfg.text_dim}): pass caption "
                f"embeddings [B, tokens, {self.cfg.text_dim}], got {got}"
            )
        return self.text_embedding(context.to(self.text_embedding[0].weight.dtype))

    def run_blocks(
        self, x: Tensor, e: Tensor, positions, context, caches=None, clean: bool = False
    ) -> Tensor:
        # a cache is only used when sampling, where there is nothing to recompute
        checkpointing = self.cfg.activation_checkpointing and caches is None
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            x = run_block(block, x, e, positions, context, cache, clean, checkpointing=checkpointing)
        return x

    def output(self, x: Tensor, e0: Tensor) -> Tensor:
        """x [B, n, T, D] (noisy segments), e0 [B, n, D] -> flow [B, C, n F, h, w]."""
        shift, scale = (self.head_modulation.to(e0.dtype) + e0[:, :, None]).unsqueeze(3).unbind(2)
        return self.unpatchify(self.head(self.head_norm(x) * (1 + scale) + shift))

    # ---------------------------------------------------------------------------------- training forward

    def forward(self, noisy: Tensor, clean: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        """Teacher-forced pass over N chunks.

        noisy [B, C, N F, h, w]: x_t of every chunk; clean [B, C, (N - 1) F or N F, h, w]: the clean
        chunks (the last one, if given, is never used); t [B, N] flow time of each noisy chunk;
        context [B, Lc, text_dim] caption embeddings (conditioned networks only).
        Returns the predicted flow eps - x0 for every noisy chunk, [B, C, N F, h, w].
        """
        self.check_latents("noisy", noisy)
        n = noisy.shape[2] // self.cfg.frames_per_chunk
        if clean.shape[2] == noisy.shape[2]:
            clean = clean[:, :, : (n - 1) * self.cfg.frames_per_chunk]
        self.check_latents("clean", clean, (n - 1) * self.cfg.frames_per_chunk)
        if t.shape != (noisy.shape[0], n):
            raise ValueError(f"t must be [B, chunks] = {[noisy.shape[0], n]}, got {tuple(t.shape)}")
        noisy_tokens = self.embed_patches(noisy)  # [B, N, T, D]
        clean_tokens = self.embed_patches(clean)  # [B, N - 1, T, D]
        x = torch.stack([noisy_tokens[:, :-1], clean_tokens], dim=2).flatten(1, 2)
        x = torch.cat([x, noisy_tokens[:, -1:]], dim=1)  # [B, 2N - 1, T, D]
        segment_t = torch.stack([t[:, :-1], torch.zeros_like(t[:, :-1])], dim=2).flatten(1)
        segment_t = torch.cat([segment_t, t[:, -1:]], dim=1)  # [B, 2N - 1]
        e0, e = self.time_modulation(segment_t)
        chunks = torch.arange(2 * n - 1, device=noisy.device) // 2
        x = self.run_blocks(x, e, self.positions(chunks), self.embed_context(context))
        return self.output(x[:, ::2], e0[:, ::2])

    # ---------------------------------------------------------------------------------- sampling with a cache

    def new_cache(self) -> VideoCache:
        """An empty sampling cache: no clean chunk seen, fast weights still the slow ones."""
        return VideoCache([BlockCache() for _ in self.blocks])

    def _segment(
        self, x: Tensor, t: Tensor, cache: VideoCache, context, clean: bool
    ) -> tuple[Tensor, Tensor]:
        self.check_latents("chunk", x, self.cfg.frames_per_chunk)
        tokens = self.embed_patches(x)  # [B, 1, T, D]
        e0, e = self.time_modulation(t[:, None])
        chunk = torch.tensor([cache.chunks], device=x.device)
        out = self.run_blocks(
            tokens, e, self.positions(chunk), self.embed_context(context), cache.blocks, clean
        )
        return out, e0

    def denoise_chunk(
        self, x_t: Tensor, t: Tensor, cache: VideoCache, context: Tensor | None = None
    ) -> Tensor:
        """The flow of the next chunk, x_t [B, C, F, h, w] at flow time t [B], given the clean chunks already
        in `cache` (which is left unchanged). Equals the noisy chunk's output of `forward` on the prefix."""
        out, e0 = self._segment(x_t, t, cache, context, clean=False)
        return self.output(out, e0)

    def append_clean_chunk(self, x0: Tensor, cache: VideoCache, context: Tensor | None = None) -> None:
        """Run a finished chunk x0 [B, C, F, h, w] once at t = 0: every block updates its fast weights on it
        and keeps its keys/values for the chunks after it."""
        t = torch.zeros(x0.shape[0], device=x0.device)
        self._segment(x0, t, cache, context, clean=True)
        cache.chunks += 1
