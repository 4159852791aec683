"""The memory-lean backward of the operator (LeanApply, LeanUpdate in lact/ops.py) against plain autograd."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from lact.ops import (
    MUON_SCHEDULE,
    bidirectional_lact,
    causal_lact,
    interleaved_lact,
    lean_backward_mode,
    newton_schulz,
    newton_schulz_backward,
    set_lean_backward,
)
from tests.lact.test_ops import make_inputs


@contextmanager
def lean(enabled: bool | None):
    before = lean_backward_mode()
    set_lean_backward(enabled)
    try:
        yield
    finally:
        set_lean_backward(before)


SCHEDULES = {
    "causal": lambda xs, muon: causal_lact(*xs[:9], chunk_size=3, momentum=xs[9], muon=muon),
    "causal_no_momentum": lambda xs, muon: causal_lact(*xs[:9], chunk_size=4, muon=muon),
    "bidirectional": lambda xs, muon: bidirectional_lact(*xs[:9], update_len=5, chunk_size=2, muon=muon)[0],
    "interleaved": lambda xs, muon: interleaved_lact(*xs[:9], chunk_size=2, momentum=xs[9], muon=muon)[0],
}


HAND_DERIVED = [True, "keep", "keep_all"]  # the modes that run LeanApply / LeanUpdate


@pytest.mark.parametrize("mode", HAND_DERIVED)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("muon", [None, "fixed", "schedule"])
def test_lean_gradcheck_in_float64(schedule, muon, mode):
    inputs = make_inputs(batch=1, length=8, dim=3, hidden=4, requires_grad=True)
    used = inputs if schedule in ("causal", "interleaved") else inputs[:9]
    with lean(mode):
        assert torch.autograd.gradcheck(
            lambda *xs: SCHEDULES[schedule](list(xs) + [None] * (10 - len(xs)), muon),
            used,
            eps=1e-6,
            atol=1e-5,
            rtol=1e-4,
        )


def gradients(inputs, fn, enabled):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    with lean(enabled):
        out = fn(inputs)
        weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)  # not symmetric in tokens
        (out.float() * weight.float()).sum().backward()
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("mode", HAND_DERIVED)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("muon", [None, "schedule"])
def test_lean_gradients_equal_autograd(schedule, muon, mode):
    """float64: equal to rounding; fp32: close; the momentum input gets a gradient only where it is used."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
        inputs = make_inputs(batch=2, length=12, dim=8, hidden=16, dtype=dtype, seed=3)
        fn = lambda xs: SCHEDULES[schedule](xs, muon)  # noqa: E731
        out_lean, g_lean = gradients(inputs, fn, mode)
        out_ref, g_ref = gradients(inputs, fn, False)
        torch.testing.assert_close(out_lean, out_ref, rtol=0, atol=0)  # same forward arithmetic
        for i, (a, b) in enumerate(zip(g_lean, g_ref)):
            if b is None:
                assert a is None or a.abs().max() == 0, i
                continue
            scale = b.abs().max().clamp_min(1e-12)
            assert ((a - b).abs().max() / scale) < tol, (dtype, i, ((a - b).abs().max() / scale).item())


@pytest.mark.parametrize("mode", HAND_DERIVED)
@pytest.mark.parametrize("muon", [None, "fixed"])
def test_lean_gradients_close_to_autograd_in_bf16(muon, mode):
    *args, mom = make_inputs(batch=4, length=256, dim=32, hidden=64, dtype=torch.float32, seed=1)
    bf = [a.bfloat16() if i < 6 else a for i, a in enumerate(args)] + [mom]
    fn = lambda xs: causal_lact(*xs[:9], chunk_size=64, momentum=xs[9], muon=muon)  # noqa: E731
    _, g_lean = gradients(bf, fn, mode)
    _, g_ref32 = gradients([*args, mom], fn, False)
    _, g_ref = gradients(bf, fn, False)
    for i, (a, b, r) in enumerate(zip(g_lean, g_ref, g_ref32)):
        err_lean = (a.float() - r).norm() / r.norm()
        err_autograd = (b.float() - r).norm() / r.norm()
        # bf16 rounding decides the error of both: the lean one stays within the autograd one's order.
        assert err_lean < max(3 * err_autograd, 2e-2), (i, err_lean.item(), err_autograd.item())


