"""The NVS network: shapes, any view counts, reconstruct-once rendering equal to the full forward, gradients,
activation checkpointing, and the parameter counts of the published configs (on the meta device)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from lact.geometry import look_at
from lact.models.nvs import NVSConfig, NVSNet
from lact.nn import GeluMLP

ROOT = Path(__file__).resolve().parents[3]
TINY = dict(
    patch_size=4, dim=32, num_layers=2, num_heads=2, lact={"heads": 2, "inter_multi": 2.0}, mlp_ratio=2.0
)


def cameras(batch: int, views: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cameras on a sphere of radius 2.7 looking at the origin: intrinsics [B, V, 4], w2c [B, V, 4, 4]."""
    g = torch.Generator().manual_seed(seed)
    azimuth = torch.rand(batch, views, generator=g) * 2 * math.pi
    elevation = torch.rand(batch, views, generator=g) - 0.3
    eyes = 2.7 * torch.stack(
        [elevation.cos() * azimuth.cos(), elevation.cos() * azimuth.sin(), elevation.sin()], dim=-1
    )
    w2c = look_at(eyes, torch.zeros_like(eyes), torch.tensor([0.0, 0.0, 1.0]).expand_as(eyes))
    focal = size / (2 * math.tan(math.radians(25)))
    return torch.tensor([focal, focal, size / 2, size / 2]).expand(batch, views, 4), w2c


