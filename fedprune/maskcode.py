"""Masks and mask changes coded near their entropy bound, log2 C(n, k) bits.

The mask code
-------------
A flat bool mask of ``n`` positions with ``k`` ones costs at least log2 C(n, k) bits.  The
code here comes within a few bytes of it for every mask, whatever its arrangement:

* the minority value is coded (the ones when ``k <= n / 2``, else the zeros, i.e. the
  pruned positions of a dense mask), at density ``p = min(k, n - k) / n <= 1/2``;
* the mask is packed into bytes of 8 positions (``np.packbits``, first position in the
  most significant bit, padding bits zero);
* each byte is one rANS symbol (`fedprune.rans`) whose probability is that of its bit
  pattern under independent positions of density ``p``, ``p**c * (1 - p)**(8 - c)``
  for a byte with ``c`` ones, quantised to ``2**24``.

The code length of a mask with ``k`` ones under that model does not depend on where the
ones are: it is ``n * H(k/n)`` bits, which exceeds log2 C(n, k) by about
``0.5 * log2(2 pi k (n - k) / n)`` bits (a couple of bytes), plus the table's rounding and
the coder's 8-byte final state.  Masks of density 0 or 1 cost just their header.

The change code
---------------
A change from ``old`` to ``new`` is two masks coded as above: which of ``old``'s kept
positions were removed (a mask over the kept positions, in position order) and which of its
pruned positions were added (a mask over the pruned positions).  Its cost is near
log2 C(k, removed) + log2 C(n - k, added).

Byte layouts are in `docs/wire.md`.  The decoders treat their input as untrusted; the only
allocations are of the layer's size ``n`` (given by the caller, from the model), and every
inconsistency raises `fedprune.codec.CodecError`.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from fedprune import numba_cache, rans
from fedprune.errors import CodecError

numba_cache.install()  # one compile per version of this file, not per copy of it

__all__ = [
    "DIFF_FORMAT",
    "MASK_FORMAT",
    "SCALE",
    "decode_body",
    "decode_mask_bytes",
    "decode_mask_change",
    "encode_body",
    "encode_mask_bytes",
    "encode_mask_change",
    "mask_bound_bits",
    "read_varint",
    "read_words",
    "write_varint",
]

MASK_FORMAT = 0x01
"""First byte of a coded mask: format 1 (this module's mask code, version 1)."""
DIFF_FORMAT = 0x02
"""First byte of a coded mask change: format 2 (version 1)."""

SCALE = 24
"""Frequency-table precision of the mask code: frequencies sum to 2**24."""

_MAX_VARINT_BYTES = 10  # a uint64 in LEB128


# --------------------------------------------------------------------------------------
# varints (unsigned LEB128, minimal)


def write_varint(value: int) -> bytes:
    """Unsigned LEB128 of ``value`` (0 <= value < 2**64), 7 bits per byte, low first."""
    if not 0 <= value < 1 << 64:
        raise ValueError(f"varint out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(buf: np.ndarray, pos: int, limit: int, what: str) -> tuple[int, int]:
    """Read a minimal unsigned LEB128 from uint8 ``buf`` at ``pos``; return (value, next
    position).  CodecError if it runs past the buffer, is not minimal, or exceeds
    ``limit``; ``what`` names the field in the message."""
    value, shift = 0, 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= buf.shape[0]:
            raise CodecError(f"{what}: truncated varint")
        byte = int(buf[pos + i])
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if i and byte == 0:
                raise CodecError(f"{what}: non-minimal varint")
            if value > limit:
                raise CodecError(f"{what}: {value} exceeds its bound {limit}")
            return value, pos + i + 1
    raise CodecError(f"{what}: varint longer than {_MAX_VARINT_BYTES} bytes")


# --------------------------------------------------------------------------------------
# the byte model


_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1)
_BINOM8 = np.array([math.comb(8, c) for c in range(9)], dtype=np.int64)


def _table(n: int, m: int) -> rans.Table:
    """Cumulative frequencies (sum 2**SCALE) of the 256 byte values for ``m`` ones among
    ``n`` positions, ``0 < m <= n / 2``.

    Deterministic in IEEE-754 binary64 (each operation rounded to nearest), so another
    implementation builds the same table: ``p = m / n``, ``q = (n - m) / n``,
    ``P[c] = p**c * q**(8 - c)`` as products of repeated multiplications in the order
    written below, ``f[c] = max(1, floor(P[c] * 2**SCALE))`` for ``c >= 1``, and the zero
    byte takes the rest.
    """
    p = m / n
    q = (n - m) / n
    pw_p = [1.0] * 9
    pw_q = [1.0] * 9
    for c in range(1, 9):
        pw_p[c] = pw_p[c - 1] * p
        pw_q[c] = pw_q[c - 1] * q
    f = np.zeros(9, dtype=np.int64)
    for c in range(1, 9):
        f[c] = max(1, math.floor(pw_p[c] * pw_q[8 - c] * float(1 << SCALE)))
    f[0] = (1 << SCALE) - int((f[1:] * _BINOM8[1:]).sum())
    return rans.table_from_freqs(f[_POPCOUNT], SCALE)


_TABLES: dict[tuple[int, int], rans.Table] = {}


def _cached_table(n: int, m: int) -> rans.Table:
    key = (n, m)
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) > 256:
            _TABLES.clear()
        table = _TABLES[key] = _table(n, m)
    return table


