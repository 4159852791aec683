"""The LaCT operator against the math of docs/architecture.md: closed form, Muon, weight norm, the three schedules."""

from __future__ import annotations

import pytest
import torch

from lact.ops import (
    MUON_FIXED,
    MUON_SCHEDULE,
    bidirectional_lact,
    causal_lact,
    interleaved_lact,
    newton_schulz,
    renormalize_rows,
    row_norms,
    swiglu_apply,
    swiglu_update,
)


def make_inputs(batch=3, length=20, dim=8, hidden=12, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    w_gate = randn(batch, hidden, dim, scale=dim**-0.5)
    w_up = randn(batch, hidden, dim, scale=dim**-0.5)
    w_down = randn(batch, dim, hidden, scale=hidden**-0.5)
    q = torch.nn.functional.normalize(randn(batch, length, dim), dim=-1)
    k = torch.nn.functional.normalize(randn(batch, length, dim), dim=-1)
    v = randn(batch, length, dim)
    lrs = [
        (torch.rand(batch, length, 1, generator=g, dtype=torch.float64) * 0.1 + 0.01).float()
        for _ in range(3)
    ]
    if dtype == torch.float64:
        lrs = [lr.double() for lr in lrs]
    momentum = torch.rand(batch, length, 1, generator=g, dtype=torch.float64).to(lrs[0].dtype) * 0.9 + 0.05
    tensors = [w_gate, w_up, w_down, q, k, v, *lrs, momentum]
    if requires_grad:
        tensors = [t.requires_grad_() for t in tensors]
    return tensors


# ----------------------------------------------------------------------------------------------------------
# A literal reference: the inner gradient by autograd of the inner loss, the rest written out step by step.


def inner_loss(w_gate, w_up, w_down, k, v, lr_gate, lr_up, lr_down):
    """sum over the three matrices of -sum_i lr_i <f_W(k_i), v_i>, each matrix seeing its own lr."""
    total = 0.0
    for which, lr in (("gate", lr_gate), ("up", lr_up), ("down", lr_down)):
        # Each matrix's gradient must carry only its own rate: detach the other two.
        wg = w_gate if which == "gate" else w_gate.detach()
        wu = w_up if which == "up" else w_up.detach()
        wd = w_down if which == "down" else w_down.detach()
        out = swiglu_apply(wg, wu, wd, k)
        total = total - (lr * (out * v).sum(-1, keepdim=True)).sum()
    return total


def reference_ns(x, coefficients):
    y = x.double()
    tall = y.shape[-2] > y.shape[-1]
    if tall:
        y = y.mT
    y = y / (y.flatten(-2).norm(dim=-1)[..., None, None] + 1e-7)
    for a, b, c in coefficients:
        gram = y @ y.mT
        y = a * y + (b * gram + c * gram @ gram) @ y
    return y.mT if tall else y


def reference_causal(w_gate, w_up, w_down, q, k, v, lr_gate, lr_up, lr_down, chunk, momentum=None, muon=None):
    weights = [w.detach().clone() for w in (w_gate, w_up, w_down)]
    norms = [w.norm(dim=-1, keepdim=True) for w in weights]
    buffers = None
    outs = []
    length = q.shape[1]
    for s in range(0, length, chunk):
        e = min(s + chunk, length)
        outs.append(swiglu_apply(*weights, q[:, s:e]))
        if e == length:
            break
        params = [w.clone().requires_grad_() for w in weights]
        loss = inner_loss(*params, k[:, s:e], v[:, s:e], lr_gate[:, s:e], lr_up[:, s:e], lr_down[:, s:e])
        grads = torch.autograd.grad(loss, params)
        delta = [-gr for gr in grads]
        if momentum is not None:
            beta = momentum[:, s:e].mean(dim=1, keepdim=True)
            buffers = delta if buffers is None else [d + beta * m for d, m in zip(delta, buffers)]
            delta = buffers
        if muon is not None:
            delta = [reference_ns(d, muon).to(d.dtype) for d in delta]
        weights = [w + d for w, d in zip(weights, delta)]
        weights = [w * n / (w.norm(dim=-1, keepdim=True) + 1e-5) for w, n in zip(weights, norms)]
    return torch.cat(outs, dim=1)


# ----------------------------------------------------------------------------------------------------------


def test_closed_form_update_is_minus_autograd_gradient():
    w_gate, w_up, w_down, _, k, v, lr_g, lr_u, lr_d, _ = make_inputs()
    params = [w.clone().requires_grad_() for w in (w_gate, w_up, w_down)]
    grads = torch.autograd.grad(inner_loss(*params, k, v, lr_g, lr_u, lr_d), params)
    deltas = swiglu_update(w_gate, w_up, w_down, k, v, lr_g, lr_u, lr_d)
    for name, delta, grad in zip(("gate", "up", "down"), deltas, grads):
        assert delta.shape == grad.shape, name
        torch.testing.assert_close(delta, -grad, rtol=1e-10, atol=1e-12, msg=f"dW_{name}")


@pytest.mark.parametrize("coefficients", [MUON_FIXED, MUON_SCHEDULE], ids=["fixed", "schedule"])
@pytest.mark.parametrize("shape", [(4, 6, 10), (4, 10, 6), (2, 8, 8)])
def test_newton_schulz_matches_float64_polynomial(coefficients, shape):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        newton_schulz(x, coefficients), reference_ns(x, coefficients), rtol=1e-10, atol=1e-12
    )
    # fp32 input is computed in fp32 on CPU and stays close to the float64 polynomial.
    torch.testing.assert_close(
        newton_schulz(x.float(), coefficients).double(), reference_ns(x, coefficients), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(("name", "band"), [("fixed", (0.68, 1.2)), ("schedule", (0.85, 1.15))])
def test_newton_schulz_orthogonalises_well_conditioned_input(name, band):
    # Singular values spread over [0.1, 1] (condition number 10): after 5 iterations every one lies in `band`.
    g = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64, generator=g))
    w, _ = torch.linalg.qr(torch.randn(32, 16, dtype=torch.float64, generator=g))
    x = u @ torch.diag(torch.linspace(0.1, 1.0, 16, dtype=torch.float64)) @ w.mT  # [16, 32]
    sv = torch.linalg.svdvals(newton_schulz(x, name))
    assert sv.min() > band[0] and sv.max() < band[1], sv
    # The input's singular values spanned a 10x range; the output's are within a small factor of one another.
    assert sv.max() / sv.min() < band[1] / band[0]


