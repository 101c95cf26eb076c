"""Tests for the coded importance upload and its server-side sum (fedprune.importance_code)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedprune.errors import CodecError
from fedprune.importance_code import (
    MAX_ALPHABET,
    ImportanceCode,
    ImportanceSum,
    ImportanceUpload,
    decode_importance,
    encode_importance,
    sent_count,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sample(n: int, density: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(importance, mask): heavy-tailed importance over many octaves, some exact zeros."""
    rng = np.random.default_rng(seed)
    g = (rng.lognormal(0.0, 3.0, n) * (rng.random(n) > 0.05)).astype(np.float32)
    return g, rng.random(n) < density


@FAST
@given(
    n=st.integers(0, 3000),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
    mantissa_bits=st.integers(0, 7),
    top_fraction=st.floats(0.0, 1.0),
    min_sent=st.integers(0, 50),
)
def test_round_trip(n, density, seed, mantissa_bits, top_fraction, min_sent):
    g, mask = sample(n, density, seed)
    data = encode_importance(
        g, mask, mantissa_bits=mantissa_bits, top_fraction=top_fraction, min_sent=min_sent
    )
    assert data.dtype == np.uint8 and data.ndim == 1
    up = decode_importance(data, mask)
    pruned = np.flatnonzero(~mask)
    s = sent_count(pruned.size, top_fraction, min_sent)
    assert up.size == n and up.sent.size == s
    assert np.isin(up.sent, pruned).all() and np.all(np.diff(up.sent) > 0)
    # The sent pruned positions are the node's most important ones.
    if 0 < s < pruned.size:
        unsent = np.setdiff1d(pruned, up.sent)
        assert g[up.sent].min() >= g[unsent].max()
        assert up.floor == float(up.sent_values.min())
    else:
        assert up.floor == 0.0
    # Each value within the quantiser's relative error (0 stays 0), as far as the alphabet
    # reaches below the largest value sent; further below, the lowest level, above it.
    tol = 2.0 ** -(mantissa_bits + 1) * (1 + 1e-6)
    octaves = (MAX_ALPHABET - 2) / 2.0**mantissa_bits
    top = float(max(g[mask].max(initial=0.0), g[up.sent].max(initial=0.0)))
    for got, want in ((up.kept_values, g[mask]), (up.sent_values, g[up.sent])):
        assert np.all(got >= 0) and np.all(np.isfinite(got))
        close = np.abs(got - want) <= tol * want
        assert close[want >= top * 2.0 ** -(octaves - 1)].all()
        lowest = (got >= want) & (got <= top * 2.0 ** -(octaves - 2))
        assert (close | lowest).all()
    dense = up.dense()
    assert dense.dtype == np.float32 and dense.shape == (n,)
    assert np.array_equal(dense[mask], up.kept_values)


def test_bytes_on_a_large_layer():
    """Conv-2's fc1 at PruneFL's density: about 1/12 of bfloat16's bytes."""
    g, mask = sample(1_000_000, 0.03, 1)
    data = ImportanceCode().encode(g, mask)
    assert data.nbytes < 2 * g.size / 10
    up = decode_importance(data, mask)
    assert up.sent.size == math.ceil(0.1 * int((~mask).sum()))  # 10 % of the pruned weights


def test_extremes_of_the_float_range():
    g = np.array([0.0, 1e-45, 1e-38, 1.0, 3.4e38, np.finfo(np.float32).max], np.float32)
    mask = np.array([True, False, True, False, True, False])
    for bits in (0, 4, 7):
        up = decode_importance(encode_importance(g, mask, mantissa_bits=bits, min_sent=0), mask)
        back = up.dense()
        assert np.all(np.isfinite(back)) and back[0] == 0.0
        assert back[-1] <= np.finfo(np.float32).max


def test_encoder_rejects_bad_input():
    g, mask = sample(10, 0.5, 0)
    with pytest.raises(ValueError, match="finite"):
        encode_importance(np.where(mask, np.nan, g), mask)
    with pytest.raises(ValueError, match="finite"):
        encode_importance(-np.ones(10, np.float32), mask)
    with pytest.raises(ValueError, match="positions"):
        encode_importance(g, mask[:-1])
    with pytest.raises(ValueError, match="mantissa"):
        encode_importance(g, mask, mantissa_bits=8)
    with pytest.raises(ValueError, match="bool"):
        encode_importance(g, mask.astype(np.uint8))


def _mutations(data: np.ndarray):
    for cut in range(data.size):
        yield data[:cut]
    for i in range(data.size):
        for x in (0x01, 0x40, 0xFF):
            m = data.copy()
            m[i] ^= x
            yield m
    yield np.concatenate([data, np.zeros(4, np.uint8)])


