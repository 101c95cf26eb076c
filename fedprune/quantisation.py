"""Kept-value updates quantised to 16, 8 or fewer bits, with stochastic rounding and error
feedback.

A node that holds the last global values it received can send its update (new values
minus received ones) instead of its values, and the server can send the change since the
node's version; both are vectors of small numbers that tolerate coarse quantisation
(FedPAQ, Reisizadeh et al. 2020; QSGD, Alistarh et al. 2017).  Here:

* the vector is cut into buckets of ``bucket`` values (1024 by default); each bucket
  sends its largest magnitude ``scale`` (float32) and each value a ``bits``-bit code
  ``c`` in ``[-L, L]``, ``L = 2**(bits - 1) - 1``, standing for ``c * scale / L``;
* ``c`` is ``x / scale * L`` rounded to nearest, or, with a random generator, rounded
  stochastically (up with probability equal to the fractional part), which makes the
  decoded value an unbiased estimate of ``x`` (QSGD);
* error feedback (`quantise_with_feedback`): the sender adds what earlier messages failed
  to carry (its *memory*) before quantising, and keeps the new residual, so quantisation
  errors are delayed rather than lost (Seide et al. 2014; Karimireddy et al. 2019).

Byte layout in `docs/wire.md`.  The decoder treats its input as untrusted: the count must
be the one the caller expects (the kept count, from the mask), every length is checked
before anything is allocated, scales must be finite and >= 0, codes within ``[-L, L]``,
padding bits zero; otherwise `fedprune.codec.CodecError`.  The codes themselves carry no
checksum: a flipped code decodes to another valid value, as a flipped float32 would.
"""

from __future__ import annotations

import numpy as np

from fedprune.errors import CodecError
from fedprune.maskcode import read_varint, write_varint

__all__ = [
    "VALUES_FORMAT",
    "dequantise",
    "quantise",
    "quantise_with_feedback",
]

VALUES_FORMAT = 0x04
"""First byte of a quantised vector: format 4 (version 1)."""

BITS = (2, 3, 4, 5, 6, 7, 8, 16)
"""The code widths a message may use."""
MAX_BUCKET = 1 << 20