def test_renormalize_restores_initial_row_norms():
    w0 = torch.randn(2, 5, 7, dtype=torch.float64)
    w = w0 + 3 * torch.randn_like(w0)
    out = renormalize_rows(w, row_norms(w0))
    torch.testing.assert_close(row_norms(out), row_norms(w0) * row_norms(w) / (row_norms(w) + 1e-5))
    torch.testing.assert_close(row_norms(out), row_norms(w0), rtol=1e-4, atol=0)
    # Direction of every row is unchanged.
    torch.testing.assert_close(
        torch.nn.functional.normalize(out, dim=-1), torch.nn.functional.normalize(w, dim=-1)
    )


@pytest.mark.parametrize("use_momentum", [False, True])
@pytest.mark.parametrize("muon", [None, "fixed", "schedule"])
@pytest.mark.parametrize(("length", "chunk"), [(20, 6), (24, 8), (5, 8)])
def test_causal_matches_literal_reference(use_momentum, muon, length, chunk):
    *args, momentum = make_inputs(length=length)
    momentum = momentum if use_momentum else None
    out = causal_lact(*args, chunk_size=chunk, momentum=momentum, muon=muon)
    coeffs = None if muon is None else {"fixed": MUON_FIXED, "schedule": MUON_SCHEDULE}[muon]
    ref = reference_causal(*args, chunk, momentum=momentum, muon=coeffs)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)


