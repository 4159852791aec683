"""The LaCT operator: a SwiGLU MLP used as fast weights, updated by one closed-form gradient step per chunk.

Layouts (B = batch x heads, L = tokens, d = head dim, h = hidden width of the fast-weight MLP):

    w_gate, w_up   [B, h, d]        fast weights; f_W(x) = W_down (silu(W_gate x) * (W_up x))
    w_down         [B, d, h]
    q, k, v        [B, L, d]        queries read the memory, (key, value) pairs write it
    lr_*           [B, L, 1] fp32   per-token inner learning rates, already positive
    momentum       [B, L, 1]        per-token beta in (0, 1), averaged per chunk

Two primitives, `swiglu_apply` (read) and `update_step` (write: closed-form step, momentum, Muon, weight norm),
and three schedules built only from them: `causal_lact` (language model), `bidirectional_lact` (novel view
synthesis) and `interleaved_lact` (autoregressive video). Each takes positional tensors (the published
operator's interface) and runs `run_causal` / `run_bidirectional` / `run_interleaved` on the fast weights and
one `FastWeightInputs` record, which `slice(start, end)` cuts into chunks. The inner gradient itself is the
closed form of `swiglu_update`, never autograd of the inner loss. For the outer backward, the two primitives
run as autograd Functions with a hand-derived backward (`LeanApply`, `LeanUpdate`: per chunk they keep
[h, d]-sized matrices and, in the default "keep" mode, an update's three [b, h] pre-activations, not the
~13 [b, h] activations autograd keeps), or as plain autograd: `set_lean_backward`.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lact.documents import PackedDocuments

# Newton-Schulz coefficients (a, b, c) for X <- aX + (bA + cA^2)X, A = X X^T (docs/architecture.md, The operator).
MUON_FIXED = ((3.4445, -4.7750, 2.0315),) * 5
MUON_SCHEDULE = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
# Zero iterations: only the division by the Frobenius norm, so every update has unit norm. This is what the
# published code computes when it is asked for zero Newton-Schulz steps (its no-Muon NVS setting).
MUON_NORMALIZE = ()
MUON_COEFFICIENTS = {"fixed": MUON_FIXED, "schedule": MUON_SCHEDULE, "normalize": MUON_NORMALIZE}

FastWeights = tuple[Tensor, Tensor, Tensor]  # (w_gate [B,h,d], w_up [B,h,d], w_down [B,d,h])


class FastWeightInputs(NamedTuple):
    """The per-token inputs of a schedule, in operator layout (B = batch x heads first)."""

    q: Tensor  # [B, L, d] queries (read)
    k: Tensor  # [B, L, d] keys (write)
    v: Tensor  # [B, L, d] values (write)
    lr_gate: Tensor  # [B, L, 1] fp32, > 0
    lr_up: Tensor
    lr_down: Tensor
    momentum: Tensor | None = None  # [B, L, 1] in (0, 1), or None for no momentum

    @property
    def length(self) -> int:
        return self.q.shape[1]

    def slice(self, start: int, end: int) -> FastWeightInputs:
        """Tokens [start, end) of every field."""
        return FastWeightInputs(*(None if t is None else t[:, start:end] for t in self))

    def split(self, spans: list[tuple[int, int]]) -> list[FastWeightInputs]:
        """The records of consecutive token spans [(start, end)] that tile [0, spans[-1][1]) (`chunk_spans`).

        One torch.split per field instead of one slice per span: the backward of a slice writes its gradient
        into a zero tensor of the whole field, so slicing a field into n chunks costs n full-length gradient
        buffers (quadratic in L: 1.7 s of CPU at 56K tokens for one [4, L, 128] field), while the backward of
        a split is a single concatenation."""
        sizes = [end - start for start, end in spans]
        tail = self.length - spans[-1][1] if spans else self.length
        parts = [
            [None] * len(spans) if t is None else torch.split(t, sizes + [tail] if tail else sizes, dim=1)
            for t in self
        ]
        return [FastWeightInputs(*fields) for fields in zip(*parts)][: len(spans)]

    def split_rows(self, sizes: list[int]) -> list[FastWeightInputs]:
        """Consecutive groups of `sizes` rows (batch dimension) that tile every field, by one torch.split per
        field (see `split`: slicing instead would make the backward quadratic in the number of groups)."""
        parts = [[None] * len(sizes) if t is None else torch.split(t, sizes) for t in self]
        return [FastWeightInputs(*fields) for fields in zip(*parts)]

    def cat(self, other: FastWeightInputs) -> FastWeightInputs:
        """These tokens followed by `other`'s (the same fields present in both)."""
        return FastWeightInputs(
            *(None if a is None else torch.cat([a, b], dim=1) for a, b in zip(self, other))
        )


