"""LaCTLayer (docs/architecture.md, The layer): initialisation, the three schedules through the layer, reconstruct/render."""

from __future__ import annotations

import inspect

import pytest
import torch

from lact.layer import LR_FLOOR, LaCTConfig, LaCTLayer, inverse_softplus


def test_inverse_softplus_round_trips():
    for y in (1e-3, 1e-2, 0.5, 3.0):
        assert torch.nn.functional.softplus(
            torch.tensor(inverse_softplus(y), dtype=torch.float64)
        ).item() == pytest.approx(y)


def test_initial_lr_is_base_lr_and_fast_weights_have_design_scale():
    torch.manual_seed(0)
    layer = LaCTLayer(64, 2, inter_multi=4, base_lr=1e-2, schedule="bidirectional", chunk_size=None)
    assert layer.hidden == 128 and layer.state_size == 3 * 2 * 32 * 128
    torch.nn.init.zeros_(layer.lr_proj.weight)
    inputs = layer.fast_weight_inputs(torch.randn(2, 5, 64))
    for lr in (inputs.lr_gate, inputs.lr_up, inputs.lr_down):
        torch.testing.assert_close(lr, torch.full_like(lr, 1e-2))
        assert lr.dtype == torch.float32 and lr.shape == (4, 5, 1)
    assert inputs.q.norm(dim=-1).sub(1).abs().max() < 1e-5 and inputs.k.norm(dim=-1).sub(1).abs().max() < 1e-5
    assert layer.w_gate.std().item() == pytest.approx(32**-0.5, rel=0.1)
    assert layer.w_down.std().item() == pytest.approx(128**-0.5, rel=0.1)


def test_zero_gate_starts_switched_off_but_learns():
    layer = LaCTLayer(32, 2, schedule="interleaved", chunk_size=4, output_gate="zero", qk_silu=False)
    x = torch.randn(2, 12, 32)
    y = layer(x)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()  # silu'(0) = 1/2: the gate still receives gradient
    assert layer.gate_proj.weight.grad.abs().sum() > 0


def test_causal_layer_is_causal_across_chunks():
    torch.manual_seed(0)
    layer = LaCTLayer(32, 2, schedule="causal", chunk_size=4, momentum=True, muon="schedule", rotary=True)
    x = torch.randn(2, 14, 32)
    y = layer(x)
    x2 = x.clone()
    x2[:, 8:] = torch.randn(2, 6, 32)
    y2 = layer(x2)
    assert torch.equal(y[:, :8], y2[:, :8])
    assert not torch.allclose(y[:, 8:], y2[:, 8:])


def test_reconstruct_then_render_equals_bidirectional_forward():
    torch.manual_seed(0)
    layer = LaCTLayer(
        32, 4, schedule="bidirectional", chunk_size=None, inter_multi=2, base_lr=1e-2, muon="fixed"
    )
    inputs, targets = torch.randn(2, 10, 32), torch.randn(2, 6, 32)
    full = layer(torch.cat([inputs, targets], dim=1), update_len=10)
    y_inputs, weights = layer.reconstruct(inputs)
    torch.testing.assert_close(y_inputs, full[:, :10], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.render(targets, weights), full[:, 10:], rtol=1e-5, atol=1e-5)


def test_layer_backward_reaches_every_parameter():
    layer = LaCTLayer(32, 2, schedule="causal", chunk_size=4, momentum=True, muon="fixed")
    layer(torch.randn(2, 12, 32)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 30, "num_heads": 4}, "divide dim"),
        ({"dim": 32, "num_heads": 4, "chunk_size": 0}, "chunk_size"),
        ({"dim": 32, "num_heads": 4, "schedule": "sideways"}, "schedule"),
        ({"dim": 32, "num_heads": 4, "schedule": "bidirectional", "momentum": True}, "momentum"),
        ({"dim": 32, "num_heads": 4, "output_gate": "relu"}, "output_gate"),
    ],
)
def test_bad_configs_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LaCTLayer(**kwargs)


