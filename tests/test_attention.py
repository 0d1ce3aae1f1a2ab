"""Scaled dot-product attention and MultiHeadAttention, checked three ways.

1. against float64 central differences (``gradcheck``);
2. against the composition of primitive ops (``attention_reference``), forward and grads;
3. on random shapes with hypothesis (B, H, Tq ≤ Tk, d; causal or not; prefixes; masks),
   plus a direct NumPy loop (written here, independent of minipeft) for the forward and
   PyTorch as a peer when it is installed.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from device import BACKENDS, host, on_backend
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import float_arrays, layouts, with_layout

from minipeft import backend
from minipeft.autograd.gradcheck import gradcheck, numerical_grad
from minipeft.autograd.tensor import Tensor, no_grad
from minipeft.nn import attention as attn
from minipeft.nn.attention import (
    MultiHeadAttention,
    attention_reference,
    attention_weights,
    key_padding_to_attn_mask,
    merge_heads,
    scaled_dot_product_attention,
    split_heads,
)


# ---------------------------------------------------------------------------- references
def visible_keys(
    tq: int, tk: int, causal: bool, mask: np.ndarray | None, lead: tuple
) -> np.ndarray:
    """(…, Tq, Tk) booleans: query i sees key j (causal rule j ≤ i + Tk − Tq, written out)."""
    vis = np.ones((*lead, tq, tk), dtype=bool)
    if causal:
        for i in range(tq):
            vis[..., i, i + (tk - tq) + 1 :] = False
    if mask is not None:
        vis &= np.broadcast_to(mask.astype(bool), vis.shape)
    return vis


def loop_attention(q, k, v, visible):
    """O one query at a time over its visible keys; a query with none returns 0."""
    lead = visible.shape[:-2]
    q, k, v = (np.broadcast_to(a, (*lead, *a.shape[-2:])) for a in (q, k, v))
    out = np.zeros((*lead, q.shape[-2], v.shape[-1]))
    for idx in np.ndindex(*lead):
        for i in range(q.shape[-2]):
            cols = np.flatnonzero(visible[idx][i])
            if cols.size == 0:
                continue
            s = np.array([q[idx][i] @ k[idx][j] for j in cols]) / math.sqrt(q.shape[-1])
            e = np.exp(s - s.max())
            out[idx][i] = (e / e.sum()) @ v[idx][cols]
    return out


def fwd_bwd(f, arrays, cotangent, requires=(True, True, True), **kw):
    ts = [Tensor(a, requires_grad=r) for a, r in zip(arrays, requires)]
    o = f(*ts, **kw)
    o.backward(cotangent)
    return o.data, [t.grad for t in ts]


def randn(rng, *shape):
    return rng.standard_normal(shape)


CASES = {
    # name: (B, H, Tq, Tk, d, causal, mask kind)
    "bidirectional": (2, 2, 3, 3, 4, False, None),
    "causal": (2, 2, 4, 4, 3, True, None),
    "causal_prefix": (2, 2, 3, 5, 4, True, None),
    "causal_prefix_padding": (2, 2, 3, 6, 4, True, "padding"),
    "random_mask_empty_row": (2, 2, 3, 5, 3, False, "random"),
    "causal_empty_row": (2, 1, 3, 5, 3, True, "random"),
}


def make_case(name, seed=0):
    b, h, tq, tk, d, causal, kind = CASES[name]
    rng = np.random.default_rng(seed)
    q, k, v = randn(rng, b, h, tq, d), randn(rng, b, h, tk, d), randn(rng, b, h, tk, d)
    mask = None
    if kind == "padding":
        mask = np.ones((b, tk), dtype=bool)
        mask[1, -2:] = False  # the last two keys of sequence 1 are padding
        mask = key_padding_to_attn_mask(mask)
    elif kind == "random":
        mask = rng.random((b, 1, tq, tk)) > 0.3
        mask[0, 0, 1, :] = False  # query 1 of sequence 0 sees nothing
    return (q, k, v), dict(causal=causal, attn_mask=mask), rng.standard_normal((b, h, tq, d))


# ---------------------------------------------------------------------------- 1. forward
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_equals_numpy_loop(name):
    (q, k, v), kw, _ = make_case(name)
    vis = visible_keys(q.shape[-2], k.shape[-2], kw["causal"], kw["attn_mask"], q.shape[:2])
    out = scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), **kw).data
    np.testing.assert_allclose(out, loop_attention(q, k, v, vis), rtol=1e-12, atol=1e-14)


def test_causal_offset_lets_every_query_see_the_prefix():
    rng = np.random.default_rng(1)
    tq, n_prefix, d = 4, 3, 2
    q, k = randn(rng, 1, 1, tq, d), randn(rng, 1, 1, n_prefix + tq, d)
    p = attention_weights(q, k, causal=True)[0, 0]  # (Tq, P + Tq)
    for i in range(tq):
        assert np.all(p[i, : n_prefix + i + 1] > 0), f"query {i} must see prefix and tokens ≤ {i}"
        assert np.all(p[i, n_prefix + i + 1 :] == 0), f"query {i} must not see the future"
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)


def test_large_scores_do_not_overflow():
    rng = np.random.default_rng(2)
    q, k, v = randn(rng, 1, 2, 3, 4) * 300, randn(rng, 1, 2, 3, 4) * 300, randn(rng, 1, 2, 3, 4)
    for dtype in (np.float32, np.float64):
        out = scaled_dot_product_attention(
            Tensor(q.astype(dtype)), Tensor(k.astype(dtype)), Tensor(v.astype(dtype)), causal=False
        ).data
        assert out.dtype == dtype and np.all(np.isfinite(out))
        vis = np.ones((1, 2, 3, 3), dtype=bool)
        np.testing.assert_allclose(out, loop_attention(q, k, v, vis), rtol=1e-4, atol=1e-4)


def test_fully_masked_row_is_zero_with_zero_gradients_and_no_warning():
    (q, k, v), kw, g = make_case("random_mask_empty_row")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "invalid value" from 0/0 or −∞ − (−∞)
        out, (dq, dk, dv) = fwd_bwd(scaled_dot_product_attention, (q, k, v), g, **kw)
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(x)) for x in (dq, dk, dv))
    np.testing.assert_array_equal(out[0, :, 1], 0.0)
    np.testing.assert_array_equal(dq[0, :, 1], 0.0)
    # the empty row contributes nothing to dK, dV: zero its cotangent and compare
    g0 = g.copy()
    g0[0, :, 1] = 0.0
    _, (_, dk0, dv0) = fwd_bwd(scaled_dot_product_attention, (q, k, v), g0, **kw)
    np.testing.assert_array_equal(dk, dk0)
    np.testing.assert_array_equal(dv, dv0)


def test_all_keys_masked_everywhere_gives_zeros():
    rng = np.random.default_rng(3)
    q, k, v = randn(rng, 1, 1, 2, 3), randn(rng, 1, 1, 2, 3), randn(rng, 1, 1, 2, 3)
    out, grads = fwd_bwd(
        scaled_dot_product_attention, (q, k, v), np.ones((1, 1, 2, 3)), causal=False,
        attn_mask=np.zeros((2, 2), dtype=bool),
    )  # fmt: skip
    np.testing.assert_array_equal(out, 0.0)
    for gr in grads:
        np.testing.assert_array_equal(gr, 0.0)


# ---------------------------------------------------------------------------- 2. gradients
@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck_float64(name):
    (q, k, v), kw, _ = make_case(name)
    res = gradcheck(lambda a, b, c: scaled_dot_product_attention(a, b, c, **kw), [q, k, v])
    assert res.max_rel_error < 1e-6, res


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_equals_composition_forward_and_grads(name):
    (q, k, v), kw, g = make_case(name)
    out_f, grads_f = fwd_bwd(scaled_dot_product_attention, (q, k, v), g, **kw)
    out_r, grads_r = fwd_bwd(attention_reference, (q, k, v), g, **kw)
    np.testing.assert_allclose(out_f, out_r, rtol=1e-12, atol=1e-14)
    for a, b, n in zip(grads_f, grads_r, "qkv"):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=f"d{n}")


def test_float32_matches_composition():
    (q, k, v), kw, g = make_case("causal_prefix_padding")
    arrays = [a.astype(np.float32) for a in (q, k, v)]
    out_f, grads_f = fwd_bwd(scaled_dot_product_attention, arrays, g.astype(np.float32), **kw)
    out_r, grads_r = fwd_bwd(attention_reference, arrays, g.astype(np.float32), **kw)
    assert out_f.dtype == np.float32 and all(x.dtype == np.float32 for x in grads_f)
    np.testing.assert_allclose(out_f, out_r, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_f, grads_r):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_shared_keys_values_broadcast_over_batch():
    """k, v of shape (1, H, Tk, d) serve the whole batch; their gradient sums over it."""
    rng = np.random.default_rng(4)
    q, k, v = randn(rng, 3, 2, 2, 3), randn(rng, 1, 2, 4, 3), randn(rng, 1, 2, 4, 3)
    res = gradcheck(lambda a, b, c: scaled_dot_product_attention(a, b, c, causal=True), [q, k, v])
    assert res.max_rel_error < 1e-6, res
    g = rng.standard_normal((3, 2, 2, 3))
    _, grads_f = fwd_bwd(scaled_dot_product_attention, (q, k, v), g, causal=True)
    _, grads_r = fwd_bwd(attention_reference, (q, k, v), g, causal=True)
    for a, b in zip(grads_f, grads_r):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("p", [0.3, 1.0])
def test_dropout_matches_composition_with_the_same_draw(p):
    (q, k, v), kw, g = make_case("causal_prefix_padding")

    def seeded(f):
        def run(*ts, **kw):
            backend.seed(123)
            return f(*ts, dropout_p=p, training=True, **kw)

        return run

    out_f, grads_f = fwd_bwd(seeded(scaled_dot_product_attention), (q, k, v), g, **kw)
    out_r, grads_r = fwd_bwd(seeded(attention_reference), (q, k, v), g, **kw)
    np.testing.assert_allclose(out_f, out_r, rtol=1e-12, atol=1e-14)
    for a, b in zip(grads_f, grads_r):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    if p == 1.0:
        np.testing.assert_array_equal(out_f, 0.0)
    else:  # the mask is fixed by the seed, so central differences apply
        run = seeded(scaled_dot_product_attention)
        res = gradcheck(lambda a, b, c: run(a, b, c, **kw), [q, k, v])
        assert res.max_rel_error < 1e-6, res


def test_dropout_is_off_outside_training():
    (q, k, v), kw, _ = make_case("causal")
    plain = scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), **kw).data
    evald = scaled_dot_product_attention(
        Tensor(q), Tensor(k), Tensor(v), dropout_p=0.5, training=False, **kw
    ).data
    np.testing.assert_array_equal(plain, evald)


# ---------------------------------------------------------------------------- frozen inputs
def _forbid(monkeypatch, *names):
    for n in names:

        def boom(*a, _n=n, **k):
            raise AssertionError(f"{_n} ran although no input needed it")

        monkeypatch.setattr(attn, n, boom)


@pytest.mark.parametrize(
    ("requires", "forbidden"),
    [
        ((False, False, True), ("attention_grad_p", "softmax_grad_s", "attention_grad_q",
                                "attention_grad_k")),
        ((True, False, False), ("attention_grad_v", "attention_grad_k")),
        ((False, True, False), ("attention_grad_v", "attention_grad_q")),
    ],
)  # fmt: skip
def test_backward_skips_inputs_that_need_no_gradient(monkeypatch, requires, forbidden):
    (q, k, v), kw, g = make_case("causal_prefix_padding")
    _, grads_all = fwd_bwd(scaled_dot_product_attention, (q, k, v), g, **kw)
    _forbid(monkeypatch, *forbidden)
    ts = [Tensor(a, requires_grad=r) for a, r in zip((q, k, v), requires)]
    out = scaled_dot_product_attention(*ts, **kw)
    out.backward(g)
    for t, r, ref in zip(ts, requires, grads_all):
        if r:
            np.testing.assert_allclose(t.grad, ref, rtol=1e-12, atol=1e-14)
        else:
            assert t.grad is None


def test_no_graph_without_gradients():
    (q, k, v), kw, _ = make_case("causal")
    out = scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), **kw)
    assert not out.requires_grad and out.is_leaf
    with no_grad():
        out = scaled_dot_product_attention(Tensor(q, requires_grad=True), Tensor(k), Tensor(v))
    assert not out.requires_grad and out.is_leaf


# ---------------------------------------------------------------------------- 3. hypothesis
@st.composite
def attention_problems(draw):
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    tq = draw(st.integers(1, 4))
    tk = tq + draw(st.integers(0, 3))  # Tk − Tq prefix positions
    d, dv = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    causal = draw(st.booleans())
    q = with_layout(draw(float_arrays((b, h, tq, d))), draw(layouts()))
    k = with_layout(draw(float_arrays((b, h, tk, d))), draw(layouts()))
    v = with_layout(draw(float_arrays((b, h, tk, dv))), draw(layouts()))
    kind = draw(st.sampled_from(["none", "padding", "full"]))
    mask = None
    if kind == "padding":
        bits = draw(st.lists(st.booleans(), min_size=b * tk, max_size=b * tk))
        mask = key_padding_to_attn_mask(np.array(bits).reshape(b, tk))  # (B, 1, 1, Tk)
    elif kind == "full":
        bits = draw(st.lists(st.booleans(), min_size=b * h * tq * tk, max_size=b * h * tq * tk))
        mask = np.array(bits).reshape(b, h, tq, tk)
    cot = draw(float_arrays((b, h, tq, dv)))
    return (q, k, v), dict(causal=causal, attn_mask=mask), cot


@given(attention_problems())
def test_hypothesis_fused_vs_composition_vs_loop(problem):
    (q, k, v), kw, g = problem
    vis = visible_keys(q.shape[-2], k.shape[-2], kw["causal"], kw["attn_mask"], q.shape[:2])
    out_f, grads_f = fwd_bwd(scaled_dot_product_attention, (q, k, v), g, **kw)
    out_r, grads_r = fwd_bwd(attention_reference, (q, k, v), g, **kw)
    np.testing.assert_allclose(out_f, loop_attention(q, k, v, vis), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out_f, out_r, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_f, grads_r):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


@settings(max_examples=25)
@given(attention_problems())
def test_hypothesis_central_differences(problem):
    """Every gradient entry against float64 central differences of L = Σ dO ⊙ O.

    Compared with a tolerance relative to the largest entry (an entry that is itself
    ~1e-6 carries the same absolute difference error, ~1e-10, as any other).
    """
    (q, k, v), kw, g = problem
    _, grads = fwd_bwd(scaled_dot_product_attention, (q, k, v), g, **kw)

    def loss(*ts):
        return (scaled_dot_product_attention(*ts, **kw) * Tensor(g)).sum()

    for i, analytic in enumerate(grads):
        fd = numerical_grad(loss, [q, k, v], i)
        scale = max(1.0, float(np.abs(fd).max()))
        np.testing.assert_allclose(analytic, fd, rtol=0, atol=1e-7 * scale, err_msg="dq dk dv"[i])


# ---------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_naming_the_argument():
    q = Tensor(np.zeros((1, 1, 3, 4)))
    k = Tensor(np.zeros((1, 1, 5, 4)))
    with pytest.raises(ValueError, match="q: expected shape"):
        scaled_dot_product_attention(Tensor(np.zeros((3, 4))), k, k)
    with pytest.raises(ValueError, match="k: expected head size"):
        scaled_dot_product_attention(q, Tensor(np.zeros((1, 1, 5, 3))), k)
    with pytest.raises(ValueError, match="v: expected Tk=5"):
        scaled_dot_product_attention(q, k, Tensor(np.zeros((1, 1, 4, 4))))
    with pytest.raises(ValueError, match="causal"):
        scaled_dot_product_attention(k, q, q, causal=True)  # Tq=5 > Tk=3
    with pytest.raises(TypeError, match="attn_mask"):
        scaled_dot_product_attention(q, k, k, attn_mask=np.zeros((3, 5)))
    with pytest.raises(ValueError, match="attn_mask"):
        scaled_dot_product_attention(q, k, k, attn_mask=np.full((3, 5), 2))
    with pytest.raises(ValueError, match="attn_mask"):
        scaled_dot_product_attention(q, k, k, attn_mask=np.ones((3, 4), dtype=bool))
    with pytest.raises(ValueError, match="attn_mask"):
        scaled_dot_product_attention(q, k, k, attn_mask=np.ones((2, 1, 1, 3, 5), dtype=bool))
    with pytest.raises(ValueError, match="dropout_p"):
        scaled_dot_product_attention(q, k, k, dropout_p=1.5, training=True)
    with pytest.raises(TypeError, match="dtypes differ"):
        scaled_dot_product_attention(q, Tensor(np.zeros((1, 1, 5, 4), np.float32)), k)


def test_integer_01_mask_equals_boolean_mask():
    (q, k, v), _, _ = make_case("causal_prefix")
    m = np.array([[1, 1, 0, 1, 1]])
    a = scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), attn_mask=m).data
    b = scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), attn_mask=m.astype(bool)).data
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- multi-head
def test_split_merge_heads_round_trip_and_layout():
    x = np.arange(2 * 3 * 6, dtype=np.float64).reshape(2, 3, 6)
    s = split_heads(Tensor(x), 3)
    assert s.shape == (2, 3, 3, 2)
    np.testing.assert_array_equal(s.data[1, 2, 0], x[1, 0, 4:6])  # head 2 = features 4, 5
    np.testing.assert_array_equal(merge_heads(s).data, x)
    with pytest.raises(ValueError, match="n_heads"):
        split_heads(Tensor(x), 4)


def _numpy_mha(m: MultiHeadAttention, x, mask, pk, pv, causal):
    """Hand-written multi-head attention: projections, heads, prefix, mask, output."""
    sd = {n: p for n, p in m.state_dict().items()}
    h, d = m.n_heads, m.head_dim
    b, t, c = x.shape

    def proj(name):
        y = x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]  # (B, T, C)
        return y.reshape(b, t, h, d).transpose(0, 2, 1, 3)  # (B, H, T, d)

    q, k, v = proj("query"), proj("key"), proj("value")
    n_prefix = 0 if pk is None else pk.shape[2]
    if pk is not None:
        k = np.concatenate([np.broadcast_to(pk, (b, *pk.shape[1:])), k], axis=2)
        v = np.concatenate([np.broadcast_to(pv, (b, *pv.shape[1:])), v], axis=2)
    key_mask = None
    if mask is not None:
        key_mask = np.concatenate([np.ones((b, n_prefix), bool), mask.astype(bool)], 1)
        key_mask = key_mask[:, None, None, :]
    vis = visible_keys(t, n_prefix + t, causal, key_mask, (b, h))
    o = loop_attention(q, k, v, vis).transpose(0, 2, 1, 3).reshape(b, t, c)
    return o @ sd["dense.weight"].T + sd["dense.bias"]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("prefix_batch", [None, 1, 2])
def test_multihead_equals_hand_written(causal, prefix_batch):
    with backend.dtype_policy("float64"):
        backend.seed(0)
        m = MultiHeadAttention(6, 2, causal=causal)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 6))
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    pk = pv = None
    if prefix_batch:
        pk, pv = randn(rng, prefix_batch, 2, 3, 3), randn(rng, prefix_batch, 2, 3, 3)
    out = m(Tensor(x), mask, prefix_k=pk, prefix_v=pv).data
    np.testing.assert_allclose(out, _numpy_mha(m, x, mask, pk, pv, causal), rtol=1e-10, atol=1e-12)


def test_multihead_gradcheck_input_and_shared_prefix():
    with backend.dtype_policy("float64"):
        backend.seed(1)
        m = MultiHeadAttention(4, 2, causal=True)
    rng = np.random.default_rng(6)
    x, pk, pv = randn(rng, 2, 3, 4), randn(rng, 1, 2, 2, 2), randn(rng, 1, 2, 2, 2)
    mask = np.array([[1, 1, 1], [1, 1, 0]])

    def f(xt, pkt, pvt):
        return m(xt, mask, prefix_k=pkt, prefix_v=pvt)

    res = gradcheck(f, [x, pk, pv])
    assert res.max_rel_error < 1e-6, res
    # a (1, H, P, d) prefix gets the sum of the gradients of its per-sequence copies
    g = rng.standard_normal((2, 3, 4))
    pkt, pvt = Tensor(pk, requires_grad=True), Tensor(pv, requires_grad=True)
    m(Tensor(x), mask, prefix_k=pkt, prefix_v=pvt).backward(g)
    pk2 = Tensor(np.repeat(pk, 2, axis=0), requires_grad=True)
    pv2 = Tensor(np.repeat(pv, 2, axis=0), requires_grad=True)
    m.zero_grad()
    m(Tensor(x), mask, prefix_k=pk2, prefix_v=pv2).backward(g)
    np.testing.assert_allclose(pkt.grad[0], pk2.grad.sum(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(pvt.grad[0], pv2.grad.sum(0), rtol=1e-12, atol=1e-14)


def test_multihead_names_and_options():
    m = MultiHeadAttention(8, 2)
    names = set(m.state_dict())
    assert names == {
        f"{n}.{p}" for n in ("query", "key", "value", "dense") for p in ("weight", "bias")
    }
    bare = MultiHeadAttention(8, 2, output_projection=False, bias=False)
    assert set(bare.state_dict()) == {"query.weight", "key.weight", "value.weight"}
    assert bare(Tensor(np.zeros((1, 3, 8), np.float32))).shape == (1, 3, 8)
    with pytest.raises(ValueError, match="d_model"):
        MultiHeadAttention(7, 2)
    with pytest.raises(ValueError, match="x: expected shape"):
        m(Tensor(np.zeros((1, 3, 4), np.float32)))
    with pytest.raises(ValueError, match="prefix_k, prefix_v"):
        m(Tensor(np.zeros((1, 3, 8), np.float32)), prefix_k=np.zeros((1, 2, 1, 4), np.float32))
    with pytest.raises(ValueError, match="prefix_k: expected shape"):
        z = np.zeros((1, 3, 1, 4), np.float32)
        m(Tensor(np.zeros((1, 3, 8), np.float32)), prefix_k=z, prefix_v=z)
    with pytest.raises(ValueError, match="attention_mask"):
        m(Tensor(np.zeros((1, 3, 8), np.float32)), np.ones((1, 5), bool))


def test_multihead_mask_with_prefix_may_include_prefix_positions():
    with backend.dtype_policy("float64"):
        backend.seed(2)
        m = MultiHeadAttention(4, 2)
    rng = np.random.default_rng(7)
    x, pk, pv = randn(rng, 1, 3, 4), randn(rng, 1, 2, 2, 2), randn(rng, 1, 2, 2, 2)
    short = m(Tensor(x), np.array([[1, 1, 0]]), prefix_k=pk, prefix_v=pv).data
    full = m(Tensor(x), np.array([[1, 1, 1, 1, 0]]), prefix_k=pk, prefix_v=pv).data
    np.testing.assert_array_equal(short, full)


# ---------------------------------------------------------------------------- peers
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_pytorch(name):
    torch = pytest.importorskip("torch", reason="PyTorch is the peer for attention")
    F = torch.nn.functional
    (q, k, v), kw, g = make_case(name)
    # torch's is_causal aligns to the top-left corner when Tq < Tk; our rule (bottom-right,
    # prefix visible) goes in as an explicit boolean mask, True = may attend as in torch
    vis = visible_keys(q.shape[-2], k.shape[-2], kw["causal"], kw["attn_mask"], q.shape[:2])
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    to = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.from_numpy(vis))
    to.backward(torch.from_numpy(g))
    out, grads = fwd_bwd(scaled_dot_product_attention, (q, k, v), g, **kw)
    np.testing.assert_allclose(out, to.detach().numpy(), rtol=1e-10, atol=1e-12)
    for a, t in zip(grads, (tq, tk, tv)):
        np.testing.assert_allclose(a, t.grad.numpy(), rtol=1e-9, atol=1e-11)


def test_pytorch_is_causal_when_square():
    torch = pytest.importorskip("torch", reason="PyTorch is the peer for attention")
    (q, k, v), _, _ = make_case("causal")
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(a) for a in (q, k, v)), is_causal=True
    )
    out = scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), causal=True).data
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("where", [b for b in BACKENDS if b != "numpy"])
def test_device_matches_numpy(where):
    """The fused attention with a prefix, padding and a causal mask on the device (the strict
    CuPy stand-in here, the real CuPy on a GPU) equals NumPy, gradients included."""
    (q, k, v), kw, g = make_case("causal_prefix_padding")
    out_n, grads_n = fwd_bwd(scaled_dot_product_attention, (q, k, v), g, **kw)
    with on_backend(where) as xp:
        arrays = [xp.asarray(a) for a in (q, k, v)]
        kw_d = {k_: xp.asarray(v_) if isinstance(v_, np.ndarray) else v_ for k_, v_ in kw.items()}
        out_c, grads_c = fwd_bwd(scaled_dot_product_attention, arrays, xp.asarray(g), **kw_d)
        assert all(backend.placement(a) == "cupy" for a in (out_c, *grads_c))
        np.testing.assert_allclose(host(out_c), out_n, rtol=1e-10, atol=1e-12)
        for a, b in zip(grads_c, grads_n):
            np.testing.assert_allclose(host(a), b, rtol=1e-10, atol=1e-12)
