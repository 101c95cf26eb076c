"""A small importance upload: what PruneFL's solver needs of G, and little else.

The server's solver (`fedprune.reconfigure`) reads a node's importance ``G_j >= 0`` in two
ways: the sum of G over the kept weights it keeps fixed, and the order of ``G_j / t_l``
among the candidates (the released kept weights and the pruned ones) down to the prefix it
takes.  The prefix is short: PruneFL regrows at most a few percent of a layer's pruned
weights.  So per prunable layer the node sends

* the importance of every kept weight (the server knows which they are: the mask it
  sent), and
* the importance of its ``s`` most important pruned weights, their positions coded as a
  mask over the pruned positions (`fedprune.maskcode`), with
  ``s = min(pruned, max(ceil(top_fraction * pruned), min_sent))``;
  the rest of the pruned weights count as 0 (a weight with ``G = 0`` is never regrown).

Each sent value is rounded to a short float, the float32 bit pattern rounded to
``mantissa_bits`` mantissa bits (a log-scale quantiser, 2**mantissa_bits steps per
octave, relative error at most 2**-(mantissa_bits + 1)), and its distance below the
layer's largest code is entropy coded with rANS (`fedprune.rans`) under a frequency table
sent with it.  The distance is at most 4095 codes (`MAX_ALPHABET`): 4095 / 2**mantissa_bits
octaves, 256 at the default 4 bits (more than float32's range) but 32 at 7 bits.  A value
further below the layer's largest is sent as that lowest level, above its true value, and
the error bound holds for the others only; such a weight has 2**-32 of the layer's
largest importance or less, far below any that regrowth could choose.

The server sums the uploads over nodes and rounds (`ImportanceSum`).  A pruned weight that
one upload left out has, for that node, an importance below the smallest pruned one it
sent (its *floor*).  Counting it as 0 pushes exactly the weights near the solver's cut,
which some uploads send and others just miss, below the cut.  So the sum counts a left-out
value as ``floor * share**2``, where ``share`` is the fraction of the uploads that did
send the weight: near the floor for a weight almost every node sends, near 0 for one that
a single node sent by chance, and 0 for a weight no upload sent, which is therefore never
regrown.  The rule and its constants were chosen on the default task
(`experiments/bench_importance.py`: a plain sum, a constant share of the floor, and the
share's first and second powers, in both upload modes).

Byte layout in `docs/wire.md`.  The decoder treats its input as untrusted: every count is
bounded by the layer's size and mask before anything is allocated, and anything that does
not fit raises `fedprune.codec.CodecError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import torch

from fedprune import numba_cache, rans
from fedprune.errors import CodecError
from fedprune.maskcode import decode_body, encode_body, read_varint, read_words, write_varint

numba_cache.install()  # one compile per version of this file, not per copy of it

__all__ = [
    "IMPORTANCE_FORMAT",
    "ImportanceCode",
    "ImportanceSum",
    "ImportanceUpload",
    "decode_importance",
    "encode_importance",
    "sent_count",
]

IMPORTANCE_FORMAT = 0x03
"""First byte of a coded importance upload: format 3 (version 1)."""

MAX_MANTISSA_BITS = 7
MAX_ALPHABET = 4097  # the zero symbol plus 4096 levels below the largest code
MAX_TABLE_SCALE = 20
_TABLE_SCALE = 18  # the encoder's choice: rare levels cost at most ~18 bits

_FLOAT32_MAX_BITS = 0x7F7FFFFF


def sent_count(pruned: int, top_fraction: float, min_sent: int) -> int:
    """How many of a layer's ``pruned`` weights a node sends: the top
    ``ceil(top_fraction * pruned)``, at least ``min_sent``, at most all of them."""
    return min(pruned, max(math.ceil(top_fraction * pruned), min_sent))


@dataclass(frozen=True)
class ImportanceCode:
    """A node's settings for coding its importance (`encode_importance`'s keywords).

    mantissa_bits: precision of each value, 0..7: 2**mantissa_bits steps per octave,
        relative error at most 2**-(mantissa_bits + 1).
    top_fraction: share (fraction in [0, 1]) of each layer's pruned weights sent.
    min_sent: at least this many pruned weights per layer are sent (so small layers go
        whole).
    """

    mantissa_bits: int = 4
    top_fraction: float = 0.1
    min_sent: int = 1 << 16

    def encode(self, g, mask) -> np.ndarray:
        """`encode_importance` with these settings."""
        return encode_importance(
            g,
            mask,
            mantissa_bits=self.mantissa_bits,
            top_fraction=self.top_fraction,
            min_sent=self.min_sent,
        )


def _codes(g: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """Float32 values >= 0 rounded to ``mantissa_bits`` mantissa bits, as their bit
    patterns shifted right by ``23 - mantissa_bits`` (monotone in the value; 0 is 0.0)."""
    shift = 23 - mantissa_bits
    bits = g.view(np.uint32).astype(np.uint64)
    q = (bits + (1 << shift >> 1)) >> shift  # round half up on the bit pattern
    # Rounding up the largest finite floats would give inf: keep them at the top code.
    return np.minimum(q, _FLOAT32_MAX_BITS >> shift).astype(np.int64)


def _quantised_freqs(counts: np.ndarray, scale: int) -> np.ndarray:
    """Integer frequencies summing to ``2**scale``, every used symbol at least 1: one unit
    reserved per used symbol, the rest shared in proportion to the counts (rounded down),
    what rounding left over to the most frequent symbol.  Needs fewer used symbols than
    ``2**scale`` (at most 4097 here, against 2**18)."""
    used = counts > 0
    spare = (1 << scale) - int(used.sum())
    f = used.astype(np.int64) + counts.astype(np.int64) * spare // int(counts.sum())
    f[int(np.argmax(counts))] += (1 << scale) - int(f.sum())
    return f


def encode_importance(
    g,
    mask,
    *,
    mantissa_bits: int = 4,
    top_fraction: float = 0.1,
    min_sent: int = 1 << 16,
) -> np.ndarray:
    """Code one layer's importance for the server (see the module docstring); return a
    1-D uint8 array.

    Args:
        g: importance, any float array of the layer's shape (flattened row-major),
            finite and >= 0.
        mask: the bool mask the node trained with (True = kept), same size.
        mantissa_bits: precision of each value, 0..7 (relative error at most
            2**-(mantissa_bits + 1) within 4095 / 2**mantissa_bits octaves of the
            largest value; below that, the lowest level).
        top_fraction: share (fraction in [0, 1]) of the layer's pruned weights sent.
        min_sent: at least this many pruned weights are sent (all of them in small layers).

    Raises:
        ValueError: on mismatched sizes, negative or non-finite importance, or settings out
            of range.
    """
    g = np.ascontiguousarray(np.asarray(g, dtype=np.float32).reshape(-1))
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise ValueError(f"mask must be bool, got {m.dtype}")
    m = m.reshape(-1)
    if g.shape != m.shape:
        raise ValueError(f"importance has {g.size} values, the mask {m.size} positions")
    if not 0 <= mantissa_bits <= MAX_MANTISSA_BITS:
        raise ValueError(f"mantissa_bits = {mantissa_bits} must be in [0, {MAX_MANTISSA_BITS}]")
    if not 0.0 <= top_fraction <= 1.0 or min_sent < 0:
        raise ValueError(f"top_fraction = {top_fraction} must be in [0, 1], min_sent >= 0")
    if g.size and not (np.isfinite(g).all() and (g >= 0).all()):
        raise ValueError("importance must be finite and >= 0")
    g = g + np.float32(0.0)  # -0.0 -> +0.0, so bit patterns order like values

    s = sent_count(g.size - int(np.count_nonzero(m)), top_fraction, min_sent)
    sent, sent_values = _select_top(g, m, s)
    _, pos_words = encode_body(sent)
    head = bytearray([IMPORTANCE_FORMAT, mantissa_bits])
    head += write_varint(s) + write_varint(pos_words.shape[0])
    parts = [np.frombuffer(bytes(head), dtype=np.uint8), _le(pos_words)]

    values = np.concatenate([g[m], sent_values])
    if values.size:
        q = _codes(values, mantissa_bits)
        qmax = int(q.max())
        # Symbol 0: exactly 0.  Symbol d >= 1: code qmax - (d - 1), clipped to the alphabet.
        sym = np.where(q == 0, 0, np.minimum(qmax - q + 1, MAX_ALPHABET - 1))
        alphabet = int(sym.max()) + 1
        freqs = _quantised_freqs(np.bincount(sym, minlength=alphabet), _TABLE_SCALE)
        table = rans.table_from_freqs(freqs, _TABLE_SCALE)
        tail = bytearray(int(qmax).to_bytes(4, "little"))
        tail += write_varint(alphabet) + bytes([_TABLE_SCALE])
        tail += b"".join(write_varint(int(f)) for f in freqs)
        parts += [
            np.frombuffer(bytes(tail), dtype=np.uint8),
            _le(rans.encode(sym.astype(np.uint16), table)),
        ]
    return np.concatenate(parts)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _select_top(g, keep, s):  # pragma: no cover - compiled
    """The `s` most important pruned positions: (flags over the pruned positions, in
    position order; their importance, in position order). `g`: the importance, float32,
    >= 0 and without -0.0, so that its bit patterns order like its values; `keep`: the
    mask. A radix selection on the patterns, 16 bits at a time (two histogram passes
    and one marking pass), instead of gathering the pruned values and partially sorting
    them: 30 against 155 ms on fc1 (6.1 M pruned positions, 10 % sent; a probe,
    2026-12-03). Ties at the threshold go to the lowest positions."""
    bits = g.view(np.uint32)
    n = bits.shape[0]
    hist = np.zeros(1 << 16, np.int64)
    pruned = 0
    for i in range(n):
        if not keep[i]:
            hist[bits[i] >> 16] += 1
            pruned += 1
    sent = np.zeros(pruned, np.bool_)
    values = np.empty(max(s, 0), np.float32)
    if s <= 0:
        return sent, values
    high = (1 << 16) - 1
    above = 0  # pruned patterns above the threshold's upper 16 bits
    while above + hist[high] < s:
        above += hist[high]
        high -= 1
    hist[:] = 0
    for i in range(n):
        if not keep[i] and (bits[i] >> 16) == high:
            hist[bits[i] & 0xFFFF] += 1
    low = (1 << 16) - 1
    while above + hist[low] < s:
        above += hist[low]
        low -= 1
    threshold = (np.uint32(high) << np.uint32(16)) | np.uint32(low)
    ties = s - above  # positions at exactly the threshold to send
    j = 0
    k = 0
    for i in range(n):
        if keep[i]:
            continue
        v = bits[i]
        if v > threshold or (v == threshold and ties > 0):
            if v == threshold:
                ties -= 1
            sent[j] = True
            values[k] = g[i]
            k += 1
        j += 1
    return sent, values


def _le(words: np.ndarray) -> np.ndarray:
    return words.astype("<u4", copy=False).view(np.uint8)


@dataclass(frozen=True)
class ImportanceUpload:
    """One layer of one node's decoded upload (validated).

    Attributes:
        kept: flat bool mask the upload was coded against (True = kept), n positions.
        kept_values: float32 importance of the kept positions, in position order.
        sent: int64 flat indices (ascending) of the pruned positions the node sent.
        sent_values: float32 importance of those positions.
    """

    kept: np.ndarray
    kept_values: np.ndarray
    sent: np.ndarray
    sent_values: np.ndarray

    @property
    def size(self) -> int:
        return int(self.kept.shape[0])

    @property
    def floor(self) -> float:
        """The smallest importance sent among pruned positions when some pruned positions
        were not sent (theirs is at most this), else 0.0."""
        pruned = self.size - self.kept_values.shape[0]
        if self.sent.shape[0] == 0 or self.sent.shape[0] == pruned:
            return 0.0
        return float(self.sent_values.min())

    def scaled(self, factor: float) -> ImportanceUpload:
        """The same upload with every value multiplied by `factor` (a node's importance
        reweighted when the server counts fewer of its examples than it claimed)."""
        f = np.float32(factor)
        return ImportanceUpload(self.kept, self.kept_values * f, self.sent, self.sent_values * f)

    def dense(self) -> np.ndarray:
        """Dense flat float32 importance, 0.0 where nothing was sent."""
        out = np.zeros(self.size, dtype=np.float32)
        out[self.kept] = self.kept_values
        out[self.sent] = self.sent_values
        return out


def decode_importance(data, mask, *, what: str = "importance") -> ImportanceUpload:
    """Decode one layer's upload (untrusted) against the mask the node trained with
    (trusted: the server sent it; flattened row-major).  CodecError, whose text starts
    with ``what``, on anything inconsistent; allocations are bounded by the mask's size."""
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
        got = f"{data.dtype}, shape {data.shape}" if isinstance(data, np.ndarray) else type(data)
        raise CodecError(f"{what}: expected a 1-D uint8 array, got {got}")
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise CodecError(f"{what}: the held mask must be bool, got {m.dtype}")
    m = m.reshape(-1)
    n = m.shape[0]
    k = int(np.count_nonzero(m))
    buf = data
    if buf.shape[0] < 2 or int(buf[0]) != IMPORTANCE_FORMAT:
        first = int(buf[0]) if buf.shape[0] else None
        raise CodecError(
            f"{what}: format byte {first}, this decoder reads importance format {IMPORTANCE_FORMAT}"
        )
    mbits = int(buf[1])
    if mbits > MAX_MANTISSA_BITS:
        raise CodecError(f"{what}: mantissa bits {mbits} > {MAX_MANTISSA_BITS}")
    s, pos = read_varint(buf, 2, n - k, f"{what}: sent count")
    nw, pos = read_varint(buf, pos, buf.shape[0] // 4, f"{what}: position words")
    split = pos + 4 * nw
    if split > buf.shape[0]:
        raise CodecError(f"{what}: position words: {nw} words, but {buf.shape[0] - pos} bytes left")
    sent = decode_body(read_words(buf, pos, split, what), n - k, s, f"{what} (positions)")
    pos = split
    count = k + s
    if count == 0:
        if pos != buf.shape[0]:
            raise CodecError(f"{what}: {buf.shape[0] - pos} bytes after an empty upload")
        empty = np.zeros(0, dtype=np.float32)
        return ImportanceUpload(m, empty, np.zeros(0, dtype=np.int64), empty)
    if pos + 4 > buf.shape[0]:
        raise CodecError(f"{what}: truncated before the largest code")
    qmax = int.from_bytes(buf[pos : pos + 4].tobytes(), "little")
    shift = 23 - mbits
    if qmax > _FLOAT32_MAX_BITS >> shift:
        raise CodecError(f"{what}: largest code {qmax} is not a finite float32")
    alphabet, pos = read_varint(buf, pos + 4, MAX_ALPHABET, f"{what}: alphabet size")
    if alphabet < 1 or alphabet > qmax + 1:  # symbol d >= 1 stands for code qmax - (d - 1) >= 1
        raise CodecError(f"{what}: alphabet of {alphabet} levels below a largest code {qmax}")
    if pos >= buf.shape[0]:
        raise CodecError(f"{what}: truncated before the table scale")
    scale = int(buf[pos])
    if not 1 <= scale <= MAX_TABLE_SCALE:
        raise CodecError(f"{what}: table scale {scale} outside [1, {MAX_TABLE_SCALE}]")
    pos += 1
    freqs = np.empty(alphabet, dtype=np.int64)
    for i in range(alphabet):
        freqs[i], pos = read_varint(buf, pos, 1 << scale, f"{what}: frequency {i}")
    if int(freqs.sum()) != 1 << scale:
        raise CodecError(f"{what}: frequencies sum to {int(freqs.sum())}, not 2**{scale}")
    words = read_words(buf, pos, buf.shape[0], what)
    if words.shape[0] > count + 2:
        raise CodecError(f"{what}: {words.shape[0]} coded words for {count} values")
    sym = np.empty(count, dtype=np.uint16)  # the alphabet has at most 4097 symbols
    status = rans.decode(words, count, rans.table_from_freqs(freqs, scale), sym)
    if status:
        raise CodecError(f"{what}: {rans.RansStatus.TEXT[status]}")
    # In uint32: (qmax + 1) << shift is at most a finite float32's bit pattern.
    codes = np.uint32(qmax + 1) - sym.astype(np.uint32)
    values = np.where(sym == 0, np.uint32(0), codes << np.uint32(shift)).view(np.float32)
    return ImportanceUpload(m, values[:k], np.flatnonzero(~m)[sent], values[k:])


class ImportanceSum:
    """The server's sum of importance over nodes and rounds, from coded uploads
    (`ImportanceUpload`) or exact ones (dense tensors or arrays), per prunable layer.

    ``total()`` is what `fedprune.reconfigure.reconfigure` takes: per position, the sum of
    the values sent, plus, for each coded upload that left it out while pruned,
    ``imputation * floor * share**2``, where ``floor`` is that upload's smallest sent pruned
    value (the left-out value lies below it) and ``share`` the fraction of all uploads
    that sent a value for the position (see the module docstring).  ``imputation = 0``
    gives the plain sum.  Memory: 12 bytes per position (float32 sum, imputed sum and
    count of uploads that sent it).
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], imputation: float = 1.0) -> None:
        if not 0.0 <= imputation <= 1.0:
            raise ValueError(f"imputation = {imputation} must be in [0, 1]")
        self.shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        self.imputation = float(imputation)
        self.uploads = 0
        self._sum: dict[str, np.ndarray] = {}
        self._imputed: dict[str, np.ndarray] = {}
        self._seen: dict[str, np.ndarray] = {}

    def _layer(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if name not in self._sum:
            n = math.prod(self.shapes[name])
            self._sum[name] = np.zeros(n, dtype=np.float32)
            self._imputed[name] = np.zeros(n, dtype=np.float32)
            self._seen[name] = np.zeros(n, dtype=np.float32)
        return self._sum[name], self._imputed[name], self._seen[name]

    def add(self, upload: Mapping[str, Any]) -> None:
        """Add one node's upload: per prunable layer an `ImportanceUpload` or an exact
        dense importance (torch tensor or numpy array of the layer's shape)."""
        if set(upload) != set(self.shapes):
            raise ValueError(
                f"an upload must cover the layers {sorted(self.shapes)}, got {sorted(upload)}"
            )
        for name, item in upload.items():
            n = math.prod(self.shapes[name])
            if isinstance(item, ImportanceUpload):
                if item.size != n:
                    raise ValueError(f"upload of {name!r} has {item.size} positions, not {n}")
            elif np.asarray(item).size != n:
                raise ValueError(f"importance of {name!r} has {np.asarray(item).size} values")
        for name, item in upload.items():
            total, imputed, seen = self._layer(name)
            if isinstance(item, ImportanceUpload):
                total[item.kept] += item.kept_values
                total[item.sent] += item.sent_values
                seen[item.kept] += 1
                seen[item.sent] += 1
                fill = np.float32(self.imputation * item.floor)
                if fill > 0:
                    unsent = ~item.kept
                    unsent[item.sent] = False
                    imputed[unsent] += fill
            else:
                g = item.detach().cpu().numpy() if hasattr(item, "detach") else np.asarray(item)
                total += g.reshape(-1).astype(np.float32, copy=False)
                seen += 1
        self.uploads += 1

    def total(self) -> dict[str, torch.Tensor]:
        """The summed importance per layer, float32 tensors of the layers' shapes (zeros for
        a layer no upload has reached yet)."""
        out = {}
        for name, shape in self.shapes.items():
            if name in self._sum:
                share = self._seen[name] / np.float32(max(self.uploads, 1))
                g = self._sum[name] + np.square(share) * self._imputed[name]
            else:
                g = np.zeros(math.prod(shape), dtype=np.float32)
            out[name] = torch.from_numpy(g.astype(np.float32, copy=False)).reshape(shape)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint (copies)."""
        return {
            "imputation": self.imputation,
            "uploads": self.uploads,
            # Tensors, not arrays: checkpoints load weights-only.
            "layers": {
                name: tuple(
                    torch.from_numpy(a.copy())
                    for a in (self._sum[name], self._imputed[name], self._seen[name])
                )
                for name in self._sum
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.imputation = float(state["imputation"])
        self.uploads = int(state["uploads"])
        self._sum, self._imputed, self._seen = {}, {}, {}
        for name, arrays in state["layers"].items():
            total, imputed, seen = (np.asarray(a, dtype=np.float32) for a in arrays)
            n = math.prod(self.shapes[name])
            if not (total.shape == imputed.shape == seen.shape == (n,)):
                raise ValueError(f"checkpointed importance of {name!r} is not {n} long")
            # `seen` counts uploads per position (the share of the fill-in rule).
            self._sum[name], self._imputed[name], self._seen[name] = total, imputed, seen
