"""Tests for the entropy-coded masks and mask changes (fedprune.maskcode, fedprune.rans)."""

from __future__ import annotations

import contextlib
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedprune import rans
from fedprune.errors import CodecError
from fedprune.maskcode import (
    decode_mask_bytes,
    decode_mask_change,
    encode_mask_bytes,
    encode_mask_change,
    mask_bound_bits,
    read_varint,
    write_varint,
)

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_mask(n: int, density: float, seed: int, clustered: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if not clustered:
        return rng.random(n) < density
    # Runs of kept positions: the arrangement a pruned layer can have (whole rows).
    mask = np.zeros(n, dtype=np.bool_)
    k = round(density * n)
    start = int(rng.integers(0, max(n - k, 0) + 1))
    mask[start : start + k] = True
    return mask


def within_goal(nbytes: int, bound_bits: float) -> bool:
    return nbytes <= 1.03 * bound_bits / 8 + 64


# --------------------------------------------------------------------------------------
# rANS


@FAST
@given(
    freqs=st.lists(st.integers(0, 50), min_size=1, max_size=40).filter(lambda f: sum(f) > 0),
    count=st.integers(0, 3000),
    seed=st.integers(0, 1000),
    start_offset=st.integers(0, 2**31 - 1),
)
def test_rans_round_trip(freqs, count, seed, start_offset):
    # Frequencies scaled to a power of two; symbols drawn from the used ones.
    scale = 16
    f = np.array(freqs, dtype=np.int64)
    q = np.maximum(f * (1 << scale) // f.sum(), (f > 0).astype(np.int64))
    q[int(np.argmax(q))] += (1 << scale) - int(q.sum())
    table = rans.table_from_freqs(q, scale)
    rng = np.random.default_rng(seed)
    symbols = rng.choice(len(q), size=count, p=q / q.sum()).astype(np.uint16)
    start = rans.LOWER + start_offset
    words = rans.encode(symbols, table, start)
    assert words.dtype == np.uint32 and 2 <= words.size <= count + 2
    out = np.empty(count, dtype=np.uint16)
    assert rans.decode(words, count, table, out, start) == rans.RansStatus.OK
    np.testing.assert_array_equal(out, symbols)
    # A different start state (what a changed header gives) fails the final check.
    if count:
        other = rans.LOWER + (start_offset + 1) % rans.LOWER
        assert rans.decode(words, count, table, out, other) != rans.RansStatus.OK


def test_rans_rejects_bad_tables_and_states():
    with pytest.raises(ValueError, match="sum"):
        rans.table_from_freqs(np.array([1, 2]), 2)
    with pytest.raises(ValueError, match="scale"):
        rans.table_from_freqs(np.array([1 << 32]), 32)
    table = rans.table_from_freqs(np.array([3, 1]), 2)
    out = np.empty(4, dtype=np.uint8)
    assert rans.decode(np.zeros(1, np.uint32), 4, table, out) == rans.RansStatus.BAD_INITIAL_STATE
    high = np.array([0, 0x80000000], dtype=np.uint32)  # state 2**63: out of range
    assert rans.decode(high, 4, table, out) == rans.RansStatus.BAD_INITIAL_STATE
    with pytest.raises(ValueError, match="start"):
        rans.encode(np.zeros(3, np.uint8), table, start=1)


# --------------------------------------------------------------------------------------
# varints


@given(st.integers(0, 2**64 - 1))
def test_varint_round_trip(value):
    data = np.frombuffer(write_varint(value), np.uint8)
    assert read_varint(data, 0, 2**64, "x") == (value, data.size)


def test_varint_errors():
    with pytest.raises(CodecError, match="truncated"):
        read_varint(np.array([0x80], np.uint8), 0, 10, "x")
    with pytest.raises(CodecError, match="non-minimal"):
        read_varint(np.array([0x81, 0x00], np.uint8), 0, 10, "x")
    with pytest.raises(CodecError, match="exceeds"):
        read_varint(np.array([11], np.uint8), 0, 10, "x")
    with pytest.raises(CodecError, match="longer"):
        read_varint(np.full(11, 0xFF, np.uint8), 0, 2**80, "x")


# --------------------------------------------------------------------------------------
# whole masks


@FAST
@given(
    n=st.integers(0, 20_000),
    density=st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 0.5, 1e-3, 0.999])),
    seed=st.integers(0, 2**16),
    clustered=st.booleans(),
)
def test_mask_round_trip_within_goal(n, density, seed, clustered):
    mask = random_mask(n, density, seed, clustered)
    data = encode_mask_bytes(mask)
    assert data.dtype == np.uint8 and data.ndim == 1
    assert within_goal(data.nbytes, mask_bound_bits(n, int(mask.sum())))
    np.testing.assert_array_equal(decode_mask_bytes(data, n), mask)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 9, 63, 64, 65, 10_000])