class FastWeightState(NamedTuple):
    """Everything a schedule carries from one chunk to the next.

    weights: current (w_gate, w_up, w_down); row_norms: the per-row L2 norms of the initial (slow) weights,
    ([B,h,1], [B,h,1], [B,d,1]), which the weight norm restores after every update; momentum: the running
    momentum buffers of the three matrices, or None before the first update / without momentum; unnormalized:
    with the pre-norm update only, the sum of the initial weights and all updates so far, of which `weights` is
    the row-renormalised copy (None before the first update / with the default post-norm update).
    """

    weights: FastWeights
    row_norms: FastWeights
    momentum: FastWeights | None = None
    unnormalized: FastWeights | None = None

    @classmethod
    def initial(cls, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> FastWeightState:
        weights = (w_gate, w_up, w_down)
        return cls(weights, tuple(row_norms(w) for w in weights))

    def rows(self, end: int) -> FastWeightState:
        """The first `end` rows (batch x heads) of every tensor."""
        return FastWeightState(*(None if ws is None else tuple(w[:end] for w in ws) for ws in self))


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def swiglu_apply(w_gate: Tensor, w_up: Tensor, w_down: Tensor, x: Tensor) -> Tensor:
    """f_W(x) = W_down (silu(W_gate x) * (W_up x)).  x [B, n, d] -> [B, n, d]."""
    gate = x @ w_gate.mT  # [B, n, h]
    up = x @ w_up.mT
    return (F.silu(gate) * up) @ w_down.mT


def swiglu_update(
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    k: Tensor,
    v: Tensor,
    lr_gate: Tensor,
    lr_up: Tensor,
    lr_down: Tensor,
) -> FastWeights:
    """The closed-form negative gradient of L(W) = -sum_i lr_i <f_W(k_i), v_i> on one chunk (docs/architecture.md, The operator).

    k, v [B, b, d]; lr_* [B, b, 1]. Returns (dW_gate [B,h,d], dW_up [B,h,d], dW_down [B,d,h]), in k's dtype.
    """
    return _swiglu_update(w_gate, w_up, w_down, k, v, lr_gate, lr_up, lr_down)[0]


def _swiglu_update(
    w_gate, w_up, w_down, k, v, lr_gate, lr_up, lr_down
) -> tuple[FastWeights, tuple[Tensor, ...]]:
    """swiglu_update, also returning the chunk's pre-activations (G^T, U^T, P^T), [B, b, h] each: all the
    backward of the update needs besides its inputs (`LeanUpdate` keeps them in its "keep" mode)."""
    lr_gate, lr_up, lr_down = (lr.to(k.dtype) for lr in (lr_gate, lr_up, lr_down))
    gate = k @ w_gate.mT  # G^T  [B, b, h]
    up = k @ w_up.mT  # U^T
    sig = torch.sigmoid(gate)
    silu_gate = gate * sig
    hidden = silu_gate * up  # H^T
    p = v @ w_down  # P^T = (W_down^T V)^T  [B, b, h]
    d_down = v.mT @ (hidden * lr_down)
    d_up = (p * silu_gate).mT @ (k * lr_up)
    silu_grad = sig * (1 + gate * (1 - sig))
    d_gate = (p * up * silu_grad).mT @ (k * lr_gate)
    return (d_gate, d_up, d_down), (gate, up, p)


def newton_schulz(
    x: Tensor, coefficients: str | tuple[tuple[float, float, float], ...] = "schedule"
) -> Tensor:
    """Approximately orthogonalise each matrix of x [..., m, n] (Muon): normalise by its Frobenius norm, then
    iterate X <- aX + (bA + cA^2)X, A = X X^T, once per (a, b, c), on the wide orientation.

    `coefficients` is "fixed", "schedule", "normalize" (no iteration: x / ||x||_F) or an explicit tuple of
    (a, b, c). Computed in bf16 on CUDA and in fp32 (or the input's float64) elsewhere, where bf16 matmul is slow; returned in x's dtype.
    """
    return _newton_schulz(x, coefficients)[0]


def _muon_coefficients(coefficients) -> tuple[tuple[float, float, float], ...]:
    if isinstance(coefficients, str):
        if coefficients not in MUON_COEFFICIENTS:
            raise ValueError(f"muon must be None or one of {sorted(MUON_COEFFICIENTS)}, got {coefficients!r}")
        return MUON_COEFFICIENTS[coefficients]
    return coefficients


def _muon_dtype(x: Tensor) -> torch.dtype:
    return torch.bfloat16 if x.is_cuda else torch.promote_types(x.dtype, torch.float32)


def _newton_schulz(x: Tensor, coefficients) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """newton_schulz, also returning per iteration (Y, A = Y Y^T) (wide orientation, compute dtype; A is
    [.., m, m], m <= n): all its backward needs, which then recomputes only Q = bA + cA^2 (one [m, m] matmul)."""
    coefficients = _muon_coefficients(coefficients)
    y = x.to(_muon_dtype(x))
    tall = y.shape[-2] > y.shape[-1]
    if tall:
        y = y.mT
    y = y / (torch.linalg.matrix_norm(y, keepdim=True) + 1e-7)
    iterates = []
    for a, b, c in coefficients:
        gram = y @ y.mT
        iterates.append((y, gram))
        y = a * y + (b * gram + c * (gram @ gram)) @ y
    if tall:
        y = y.mT
    return y.to(x.dtype), iterates


def row_norms(w: Tensor) -> Tensor:
    """L2 norm of every row over the input (last) dimension: [B, rows, cols] -> [B, rows, 1]."""
    return torch.linalg.vector_norm(w, dim=-1, keepdim=True)


def renormalize_rows(w: Tensor, target_norms: Tensor) -> Tensor:
    """Rescale every row of w [B, rows, cols] back to target_norms [B, rows, 1] (docs/architecture.md, The operator: the weight norm)."""
    return w * (target_norms / (row_norms(w) + 1e-5))


def update_step(
    state: FastWeightState, chunk: FastWeightInputs, *, muon: str | None = None, prenorm: bool = False
) -> FastWeightState:
    """One chunk's update: closed-form step, then momentum, Muon, step and weight norm, in that order.

    chunk: the chunk's inputs ([B, b, .]; q is not used). With chunk.momentum, the chunk's momentum coefficient
    is the mean of its per-token beta, [B, 1, 1]; None means no momentum. Under the lean backward (see
    `set_lean_backward`) and when a gradient is needed, the post-norm step is one `LeanUpdate` autograd node.

    prenorm=False (post-norm): W <- renorm(W + dW), the step is taken from the renormalised weights.
    prenorm=True: the steps accumulate in unnormalised weights U <- U + dW (U starts at the initial weights) and
    the weights used to read and to compute the next step are renorm(U): the weight norm is applied to the
    state before use instead of after each step. Both compute dW from the weights in use. The pre-norm
    variant always runs under plain autograd.
    """
    beta = None if chunk.momentum is None else chunk.momentum.mean(dim=1, keepdim=True)
    args = (*state.weights, *state.row_norms, chunk.k, chunk.v, chunk.lr_gate, chunk.lr_up, chunk.lr_down)
    momentum = state.momentum if beta is not None else None
    if prenorm:
        _, new_momentum, _, step, *_ = _update(*args, beta, momentum, muon)
        base = state.weights if state.unnormalized is None else state.unnormalized
        unnormalized = tuple(u + d for u, d in zip(base, step))
        weights = tuple(renormalize_rows(u, n) for u, n in zip(unnormalized, state.row_norms))
        return FastWeightState(weights, state.row_norms, new_momentum and tuple(new_momentum), unnormalized)
    backward = update_backward()
    if backward != "autograd" and _lean_wanted(*args, beta, *(momentum or ())):
        out = LeanUpdate.apply(*args, beta, *(momentum or (None, None, None)), muon, backward == "keep")
        weights, new_momentum = out[:3], (out[3:] if beta is not None else None)
    else:
        weights, new_momentum, *_ = _update(*args, beta, momentum, muon)
    return FastWeightState(tuple(weights), state.row_norms, new_momentum and tuple(new_momentum))


def _update(w_gate, w_up, w_down, n_gate, n_up, n_down, k, v, lr_gate, lr_up, lr_down, beta, momentum, muon):
    """update_step's math on plain tensors: (new weights, new momentum or None, the update after momentum,
    the step added to the weights (the update after Muon), Muon's iterates per matrix (empty without), the
    chunk's pre-activations (G^T, U^T, P^T) [B, b, h])."""
    delta, activations = _swiglu_update(w_gate, w_up, w_down, k, v, lr_gate, lr_up, lr_down)
    new_momentum = None
    if beta is not None:
        beta = beta.to(delta[0].dtype)
        if momentum is not None:
            delta = tuple(d + beta * m for d, m in zip(delta, momentum))
        new_momentum = delta
    step, iterates = delta, []
    if muon is not None:
        step, iterates = zip(*(_newton_schulz(d, muon) for d in delta))
    norms = (n_gate, n_up, n_down)
    weights = tuple(renormalize_rows(w + d, n) for w, d, n in zip((w_gate, w_up, w_down), step, norms))
    return weights, new_momentum, delta, step, iterates, activations


def apply_weights(w_gate: Tensor, w_up: Tensor, w_down: Tensor, x: Tensor) -> Tensor:
    """swiglu_apply as the schedules call it: one `LeanApply` autograd node under the lean backward."""
    if _lean_wanted(w_gate, w_up, w_down, x):
        return LeanApply.apply(w_gate, w_up, w_down, x, _LEAN["mode"] == "keep_all")
    return swiglu_apply(w_gate, w_up, w_down, x)


# ----------------------------------------------------------------------------------------------------------
# The lean backward: autograd of the schedules above keeps every chunk's [B, b, h] activations (gate, up,
# their silu products, P = V^T W_down, ...) until the backward pass. These two autograd Functions keep only
# their inputs (the fast weights of each chunk, a few [B, h, d] matrices, and views of q, k, v, lr that the
# caller holds anyway) and recompute the activations of one chunk at a time in a hand-derived backward; in
# the "keep" mode (the default) an update also keeps its chunk's three pre-activations G, U, P (of
# autograd's ~13), so that its backward redoes no forward matmul, and in "keep_all" a read keeps its G, U.

LEAN_MODES = (None, False, True, "keep", "keep_all")
_LEAN: dict[str, bool | str | None] = {"mode": None}


def set_lean_backward(mode: bool | str | None) -> None:
    """Choose the schedules' backward (all give the same gradients: tests/lact/test_lean_backward.py).

    False: plain autograd of the forward (keeps ~13 [B, b, h] activations per updating chunk and 4 per read).
    True ("lean"): the hand-derived backward everywhere, keeping no [B, b, h] activation: reads and updates
    recompute their pre-activations, 5 of the forward's 9 [b, d] x [d, h] matmuls per chunk (the least
    memory: 0.32-0.35 of autograd's peak at 56K tokens, 0.96-1.12x its CPU time).
    "keep": the hand-derived backward everywhere, each update keeping its chunk's G, U, P [B, b, h] (reads
    still recompute their G, U: 2 of the 9 matmuls): 0.38-0.43 of autograd's peak at 56K, 0.87-0.96x its
    CPU time at 8K-56K tokens.
    "keep_all": as "keep", and the reads keep their G, U too (nothing recomputed): 0.81-0.91x autograd's
    CPU time, but 0.52 of its peak at 56K without Muon.
    None (the default, "auto"): "keep", the fastest mode within half of autograd's peak memory at 56K and
    faster than autograd (benchmarks/README.md, Memory-lean backward). The pre-norm variant's updates run
    under autograd in every mode.
    """
    if mode not in LEAN_MODES:
        raise ValueError(f"lean backward mode must be one of {LEAN_MODES} (None = auto), got {mode!r}")
    _LEAN["mode"] = mode


def lean_backward_mode() -> bool | str | None:
    """The mode set by `set_lean_backward` (None: auto)."""
    return _LEAN["mode"]


def update_backward(prenorm: bool = False) -> str:
    """The backward an update runs under the current mode: "autograd", "lean" (`LeanUpdate` recomputing G, U,
    P) or "keep" (`LeanUpdate` keeping them; also in the "keep_all" mode). The same with and without Muon;
    the pre-norm variant always runs under autograd."""
    mode = _LEAN["mode"]
    if prenorm or mode is False:
        return "autograd"
    if mode is None:
        return "keep"
    return "lean" if mode is True else "keep"


def _lean_wanted(*tensors: Tensor | None) -> bool:
    return (
        _LEAN["mode"] is not False
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in tensors)
    )


