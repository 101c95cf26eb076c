"""Tests for quantised value updates with stochastic rounding and error feedback
(fedprune.quantisation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedprune.errors import CodecError
from fedprune.quantisation import BITS, dequantise, quantise, quantise_with_feedback

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def updates(n: int, seed: int) -> np.ndarray:
    """Update-like values: mostly small, a few large, some exact zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, n) * 1e-3
    x[rng.random(n) < 0.05] = 0.0
    return x.astype(np.float32)


@FAST
@given(
    n=st.integers(0, 5000),
    bits=st.sampled_from(BITS),
    bucket=st.sampled_from([1, 7, 64, 1024, 1 << 20]),
    seed=st.integers(0, 1000),
    stochastic=st.booleans(),
)
def test_round_trip_error_bound_and_size(n, bits, bucket, seed, stochastic):
    x = updates(n, seed)
    rng = np.random.default_rng(seed) if stochastic else None
    data = quantise(x, bits, rng=rng, bucket=bucket)
    assert data.dtype == np.uint8 and data.ndim == 1
    nb = math.ceil(n / bucket)
    header = 2 + len(_varint(n)) + len(_varint(bucket))
    assert data.nbytes == header + 4 * nb + math.ceil(n * bits / 8)
    back = dequantise(data, n)
    assert back.dtype == np.float32 and back.shape == (n,)
    levels = 2 ** (bits - 1) - 1
    padded = np.zeros(nb * bucket, np.float32)
    padded[:n] = np.abs(x)
    scale = np.repeat(padded.reshape(nb, bucket).max(1), bucket)[:n]
    step = scale / levels
    # nearest: half a step; stochastic: under one step; plus float32 rounding of the
    # scale and of level x scale, a few ulps of the bucket's largest value (at 16 bits
    # half a step is only 2^-16 of it, so this is not negligible there)
    bound = step * (1.0 if stochastic else 0.5) + scale * 2.0**-21 + 1e-30
    assert np.all(np.abs(back - x) <= bound)
    assert np.all(back[x == 0] == 0)


def _varint(v: int) -> bytes:
    from fedprune.maskcode import write_varint

    return write_varint(v)


def test_stochastic_rounding_is_unbiased():
    """Mean of many independent quantisations of the same vector against the vector: within
    4 standard errors everywhere (fixed seed), while rounding to nearest is biased."""
    x = np.linspace(-1, 1, 257).astype(np.float32) * 0.37
    x[0] = 1.0  # the bucket's scale: every other value falls between levels
    rng = np.random.default_rng(1234)
    trials = 4000
    bits = 3
    total = np.zeros(x.size)
    for _ in range(trials):
        total += dequantise(quantise(x, bits, rng=rng, bucket=x.size), x.size)
    mean = total / trials
    step = 1.0 / (2 ** (bits - 1) - 1)
    stderr = 0.5 * step / math.sqrt(trials)  # a Bernoulli step has sd <= step / 2
    assert np.all(np.abs(mean - x) <= 4 * stderr + 1e-6)
    nearest = dequantise(quantise(x, bits, bucket=x.size), x.size)
    assert np.abs(nearest - x).max() > 20 * stderr


def test_seeded_rounding_is_reproducible():
    x = updates(1000, 0)
    a = quantise(x, 4, rng=np.random.default_rng(7))
    b = quantise(x, 4, rng=np.random.default_rng(7))
    c = quantise(x, 4, rng=np.random.default_rng(8))
    assert a.tobytes() == b.tobytes() != c.tobytes()


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("stochastic", [False, True])
def test_error_feedback_carries_what_was_not_sent(bits, stochastic):
    """Over rounds, what was sent plus the final memory is what was given (in float64,
    up to float32 rounding of each step), and the memory stays within a step."""
    n, rounds = 3000, 30
    rng = np.random.default_rng(3) if stochastic else None
    memory = None
    given_sum = np.zeros(n)
    sent_sum = np.zeros(n)
    for r in range(rounds):
        x = updates(n, 100 + r)
        data, memory = quantise_with_feedback(x, memory, bits, rng=rng, bucket=256)
        sent = dequantise(data, n)
        given_sum += x
        sent_sum += sent
        assert memory.dtype == np.float32 and memory.shape == (n,)
    np.testing.assert_allclose(sent_sum + memory, given_sum, rtol=0, atol=rounds * 2e-9)
    # Without feedback the errors add up; with it, the residual is at most a step or two.
    levels = 2 ** (bits - 1) - 1
    assert np.abs(memory).max() <= 2 * np.abs(given_sum).max() / levels + 1e-6


def test_feedback_memory_first_round():
    x = updates(100, 5)
    data, memory = quantise_with_feedback(x, None, 2)
    np.testing.assert_array_equal(memory, x - dequantise(data, 100))
    with pytest.raises(ValueError, match="memory"):
        quantise_with_feedback(x, np.zeros(99, np.float32), 2)


def test_encoder_rejects_bad_input():
    with pytest.raises(ValueError, match="finite"):
        quantise(np.array([1.0, np.nan], np.float32), 8)
    with pytest.raises(ValueError, match="bits"):
        quantise(np.zeros(3, np.float32), 1)
    with pytest.raises(ValueError, match="bucket"):
        quantise(np.zeros(3, np.float32), 8, bucket=0)


def test_decoder_rejects_inconsistent_messages():
    x = updates(101, 2)
    good = quantise(x, 4, bucket=16)
    cases = {
        "count": (good, 100),
        "truncated": (good[:-1], 101),
        "extended": (np.concatenate([good, np.zeros(1, np.uint8)]), 101),
        "format": (_with(good, 0, 5), 101),
        "bits": (_with(good, 1, 9), 101),
        "bucket 0": (_with(good, 3, 0), 101),
        "padding": (_with(good, -1, good[-1] | 1), 101),  # 101 * 4 bits: 4 padding bits
        "empty": (good[:0], 101),
    }
    for label, (data, count) in cases.items():
        with pytest.raises(CodecError):
            dequantise(data, count)
        assert label
    # a NaN scale, a negative scale, a code above 2L
    scale_at = 2 + 1 + 1
    nan = good.copy()
    nan[scale_at : scale_at + 4] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    neg = good.copy()
    neg[scale_at : scale_at + 4] = np.frombuffer(np.float32(-1).tobytes(), np.uint8)
    for data in (nan, neg):
        with pytest.raises(CodecError, match="scale"):
            dequantise(data, 101)
    codes_at = scale_at + 4 * math.ceil(101 / 16)
    high = _with(good, codes_at, 0xF0 | (good[codes_at] & 0x0F))  # code 15 > 2 * 7
    with pytest.raises(CodecError, match="code"):
        dequantise(high, 101)
    with pytest.raises(CodecError, match="uint8"):
        dequantise(good.astype(np.int16), 101)


def _with(a: np.ndarray, i: int, value: int) -> np.ndarray:
    a = a.copy()
    a[i] = value
    return a


def test_huge_count_claims_are_bounded_by_the_caller():
    # The caller expects 10 values; a message claiming 10**12 is rejected at its header.
    msg = np.frombuffer(bytes([4, 8]) + _varint(10**12) + _varint(1024), np.uint8)
    with pytest.raises(CodecError, match="count"):
        dequantise(msg, 10)
