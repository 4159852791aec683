"""The hybrid LM: config checks, parameter-count formula, causality, long-range reach, and the decoding
cache (incremental logits equal the full forward's)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lact.layer import LaCTLayer
from lact.models.lm import LaCTLM, LMConfig, parameter_count
from lact.models.lm_cache import extend, generate, init_cache
from tests.config_helpers import merged_config

ROOT = Path(__file__).resolve().parents[3]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small(**overrides) -> LMConfig:
    lact = {"heads": 2, "chunk_size": 7}
    for name in (
        "heads",
        "chunk_size",
        "base_lr",
        "inter_multi",
        "momentum",
        "muon",
        "rotary",
        "output_gate",
        "low_rank",
        "low_rank_gain",
        "qk_affine",
        "output_gate_bias",
        "rotary_dim",
        "prenorm",
    ):
        if name in overrides:  # LaCT settings live in the nested `lact` config
            lact[name] = overrides.pop(name)
    base = dict(vocab_size=40, dim=32, num_layers=2, num_heads=4, window=5, lact=lact)
    return LMConfig(**{**base, **overrides})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_heads": 5}, "num_heads"),
        ({"num_heads": 32}, "num_heads"),  # head dim 1: odd, rotary cannot rotate it
        ({"heads": 3}, r"lact\.heads"),
        ({"window": 0}, "window"),
        ({"chunk_size": -4}, r"lact\.chunk_size"),
        ({"chunk_size": 2.5}, r"lact\.chunk_size"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"num_layers": 0}, "num_layers"),
        ({"muon": "adam"}, r"lact\.muon"),
        ({"lact_ratio": 1.5}, "lact_ratio"),
        ({"base_lr": 0.0}, r"lact\.base_lr"),
        ({"inter_multi": 0.01}, r"lact\.inter_multi"),
        ({"short_conv": 1}, "short_conv"),
        ({"short_conv": -2}, "short_conv"),
        ({"eod_id": 40}, "eod_id"),  # not a token id of the 40-token vocabulary
        ({"eod_id": -1}, "eod_id"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"LMConfig\.{field}"):
        small(**overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False, "momentum": False},
        {"lact_ratio": 0.0},
        {"lact_ratio": 0.5, "num_layers": 4, "inter_multi": 2.0, "mlp_hidden": 100},
        {"short_conv": 3},
        {"low_rank": 3, "qk_affine": True, "output_gate_bias": True, "rotary_dim": 4},
        {"low_rank": 2, "inter_multi": 2.0, "momentum": False, "prenorm": True},
    ],
)
def test_parameter_count_formula_matches_the_module(overrides):
    cfg = small(**overrides)
    with torch.device("meta"):
        model = LaCTLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == parameter_count(cfg)
    assert sum(b.lact is not None for b in model.blocks) == sum(cfg.lact_layers())


def test_lact_ratio_spreads_lact_blocks():
    assert small(num_layers=4, lact_ratio=0.5).lact_layers() == [False, True, False, True]
    assert small(num_layers=3, lact_ratio=0.0).lact_layers() == [False] * 3
    assert small(num_layers=3).lact_layers() == [True] * 3


PAPER_LM = {"760m": ["configs/lm/760m.yaml"], "3b": ["configs/lm/760m.yaml", "configs/lm/3b.yaml"]}


@pytest.mark.parametrize(
    ("name", "dim", "low", "high"), [("760m", 1536, 700e6, 820e6), ("3b", 3072, 2.8e9, 3.2e9)]
)
def test_paper_configs_match_the_formula_on_the_meta_device(name, dim, low, high):
    spec = merged_config(*PAPER_LM[name])
    cfg = LMConfig(**spec["model"]["init_args"]["net"])
    shape = (cfg.dim, cfg.num_layers, cfg.lact.heads, cfg.lact.chunk_size, cfg.window)
    assert shape == (dim, 24, 4, 2048, 2048)
    assert spec["data"]["init_args"]["seq_len"] == 32768
    with torch.device("meta"):  # no memory: parameters have shapes only
        model = LaCTLM(cfg)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == parameter_count(cfg)
    assert low < counted < high, f"{name}: {counted / 1e6:.1f}M parameters"


# The published models' parameter counts, derived by hand from the published code in docs/fidelity.md.
PUBLISHED_LM_PARAMETERS = {"760m": 797_625_312, "3b": 2_982_516_192}


@pytest.mark.parametrize(
    ("name", "overlay"), [("760m", None), ("3b", None), ("760m", "muon"), ("3b", "prenorm")]
)
def test_paper_configs_have_the_published_parameter_count(name, overlay):
    paths = PAPER_LM[name] + ([f"configs/lm/{overlay}.yaml"] if overlay else [])
    spec = merged_config(*paths)["model"]["init_args"]["net"]
    cfg = LMConfig(**spec)
    assert cfg.lact.muon == ("schedule" if overlay == "muon" else None)
    assert cfg.lact.prenorm == (overlay == "prenorm")
    assert (cfg.vocab_size, cfg.rope_base, cfg.tie_embeddings, cfg.lact.base_lr) == (32000, 1e6, False, 1e-3)
    assert cfg.lact.rotary_dim == cfg.dim // cfg.num_heads and cfg.lact.low_rank == 32
    with torch.device("meta"):
        model = LaCTLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_LM_PARAMETERS[name]


def test_low_rank_lm_init_and_gate_bias():
    torch.manual_seed(0)
    cfg = small(dim=64, low_rank=4, qk_affine=True, output_gate_bias=True, rotary_dim=8)
    lact = LaCTLM(cfg).blocks[0].lact
    assert lact.w_gate.left.std().item() == pytest.approx(0.5 / 2, rel=0.2)  # gain / sqrt(r)
    assert torch.equal(lact.gate_proj.bias, torch.zeros(2)) and torch.equal(lact.qk_scale, torch.ones(2, 64))
    assert lact.w_down.std().item() == pytest.approx(32**-0.5, rel=0.15)


def test_init_follows_the_design():
    torch.manual_seed(0)
    model = LaCTLM(small(dim=64, num_heads=4, heads=2, vocab_size=500, tie_embeddings=False))
    block = model.blocks[0]
    for linear in (block.qkv, block.o_proj, model.lm_head, block.lact.lr_proj):
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert isinstance(model.token_embedding, torch.nn.Embedding)
    lact = block.lact
    assert isinstance(lact, LaCTLayer) and lact.qkv is None and lact.o_proj is None
    assert lact.w_gate.std().item() == pytest.approx(32**-0.5, rel=0.15)  # N(0, 1/d), d = 64 / 2
    assert lact.w_down.std().item() == pytest.approx(32**-0.5, rel=0.15)  # N(0, 1/h), h = d
    assert torch.equal(lact.lr_proj.bias, torch.zeros_like(lact.lr_proj.bias))


def test_tied_head_is_the_token_embedding():
    model = LaCTLM(small())
    x = torch.randint(0, 40, (1, 6))
    manual = model.norm(
        model.blocks[1](model.blocks[0](model.token_embedding(x), torch.arange(6)), torch.arange(6))
    )
    torch.testing.assert_close(model(x), manual @ model.token_embedding.weight.T)


def with_random_convolutions(model: LaCTLM) -> LaCTLM:
    """The short convolutions start as the identity; random taps make them mix tokens, as trained ones do."""
    with torch.no_grad():
        for block in model.blocks:
            if block.qkv_conv is not None:
                block.qkv_conv.weight.normal_()
    return model


@pytest.mark.parametrize("short_conv", [0, 4])
@pytest.mark.parametrize("t", [4, 6, 7, 13, 20])  # window 5, chunk 7: around window and chunk boundaries
def test_logits_up_to_t_ignore_later_tokens(t, short_conv):
    torch.manual_seed(0)
    model = with_random_convolutions(LaCTLM(small(momentum=True, muon="schedule", short_conv=short_conv)))
    model.eval()
    x = torch.randint(0, 40, (2, 30))
    y = x.clone()
    y[:, t + 1 :] = torch.randint(0, 40, (2, 30 - t - 1))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_lact_reaches_past_the_attention_receptive_field():
    # Two layers of window 5 see at most 8 tokens back; position 0 must still reach position 28 through
    # the fast weights in the hybrid, and must not in the SWA-only model built from the same code.
    torch.manual_seed(0)
    x = torch.randint(0, 40, (1, 30))
    y = x.clone()
    y[0, 0] = (x[0, 0] + 1) % 40
    for ratio in (1.0, 0.0):
        model = LaCTLM(small(lact_ratio=ratio, base_lr=0.5)).eval()  # a large inner lr: a visible effect
        with torch.no_grad():
            changed = (model(x) - model(y)).abs().amax(-1)[0]
        far = changed[torch.tensor([9, 10, 11, 12, 13, 28])]  # chunk 1 (7..13) reads chunk 0's memory
        if ratio:
            assert torch.all(far > 1e-4), changed
        else:
            assert torch.all(far == 0) and changed[8] > 0, changed  # 8 = 2 * (window - 1): still in reach


@pytest.mark.parametrize(
    ("overrides", "prefill"),
    [
        ({"momentum": True, "muon": "schedule"}, 3),
        ({"momentum": True, "muon": "fixed", "window": 9, "chunk_size": 4}, 1),
        ({"momentum": False, "lact_ratio": 0.5, "num_layers": 3, "tie_embeddings": False}, 11),
        ({"momentum": True, "window": 1, "chunk_size": 1, "rotary": False}, 2),
        ({"short_conv": 4, "tie_embeddings": False}, 1),  # fewer carried conv inputs than taps at first
        ({"short_conv": 2, "muon": "schedule"}, 5),
        (  # the published LM's options, pre-norm update included
            {
                "low_rank": 3,
                "qk_affine": True,
                "output_gate_bias": True,
                "rotary_dim": 4,
                "prenorm": True,
                "muon": "normalize",
                "tie_embeddings": False,
            },
            4,
        ),  # fmt: skip
    ],
)
def test_incremental_decoding_equals_full_forward(overrides, prefill):
    torch.manual_seed(0)
    model = with_random_convolutions(LaCTLM(small(**overrides))).eval()
    x = torch.randint(0, 40, (2, 37))  # 5+ chunks and 4+ windows
    with torch.no_grad():
        full = model(x)
        cache = init_cache(model)
        pieces = [extend(model, x[:, :prefill], cache)]
        pieces += [extend(model, x[:, i : i + 1], cache) for i in range(prefill, 30)]
        pieces.append(extend(model, x[:, 30:], cache))  # several tokens at once, mid-chunk
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)
    assert cache.position == 37
    assert all(c.k.shape[2] == min(model.cfg.window - 1, 37) for c in cache.blocks)


def test_cached_generation_equals_greedy_recompute():
    torch.manual_seed(0)
    model = LaCTLM(small(momentum=True)).eval()
    prompt = torch.randint(0, 40, (2, 4))
    out = generate(model, prompt, 20, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    sampled = generate(model, prompt, 5, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 9) and torch.equal(sampled[:, :4], prompt)


def test_block_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = LaCTLM(small(momentum=True))
    x = torch.randint(0, 40, (2, 16))
    model(x).square().mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.cfg.activation_checkpointing = True
    model(x).square().mean().backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_zero_output_gate_survives_the_model_init():
    torch.manual_seed(0)
    model = LaCTLM(small(output_gate="zero"))
    for block in model.blocks:
        assert torch.equal(block.lact.gate_proj.weight, torch.zeros_like(block.lact.gate_proj.weight))
        xn = block.attn_norm(torch.randn(2, 9, 32))
        with torch.no_grad():
            y = block.lact(xn, qkv=block.qkv(xn), positions=torch.arange(9))
        assert torch.equal(y, torch.zeros_like(y))  # the branch starts switched off
    default = LaCTLM(small()).blocks[0].lact.gate_proj.weight
    assert default.std().item() == pytest.approx(0.02, rel=0.2)  # the silu gate keeps the network's init


# ---- packed documents (LMConfig.eod_id) ---------------------------------------------------------------------

EOD = 39


def packed_rows(lengths: list[list[int]], seed: int = 0, eod: int = EOD) -> torch.Tensor:
    """Rows of documents of the given lengths, each ending with `eod`, cut to the shortest row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for row in lengths:
        docs = [torch.cat([torch.randint(0, eod, (n - 1,), generator=g), torch.tensor([eod])]) for n in row]
        rows.append(torch.cat(docs))
    length = min(len(r) for r in rows)
    return torch.stack([r[:length] for r in rows])