class LeanApply(torch.autograd.Function):
    """o = f_W(x) = W_down (silu(W_gate x) * (W_up x)); saves W and x, recomputes the [B, n, h] activations."""

    @staticmethod
    def forward(ctx, w_gate, w_up, w_down, x, keep):
        ctx.keep = keep
        if not keep:
            ctx.save_for_backward(w_gate, w_up, w_down, x)
            return swiglu_apply(w_gate, w_up, w_down, x)
        gate, up = x @ w_gate.mT, x @ w_up.mT  # swiglu_apply's arithmetic, keeping G, U
        ctx.save_for_backward(w_gate, w_up, w_down, x, gate, up)
        return (F.silu(gate) * up) @ w_down.mT

    @staticmethod
    def backward(ctx, grad_out):
        w_gate, w_up, w_down, x, *kept = ctx.saved_tensors
        hidden = w_gate.shape[1]
        # [W_gate; W_up] stacked: one matmul recomputes both pre-activations. (Every product here is written
        # functionally or accumulated with baddbmm_: `out=` into views of a stacked buffer breaks dynamo's
        # graph when the block is compiled.)
        if kept:
            gate, up = kept
        else:
            gate, up = (x @ torch.cat([w_gate, w_up], dim=1).mT).split(hidden, dim=-1)  # [B, n, h] each
        silu_gate = F.silu(gate)
        g_hidden = grad_out @ w_down  # [B, n, h]
        g_up = g_hidden * silu_gate
        g_w_down = grad_out.mT @ silu_gate.mul_(up)  # [B, d, h]
        g_gate = torch.ops.aten.silu_backward(g_hidden.mul_(up), gate)  # grad H U silu'(G), one kernel
        g_x = torch.bmm(g_gate, w_gate).baddbmm_(g_up, w_up)
        return g_gate.mT @ x, g_up.mT @ x, g_w_down, g_x, None