def test_empty_and_full_layers(n):
    for mask in (np.zeros(n, np.bool_), np.ones(n, np.bool_)):
        data = encode_mask_bytes(mask)
        # format byte and the kept count, nothing else
        assert data.nbytes == 1 + len(write_varint(int(mask.sum())))
        np.testing.assert_array_equal(decode_mask_bytes(data, n), mask)
    if n:
        one = np.zeros(n, np.bool_)
        one[n // 2] = True
        assert within_goal(encode_mask_bytes(one).nbytes, mask_bound_bits(n, 1))
        np.testing.assert_array_equal(decode_mask_bytes(encode_mask_bytes(one), n), one)


def test_large_masks_near_bound():
    n = 1_000_003
    for density in (0.001, 0.04, 0.5, 0.97):
        mask = random_mask(n, density, 7)
        data = encode_mask_bytes(mask)
        bound = mask_bound_bits(n, int(mask.sum())) / 8
        assert data.nbytes <= bound + 32  # a few bytes over the bound, at any density
        np.testing.assert_array_equal(decode_mask_bytes(data, n), mask)


def test_golden_vectors():
    """The bytes docs/wire.md gives as test vectors for other implementations (a
    regression anchor; tests/test_wire_spec.py checks the layout independently)."""
    mask = np.arange(300) % 7 == 3
    old = np.arange(300) % 5 == 0
    assert encode_mask_bytes(mask).tobytes().hex() == GOLDEN_MASK_HEX
    assert encode_mask_change(old, mask).tobytes().hex() == GOLDEN_CHANGE_HEX
    np.testing.assert_array_equal(decode_mask_bytes(encode_mask_bytes(mask), 300), mask)


GOLDEN_MASK_HEX = "012bd47290104e66030097b656cb80ad5ed4cc915f4019a05c74c8b75814"
GOLDEN_CHANGE_HEX = (
    "02332203a4489e2117000000a18be6aafd18ae343c13000064b429e034a0eabb9a9deb3d0df2eaa5"
)


def _mutations(data: np.ndarray):
    """Every truncation, every single-byte change to a few values, every extension."""
    for cut in range(data.size):
        yield data[:cut]
    for i in range(data.size):
        for x in (0x01, 0x80, 0xFF):
            m = data.copy()
            m[i] ^= x
            yield m
    for extra in (b"\x00", b"\x00" * 4, b"\x12\x34\x56\x78"):
        yield np.concatenate([data, np.frombuffer(extra, np.uint8)])


@pytest.mark.parametrize(
    ("n", "density", "clustered"),
    [(37, 0.3, False), (200, 0.02, False), (200, 0.5, False), (333, 0.9, True), (64, 0.98, False)],
)
def test_every_mutation_raises(n, density, clustered):
    mask = random_mask(n, density, 3, clustered)
    data = encode_mask_bytes(mask)
    for bad in _mutations(data):
        with pytest.raises(CodecError):
            decode_mask_bytes(np.ascontiguousarray(bad), n)


@FAST
@given(
    n=st.integers(1, 2000),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_random_mutations_raise(n, density, seed, data):
    mask = random_mask(n, density, seed)
    good = encode_mask_bytes(mask)
    op = data.draw(st.sampled_from(["xor", "truncate", "append", "insert"]))
    if op == "xor":
        bad = good.copy()
        bad[data.draw(st.integers(0, good.size - 1))] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        bad = good[: data.draw(st.integers(0, good.size - 1))]
    elif op == "append":
        extra = data.draw(st.binary(min_size=1, max_size=12))
        bad = np.concatenate([good, np.frombuffer(extra, np.uint8)])
    else:
        i = data.draw(st.integers(0, good.size))
        ins = np.frombuffer(data.draw(st.binary(min_size=1, max_size=8)), np.uint8)
        bad = np.concatenate([good[:i], ins, good[i:]])
    try:
        back = decode_mask_bytes(np.ascontiguousarray(bad), n)
    except CodecError:
        return
    # What gets through is a valid message: n positions that code to exactly these bytes.
    # Mostly a constant mask's header turned into another's (no coded words to check),
    # rarely a flipped word that decodes to another mask of the same count
    # (test_a_flipped_bit_can_be_another_valid_mask).
    assert back.shape == (n,)
    assert encode_mask_bytes(back).tobytes() == bad.tobytes()


def test_a_flipped_bit_can_be_another_valid_mask():
    """rANS's final check binds the stream's end and the kept count, not each position:
    this one-bit flip (found by the test above) swaps two kept positions and passes every
    check, as a flipped float32 is another float. Integrity is the transport's (TLS)."""
    mask = random_mask(173, 0.140625, 426)
    bad = encode_mask_bytes(mask)
    bad[13] ^= 1
    back = decode_mask_bytes(bad, 173)
    assert int(back.sum()) == int(mask.sum()) and int((back != mask).sum()) == 2
    assert encode_mask_bytes(back).tobytes() == bad.tobytes()


def test_decoder_input_checks():
    good = encode_mask_bytes(random_mask(100, 0.3, 1))
    with pytest.raises(CodecError, match="numpy array"):
        decode_mask_bytes(list(good), 100)
    with pytest.raises(CodecError, match="uint8"):
        decode_mask_bytes(good.astype(np.int16), 100)
    with pytest.raises(CodecError, match="1-D"):
        decode_mask_bytes(good.reshape(1, -1), 100)
    with pytest.raises(CodecError, match="empty"):
        decode_mask_bytes(good[:0], 100)
    with pytest.raises(CodecError, match="format"):
        decode_mask_bytes(encode_mask_change(np.zeros(100, bool), np.ones(100, bool)), 100)
    with pytest.raises(TypeError):
        encode_mask_bytes(np.zeros(5, np.uint8))


def test_no_allocation_beyond_the_layer():
    """Garbage for a 200,000-position layer: decoding allocates at most the layer's size
    (n bools and n/8 bytes) plus small change, whatever the input claims."""
    n = 200_000
    rng = np.random.default_rng(0)
    good = encode_mask_bytes(random_mask(n, 0.1, 0))
    inputs = [
        good[:-4],
        np.concatenate([good, np.zeros(4096, np.uint8)]),
        rng.integers(0, 256, 50_000).astype(np.uint8),
        np.concatenate([np.frombuffer(b"\x01" + write_varint(n // 2), np.uint8), good[4:]]),
    ]
    # A big input buffer is the caller's; only what decoding adds counts.
    for data in inputs:
        tracemalloc.start()
        with contextlib.suppress(CodecError):
            decode_mask_bytes(data, n)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak <= 1.25 * n + 4 * data.size + 100_000, peak


# --------------------------------------------------------------------------------------
# changes


@FAST
@given(
    n=st.integers(0, 20_000),
    d_old=st.floats(0.0, 1.0),
    removed=st.floats(0.0, 1.0),
    added=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_change_round_trip_within_goal(n, d_old, removed, added, seed):
    rng = np.random.default_rng(seed)
    old = rng.random(n) < d_old
    drop = old & (rng.random(n) < removed * rng.random())
    grow = ~old & (rng.random(n) < added * rng.random())
    new = (old & ~drop) | grow
    data = encode_mask_change(old, new)
    k = int(old.sum())
    bound = mask_bound_bits(k, int(drop.sum())) + mask_bound_bits(n - k, int(grow.sum()))
    assert within_goal(data.nbytes, bound)
    np.testing.assert_array_equal(decode_mask_change(old, data), new)


def test_change_of_nothing_is_tiny():
    old = random_mask(10_000, 0.3, 2)
    assert encode_mask_change(old, old).nbytes == 4  # format, 0 removed, 0 added, 0 words
    np.testing.assert_array_equal(decode_mask_change(old, encode_mask_change(old, old)), old)


@pytest.mark.parametrize(("n", "d_old", "flip"), [(150, 0.3, 0.05), (400, 0.9, 0.02)])
def test_every_change_mutation_raises(n, d_old, flip):
    rng = np.random.default_rng(5)
    old = rng.random(n) < d_old
    new = old ^ (rng.random(n) < flip)
    data = encode_mask_change(old, new)
    for bad in _mutations(data):
        with pytest.raises(CodecError):
            decode_mask_change(old, np.ascontiguousarray(bad))


def test_change_counts_bounded_by_the_held_mask():
    old = np.zeros(10, bool)
    old[:3] = True
    # 4 removed of 3 kept
    with pytest.raises(CodecError, match="removed count"):
        decode_mask_change(old, np.array([2, 4, 0, 0], np.uint8))
    # 8 added of 7 pruned
    with pytest.raises(CodecError, match="added count"):
        decode_mask_change(old, np.array([2, 0, 8, 0], np.uint8))
    # words for the removed part beyond the message
    with pytest.raises(CodecError, match="removed words"):
        decode_mask_change(old, np.array([2, 1, 0, 5, 0, 0, 0, 0], np.uint8))
    with pytest.raises(ValueError, match="positions"):
        encode_mask_change(old, np.zeros(11, bool))
