"""Memory planner: bytes per GPU for training a task's network, from the network built on the meta device.

    python scripts/plan.py --config configs/lm/760m.yaml --config configs/lm/3b.yaml --nodes 8 --gpus-per-node 8 --seq-len 56000 \\
        --gpu-memory 80GiB

The network is built through the training CLI's own parser (so the YAML, its overrides and every field rename
are handled exactly as in training) under ``torch.device("meta")``: no memory, no weights. Parameters are
counted by walking the modules and sorting each parameter by the kind of module that owns it. Activations are
closed-form formulas, block type by block type, that count the tensors autograd saves for backward in
lact/models/*.py, lact/layer.py and lact/ops.py (torch 2.14). ``tests/modules/test_plan.py`` checks them
against the tensors autograd really saves (saved-tensor hooks) and the whole estimate against the peak
memory of a real training step on CPU, in one process and sharded over two.

Assumptions of a sharded run (ModelParallelStrategy, FSDP2 via modules/scale.py, one unit per block, the
root last, ``fsdp_param_dtype: bfloat16``, ``precision: bf16-mixed``):

- master parameters fp32 (4 B), sharded over all G GPUs: 4 P / G;
- gradients reduced in fp32 into the shards: 4 P / G;
- AdamW: exp_avg and exp_avg_sq in fp32: 8 P / G;
- compute in bf16 (2 B): FSDP2 gathers a unit's parameters in bf16 around its forward and backward. The
  root unit (embeddings, head) stays gathered for the whole step (FSDP2 does not reshard the root after
  forward); of the blocks, the one computing and the next one (prefetched) are gathered, and in backward the
  computing block also holds its unsharded bf16 gradients and their fp32 copy for the reduce-scatter:
  gathered = 2 P_root + 2 * 2 P_block + (2 + 4) P_block;
- activations in bf16 except what the code keeps in fp32 (inner learning rates, momentum, norm statistics,
  attention log-sum-exp, the LM loss's log-softmax);
- a fraction ``headroom`` of the GPU (default 10%) is left for the CUDA context, NCCL buffers and allocator
  fragmentation. Not counted: the data loader's pinned buffers and, for NVS, the frozen LPIPS network.

Without sharding (G = 1, fp32, the CPU test) the master weights are the compute weights: no gathered copies.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lact.layer import LaCTLayer, LowRankFastWeight
from lact.models.lm import HybridBlock
from lact.models.nvs import NVSBlock, ViewAttention
from lact.models.video import VideoBlock
from lact.nn import GeluMLP, ShortConv, SwiGLUMLP
from lact.ops import MUON_COEFFICIENTS, lean_backward_mode, update_backward

GiB = 1024**3
FP32 = 4  # bytes of the tensors the code keeps in fp32 whatever the compute dtype


def network(module: nn.Module) -> nn.Module:
    """A task module's network (every task names it `net`)."""
    return module.net


