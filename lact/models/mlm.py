"""A small masked-LM transformer encoder with tied input/output embeddings (pure torch).

It is the network of the structural in-context-learning toy (docs/architecture.md, Forgetting): short sequences of token ids in,
logits over the whole vocabulary out. The output layer is the token embedding itself (tied), so a token
whose embedding row was never trained (or was just re-drawn) can still be predicted by copying it from
the context: that is what "structural" in-context learning means here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MaskedLMConfig:
    """The arguments of `MaskedLMEncoder` as a config, so that YAML overlays merge field by
    field (see MaskedLMEncoder for their meaning). vocab_size must equal the datamodule's ``vocab_size``."""

    vocab_size: int
    dim: int = 64
    depth: int = 4
    num_heads: int = 4
    max_len: int = 16
    pad_id: int = 0
    init_std: float = 0.02
    embed_std: float = 1.0
    tie_embeddings: bool = True
    dropout: float = 0.0
    layout: str = "prenorm"


LAYOUTS = ("prenorm", "bert")


class EncoderBlock(nn.Module):
    """Transformer block with bidirectional attention, pre-norm ``x + Attn(LN(x))`` then
    ``x + MLP(LN(x))``, or post-norm (BERT's) ``LN(x + Attn(x))`` then ``LN(x + MLP(x))``.

    Args:
        dim: model width D.
        num_heads: attention heads (D must be divisible by it).
        mlp_ratio: hidden width of the MLP as a multiple of D.
        dropout: probability of dropping attention weights and each branch's output in training (BERT's).
        postnorm: normalise after each residual sum instead of before each branch.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: int = 4, dropout: float = 0.0, postnorm: bool = False
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.dropout, self.postnorm = num_heads, dropout, postnorm
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D] -> [B, L, D]."""
        if self.postnorm:
            x = self.norm1(x + self.attend(x))
            return self.norm2(x + self.feed(x))
        x = x + self.attend(self.norm1(x))
        return x + self.feed(self.norm2(x))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention branch (dropout on its weights and output in training): [B, L, D] -> [B, L, D]."""
        b, l, d = x.shape
        heads, p = self.num_heads, (self.dropout if self.training else 0.0)
        q, k, v = self.qkv(x).view(b, l, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # [B, heads, L, D/heads], no mask: encoder
        return F.dropout(self.proj(a.transpose(1, 2).reshape(b, l, d)), p, self.training)

    def feed(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP branch (dropout on its output in training): [B, L, D] -> [B, L, D]."""
        return F.dropout(self.mlp(x), self.dropout if self.training else 0.0, self.training)


class MaskedLMEncoder(nn.Module):
    """Token embedding + learned positions -> blocks -> tied output projection, in one of two layouts:

    - ``prenorm``: pre-norm blocks, then a LayerNorm before the output projection.
    - ``bert``: the reference's BERT (surajK610/dual_process trains Hugging Face's BertForMaskedLM): a
      LayerNorm on the summed embeddings, post-norm blocks, and BERT's MLM head: a Linear + GELU + LayerNorm
      transform before the output projection, which carries a per-token output bias. The LayerNorm on the
      embeddings makes what the blocks see independent of the token rows' overall scale; the tied output
      logits still scale with each row's norm.

    Args:
        vocab_size: V, the number of token ids (specials, content and held-out tokens together).
        dim: model width D.
        depth: number of blocks.
        num_heads: attention heads per block.
        max_len: longest sequence (positions are learned).
        pad_id: the padding id; its embedding row is zero and gets no gradient.
        init_std: standard deviation of every Linear weight and the positions; biases start at zero.
        embed_std: standard deviation of the token-embedding initialiser N(0, embed_std²) (default 1.0,
            torch's own); its scale decides how long freshly drawn rows look like trained ones.
        dropout: training-time dropout of every block (attention weights and branch outputs); 0 = none.
        tie_embeddings: the output projection is the token embedding (default); False gives it its own
            ``[V, D]`` weight, drawn like the token embedding.
        layout: ``prenorm`` (default) or ``bert``, see above.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        max_len: int = 16,
        pad_id: int = 0,
        init_std: float = 0.02,
        embed_std: float = 1.0,
        tie_embeddings: bool = True,
        dropout: float = 0.0,
        layout: str = "prenorm",
    ) -> None:
        super().__init__()
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id={pad_id} must be a token id in [0, vocab_size={vocab_size})")
        if layout not in LAYOUTS:
            raise ValueError(f"net.layout={layout!r}: expected one of {LAYOUTS}")
        bert = layout == "bert"
        self.init_std, self.embed_std, self.layout = init_std, embed_std, layout
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        self.embed_norm = nn.LayerNorm(dim) if bert else nn.Identity()
        blocks = (EncoderBlock(dim, num_heads, dropout=dropout, postnorm=bert) for _ in range(depth))
        self.blocks = nn.ModuleList(blocks)
        # the input of the output projection: BERT's MLM transform, or the pre-norm stack's final LayerNorm
        self.norm = (
            nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim)) if bert else nn.LayerNorm(dim)
        )
        self.head = nn.Linear(dim, vocab_size, bias=bert)
        if tie_embeddings:
            self.head.weight = self.embed.weight  # tied: one Parameter, two uses
        self.tie_embeddings = tie_embeddings
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear) and m is not self.head:
                nn.init.normal_(m.weight, 0.0, self.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos, 0.0, self.init_std)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.init_embedding_(self.embed.weight)
            self.embed.weight[self.embed.padding_idx].zero_()
            if not self.tie_embeddings:
                self.init_embedding_(self.head.weight)

    def init_embedding_(self, out: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Fill ``out`` in place with a fresh draw of the token-embedding initialiser N(0, embed_std²).

        ``out`` is any float tensor (the whole ``[V, D]`` table or some rows of it); the padding row is not
        special-cased here. Returns ``out``.
        """
        return out.normal_(0.0, self.embed_std, generator=generator)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, L] int64 token ids -> logits [B, L, V] (float, unnormalised)."""
        if ids.shape[1] > self.pos.shape[0]:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_len={self.pos.shape[0]}")
        x = self.embed_norm(self.embed(ids) + self.pos[: ids.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
