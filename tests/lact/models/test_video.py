"""The video diffusion network: zero gate after init, causality over chunks, the window, cached sampling equal
to recomputing the prefix, both diffusers schedulers, config errors, parameter counts at paper scale."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from lact.models.video import VideoConfig, VideoNet, default_lact, parameter_count, rotary_resolves
from lact.models.video_sampling import SamplerConfig, build_scheduler, sample_video
from tests.config_helpers import merged_config

ROOT = Path(__file__).resolve().parents[3]

TINY = dict(
    in_channels=3,
    num_frames=8,
    frames_per_chunk=2,
    latent_size=(8, 8),
    patch_size=(1, 2, 2),
    dim=32,
    num_layers=2,
    num_heads=2,
    ffn_dim=64,
    window=1,
    lact=dict(heads=2, inter_multi=2.0, momentum=True),
)


def make_net(seed: int = 0, gate: float | None = 0.5, **overrides) -> VideoNet:
    """A tiny network; `gate` sets the LaCT output gates to a non-zero value so the branch is on (at init
    it is exactly off) and the head to non-zero weights, so outputs depend on every input."""
    torch.manual_seed(seed)
    net = VideoNet(VideoConfig(**{**TINY, **overrides})).double().eval()
    with torch.no_grad():
        for p in net.head.parameters():
            p.normal_(std=0.1)
        for block in net.blocks:
            if block.lact is not None and gate is not None:
                block.lact.gate_proj.weight.normal_(std=gate)
    return net


def latents(chunks: int, batch: int = 2, seed: int = 1, frames: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, chunks * frames, 8, 8, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("lact_qkv", ["shared", "own"])
def test_lact_gate_is_zero_after_the_whole_models_init(lact_qkv):
    torch.manual_seed(0)
    net = VideoNet(VideoConfig(**TINY, lact_qkv=lact_qkv))
    for block in net.blocks:
        assert torch.count_nonzero(block.lact.gate_proj.weight) == 0
        assert block.lact.w_gate.std() > 0  # the fast weights kept their own init
        assert (block.lact.qkv is not None) == (lact_qkv == "own")
    net.reset_parameters()
    assert all(torch.count_nonzero(b.lact.gate_proj.weight) == 0 for b in net.blocks)
    # switched off: the same outputs as the network without a LaCT branch and the same other weights
    with torch.no_grad():
        torch.nn.init.normal_(net.head.weight, std=0.1)
    baseline = VideoNet(VideoConfig(**{**TINY, "lact": None, "lact_qkv": lact_qkv}))
    missing, unexpected = baseline.load_state_dict(net.state_dict(), strict=False)
    assert not missing and all(".lact." in key for key in unexpected)
    x, c, t = latents(4).float(), latents(4, seed=2).float(), torch.rand(2, 4)
    torch.testing.assert_close(net(x, c, t), baseline(x, c, t))


@pytest.mark.parametrize("lact_qkv", ["shared", "own"])
def test_chunk_outputs_never_depend_on_later_chunks_and_lact_reaches_past_the_window(lact_qkv):
    net = make_net(lact_qkv=lact_qkv)
    x, c, t = latents(4), latents(4, seed=2), torch.rand(2, 4, dtype=torch.float64)
    out = net(x, c, t)
    # change chunk 2 (noisy and clean) and its time: chunks 0, 1 unchanged, chunk 2 changes
    x2, c2, t2 = x.clone(), c.clone(), t.clone()
    x2[:, :, 4:6] += 1
    c2[:, :, 4:6] += 1
    t2[:, 2] = 0.9
    out2 = net(x2, c2, t2)
    torch.testing.assert_close(out2[:, :, :4], out[:, :, :4], rtol=0, atol=0)
    assert (out2[:, :, 4:6] - out[:, :, 4:6]).abs().max() > 1e-3
    # clean chunk 0 is outside chunk 3's attention window (1 chunk) but reaches it through the fast weights
    c3 = c.clone()
    c3[:, :, 0:2] += 1
    assert (net(x, c3, t)[:, :, 6:8] - out[:, :, 6:8]).abs().max() > 1e-4
    window_only = make_net(lact=None)
    base = window_only(x, c, t)
    torch.testing.assert_close(window_only(x, c3, t)[:, :, 6:8], base[:, :, 6:8], rtol=0, atol=0)
    # a noisy chunk never sees its own clean twin
    c4 = c.clone()
    c4[:, :, 2:4] += 1
    torch.testing.assert_close(net(x, c4, t)[:, :, 2:4], out[:, :, 2:4], rtol=0, atol=0)


def test_a_wider_window_lets_attention_see_further_back():
    # one layer: with more, clean chunks pass what they saw on (the receptive field is window x layers)
    net = make_net(window=2, lact=None, num_layers=1)
    x, c, t = latents(4), latents(4, seed=2), torch.rand(2, 4, dtype=torch.float64)
    out = net(x, c, t)
    c2 = c.clone()
    c2[:, :, 0:2] += 1  # chunk 0: inside chunk 2's window of 2, outside chunk 3's
    out2 = net(x, c2, t)
    assert (out2[:, :, 4:6] - out[:, :, 4:6]).abs().max() > 1e-4
    torch.testing.assert_close(out2[:, :, 6:8], out[:, :, 6:8], rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"window": 2, "lact": dict(heads=1, rotary=True, muon="fixed")},
        {"lact_qkv": "own"},
        {"lact_qkv": "own", "lact_input": "attention"},
    ],
)
def test_cached_chunk_steps_equal_the_full_forward(overrides):
    net = make_net(**overrides)
    x, c, t = latents(4), latents(4, seed=2), torch.rand(2, 4, dtype=torch.float64)
    full = net(x, c, t)
    cache = net.new_cache()
    for i in range(4):
        chunk = slice(2 * i, 2 * i + 2)
        flow = net.denoise_chunk(x[:, :, chunk], t[:, i], cache)
        torch.testing.assert_close(flow, full[:, :, chunk], rtol=1e-9, atol=1e-9)
        net.append_clean_chunk(c[:, :, chunk], cache)


def test_lact_rotary_is_attentions_3d_rotary_applied_head_by_head_to_the_fast_qk():
    net = make_net(lact=dict(heads=1, rotary=True))  # one fast-weight head of 32 = two attention heads of 16
    block = net.blocks[0]
    y = torch.randn(1, 5, 32, dtype=torch.float64)
    qkv = block.qkv(y)
    # the same content at different frames, rows and columns must give different fast queries
    positions = (torch.tensor([0, 0, 3, 0, 0]), torch.tensor([0, 1, 0, 0, 2]), torch.tensor([0, 0, 0, 4, 0]))
    q = block.lact.fast_weight_inputs(y, qkv, positions).q  # [B * fast heads, L, 32]
    heads = qkv[..., :32].unflatten(-1, (2, 16)).transpose(0, 2)  # [2 attention heads, L, B=1, 16]
    rotated = [block.rotary(h.transpose(0, 1), positions).transpose(0, 1) for h in heads]  # each [L, 1, 16]
    expected = torch.nn.functional.normalize(torch.cat(rotated, dim=-1).transpose(0, 1), dim=-1)
    torch.testing.assert_close(q, expected)
    unrotated = torch.nn.functional.normalize(qkv[..., :32], dim=-1)
    assert all((q[0, i] - unrotated[0, i]).abs().max() > 1e-3 for i in range(1, 5))  # each axis moves q
    torch.testing.assert_close(q[0, 0], unrotated[0, 0])  # position (0, 0, 0) is the identity


@pytest.mark.parametrize("scheduler", ["euler", "unipc"])
def test_cached_sampling_equals_recomputing_the_prefix(scheduler):
    net = make_net().float()
    noise = latents(4).float()
    cfg = SamplerConfig(scheduler=scheduler, steps=3, shift=3.0)
    cached = sample_video(net, noise, cfg)
    recomputed = sample_video(net, noise, cfg, use_cache=False)
    assert cached.shape == noise.shape and torch.isfinite(cached).all()
    torch.testing.assert_close(cached, recomputed, rtol=1e-4, atol=1e-4)
    assert (cached - noise).abs().max() > 1e-2  # the sampler moved away from the noise


def test_changing_a_later_chunk_leaves_earlier_samples_unchanged():
    net = make_net().float()
    noise = latents(3).float()
    cfg = SamplerConfig(scheduler="unipc", steps=2)
    first = sample_video(net, noise, cfg)
    noise2 = noise.clone()
    noise2[:, :, 2:4] += 1  # chunk 1's starting noise
    second = sample_video(net, noise2, cfg)
    torch.testing.assert_close(second[:, :, :2], first[:, :, :2], rtol=0, atol=0)
    assert (second[:, :, 2:] - first[:, :, 2:]).abs().max() > 1e-3
    # a given prefix is kept and continued
    prefix = latents(1, seed=5).float()
    cont = sample_video(net, noise, cfg, prefix=prefix)
    torch.testing.assert_close(cont[:, :, :2], prefix, rtol=0, atol=0)


def test_conditioned_network_with_classifier_free_guidance():
    net = make_net(text_dim=6).float()
    noise = latents(2).float()
    context = torch.randn(2, 5, 6)
    plain = sample_video(net, noise, SamplerConfig(steps=2), context=context)
    guided = sample_video(net, noise, SamplerConfig(steps=2, guidance_scale=3.0), context=context)
    uncached = sample_video(
        net, noise, SamplerConfig(steps=2, guidance_scale=3.0), context=context, use_cache=False
    )
    torch.testing.assert_close(guided, uncached, rtol=1e-4, atol=1e-4)
    assert (guided - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match="text_dim"):
        net(noise, noise, torch.rand(2, 2))


def test_schedulers_are_built_from_arguments_with_the_shift():
    euler = build_scheduler(SamplerConfig(scheduler="euler", steps=4, shift=3.0))
    unipc = build_scheduler(SamplerConfig(scheduler="unipc", steps=4, shift=3.0))
    for scheduler in (euler, unipc):
        assert len(scheduler.timesteps) == 4
        assert scheduler.sigmas[0] == pytest.approx(1.0, abs=1e-3) and scheduler.sigmas[-1] == 0
    # shifted: sigma' = s sigma / (1 + (s - 1) sigma) lies above the unshifted level
    plain = build_scheduler(SamplerConfig(scheduler="unipc", steps=4, shift=1.0))
    assert (unipc.sigmas[1:-1] > plain.sigmas[1:-1]).all()
    with pytest.raises(ValueError, match="SamplerConfig.scheduler"):
        SamplerConfig(scheduler="ddim")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_frames": 7}, "num_frames"),
        ({"latent_size": (8, 7)}, "patch_size"),
        ({"window": 4}, "window"),
        ({"num_heads": 3}, "num_heads"),
        ({"lact": dict(heads=3)}, "lact.heads"),
        ({"lact": dict(chunk_size=5)}, "lact.chunk_size"),
        ({"lact_qkv": "mine"}, "lact_qkv"),
        ({"lact_input": "attention"}, "lact_input"),  # with attention's shared projection
        (
            {"num_heads": 1, "lact": dict(heads=2, rotary=True)},
            "lact.rotary",
        ),  # fast head 16 < attention's 32
        ({"frames_per_chunk": 3, "num_frames": 9, "patch_size": (2, 2, 2)}, "patch_size"),
    ],
)
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"VideoConfig.{field}"):
        VideoConfig(**{**TINY, **overrides})


def test_a_rotary_that_cannot_tell_token_positions_apart_is_warned_about():
    # 8 x 8 tokens; head dim 16 rotates rows with 1 and 0.01 rad per token: row 6 looks like row 0
    aliased = {**TINY, "latent_size": (16, 16), "num_heads": 2}
    with pytest.warns(UserWarning, match=r"8 rows of tokens .*num_heads=2"):
        VideoConfig(**aliased)
    assert not rotary_resolves(4, 10000.0, 8) and rotary_resolves(4, 10000.0, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VideoConfig(**{**aliased, "num_heads": 1})  # head dim 32: 0.16 rad per token spans the 8 rows
        VideoConfig(**{**aliased, "rope_base": 30.0})  # 0.18 rad per token
        for name in ("tiny", "demo", "wan1_3b"):
            VideoConfig(**merged_config(f"configs/video/{name}.yaml")["model"]["init_args"]["net"])


def test_bad_inputs_name_the_shape():
    net = make_net()
    with pytest.raises(ValueError, match="latent_size"):
        net(latents(2)[..., :6], latents(2), torch.rand(2, 2))
    with pytest.raises(ValueError, match="t must be"):
        net(latents(2), latents(2), torch.rand(2, 3))


def test_parameter_count_formula_matches_the_built_model():
    for overrides in (
        {},
        {"text_dim": 12},
        {"lact": None},
        {"lact": dict(heads=4, momentum=False)},
        {"lact": dict(output_gate=None)},
        {"lact_qkv": "own"},
    ):
        cfg = VideoConfig(**{**TINY, **overrides})
        assert parameter_count(cfg) == sum(p.numel() for p in VideoNet(cfg).parameters())
    assert default_lact().heads == 2 and default_lact().output_gate == "zero"


@pytest.mark.parametrize(
    ("paths", "billions"),
    [
        (["configs/video/wan1_3b.yaml"], 1.42),
        (["configs/video/wan1_3b.yaml", "configs/video/wan14b.yaml"], 14.29),  # base + overlay
    ],
)
def test_paper_configs_count_their_parameters_on_the_meta_device(paths, billions):
    config = merged_config(*paths)
    net_args = config["model"]["init_args"]["net"]
    cfg = VideoConfig(**net_args)
    with torch.device("meta"):
        net = VideoNet(cfg)
    total = sum(p.numel() for p in net.parameters())
    lact = sum(p.numel() for b in net.blocks for p in b.lact.parameters())
    assert total == parameter_count(cfg)
    assert (total - lact) / 1e9 == pytest.approx(billions, abs=0.01)  # the Wan 2.1 backbone
    assert 0 < lact < 0.2 * total
    assert cfg.sequence_length == 60840  # 7 chunks of 3 x 30 x 52 tokens, 13 segments