class LeanUpdate(torch.autograd.Function):
    """update_step as one autograd node with a hand-derived backward.

    Inputs: w_gate, w_up, w_down [B, h|d, d|h]; their row-norm targets n_* [B, rows, 1]; k, v [B, b, d];
    lr_* [B, b, 1]; beta [B, 1, 1] or None; the momentum buffers m_* or None; muon; keep (bool). Outputs: the
    new weights and the new momentum buffers (None without momentum). Saves its inputs and [h, d]-sized
    matrices, and with `keep` the chunk's G, U, P [B, b, h] (set_lean_backward's "keep" mode).
    """

    @staticmethod
    def forward(ctx, w_gate, w_up, w_down, n_gate, n_up, n_down, k, v, lr_gate, lr_up, lr_down, beta, m_gate,
                m_up, m_down, muon, keep):  # fmt: skip
        ctx.muon, ctx.keep = muon, keep
        ctx.has_momentum = m_gate is not None
        momentum = (m_gate, m_up, m_down) if ctx.has_momentum else None
        weights, new_momentum, delta, step, iterates, activations = _update(
            w_gate, w_up, w_down, n_gate, n_up, n_down, k, v, lr_gate, lr_up, lr_down, beta, momentum, muon
        )
        # Besides the inputs, [B, h, d]-sized matrices: the chunk's update before and after Muon and Muon's
        # iterates with their Gram matrices, so the backward recomputes neither the three update matmuls over
        # the chunk nor Muon's iterates. With `keep` also the chunk's G, U, P [B, b, h], so that it recomputes
        # no forward matmul either.
        ctx.save_for_backward(w_gate, w_up, w_down, n_gate, n_up, n_down, k, v, lr_gate, lr_up, lr_down, beta,
                              m_gate, m_up, m_down, *delta, *(activations if keep else ()),
                              *(step if muon is not None else ()),
                              *(t for matrix in iterates for it in matrix for t in it))  # fmt: skip
        return (*weights, *(new_momentum or (None, None, None)))

    @staticmethod
    def backward(ctx, g_wg_new, g_wu_new, g_wd_new, g_mg_new, g_mu_new, g_md_new):
        saved = list(ctx.saved_tensors)
        w_gate, w_up, w_down, n_gate, n_up, n_down, k, v, lr_gate, lr_up, lr_down, beta = saved[:12]
        momentum = saved[12:15] if ctx.has_momentum else None
        delta, rest = saved[15:18], saved[18:]
        kept, rest = (rest[:3], rest[3:]) if ctx.keep else (None, rest)
        stepped, rest = (rest[:3], rest[3:]) if ctx.muon is not None else (delta, rest)
        rounds = len(rest) // 6  # Muon's iterations per matrix, (Y, A) each
        iterates = [
            [tuple(rest[2 * (i * rounds + j) : 2 * (i * rounds + j) + 2]) for j in range(rounds)]
            for i in range(3)
        ]
        weights, norms = (w_gate, w_up, w_down), (n_gate, n_up, n_down)
        lrs = tuple(lr.to(k.dtype) for lr in (lr_gate, lr_up, lr_down))
        if beta is not None:
            beta_c = beta.to(delta[0].dtype)
        new_grads = (g_wg_new, g_wu_new, g_wd_new)
        # Weight norm W' = Y n / (|Y| + eps), Y = W + step, per row.
        g_w, g_step, g_norms = [], [], []
        for y, n, g in zip((w + d for w, d in zip(weights, stepped)), norms, new_grads):
            if g is None:
                g = torch.zeros_like(y)
            r = row_norms(y)
            dot = (g * y).sum(-1, keepdim=True)
            g_y = g * (n / (r + 1e-5)) - y * (n * dot / ((r + 1e-5) ** 2 * r))
            g_w.append(g_y)
            g_step.append(g_y)
            g_norms.append(dot / (r + 1e-5))
        g_delta = (
            [newton_schulz_backward(d, g, ctx.muon, it) for d, g, it in zip(delta, g_step, iterates)]
            if ctx.muon
            else g_step
        )
        # Momentum: delta = dW + beta M, and delta is also the new momentum buffer.
        g_beta = g_m = None
        if beta is not None:
            g_delta = [
                gd if gm is None else gd + gm for gd, gm in zip(g_delta, (g_mg_new, g_mu_new, g_md_new))
            ]
            if momentum is not None:
                g_m = [beta_c * gd for gd in g_delta]
                g_beta = sum((gd * m).sum(dim=(-2, -1), keepdim=True) for gd, m in zip(g_delta, momentum))
                g_beta = g_beta.to(beta.dtype)
            else:
                g_beta = torch.zeros_like(beta)
        gd_gate, gd_up, gd_down = g_delta  # gradients of dW_gate [B,h,d], dW_up [B,h,d], dW_down [B,d,h]
        lr_g, lr_u, lr_d = lrs
        hidden = w_gate.shape[1]
        # With A = P * silu(G), C = P * U * silu'(G): dW_down = V^T (H * lr_down), dW_up = A^T (K * lr_up),
        # dW_gate = C^T (K * lr_gate) (docs/architecture.md notation, row layout: G^T = K^T W_gate^T, ...).
        # The products with K (with V) on the left are one matmul against the [h, d] matrices stacked: the
        # gradients of A, C (of H lr_down) and, unless the forward kept them, the recomputed G, U (P).
        if kept is None:
            right_k = torch.cat([gd_gate, gd_up, w_gate, w_up], dim=1)  # [B, 4h, d]
            e_gate, e_up, gate, up = (k @ right_k.mT).split(hidden, dim=-1)  # [B, b, h] each
            vg, p = (v @ torch.cat([gd_down, w_down], dim=-1)).split(hidden, dim=-1)
        else:
            gate, up, p = kept
            e_gate, e_up = (k @ torch.cat([gd_gate, gd_up], dim=1).mT).split(hidden, dim=-1)
            vg = v @ gd_down
        sig = torch.sigmoid(gate)
        silu_gate = gate * sig
        one_minus = 1 - sig
        silu_grad = torch.addcmul(sig, silu_gate, one_minus)  # silu'(g) = s + silu(g) (1 - s)
        # silu''(g) = s (1 - s) (2 + g (1 - 2 s)) = s (1 - s) (2 + g - 2 silu(g)), times P U
        pu = p * up
        pu_silu_grad2 = torch.sub(gate, silu_gate, alpha=2).add_(2).mul_(sig).mul_(one_minus).mul_(pu)
        hid = silu_gate * up
        a_mat, c_mat = p * silu_gate, pu.mul_(silu_grad)
        # The lr gradients: sum over h of (the matrix) x (its gradient before the per-token lr).
        g_lr_down = (vg * hid).sum(-1, keepdim=True)
        g_lr_up = (a_mat * e_up).sum(-1, keepdim=True)
        g_lr_gate = (c_mat * e_gate).sum(-1, keepdim=True)
        g_a, g_c, g_hid = e_up.mul_(lr_u), e_gate.mul_(lr_g), vg.mul_(lr_d)
        # grad G = (grad H U + grad A P) silu' + grad C P U silu'';  with X = grad C silu':
        # grad U = grad H silu + X P;  grad P = grad A silu + X U
        g_gate = (g_hid * up).addcmul_(g_a, p).mul_(silu_grad).addcmul_(g_c, pu_silu_grad2)
        x_c = g_c.mul_(silu_grad)
        g_up = g_hid.mul_(silu_gate).addcmul_(x_c, p)
        g_p = g_a.mul_(silu_gate).addcmul_(x_c, up)
        # grad K, grad V: accumulated in place, the per-token lr folded into the [b, h] factors.
        g_k = torch.bmm(c_mat.mul_(lr_g), gd_gate).baddbmm_(a_mat.mul_(lr_u), gd_up)
        g_k = g_k.baddbmm_(g_gate, w_gate).baddbmm_(g_up, w_up)  # [B, b, d]
        g_v = torch.bmm(hid.mul_(lr_d), gd_down.mT).baddbmm_(g_p, w_down.mT)
        g_w[0] = g_w[0] + g_gate.mT @ k
        g_w[1] = g_w[1] + g_up.mT @ k
        g_w[2] = g_w[2] + v.mT @ g_p
        g_lrs = (g_lr_gate.to(lr_gate.dtype), g_lr_up.to(lr_up.dtype), g_lr_down.to(lr_down.dtype))
        g_ms = tuple(g_m) if g_m is not None else (None, None, None)
        return (*g_w, *g_norms, g_k, g_v, *g_lrs, g_beta, *g_ms, None, None)


