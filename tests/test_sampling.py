"""The sampling kernels (host target) against their numpy oracle, the oracle against
the distribution it claims to draw from, the random fill against its reference, and
the PTX of all of them through ptxas."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from fusec.fusion.cache import KernelCache
from fusec.fusion.codegen.target import parse_arch
from fusec.fusion.compiler import compile_kernel
from fusec.fusion.dtypes import DType, from_storage, to_storage
from fusec.errors import InputError
from fusec.kernels.random import FillRandom, fill_random_reference, hash3, to_unit, uniform
from fusec.kernels.sampling import MAX_LOGPROBS
from fusec.runtime.backends.cpu import HostDevice
from fusec.runtime.sampler import (KernelSampler, SamplingBatch, draw_scores, kept_tokens, processed_rows,
                                   reference_sample)
from fusec.runtime.sequence import SamplingParams, Sequence

from test_patterns import ptxas

VOCAB = 1031  # odd: a lane-strided loop's tail is exercised


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    dev = HostDevice(KernelCache(tmp_path_factory.mktemp("kernels")))
    yield dev
    dev.close()


def make_seq(rng: np.random.Generator, index: int, **kw) -> Sequence:
    seq = Sequence("r", index, rng.integers(0, VOCAB, int(rng.integers(3, 30))).tolist(),
                   SamplingParams(seed=int(rng.integers(1 << 31)), **kw), 0.0, 4096)
    seq.output_ids = rng.integers(0, VOCAB, int(rng.integers(0, 12))).tolist()
    return seq


PARAMS = [
    dict(temperature=0),
    dict(temperature=0, repetition_penalty=1.3, logprobs=5),
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=7),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.9, min_p=0.05),
    dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.01, logprobs=3),
    dict(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.4),
    dict(temperature=0.6, repetition_penalty=0.8, top_p=0.5, logprobs=0),
    dict(temperature=0, min_tokens=50, max_tokens=60, logprobs=MAX_LOGPROBS),  # the end tokens are banned
    dict(temperature=1.0, top_k=1),
    dict(temperature=2.0, top_p=0.999, top_k=VOCAB),
    dict(temperature=0.9, logit_bias={3: 8.0, 7: -100.0}, repetition_penalty=1.2),
    dict(temperature=0, logit_bias={11: 100.0}, logprobs=2),  # forced: greedy takes token 11
]


def check_against_reference(device, logits: np.ndarray, batch: SamplingBatch, max_rows: int,
                            device_logits=None) -> None:
    """The sampler's outputs on `device` (its buffers poisoned: the host fixture fills
    them here, a GPU device at allocation) against the numpy oracle."""
    want = reference_sample(logits, batch)
    sampler = KernelSampler(device, logits.shape[1], max_rows)
    if device_logits is None:
        for name in ("out_tokens", "picked", "lse", "top_ids", "top_vals", "orig"):
            sampler.bufs[name].fill(-7)
    got = sampler.sample(logits.copy() if device_logits is None else device_logits, batch)
    assert (got.tokens >= 0).all() and (got.tokens < logits.shape[1]).all()
    np.testing.assert_array_equal(got.orig, want.orig)
    np.testing.assert_allclose(got.lse, want.lse, rtol=1e-5)
    for j, k in enumerate(batch.num_logprobs):
        np.testing.assert_array_equal(got.top_ids[j, :k], want.top_ids[j, :k])
        np.testing.assert_array_equal(got.top_vals[j, :k], want.top_vals[j, :k])
    exact = 0
    penalised, _ = processed_rows(logits[batch.rows], batch)
    for r in range(len(batch)):
        if batch.temperature[r] == 0:
            assert got.tokens[r] == want.tokens[r], r
        else:
            # float32 in the kernel, float64 in numpy: the draw may differ only between
            # tokens whose scores tie to rounding
            score = draw_scores(penalised[r], batch, r)
            assert score[got.tokens[r]] >= score.max() - 1e-4, r
        if got.tokens[r] == want.tokens[r]:
            exact += 1
            assert got.picked[r] == want.picked[r], r
    assert exact >= 0.9 * len(batch)


def test_sampling_kernels_equal_reference(device):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((40, VOCAB)) * 3).astype(np.float32)
    seqs, rows = [], []
    for i in range(36):
        seqs.append(make_seq(rng, i, **PARAMS[i % len(PARAMS)]))
        rows.append(int(rng.integers(0, len(logits))))
    end_ids = [{1, 2, VOCAB - 1}] * len(seqs)
    batch = SamplingBatch.build(rows, seqs, end_ids, VOCAB)
    assert len(batch.tokens) > 0 and len(batch.logprob_rows) > 0
    check_against_reference(device, logits, batch, max_rows=48)
    # the min_tokens ban holds
    banned = [i for i, s in enumerate(seqs) if s.params.min_tokens]
    assert all(int(t) not in (1, 2, VOCAB - 1) for t in reference_sample(logits, batch).tokens[banned])
    # logit_bias: +100 forces its token, -100 bans its
    forced = [i for i, s in enumerate(seqs) if 11 in (s.params.logit_bias or {})]
    assert forced and all(reference_sample(logits, batch).tokens[forced] == 11)


def random_masks(rng: np.random.Generator, rows: int, allowed: float) -> np.ndarray:
    """Packed bitmask rows (llguidance's layout) allowing about `allowed` of VOCAB tokens."""
    bits = rng.random((rows, (VOCAB + 31) // 32 * 32)) < allowed
    bits[:, VOCAB:] = False
    return np.packbits(bits, axis=1, bitorder="little").view("<i4").astype(np.int32)


def test_token_masks_equal_reference_and_hold(device):
    """Structured-output masks: constrained rows (mixed with free ones, penalties and
    logprobs) draw only allowed tokens, as the oracle does; free rows are untouched."""
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((20, VOCAB)) * 3).astype(np.float32)
    seqs = [make_seq(rng, i, **PARAMS[i % len(PARAMS)]) for i in range(24)]
    rows = rng.integers(0, len(logits), len(seqs)).tolist()
    dense = random_masks(rng, len(seqs), 0.03)
    dense[1] = random_masks(rng, 1, 0.0)[0]
    dense[1][0] = 1 << 5  # exactly one token allowed: 5
    masks = [dense[i] if i % 3 else None for i in range(len(seqs))]
    batch = SamplingBatch.build(rows, seqs, [{1, 2}] * len(seqs), VOCAB, masks)
    assert len(batch.mask_rows) == 16
    check_against_reference(device, logits, batch, max_rows=32)
    got = KernelSampler(device, VOCAB, 32).sample(logits.copy(), batch)
    from fusec.runtime.sampler import allowed_tokens

    for i, mask in enumerate(masks):
        if mask is not None:
            assert allowed_tokens(mask, VOCAB)[got.tokens[i]], i
    assert got.tokens[1] == 5
    free = reference_sample(logits, SamplingBatch.build(rows, seqs, [{1, 2}] * len(seqs), VOCAB))
    unmasked = [i for i, m in enumerate(masks) if m is None and seqs[i].params.greedy]
    assert unmasked and all(got.tokens[i] == free.tokens[i] for i in unmasked)


def test_greedy_takes_the_first_maximum(device):
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((3, VOCAB)).astype(np.float32)
    logits[1, [5, 900]] = 50.0  # a tie: the first index wins, as numpy.argmax
    logits[2] = -np.inf  # all -inf: index 0, like numpy
    seqs = [make_seq(rng, i, temperature=0) for i in range(3)]
    got = KernelSampler(device, VOCAB, 4).sample(logits, SamplingBatch.build(range(3), seqs, [set()] * 3, VOCAB))
    np.testing.assert_array_equal(got.tokens, np.argmax(logits, axis=1))


def test_greedy_skips_nan_logits(device):
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((2, VOCAB)).astype(np.float32)
    logits[0, [0, 7, VOCAB - 1]] = np.nan  # NaNs, the first one included, never win
    logits[1] = np.nan  # nothing to pick: token 0, never id VOCAB
    seqs = [make_seq(rng, i, temperature=0) for i in range(2)]
    got = KernelSampler(device, VOCAB, 2).sample(logits, SamplingBatch.build(range(2), seqs, [set()] * 2, VOCAB))
    np.testing.assert_array_equal(got.tokens, [np.nanargmax(logits[0]), 0])


def test_logprob_records_use_raw_logits(device):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((3, VOCAB)) * 2).astype(np.float32)
    seq = make_seq(rng, 0, temperature=0, repetition_penalty=2.0, logprobs=4)
    batch = SamplingBatch.build([1], [seq], [set()], VOCAB)
    (record,) = KernelSampler(device, VOCAB, 4).sample(logits, batch).records(batch)
    raw = logits[1].astype(np.float64)
    logp = raw - (raw.max() + np.log(np.exp(raw - raw.max()).sum()))
    assert record.logprob == pytest.approx(logp[record.token_id], abs=1e-5)
    assert [t for t, _ in record.top] == np.argsort(-logp, kind="stable")[:4].tolist()
    assert [v for _, v in record.top] == pytest.approx(np.sort(logp)[::-1][:4], abs=1e-5)


def test_draws_follow_the_filtered_distribution(device):
    """Gumbel-max over the kept tokens samples softmax(z) restricted to them."""
    rng = np.random.default_rng(2)
    V, draws = 12, 4000
    logits = rng.standard_normal((1, V)).astype(np.float32) * 1.5
    params = SamplingParams(temperature=0.8, top_k=8, top_p=0.9, seed=3)
    seq = Sequence("r", 0, [1], params, 0.0, 1 << 20)
    batch = SamplingBatch.build([0] * draws, [seq] * draws, [set()] * draws, V)
    batch.counters = np.arange(draws, dtype=np.int32)  # a new draw per row
    z, keep = kept_tokens(logits[0], 0.8, 8, 0.9, 0.0)
    p = np.where(keep, np.exp(z), 0)
    p /= p.sum()
    for tokens in (reference_sample(logits, batch).tokens, KernelSampler(device, V, draws).sample(logits, batch).tokens):
        freq = np.bincount(tokens, minlength=V) / draws
        assert (freq[~keep] == 0).all()
        assert np.abs(freq - p).max() < 0.03, (freq, p)


def test_seeded_draws_do_not_depend_on_the_batch(device):
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((5, VOCAB)).astype(np.float32)
    seqs = [make_seq(rng, i, temperature=1.0, top_p=0.95) for i in range(5)]
    alone = KernelSampler(device, VOCAB, 8).sample(logits, SamplingBatch.build([2], [seqs[2]], [set()], VOCAB))
    together = KernelSampler(device, VOCAB, 8).sample(logits, SamplingBatch.build(range(5), seqs, [set()] * 5, VOCAB))
    assert alone.tokens[0] == together.tokens[2]


def test_uniforms_stay_inside_the_open_interval():
    """Both extreme hashes give a finite Gumbel noise (24 bits would round the top to 1.0)."""
    assert hash3(0, 0, 0) != hash3(0, 0, 1)
    extremes = to_unit(np.array([0, 0xFFFFFFFF], np.uint32))
    assert 0 < extremes[0] and extremes[1] < 1
    assert np.isfinite(-np.log(-np.log(extremes.astype(np.float64)))).all()
    assert np.isfinite(-np.log(-np.log(extremes))).all()  # in float32, as the kernel computes
    u = uniform(7, 3, np.arange(100000))
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_a_row_with_nothing_to_keep_gives_the_greedy_token(device):
    logits = np.full((1, VOCAB), -np.inf, np.float32)
    seq = Sequence("r", 0, [1], SamplingParams(temperature=1.0, top_p=0.5, seed=1), 0.0, 64)
    batch = SamplingBatch.build([0], [seq], [set()], VOCAB)
    assert KernelSampler(device, VOCAB, 2).sample(logits, batch).tokens[0] == 0
    assert reference_sample(logits, batch).tokens[0] == 0
    with pytest.raises(InputError, match="top_p"):
        SamplingParams(top_p=1e-46)  # positive, but 0 in float32: nothing would be kept


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16, DType.BF16], ids=lambda d: d.value)
def test_fill_random_equals_reference(dtype, device):
    n = 3 * 4096 + 77
    buf = device.buffer((n,), dtype.storage)
    buf.fill(np.array(-1).astype(dtype.storage))
    device.launch_kernel(FillRandom(dtype), [buf, np.int32(n), np.int32(-5), np.int32(9), np.float32(0.25),
                                             np.float32(1.0)], FillRandom(dtype).grid({"n": n}))
    want = fill_random_reference(n, -5, 9, 0.25, 1.0)
    np.testing.assert_array_equal(buf, to_storage(want, dtype))
    got = from_storage(buf, dtype)
    assert 0.75 <= got.min() and got.max() <= 1.25 and abs(got.std() - 0.25 / np.sqrt(3)) < 0.01


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sampling_and_fill_ptx_assembles(arch, tmp_path):
    tool = ptxas()
    if tool is None:
        pytest.skip("ptxas not found")
    target = parse_arch(arch)
    cache = KernelCache(tmp_path / "cache")
    kernels = [*KernelSampler.kernel_specs(VOCAB)] + [FillRandom(d) for d in (DType.F32, DType.F16, DType.BF16)]
    for kernel in kernels:
        path = tmp_path / f"{kernel.name}.ptx"
        path.write_bytes(compile_kernel(kernel, target, cache).data)
        res = subprocess.run([tool, f"-arch={arch}", str(path), "-o", str(tmp_path / "out.cubin")],
                             capture_output=True, text=True)
        assert res.returncode == 0, f"{kernel.describe()}: {res.stderr}"