def test_causal_first_chunk_and_short_sequences_are_pure_apply():
    w_gate, w_up, w_down, q, k, v, *lrs, mom = make_inputs(length=20)
    out = causal_lact(w_gate, w_up, w_down, q, k, v, *lrs, chunk_size=8, momentum=mom, muon="schedule")
    torch.testing.assert_close(out[:, :8], swiglu_apply(w_gate, w_up, w_down, q[:, :8]), rtol=0, atol=0)
    # L <= chunk_size: no update happens at all.
    short = causal_lact(w_gate, w_up, w_down, q, k, v, *lrs, chunk_size=20)
    torch.testing.assert_close(short, swiglu_apply(w_gate, w_up, w_down, q), rtol=0, atol=0)
    # The weights did change after the first chunk (the test above would pass vacuously otherwise).
    assert not torch.allclose(out[:, 8:], swiglu_apply(w_gate, w_up, w_down, q[:, 8:]))


@pytest.mark.parametrize("which", ["q", "k", "v", "lr_gate", "lr_up", "lr_down", "momentum"])
def test_causal_is_causal_in_chunks(which):
    names = ["w_gate", "w_up", "w_down", "q", "k", "v", "lr_gate", "lr_up", "lr_down", "momentum"]
    inputs = dict(zip(names, make_inputs(length=26, dtype=torch.float32)))
    chunk, c = 6, 2  # chunks 0..2 are [0, 18); the partial last chunk is [24, 26)
    base = causal_lact(
        *(inputs[n] for n in names[:-1]), chunk_size=chunk, momentum=inputs["momentum"], muon="fixed"
    )
    changed = dict(inputs)
    t = inputs[which].clone()
    t[:, (c + 1) * chunk :] = t[:, (c + 1) * chunk :] * 1.7 + 0.05  # stays positive for lr and momentum
    changed[which] = t
    out = causal_lact(
        *(changed[n] for n in names[:-1]), chunk_size=chunk, momentum=changed["momentum"], muon="fixed"
    )
    assert torch.equal(out[:, : (c + 1) * chunk], base[:, : (c + 1) * chunk])
    if which == "q":  # q of later chunks changes only their own outputs
        assert not torch.equal(out[:, (c + 1) * chunk :], base[:, (c + 1) * chunk :])
    # Changing chunk c itself must reach chunk c+1 through the weights (except q and the last chunk).
    if which != "q":
        t2 = inputs[which].clone()
        t2[:, c * chunk : (c + 1) * chunk] *= 1.7
        changed[which] = t2
        out2 = causal_lact(
            *(changed[n] for n in names[:-1]), chunk_size=chunk, momentum=changed["momentum"], muon="fixed"
        )
        assert torch.equal(out2[:, : (c + 1) * chunk], base[:, : (c + 1) * chunk])
        assert not torch.allclose(out2[:, (c + 1) * chunk :], base[:, (c + 1) * chunk :])