def parse_bytes(text: str | int | float) -> int:
    """'80GiB', '80GB', '512MiB', '1.5TiB' or a plain number of bytes -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    units = {"tib": 1024**4, "gib": GiB, "mib": 1024**2, "kib": 1024, "tb": 10**12, "gb": 10**9, "mb": 10**6}
    units |= {"kb": 10**3, "b": 1}
    value = text.strip().lower().replace(" ", "")
    for unit, scale in units.items():
        if value.endswith(unit) and value[: -len(unit)]:
            return int(float(value[: -len(unit)]) * scale)
    try:
        return int(float(value))
    except ValueError:
        raise ValueError(
            f"gpu memory must look like 80GiB, 80GB or a number of bytes, got {text!r}"
        ) from None


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


# ----------------------------------------------------------------------------------------------------------
# Parameters by module kind

KINDS = (
    "LaCT fast weights W0 (slow)",
    "LaCT projections (lr, momentum, gate, qkv, out)",
    "attention / token mixer projections",
    "MLP",
    "embeddings and head",
    "norms",
    "other",
)


def parameter_kind(owners: Sequence[nn.Module], name: str, in_block: bool) -> str:
    """The kind of a parameter from the chain of modules that own it (outermost first) and its name."""
    innermost = owners[-1]
    if isinstance(innermost, (nn.RMSNorm, nn.LayerNorm)):
        return "norms"
    if any(getattr(parent, "ffn", None) is child for parent, child in zip(owners, owners[1:])):
        return "MLP"  # a block's `ffn` (the video block's Linear-GELU-Linear)
    for module in reversed(owners):
        if isinstance(module, LowRankFastWeight):  # the low-rank factors of an initial fast weight
            return KINDS[0]
        if isinstance(module, LaCTLayer):
            return KINDS[0] if module is innermost and name in ("w_gate", "w_up", "w_down") else KINDS[1]
        if isinstance(module, (SwiGLUMLP, GeluMLP)):
            return "MLP"
        if isinstance(module, (ViewAttention, ShortConv)) or "attention" in type(module).__name__.lower():
            return KINDS[2]
        if isinstance(module, nn.Embedding):
            return "embeddings and head"
    if in_block and isinstance(innermost, nn.Linear):
        return KINDS[2]  # a block's own projections: the LM's qkv and o_proj, shared by attention and LaCT
    if not in_block:
        return "embeddings and head"  # token embedding, LM head, NVS patch embedding and pixel decoder
    return "other"


def parameters_by_kind(net: nn.Module) -> dict[str, int]:
    """{kind: parameter count} over the network, each parameter counted once (tied weights too)."""
    counts = dict.fromkeys(KINDS, 0)
    seen: set[int] = set()
    blocks = {id(b) for b in getattr(net, "blocks", ())}

    def walk(module: nn.Module, owners: list[nn.Module], in_block: bool) -> None:
        in_block = in_block or id(module) in blocks
        chain = [*owners, module]
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                counts[parameter_kind(chain, name, in_block)] += param.numel()
        for child in module.children():
            walk(child, chain, in_block)

    walk(net, [], False)
    return {k: v for k, v in counts.items() if v}


# ----------------------------------------------------------------------------------------------------------
# Activations: what autograd saves, in bytes. T = B L tokens, a = bytes per compute element.


@dataclass(frozen=True)
class Workload:
    """One micro-batch: `batch` samples of `seq_len` tokens each. For NVS the tokens of a sample are all its
    views, `view_tokens` = (H / p) (W / p) per view, of which the input views (`input_fraction` of them)
    write the fast weights. For video a sample is one interleaved sequence of segments (noisy and clean
    chunks) of `chunk_tokens` tokens each, conditioned on `context_tokens` caption tokens."""

    batch: int
    seq_len: int
    view_tokens: int | None = None
    input_fraction: float = 1.0
    chunk_tokens: int | None = None
    context_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


def norm_bytes(norm: nn.Module, tokens: int, width: int, a: int) -> float:
    """A pre-norm over `width` features, outputs not counted (the consumer saves them).

    RMSNorm (torch.rms_norm with a weight): its input, the normalised input (for the weight's gradient), and
    rstd [T] fp32: 2 T width a + 4 T.  LayerNorm: its input, mean and rstd: T width a + 8 T.
    """
    if isinstance(norm, nn.LayerNorm):
        return tokens * width * a + 2 * FP32 * tokens
    return 2 * tokens * width * a + FP32 * tokens


def mlp_bytes(mlp: SwiGLUMLP | GeluMLP, tokens: int, a: int) -> float:
    """SwiGLU MLP y = down(silu(g) * u), [g, u] = gate_up(x), hidden F, input x saved by its consumer:
    gate_up's output [T, 2F] (silu and the product read it), silu(g) [T, F] and the product [T, F] (down's
    input): 4 T F a.  GELU MLP y = proj(gelu(fc(x))): fc's output (gelu's input) and proj's input: 2 T F a."""
    if isinstance(mlp, GeluMLP):
        return 2 * tokens * mlp.proj.in_features * a
    return 4 * tokens * mlp.down.in_features * a


