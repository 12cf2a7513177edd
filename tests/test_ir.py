"""The IR and the reference semantics of its trickier ops, against independent formulas."""
from __future__ import annotations

import numpy as np
import pytest

from fusec.fusion.dtypes import DType, f32_to_bf16_bits, from_storage, round_to
from fusec.fusion.interpreter import Interpreter
from fusec.fusion.ir import Graph
from fusec.fusion.ops import OPS, attention, kv_write, rope


def dense_causal_gqa(q, k, v, n_heads, n_kv, window=None):
    """Plain attention of a whole sequence: the last len(q) queries over all keys."""
    t_new, ctx, hd = q.shape[0], k.shape[0], q.shape[1] // n_heads
    out = np.zeros((t_new, n_heads, hd))
    for h in range(n_heads):
        kh = k.reshape(ctx, n_kv, hd)[:, h // (n_heads // n_kv)]
        vh = v.reshape(ctx, n_kv, hd)[:, h // (n_heads // n_kv)]
        for i in range(t_new):
            pos = ctx - t_new + i
            lo = 0 if window is None else max(0, pos - window + 1)
            s = q.reshape(t_new, n_heads, hd)[i, h] @ kh[lo:pos + 1].T / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ vh[lo:pos + 1]
    return out.reshape(t_new, -1)


@pytest.mark.parametrize("n_heads,n_kv,hd,block,window", [(4, 2, 8, 4, None), (6, 1, 10, 3, None),
                                                          (3, 3, 6, 5, 4)])
def test_paged_attention_matches_dense(rng, n_heads, n_kv, hd, block, window):
    # three sequences: a fresh prefill, a decode after a long context, a chunk in the middle
    ctx_lens, new = [7, 13, 11], [7, 1, 4]
    num_blocks = 16
    cache = np.full((2, num_blocks, block, n_kv, hd), np.nan, np.float32)  # unwritten = NaN
    perm = rng.permutation(num_blocks)
    tables, at = [], 0
    for c in ctx_lens:
        n = -(-c // block)
        tables.append(perm[at:at + n])
        at += n
    ks = [rng.standard_normal((c, n_kv * hd)).astype(np.float32) for c in ctx_lens]
    vs = [rng.standard_normal((c, n_kv * hd)).astype(np.float32) for c in ctx_lens]
    qs = [rng.standard_normal((n, n_heads * hd)).astype(np.float32) for n in new]
    # write everything through kv_write, in two batches (old context first, then new tokens)
    for first in (True, False):
        rows = [(s, p) for s, c in enumerate(ctx_lens) for p in range(c) if (p < c - new[s]) == first]
        slots = np.array([tables[s][p // block] * block + p % block for s, p in rows], np.int32)
        kv_write(np.stack([ks[s][p] for s, p in rows]) if rows else np.zeros((0, n_kv * hd), np.float32),
                 np.stack([vs[s][p] for s, p in rows]) if rows else np.zeros((0, n_kv * hd), np.float32),
                 cache, slots)
    width = max(len(t) for t in tables)
    bt = np.zeros((3, width), np.int32)
    for s, t in enumerate(tables):
        bt[s, :len(t)] = t
    qsl = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    out = attention(np.concatenate(qs), cache, bt, np.array(ctx_lens, np.int32), qsl, n_heads=n_heads,
                    n_kv_heads=n_kv, head_dim=hd, scale=hd ** -0.5, sliding_window=window)
    want = np.concatenate([dense_causal_gqa(q, k, v, n_heads, n_kv, window) for q, k, v in zip(qs, ks, vs)])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_kv_write_skips_negative_slots(rng):
    cache = np.full((2, 2, 4, 1, 3), -7.0, np.float32)
    k = rng.standard_normal((3, 3)).astype(np.float32)
    v = rng.standard_normal((3, 3)).astype(np.float32)
    kv_write(k, v, cache, np.array([5, -1, 0], np.int32))
    np.testing.assert_array_equal(cache[0, 1, 1, 0], k[0])
    np.testing.assert_array_equal(cache[1, 0, 0, 0], v[2])
    assert (cache == -7.0).sum() == cache.size - 2 * 2 * 3  # two tokens, k and v, 3 values each


def test_rope_is_rotation_per_pair(rng):
    x = rng.standard_normal((5, 2 * 8)).astype(np.float32)
    pos = np.array([0, 1, 2, 100, 7], np.int32)
    freqs = tuple(rng.uniform(0.01, 1.0, 4))
    out = rope(x, pos, n_heads=2, head_dim=8, inv_freq=freqs)
    np.testing.assert_allclose(out[0], x[0], rtol=1e-6)  # position 0 is the identity
    xh, oh = x.reshape(5, 2, 8), out.reshape(5, 2, 8)
    for t in range(5):
        for j, f in enumerate(freqs):
            a = pos[t] * np.float32(f)
            c, s = np.cos(a), np.sin(a)
            x1, x2 = xh[t, :, j], xh[t, :, j + 4]
            np.testing.assert_allclose(oh[t, :, j], x1 * c - x2 * s, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(oh[t, :, j + 4], x2 * c + x1 * s, rtol=1e-4, atol=1e-5)


def test_bf16_rounding_matches_torch(rng):
    import torch

    x = (rng.standard_normal(10000) * 10 ** rng.uniform(-5, 5, 10000)).astype(np.float32)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(f32_to_bf16_bits(x), want)
    small = x[np.abs(x) < 6e4]  # inside f16's range
    np.testing.assert_array_equal(round_to(small, DType.F16), small.astype(np.float16).astype(np.float32))
    assert from_storage(want, DType.BF16).dtype == np.float32


def small_graph() -> Graph:
    g = Graph("tiny")
    x = g.input("x", ("T", 6), DType.F32)
    w = g.weight("w", (4, 6), DType.F16)
    n = g.weight("n", (6,), DType.F32)
    y = g.op("rms_norm", [x, n], ("T", 6), DType.F32, name="norm", eps=1e-6)
    z = g.op("matmul", [y, w], ("T", 4), DType.F16, name="proj")
    s = g.op("add", [z, z], ("T", 4), DType.F32, name="double")
    g.set_outputs(s)
    return g


def test_interpreter_runs_graph_with_dtype_rounding(rng):
    g = small_graph()
    w = rng.standard_normal((4, 6)).astype(np.float16)
    n = rng.standard_normal(6).astype(np.float32)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    (out,) = Interpreter(g, {"w": w, "n": n}).run({"x": x}, {}).values()
    y = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * n
    want = 2 * (y @ w.astype(np.float32).T).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    assert [n.name for n in g.ops()] == ["norm", "proj", "double"]
    assert g.nx.edges["proj", "double"]["operands"] == [0, 1]
    assert "norm: f32[T, 6] = rms_norm(x, n, eps=1e-06)" in str(g)


def test_graph_rejects_malformed_ops():
    g = small_graph()
    with pytest.raises(ValueError, match="unknown op kind"):
        g.op("conv", ["x"], ("T", 6), DType.F32, name="c")
    with pytest.raises(ValueError, match="takes 2 inputs"):
        g.op("add", ["x"], ("T", 6), DType.F32, name="a")
    with pytest.raises(ValueError, match="unknown input"):
        g.op("add", ["x", "nope"], ("T", 6), DType.F32, name="a")
    with pytest.raises(ValueError, match="duplicate"):
        g.op("add", ["x", "x"], ("T", 6), DType.F32, name="norm")


def test_interpreter_checks_shapes(rng):
    g = small_graph()
    interp = Interpreter(g, {"w": np.ones((4, 6), np.float16), "n": np.ones(6, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        interp.run({"x": np.ones((3, 5), np.float32)}, {})
    with pytest.raises(ValueError, match="shape"):
        Interpreter(g, {"w": np.ones((6, 4), np.float16), "n": np.ones(6, np.float32)})


def test_every_op_kind_documented():
    for spec in OPS.values():
        assert spec.doc and spec.arity >= 1 and callable(spec.reference)
