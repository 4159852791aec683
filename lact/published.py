"""Parameter names and layouts of the published LaCT code (github.com/a1600012888/LaCT), mapped to ours.

Two state-dict conversions, in both directions, used by scripts/import_published.py (released checkpoints)
and scripts/compare_published.py (layer equivalence):

    nvs   lact_nvs/model.py `LaCTLVSM`           <->  lact.models.nvs.NVSNet
    lm    lact_llm `LaCTForCausalLM`             <->  lact.models.lm.LaCTLM

What differs besides the names (read from the published code):
- Fast weights. NVS stores w0 (gate), w2 (up) as [heads, d, h] and w1 (down) as [heads, h, d]: ours are the
  transposes (w_gate, w_up [heads, h, d], w_down [heads, d, h]). The LM stores them in our layout; its low-rank
  w0/w2 `w_left`/`w_right` are our `LowRankFastWeight` `left`/`right`.
- Learning-rate rows. Both published layers keep one row per head and matrix in the order (gate, down, up);
  ours is (gate, up, down). NVS lays the rows out matrix-major (row = matrix * heads + head), the LM head-major
  (row = head * 3 + matrix); ours is matrix-major.
- NVS patches. Published patch vectors are laid out (p_row, p_col, channel), ours (channel, p_row, p_col):
  the columns of the input Linear and the rows of the output Linear are permuted accordingly.
- LM q/k scale and offset: published [D, 2] (column 0: q, column 1: k), ours [2, D].
- LM MLP: published gate_proj and up_proj are our one `gate_up` Linear (gate rows first).

`to_ours(kind, state)` and `to_published(kind, state)` return (converted state dict, the input keys that no
rule consumed); the caller decides whether leftovers are an error. Tensors are never modified in place.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Transform = Callable[[Tensor, dict], Tensor]


def _same(t: Tensor, ctx: dict) -> Tensor:
    return t


def _transpose(t: Tensor, ctx: dict) -> Tensor:
    return t.mT.contiguous()


# Learning-rate rows: published matrix order (gate, down, up) -> ours (gate, up, down); the permutation swaps
# two entries, so it is its own inverse.
LR_ORDER = (0, 2, 1)


def _nvs_lr(t: Tensor, ctx: dict) -> Tensor:
    """[3 H, ...] matrix-major rows in one matrix order -> the other (the permutation is an involution)."""
    return t.unflatten(0, (3, -1))[list(LR_ORDER)].flatten(0, 1).contiguous()


def _lm_lr_to_ours(t: Tensor, ctx: dict) -> Tensor:
    """Published head-major rows (head, matrix in gate, down, up) -> ours matrix-major (gate, up, down)."""
    return t.unflatten(0, (-1, 3))[:, list(LR_ORDER)].transpose(0, 1).flatten(0, 1).contiguous()


def _lm_lr_to_published(t: Tensor, ctx: dict) -> Tensor:
    return t.unflatten(0, (3, -1))[list(LR_ORDER)].transpose(0, 1).flatten(0, 1).contiguous()


def _patch_in_to_ours(t: Tensor, ctx: dict) -> Tensor:
    """Input Linear [D, p*p*C] with columns (p_row, p_col, C) -> columns (C, p_row, p_col)."""
    p = ctx["patch_size"]
    return t.unflatten(1, (p, p, -1)).permute(0, 3, 1, 2).flatten(1).contiguous()


def _patch_in_to_published(t: Tensor, ctx: dict) -> Tensor:
    p = ctx["patch_size"]
    return t.unflatten(1, (-1, p, p)).permute(0, 2, 3, 1).flatten(1).contiguous()


def _patch_out_to_ours(t: Tensor, ctx: dict) -> Tensor:
    """Output Linear [p*p*3, D] with rows (p_row, p_col, C) -> rows (C, p_row, p_col)."""
    p = ctx["patch_size"]
    return t.unflatten(0, (p, p, -1)).permute(2, 0, 1, 3).flatten(0, 2).contiguous()


def _patch_out_to_published(t: Tensor, ctx: dict) -> Tensor:
    p = ctx["patch_size"]
    return t.unflatten(0, (-1, p, p)).permute(1, 2, 0, 3).flatten(0, 2).contiguous()


@dataclass(frozen=True)
class Rule:
    """One parameter: its published name and our name ({i} = block index) and the layout change both ways."""

    published: str
    ours: str
    to_ours: Transform = _same
    to_published: Transform = _same


def nvs_lact_layer_rules(published_prefix: str = "", ours_prefix: str = "") -> list[Rule]:
    """`lact_ttt.FastWeightGluMLPMultihead` <-> `lact.layer.LaCTLayer(output_gate=None)`."""
    p, o = published_prefix, ours_prefix
    return [
        Rule(p + "w0", o + "w_gate", _transpose, _transpose),
        Rule(p + "w2", o + "w_up", _transpose, _transpose),
        Rule(p + "w1", o + "w_down", _transpose, _transpose),
        Rule(p + "to_qkv.weight", o + "qkv.weight"),
        Rule(p + "c_proj.weight", o + "o_proj.weight"),
        Rule(p + "lr_fc.weight", o + "lr_proj.weight", _nvs_lr, _nvs_lr),
        Rule(p + "lr_fc.bias", o + "lr_proj.bias", _nvs_lr, _nvs_lr),
        Rule(p + "o_norm.weight", o + "out_norm.weight"),
    ]


def nvs_rules() -> list[Rule]:
    """`LaCTLVSM` with the published block_config (attention, LaCT, MLP) <-> `NVSNet` (published options)."""
    b, ob = "blocks.{i}.module_list.", "blocks.{i}."
    return [
        Rule("input_linear.weight", "embed.weight", _patch_in_to_ours, _patch_in_to_published),
        Rule("input_layernorm.weight", "embed_norm.weight"),
        Rule(b + "0.ln.weight", ob + "attn_norm.weight"),
        Rule(b + "0.f.to_qkv.weight", ob + "attn.qkv.weight"),
        Rule(b + "0.f.c_proj.weight", ob + "attn.proj.weight"),
        Rule(b + "0.f.q_norm.weight", ob + "attn.q_norm.weight"),
        Rule(b + "0.f.k_norm.weight", ob + "attn.k_norm.weight"),
        Rule(b + "1.ln.weight", ob + "lact_norm.weight"),
        *nvs_lact_layer_rules(b + "1.f.", ob + "lact."),
        Rule(b + "2.ln.weight", ob + "mlp_norm.weight"),
        Rule(b + "2.f.c_fc.weight", ob + "mlp.fc.weight"),
        Rule(b + "2.f.c_proj.weight", ob + "mlp.proj.weight"),
        Rule("image_token_decoder.0.weight", "out_norm.weight"),
        Rule("image_token_decoder.1.weight", "out.weight", _patch_out_to_ours, _patch_out_to_published),
    ]


def lm_lact_layer_rules(published_prefix: str = "", ours_prefix: str = "") -> list[Rule]:
    """The fast-weight branch of `layer_lact_swiglu.LaCTSWIGLULayer` <-> `lact.layer.LaCTLayer` (LM options)."""
    p, o = published_prefix, ours_prefix
    return [
        Rule(p + "w0.w_left", o + "w_gate.left"),
        Rule(p + "w0.w_right", o + "w_gate.right"),
        Rule(p + "w2.w_left", o + "w_up.left"),
        Rule(p + "w2.w_right", o + "w_up.right"),
        Rule(p + "w0", o + "w_gate"),  # full-rank initial weights (w0_w2_low_rank = -1)
        Rule(p + "w2", o + "w_up"),
        Rule(p + "w1", o + "w_down"),
        Rule(p + "lr_proj.weight", o + "lr_proj.weight", _lm_lr_to_ours, _lm_lr_to_published),
        Rule(p + "lr_proj.bias", o + "lr_proj.bias", _lm_lr_to_ours, _lm_lr_to_published),
        Rule(p + "qk_scale", o + "qk_scale", _transpose, _transpose),
        Rule(p + "qk_offset", o + "qk_offset", _transpose, _transpose),
        Rule(p + "ttt_scale_proj.weight", o + "gate_proj.weight"),
        Rule(p + "ttt_scale_proj.bias", o + "gate_proj.bias"),
        Rule(p + "ttt_norm.weight", o + "out_norm.weight"),
        Rule(p + "momentum_proj.0.weight", o + "momentum_proj.weight"),
        Rule(p + "momentum_proj.0.bias", o + "momentum_proj.bias"),
    ]


# The LM MLP's gate and up projections are one Linear here: these two published names fill its two halves.
LM_GATE_UP = ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight")
LM_GATE_UP_OURS = "blocks.{i}.mlp.gate_up.weight"


def lm_rules() -> list[Rule]:
    """`LaCTForCausalLM` (attn_qk_norm false, untied head) <-> `LaCTLM` with the published options."""
    b, ob = "model.layers.{i}.", "blocks.{i}."
    return [
        Rule("model.embeddings.weight", "token_embedding.weight"),
        Rule(b + "attn_norm.weight", ob + "attn_norm.weight"),
        Rule(b + "attn.qkv.weight", ob + "qkv.weight"),
        Rule(b + "attn.o_proj.weight", ob + "o_proj.weight"),
        *lm_lact_layer_rules(b + "attn.", ob + "lact."),
        Rule(b + "mlp_norm.weight", ob + "mlp_norm.weight"),
        Rule(b + "mlp.down_proj.weight", ob + "mlp.down.weight"),
        Rule("model.norm.weight", "norm.weight"),
        Rule("lm_head.weight", "lm_head.weight"),
    ]


RULES = {"nvs": nvs_rules, "lm": lm_rules, "nvs_layer": nvs_lact_layer_rules, "lm_layer": lm_lact_layer_rules}


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


def _context(kind: str, state: dict[str, Tensor], published: bool) -> dict:
    """Sizes that the layout changes need, read from the state dict's own shapes."""
    ctx = {}
    if kind == "nvs":
        key = "input_linear.weight" if published else "embed.weight"
        if key in state:
            ctx["patch_size"] = round((state[key].shape[1] / 12) ** 0.5)  # 9 ray + 3 RGB channels per pixel
    return ctx


