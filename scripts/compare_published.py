"""Layer-level equivalence with the published LaCT code, on CPU.

    python scripts/compare_published.py --published /path/to/LaCT-checkout

Builds the published layer (imported from the checkout at run time; nothing of it is copied into this
repository) and ours with the same weights (converted by lact/published.py, the mapping the checkpoint
importer uses) and prints the relative difference ||ours - published|| / ||published|| of their outputs for

- the NVS LaCT layer (lact_nvs/lact_ttt.py `FastWeightGluMLPMultihead`): bidirectional, one update on the
  input-view tokens, applied to all tokens; Muon (5 fixed-coefficient steps) and zero steps (normalised update);
- the LM fast-weight branch (lact_llm `LaCTSWIGLULayer`): causal chunks, momentum, low-rank initial weights,
  q/k scale and offset, rotary with the attention heads, learnable output scale; post-norm and pre-norm, with
  and without Muon.

The published LM layer file imports transformers, fla and flash-attn; when those are missing, only its
pure-torch parts run: the operator functions of lact_llm/lact_model/ttt_operation.py (imported as they are)
and the `LowRankFastWeight` class and `inv_softplus` of layer_lact_swiglu.py (their definitions are taken
from the file and executed alone), glued together as `LaCTSWIGLULayer.forward` does (q/k rescale, silu,
l2 norm, rope with fla's formula, learning-rate layout, per-head RMSNorm, output scale). The script says
which path it took. The NVS layer file needs einops.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import math
import os
import sys
import types
from pathlib import Path

# The published functions are wrapped in torch.compile; a comparison on CPU needs eager mode.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lact.ops  # noqa: E402
from lact.layer import LaCTLayer  # noqa: E402
from lact.published import to_ours  # noqa: E402


def load_file(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_definitions(path: Path, names: set[str]) -> dict:
    """Execute only the named top-level functions/classes of a published file (the rest needs packages we
    lack), in a namespace with torch, nn and math."""
    tree = ast.parse(path.read_text())
    body = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    missing = names - {n.name for n in body}
    if missing:
        raise SystemExit(f"{path}: no top-level definition of {sorted(missing)}")
    namespace = {"torch": torch, "nn": nn, "math": math, "F": F}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


class substituted_newton_schulz:
    """Diagnostic: run our operator with the published (bf16) Newton-Schulz function in place of ours, to show
    how much of a difference is the precision of that one step."""

    def __init__(self, published_fn):
        self.published_fn, self.ours = published_fn, lact.ops.newton_schulz

    def __enter__(self):
        lact.ops.newton_schulz = lambda x, coefficients: self.published_fn(x, coefficients).to(x.dtype)

    def __exit__(self, *exc):
        lact.ops.newton_schulz = self.ours


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize(module: nn.Module, seed: int) -> None:
    """Non-trivial values in every parameter (norm weights around 1, biases and offsets not zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("norm.weight", "qk_scale")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 and not name.endswith(("w0", "w1", "w2", "w_left", "w_right")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif p.dim() < 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ------------------------------------------------------------------------------------------------ NVS


def compare_nvs(root: Path, views: int, tokens_per_view: int, dim: int, inter_multi: int) -> list[tuple]:
    ttt = load_file(root / "lact_nvs" / "lact_ttt.py", "published_lact_ttt")
    rows = []
    n_in = (views - 1) * tokens_per_view
    order = [ttt.TTTOperator(0, n_in, True, False), ttt.TTTOperator(0, views * tokens_per_view, False, True)]
    torch.manual_seed(0)
    x = F.layer_norm(torch.randn(1, views * tokens_per_view, dim), (dim,))
    for steps, ours_muon in ((5, "fixed"), (0, "normalize"), (0, None)):
        torch.manual_seed(1)
        published = ttt.FastWeightGluMLPMultihead(
            dim, head_dim=dim, inter_multi=inter_multi, base_lr=0.01, muon_update_steps=steps
        )
        randomize(published, seed=2)
        ours = LaCTLayer(
            dim, 1, schedule="bidirectional", chunk_size=None, inter_multi=inter_multi, base_lr=0.01,
            muon=ours_muon, output_gate=None, init_gain=math.sqrt(2),
        )  # fmt: skip
        state, leftover = to_ours("nvs_layer", published.state_dict())
        assert not leftover, leftover
        ours.load_state_dict(state, strict=True)
        with torch.no_grad():
            want, _ = published(x, {"ttt_op_order": order})
            got = ours(x, update_len=n_in)
        label = f"NVS layer, published {steps} NS steps vs ours muon={ours_muon}"
        rows.append((label, rel(got, want), (got - want).abs().max().item()))
        if ours_muon is not None:
            ns = ttt.zeropower_via_newtonschulz5
            with substituted_newton_schulz(lambda g, c, ns=ns, steps=steps: ns(g, steps)):
                with torch.no_grad():
                    got = ours(x, update_len=n_in)
            label = "  same, ours with the published bf16 Newton-Schulz"
            rows.append((label, rel(got, want), (got - want).abs().max().item()))
    return rows


# ------------------------------------------------------------------------------------------------ LM


def published_lm_parts(root: Path):
    """(ttt_operation module, LowRankFastWeight class, inv_softplus, how they were loaded)."""
    folder = root / "lact_llm" / "lact_model"
    ops = load_file(folder / "ttt_operation.py", "published_ttt_operation")
    try:
        sys.path.insert(0, str(folder.parent))
        layer_module = importlib.import_module("lact_model.layer_lact_swiglu")
        how = "lact_model.layer_lact_swiglu imported as a whole"
        return ops, layer_module.LowRankFastWeight, layer_module.inv_softplus, how
    except ImportError as error:
        defs = load_definitions(folder / "layer_lact_swiglu.py", {"LowRankFastWeight", "inv_softplus"})
        how = (
            f"layer_lact_swiglu.py does not import here ({error}); ran ttt_operation.py as is and "
            "LowRankFastWeight + inv_softplus from layer_lact_swiglu.py alone, glued as LaCTSWIGLULayer.forward"
        )
        return ops, defs["LowRankFastWeight"], defs["inv_softplus"], how


def fla_rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """fla's RotaryEmbedding (interleaved=False) on x [b, s, heads, d], positions 0..s-1: x*cos + rotate_half(x)*sin."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(x.shape[1], dtype=torch.float32), inv_freq)  # [s, d/2]
    cos, sin = freqs.cos()[None, :, None], freqs.sin()[None, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def compare_lm(root: Path, dim: int, num_heads: int, heads: int, rank: int, chunk: int, length: int):
    ops, LowRank, inv_softplus, how = published_lm_parts(root)
    d = dim // heads
    rows = []
    torch.manual_seed(0)
    # The published layer's fast-weight parameters, under its own names and layouts.
    w0, w2 = LowRank(heads, d, d, rank, 0.5, True), LowRank(heads, d, d, rank, 0.5, True)
    w0._init_weights()
    w2._init_weights()
    pub = nn.Module()
    pub.w0, pub.w2 = w0, w2
    pub.w1 = nn.Parameter(torch.randn(heads, d, d) / math.sqrt(d))
    pub.lr_proj = nn.Linear(dim, 3 * heads)
    pub.qk_scale = nn.Parameter(torch.ones(dim, 2))
    pub.qk_offset = nn.Parameter(torch.zeros(dim, 2))
    pub.ttt_scale_proj = nn.Linear(dim, heads)
    pub.ttt_norm = nn.RMSNorm(d, eps=1e-5)  # fla RMSNorm(d, elementwise_affine=True), eps 1e-5
    pub.momentum_proj = nn.Sequential(nn.Linear(dim, heads), nn.Sigmoid())
    randomize(pub, seed=3)
    x = F.rms_norm(torch.randn(1, length, dim), (dim,))
    qkv = x @ (torch.randn(3 * dim, dim) * dim**-0.5).T
    theta = 1e6

    def published_branch(use_muon: bool, prenorm: bool, qkv=qkv) -> torch.Tensor:
        """LaCTSWIGLULayer.forward from `q, k, v = self.qkv(...)` to `ttt_x_normed` (attn_qk_norm false)."""
        q, k, v = qkv.chunk(3, dim=-1)
        fq = q * pub.qk_scale[:, 0] + pub.qk_offset[:, 0]
        fk = k * pub.qk_scale[:, 1] + pub.qk_offset[:, 1]
        split = lambda t: t.unflatten(-1, (heads, d)).transpose(1, 2).flatten(0, 1)  # noqa: E731  (b nh) s d
        fq, fk, fv = (F.silu(split(t)) for t in (fq, fk, v))
        fq, fk = ops.l2_norm(fq), ops.l2_norm(fk)
        merge = lambda t: t.unflatten(0, (1, heads)).transpose(1, 2).flatten(2)  # noqa: E731
        rope = lambda t: fla_rope(merge(t).unflatten(-1, (num_heads, -1)), theta).flatten(2)  # noqa: E731
        fq, fk = split(rope(fq)), split(rope(fk))
        lr = F.softplus(pub.lr_proj(x).float() + inv_softplus(0.001))
        lr = (
            lr.unflatten(-1, (heads, 3)).transpose(1, 2).flatten(0, 1)
        )  # "b s (n_h lr_dim) -> (b n_h) s lr_dim"
        lr0, lr1, lr2 = lr.chunk(3, dim=-1)
        momentum = pub.momentum_proj(x).float().transpose(1, 2).reshape(heads, length, 1)
        op = ops.prenorm_block_causal_lact_swiglu if prenorm else ops.block_causal_lact_swiglu
        out = op(
            w0().repeat(1, 1, 1), pub.w1.repeat(1, 1, 1), w2().repeat(1, 1, 1), fq, fk, fv, lr0, lr1, lr2,
            chunk_size=chunk, use_muon=use_muon, momentum=momentum,
        )  # fmt: skip
        scale = F.silu(pub.ttt_scale_proj(x)).transpose(1, 2).reshape(heads, length, 1)
        return merge(pub.ttt_norm(out) * scale)

    for use_muon, prenorm in ((False, False), (True, False), (False, True), (True, True)):
        ours = LaCTLayer(
            dim, heads, schedule="causal", chunk_size=chunk, base_lr=1e-3, momentum=True,
            muon="schedule" if use_muon else None, rotary=True, rotary_dim=dim // num_heads, rope_base=theta,
            own_qkv=False, out_proj=False, low_rank=rank, qk_affine=True, output_gate_bias=True, prenorm=prenorm,
        )  # fmt: skip
        state, leftover = to_ours("lm_layer", pub.state_dict())
        assert not leftover, leftover
        ours.load_state_dict(state, strict=True)
        with torch.no_grad():
            want = published_branch(use_muon, prenorm)
            got = ours(x, qkv=qkv)
        label = f"LM branch, {'pre' if prenorm else 'post'}-norm, {'Muon' if use_muon else 'no Muon'}"
        rows.append((label, rel(got, want), (got - want).abs().max().item()))
        if use_muon:
            with substituted_newton_schulz(lambda g, c: ops.zeropower_via_newtonschulz5(g)):
                with torch.no_grad():
                    got = ours(x, qkv=qkv)
            label = "  same, ours with the published bf16 Newton-Schulz"
            rows.append((label, rel(got, want), (got - want).abs().max().item()))
            noise = torch.randn(qkv.shape, generator=torch.Generator().manual_seed(9))
            with torch.no_grad():
                again = published_branch(use_muon, prenorm, qkv=qkv * (1 + 1e-6 * noise))
            label = "  (published vs itself with inputs x (1 + 1e-6 noise))"
            rows.append((label, rel(again, want), (again - want).abs().max().item()))
        if prenorm:
            ours.prenorm = False
            with torch.no_grad():
                post = ours(x, qkv=qkv)
            rows.append(
                (
                    "  (ours pre-norm vs ours post-norm, for scale)",
                    rel(got, post),
                    (got - post).abs().max().item(),
                )
            )
    return rows, how


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--published", type=Path, required=True, help="a checkout of a1600012888/LaCT")
    parser.add_argument("--nvs-views", type=int, default=3, help="views (the last one is the target)")
    parser.add_argument("--nvs-tokens", type=int, default=1024, help="tokens per view (256x256, patch 8)")
    parser.add_argument("--lm-length", type=int, default=2 * 2048 + 512, help="tokens (chunk 2048)")
    parser.add_argument("--lm-chunk", type=int, default=2048, help="LaCT chunk of the LM (published 2048)")
    parser.add_argument("--only", choices=("nvs", "lm"), default=None)
    parser.add_argument(
        "--lr-floor",
        type=float,
        default=None,
        help="our inner-lr floor for this comparison (default: lact.layer.LR_FLOOR; 0 = the published "
        "softplus(z + softplus^-1(base_lr)) exactly)",
    )
    args = parser.parse_args(argv)
    if args.lr_floor is not None:
        import lact.layer

        lact.layer.LR_FLOOR = args.lr_floor  # read at every call of LaCTLayer.fast_weight_inputs
    for sub in ("lact_nvs/lact_ttt.py", "lact_llm/lact_model/ttt_operation.py"):
        if not (args.published / sub).is_file():
            raise SystemExit(f"--published {args.published}: no {sub}; pass a checkout of a1600012888/LaCT")
    torch.set_grad_enabled(False)
    rows, how = [], None
    if args.only in (None, "nvs"):
        try:
            rows += compare_nvs(args.published, args.nvs_views, args.nvs_tokens, dim=768, inter_multi=2)
        except ImportError as error:
            raise SystemExit(
                f"the published NVS layer needs a package missing here: {error} (pip install einops)"
            ) from None
    if args.only in (None, "lm"):
        lm_rows, how = compare_lm(
            args.published,
            dim=1536,
            num_heads=24,
            heads=4,
            rank=32,
            chunk=args.lm_chunk,
            length=args.lm_length,
        )
        rows += lm_rows
    print(f"fp32 inputs on {torch.device('cpu')}, torch {torch.__version__}")
    if how:
        print(f"LM: {how}")
    print(f"{'case':<62} {'rel. diff':>10} {'max abs':>10}")
    for label, r, m in rows:
        print(f"{label:<62} {r:10.2e} {m:10.2e}")


if __name__ == "__main__":
    main()
