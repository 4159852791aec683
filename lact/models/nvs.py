"""Novel view synthesis: an LVSM-style decoder-only transformer with LaCT layers (docs/architecture.md, The three networks).

    pixels   9 ray channels (o, d, o x d) + RGB in [-1, 1] (input views) or zeros (target views)
    tokens   patchify (p x p) -> Linear -> LayerNorm                                   [B, V, N, D]
    blocks   x += Attention_within_each_view(LN(x))
             x += LaCT_bidirectional(LN(x) of all views; the input views' tokens write the fast weights)
             x += SwiGLU_MLP(LN(x))
    output   target views only: LayerNorm -> Linear(D, 3 p p) -> sigmoid -> unpatchify   [B, Vt, 3, H, W]

Images are float in [0, 1], [B, V, 3, H, W]; cameras are OpenCV intrinsics [B, V, 4] (fx, fy, cx, cy in
pixels) and world-to-camera matrices [B, V, 4, 4] (see lact/geometry.py). Any number of input and target
views works at run time.

`NVSConfig.token_mixer: attention` is the LVSM baseline: the LaCT layer is replaced by attention in which
every token (input or target) attends to all input-view tokens, and never to a target token.

Target views never influence input views: attention stays within a view and only input tokens update the
fast weights (or, for the attention baseline, are attended to). So a scene can be reconstructed once (`reconstruct`: every layer's fast weights after the
update) and any number of target cameras rendered from that state afterwards (`render`), with the same
result as the full forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lact.geometry import patchify, plucker_rays, unpatchify
from lact.layer import LaCTConfig, LaCTLayer, finish_lact_init, lact_config
from lact.nn import GeluMLP, SwiGLUMLP, run_block
from lact.ops import FastWeights

RAY_CHANNELS = 9
RGB_CHANNELS = 3
TOKEN_MIXERS = ("lact", "attention")


def default_lact() -> LaCTConfig:
    """The NVS LaCT defaults (the published object model): 1 head, h = 4d, one update on all input tokens,
    inner lr 1e-2, no momentum (the bidirectional schedule has none), no Muon, no rotary."""
    return LaCTConfig(heads=1, inter_multi=4.0, chunk_size=None, base_lr=1e-2)


@dataclass
class NVSConfig:
    """Sizes of the NVS network. The defaults are the published object-level scale (24 layers, D 768).

    patch_size: pixels per patch side; image height and width must be multiples of it.
    num_heads: heads of the per-view attention (head dim = dim / num_heads).
    lact: the LaCT layers (lact/layer.py LaCTConfig; a dict of some of its fields overrides the NVS defaults
        of `default_lact`): heads (each holds a SwiGLU MLP of width d = dim / heads and hidden width
        inter_multi * d, so the fast-weight state is 3 * inter_multi * dim^2 / heads per layer), chunk_size
        (input-view tokens per update; None = one update on all of them), base_lr, muon, output_gate,
        init_gain (the published model: muon "fixed", output_gate None, init_gain sqrt 2). momentum, rotary
        and prenorm must stay off (the update-then-apply schedule has none of them).
    mlp_ratio: the SwiGLU MLP has hidden width round(2/3 * mlp_ratio * dim), the parameter count of a
        two-matrix MLP of width mlp_ratio * dim.
    output_bias: initial bias of the output logits, so every pixel starts at sigmoid(output_bias) (0.5 for
        0; 2.0 gives 0.88, near the white background of object renders, which saves the first few hundred
        steps of a short run).
    activation_checkpointing: recompute each block's activations in the backward pass (saves memory, costs
        ~1/3 time).
    compile: torch.compile each block's forward when training (lact/nn.py compile_blocks, applied by the
        task's configure_model); reconstruct and render stay eager.

    Options of the published NVS model besides the LaCT ones (configs/nvs/paper.yaml sets them;
    docs/fidelity.md maps them):
    mlp: "swiglu" (hidden round(2/3 mlp_ratio dim)) or "gelu" (two matrices, hidden mlp_ratio * dim, exact
        GELU: the published MLP; the same parameter count).
    norm_bias: LayerNorms with a bias (the published ones have none).
    output_bias: None gives the output Linear no bias at all (published).
    token_mixer: how information crosses views. "lact" (the method): a bidirectional LaCT layer whose fast
        weights the input views write and every view reads. "attention" (the LVSM baseline): every token
        attends to all input-view tokens (num_heads heads), targets never attended to; `lact` is then unused.
        The scene state of `reconstruct` is then each layer's input-view keys and values, which grow with
        the number of input views where the fast weights do not.
    colour_values: every LaCT layer also adds a linear projection of the input views' raw patch colours
        (RGB in [-1, 1]) to the values its fast weights are written with, so the input colours reach the
        memory directly rather than through the residual stream, where the rays dominate early in training
        (token_mixer "lact" only).
    """

    patch_size: int = 8
    dim: int = 768
    num_layers: int = 24
    num_heads: int = 12
    lact: LaCTConfig = field(default_factory=default_lact)
    mlp_ratio: float = 4.0
    output_bias: float | None = 0.0
    activation_checkpointing: bool = False
    compile: bool = False
    mlp: str = "swiglu"
    norm_bias: bool = True
    token_mixer: str = "lact"
    colour_values: bool = False

    def __post_init__(self):
        for name in ("patch_size", "dim", "num_layers", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"NVSConfig.{name} must be a positive int, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"NVSConfig.num_heads={self.num_heads} must divide dim={self.dim}")
        self.lact = lact_config(self.lact, default_lact(), "NVSConfig", self.dim)
        for name in ("momentum", "rotary", "prenorm"):
            if getattr(self.lact, name):
                raise ValueError(
                    f"NVSConfig.lact.{name} must be false: the bidirectional schedule has no {name}"
                )
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"NVSConfig.mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        if not isinstance(self.norm_bias, bool):
            raise ValueError(f"NVSConfig.norm_bias must be true or false, got {self.norm_bias!r}")
        if self.output_bias is not None and (
            isinstance(self.output_bias, bool) or not isinstance(self.output_bias, (int, float))
        ):
            raise ValueError(f"NVSConfig.output_bias must be a number or null, got {self.output_bias!r}")
        if self.token_mixer not in TOKEN_MIXERS:
            raise ValueError(
                f"NVSConfig.token_mixer must be one of {list(TOKEN_MIXERS)}, got {self.token_mixer!r}"
            )
        if self.colour_values and self.token_mixer != "lact":
            raise ValueError("NVSConfig.colour_values feeds the LaCT values: it needs token_mixer='lact'")
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(
                f"NVSConfig.activation_checkpointing must be true or false, got {self.activation_checkpointing!r}"
            )
        if not isinstance(self.compile, bool):
            raise ValueError(f"NVSConfig.compile must be true or false, got {self.compile!r}")

    @property
    def mlp_hidden(self) -> int:
        if self.mlp == "gelu":
            return int(self.mlp_ratio * self.dim)
        return round(2 / 3 * self.mlp_ratio * self.dim)


class NVSState(NamedTuple):
    """A reconstructed scene: the fast weights of every layer after the update on the input views.

    weights[l] = (w_gate [B*H, h, d], w_up [B*H, h, d], w_down [B*H, d, h]) of block l (for
    token_mixer="attention": (keys, values) [B, heads, Vi*N, head_dim] of the input-view tokens); height and
    width are the input views' image size in pixels, the default size of rendered views.
    """

    weights: list[FastWeights]
    height: int
    width: int


class QKNormAttention(nn.Module):
    """Multi-head attention pieces with RMS-normalised q and k (keeps the logits bounded early in training),
    shared by the per-view attention and the LVSM baseline's input attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-5)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-5)
        self.proj = nn.Linear(dim, dim, bias=False)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, D] -> normalised q, k and v [B, heads, L, head_dim]."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [B, heads, Lq, head_dim] attends to k, v [B, heads, Lk, head_dim] -> [B, Lq, D]."""
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class ViewAttention(QKNormAttention):
    """Full self-attention among the tokens of each view separately. x [B, V, N, D] -> [B, V, N, D]."""

    def forward(self, x: Tensor) -> Tensor:
        return self.attend(*self.heads(x.flatten(0, 1))).view_as(x)


