"""Incremental decoding of the LaCT LM with a state cache: O(window + fast-weight size) work per token.

Per block the cache holds
  - the last short_conv - 1 inputs of the short convolution over qkv, when the model has one;
  - the attention keys/values (rotary applied) of the last window - 1 tokens: the next token sees itself and
    those, exactly the training-time window;
  - the LaCT state: the fast weights after the last completed chunk, their momentum buffer and the row
    norms the weight norm restores (one `FastWeightState`), plus the inputs of the current unfinished chunk
    (one `FastWeightInputs`: queries, keys, values, learning rates, momentum coefficients).
New tokens read the fast weights of the last completed chunk (apply-then-update); when the pending chunk
reaches chunk_size tokens it updates the fast weights with `update_step` on exactly the tensors the training
schedule (`causal_lact`) would use for that chunk, so cached logits equal the full forward's logits.

`extend` takes any number of new tokens: the whole prompt (prefill) or one token at a time (decoding).

With LMConfig.eod_id, the token after an end-of-document id starts from an empty cache (window, fast weights,
convolution inputs, position 0), as the full forward treats every document as if alone. The rows of a batch
then need their end-of-document ids at the same columns (one shared cache length); decode rows with
different boundaries one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lact.attention import sliding_window_attention
from lact.layer import LaCTLayer
from lact.models.lm import HybridBlock, LaCTLM
from lact.ops import FastWeightInputs, FastWeightState, swiglu_apply, update_step


@dataclass
class LaCTCache:
    """One block's fast-weight state and pending chunk (operator layout: B * lact.heads first).

    state: weights after the last completed chunk (+ momentum buffer, row norms of the initial weights);
    None until the first token, when the slow weights are copied in the compute dtype, as in training.
    pending: the inputs of the tokens of the unfinished chunk ([B*H, n, .] with n < chunk_size), or None.
    """

    state: FastWeightState | None = None
    pending: FastWeightInputs | None = None

    @property
    def pending_len(self) -> int:
        return 0 if self.pending is None else self.pending.length


@dataclass
class BlockCache:
    """Attention k, v [B, heads, <= window - 1, head_dim] of the latest tokens, the LaCT cache (or None), and
    the short convolution's last short_conv - 1 inputs [B, <= short_conv - 1, 3D] (None without one)."""

    k: Tensor | None = None
    v: Tensor | None = None
    lact: LaCTCache | None = None
    conv_inputs: Tensor | None = None


@dataclass
class LMCache:
    """The whole model's decoding state: one BlockCache per block and the number of tokens seen so far (of the
    current document, with LMConfig.eod_id); `ended`: the last token was an end-of-document id, so the next
    one starts a new document from an empty cache."""

    blocks: list[BlockCache]
    position: int = 0
    ended: bool = False


def init_cache(model: LaCTLM) -> LMCache:
    """An empty cache: no tokens seen, fast weights still the model's initial (slow) weights."""
    return LMCache([BlockCache(lact=None if block.lact is None else LaCTCache()) for block in model.blocks])


def cached_attention(block: HybridBlock, q: Tensor, k: Tensor, v: Tensor, cache: BlockCache) -> Tensor:
    """Sliding-window attention of n new tokens given the cached keys of the previous ones.

    q, k, v [B, heads, n, head_dim] (rotary applied) -> [B, heads, n, head_dim]. Updates cache.k, cache.v to
    the last window - 1 keys/values. Cost O(n * (window + n)); with an empty cache (prefill) it is the
    training path, O(n * window).
    """
    window = block.window
    if cache.k is None or cache.k.shape[2] == 0:
        out = sliding_window_attention(q, k, v, window)
        keys, values = k, v
    else:
        keys, values = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
        past, n = cache.k.shape[2], q.shape[2]
        # New token i sits at key column past + i and sees columns j with past + i - window < j <= past + i.
        rows = torch.arange(n, device=q.device)[:, None] + past
        cols = torch.arange(past + n, device=q.device)[None, :]
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=(cols <= rows) & (cols > rows - window)
        )
    keep = max(0, keys.shape[2] - (window - 1))
    # clone: a slice would keep the whole concatenated tensor alive across steps
    cache.k, cache.v = keys[:, :, keep:].clone(), values[:, :, keep:].clone()
    return out


