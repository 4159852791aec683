"""The masked-LM encoder of the structural-ICL toy (pure torch)."""

from __future__ import annotations

import pytest
import torch

from lact.models.mlm import MaskedLMEncoder


def test_encoder_shapes_tying_and_pad_row():
    net = MaskedLMEncoder(vocab_size=30, dim=16, depth=2, num_heads=2, max_len=7, pad_id=0)
    logits = net(torch.randint(0, 30, (3, 7)))
    assert logits.shape == (3, 7, 30)
    assert net.head.weight is net.embed.weight
    assert torch.count_nonzero(net.embed.weight[0]) == 0
    fresh = net.init_embedding_(torch.empty(20000), torch.Generator().manual_seed(0))
    assert abs(fresh.std().item() - net.embed_std) < 0.02 * net.embed_std


def test_untied_head_has_its_own_weight_drawn_like_the_embedding():
    net = MaskedLMEncoder(vocab_size=300, dim=16, depth=1, num_heads=2, tie_embeddings=False, embed_std=0.5)
    assert net.head.weight is not net.embed.weight and net.head.weight.shape == net.embed.weight.shape
    assert abs(net.head.weight.std().item() - 0.5) < 0.05
    net(torch.randint(0, 300, (2, 7))).sum().backward()
    assert net.head.weight.grad is not None and net.embed.weight.grad is not None


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    net = MaskedLMEncoder(vocab_size=30, dim=16, depth=1, num_heads=2, dropout=0.5)
    ids = torch.randint(1, 30, (2, 7))
    net.eval()
    assert torch.equal(net(ids), net(ids))
    net.train()
    assert not torch.equal(net(ids), net(ids))


def test_bert_layout_normalises_the_embeddings_and_every_block_output():
    torch.manual_seed(0)
    net = MaskedLMEncoder(vocab_size=40, dim=16, depth=2, num_heads=2, max_len=7, layout="bert")
    ids = torch.randint(1, 40, (3, 7))
    seen = []
    for block in net.blocks:
        block.register_forward_hook(lambda m, inp, out: seen.append(out))
    net(ids).sum().backward()
    assert net.head.bias.grad is not None
    for out in seen:  # post-norm: LayerNorm (weight 1, bias 0 at init) is the last operation of each block
        torch.testing.assert_close(out.mean(-1), torch.zeros(3, 7), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(3, 7), atol=1e-3, rtol=0)
    # the LayerNorm on the summed embeddings: scaling every token row and the positions leaves the logits'
    # input unchanged, so only the tied projection (and the output bias) sees the rows' scale
    with torch.no_grad():
        hidden = net.norm(net.blocks[-1](net.blocks[0](net.embed_norm(net.embed(ids) + net.pos))))
        net.embed.weight.mul_(5.0)
        net.pos.mul_(5.0)
    torch.testing.assert_close(net(ids), hidden @ net.embed.weight.T + net.head.bias, atol=1e-4, rtol=1e-4)
    assert net.head.weight is net.embed.weight and torch.count_nonzero(net.head.bias) == 0


def test_unknown_layout_names_the_field():
    with pytest.raises(ValueError, match="net.layout='postnorm'"):
        MaskedLMEncoder(vocab_size=30, dim=16, depth=1, num_heads=2, layout="postnorm")