def document_spans(row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of every document of a row [L], by a plain loop (the reference)."""
    out, start = [], 0
    for t, token in enumerate(row.tolist()):
        if token == EOD:
            out.append((start, t + 1))
            start = t + 1
    return out + ([(start, len(row))] if start < len(row) else [])


# chunk 7, window 5: documents shorter than a chunk (3, 2), of several chunks (23, 30), ending exactly on a
# chunk boundary (14), empty ones (length 1: two end ids in a row), a row's last document cut off; the two
# rows have different boundaries
PACKED = [[3, 23, 1, 1, 14, 2, 9], [30, 13, 1, 9]]


@pytest.mark.parametrize(
    "overrides",
    [
        {"momentum": True, "muon": "schedule", "short_conv": 4},
        {"momentum": False, "lact_ratio": 0.5, "num_layers": 3, "tie_embeddings": False},
        {"rotary": False, "window": 9, "chunk_size": 4, "short_conv": 2},
        {"rotary_dim": 4, "low_rank": 2, "qk_affine": True},  # the published LM's options
    ],
)
def test_packed_documents_give_each_document_its_own_logits(overrides):
    torch.manual_seed(0)
    model = with_random_convolutions(LaCTLM(small(eod_id=EOD, **overrides))).eval()
    x = packed_rows(PACKED)
    with torch.no_grad():
        logits = model(x)
        for b in range(2):
            for start, end in document_spans(x[b]):
                alone = model(x[b : b + 1, start:end])
                torch.testing.assert_close(logits[b : b + 1, start:end], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_documents_gradients_are_the_sum_over_documents(checkpointing):
    torch.manual_seed(0)
    model = with_random_convolutions(LaCTLM(small(eod_id=EOD, momentum=True, short_conv=3)))
    x = packed_rows(PACKED)
    model.cfg.activation_checkpointing = checkpointing  # the documents pass through the recomputed blocks
    model(x).square().sum().backward()
    model.cfg.activation_checkpointing = False
    packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for b in range(2):
        for start, end in document_spans(x[b]):
            model(x[b : b + 1, start:end]).square().sum().backward()
    for a, p in zip(packed, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)


def test_without_end_ids_packed_logits_equal_the_plain_stream():
    torch.manual_seed(0)
    plain = LaCTLM(small(momentum=True, short_conv=3)).eval()
    packed = LaCTLM(small(momentum=True, short_conv=3, eod_id=EOD)).eval()
    packed.load_state_dict(plain.state_dict())
    x = torch.randint(0, EOD, (2, 30))  # no end-of-document id: one document per row
    with torch.no_grad():
        torch.testing.assert_close(packed(x), plain(x), rtol=1e-5, atol=1e-5)
        y = x.clone()
        y[:, 12] = EOD
        assert not torch.allclose(packed(y)[:, 13:], plain(y)[:, 13:], atol=1e-3)


@pytest.mark.parametrize("prefill", [1, 5, 20])
def test_cached_decoding_restarts_at_end_ids_as_the_full_forward(prefill):
    torch.manual_seed(0)
    model = with_random_convolutions(LaCTLM(small(eod_id=EOD, momentum=True, short_conv=3))).eval()
    x = packed_rows([[10, 1, 17, 9], [10, 1, 17, 9]], seed=1)
    x[1, :] = torch.where(x[1] == EOD, EOD, (x[1] + 1) % EOD)  # other tokens, the same boundaries
    with torch.no_grad():
        full = model(x)
        cache = init_cache(model)
        pieces = [extend(model, x[:, :prefill], cache)]  # 20: a prefill across two boundaries
        pieces += [extend(model, x[:, i : i + 1], cache) for i in range(prefill, 30)]
        pieces.append(extend(model, x[:, 30:], cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)
    assert cache.position == x.shape[1] - 28  # tokens of the last document: the cache restarted at 28


def test_cached_decoding_refuses_rows_with_different_boundaries():
    model = LaCTLM(small(eod_id=EOD)).eval()
    x = packed_rows(PACKED)[:, :10]
    with torch.no_grad(), pytest.raises(ValueError, match="one at a time"):
        extend(model, x, init_cache(model))