def newton_schulz_backward(
    x: Tensor,
    grad: Tensor,
    coefficients: str | tuple[tuple[float, float, float], ...],
    iterates: list[Tensor] | None = None,
) -> Tensor:
    """The gradient of `newton_schulz(x, coefficients)` with respect to x, given the output's gradient.

    iterates: the forward's (Y, A) per iteration (from `_newton_schulz`); recomputed when None. Runs in the
    forward's compute dtype. With A = Y Y^T and Q = bA + cA^2 (both symmetric), Y' = aY + QY gives
    dY = a dY' + Q dY' + (dA + dA^T) Y, where dQ = dY' Y^T, dA = b dQ + c (dQ A + A dQ), so that with
    S = dQ + dQ^T (symmetric) and T = S A: dA + dA^T = b S + c (T + T^T). Three [m, n] and two [m, m]
    matmuls per iteration (Q recomputed), against autograd's four and two.
    """
    coefficients = _muon_coefficients(coefficients)
    if iterates is None:
        iterates = _newton_schulz(x, coefficients)[1]
    raw, g = x.to(_muon_dtype(x)), grad.to(_muon_dtype(x))
    tall = raw.shape[-2] > raw.shape[-1]
    if tall:
        raw, g = raw.mT, g.mT
    for (a, b, c), (y, gram) in zip(reversed(coefficients), reversed(iterates)):
        poly = b * gram + c * (gram @ gram)
        g_poly = g @ y.mT
        sym = g_poly + g_poly.mT
        t = sym @ gram
        sym = b * sym + c * (t + t.mT)
        g = a * g + poly @ g + sym @ y
    # Y_0 = X / (|X|_F + eps)
    norm = torch.linalg.matrix_norm(raw, keepdim=True)
    dot = (g * raw).sum(dim=(-2, -1), keepdim=True)
    g = g / (norm + 1e-7) - raw * (dot / ((norm + 1e-7) ** 2 * norm))
    if tall:
        g = g.mT
    return g.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Schedules