def test_newton_schulz_backward_matches_autograd():
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 7, dtype=torch.float64)
    (newton_schulz(x, MUON_SCHEDULE) * g).sum().backward()
    torch.testing.assert_close(newton_schulz_backward(x.detach(), g, MUON_SCHEDULE), x.grad)
    xt = x.detach().mT.contiguous().requires_grad_()  # the tall orientation
    (newton_schulz(xt, "fixed") * g.mT).sum().backward()
    torch.testing.assert_close(newton_schulz_backward(xt.detach(), g.mT, "fixed"), xt.grad)


def saved_bytes(enabled: bool) -> int:
    """Bytes autograd keeps for the backward of causal_lact at L = 2048, chunk 512, d = h = 32 (views of the
    inputs count at their own size; the same storage counted once)."""
    inputs = make_inputs(batch=2, length=2048, dim=32, hidden=32, dtype=torch.float32, requires_grad=True)
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in {p.untyped_storage().data_ptr() for p in inputs}:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with lean(enabled), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lact(*inputs[:9], chunk_size=512, momentum=inputs[9], muon="schedule")
    return sum(seen.values())


def test_lean_backward_saves_a_fraction_of_autograds_activations():
    lean_bytes, autograd_bytes = saved_bytes(True), saved_bytes(False)
    # autograd keeps ~10 [B, b, h] activations per chunk of b tokens; beyond the caller's own inputs the lean
    # nodes keep [B, h, d] matrices per chunk (fast weights, momentum, update, Muon's iterates), which are
    # small next to them when chunks are long (b = 16 h here; LaCT's chunks are thousands of tokens).
    assert lean_bytes < autograd_bytes / 8, (lean_bytes, autograd_bytes)


def test_keep_modes_save_exactly_the_pre_activations():
    """Mode "keep" adds G, U, P [B, b, h] of every updating chunk to what the lean mode saves, nothing else,
    and stays within half of what autograd saves; "keep_all" adds G, U of every read chunk to that."""
    lean_bytes, keep_bytes, autograd_bytes = saved_bytes(True), saved_bytes("keep"), saved_bytes(False)
    batch, tokens, updated_tokens, hidden = 2, 2048, 2048 - 512, 32  # the last chunk only reads
    assert keep_bytes - lean_bytes == 3 * batch * updated_tokens * hidden * 4
    assert keep_bytes < autograd_bytes / 2, (keep_bytes, autograd_bytes)
    assert saved_bytes("keep_all") - keep_bytes == 2 * batch * tokens * hidden * 4


def update_nodes(muon):
    """The autograd nodes of causal_lact's graph: {class name: [nodes]}."""
    inputs = make_inputs(batch=1, length=8, dim=3, hidden=4, requires_grad=True)
    out = causal_lact(*inputs[:9], chunk_size=4, momentum=inputs[9], muon=muon)
    nodes, stack, seen = {}, [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        nodes.setdefault(type(fn).__name__, []).append(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return nodes


@pytest.mark.parametrize("muon", [None, "fixed"])
def test_modes_choose_the_nodes(muon):
    """auto (None) = "keep": hand-derived reads that recompute, updates that keep their activations; True:
    the same nodes, all recomputing; "keep_all": all keeping; False: no hand-derived node."""
    for mode, apply_keeps, update_keeps in (
        (None, False, True),
        ("keep", False, True),
        (True, False, False),
        ("keep_all", True, True),
    ):
        with lean(mode):
            nodes = update_nodes(muon)
        assert {node.keep for node in nodes["LeanApplyBackward"]} == {apply_keeps}, mode
        assert [node.keep for node in nodes["LeanUpdateBackward"]] == [update_keeps], mode
    with lean(False):
        assert not any(name.startswith("Lean") for name in update_nodes(muon))
    with pytest.raises(ValueError, match="lean backward mode"):
        set_lean_backward("yes")
