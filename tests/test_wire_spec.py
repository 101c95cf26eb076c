"""docs/wire.md against the code: a slow, independent decoder written from the document
(plain Python integers and floats, one symbol at a time) reads what the reference
encoders write."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedprune.importance_code import encode_importance
from fedprune.maskcode import encode_mask_bytes, encode_mask_change
from fedprune.quantisation import quantise

SPEC = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
L = 2**31


class SpecError(Exception):
    pass


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    for i in range(10):
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if i and byte == 0:
                raise SpecError("non-minimal varint")
            return value, pos + i + 1
    raise SpecError("varint too long")


def words_of(buf: bytes) -> list[int]:
    if len(buf) % 4:
        raise SpecError("not whole words")
    return [int.from_bytes(buf[i : i + 4], "little") for i in range(0, len(buf), 4)]


def rans_decode(words: list[int], count: int, f: list[int], S: int, x0: int) -> list[int]:
    c = [0]
    for v in f:
        c.append(c[-1] + v)
    assert c[-1] == 2**S
    if len(words) < 2:
        raise SpecError("no state")
    state = words[0] | words[1] << 32
    if not L <= state < 2**63:
        raise SpecError("bad state")
    p, out = 2, []
    for _ in range(count):
        slot = state & (2**S - 1)
        s = next(i for i in range(len(f)) if c[i] <= slot < c[i + 1])
        out.append(s)
        state = f[s] * (state >> S) + slot - c[s]
        if state < L:
            if p == len(words):
                raise SpecError("truncated")
            state = state << 32 | words[p]
            p += 1
    if state != x0 or p != len(words):
        raise SpecError("corrupted or left over")
    return out


def mask_table(n: int, m: int) -> list[int]:
    p, q = m / n, (n - m) / n
    pp, qq = [1.0] * 9, [1.0] * 9
    for c in range(1, 9):
        pp[c] = pp[c - 1] * p
        qq[c] = qq[c - 1] * q
    F = [0] * 9
    for c in range(1, 9):
        F[c] = max(1, math.floor(pp[c] * qq[8 - c] * 2**24))
    F[0] = 2**24 - sum(math.comb(8, c) * F[c] for c in range(1, 9))
    return [F[bin(b).count("1")] for b in range(256)]


def mask_body(buf: bytes, n: int, k: int) -> list[bool]:
    if k in (0, n):
        if buf:
            raise SpecError("words for a constant mask")
        return [k == n] * n
    m = min(k, n - k)
    B = (n + 7) // 8
    packed = rans_decode(words_of(buf), B, mask_table(n, m), 24, L + k % L)
    bits = [bool(packed[i // 8] >> (7 - i % 8) & 1) for i in range(8 * B)]
    if any(bits[n:]) or sum(bits) != m:
        raise SpecError("padding or count")
    return [not b for b in bits[:n]] if 2 * k > n else bits[:n]


def decode_mask(buf: bytes, n: int) -> list[bool]:
    assert buf[0] == 1
    k, pos = varint(buf, 1)
    assert k <= n
    return mask_body(buf[pos:], n, k)


def decode_change(old: list[bool], buf: bytes) -> list[bool]:
    assert buf[0] == 2
    n, k = len(old), sum(old)
    r, pos = varint(buf, 1)
    a, pos = varint(buf, pos)
    R, pos = varint(buf, pos)
    assert r <= k and a <= n - k
    removed = iter(mask_body(buf[pos : pos + 4 * R], k, r))
    added = iter(mask_body(buf[pos + 4 * R :], n - k, a))
    return [(not next(removed)) if o else next(added) for o in old]


def f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def decode_importance(buf: bytes, mask: list[bool]) -> list[float]:
    assert buf[0] == 3
    e = buf[1]
    n, k = len(mask), sum(mask)
    s, pos = varint(buf, 2)
    P, pos = varint(buf, pos)
    sent = mask_body(buf[pos : pos + 4 * P], n - k, s)
    pos += 4 * P
    out = [0.0] * n
    if k + s == 0:
        assert pos == len(buf)
        return out
    qmax = int.from_bytes(buf[pos : pos + 4], "little")
    A, pos = varint(buf, pos + 4)
    S = buf[pos]
    pos += 1
    f = []
    for _ in range(A):
        v, pos = varint(buf, pos)
        f.append(v)
    sym = rans_decode(words_of(buf[pos:]), k + s, f, S, L)
    values = [0.0 if d == 0 else f32((qmax - d + 1) << (23 - e)) for d in sym]
    kept = [i for i in range(n) if mask[i]]
    pruned = [i for i in range(n) if not mask[i]]
    positions = kept + [j for j, x in zip(pruned, sent, strict=True) if x]
    for i, v in zip(positions, values, strict=True):
        out[i] = v
    return out


def dequantise(buf: bytes, count: int) -> list[float]:
    assert buf[0] == 4
    b = buf[1]
    n, pos = varint(buf, 2)
    bucket, pos = varint(buf, pos)
    assert n == count
    nb = -(-count // bucket)
    scales = [struct.unpack("<f", buf[pos + 4 * j : pos + 4 * j + 4])[0] for j in range(nb)]
    codes = buf[pos + 4 * nb :]
    assert len(codes) == (count * b + 7) // 8
    stream = "".join(f"{byte:08b}" for byte in codes)
    lv = 2 ** (b - 1) - 1
    out = []
    for i in range(count):
        u = int(stream[i * b : (i + 1) * b], 2)
        assert u <= 2 * lv
        x = float(u - lv) * float(scales[i // bucket]) / float(lv)
        out.append(struct.unpack("<f", struct.pack("<f", x))[0])  # round to float32
    return out


# --------------------------------------------------------------------------------------


@SPEC
@given(n=st.integers(1, 400), density=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_mask_format(n, density, seed):
    mask = np.random.default_rng(seed).random(n) < density
    assert decode_mask(encode_mask_bytes(mask).tobytes(), n) == mask.tolist()


@SPEC
@given(
    n=st.integers(1, 400),
    density=st.floats(0.0, 1.0),
    flip=st.floats(0.0, 0.5),
    seed=st.integers(0, 1000),
)
def test_change_format(n, density, flip, seed):
    rng = np.random.default_rng(seed)
    old = rng.random(n) < density
    new = old ^ (rng.random(n) < flip)
    data = encode_mask_change(old, new).tobytes()
    assert decode_change(old.tolist(), data) == new.tolist()


@SPEC
@given(
    n=st.integers(0, 300),
    density=st.floats(0.0, 1.0),
    bits=st.integers(0, 7),
    top=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_importance_format(n, density, bits, top, seed):
    rng = np.random.default_rng(seed)
    g = (rng.lognormal(0, 4, n) * (rng.random(n) > 0.1)).astype(np.float32)
    mask = rng.random(n) < density
    data = encode_importance(g, mask, mantissa_bits=bits, top_fraction=top, min_sent=3)
    from fedprune.importance_code import decode_importance as fast

    expected = fast(data, mask).dense()
    assert decode_importance(data.tobytes(), mask.tolist()) == expected.tolist()


@SPEC
@given(
    n=st.integers(0, 300),
    bits=st.sampled_from([2, 3, 4, 5, 6, 7, 8, 16]),
    bucket=st.integers(1, 70),
    seed=st.integers(0, 1000),
)
def test_values_format(n, bits, bucket, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 3)).astype(np.float32)
    data = quantise(x, bits, rng=rng, bucket=bucket)
    from fedprune.quantisation import dequantise as fast

    assert dequantise(data.tobytes(), n) == fast(data, n).tolist()


def test_documented_vectors():
    mask = (np.arange(300) % 7 == 3).tolist()
    old = (np.arange(300) % 5 == 0).tolist()
    text = (Path(__file__).resolve().parents[1] / "docs" / "wire.md").read_text()
    vectors = [line.strip() for line in text.splitlines() if line.startswith(("01", "02"))]
    assert decode_mask(bytes.fromhex(vectors[0]), 300) == mask
    assert decode_change(old, bytes.fromhex(vectors[1])) == mask