def test_bidirectional_is_invariant_to_permuting_update_tokens():
    w_gate, w_up, w_down, q, k, v, lr_g, lr_u, lr_d, _ = make_inputs(length=30)
    update_len = 18
    out, weights = bidirectional_lact(
        w_gate, w_up, w_down, q, k, v, lr_g, lr_u, lr_d, update_len=update_len, muon="schedule"
    )
    perm = torch.cat([torch.randperm(update_len), torch.arange(update_len, 30)])
    out_p, weights_p = bidirectional_lact(
        w_gate,
        w_up,
        w_down,
        q,
        k[:, perm],
        v[:, perm],
        lr_g[:, perm],
        lr_u[:, perm],
        lr_d[:, perm],
        update_len=update_len,
        muon="schedule",
    )
    torch.testing.assert_close(out_p, out, rtol=1e-10, atol=1e-12)
    # Tokens after update_len are only read: changing their k, v, lr changes nothing.
    k2 = k.clone()
    k2[:, update_len:] += 1.0
    out_k, _ = bidirectional_lact(
        w_gate, w_up, w_down, q, k2, v, lr_g, lr_u, lr_d, update_len=update_len, muon="schedule"
    )
    assert torch.equal(out_k, out)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_reconstruct_then_render_equals_one_call(chunk_size):
    w_gate, w_up, w_down, q, k, v, lr_g, lr_u, lr_d, _ = make_inputs(length=30, dtype=torch.float32)
    out, _ = bidirectional_lact(
        w_gate, w_up, w_down, q, k, v, lr_g, lr_u, lr_d, update_len=12, chunk_size=chunk_size, muon="fixed"
    )
    # Reconstruct from the input tokens alone, then render each "view" of 6 query tokens separately.
    _, weights = bidirectional_lact(
        w_gate, w_up, w_down, q[:, :12], k[:, :12], v[:, :12], lr_g[:, :12], lr_u[:, :12], lr_d[:, :12],
        update_len=12, chunk_size=chunk_size, muon="fixed",
    )  # fmt: skip
    rendered = torch.cat([swiglu_apply(*weights, q[:, s : s + 6]) for s in range(0, 30, 6)], dim=1)
    torch.testing.assert_close(rendered, out, rtol=1e-5, atol=1e-6)


def test_interleaved_noisy_tokens_never_change_the_weights():
    chunk, segments = 4, 7  # noisy_0 clean_0 noisy_1 clean_1 noisy_2 clean_2 noisy_3
    w_gate, w_up, w_down, q, k, v, lr_g, lr_u, lr_d, mom = make_inputs(length=chunk * segments)
    out, state = interleaved_lact(
        w_gate, w_up, w_down, q, k, v, lr_g, lr_u, lr_d, chunk_size=chunk, momentum=mom, muon="schedule"
    )
    noisy = torch.zeros(chunk * segments, dtype=torch.bool)
    for s in range(0, segments, 2):
        noisy[s * chunk : (s + 1) * chunk] = True
    k2, v2, lr2, mom2 = k.clone(), v.clone(), lr_g.clone(), mom.clone()
    k2[:, noisy] = torch.randn_like(k2[:, noisy])
    v2[:, noisy] = torch.randn_like(v2[:, noisy])
    lr2[:, noisy] *= 5
    mom2[:, noisy] = 0.01
    out2, state2 = interleaved_lact(
        w_gate, w_up, w_down, q, k2, v2, lr2, lr_u, lr_d, chunk_size=chunk, momentum=mom2, muon="schedule"
    )
    assert torch.equal(out2, out)
    for a, b in zip(state.weights, state2.weights):
        assert torch.equal(a, b)
    # noisy_0 reads W_0; noisy_{i+1} and clean_i read the weights updated on clean_i.
    torch.testing.assert_close(
        out[:, :chunk], swiglu_apply(w_gate, w_up, w_down, q[:, :chunk]), rtol=0, atol=0
    )
    # Chunk-by-chunk sampling (state carried between calls) equals the one-call training schedule.
    sl = lambda t, a, b: t[:, a * chunk : b * chunk]  # noqa: E731
    o0, st = interleaved_lact(
        w_gate,
        w_up,
        w_down,
        *(sl(t, 0, 2) for t in (q, k, v, lr_g, lr_u, lr_d)),
        chunk_size=chunk,
        momentum=sl(mom, 0, 2),
        muon="schedule",
    )
    # Continue with [noisy_1, clean_1] from the carried state; the weights passed in are ignored then.
    o1, _ = interleaved_lact(
        *st.weights,
        *(sl(t, 2, 4) for t in (q, k, v, lr_g, lr_u, lr_d)),
        chunk_size=chunk,
        momentum=sl(mom, 2, 4),
        muon="schedule",
        state=st,
    )
    torch.testing.assert_close(torch.cat([o0, o1], dim=1), out[:, : 4 * chunk], rtol=1e-10, atol=1e-12)