def lact_operator_bytes(layer: LaCTLayer, batch: int, length: int, update_len: int, updates: int, a: int):
    """The LaCT operator (lact/ops.py) on B sequences of L tokens, per layer, H heads, head dim d, hidden h.

    apply (all L tokens, swiglu_apply): W_gate q, W_up q, silu(W_gate q), their product:   4 B H L h a
    update (L_u tokens written, swiglu_update per chunk): 13 tensors [b, h] (sigmoid(G), G, silu(G), U, Hid,
        Hid*lr, P, P*silu(G), 1 - sig, silu'(G) factor, P*U, silu'(G), P*U*silu'(G)) and k*lr_up, k*lr_gate
        [b, d]:                                                                              B H L_u (13 h + 2 d) a
    state, per update (n_u of them): the weights W_c the chunk's matmuls read, W_c + dW before the weight
        norm (3 matrices d*h each), and with momentum the momentum buffer:                  n_u B H 3 d h (2 + m) a
    Muon (when on), per update and matrix m x n (m <= n): s Newton-Schulz steps (5; 0 for "normalize") each
        saving X, A = X X^T and bA + cA^2, plus the normalised input:                     n_u B H 3 ((s + 1) m n + 2 s m^2) a
    Causal: L_u = (ceil(L / C) - 1) C tokens, n_u = ceil(L / C) - 1 (the last chunk only reads).
    Bidirectional: L_u = the input tokens, n_u = ceil(L_u / C) (one update when C is None).
    Under the hand-derived backward (lact.ops.set_lean_backward; by default on, in its "keep" mode, for every
    apply and for every update but the pre-norm variant's) an apply saves only the weights it read and its
    queries (held by the layer anyway), so the apply term above becomes 0 (in the "keep_all" mode its G, U:
    2 B H L h a); an update saves, in the "keep" and "keep_all" modes, its chunk's G, U, P instead of the
    13 + 2 tensors above:                                                                 B H L_u 3 h a
    (nothing [L, h]-sized in the lean mode), and the same per-update state (W_c, its update before the weight
    norm, the momentum buffer), with Muon also the update after Newton-Schulz, the s iterates and their s
    Gram matrices:                                                                   n_u B H 3 ((1 + s) m n + s m^2) a
    """
    heads, d, h = layer.num_heads, layer.head_dim, layer.hidden
    bh = batch * heads
    mode = lean_backward_mode()
    backward = update_backward(layer.prenorm)
    lean_update = backward != "autograd"
    total = 4 * bh * length * h * a if mode is False else 2 * bh * length * h * a if mode == "keep_all" else 0
    if not lean_update:
        total += bh * update_len * (13 * h + 2 * d) * a
    elif backward == "keep":
        total += bh * update_len * 3 * h * a
    momentum = 1 if layer.momentum_proj is not None else 0
    total += updates * bh * 3 * d * h * (2 + momentum) * a
    if layer.muon is not None:
        m, n = min(d, h), max(d, h)
        steps = len(MUON_COEFFICIENTS[layer.muon])
        if lean_update:
            total += updates * bh * 3 * ((1 + steps) * m * n + steps * m * m) * a
        else:
            total += updates * bh * 3 * ((steps + 1) * m * n + 2 * steps * m * m) * a
    return total