def _convert(kind: str, state: dict[str, Tensor], to_ours: bool) -> tuple[dict[str, Tensor], list[str]]:
    if kind not in RULES:
        raise ValueError(f"kind must be one of {sorted(RULES)}, got {kind!r}")
    ctx = _context(kind, state, published=to_ours)
    table = [
        (_pattern(r.published if to_ours else r.ours), r.ours if to_ours else r.published, r)
        for r in RULES[kind]()
    ]
    out, leftover = {}, []
    for key, tensor in state.items():
        for pattern, target, rule in table:
            m = pattern.match(key)
            if m:
                name = target.replace("{i}", m.group("i")) if "{i}" in target else target
                out[name] = (rule.to_ours if to_ours else rule.to_published)(tensor, ctx)
                break
        else:
            leftover.append(key)
    if kind == "lm":
        leftover = _lm_gate_up(state, out, leftover, to_ours)
    return out, leftover


def _lm_gate_up(state: dict, out: dict, leftover: list[str], to_ours: bool) -> list[str]:
    """The LM MLP's gate_proj + up_proj <-> gate_up (one direction per call); returns the keys still unused."""
    gate_t, up_t = (_pattern(t) for t in LM_GATE_UP)
    ours_t = _pattern(LM_GATE_UP_OURS)
    rest = []
    for key in leftover:
        if to_ours and gate_t.match(key):
            i = gate_t.match(key).group("i")
            up = LM_GATE_UP[1].replace("{i}", i)
            if up in state:
                out[LM_GATE_UP_OURS.replace("{i}", i)] = torch.cat([state[key], state[up]], dim=0)
                continue
        elif to_ours and up_t.match(key):
            if LM_GATE_UP[0].replace("{i}", up_t.match(key).group("i")) in state:
                continue  # consumed together with its gate_proj
        elif not to_ours and ours_t.match(key):
            i = ours_t.match(key).group("i")
            gate, up = state[key].chunk(2, dim=0)
            out[LM_GATE_UP[0].replace("{i}", i)] = gate.contiguous()
            out[LM_GATE_UP[1].replace("{i}", i)] = up.contiguous()
            continue
        rest.append(key)
    return rest


def to_ours(kind: str, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Published state dict -> (our state dict, published keys no rule knows). kind: nvs | lm | nvs_layer |
    lm_layer (the last two: one LaCT layer's own parameters, without prefix)."""
    return _convert(kind, state, to_ours=True)


def to_published(kind: str, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Our state dict -> (published state dict, our keys that have no published counterpart)."""
    return _convert(kind, state, to_ours=False)


# Prefixes that the published training scripts may leave on saved names (DDP, torch.compile, activation
# checkpointing wrappers); published train.py strips them before saving, older files may still carry them.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.")


def strip_wrappers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove DDP / compile / checkpoint-wrapper name parts, as the published train.py does before saving."""
    out = {}
    for key, value in state.items():
        for part in WRAPPER_PREFIXES[1:]:
            key = key.replace(part, "")
        while key.startswith(WRAPPER_PREFIXES[0]):
            key = key[len(WRAPPER_PREFIXES[0]) :]
        out[key] = value
    return out