def test_lact_config_from_dict_overrides_the_network_defaults_and_names_bad_fields():
    from dataclasses import asdict

    from lact.models.lm import LMConfig
    from lact.models.nvs import NVSConfig

    cfg = LMConfig(dim=32, lact={"heads": 4})
    assert isinstance(cfg.lact, LaCTConfig)
    assert (cfg.lact.heads, cfg.lact.momentum, cfg.lact.rotary, cfg.lact.chunk_size) == (4, True, True, 128)
    assert LMConfig(**asdict(cfg)) == cfg  # the checkpoint round trip: plain dicts back to the dataclass
    assert NVSConfig(dim=32, num_heads=2, lact={"heads": 2}).lact.chunk_size is None
    with pytest.raises(ValueError, match=r"LMConfig\.lact has no field 'lact_heads'"):
        LMConfig(dim=32, lact={"lact_heads": 4})
    with pytest.raises(ValueError, match=r"NVSConfig\.lact\.muon must be None"):
        NVSConfig(dim=32, num_heads=2, lact={"muon": "adam"})
    with pytest.raises(ValueError, match=r"NVSConfig\.lact\.momentum must be false"):
        NVSConfig(dim=32, num_heads=2, lact=LaCTConfig(momentum=True, chunk_size=None))
    with pytest.raises(ValueError, match=r"LaCTConfig\.output_gate"):
        LaCTConfig(output_gate="relu")


def test_inner_lr_has_a_floor_so_a_huge_negative_lr_bias_still_runs():
    torch.manual_seed(0)
    layer = LaCTLayer(32, 2, schedule="causal", chunk_size=4, momentum=True)
    with torch.no_grad():
        layer.lr_proj.bias.fill_(-1e4)  # softplus(-1e4) is exactly 0 in fp32
    x = torch.randn(2, 12, 32)
    inputs = layer.fast_weight_inputs(x)
    for lr in (inputs.lr_gate, inputs.lr_up, inputs.lr_down):
        assert torch.all(lr == LR_FLOOR)
    y = layer(x)  # the operator's positivity check passes
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="base_lr"):
        LaCTLayer(32, 2, base_lr=LR_FLOOR / 2)


def test_lr_positivity_check_reads_no_values_off_the_cpu():
    # On an accelerator reading lr values would sync the host on every call; meta tensors have no values at
    # all, so any read would raise here.
    from lact.ops import causal_lact

    b, length, d = 2, 8, 4
    w = [torch.empty(b, d, d, device="meta") for _ in range(3)]
    qkv = [torch.empty(b, length, d, device="meta") for _ in range(3)]
    lrs = [torch.empty(b, length, 1, device="meta") for _ in range(3)]
    out = causal_lact(*w, *qkv, *lrs, chunk_size=4)
    assert out.shape == (b, length, d) and out.device.type == "meta"


# ----------------------------------------------------------------------------------------------------------
# Options of the published models, each against a literal reference written out here.