def test_gradcheck_through_two_chunks_with_momentum_and_muon():
    inputs = make_inputs(batch=1, length=6, dim=3, hidden=4, requires_grad=True)

    def fn(*xs):
        return causal_lact(*xs[:9], chunk_size=3, momentum=xs[9], muon="schedule")

    # The output of chunk 1 depends on chunk 0's update, so every input reaches it.
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradients_reach_all_inputs_in_fp32():
    inputs = make_inputs(length=16, dtype=torch.float32, requires_grad=True)
    out = causal_lact(*inputs[:9], chunk_size=4, momentum=inputs[9], muon="fixed")
    out.square().sum().backward()
    for i, t in enumerate(inputs):
        assert t.grad is not None and t.grad.abs().sum() > 0, i


@pytest.mark.parametrize("muon", [None, "fixed", "schedule"])
def test_bf16_close_to_fp32(muon):
    # Chunks of 64 >= h keep every update full-rank. (With chunks shorter than h the update is rank-deficient
    # and Muon's high-gain polynomial blows bf16 rounding noise in its null space up to O(1): about 9% error at
    # chunk 16, h 64. LaCT's chunks are thousands of tokens, far above h.)
    *args, mom = make_inputs(batch=4, length=256, dim=32, hidden=64, dtype=torch.float32)
    ref = causal_lact(*args, chunk_size=64, momentum=mom, muon=muon)
    bf = [a.bfloat16() if i < 6 else a for i, a in enumerate(args)]
    out = causal_lact(*bf, chunk_size=64, momentum=mom, muon=muon)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 2e-2, rel.item()


def test_bad_arguments_raise_value_errors_naming_them():
    w_gate, w_up, w_down, q, k, v, lr_g, lr_u, lr_d, mom = make_inputs(length=10)
    args = [w_gate, w_up, w_down, q, k, v, lr_g, lr_u, lr_d]
    with pytest.raises(ValueError, match="chunk_size"):
        causal_lact(*args, chunk_size=0)
    bad = list(args)
    bad[4] = k[:, :9]
    with pytest.raises(ValueError, match=r"k must have shape \[3, 10, 8\]"):
        causal_lact(*bad, chunk_size=4)
    bad = list(args)
    bad[2] = w_down.mT
    with pytest.raises(ValueError, match="w_down"):
        causal_lact(*bad, chunk_size=4)
    bad = list(args)
    bad[7] = -lr_u
    with pytest.raises(ValueError, match="lr_up must be positive"):
        causal_lact(*bad, chunk_size=4)
    with pytest.raises(ValueError, match="momentum"):
        causal_lact(*args, chunk_size=4, momentum=mom[:, :3])
    with pytest.raises(ValueError, match="muon"):
        causal_lact(*args, chunk_size=4, muon="adam")
    with pytest.raises(ValueError, match="update_len"):
        bidirectional_lact(*args, update_len=11)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        interleaved_lact(*args, chunk_size=4)
    bad = list(args)
    bad[3] = q.float()
    with pytest.raises(ValueError, match="dtype"):
        causal_lact(*bad, chunk_size=4)


# ----------------------------------------------------------------------------------------------------------
# Options of the published models: the normalised update (Muon with zero iterations) and the pre-norm update.