def chunk_spans(length: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(start, end)] of the chunks of `chunk_size` tokens covering [0, length), the last one possibly partial.

    A loop over the chunk count rather than `range(0, length, chunk_size)`: under torch.compile with a
    dynamic length, dynamo then guards on the number of chunks only, not on the exact length (range() of a
    symbolic size pins it), so a new partial last chunk does not recompile."""
    count = (length + chunk_size - 1) // chunk_size
    return [(i * chunk_size, min((i + 1) * chunk_size, length)) for i in range(count)]


def run_causal(
    weights: FastWeights,
    inputs: FastWeightInputs,
    *,
    chunk_size: int,
    muon: str | None = None,
    prenorm: bool = False,
    return_weights: bool = False,
    documents: PackedDocuments | None = None,
) -> Tensor | tuple[Tensor, FastWeights]:
    """`causal_lact` on an inputs record: apply-then-update over chunks. Returns o [B, L, d], or with
    return_weights (o, the weights after the last update) for diagnostics.

    With `documents` (the boundaries of packed sequences, lact/documents.py; B = batch x heads), every
    document runs the schedule as if alone: from the initial weights, in chunks counted from its start
    (not with prenorm or return_weights).
    """
    check_inputs(weights, inputs, muon=muon)
    check_chunk_size(chunk_size)
    if documents is not None:
        if prenorm or return_weights:
            raise ValueError("run_causal: packed documents support neither prenorm nor return_weights")
        return run_causal_documents(weights, inputs, documents, chunk_size=chunk_size, muon=muon)
    state = FastWeightState.initial(*weights)
    length = inputs.length
    outputs = []
    spans = chunk_spans(length, chunk_size)
    for (_, end), chunk in zip(spans, inputs.split(spans)):
        outputs.append(apply_weights(*state.weights, chunk.q))
        if end < length:
            state = update_step(state, chunk, muon=muon, prenorm=prenorm)
    o = torch.cat(outputs, dim=1)
    return (o, state.weights) if return_weights else o


# Eager under torch.compile: the layout's Python ints (documents per step, tail groups) set the loop and every
# slice, so a compiled schedule would recompile for every new layout. The compiled block breaks its graph here
# and runs the rest of itself compiled (lact/nn.py compile_blocks; docs/architecture.md, "Packed documents").
@torch.compiler.disable
def run_causal_documents(
    weights: FastWeights,
    inputs: FastWeightInputs,
    documents: PackedDocuments,
    *,
    chunk_size: int,
    muon: str | None = None,
) -> Tensor:
    """The causal schedule on every document of packed sequences at once (see `run_causal`), on the compact
    layout of lact/documents.py.

    Step s applies the current weights of the n_{s+1} documents that have a chunk after chunk s to their
    (full) chunk s and updates them with it: one batched `swiglu_apply` and one `update_step` over
    [n_{s+1} * heads, C, d]. The documents whose last chunk (tail) is chunk s are done writing: their weights
    are set aside, and after the last step every tail is read by its document's final weights, one batched
    apply per group of tails of the same rounded length. That is what each document alone computes (its last
    chunk is apply-only there too). Documents are ordered by chunk count, so the writing ones are always a
    prefix of the state's rows. Returns o [B, L, d].
    """
    if documents.chunk_size != chunk_size:
        raise ValueError(
            f"documents were laid out in chunks of {documents.chunk_size} tokens, the schedule uses "
            f"chunk_size={chunk_size}: build them with pack_documents(..., chunk_size={chunk_size})"
        )
    batch, length = documents.ids.shape
    if inputs.q.shape[0] % batch or inputs.length != length:
        raise ValueError(
            f"documents are for [B={batch}, L={length}] tokens, the inputs have {inputs.q.shape[0]} rows "
            f"(B x heads) of {inputs.length} tokens"
        )
    heads = inputs.q.shape[0] // batch
    gather, scatter, tail_rows = documents.compact_indices(heads)
    written = documents.write_chunks * heads * chunk_size  # the write chunks' slots come first
    q = inputs.q.flatten(0, 1).index_select(0, gather)  # every slot is read
    writes = FastWeightInputs(
        q[:written].unflatten(0, (-1, chunk_size)),
        *(None if t is None else documents.to_chunks(t, gather[:written]) for t in inputs[1:]),
    )
    initial = tuple(w.unflatten(0, (batch, heads))[documents.rows].flatten(0, 1) for w in weights)
    state = FastWeightState.initial(*initial)
    steps = documents.docs_per_step
    writing = [n * heads for n in steps[1:]] + [0]  # step s writes the documents that have a chunk s + 1
    chunks = iter(writes.split_rows([n for n in writing if n]))
    outputs, finished = [], []
    for running, writers in zip(steps, writing):
        if running * heads > writers:  # documents whose last chunk is chunk s: their final weights
            finished.append(tuple(w[writers : running * heads] for w in state.weights))
        if writers:
            chunk, current = next(chunks), state.rows(writers)
            outputs.append(apply_weights(*current.weights, chunk.q).flatten(0, 1))
            state = update_step(current, chunk, muon=muon)
    final = tuple(torch.cat(ws) if len(ws) > 1 else ws[0] for ws in zip(*finished))
    start, done = written, 0
    for count, size in documents.tail_groups:
        rows = tail_rows[done * heads : (done + count) * heads]
        tails = q[start : start + count * heads * size].unflatten(0, (count * heads, size))
        outputs.append(apply_weights(*(w.index_select(0, rows) for w in final), tails).flatten(0, 1))
        start, done = start + count * heads * size, done + count
    return documents.from_chunks(torch.cat(outputs), scatter)


def run_bidirectional(
    weights: FastWeights,
    inputs: FastWeightInputs,
    *,
    update_len: int,
    chunk_size: int | None = None,
    muon: str | None = None,
) -> tuple[Tensor, FastWeights]:
    """`bidirectional_lact` on an inputs record (momentum must be None). Returns (o [B, L, d], weights)."""
    check_inputs(weights, inputs, muon=muon)
    if inputs.momentum is not None:
        raise ValueError("momentum is not defined for the bidirectional schedule: pass None")
    if not 0 <= update_len <= inputs.length:
        raise ValueError(f"update_len must be in [0, L={inputs.length}], got {update_len}")
    if chunk_size is None:
        chunk_size = max(update_len, 1)
    check_chunk_size(chunk_size)
    state = FastWeightState.initial(*weights)
    for chunk in inputs.split(chunk_spans(update_len, chunk_size)):
        state = update_step(state, chunk, muon=muon)
    return apply_weights(*state.weights, inputs.q), state.weights


def run_interleaved(
    weights: FastWeights,
    inputs: FastWeightInputs,
    *,
    chunk_size: int,
    muon: str | None = None,
    state: FastWeightState | None = None,
) -> tuple[Tensor, FastWeightState]:
    """`interleaved_lact` on an inputs record. Returns (o [B, L, d], the state after the last clean segment)."""
    check_inputs(weights, inputs, muon=muon)
    check_chunk_size(chunk_size)
    length = inputs.length
    if length % chunk_size:
        raise ValueError(f"interleaved_lact: L={length} must be a multiple of chunk_size={chunk_size}")
    if state is None:
        state = FastWeightState.initial(*weights)
    # clean_i and noisy_{i+1} are adjacent and read the same weights: one read per pair halves the small
    # kernels of a sequence of short segments. Reads: noisy_0, then pairs of segments from clean_0 on.
    reads = [(0, chunk_size)] + [
        (chunk_size + s, chunk_size + e) for s, e in chunk_spans(length - chunk_size, 2 * chunk_size)
    ]
    queries = torch.split(inputs.q, [end - start for start, end in reads], dim=1)
    cleans = inputs.split(chunk_spans(length, chunk_size))[1::2]
    outputs = [apply_weights(*state.weights, queries[0])]
    for clean, query in zip(cleans, queries[1:]):  # write clean_i into memory, then read with the new weights
        state = update_step(state, clean, muon=muon)
        outputs.append(apply_weights(*state.weights, query))
    return torch.cat(outputs, dim=1), state


# The public API: positional tensors and keyword options, as in the published operator. Each packs its
# tensors into one FastWeightInputs record and runs the record-based schedule above.


def causal_lact(
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr_gate: Tensor,
    lr_up: Tensor,
    lr_down: Tensor,
    *,
    chunk_size: int,
    momentum: Tensor | None = None,
    muon: str | None = None,
    prenorm: bool = False,
) -> Tensor:
    """Apply-then-update over chunks of `chunk_size` tokens (language model, docs/architecture.md, Schedules).

    o[c] = f_{W_c}(q[c]), then W_{c+1} = update(W_c; k[c], v[c]). Token t never sees memory written by its own
    or later chunks; the last chunk (which may be partial) is apply-only. `prenorm`: see `update_step`.
    Returns o [B, L, d].
    """
    inputs = FastWeightInputs(q, k, v, lr_gate, lr_up, lr_down, momentum)
    return run_causal((w_gate, w_up, w_down), inputs, chunk_size=chunk_size, muon=muon, prenorm=prenorm)


def bidirectional_lact(
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr_gate: Tensor,
    lr_up: Tensor,
    lr_down: Tensor,
    *,
    update_len: int,
    chunk_size: int | None = None,
    muon: str | None = None,
) -> tuple[Tensor, FastWeights]:
    """Update-then-apply (novel view synthesis, docs/architecture.md, Schedules).

    Updates on tokens [0, update_len) (in chunks of `chunk_size`, all at once when None), then applies the
    updated weights to all L tokens. Returns (o [B, L, d], updated (w_gate, w_up, w_down)); applying those
    weights later to other queries with `swiglu_apply` gives the same outputs (reconstruct once, render many).
    """
    inputs = FastWeightInputs(q, k, v, lr_gate, lr_up, lr_down)
    return run_bidirectional(
        (w_gate, w_up, w_down), inputs, update_len=update_len, chunk_size=chunk_size, muon=muon
    )


def interleaved_lact(
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr_gate: Tensor,
    lr_up: Tensor,
    lr_down: Tensor,
    *,
    chunk_size: int,
    momentum: Tensor | None = None,
    muon: str | None = None,
    state: FastWeightState | None = None,
) -> tuple[Tensor, FastWeightState]:
    """The autoregressive-video schedule (docs/architecture.md, Schedules) over [noisy_0, clean_0, noisy_1, clean_1, ...].

    The sequence is cut into segments of `chunk_size` tokens, alternately noisy (even segments) and clean (odd
    segments); L must be a multiple of chunk_size and may end on either kind. W_0 is applied to noisy_0; then
    for every clean_i: update on clean_i, apply the new weights to clean_i and noisy_{i+1}. Noisy tokens never
    change the weights (their k, v and lr are ignored).

    `state` continues from an earlier call (chunk-by-chunk sampling); when None, the weights passed in are the
    initial ones and their row norms the weight-norm targets. Returns (o [B, L, d], the state after the last
    clean segment), so sampling can run noisy_i alone, then the finished clean_i, then noisy_{i+1}, ...
    """
    inputs = FastWeightInputs(q, k, v, lr_gate, lr_up, lr_down, momentum)
    return run_interleaved((w_gate, w_up, w_down), inputs, chunk_size=chunk_size, muon=muon, state=state)


# ----------------------------------------------------------------------------------------------------------
# Argument checks: every schedule refuses malformed input with the name of the argument and what was expected.


def check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def check_inputs(weights: FastWeights, inputs: FastWeightInputs, *, muon: str | None = None) -> None:
    """Shapes, dtypes and the positivity of the learning rates. The positivity check reads the values, which
    on an accelerator would cost a host sync on every call: there it is skipped (the layer floors its
    rates, see lact/layer.py) unless LACT_CHECK_LR=1 in the environment asks for it."""
    w_gate, w_up, w_down = weights
    q = inputs.q
    if q.dim() != 3:
        raise ValueError(f"q must be [B, L, d], got shape {tuple(q.shape)}")
    batch, length, dim = q.shape
    if w_gate.dim() != 3 or w_gate.shape[0] != batch or w_gate.shape[2] != dim:
        raise ValueError(f"w_gate must be [B={batch}, h, d={dim}], got shape {tuple(w_gate.shape)}")
    hidden = w_gate.shape[1]
    expected = {
        "w_up": (w_up, (batch, hidden, dim)),
        "w_down": (w_down, (batch, dim, hidden)),
        "k": (inputs.k, (batch, length, dim)),
        "v": (inputs.v, (batch, length, dim)),
        "lr_gate": (inputs.lr_gate, (batch, length, 1)),
        "lr_up": (inputs.lr_up, (batch, length, 1)),
        "lr_down": (inputs.lr_down, (batch, length, 1)),
    }
    if inputs.momentum is not None:
        expected["momentum"] = (inputs.momentum, (batch, length, 1))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} (B, ...), got {tuple(tensor.shape)}")
    tensors = {"w_gate": w_gate, "w_up": w_up, "w_down": w_down, "q": q, "k": inputs.k, "v": inputs.v}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
        if tensor.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {tensor.dtype}")
    for name in ("lr_gate", "lr_up", "lr_down"):
        lr = getattr(inputs, name)
        if not lr.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor (float32), got {lr.dtype}")
        if lr.numel() and reads_values_here(lr) and bool((lr <= 0).any()):
            raise ValueError(f"{name} must be positive everywhere (the operator applies no softplus)")
    if muon is not None and muon not in MUON_COEFFICIENTS:
        raise ValueError(f"muon must be None or one of {sorted(MUON_COEFFICIENTS)}, got {muon!r}")


def reads_values_here(t: Tensor) -> bool:
    """Whether a value check on t is free of a host sync: on the CPU (outside compilation) it is; on an
    accelerator only when LACT_CHECK_LR=1 asks for it (debugging)."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get("LACT_CHECK_LR") == "1"