def cached_lact(layer: LaCTLayer, inputs: FastWeightInputs, cache: LaCTCache) -> Tensor:
    """The causal apply-then-update schedule continued from the cache, over n new tokens.

    inputs: the layer's FastWeightInputs for the new tokens ([B*H, n, .]). Returns o [B*H, n, d]. Each new
    token reads the weights of the last completed chunk; every time the pending chunk fills up, the fast
    weights take one `update_step` on it (the same call `causal_lact` makes) and the pending chunk empties.
    """
    chunk, n = layer.chunk_size, inputs.q.shape[1]
    if cache.state is None:  # as LaCTLayer.forward: slow weights per sequence, in the compute dtype
        batch = inputs.q.shape[0] // layer.num_heads
        cache.state = FastWeightState.initial(*(w.to(inputs.q.dtype) for w in layer.initial_weights(batch)))
    outputs, start = [], 0
    while start < n:
        end = min(n, start + chunk - cache.pending_len)
        new = inputs.slice(start, end)
        outputs.append(swiglu_apply(*cache.state.weights, new.q))
        cache.pending = new if cache.pending is None else cache.pending.cat(new)
        if cache.pending_len == chunk:
            cache.state = update_step(cache.state, cache.pending, muon=layer.muon, prenorm=layer.prenorm)
            cache.pending = None
        start = end
    return torch.cat(outputs, dim=1)


def block_extend(block: HybridBlock, x: Tensor, positions: Tensor, cache: BlockCache) -> Tensor:
    """HybridBlock.forward for n new tokens x [B, n, D] at `positions` [n], continuing from `cache`."""
    xn = block.attn_norm(x)
    qkv, cache.conv_inputs = block.project_qkv(xn, cache.conv_inputs)
    q, k, v = block.attention_inputs(qkv, positions)
    mixed = block.merge_heads(cached_attention(block, q, k, v, cache))
    if block.lact is not None:
        inputs = block.lact.fast_weight_inputs(xn, qkv, positions)
        mixed = mixed + block.lact.read_out(cached_lact(block.lact, inputs, cache.lact), xn)
    return block.finish(x, mixed)


def extend(model: LaCTLM, tokens: Tensor, cache: LMCache) -> Tensor:
    """Feed new tokens [B, n] after the cache's tokens; returns their logits [B, n, vocab] and advances the
    cache in place. n may be the whole prompt (prefill) or 1 (decoding). With model.cfg.eod_id, the tokens
    are fed document by document, the cache emptied after every end-of-document id."""
    eod_id = model.cfg.eod_id
    if eod_id is None:
        return extend_document(model, tokens, cache)
    is_eod = tokens == eod_id
    if not torch.equal(is_eod, is_eod[:1].expand_as(is_eod)):
        raise ValueError(
            f"extend: the rows of tokens {tuple(tokens.shape)} have end-of-document ids ({eod_id}) at different "
            "columns; the cache of a batch restarts all rows at once: decode such rows one at a time"
        )
    ends = (is_eod[0].nonzero().squeeze(1) + 1).tolist()
    pieces, start = [], 0
    for end in [*ends, tokens.shape[1]]:
        if end > start:
            if cache.ended:
                cache.blocks, cache.position, cache.ended = init_cache(model).blocks, 0, False
            pieces.append(extend_document(model, tokens[:, start:end], cache))
            cache.ended = end in ends
        start = end
    return torch.cat(pieces, dim=1)


def extend_document(model: LaCTLM, tokens: Tensor, cache: LMCache) -> Tensor:
    """`extend` for new tokens [B, n] of the cache's current document (or of a stream without documents)."""
    n = tokens.shape[1]
    positions = torch.arange(cache.position, cache.position + n, device=tokens.device)
    x = model.token_embedding(tokens)
    for block, block_cache in zip(model.blocks, cache.blocks):
        x = block_extend(block, x, positions, block_cache)
    cache.position += n
    return model.head(x)


@torch.no_grad()
def generate(
    model: LaCTLM,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample `max_new_tokens` after prompt [B, P] (int64) with the state cache; returns [B, P + new].

    temperature 0 is greedy decoding; top_k keeps the k most likely tokens before sampling.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [B, P] with P >= 1, got shape {tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    cache = init_cache(model)
    logits = extend(model, prompt, cache)[:, -1]
    out = [prompt]
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, generator)
        out.append(token[:, None])
        if i + 1 < max_new_tokens:
            logits = extend(model, token[:, None], cache)[:, -1]
    return torch.cat(out, dim=1)


def sample(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """logits [B, V] -> token ids [B]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