def mask_bound_bits(n: int, k: int) -> float:
    """log2 C(n, k) in bits: the least any code can spend on a mask of k ones in n."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


# --------------------------------------------------------------------------------------
# the body: k (varint) then the rANS words of a flat bool array


def _as_flat_bool(mask) -> np.ndarray:
    a = np.asarray(mask)
    if a.dtype != np.bool_:
        raise TypeError(f"a mask must be a bool array, got dtype {a.dtype}")
    return a.reshape(-1)


def _start(k: int) -> int:
    """The rANS start state of a body with k ones: binds k (hence which value is coded, k
    or n - k ones) into the stream's final check."""
    return rans.LOWER + k % rans.LOWER


def encode_body(flat: np.ndarray) -> tuple[int, np.ndarray]:
    """(k, rANS words) of a flat bool array: format 1 without its header, for codes that
    embed masks (changes, importance positions); no words when k is 0 or n."""
    n = flat.shape[0]
    k = int(np.count_nonzero(flat))
    if k == 0 or k == n:
        return k, np.zeros(0, dtype=np.uint32)
    minority = flat if 2 * k <= n else ~flat
    m = min(k, n - k)
    return k, rans.encode(np.packbits(minority), _cached_table(n, m), _start(k))


def _words_le(words: np.ndarray) -> np.ndarray:
    return words.astype("<u4", copy=False).view(np.uint8)


def decode_body(words: np.ndarray, n: int, k: int, what: str) -> np.ndarray:
    """Flat bool array of n positions with k ones from its rANS words (uint32 native)."""
    if k == 0 or k == n:
        if words.shape[0]:
            raise CodecError(f"{what}: {words.shape[0]} coded words for a constant mask")
        return np.full(n, k == n, dtype=np.bool_)
    nbytes = (n + 7) // 8
    if not 2 <= words.shape[0] <= nbytes + 2:  # the state, at most one word per symbol
        raise CodecError(f"{what}: {words.shape[0]} coded words for {n} positions")
    m = min(k, n - k)
    packed = np.empty(nbytes, dtype=np.uint8)
    status = rans.decode(words, nbytes, _cached_table(n, m), packed, _start(k))
    if status:
        raise CodecError(f"{what}: {rans.RansStatus.TEXT[status]}")
    rem = n % 8
    if rem and packed[-1] & ((1 << (8 - rem)) - 1):
        raise CodecError(f"{what}: nonzero padding bits")
    if int(_POPCOUNT[packed].sum()) != m:
        raise CodecError(f"{what}: decoded {int(_POPCOUNT[packed].sum())} ones, header says {m}")
    flat = np.unpackbits(packed, count=n).view(np.bool_)
    if 2 * k > n:
        np.logical_not(flat, out=flat)
    return flat


def _check_buffer(data, what: str) -> np.ndarray:
    if not isinstance(data, np.ndarray):
        raise CodecError(f"{what}: expected a numpy array, got {type(data).__name__}")
    if data.dtype != np.uint8:
        raise CodecError(f"{what}: expected dtype uint8, got {data.dtype!s}")
    if data.ndim != 1:
        raise CodecError(f"{what}: expected a 1-D array, got shape {data.shape}")
    if data.shape[0] == 0:
        raise CodecError(f"{what}: empty")
    return data


def read_words(buf: np.ndarray, start: int, stop: int, what: str) -> np.ndarray:
    """The uint32 words in ``buf[start:stop]`` (little-endian), native order."""
    if not 0 <= start <= stop <= buf.shape[0]:
        raise CodecError(f"{what}: coded words at bytes {start}..{stop} of {buf.shape[0]}")
    if (stop - start) % 4:
        raise CodecError(f"{what}: {stop - start} bytes of coded words, not a multiple of 4")
    raw = np.ascontiguousarray(buf[start:stop])
    return raw.view("<u4").astype(np.uint32, copy=False)


# --------------------------------------------------------------------------------------
# whole masks


def encode_mask_bytes(mask) -> np.ndarray:
    """Code a bool mask (numpy or anything ``np.asarray`` takes; flattened in row-major
    order) as a 1-D uint8 array: format byte, varint kept count, rANS words.

    About log2 C(n, k) / 8 + 12 bytes; 2 to 11 bytes when the mask is all False or all
    True.
    """
    flat = _as_flat_bool(mask)
    k, words = encode_body(flat)
    head = bytes([MASK_FORMAT]) + write_varint(k)
    return np.concatenate([np.frombuffer(head, dtype=np.uint8), _words_le(words)])


