"""LaCTLayer (DESIGN §2.4): initialisation, the three schedules through the layer, reconstruct/render."""

from __future__ import annotations

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