class InputAttention(QKNormAttention):
    """The LVSM baseline's token mixer: every token attends to all input-view tokens (and to nothing else).
    Same interface as the bidirectional LaCTLayer: x [B, L, D] with the `update_len` input tokens first ->
    [B, L, D]; `reconstruct` returns the inputs' keys and values [B, heads, L, head_dim], which `render`
    attends to."""

    def forward(self, x: Tensor, *, update_len: int) -> Tensor:
        q, k, v = self.heads(x)
        return self.attend(q, k[:, :, :update_len], v[:, :, :update_len])

    def reconstruct(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        q, k, v = self.heads(x)
        return self.attend(q, k, v), (k, v)

    def render(self, x: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        q, _, _ = self.heads(x)
        return self.attend(q, *kv)


class NVSBlock(nn.Module):
    """Three pre-norm residual sub-blocks: per-view attention, LaCT (or, for token_mixer="attention",
    InputAttention) over all views, SwiGLU MLP."""

    def __init__(self, config: NVSConfig):
        super().__init__()
        dim, bias = config.dim, config.norm_bias
        self.attn_norm = nn.LayerNorm(dim, bias=bias)
        self.attn = ViewAttention(dim, config.num_heads)
        self.lact_norm = nn.LayerNorm(dim, bias=bias)
        if config.token_mixer == "attention":
            self.lact = InputAttention(dim, config.num_heads)
        else:
            self.lact = LaCTLayer.from_config(dim, config.lact, schedule="bidirectional")
        self.colour_values = None
        if config.colour_values:
            self.colour_values = nn.Linear(RGB_CHANNELS * config.patch_size**2, dim, bias=False)
        self.mlp_norm = nn.LayerNorm(dim, bias=bias)
        mlp = GeluMLP if config.mlp == "gelu" else SwiGLUMLP
        self.mlp = mlp(dim, config.mlp_hidden)

    def mixer_kwargs(self, h: Tensor, colour: Tensor | None) -> dict:
        """The LaCT layer's qkv with the input colours added to its values (colour_values), else nothing.
        h [B, L, D] normalised tokens; colour [B, Li, 3 p p] the first Li tokens' patch colours."""
        if self.colour_values is None:
            return {}
        qkv = self.lact.qkv(h)
        values = F.pad(self.colour_values(colour), (2 * h.shape[-1], 0, 0, h.shape[1] - colour.shape[1]))
        return {"qkv": qkv + values.to(qkv.dtype)}

    def forward(self, x: Tensor, num_inputs: int, colour: Tensor | None = None) -> Tensor:
        """x [B, V, N, D] with the `num_inputs` input views first -> [B, V, N, D]. colour [B, Vi N, 3 p p]:
        the input views' patch colours, needed with colour_values."""
        x = x + self.attn(self.attn_norm(x))
        tokens = x.shape[2]
        h = self.lact_norm(x).flatten(1, 2)
        x = x + self.lact(h, update_len=num_inputs * tokens, **self.mixer_kwargs(h, colour)).view_as(x)
        return x + self.mlp(self.mlp_norm(x))

    def reconstruct(self, x: Tensor, colour: Tensor | None = None) -> tuple[Tensor, FastWeights]:
        """Input views only: x [B, Vi, N, D] -> (x [B, Vi, N, D], this layer's updated fast weights)."""
        x = x + self.attn(self.attn_norm(x))
        h = self.lact_norm(x).flatten(1, 2)
        y, weights = self.lact.reconstruct(h, **self.mixer_kwargs(h, colour))
        x = x + y.view_as(x)
        return x + self.mlp(self.mlp_norm(x)), weights

    def render(self, x: Tensor, weights: FastWeights) -> Tensor:
        """Target views only, reading the fast weights from `reconstruct`: x [B, Vt, N, D] -> same shape."""
        x = x + self.attn(self.attn_norm(x))
        x = x + self.lact.render(self.lact_norm(x).flatten(1, 2), weights).view_as(x)
        return x + self.mlp(self.mlp_norm(x))


class NVSNet(nn.Module):
    """The decoder-only NVS network; see the module docstring for shapes."""

    def __init__(self, config: NVSConfig | None = None):
        super().__init__()
        self.config = config = config or NVSConfig()
        p, dim = config.patch_size, config.dim
        self.embed = nn.Linear((RAY_CHANNELS + RGB_CHANNELS) * p * p, dim, bias=False)
        self.embed_norm = nn.LayerNorm(dim, bias=config.norm_bias)
        self.blocks = nn.ModuleList(NVSBlock(config) for _ in range(config.num_layers))
        self.out_norm = nn.LayerNorm(dim, bias=config.norm_bias)
        self.out = nn.Linear(dim, RGB_CHANNELS * p * p, bias=config.output_bias is not None)
        self.apply(init_linear)
        if config.output_bias is not None:
            nn.init.constant_(self.out.bias, config.output_bias)
        finish_lact_init(self)  # last: the layers' own choices (zero gate) survive init_linear

    # ---------------------------------------------------------------------------------------- tokens

    def tokenize(self, intrinsics: Tensor, w2c: Tensor, images: Tensor | None, height: int, width: int):
        """Views -> tokens [B, V, N, D], N = (H/p)(W/p). `images` [B, V, 3, H, W] in [0, 1], or None for
        target views (their RGB channels are zeros)."""
        check_cameras(intrinsics, w2c)
        rays = plucker_rays(intrinsics, w2c, height, width)  # [B, V, 9, H, W]
        if images is None:
            rgb = rays.new_zeros(*rays.shape[:2], RGB_CHANNELS, height, width)
        else:
            if images.shape != (*rays.shape[:2], RGB_CHANNELS, height, width):
                raise ValueError(
                    f"images must be [B, V, 3, H, W] = {[*rays.shape[:2], RGB_CHANNELS, height, width]} "
                    f"to match the cameras, got {list(images.shape)}"
                )
            rgb = images.to(rays.dtype) * 2 - 1
        pixels = torch.cat([rays, rgb], dim=2)
        return self.embed_norm(
            self.embed(patchify(pixels, self.config.patch_size).to(self.embed.weight.dtype))
        )

    def colour_patches(self, images: Tensor) -> Tensor | None:
        """With colour_values: input images [B, Vi, 3, H, W] in [0, 1] -> patch colours [B, Vi N, 3 p p] in
        [-1, 1] (what the LaCT values receive); else None."""
        if not self.config.colour_values:
            return None
        patches = patchify(images * 2 - 1, self.config.patch_size).flatten(1, 2)
        return patches.to(self.embed.weight.dtype)

    def decode(self, x: Tensor, height: int, width: int) -> Tensor:
        """Target tokens [B, V, N, D] -> images [B, V, 3, H, W] in (0, 1)."""
        return unpatchify(torch.sigmoid(self.out(self.out_norm(x))), self.config.patch_size, height, width)

    # ---------------------------------------------------------------------------------------- passes

    def forward(
        self,
        images: Tensor,
        intrinsics: Tensor,
        w2c: Tensor,
        target_intrinsics: Tensor,
        target_w2c: Tensor,
    ) -> Tensor:
        """All views in one pass. images [B, Vi, 3, H, W] in [0, 1] with cameras intrinsics [B, Vi, 4] and
        w2c [B, Vi, 4, 4]; target cameras [B, Vt, 4] and [B, Vt, 4, 4]. Returns [B, Vt, 3, H, W] in (0, 1)."""
        height, width = images.shape[-2:]
        check_view_counts(intrinsics, target_intrinsics)
        inputs = self.tokenize(intrinsics, w2c, images, height, width)
        targets = self.tokenize(target_intrinsics, target_w2c, None, height, width)
        num_inputs = inputs.shape[1]
        x = torch.cat([inputs, targets], dim=1)
        colour = self.colour_patches(images)
        for block in self.blocks:
            x = run_block(block, x, num_inputs, colour, checkpointing=self.config.activation_checkpointing)
        return self.decode(x[:, num_inputs:], height, width)

    def reconstruct(self, images: Tensor, intrinsics: Tensor, w2c: Tensor) -> NVSState:
        """Input views only (shapes as in forward) -> the scene's NVSState, rendered by `render`."""
        height, width = images.shape[-2:]
        x = self.tokenize(intrinsics, w2c, images, height, width)
        if x.shape[1] < 1:
            raise ValueError("reconstruct needs at least one input view, got 0")
        weights = []
        colour = self.colour_patches(images)
        for block in self.blocks:
            x, layer_weights = run_block(
                block.reconstruct, x, colour, checkpointing=self.config.activation_checkpointing
            )
            weights.append(layer_weights)
        return NVSState(weights, int(height), int(width))

    def render(
        self,
        state: NVSState,
        intrinsics: Tensor,
        w2c: Tensor,
        height: int | None = None,
        width: int | None = None,
    ) -> Tensor:
        """Target cameras intrinsics [B, Vt, 4], w2c [B, Vt, 4, 4] of a reconstructed scene -> images
        [B, Vt, 3, H, W] in (0, 1), by default at the input views' size. Vt may be anything, e.g. a chunk
        of a long turntable."""
        height, width = height or state.height, width or state.width
        x = self.tokenize(intrinsics, w2c, None, height, width)
        for block, weights in zip(self.blocks, state.weights, strict=True):
            x = run_block(block.render, x, weights, checkpointing=self.config.activation_checkpointing)
        return self.decode(x, height, width)


def init_linear(module: nn.Module) -> None:
    """Linear weights ~ N(0, 1 / (3 fan_in)), biases zero: std 0.02 at the published width (768), and the
    same scale relative to the fan-in for narrower models, where a fixed 0.02 would start every residual
    branch (and the LaCT branch's output gate) nearly switched off. The LaCT layers' slow fast weights are
    Parameters, not Linears, and keep their own initialisation (docs/architecture.md, The layer)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=(3 * module.in_features) ** -0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def check_cameras(intrinsics: Tensor, w2c: Tensor) -> None:
    if intrinsics.dim() != 3 or intrinsics.shape[-1] != 4:
        raise ValueError(f"intrinsics must be [B, V, 4] (fx, fy, cx, cy), got {list(intrinsics.shape)}")
    if w2c.shape != (*intrinsics.shape[:2], 4, 4):
        raise ValueError(f"w2c must be [B, V, 4, 4] = {[*intrinsics.shape[:2], 4, 4]}, got {list(w2c.shape)}")


def check_view_counts(input_intrinsics: Tensor, target_intrinsics: Tensor) -> None:
    """At least one input view (something to reconstruct from) and one target view (something to render)."""
    if input_intrinsics.dim() >= 2 and input_intrinsics.shape[1] < 1:
        raise ValueError("num_input_views must be >= 1: the model reconstructs the scene from input views")
    if target_intrinsics.dim() >= 2 and target_intrinsics.shape[1] < 1:
        raise ValueError("num_target_views must be >= 1: there is no view to render")
