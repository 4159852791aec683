"""The masked-LM encoder of the structural-ICL toy (pure torch)."""

from __future__ import annotations

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