def lact_schedule(layer: LaCTLayer, length: int, update_len: int | None) -> tuple[int, int]:
    """(tokens written, number of updates) of one sequence under the layer's schedule."""
    chunk = layer.chunk_size
    if layer.schedule == "causal":
        chunks = math.ceil(length / chunk)
        return min(length, (chunks - 1) * chunk), chunks - 1
    if layer.schedule == "bidirectional":
        update_len = length if update_len is None else update_len
        return update_len, 1 if chunk is None else math.ceil(update_len / chunk)
    segments = length // chunk  # interleaved: every second segment (the clean ones) is written
    return (segments // 2) * chunk, segments // 2


def lact_layer_bytes(layer: LaCTLayer, batch: int, length: int, update_len: int | None, a: int) -> float:
    """The LaCT layer (lact/layer.py) around the operator, its input x (saved by its consumer) not counted.

    inputs: with its own qkv (NVS), qkv [T, 3D]; q, k before the L2 norm (silu or rotary output; without
        either, views of the qkv counted by its owner) and after it, v = silu(v): 5 T D a (+ 3 T D a with own qkv); lr: pre-softplus and per-head copies 6 T H fp32;
        momentum: sigmoid output and per-head copy 2 T H fp32.
    output: o [T, D], RMSNorm's normalised o and its output (read by the gate product): 3 T D a; with its own
        o_proj, the head-merged copy T D a; the gate's silu input T H a.
    qk_affine: the rescaled q, k joined with v into a new [T, 3D] that the silu reads: 3 T D a.
    plus lact_operator_bytes.
    """
    tokens, dim, heads = batch * length, layer.dim, layer.num_heads
    total = 5 * tokens * dim * a + 3 * tokens * dim * a + 6 * tokens * heads * FP32
    if not layer.qk_silu and layer.rotary is None:
        total -= 2 * tokens * dim * a  # q, k before the L2 norm are views of qkv, counted by its owner
    if layer.qkv is not None:
        total += 3 * tokens * dim * a
    if layer.momentum_proj is not None:
        total += 2 * tokens * heads * FP32
    if layer.o_proj is not None:
        total += tokens * dim * a
    if layer.gate_proj is not None:
        total += tokens * heads * a
    if layer.qk_scale is not None:
        total += 3 * tokens * dim * a
    written, updates = lact_schedule(layer, length, update_len)
    return total + lact_operator_bytes(layer, batch, length, written, updates, a)


def lm_block_bytes(block: HybridBlock, work: Workload, a: int) -> float:
    """The LM hybrid block (lact/models/lm.py), x [B, L, D] -> [B, L, D], W = window, n_h attention heads:

    attn_norm 2 T D a + 4 T; xn (qkv's input) T D a; qkv [T, 3D] 3 T D a (attention's v and LaCT's q, k, v
    read it); attention: rotary q, k 2 T D a; for L > W, sliding_window_attention cuts L_p = n W (padded)
    into n blocks and builds keys and values of the previous and current block, 4 T_p D a (n - 1) / n, a copy
    of the queries T_p D a (n - 1) / n, the outputs T_p D a and log-sum-exp 4 T_p n_h; o_proj's input
    T D a; mlp_norm 2 T D a + 4 T and its output T D a; the MLP; the LaCT layer (shared qkv, no out
    projection); a short convolution over qkv adds its output 3 T D a.
    """
    batch, length, tokens = work.batch, work.seq_len, work.tokens
    dim = block.qkv.in_features
    total = norm_bytes(block.attn_norm, tokens, dim, a) + tokens * dim * a + 3 * tokens * dim * a
    if block.qkv_conv is not None:
        total += 3 * tokens * dim * a
    window = block.window
    padded = batch * (math.ceil(length / window) * window)
    total += 2 * tokens * dim * a  # rotary q and k
    if length > window:
        share = (math.ceil(length / window) - 1) / math.ceil(length / window)
        total += 5 * padded * dim * a * share
    total += padded * dim * a + FP32 * padded * block.num_heads
    total += tokens * dim * a  # o_proj input
    total += norm_bytes(block.mlp_norm, tokens, dim, a) + tokens * dim * a + mlp_bytes(block.mlp, tokens, a)
    if block.lact is not None:
        total += lact_layer_bytes(block.lact, batch, length, None, a)
    return total


def nvs_block_bytes(block: NVSBlock, work: Workload, a: int) -> float:
    """The NVS block (lact/models/nvs.py) over all views, T = B V N tokens, n_h attention heads:

    attn_norm (LayerNorm) T D a + 8 T and its output T D a; view attention: qkv 3 T D a, RMSNorm of q and k
    (normalised copies and outputs 4 T D a, rstd 8 T n_h), SDPA's output T D a and log-sum-exp 4 T n_h,
    proj's input T D a; lact_norm T D a + 8 T and its output T D a; the LaCT layer with its own qkv and
    output projection, the input views' tokens writing (bidirectional); mlp_norm T D a + 8 T, its output
    T D a, the MLP.
    """
    if not isinstance(block.lact, LaCTLayer):
        raise ValueError(
            "the memory plan covers NVSConfig.token_mixer='lact' only, not the attention baseline "
            f"({type(block.lact).__name__})"
        )
    tokens, dim = work.tokens, block.attn.qkv.in_features
    heads = attention_heads(block.attn)
    total = 3 * (norm_bytes(block.attn_norm, tokens, dim, a) + tokens * dim * a)  # three norms + outputs
    total += 3 * tokens * dim * a + 4 * tokens * dim * a + 2 * FP32 * tokens * heads
    total += tokens * dim * a + FP32 * tokens * heads + tokens * dim * a
    update_len = round(work.seq_len * work.input_fraction)
    total += lact_layer_bytes(block.lact, work.batch, work.seq_len, update_len, a)
    return total + mlp_bytes(block.mlp, tokens, a)


def video_block_bytes(block: VideoBlock, work: Workload, a: int) -> float:
    """The video block (lact/models/video.py) over interleaved sequences of S segments of T tokens each
    (L = S T per sample, N = B L tokens), n_h attention heads of width e = D / n_h, a window of w clean
    chunks, FFN width F:

    time modulation: the six per-segment modulations 6 B S D a (the gates read them) and 1 + scale twice,
    2 B S D a; norm1 and norm2 (LayerNorm without weights): input N D a, mean and rstd 8 N, normalised output
    (read by the scale product) N D a, each; qkv's input N D a and output 3 N D a (q/k RMSNorm read it);
    RMSNorm of q and k: normalised copies 2 N D a and rstd 8 N; 3D rotary: cos and sin per axis for q and k,
    2 L e fp32 (per sequence, shared by the batch); window attention (lact/attention.py, grouped by how many
    clean chunks a segment sees, so without a mask and in fused kernels): query copy and output 2 N D a, keys
    and values of (w + 1) segments for every segment past the first w chunks, 2 (w + 1) (S - w) B T D a,
    log-sum-exp 4 N n_h; o_proj's input and output (read by the gate) 2 N D a; FFN: input N D a, GELU's input
    and output 2 N F a, output (read by the gate) N D a; the LaCT layer (shared qkv, no output projection,
    one update per clean segment, lact_layer_bytes).
    Cross-attention (conditioned networks, Lc caption tokens): norm3 input N D a + 8 N and output N D a, q's
    output and RMSNorm (normalised copy, output) 3 N D a + 4 N, attention output and o's input 2 N D a,
    log-sum-exp 4 N n_h; the caption side (kv input and output, RMSNorm of k, keys and values) 7 B Lc D a.
    """
    tokens, batch, length = work.tokens, work.batch, work.seq_len
    if not work.chunk_tokens or length % work.chunk_tokens:
        raise ValueError(f"a video workload needs chunk_tokens dividing seq_len, got {work}")
    segments, chunk = length // work.chunk_tokens, work.chunk_tokens
    dim, heads = block.qkv.in_features, block.num_heads
    ffn = block.ffn[0].out_features
    total = 8 * batch * segments * dim * a
    total += 2 * (2 * tokens * dim * a + 2 * FP32 * tokens)  # norm1, norm2
    total += tokens * dim * a + 3 * tokens * dim * a + 2 * tokens * dim * a + 2 * FP32 * tokens
    total += 2 * length * block.head_dim * FP32
    window = min(block.window, (segments - 1) // 2)
    total += 2 * tokens * dim * a + 2 * (window + 1) * (segments - window) * batch * chunk * dim * a
    total += FP32 * tokens * heads
    total += 2 * tokens * dim * a  # o_proj
    total += 2 * tokens * dim * a + 2 * tokens * ffn * a  # FFN
    if block.lact is not None:
        total += lact_layer_bytes(block.lact, batch, length, None, a)
    if block.cross is not None:
        total += 7 * tokens * dim * a + 3 * FP32 * tokens + FP32 * tokens * heads
        total += 7 * batch * work.context_tokens * dim * a
    return total


def attention_heads(attn: nn.Module) -> int:
    for name in ("num_heads", "heads"):
        if isinstance(getattr(attn, name, None), int):
            return getattr(attn, name)
    raise TypeError(f"{type(attn).__name__} has no num_heads attribute")


# Block type -> formula. A new task adds its block here with the formula derived from its code.
BLOCK_FORMULAS = {HybridBlock: lm_block_bytes, NVSBlock: nvs_block_bytes, VideoBlock: video_block_bytes}


def block_bytes(block: nn.Module, work: Workload, a: int) -> float:
    """Bytes a block saves for backward (see the formula of its type)."""
    for kind, formula in BLOCK_FORMULAS.items():
        if isinstance(block, kind):
            return formula(block, work, a)
    raise TypeError(
        f"no activation formula for {type(block).__name__}: add one to modules.plan.BLOCK_FORMULAS"
    )


def block_workspace(block: nn.Module, work: Workload, a: int) -> float:
    """Gradients alive at once in a block's backward: those of its output and input (2 T D a) and of the
    widest intermediate, the MLP's [T, 2F] (2 T F a; a GELU MLP's is [T, F]; a block with neither, such as the
    video block's Linear-GELU-Linear FFN, twice its widest linear output). Measured on CPU: the peak of a step without
    checkpointing exceeds what the blocks keep by about this much (tests/modules/test_plan.py)."""
    widths = [
        2 * m.down.in_features if isinstance(m, SwiGLUMLP) else m.proj.in_features
        for m in block.modules()
        if isinstance(m, (SwiGLUMLP, GeluMLP))
    ]
    widest = max(widths or [2 * m.out_features for m in block.modules() if isinstance(m, nn.Linear)])
    dim = next(m.normalized_shape[-1] for m in block.modules() if isinstance(m, (nn.RMSNorm, nn.LayerNorm)))
    return work.tokens * (2 * dim + widest) * a


def block_width(net: nn.Module) -> int:
    """D: the width of the residual stream (a block's input and output)."""
    for module in net.blocks[0].modules():
        if isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
            return module.normalized_shape[-1]
    raise TypeError("cannot find the block width (no norm in the first block)")


def head_bytes(net: nn.Module, work: Workload, a: int) -> tuple[float, float]:
    """(saved, transient peak) of the network outside its blocks.

    LM (a token embedding): the final norm 2 T D a + 4 T, its output T D a; the loss takes logits [T, V] to
    fp32 and saves their log-softmax (4 T V). Its backward holds the log-softmax, the gradient flowing into it
    and the gradient out of it at once: transient 12 T V (plus the bf16 logits T V a in forward).
    NVS (no token embedding): the tokenizer's input pixels and the decoder's outputs are [T, 12 p^2] and
    [T_target, 3 p^2]: about 16 T p^2 a saved, with a transient of the same size.
    Video (P = C pt ph pw latent values per token): the last block's output, read by the head on its noisy
    half (a strided view keeps all of it), T D a; the head's norm and modulated input on the noisy half
    T D a; the fp32 flow prediction and its error against the target 2 T P fp32 (an upper bound: only the
    noisy half). Transient: the gradient into the blocks T D a and the loss's 2 T P fp32.
    """
    tokens, dim = work.tokens, block_width(net)
    embedding = next((m for m in net.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is not None:
        vocab = embedding.num_embeddings
        saved = 3 * tokens * dim * a + FP32 * tokens + FP32 * tokens * vocab
        return saved, 2 * FP32 * tokens * vocab + tokens * vocab * (a if a != FP32 else 0)
    if isinstance(net.blocks[0], VideoBlock):
        patch = net.head.out_features
        saved = 2 * tokens * dim * a + 2 * FP32 * tokens * patch
        return saved, tokens * dim * a + 2 * FP32 * tokens * patch
    pixels = sum(m.in_features + m.out_features for m in net.children() if isinstance(m, nn.Linear)) - 2 * dim
    return tokens * pixels * a, tokens * pixels * a


def fast_weight_state_bytes(net: nn.Module, batch: int, a: int) -> float:
    """One copy of every layer's fast weights for B sequences: sum over LaCT layers of B H 3 d h a."""
    return sum(batch * m.state_size * a for m in net.modules() if isinstance(m, LaCTLayer))


# ----------------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Setup:
    """Where and how it runs: G = nodes x gpus_per_node GPUs sharing the weights (FSDP2), compute dtype bytes."""

    gpus: int = 64
    gpu_memory: int = 80 * GiB
    compute_bytes: int = 2
    activation_checkpointing: bool = True
    headroom: float = 0.10

    @property
    def usable(self) -> float:
        return self.gpu_memory * (1 - self.headroom)


@dataclass
class Plan:
    """Bytes per GPU of one training step (see the module docstring for what each line assumes)."""

    parameters: dict[str, int]
    block_parameters: int  # the largest block's
    root_parameters: int  # outside the blocks
    num_blocks: int
    work: Workload
    setup: Setup
    block_activations: float  # saved for backward by one block, no checkpointing
    block_input: float  # what a checkpointed block keeps: its input [B, L, D]
    block_workspace: float  # gradients alive at once in a block's backward
    head_saved: float
    head_transient: float
    fast_weight_state: float  # one copy of all layers' fast weights (included in the activations)
    lines: dict[str, float] = field(default_factory=dict)

    @property
    def total_parameters(self) -> int:
        return sum(self.parameters.values())

    def compute(self) -> Plan:
        params, gpus, a = self.total_parameters, self.setup.gpus, self.setup.compute_bytes
        lines = {
            "parameters (fp32 master, sharded)": FP32 * params / gpus,
            "gradients (fp32, sharded)": FP32 * params / gpus,
            "AdamW state (2 x fp32, sharded)": 2 * FP32 * params / gpus,
        }
        if gpus > 1 or a != FP32:
            lines["gathered units (root + 2 blocks, block grads)"] = (
                a * self.root_parameters + 2 * a * self.block_parameters + (a + FP32) * self.block_parameters
            )
        # Backward frees a tensor's saved inputs as soon as its gradient is computed. The loss goes first: the
        # head's saved tensors and the loss gradients (head_saved + head_transient) on top of what the blocks
        # keep; they are gone before the first block's backward, which adds its gradient workspace and, with
        # checkpointing, its recomputed saved tensors (one block at a time).
        if self.setup.activation_checkpointing:
            kept = self.num_blocks * self.block_input
            block_peak = self.block_activations + self.block_workspace
        else:
            kept = self.num_blocks * self.block_activations
            block_peak = self.block_workspace
        lines["activations kept by the blocks"] = kept
        lines["peak on top (loss, or one block's backward)"] = max(
            self.head_saved + self.head_transient, block_peak
        )
        self.lines = lines
        return self

    @property
    def total(self) -> float:
        return sum(self.lines.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.setup.usable


def make_plan(net: nn.Module, work: Workload, setup: Setup) -> Plan:
    """The plan of `net` (on any device, meta included) for a micro-batch `work` under `setup`."""
    a = setup.compute_bytes
    blocks = list(net.blocks)
    block_params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() for p in net.parameters() if id(p) not in in_blocks)
    activations = max(block_bytes(b, work, a) for b in blocks)
    head_saved, head_transient = head_bytes(net, work, a)
    return Plan(
        parameters=parameters_by_kind(net),
        block_parameters=block_params,
        root_parameters=root,
        num_blocks=len(blocks),
        work=work,
        setup=setup,
        block_activations=activations,
        block_input=work.tokens * block_width(net) * a,
        block_workspace=max(block_workspace(b, work, a) for b in blocks),
        head_saved=head_saved,
        head_transient=head_transient,
        fast_weight_state=fast_weight_state_bytes(net, work.batch, a),
    ).compute()


def with_work(net: nn.Module, plan: Plan, **changes) -> Plan:
    return make_plan(net, replace(plan.work, **changes), plan.setup)


def longest_sequence(net: nn.Module, plan: Plan, limit: int = 1 << 24) -> int:
    """The longest seq_len (tokens per sample) that fits at the plan's micro-batch and setup; 0 if none."""
    step = plan.work.view_tokens or plan.work.chunk_tokens or 1  # NVS: whole views; video: whole segments
    lo, hi = 0, limit // step
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if with_work(net, plan, seq_len=mid * step).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo * step


def largest_batch(net: nn.Module, plan: Plan, limit: int = 1 << 16) -> int:
    """The largest micro-batch that fits at the plan's seq_len and setup; 0 if not even one sample."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if with_work(net, plan, batch=mid).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def what_fits(net: nn.Module, plan: Plan) -> str:
    """One sentence: it fits as configured, or the first setting (in order of cost) that makes it fit."""
    if plan.fits:
        if plan.setup.activation_checkpointing:
            off = make_plan(net, plan.work, replace(plan.setup, activation_checkpointing=False))
            if not off.fits:
                return f"fits as configured, because of activation checkpointing (off: {fmt_bytes(off.total)} per GPU)"
        return "fits as configured"
    tries = []
    if not plan.setup.activation_checkpointing:
        tries.append(
            ("activation checkpointing on", replace(plan.setup, activation_checkpointing=True), None)
        )
    if plan.work.batch > 1:
        tries.append(("micro-batch 1", plan.setup, 1))
        if not plan.setup.activation_checkpointing:
            tries.append(
                ("activation checkpointing on and micro-batch 1",
                 replace(plan.setup, activation_checkpointing=True), 1)
            )  # fmt: skip
    for text, setup, batch in tries:
        candidate = make_plan(net, replace(plan.work, batch=batch or plan.work.batch), setup)
        if candidate.fits:
            return f"does not fit as configured; fits with {text} ({fmt_bytes(candidate.total)} per GPU)"
    best = make_plan(net, replace(plan.work, batch=1), replace(plan.setup, activation_checkpointing=True))
    need = best.total / (1 - plan.setup.headroom)
    return (
        f"does not fit even with activation checkpointing and micro-batch 1 ({fmt_bytes(best.total)} per GPU, "
        f"{fmt_bytes(need)} of GPU memory needed): shorten the sequence (longest that fits: "
        f"{longest_sequence(net, best)} tokens) or add GPUs"
    )


# ----------------------------------------------------------------------------------------------------------
# From a training config

# Frozen metric networks loaded from disk (NVS's LPIPS) are not built: their weights may be absent on the
# planning machine and they hold no trained state. These init args, where a module has them, switch them off.
NO_FROZEN_METRICS = {"lpips_weight": 0.0, "lpips_metric": False}


def build_from_config(args: Sequence[str], device: str = "meta"):
    """(LightningModule, the parsed config) from train.py arguments, e.g. ["--config", "configs/lm/760m.yaml", "--config", "configs/lm/3b.yaml",
    "--model.init_args...", ...]: the training CLI's own parser, then only the model is instantiated (no
    trainer, no data), on `device` (meta: nothing allocated)."""
    import jsonargparse
    from lightning.pytorch import LightningModule
    from lightning.pytorch.cli import LightningArgumentParser

    import train

    class PlanCLI(train.LaCTCLI):
        def instantiate_classes(self) -> None:
            model = self.config.model.clone()
            for key, value in NO_FROZEN_METRICS.items():
                if key in model.init_args:
                    model.init_args[key] = value
            parser = LightningArgumentParser()
            parser.add_subclass_arguments(LightningModule, "model", required=True)
            self.model = parser.instantiate(jsonargparse.Namespace(model=model)).model

    jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees arguments in both places
    try:
        with torch.device(device):
            cli = PlanCLI(
                LightningModule,
                None,
                subclass_mode_model=True,
                subclass_mode_data=True,
                seed_everything_default=False,
                parser_kwargs={"parser_mode": "omegaconf+"},
                args=list(args),
                run=False,
            )
    finally:
        sys.argv = argv
    return cli.model, cli.config


def configured_checkpointing(net: nn.Module) -> bool:
    """Whether the network recomputes its blocks in backward, as its config says."""
    config = getattr(net, "config", None) or getattr(net, "cfg", None)
    return bool(getattr(config, "activation_checkpointing", False))


def configured_workload(
    net: nn.Module, config, seq_len: int | None, batch: int | None
) -> tuple[Workload, str]:
    """The micro-batch from the data config (overridden by seq_len and batch) and a line describing it.

    NVS: a sample's tokens are its views, (H / p) (W / p) tokens each; seq_len is rounded down to whole views
    and the input views keep the data config's share (num_input_views / all views)."""
    data = getattr(getattr(config, "data", None), "init_args", None) or {}
    batch = batch or data.get("batch_size") or 1
    if isinstance(net.blocks[0], NVSBlock):
        patch = net.config.patch_size
        size = data.get("image_size") or 256
        height, width = (size, size) if isinstance(size, int) else size
        view_tokens = (height // patch) * (width // patch)
        inputs, targets = data.get("num_input_views", 1), data.get("num_target_views", 1)
        views = inputs + targets if seq_len is None else max(1, seq_len // view_tokens)
        fraction = inputs / (inputs + targets)
        work = Workload(batch, views * view_tokens, view_tokens, fraction)
        text = (
            f"{views} views of {height}x{width} pixels, patch {patch}: {view_tokens} tokens per view, "
            f"{work.seq_len} tokens per sample, the first {round(work.seq_len * fraction)} (input views, "
            f"{inputs}:{targets} as in the data config) writing the fast weights"
        )
        return work, text
    if isinstance(net.blocks[0], VideoBlock):
        return video_workload(net.cfg, batch, seq_len)
    seq_len = seq_len or data.get("seq_len") or 2048
    return Workload(batch, seq_len), f"{seq_len} tokens per sample"


# Caption tokens a conditioned video network is planned with (Wan 2.1's umT5 text length).
VIDEO_CONTEXT_TOKENS = 512


def video_workload(cfg, batch: int, seq_len: int | None) -> tuple[Workload, str]:
    """Video: a sample is one interleaved sequence of 2 n - 1 segments of T tokens (n chunks of the clip).
    Without seq_len, the config's clip; with it, the shortest whole clip of at least seq_len tokens."""
    chunk = cfg.tokens_per_chunk
    chunks = cfg.num_chunks if seq_len is None else max(2, math.ceil((math.ceil(seq_len / chunk) + 1) / 2))
    segments = 2 * chunks - 1
    context = VIDEO_CONTEXT_TOKENS if cfg.text_dim is not None else 0
    work = Workload(batch, segments * chunk, chunk_tokens=chunk, context_tokens=context)
    text = (
        f"{chunks} chunks of {cfg.frames_per_chunk} latent frames, {chunk} tokens each: {segments} interleaved "
        f"segments, {work.seq_len} tokens per sample" + (f", {context} caption tokens" if context else "")
    )
    return work, text


def compute_bytes_of(config) -> int:
    """2 when the trainer computes in bf16/fp16 (precision bf16-mixed, bf16-true, 16-mixed), else 4."""
    precision = str(getattr(getattr(config, "trainer", None), "precision", None) or "32")
    return 2 if "16" in precision else 4


def report(module: nn.Module, plan: Plan, workload_text: str, nodes: int, gpus_per_node: int) -> str:
    """The planner's printout."""
    net = network(module)
    setup, work = plan.setup, plan.work
    out = [
        f"network: {type(net).__name__}, {len(list(net.blocks))} blocks, {plan.total_parameters:,} parameters"
    ]
    for kind, count in plan.parameters.items():
        out.append(f"  {kind:<48} {count:>16,}  {100 * count / plan.total_parameters:5.1f}%")
    dtype = "bf16" if setup.compute_bytes == 2 else "fp32"
    out.append(
        f"run: {nodes} node(s) x {gpus_per_node} GPU(s) = {setup.gpus} GPUs of {fmt_bytes(setup.gpu_memory)}, "
        f"FSDP2 over all of them, fp32 master weights, {dtype} compute, micro-batch {work.batch}, {workload_text}"
    )
    off = replace(setup, activation_checkpointing=False)
    on = replace(setup, activation_checkpointing=True)
    out.append(f"per block ({dtype}, micro-batch {work.batch}):")
    out.append(
        f"  fast-weight state, one copy of all LaCT layers     {fmt_bytes(plan.fast_weight_state / plan.num_blocks):>12}"
    )
    out.append(
        f"  activations, no checkpointing (saved for backward) {fmt_bytes(plan.block_activations):>12}"
    )
    out.append(f"  activations, checkpointing (the block's input)     {fmt_bytes(plan.block_input):>12}")
    for label, candidate in (("checkpointing off", off), ("checkpointing on", on)):
        p = make_plan(net, work, candidate)
        mark = "fits" if p.fits else "does NOT fit"
        out.append(
            f"per GPU, activation {label}: {fmt_bytes(p.total)} ({mark} in {fmt_bytes(setup.usable)} usable)"
        )
        for line, value in p.lines.items():
            out.append(f"  {line:<50} {fmt_bytes(value):>12}")
    state = "on" if setup.activation_checkpointing else "off"
    out.append(
        f"as configured (activation checkpointing {state}): {fmt_bytes(plan.total)} per GPU: {what_fits(net, plan)}"
    )
    best = make_plan(net, work, on) if not plan.fits else plan
    longest = longest_sequence(net, best)
    unit = " tokens" if not work.view_tokens else f" tokens ({longest // work.view_tokens} views)"
    if work.chunk_tokens:
        unit = f" tokens ({longest // work.chunk_tokens} segments)"
    out.append(
        f"longest sequence that fits (micro-batch {work.batch}, checkpointing "
        f"{'on' if best.setup.activation_checkpointing else 'off'}): {longest:,}{unit}"
    )
    out.append(f"largest micro-batch that fits at {work.seq_len:,} tokens: {largest_batch(net, best)}")
    return "\n".join(out)
