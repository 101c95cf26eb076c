"""rANS: the entropy coder under the mask, mask-change and importance codes.

A range-variant asymmetric numeral system (Duda 2013) in the layout of Fabian Giesen's
``rans64`` (public domain): a 64-bit state, 32-bit output words, and a static frequency
table whose total is ``2**scale``.  The message is a sequence of 32-bit words, written
little-endian on the wire (`docs/wire.md`).  Because rANS is last-in first-out, the
encoder runs over the symbols backwards, and the decoder reads the words forwards.

The decoder treats its input as untrusted: it never reads past the words it was given,
keeps its state in [2**31, 2**63) whatever the words say (so no arithmetic overflows), and
reports a truncated stream, left-over words, or a final state other than the encoder's
start state (``2**31`` plus a value the caller derives from its header).  The last check
catches almost every corrupted stream (a random stream passes it with probability about
2**-31); the callers add their own checks (counts, padding), and transport integrity
remains the transport's job.

The loops are compiled with numba (one pass over the symbols, no Python per symbol).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numba
import numpy as np

from fedprune import numba_cache

numba_cache.install()  # one compile per version of this file, not per copy of it

__all__ = [
    "LOOKUP_BITS",
    "LOWER",
    "MAX_SCALE",
    "RansStatus",
    "Table",
    "decode",
    "encode",
    "table_from_freqs",
]

LOWER = 1 << 31
"""The state's lower bound, and the encoder's default start state (the decoder's end)."""

MAX_SCALE = 31
"""The largest frequency-table precision: frequencies sum to ``2**scale``, scale <= 31."""


class RansStatus:
    """Return codes of `decode` (0 is success), and what each means."""

    OK = 0
    TRUNCATED = 1  # the state needed a word and none was left
    BAD_FINAL_STATE = 2  # decoding did not end in the state the encoder started from
    EXTRA_WORDS = 3  # words left over after the last symbol
    BAD_INITIAL_STATE = 4  # fewer than 2 words, or a first state outside [2**31, 2**63)

    TEXT: ClassVar[dict[int, str]] = {
        1: "truncated (the coded stream ended before its last symbol)",
        2: "corrupted (the coded stream does not end where its encoder started)",
        3: "words left over after the last symbol",
        4: "bad initial state (fewer than 2 words, or a state outside [2**31, 2**63))",
    }


LOOKUP_BITS = 12
"""The decoder finds a symbol from the top 12 bits of its slot, then a short search."""


@dataclass(frozen=True)
class Table:
    """A static frequency table: frequencies summing to ``2**scale``.

    Attributes:
        cum: uint64 cumulative frequencies, length ``A + 1`` (``cum[0] = 0``,
            ``cum[A] = 2**scale``); symbol ``s`` has frequency ``cum[s+1] - cum[s]``.
        scale: the precision in bits.
        lookup: int64, length ``2**b + 1`` with ``b = min(scale, LOOKUP_BITS)``: the
            symbol whose interval holds slot ``i << (scale - b)`` (the last entry is the
            last symbol), so a slot's symbol lies in ``[lookup[i], lookup[i+1]]``.
    """

    cum: np.ndarray
    scale: int
    lookup: np.ndarray

    @property
    def bucket_bits(self) -> int:
        return self.lookup.shape[0].bit_length() - 1


def table_from_freqs(freqs: np.ndarray, scale: int) -> Table:
    """The `Table` of integer frequencies that sum to ``2**scale``; ValueError otherwise
    (callers build tables from trusted code, or validate a transmitted one first)."""
    freqs = np.asarray(freqs, dtype=np.int64)
    if not 1 <= scale <= MAX_SCALE:
        raise ValueError(f"scale {scale} must be in [1, {MAX_SCALE}]")
    if freqs.ndim != 1 or freqs.size == 0 or (freqs < 0).any():
        raise ValueError("frequencies must be a non-empty 1-D array of non-negative ints")
    if int(freqs.sum()) != 1 << scale:
        raise ValueError(f"frequencies sum to {int(freqs.sum())}, not 2**{scale}")
    cum = np.zeros(freqs.size + 1, dtype=np.uint64)
    np.cumsum(freqs, out=cum[1:].view(np.int64))
    bits = min(scale, LOOKUP_BITS)
    starts = np.arange(1 << bits, dtype=np.uint64) << np.uint64(scale - bits)
    lookup = np.empty((1 << bits) + 1, dtype=np.int64)
    lookup[:-1] = np.searchsorted(cum, starts, side="right") - 1
    lookup[-1] = freqs.size - 1
    return Table(cum, scale, lookup)


@numba.njit(cache=True, nogil=True)
def _encode(symbols, cum, scale, start):  # pragma: no cover - compiled
    n = symbols.shape[0]
    out = np.empty(n + 2, dtype=np.uint32)  # at most one word per symbol, plus the state
    top = 0  # words pushed so far (in push order, reversed at the end)
    x = np.uint64(start)
    sh = np.uint64(scale)
    lim_shift = np.uint64(32 + 31 - scale)  # ((LOWER >> scale) << 32) == 2**(63 - scale)
    mask32 = np.uint64(0xFFFFFFFF)
    s32 = np.uint64(32)
    for i in range(n - 1, -1, -1):
        s = symbols[i]
        c = cum[s]
        f = cum[s + 1] - c
        if x >= (f << lim_shift):
            out[top] = np.uint32(x & mask32)
            top += 1
            x = x >> s32
        x = ((x // f) << sh) + (x % f) + c
    # Stream order (what the decoder reads): state low, state high, then the pushed
    # words from last pushed to first.
    res = np.empty(top + 2, dtype=np.uint32)
    res[0] = np.uint32(x & mask32)
    res[1] = np.uint32(x >> s32)
    for j in range(top):
        res[2 + j] = out[top - 1 - j]
    return res


@numba.njit(cache=True, nogil=True)
def _decode(words, count, cum, scale, lookup, bucket_bits, end, out):  # pragma: no cover
    nw = words.shape[0]
    if nw < 2:
        return 4
    s32 = np.uint64(32)
    x = np.uint64(words[0]) | (np.uint64(words[1]) << s32)
    lower = np.uint64(LOWER)
    if x < lower or x >= (np.uint64(1) << np.uint64(63)):
        return 4
    pos = 2
    sh = np.uint64(scale)
    slot_mask = (np.uint64(1) << sh) - np.uint64(1)
    bucket_shift = np.uint64(scale - bucket_bits)
    for i in range(count):
        slot = x & slot_mask
        b = slot >> bucket_shift
        lo = lookup[b]
        hi = lookup[b + 1] + 1  # invariant: cum[lo] <= slot < cum[hi]
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            if cum[mid] <= slot:
                lo = mid
            else:
                hi = mid
        out[i] = lo
        c = cum[lo]
        x = (cum[lo + 1] - c) * (x >> sh) + slot - c
        if x < lower:
            if pos >= nw:
                return 1
            x = (x << s32) | np.uint64(words[pos])
            pos += 1
    if x != np.uint64(end):
        return 2
    if pos != nw:
        return 3
    return 0


def _check_start(start: int) -> None:
    if not LOWER <= start < 2 * LOWER:
        raise ValueError(f"start state {start} must be in [2**31, 2**32)")


def encode(symbols: np.ndarray, table: Table, start: int = LOWER) -> np.ndarray:
    """Encode ``symbols`` (1-D unsigned ints, each with a nonzero frequency in ``table``);
    return the words (uint32, in decoding order, native byte order).

    ``start``, in [2**31, 2**32), is the encoder's initial state, which the decoder must end
    in: callers derive it from their header so that a header changed in transit fails the
    final check (it costs under one bit).
    """
    _check_start(start)
    return _encode(np.ascontiguousarray(symbols), table.cum, table.scale, start)


def decode(words: np.ndarray, count: int, table: Table, out: np.ndarray, start: int = LOWER) -> int:
    """Decode ``count`` symbols from ``words`` (uint32) into ``out`` (caller-allocated,
    at least ``count`` long), for an encoder that started in ``start``; return a
    `RansStatus` code (0 on success).

    Symbols with a zero frequency are never produced.  The caller bounds ``count`` and
    ``len(words)`` before calling; this function allocates nothing.
    """
    _check_start(start)
    if out.shape[0] < count:
        raise ValueError("out is shorter than count")
    status = _decode(
        words, count, table.cum, table.scale, table.lookup, table.bucket_bits, start, out
    )
    return int(status)