def randomize(layer: LaCTLayer, seed: int = 0) -> LaCTLayer:
    """Non-trivial values everywhere (biases, scales and offsets are 0 / 1 at init, which hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return layer


def rope(x, positions, base=10000.0):
    """Rotary on the last dim of x [..., L, r], pairs (i, i + r/2), written out."""
    r = x.shape[-1]
    freq = base ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    angle = positions.double()[:, None] * freq
    a, b = x[..., : r // 2], x[..., r // 2 :]
    return torch.cat([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], dim=-1)


def test_published_nvs_layer_literal_reference():
    """No gate, gain sqrt(2), one normalised update on the first tokens, applied to all of them."""
    torch.manual_seed(0)
    dim, n_update = 16, 7
    layer = LaCTLayer(
        dim, 1, schedule="bidirectional", chunk_size=None, inter_multi=2, base_lr=1e-2,
        muon="normalize", output_gate=None, init_gain=2**0.5,
    ).double()  # fmt: skip
    assert layer.gate_proj is None
    randomize(layer)
    x = torch.randn(2, 11, dim, dtype=torch.float64)
    q, k, v = torch.nn.functional.silu(layer.qkv(x)).chunk(3, dim=-1)
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    # [B, L, 3]: gate, up, down
    lr = LR_FLOOR + torch.nn.functional.softplus(layer.lr_proj(x) + inverse_softplus(1e-2 - LR_FLOOR))
    outs = []
    for b in range(2):
        wg, wu, wd = layer.w_gate[0], layer.w_up[0], layer.w_down[0]  # [h, d], [h, d], [d, h]
        kb, vb, lb = k[b, :n_update], v[b, :n_update], lr[b, :n_update]
        g, u = kb @ wg.T, kb @ wu.T
        p = vb @ wd
        s = torch.sigmoid(g)
        dwd = vb.T @ (g * s * u * lb[:, 2:3])
        dwu = (p * g * s).T @ (kb * lb[:, 1:2])
        dwg = (p * u * s * (1 + g * (1 - s))).T @ (kb * lb[:, 0:1])
        new = []
        for w, dw in ((wg, dwg), (wu, dwu), (wd, dwd)):
            w2 = w + dw / (dw.norm() + 1e-7)
            new.append(w2 * w.norm(dim=1, keepdim=True) / (w2.norm(dim=1, keepdim=True) + 1e-5))
        wg, wu, wd = new
        o = (torch.nn.functional.silu(q[b] @ wg.T) * (q[b] @ wu.T)) @ wd.T
        o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + 1e-5) * layer.out_norm.weight
        outs.append(o @ layer.o_proj.weight.T)
    # the layer computes the learning rates in fp32
    torch.testing.assert_close(layer(x, update_len=n_update), torch.stack(outs), rtol=1e-4, atol=1e-6)


def test_init_gain_scales_the_initial_fast_weights():
    torch.manual_seed(0)
    layer = LaCTLayer(64, 1, schedule="bidirectional", chunk_size=None, inter_multi=4, init_gain=2**0.5)
    assert layer.w_gate.std().item() == pytest.approx((2 / 64) ** 0.5, rel=0.05)
    assert layer.w_up.std().item() == pytest.approx((2 / 64) ** 0.5, rel=0.05)
    assert layer.w_down.std().item() == pytest.approx((2 / 256) ** 0.5, rel=0.05)


def test_low_rank_initial_weights_are_factors_plus_half_identity():
    torch.manual_seed(0)
    layer = LaCTLayer(256, 2, low_rank=8, low_rank_gain=0.5)  # d = h = 128
    assert tuple(layer.w_gate.left.shape) == (2, 128, 8) and tuple(layer.w_gate.right.shape) == (2, 8, 128)
    assert not isinstance(layer.w_down, torch.nn.Module) and tuple(layer.w_down.shape) == (2, 128, 128)
    assert layer.w_gate.left.std().item() == pytest.approx(0.5 / 8**0.5, rel=0.05)
    assert layer.w_up.right.std().item() == pytest.approx(0.5 / 128**0.5, rel=0.05)
    full = sum(p.numel() for p in LaCTLayer(256, 2).parameters())
    assert full - sum(p.numel() for p in layer.parameters()) == 2 * 2 * (128 * 128 - 2 * 128 * 8)
    w_gate, w_up, w_down = layer.initial_matrices()
    for w, lr in ((w_gate, layer.w_gate), (w_up, layer.w_up)):
        torch.testing.assert_close(w, lr.left @ lr.right + 0.5 * torch.eye(128))
    # The layer equals a full-rank layer whose initial weights are those products.
    torch.manual_seed(1)
    small = randomize(LaCTLayer(32, 2, inter_multi=2, chunk_size=4, momentum=True, low_rank=3).double())
    plain = LaCTLayer(32, 2, inter_multi=2, chunk_size=4, momentum=True).double()
    state = {k: v for k, v in small.state_dict().items() if ".left" not in k and ".right" not in k}
    state["w_gate"], state["w_up"], _ = small.initial_matrices()
    assert torch.linalg.matrix_rank(state["w_gate"][0] - 0.5 * torch.eye(32, 16, dtype=torch.float64)) == 3
    plain.load_state_dict(state)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    torch.testing.assert_close(small(x), plain(x), rtol=1e-10, atol=1e-12)
    small(x).square().sum().backward()
    assert small.w_gate.left.grad.abs().sum() > 0 and small.w_up.right.grad.abs().sum() > 0


def test_qk_affine_scales_and_shifts_q_and_k_before_the_silu():
    torch.manual_seed(0)
    layer = randomize(LaCTLayer(16, 2, chunk_size=4, qk_affine=True, own_qkv=False).double())
    assert tuple(layer.qk_scale.shape) == (2, 16) and tuple(layer.qk_offset.shape) == (2, 16)
    fresh = LaCTLayer(16, 2, qk_affine=True)
    assert torch.equal(fresh.qk_scale, torch.ones(2, 16)) and torch.equal(fresh.qk_offset, torch.zeros(2, 16))
    x, qkv = torch.randn(2, 9, 16, dtype=torch.float64), torch.randn(2, 9, 48, dtype=torch.float64)
    inputs = layer.fast_weight_inputs(x, qkv)
    q = qkv[..., :16] * layer.qk_scale[0] + layer.qk_offset[0]
    k = qkv[..., 16:32] * layer.qk_scale[1] + layer.qk_offset[1]
    for got, raw in ((inputs.q, q), (inputs.k, k)):
        heads = (
            torch.nn.functional.silu(raw).unflatten(-1, (2, 8)).transpose(1, 2).flatten(0, 1)
        )  # [B*H, L, d]
        torch.testing.assert_close(got, heads / heads.norm(dim=-1, keepdim=True), rtol=1e-10, atol=1e-12)
    v = torch.nn.functional.silu(qkv[..., 32:]).unflatten(-1, (2, 8)).transpose(1, 2).flatten(0, 1)
    torch.testing.assert_close(inputs.v, v)  # v is not rescaled


def test_output_gate_bias_is_inside_the_silu():
    torch.manual_seed(0)
    layer = randomize(LaCTLayer(16, 2, chunk_size=4, output_gate_bias=True).double())
    assert layer.gate_proj.bias is not None and tuple(layer.gate_proj.bias.shape) == (2,)
    assert torch.equal(LaCTLayer(16, 2, output_gate_bias=True).gate_proj.bias, torch.zeros(2))
    o, x = torch.randn(4, 5, 8, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    normed = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + 1e-5) * layer.out_norm.weight  # [B*H, L, d]
    scale = torch.nn.functional.silu(x @ layer.gate_proj.weight.T + layer.gate_proj.bias)  # [B, L, H]
    gated = normed.unflatten(0, (2, 2)) * scale.permute(0, 2, 1).unsqueeze(-1)  # [B, H, L, d]
    expected = gated.transpose(1, 2).flatten(2) @ layer.o_proj.weight.T
    torch.testing.assert_close(layer.read_out(o, x), expected, rtol=1e-10, atol=1e-12)


def test_rotary_dim_rotates_groups_of_the_attention_head_dim():
    torch.manual_seed(0)
    layer = LaCTLayer(32, 2, chunk_size=4, rotary=True, rotary_dim=4, rope_base=1e6, own_qkv=False).double()
    x, qkv = torch.randn(1, 6, 32, dtype=torch.float64), torch.randn(1, 6, 96, dtype=torch.float64)
    positions = torch.arange(3, 9)
    inputs = layer.fast_weight_inputs(x, qkv, positions)
    q = torch.nn.functional.silu(qkv[..., :32])  # [1, L, 32] = 8 groups of 4 channels
    groups = q.unflatten(-1, (8, 4)).transpose(1, 2)  # [1, 8, L, 4]
    rotated = rope(groups, positions, base=1e6).transpose(1, 2).flatten(-2)  # [1, L, 32]
    heads = rotated.unflatten(-1, (2, 16)).transpose(1, 2).flatten(0, 1)  # [2, L, 16]
    # RotaryEmbedding computes in fp32
    torch.testing.assert_close(inputs.q, heads / heads.norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-6)
    # rotary_dim = head dim is the default behaviour
    whole = LaCTLayer(32, 2, rotary=True, rotary_dim=16, own_qkv=False).double()
    default = LaCTLayer(32, 2, rotary=True, own_qkv=False).double()
    torch.testing.assert_close(whole.fast_weight_inputs(x, qkv).q, default.fast_weight_inputs(x, qkv).q)


def test_prenorm_layer_runs_the_prenorm_operator():
    from lact.ops import causal_lact

    torch.manual_seed(0)
    layer = randomize(LaCTLayer(16, 2, chunk_size=3, momentum=True, muon="schedule", prenorm=True).double())
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    inputs = layer.fast_weight_inputs(x)
    o = causal_lact(
        *layer.initial_weights(2), *inputs[:6], chunk_size=3, momentum=inputs.momentum, muon="schedule",
        prenorm=True,
    )  # fmt: skip
    torch.testing.assert_close(layer(x), layer.read_out(o, x), rtol=1e-10, atol=1e-12)
    layer.prenorm = False
    assert not torch.allclose(layer(x), layer.read_out(o, x))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": "bidirectional", "chunk_size": None, "prenorm": True}, "prenorm"),
        ({"rotary": True, "rotary_dim": 3}, "rotary_dim"),
        ({"rotary": True, "rotary_dim": 32}, "rotary_dim"),
        ({"low_rank": 0}, "low_rank"),
    ],
)
def test_bad_published_options_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LaCTLayer(32, 2, **kwargs)


def test_published_options_are_lact_config_fields_and_build_the_layer():
    from dataclasses import fields

    from lact.models.lm import LMConfig

    options = dict(
        init_gain=2.0, low_rank=3, low_rank_gain=0.25, qk_affine=True, output_gate_bias=True, rotary_dim=4,
        prenorm=True,
    )  # fmt: skip
    config = LaCTConfig(heads=2, chunk_size=4, rotary=True, **options)
    layer = LaCTLayer.from_config(32, config, schedule="causal")
    assert (layer.init_gain, layer.prenorm, layer.rotary.dim, layer.w_gate.rank) == (2.0, True, 4, 3)
    assert layer.w_up.gain == 0.25 and layer.qk_scale is not None and layer.gate_proj.bias is not None
    # every LaCTConfig field is a keyword of LaCTLayer (heads is num_heads), so from_config forgets none
    keywords = set(inspect.signature(LaCTLayer).parameters)
    assert {f.name for f in fields(LaCTConfig)} - {"heads"} <= keywords
    lm = LMConfig(dim=32, num_heads=8, lact={"heads": 2, "rotary_dim": 4, "low_rank": 3})
    assert (lm.lact.rotary_dim, lm.lact.low_rank) == (4, 3)


@pytest.mark.parametrize(
    ("lact", "match"),
    [
        ({"low_rank": 0}, r"LMConfig\.lact\.low_rank must be an int >= 1"),
        ({"low_rank_gain": -1.0}, r"LMConfig\.lact\.low_rank_gain must be a positive number"),
        ({"init_gain": 0}, r"LMConfig\.lact\.init_gain must be a positive number"),
        ({"qk_affine": 1}, r"LMConfig\.lact\.qk_affine must be true or false"),
        ({"prenorm": "yes"}, r"LMConfig\.lact\.prenorm must be true or false"),
        ({"output_gate": None, "output_gate_bias": True}, r"LMConfig\.lact\.output_gate_bias needs"),
        ({"rotary": False, "rotary_dim": 4}, r"LMConfig\.lact\.rotary_dim=4 needs rotary"),
        ({"rotary_dim": 3}, r"LMConfig\.lact\.rotary_dim=3 must be even"),
        (
            {"rotary_dim": 32},
            r"LMConfig\.lact\.rotary_dim=32 must be even and divide the fast-weight head dim 16",
        ),
        ({"muon": "adam"}, r"LMConfig\.lact\.muon must be None or one of"),
    ],
)
def test_bad_published_options_in_lact_config_name_the_field(lact, match):
    from lact.models.lm import LMConfig

    with pytest.raises(ValueError, match=match):
        LMConfig(dim=32, num_heads=4, lact={"heads": 2, **lact})


def test_prenorm_is_refused_by_the_bidirectional_network_config():
    from lact.models.nvs import NVSConfig

    with pytest.raises(ValueError, match=r"NVSConfig\.lact\.prenorm must be false"):
        NVSConfig(dim=32, num_heads=2, lact={"prenorm": True})


@pytest.mark.parametrize("schedule", ["causal", "bidirectional", "interleaved"])
def test_update_stats_only_when_recording_and_zero_without_an_update(schedule):
    torch.manual_seed(0)
    layer = LaCTLayer(16, 2, schedule=schedule, chunk_size=4, base_lr=0.5)
    x = torch.randn(2, 8, 16)
    kwargs = {"update_len": 8} if schedule == "bidirectional" else {}
    layer(x, **kwargs)
    assert layer.stats == {}  # off by default: nothing computed
    layer.record_stats = True
    out = layer(x, **kwargs)
    ratio, lr = layer.stats["update_ratio"], layer.stats["inner_lr"]
    assert not ratio.requires_grad and 0 < ratio.item() < 2
    assert 0.2 < lr.item() < 1.5  # near base_lr at init (the lr projection's bias starts at 0)
    layer.record_stats = False
    assert torch.equal(layer(x, **kwargs), out)  # recording changes nothing in the output
    # No update at all (one causal chunk is apply-only; zero update tokens): the memory is unchanged.
    layer.record_stats = True
    if schedule == "causal":
        layer.chunk_size = 8
        layer(x)
    elif schedule == "bidirectional":
        layer(x, update_len=0)
    else:
        return
    assert layer.stats["update_ratio"].item() == 0.0


def test_update_ratio_grows_with_the_inner_lr():
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    ratios = []
    for base_lr in (2e-6, 1e-2, 1.0):
        torch.manual_seed(0)
        layer = LaCTLayer(16, 2, schedule="bidirectional", chunk_size=None, base_lr=base_lr)
        layer.record_stats = True
        layer.reconstruct(x)
        ratios.append(layer.stats["update_ratio"].item())
    assert ratios[0] < 1e-4 < ratios[1] < ratios[2], ratios