def test_mutations_raise_or_stay_valid():
    """Every truncation or extension raises; a changed byte either raises or (in the
    table or the largest code, which nothing checks) decodes to another valid upload:
    finite, >= 0, of the mask's size."""
    g, mask = sample(300, 0.2, 3)
    data = encode_importance(g, mask, top_fraction=0.2, min_sent=0)
    raised = 0
    for bad in _mutations(data):
        try:
            up = decode_importance(np.ascontiguousarray(bad), mask)
        except CodecError:
            raised += 1
            continue
        assert bad.size == data.size
        values = np.concatenate([up.kept_values, up.sent_values])
        assert np.all(np.isfinite(values)) and np.all(values >= 0)
        assert up.size == mask.size
    assert raised >= 0.9 * (2 * data.size + 1 + data.size * 2)


def test_decoder_bounds():
    mask = np.zeros(8, bool)
    mask[:2] = True
    with pytest.raises(CodecError, match="sent count"):  # 7 sent of 6 pruned
        decode_importance(np.array([3, 4, 7], np.uint8), mask)
    with pytest.raises(CodecError, match="mantissa"):
        decode_importance(np.array([3, 9, 0], np.uint8), mask)
    with pytest.raises(CodecError, match="format"):
        decode_importance(np.array([1, 4, 0], np.uint8), mask)
    with pytest.raises(CodecError, match="uint8"):
        decode_importance(np.array([3, 4, 0], np.uint16), mask)
    with pytest.raises(CodecError, match="largest code"):  # 2 kept values, nothing after
        decode_importance(np.array([3, 4, 0, 0], np.uint8), mask)
    empty = encode_importance(np.zeros(0, np.float32), np.zeros(0, bool))
    assert decode_importance(empty, np.zeros(0, bool)).size == 0


def test_importance_sum_imputes_near_the_floor_for_common_weights():
    shapes = {"w": (6,)}
    mask = np.array([True, False, False, False, False, False])
    # Two uploads; each sends 2 of the 5 pruned weights (min_sent=2, top_fraction=0).
    g1 = np.array([1.0, 8.0, 4.0, 2.0, 0.5, 0.0], np.float32)  # sends 1, 2; floor 4
    g2 = np.array([1.0, 8.0, 1.0, 6.0, 0.5, 0.0], np.float32)  # sends 1, 3; floor 6
    code = dict(mantissa_bits=7, top_fraction=0.0, min_sent=2)
    ups = [decode_importance(encode_importance(g, mask, **code), mask) for g in (g1, g2)]
    assert [u.floor for u in ups] == [4.0, 6.0]
    total = ImportanceSum(shapes)
    for up in ups:
        total.add({"w": up})
    got = total.total()["w"].numpy()
    # kept and sent by both: exact sums; sent by one: that value plus the other's floor
    # times share**2 = 1/4; sent by none: 0.
    np.testing.assert_allclose(got, [2.0, 16.0, 4.0 + 6.0 / 4, 6.0 + 4.0 / 4, 0.0, 0.0])
    plain = ImportanceSum(shapes, imputation=0.0)
    for up in ups:
        plain.add({"w": up})
    np.testing.assert_allclose(plain.total()["w"].numpy(), [2.0, 16.0, 4.0, 6.0, 0.0, 0.0])


def test_importance_sum_takes_exact_uploads_and_checkpoints():
    shapes = {"a": (2, 3), "b": (4,)}
    total = ImportanceSum(shapes)
    assert torch.equal(total.total()["a"], torch.zeros(2, 3))
    exact = {"a": torch.arange(6.0).reshape(2, 3), "b": np.ones(4, np.float32)}
    total.add(exact)
    total.add(exact)
    assert torch.equal(total.total()["a"], 2 * torch.arange(6.0).reshape(2, 3))
    state = total.state_dict()
    again = ImportanceSum(shapes)
    again.load_state_dict(state)
    assert again.uploads == 2
    assert torch.equal(again.total()["b"], total.total()["b"])
    with pytest.raises(ValueError, match="cover"):
        total.add({"a": exact["a"]})
    with pytest.raises(ValueError, match="values"):
        total.add({"a": torch.zeros(5), "b": exact["b"]})
    bad = ImportanceUpload(
        np.zeros(3, bool), np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)
    )
    with pytest.raises(ValueError, match="positions"):
        total.add({"a": bad, "b": exact["b"]})


def test_sent_count():
    assert sent_count(1000, 0.1, 0) == 100
    assert sent_count(1000, 0.1, 500) == 500
    assert sent_count(1000, 0.0, 5000) == 1000
    assert sent_count(0, 0.5, 10) == 0
    assert sent_count(7, 0.5, 0) == math.ceil(3.5)


def test_frequency_table_for_any_histogram():
    from fedprune.importance_code import _quantised_freqs

    rng = np.random.default_rng(0)
    spread = np.concatenate([np.full(3097, 10**6), np.ones(1000)])  # no dominant level
    for counts in (spread, np.ones(4097), np.array([5]), rng.integers(0, 3, 4097)):
        counts = counts.astype(np.int64)
        if not counts.any():
            continue
        f = _quantised_freqs(counts, 18)
        assert int(f.sum()) == 1 << 18
        assert np.all((f >= 1) == (counts > 0))