def _levels(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _pack(u: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes ``u < 2**bits`` as a big-endian bit stream, zero-padded to bytes."""
    if bits == 8:
        return u.astype(np.uint8)
    if bits == 16:
        return u.astype(">u2").view(np.uint8)
    bitplanes = np.unpackbits(u.astype(np.uint8)[:, None], axis=1)[:, 8 - bits :]
    return np.packbits(bitplanes.reshape(-1))


def _unpack(buf: np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of `_pack`: ``count`` codes (int64); the caller checked the length."""
    if bits == 8:
        return buf.astype(np.int64)
    if bits == 16:
        return np.ascontiguousarray(buf).view(">u2").astype(np.int64)
    flat = np.unpackbits(buf, count=count * bits).reshape(count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.int64)
    return flat.astype(np.int64) @ weights


def _dequantised(codes: np.ndarray, scales: np.ndarray, bits: int, bucket: int) -> np.ndarray:
    """``c * scale / L`` in float64, rounded once to float32 (the decoder's definition)."""
    per_value = np.repeat(scales.astype(np.float64), bucket)[: codes.shape[0]]
    return (codes.astype(np.float64) * per_value / _levels(bits)).astype(np.float32)


def quantise(
    x,
    bits: int,
    *,
    rng: np.random.Generator | None = None,
    bucket: int = 1024,
) -> np.ndarray:
    """Quantise a float vector (flattened; finite) to ``bits`` bits per value plus one
    float32 scale per ``bucket`` values; return the message, a 1-D uint8 array.

    With ``rng`` the rounding is stochastic and the decoded vector is an unbiased estimate
    of ``x``; without, it rounds to nearest.  About ``count * bits / 8 + 4 * count /
    bucket + 8`` bytes.

    Raises:
        ValueError: non-finite values, ``bits`` not in `BITS`, ``bucket`` outside
            [1, 2**20].
    """
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    if bits not in BITS:
        raise ValueError(f"bits = {bits} must be one of {BITS}")
    if not 1 <= bucket <= MAX_BUCKET:
        raise ValueError(f"bucket = {bucket} must be in [1, {MAX_BUCKET}]")
    if x.size and not np.isfinite(x).all():
        raise ValueError("values must be finite")
    levels = _levels(bits)
    count = x.shape[0]
    nb = -(-count // bucket)
    padded = np.zeros(nb * bucket, dtype=np.float64)
    padded[:count] = x
    scales = np.abs(padded).reshape(nb, bucket).max(axis=1).astype(np.float32)
    # Divide by the float32 scale the decoder will see, so |v| <= L holds exactly.
    s64 = np.repeat(scales.astype(np.float64), bucket)[:count]
    v = np.divide(x.astype(np.float64) * levels, s64, out=np.zeros(count), where=s64 > 0)
    v = np.clip(v, -levels, levels)
    codes = np.rint(v) if rng is None else np.floor(v + rng.random(count))
    u = (codes.astype(np.int64) + levels).clip(0, 2 * levels)
    head = bytes([VALUES_FORMAT, bits]) + write_varint(count) + write_varint(bucket)
    return np.concatenate(
        [
            np.frombuffer(head, dtype=np.uint8),
            scales.astype("<f4").view(np.uint8),
            _pack(u, bits),
        ]
    )


def dequantise(data, count: int, *, what: str = "values") -> np.ndarray:
    """The float32 vector of ``count`` values (``count`` trusted: the kept count the caller
    expects) from `quantise`'s output (untrusted).  CodecError, whose text starts with
    ``what``, if anything does not fit; nothing is allocated beyond ``count`` values."""
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
        got = f"{data.dtype}, shape {data.shape}" if isinstance(data, np.ndarray) else type(data)
        raise CodecError(f"{what}: expected a 1-D uint8 array, got {got}")
    if data.shape[0] < 2 or int(data[0]) != VALUES_FORMAT:
        first = int(data[0]) if data.shape[0] else None
        raise CodecError(
            f"{what}: format byte {first}, this decoder reads values format {VALUES_FORMAT}"
        )
    bits = int(data[1])
    if bits not in BITS:
        raise CodecError(f"{what}: {bits} bits per value, expected one of {BITS}")
    n, pos = read_varint(data, 2, count, f"{what}: count")
    if n != count:
        raise CodecError(f"{what}: {n} values, expected {count}")
    bucket, pos = read_varint(data, pos, MAX_BUCKET, f"{what}: bucket size")
    if bucket < 1:
        raise CodecError(f"{what}: bucket size 0")
    nb = -(-count // bucket)
    code_bytes = (count * bits + 7) // 8
    expected = pos + 4 * nb + code_bytes
    if data.shape[0] != expected:
        raise CodecError(f"{what}: {data.shape[0]} bytes, expected {expected}")
    scales = np.ascontiguousarray(data[pos : pos + 4 * nb]).view("<f4").astype(np.float32)
    if nb and not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise CodecError(f"{what}: a bucket scale is negative or not finite")
    packed = data[pos + 4 * nb :]
    rem = (count * bits) % 8
    if rem and packed[-1] & ((1 << (8 - rem)) - 1):
        raise CodecError(f"{what}: nonzero padding bits")
    u = _unpack(packed, count, bits)
    levels = _levels(bits)
    if count and int(u.max()) > 2 * levels:
        raise CodecError(f"{what}: a code above {2 * levels}")
    return _dequantised(u - levels, scales, bits, bucket)


def quantise_with_feedback(
    x,
    memory: np.ndarray | None,
    bits: int,
    *,
    rng: np.random.Generator | None = None,
    bucket: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Quantise ``x + memory`` (error feedback); return ``(message, new memory)``.

    ``memory`` is what earlier messages did not carry (None or zeros at the start; float32,
    same size as ``x``); the new memory is ``x + memory - dequantise(message)``, computed
    in float32 exactly as the receiver decodes, so that over rounds the values sent plus
    the final memory add up to the values given.
    """
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    if memory is None:
        target = x
    else:
        memory = np.asarray(memory, dtype=np.float32).reshape(-1)
        if memory.shape != x.shape:
            raise ValueError(f"memory has {memory.size} values, x {x.size}")
        target = x + memory
    message = quantise(target, bits, rng=rng, bucket=bucket)
    return message, target - dequantise(message, x.shape[0])