def decode_mask_bytes(data: np.ndarray, n: int, *, what: str = "mask") -> np.ndarray:
    """Flat bool mask of ``n`` positions (``n`` trusted: the layer's size) from
    `encode_mask_bytes`'s output (untrusted).

    Raises CodecError, whose text starts with ``what``, on anything inconsistent: another
    format byte, a kept count above ``n``, a truncated or corrupted stream, left-over
    bytes.  Allocates only arrays of ``n`` bools and ``ceil(n / 8)`` bytes.
    """
    buf = _check_buffer(data, what)
    if int(buf[0]) != MASK_FORMAT:
        raise CodecError(
            f"{what}: format byte {int(buf[0])}, this decoder reads mask format {MASK_FORMAT}"
        )
    k, pos = read_varint(buf, 1, n, f"{what}: kept count")
    words = read_words(buf, pos, buf.shape[0], what)
    return decode_body(words, n, k, what)


# --------------------------------------------------------------------------------------
# mask changes


@numba.njit(cache=True, nogil=True)
def _split(old, new, k):  # pragma: no cover - compiled
    """(removed over old's kept positions, added over old's pruned positions); one pass,
    without branches (each position is written to both outputs, and only the cursor of
    the side it belongs to moves), so mid-density masks cost no mispredictions."""
    n = old.shape[0]
    o8 = old.view(np.uint8)
    w8 = new.view(np.uint8)
    removed = np.empty(k + 1, np.uint8)
    added = np.empty(n - k + 1, np.uint8)
    j = 0
    m = 0
    for i in range(n):
        o = o8[i]
        w = w8[i]
        removed[j] = 1 - w
        added[m] = w
        j += o
        m += 1 - o
    return removed[:k].view(np.bool_), added[: n - k].view(np.bool_)


@numba.njit(cache=True, nogil=True)
def _merge(old, removed, added):  # pragma: no cover - compiled
    """The inverse of `_split`: the new mask, in one branch-free pass."""
    n = old.shape[0]
    o8 = old.view(np.uint8)
    r = np.zeros(removed.shape[0] + 1, np.uint8)  # one spare: the cursor may point past
    r[:-1] = removed.view(np.uint8)
    a = np.zeros(added.shape[0] + 1, np.uint8)
    a[:-1] = added.view(np.uint8)
    out = np.empty(n, np.uint8)
    j = 0
    m = 0
    for i in range(n):
        o = o8[i]
        out[i] = (o & (1 - r[j])) | ((1 - o) & a[m])
        j += o
        m += 1 - o
    return out.view(np.bool_)


def encode_mask_change(old, new) -> np.ndarray:
    """Code the change from bool mask ``old`` to ``new`` (same size) as a 1-D uint8 array:
    format byte, varint removed count, varint added count, varint number of words of the
    removed part, its words, then the words of the added part.

    "Removed" is a mask over old's kept positions (in position order), "added" over old's
    pruned positions; each is coded like a whole mask.  About
    (log2 C(k, removed) + log2 C(n - k, added)) / 8 + 24 bytes.
    """
    o, w = _as_flat_bool(old), _as_flat_bool(new)
    if o.shape != w.shape:
        raise ValueError(f"old mask has {o.size} positions, new mask {w.size}")
    removed, added = _split(
        np.ascontiguousarray(o), np.ascontiguousarray(w), int(np.count_nonzero(o))
    )
    r, words_r = encode_body(removed)
    a, words_a = encode_body(added)
    head = bytes([DIFF_FORMAT]) + write_varint(r) + write_varint(a) + write_varint(words_r.shape[0])
    return np.concatenate(
        [np.frombuffer(head, dtype=np.uint8), _words_le(words_r), _words_le(words_a)]
    )


def decode_mask_change(old, data: np.ndarray, *, what: str = "mask change") -> np.ndarray:
    """The new flat bool mask from ``old`` (trusted: the mask the node holds) and
    `encode_mask_change`'s output (untrusted).  CodecError as `decode_mask_bytes`; the
    counts are bounded by old's kept and pruned counts before anything is allocated."""
    o = _as_flat_bool(old)
    n = o.shape[0]
    buf = _check_buffer(data, what)
    if int(buf[0]) != DIFF_FORMAT:
        raise CodecError(
            f"{what}: format byte {int(buf[0])}, this decoder reads change format {DIFF_FORMAT}"
        )
    k = int(np.count_nonzero(o))
    r, pos = read_varint(buf, 1, k, f"{what}: removed count")
    a, pos = read_varint(buf, pos, n - k, f"{what}: added count")
    nw, pos = read_varint(buf, pos, buf.shape[0] // 4, f"{what}: removed words")
    split = pos + 4 * nw
    if split > buf.shape[0]:
        raise CodecError(f"{what}: removed words: {nw} words, but {buf.shape[0] - pos} bytes left")
    removed = decode_body(read_words(buf, pos, split, what), k, r, f"{what} (removed)")
    added = decode_body(read_words(buf, split, buf.shape[0], what), n - k, a, f"{what} (added)")
    return _merge(np.ascontiguousarray(o), removed, added)