def scene(batch=2, inputs=3, targets=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    images = torch.rand(batch, inputs, 3, size, size, generator=g)
    return (images, *cameras(batch, inputs, size, seed), *cameras(batch, targets, size, seed + 1))


def test_forward_shapes_range_and_any_view_count():
    torch.manual_seed(0)
    net = NVSNet(NVSConfig(**TINY))
    for inputs, targets in ((1, 1), (3, 2), (5, 4)):
        out = net(*scene(inputs=inputs, targets=targets))
        assert out.shape == (2, targets, 3, 16, 16)
        assert out.min() > 0 and out.max() < 1
    out = net(*scene(size=24))  # another resolution (a multiple of the patch size)
    assert out.shape == (2, 2, 3, 24, 24)


@pytest.mark.parametrize(
    "lact",
    [
        {},
        {"lact": {**TINY["lact"], "chunk_size": 40, "muon": "schedule"}},
        {"token_mixer": "attention"},
        {"colour_values": True},
    ],
)
def test_reconstruct_once_then_render_equals_the_full_forward(lact):
    torch.manual_seed(0)
    net = NVSNet(NVSConfig(**{**TINY, "num_layers": 3, **lact})).eval()
    images, k_in, w_in, k_out, w_out = scene(inputs=3, targets=5)
    with torch.no_grad():
        full = net(images, k_in, w_in, k_out, w_out)
        state = net.reconstruct(images, k_in, w_in)
        assert len(state.weights) == 3 and (state.height, state.width) == (16, 16)
        # Render the five target views in uneven pieces: each piece must match the joint forward.
        parts = [net.render(state, k_out[:, a:b], w_out[:, a:b]) for a, b in ((0, 1), (1, 4), (4, 5))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_inputs_matter_and_targets_do_not_see_each_other():
    # float64, so that the check on the targets' independence can be tight.
    torch.manual_seed(0)
    net = NVSNet(NVSConfig(**TINY)).double()
    images, k_in, w_in, k_out, w_out = (t.double() for t in scene(inputs=2, targets=2))
    with torch.no_grad():
        base = net(images, k_in, w_in, k_out, w_out)
        changed = net(images.flip(-1), k_in, w_in, k_out, w_out)
        alone = net(images, k_in, w_in, k_out[:, :1], w_out[:, :1])
    assert (base - changed).abs().max() > 1e-5  # the prediction depends on the input images (7e-4 here)
    torch.testing.assert_close(alone, base[:, :1], rtol=1e-12, atol=1e-12)


def test_backward_reaches_every_parameter_and_checkpointing_matches():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        net = NVSNet(NVSConfig(**TINY, activation_checkpointing=checkpointing))
        images, k_in, w_in, k_out, w_out = scene()
        net(images, k_in, w_in, k_out, w_out).square().mean().backward()
        for name, p in net.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_view_counts_and_shapes_are_checked():
    net = NVSNet(NVSConfig(**TINY))
    images, k_in, w_in, k_out, w_out = scene()
    with pytest.raises(ValueError, match="num_input_views must be >= 1"):
        net(images[:, :0], k_in[:, :0], w_in[:, :0], k_out, w_out)
    with pytest.raises(ValueError, match="num_target_views must be >= 1"):
        net(images, k_in, w_in, k_out[:, :0], w_out[:, :0])
    with pytest.raises(ValueError, match="divisible by patch_size"):
        net(*scene(size=18))
    with pytest.raises(ValueError, match=r"w2c must be \[B, V, 4, 4\]"):
        net(images, k_in, w_in[:, :2], k_out, w_out)
    with pytest.raises(ValueError, match="lact.heads=3 must divide dim=32"):
        NVSConfig(**{**TINY, "lact": {"heads": 3}})


def expected_parameters(c: NVSConfig) -> tuple[int, int]:
    """(total, fast-weight state) parameters of NVSNet(c), counted by hand from docs/architecture.md."""
    d, p = c.dim, c.patch_size
    state = int(3 * c.lact.inter_multi * d * d / c.lact.heads)
    attn = 4 * d * d + 2 * (d // c.num_heads)  # qkv, proj, q/k RMSNorm
    gate = d * c.lact.heads if c.lact.output_gate else 0
    lact = 4 * d * d + (d * 3 * c.lact.heads + 3 * c.lact.heads) + state + d // c.lact.heads + gate
    mlp = (2 if c.mlp == "gelu" else 3) * d * c.mlp_hidden
    norm = (2 if c.norm_bias else 1) * d  # LayerNorm weight (and bias)
    colour = 3 * p * p * d if c.colour_values else 0  # the colour_values projection, no bias
    block = 3 * norm + attn + lact + mlp + colour  # three LayerNorms
    out_bias = 0 if c.output_bias is None else 3 * p * p
    total = 12 * p * p * d + norm + c.num_layers * block + norm + (d * 3 * p * p + out_bias)
    return total, c.num_layers * state


@pytest.mark.parametrize(
    ("config", "millions", "state_fraction"),
    [("paper_24l.yaml", 397.3, (0.38, 0.45)), ("paper_14l.yaml", 182.5, (0.24, 0.30))],
)
def test_published_configs_parameter_counts_on_meta(config, millions, state_fraction):
    # configs/nvs/paper.yaml is the base, the size files are overlays of its network fields
    c = NVSConfig(**paper_net(config))
    assert (c.patch_size, c.dim) == (8, 768)
    with torch.device("meta"):  # no memory: 400M parameters would take 1.6 GB
        net = NVSNet(c)
    total = sum(p.numel() for p in net.parameters())
    state = sum(block.lact.state_size for block in net.blocks)
    assert (total, state) == expected_parameters(c)
    assert total / 1e6 == pytest.approx(millions, abs=0.1)
    assert state_fraction[0] < state / total < state_fraction[1]


# The published models' parameter counts, derived by hand from the published code in docs/fidelity.md.
PUBLISHED_NVS_PARAMETERS = {
    "paper_14l.yaml": 182_481_706,
    "paper_24l_2x.yaml": 312_298_056,
    "paper_24l.yaml": 397_232_712,
}


def paper_net(*overlays: str) -> dict:
    """The network fields of configs/nvs/paper.yaml with overlays applied in order (the nested lact merged
    field by field, as the CLI merges a second --config)."""
    spec = yaml.safe_load((ROOT / "configs" / "nvs" / "paper.yaml").read_text())["model"]["init_args"]["net"]
    for name in overlays:
        extra = yaml.safe_load((ROOT / "configs" / "nvs" / name).read_text())["model"]["init_args"]["net"]
        spec = {**spec, **extra, "lact": {**spec.get("lact", {}), **extra.get("lact", {})}}
    return spec


@pytest.mark.parametrize("config", sorted(PUBLISHED_NVS_PARAMETERS))
def test_paper_configs_have_the_published_parameter_count(config):
    c = NVSConfig(**paper_net(config))
    assert (c.lact.muon, c.lact.output_gate, c.mlp, c.norm_bias, c.output_bias) == (
        "fixed",
        None,
        "gelu",
        False,
        None,
    )
    assert c.lact.init_gain == pytest.approx(2**0.5) and c.lact.base_lr == 0.01 and c.lact.heads == 1
    with torch.device("meta"):
        net = NVSNet(c)
    assert sum(p.numel() for p in net.parameters()) == PUBLISHED_NVS_PARAMETERS[config]
    assert isinstance(net.blocks[0].mlp, GeluMLP) and net.blocks[0].lact.gate_proj is None
    assert net.out.bias is None and net.embed_norm.bias is None
    assert NVSConfig(**paper_net(config, "normalize.yaml")).lact.muon == "normalize"


def test_published_nvs_options_forward_and_count():
    lact = {**TINY["lact"], "output_gate": None, "init_gain": 2**0.5, "muon": "normalize"}
    c = NVSConfig(**{**TINY, "lact": lact, "mlp": "gelu", "norm_bias": False, "output_bias": None})
    net = NVSNet(c)
    assert sum(p.numel() for p in net.parameters()) == expected_parameters(c)[0]
    images, k_in, w_in, k_out, w_out = scene()
    out = net(images, k_in, w_in, k_out, w_out)
    assert out.shape == (images.shape[0], k_out.shape[1], *images.shape[2:]) and torch.isfinite(out).all()
    for bad, field in (
        ({"mlp": "relu"}, "mlp"),
        ({"norm_bias": 1}, "norm_bias"),
        ({"output_bias": "x"}, "output_bias"),
    ):
        with pytest.raises(ValueError, match=f"NVSConfig.{field}"):
            NVSConfig(**{**TINY, **bad})


@pytest.mark.parametrize("config", ["tiny.yaml", "demo.yaml"])
def test_small_configs_build(config):
    spec = yaml.safe_load((ROOT / "configs" / "nvs" / config).read_text())["model"]["init_args"]["net"]
    with torch.device("meta"):
        net = NVSNet(NVSConfig(**spec))
    assert sum(p.numel() for p in net.parameters()) == expected_parameters(net.config)[0]


def test_zero_output_gate_survives_the_network_init():
    torch.manual_seed(0)
    net = NVSNet(NVSConfig(**{**TINY, "lact": {**TINY["lact"], "output_gate": "zero"}}))
    x = torch.randn(2, 12, 32)
    for block in net.blocks:
        gate = block.lact.gate_proj.weight
        assert torch.equal(gate, torch.zeros_like(gate))
        with torch.no_grad():
            y = block.lact(x, update_len=8)
        assert torch.equal(y, torch.zeros_like(y))  # the LaCT branch starts switched off
    default = NVSNet(NVSConfig(**TINY)).blocks[0].lact.gate_proj.weight
    assert default.std().item() == pytest.approx(
        (3 * 32) ** -0.5, rel=0.2
    )  # init_linear's N(0, 1/(3 fan_in))


@pytest.mark.parametrize("token_mixer", ["lact", "attention"])
def test_targets_never_influence_the_input_tokens(token_mixer):
    """Perturbing the target tokens inside a block leaves every input token unchanged; perturbing the input
    tokens changes the targets (float64, so the first check can be tight)."""
    torch.manual_seed(0)
    net = NVSNet(NVSConfig(**{**TINY, "token_mixer": token_mixer})).double()
    x = torch.randn(2, 5, 16, 32, dtype=torch.float64)  # [B, V, N, D]: 3 input views, then 2 targets
    noisy_targets, noisy_inputs = x.clone(), x.clone()
    noisy_targets[:, 3:] += torch.randn_like(x[:, 3:])
    noisy_inputs[:, :3] += torch.randn_like(x[:, :3])
    with torch.no_grad():
        for block in net.blocks:
            base = block(x, 3)
            torch.testing.assert_close(block(noisy_targets, 3)[:, :3], base[:, :3], rtol=1e-12, atol=1e-12)
            assert (block(noisy_inputs, 3)[:, 3:] - base[:, 3:]).abs().max() > 1e-3


def test_attention_baseline_replaces_exactly_the_lact_layers():
    lact = NVSNet(NVSConfig(**TINY))
    attention = NVSNet(NVSConfig(**{**TINY, "token_mixer": "attention"}))
    d, heads = TINY["dim"], TINY["num_heads"]
    per_layer_lact = sum(p.numel() for p in lact.blocks[0].lact.parameters())
    per_layer_attention = 4 * d * d + 2 * (d // heads)  # qkv, proj, the q and k RMSNorm scales
    assert sum(p.numel() for p in attention.blocks[0].lact.parameters()) == per_layer_attention
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(attention) == count(lact) + TINY["num_layers"] * (per_layer_attention - per_layer_lact)
    with pytest.raises(ValueError, match="token_mixer must be one of"):
        NVSConfig(**{**TINY, "token_mixer": "mamba"})