def test_normalize_is_a_unit_frobenius_norm_step():
    w_gate, w_up, w_down, q, k, v, lr_g, lr_u, lr_d, _ = make_inputs(length=9)
    _, weights = bidirectional_lact(
        w_gate, w_up, w_down, q, k, v, lr_g, lr_u, lr_d, update_len=9, muon="normalize"
    )
    params = [w.clone().requires_grad_() for w in (w_gate, w_up, w_down)]
    grads = torch.autograd.grad(inner_loss(*params, k, v, lr_g, lr_u, lr_d), params)
    for name, w, g, got in zip(("gate", "up", "down"), (w_gate, w_up, w_down), grads, weights):
        step = -g / (g.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # each matrix of each batch entry separately
        stepped = w + step
        expected = stepped * w.norm(dim=-1, keepdim=True) / (stepped.norm(dim=-1, keepdim=True) + 1e-5)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=f"W_{name}")
    # Scaling every learning rate by 10 leaves a normalised step unchanged up to the 1e-7 in the denominator;
    # the raw step grows 10x and lands elsewhere.
    scaled_lrs = (lr_g * 10, lr_u * 10, lr_d * 10)
    _, scaled = bidirectional_lact(w_gate, w_up, w_down, q, k, v, *scaled_lrs, update_len=9, muon="normalize")
    _, raw = bidirectional_lact(w_gate, w_up, w_down, q, k, v, lr_g, lr_u, lr_d, update_len=9)
    _, raw_scaled = bidirectional_lact(w_gate, w_up, w_down, q, k, v, *scaled_lrs, update_len=9)
    for a, b, c, d in zip(weights, scaled, raw, raw_scaled):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
        assert (c - d).abs().max() > 100 * (a - b).abs().max()


@pytest.mark.parametrize("use_momentum", [False, True])
def test_causal_normalize_matches_literal_reference(use_momentum):
    *args, momentum = make_inputs(length=17)
    momentum = momentum if use_momentum else None
    out = causal_lact(*args, chunk_size=5, momentum=momentum, muon="normalize")
    ref = reference_causal(*args, 5, momentum=momentum, muon=())
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)


def reference_prenorm_causal(w_gate, w_up, w_down, q, k, v, lr_gate, lr_up, lr_down, chunk, momentum, muon):
    """Pre-norm: the steps add up in U; the weights in use are U with every row rescaled to its initial norm."""
    used = [w.detach().clone() for w in (w_gate, w_up, w_down)]
    norms = [w.norm(dim=-1, keepdim=True) for w in used]
    total = [w.clone() for w in used]
    buffers, outs, length = None, [], q.shape[1]
    for s in range(0, length, chunk):
        e = min(s + chunk, length)
        outs.append(swiglu_apply(*used, q[:, s:e]))
        if e == length:
            break
        params = [w.clone().requires_grad_() for w in used]
        loss = inner_loss(*params, k[:, s:e], v[:, s:e], lr_gate[:, s:e], lr_up[:, s:e], lr_down[:, s:e])
        delta = [-g for g in torch.autograd.grad(loss, params)]
        if momentum is not None:
            beta = momentum[:, s:e].mean(dim=1, keepdim=True)
            buffers = delta if buffers is None else [d + beta * m for d, m in zip(delta, buffers)]
            delta = buffers
        if muon is not None:
            delta = [reference_ns(d, muon).to(d.dtype) for d in delta]
        total = [u + d for u, d in zip(total, delta)]
        used = [u * n / (u.norm(dim=-1, keepdim=True) + 1e-5) for u, n in zip(total, norms)]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("muon", [None, "schedule"])
def test_causal_prenorm_matches_literal_reference(muon):
    *args, momentum = make_inputs(length=23)
    out = causal_lact(*args, chunk_size=5, momentum=momentum, muon=muon, prenorm=True)
    coeffs = None if muon is None else MUON_SCHEDULE
    ref = reference_prenorm_causal(*args, 5, momentum, coeffs)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    # From the third chunk on, pre- and post-norm differ (the first two read the same weights).
    post = causal_lact(*args, chunk_size=5, momentum=momentum, muon=muon)
    torch.testing.assert_close(out[:, :10], post[:, :10], rtol=1e-9, atol=1e-11)
    assert not torch.allclose(out[:, 10:], post[:, 10:], rtol=1e-6, atol=1e-8)
