"""Rotary embedding, the SwiGLU MLP and the short convolution."""

from __future__ import annotations

import pytest
import torch

from lact.nn import RotaryEmbedding, ShortConv, SwiGLUMLP, run_block


def test_rotary_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(16)
    q, k = torch.randn(2, 1, 16, dtype=torch.float64).unbind(0)

    def score(pos_q, pos_k):
        return (rope(q, torch.tensor([pos_q])) * rope(k, torch.tensor([pos_k]))).sum()

    # Angles are computed in fp32 (as in training), hence the tolerance.
    torch.testing.assert_close(score(5, 2), score(105, 102), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(score(0, 0), (q * k).sum())  # position 0 is the identity
    assert not torch.allclose(score(5, 2), score(5, 3))
    # A rotation preserves norms, so L2-normalised q/k stay normalised.
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(rope(x, torch.arange(7)).norm(dim=-1), x.norm(dim=-1))


def test_rotary_rejects_odd_dim():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)


def test_swiglu_mlp_matches_its_formula():
    mlp = SwiGLUMLP(8, 12)
    x = torch.randn(2, 3, 8)
    w_gate, w_up = mlp.gate_up.weight.chunk(2, dim=0)
    expected = (torch.nn.functional.silu(x @ w_gate.T) * (x @ w_up.T)) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), expected)


def test_short_conv_is_causal_identity_at_init_and_streams():
    torch.manual_seed(0)
    conv = ShortConv(6, 3)
    x = torch.randn(2, 9, 6)
    torch.testing.assert_close(conv(x)[0], x)  # identity at init
    with torch.no_grad():
        conv.weight.normal_()
        full, _ = conv(x)
        # the formula: y[t] = sum_j w[:, j] x[t - 2 + j], zeros before the sequence
        padded = torch.cat([torch.zeros(2, 2, 6), x], dim=1)
        literal = sum(conv.weight[:, j] * padded[:, j : j + 9] for j in range(3))
        torch.testing.assert_close(full, literal)
        # in pieces of 1, 3 and 5 tokens, carrying the last inputs, it gives the same outputs
        pieces, past = [], None
        for a, b in ((0, 1), (1, 4), (4, 9)):
            y, past = conv(x[:, a:b], past)
            pieces.append(y)
        torch.testing.assert_close(torch.cat(pieces, dim=1), full)
        assert past.shape == (2, 2, 6)


def test_short_conv_rejects_a_single_tap():
    with pytest.raises(ValueError, match="kernel must be >= 2"):
        ShortConv(4, 1)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_run_block_calls_the_module_and_recomputes_only_when_checkpointing(checkpointing):
    torch.manual_seed(0)
    block = SwiGLUMLP(8, 16)
    calls = []
    block.register_forward_pre_hook(lambda module, args: calls.append(1))  # FSDP2 gathers in such a hook
    x = torch.randn(3, 8, requires_grad=True)
    run_block(block, x, checkpointing=checkpointing).square().sum().backward()
    assert len(calls) == (2 if checkpointing else 1)  # the recompute in backward goes through the hook too
    expected = torch.autograd.grad(block(x).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)
    with torch.no_grad():  # nothing to recompute without grad
        calls.clear()
        run_block(block, x, checkpointing=checkpointing)
    assert len(calls) == 1
