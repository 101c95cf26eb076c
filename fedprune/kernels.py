"""Compiled CPU kernels (numba): the direct sparse convolution's products, the CSR layer's
batch products, weight gradient and structure, the masked SGD update, and 2x2
max-pooling.

Everything here is compiled by numba at first use (a few seconds on a fresh machine) and
cached on disk (`cache=True`: next to this file, or in numba's user cache directory where
the package directory is not writable; `NUMBA_CACHE_DIR` overrides). `available()` does
the compiling once per process and checks each kernel against a numpy reference. If numba
is missing, or anything fails to compile or gives a wrong answer, it logs the reason once
as a warning and returns False, and callers use torch's dense operations instead:
`fedprune.sparse_conv` layers train masked dense, `fedprune.training.MaskedSGD` masks
with torch multiplies, `fedprune.models.MaxPool2d` pools a channels-last copy with torch.
Nothing falls back silently.

Threads: each kernel has a serial and a `prange` version; `run` picks the parallel one
when torch is allowed more than one thread (`torch.get_num_threads()`), with as many
numba threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import platform
import threading
from pathlib import Path

import numpy as np
import torch

from fedprune import numba_cache

_log = logging.getLogger(__name__)

try:  # numba is optional at import time: without it callers use torch's dense ops.
    import numba
    from numba import njit, prange

    _NUMBA_IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - exercised only where numba is missing
    numba = None
    _NUMBA_IMPORT_ERROR = f"numba does not import: {type(exc).__name__}: {exc}"

# Elements per parallel chunk of the masked update (256 KiB of float32).
_CHUNK = 1 << 16


# --- Kernels ------------------------------------------------------------------------
#
# Index arithmetic is in uint64 on purpose: numba wraps negative signed indices around
# (x[-1] is the last element), and that check per access keeps LLVM from vectorising the
# inner loops (measured: 2.7 vs 35 G multiply-adds per second). All offsets are
# non-negative by construction.
#
# Zeros are typed from an array's dtype (`g.dtype.type(0)`), never written `g[0] * 0`:
# numba types the literal 0 as int64, so that product is float64, and accumulators started
# from it sum float32 data in float64. In the weight gradient that halved the vector width
# and added a conversion per product: 2.3 to 2.5x slower on one thread
# (`python -m experiments.bench_kernel_parts`; tests/test_kernel_types.py guards it).


if numba is not None:
    numba_cache.install()  # one compile per version of this file, not per copy of it

    _u = np.uint64

    @njit(fastmath=True, boundscheck=False, cache=True, inline="always")
    def spmm_row(x, out, rowptr, offs, vals, bias, m, nseg, seglen, x_stride, o_stride, o_row):
        """out[m] = bias[m] + sum over the kept weights k of row m of vals[k] * x[offs[k]:]
        over nseg segments of seglen floats (segment s at s*x_stride in x, s*o_stride in
        out)."""
        ob = _u(m) * o_row
        bm = bias[m]
        for s in range(nseg):
            o0 = ob + s * o_stride
            for j in range(seglen):
                out[o0 + j] = bm
        k = rowptr[m]
        end = rowptr[m + 1]
        while k + 8 <= end:
            w0, w1, w2, w3 = vals[k], vals[k + 1], vals[k + 2], vals[k + 3]
            w4, w5, w6, w7 = vals[k + 4], vals[k + 5], vals[k + 6], vals[k + 7]
            for s in range(nseg):
                o0 = ob + s * o_stride
                xs = s * x_stride
                a0, a1, a2, a3 = offs[k] + xs, offs[k + 1] + xs, offs[k + 2] + xs, offs[k + 3] + xs
                a4, a5, a6, a7 = (
                    offs[k + 4] + xs,
                    offs[k + 5] + xs,
                    offs[k + 6] + xs,
                    offs[k + 7] + xs,
                )
                for j in range(seglen):
                    out[o0 + j] += (
                        w0 * x[a0 + j] + w1 * x[a1 + j] + w2 * x[a2 + j] + w3 * x[a3 + j]
                    ) + (w4 * x[a4 + j] + w5 * x[a5 + j] + w6 * x[a6 + j] + w7 * x[a7 + j])
            k += 8
        if k + 4 <= end:
            w0, w1, w2, w3 = vals[k], vals[k + 1], vals[k + 2], vals[k + 3]
            for s in range(nseg):
                o0 = ob + s * o_stride
                xs = s * x_stride
                a0, a1, a2, a3 = offs[k] + xs, offs[k + 1] + xs, offs[k + 2] + xs, offs[k + 3] + xs
                for j in range(seglen):
                    out[o0 + j] += w0 * x[a0 + j] + w1 * x[a1 + j] + w2 * x[a2 + j] + w3 * x[a3 + j]
            k += 4
        while k < end:
            w0 = vals[k]
            for s in range(nseg):
                o0 = ob + s * o_stride
                a0 = offs[k] + s * x_stride
                for j in range(seglen):
                    out[o0 + j] += w0 * x[a0 + j]
            k += 1

    @njit(fastmath=True, boundscheck=False, cache=True, inline="always")
    def sddmm_row(g, x, rowptr, offs, gbase, out, m, nseg, seglen, g_stride, x_stride):
        """out[k] = sum over segments of dot(g row m, x window of k), for the kept weights
        k of row m: the weight gradient at the kept positions."""
        gb = gbase[m]
        k = rowptr[m]
        end = rowptr[m + 1]
        zero = g.dtype.type(0)  # of g's dtype (see the note above)
        while k + 8 <= end:
            c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = zero
            for s in range(nseg):
                g0 = gb + s * g_stride
                xs = s * x_stride
                a0, a1, a2, a3 = offs[k] + xs, offs[k + 1] + xs, offs[k + 2] + xs, offs[k + 3] + xs
                a4, a5, a6, a7 = (
                    offs[k + 4] + xs,
                    offs[k + 5] + xs,
                    offs[k + 6] + xs,
                    offs[k + 7] + xs,
                )
                for j in range(seglen):
                    gv = g[g0 + j]
                    c0 += gv * x[a0 + j]
                    c1 += gv * x[a1 + j]
                    c2 += gv * x[a2 + j]
                    c3 += gv * x[a3 + j]
                    c4 += gv * x[a4 + j]
                    c5 += gv * x[a5 + j]
                    c6 += gv * x[a6 + j]
                    c7 += gv * x[a7 + j]
            out[k], out[k + 1], out[k + 2], out[k + 3] = c0, c1, c2, c3
            out[k + 4], out[k + 5], out[k + 6], out[k + 7] = c4, c5, c6, c7
            k += 8
        while k < end:
            c0 = zero
            for s in range(nseg):
                g0 = gb + s * g_stride
                a0 = offs[k] + s * x_stride
                for j in range(seglen):
                    c0 += g[g0 + j] * x[a0 + j]
            out[k] = c0
            k += 1

    @njit(fastmath=True, boundscheck=False, cache=True)
    def spmm_serial(x, out, rowptr, offs, vals, bias, nseg, seglen, x_stride, o_stride, o_row):
        for m in range(len(rowptr) - 1):
            spmm_row(
                x, out, rowptr, offs, vals, bias, m,
                _u(nseg), _u(seglen), _u(x_stride), _u(o_stride), _u(o_row),
            )  # fmt: skip

    @njit(fastmath=True, boundscheck=False, cache=True, parallel=True)
    def spmm_parallel(x, out, rowptr, offs, vals, bias, nseg, seglen, x_stride, o_stride, o_row):
        for m in prange(len(rowptr) - 1):
            spmm_row(
                x, out, rowptr, offs, vals, bias, m,
                _u(nseg), _u(seglen), _u(x_stride), _u(o_stride), _u(o_row),
            )  # fmt: skip

    @njit(fastmath=True, boundscheck=False, cache=True)
    def sddmm_serial(g, x, rowptr, offs, gbase, out, nseg, seglen, g_stride, x_stride):
        for m in range(len(rowptr) - 1):
            sddmm_row(
                g, x, rowptr, offs, gbase, out, m,
                _u(nseg), _u(seglen), _u(g_stride), _u(x_stride),
            )  # fmt: skip

    @njit(fastmath=True, boundscheck=False, cache=True, parallel=True)
    def sddmm_parallel(g, x, rowptr, offs, gbase, out, nseg, seglen, g_stride, x_stride):
        for m in prange(len(rowptr) - 1):
            sddmm_row(
                g, x, rowptr, offs, gbase, out, m,
                _u(nseg), _u(seglen), _u(g_stride), _u(x_stride),
            )  # fmt: skip

    @njit(fastmath=True, boundscheck=False, cache=True, inline="always")
    def csr_sddmm_row(g, x, crow, col, out, m, b, ld):
        """out[k] = dot(g[m*ld :][:b], x[col[k]*ld :][:b]) for the kept k of row m: a CSR
        Linear layer's weight gradient at its kept positions, from the output gradient and
        the input, both transposed (features x batch, row-major, rows `ld` apart). Eight kept
        weights at a time share each load of g's row, as in `sddmm_row`, whose offsets
        come from an array: here they are computed from the column indices the layer
        already holds, so no nnz-long offset array (2 MB on fc1) exists."""
        gb = _u(m) * ld
        k = np.int64(crow[m])  # signed, as in sddmm_row: uint64 + 1 would be float64
        end = np.int64(crow[m + 1])
        zero = g.dtype.type(0)
        while k + 8 <= end:
            a0, a1, a2, a3 = (
                _u(col[k]) * ld,
                _u(col[k + 1]) * ld,
                _u(col[k + 2]) * ld,
                _u(col[k + 3]) * ld,
            )
            a4, a5, a6, a7 = (
                _u(col[k + 4]) * ld,
                _u(col[k + 5]) * ld,
                _u(col[k + 6]) * ld,
                _u(col[k + 7]) * ld,
            )
            c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = zero
            for j in range(b):
                gv = g[gb + j]
                c0 += gv * x[a0 + j]
                c1 += gv * x[a1 + j]
                c2 += gv * x[a2 + j]
                c3 += gv * x[a3 + j]
                c4 += gv * x[a4 + j]
                c5 += gv * x[a5 + j]
                c6 += gv * x[a6 + j]
                c7 += gv * x[a7 + j]
            out[k], out[k + 1], out[k + 2], out[k + 3] = c0, c1, c2, c3
            out[k + 4], out[k + 5], out[k + 6], out[k + 7] = c4, c5, c6, c7
            k += 8
        while k < end:
            a0 = _u(col[k]) * ld
            c0 = zero
            for j in range(b):
                c0 += g[gb + j] * x[a0 + j]
            out[k] = c0
            k += 1

    @njit(fastmath=True, boundscheck=False, cache=True)
    def csr_sddmm_serial(g, x, crow, col, out, b, ld):
        for m in range(len(crow) - 1):
            csr_sddmm_row(g, x, crow, col, out, m, _u(b), _u(ld))

    @njit(fastmath=True, boundscheck=False, cache=True, parallel=True)
    def csr_sddmm_parallel(g, x, crow, col, out, b, ld):
        for m in prange(len(crow) - 1):
            csr_sddmm_row(g, x, crow, col, out, m, _u(b), _u(ld))

    # A CSR layer's product with a batch, in training: out (rows x ld) = W x, x the batch
    # transposed (features x ld, row-major), both padded to `ld`, a multiple of PANEL.
    # Each output is summed in the order of the row's kept weights, each product rounded
    # before its sum (no FMA: `fastmath` off), from 0.0, the bias added last. That is what
    # MKL's CSR product does, bit for bit (tests/test_sparse.py), so training took this
    # kernel without a change in any result. Its speed comes from the padding: a row's
    # PANEL outputs are one vectorised loop of constant length, and each pass of it adds
    # eight kept weights' products in order, so the output row is loaded and stored once
    # per eight products. `perm` (or None) reads the values through a permutation: with
    # W^T's structure and the transpose's permutation it is the input gradient, with no
    # gathered copy of the values. On fc1 at density 0.039, batch 20, two threads: forward
    # 0.22 against MKL's 0.30 ms; input gradient 0.33 against 0.60 for the gather and
    # MKL's product (`python -m experiments.bench_kernel_parts`, 2026-12-05).
    PANEL = 24

    @njit(boundscheck=False, cache=True, inline="always")
    def _panel_value(vals, perm, k):
        return vals[k] if perm is None else vals[perm[k]]

    @njit(boundscheck=False, cache=True, inline="always")
    def csr_panel_row(x, vals, perm, crow, col, bias, out, m, ld):
        k0 = np.int64(crow[m])
        end = np.int64(crow[m + 1])
        zero = vals.dtype.type(0)
        for p in range(ld // _u(PANEL)):
            o = _u(m) * ld + p * _u(PANEL)
            xo = p * _u(PANEL)
            for j in range(_u(PANEL)):
                out[o + j] = zero
            k = k0
            while k + 8 <= end:
                w0 = _panel_value(vals, perm, k + 0)
                w1 = _panel_value(vals, perm, k + 1)
                w2 = _panel_value(vals, perm, k + 2)
                w3 = _panel_value(vals, perm, k + 3)
                w4 = _panel_value(vals, perm, k + 4)
                w5 = _panel_value(vals, perm, k + 5)
                w6 = _panel_value(vals, perm, k + 6)
                w7 = _panel_value(vals, perm, k + 7)
                a0 = _u(col[k + 0]) * ld + xo
                a1 = _u(col[k + 1]) * ld + xo
                a2 = _u(col[k + 2]) * ld + xo
                a3 = _u(col[k + 3]) * ld + xo
                a4 = _u(col[k + 4]) * ld + xo
                a5 = _u(col[k + 5]) * ld + xo
                a6 = _u(col[k + 6]) * ld + xo
                a7 = _u(col[k + 7]) * ld + xo
                for j in range(_u(PANEL)):  # left to right: the order of the kept weights
                    out[o + j] = (
                        out[o + j]
                        + w0 * x[a0 + j]
                        + w1 * x[a1 + j]
                        + w2 * x[a2 + j]
                        + w3 * x[a3 + j]
                        + w4 * x[a4 + j]
                        + w5 * x[a5 + j]
                        + w6 * x[a6 + j]
                        + w7 * x[a7 + j]
                    )
                k += 8
            while k < end:
                w0 = _panel_value(vals, perm, k)
                a0 = _u(col[k]) * ld + xo
                for j in range(_u(PANEL)):
                    out[o + j] = out[o + j] + w0 * x[a0 + j]
                k += 1
            if bias is not None:
                b = bias[m]
                for j in range(_u(PANEL)):
                    out[o + j] = out[o + j] + b

    @njit(boundscheck=False, cache=True)
    def csr_panel_mm_serial(x, vals, perm, crow, col, bias, out, ld):
        for m in range(len(crow) - 1):
            csr_panel_row(x, vals, perm, crow, col, bias, out, m, _u(ld))

    @njit(boundscheck=False, cache=True, parallel=True)
    def csr_panel_mm_parallel(x, vals, perm, crow, col, bias, out, ld):
        for m in prange(len(crow) - 1):
            csr_panel_row(x, vals, perm, crow, col, bias, out, m, _u(ld))

    # The matrix-vector product of a CSR layer at one sample (inference at batch 1). Scalar
    # on purpose: vectorised, LLVM gathers x with AVX-512 gathers, which on Zen 4 ran this
    # 2x slower than four independent scalar sums (fastmath would let it vectorise; only
    # `contract`, for FMAs, is allowed). `col` may be uint16 (half the bytes to stream of
    # int32, where the layer has at most 65,536 inputs). On fc1 at density 0.1, as the
    # layer runs it: 0.37 against MKL's CSR product's 0.57 ms on one thread, 0.22 against
    # 0.29 on two (`python -m experiments.bench_kernel_parts`, 2026-12-04, AVX-512).
    @njit(fastmath={"contract"}, boundscheck=False, cache=True, inline="always")
    def csr_spmv_row(x, vals, crow, col, m):
        """sum over the kept k of row m of vals[k] * x[col[k]]."""
        k = np.int64(crow[m])
        end = np.int64(crow[m + 1])
        a0 = a1 = a2 = a3 = vals.dtype.type(0)
        while k + 4 <= end:
            a0 += vals[k] * x[_u(col[k])]
            a1 += vals[k + 1] * x[_u(col[k + 1])]
            a2 += vals[k + 2] * x[_u(col[k + 2])]
            a3 += vals[k + 3] * x[_u(col[k + 3])]
            k += 4
        while k < end:
            a0 += vals[k] * x[_u(col[k])]
            k += 1
        return (a0 + a1) + (a2 + a3)

    @njit(fastmath={"contract"}, boundscheck=False, cache=True)
    def csr_spmv_serial(x, vals, crow, col, bias, out):
        for m in range(len(crow) - 1):
            out[m] = bias[m] + csr_spmv_row(x, vals, crow, col, m)

    @njit(fastmath={"contract"}, boundscheck=False, cache=True, parallel=True)
    def csr_spmv_parallel(x, vals, crow, col, bias, out):
        for m in prange(len(crow) - 1):
            out[m] = bias[m] + csr_spmv_row(x, vals, crow, col, m)

    @njit(fastmath=True, boundscheck=False, cache=True, inline="always")
    def _masked_sgd_range(p, g, keep, lr, start, end):
        zero = p.dtype.type(0)
        for i in range(start, end):
            v = p[i] - lr * g[i]
            p[i] = v if keep[i] else zero

    @njit(fastmath=True, boundscheck=False, cache=True)
    def masked_sgd_serial(p, g, keep, lr):
        """p = (p - lr * g) where keep, else 0.0: one pass over p, g and the bool mask."""
        _masked_sgd_range(p, g, keep, lr, _u(0), _u(len(p)))

    @njit(fastmath=True, boundscheck=False, cache=True, parallel=True)
    def masked_sgd_parallel(p, g, keep, lr):
        n = len(p)
        for c in prange((n + _CHUNK - 1) // _CHUNK):
            _masked_sgd_range(p, g, keep, lr, _u(c * _CHUNK), _u(min(n, (c + 1) * _CHUNK)))

    # --- 2x2 max-pooling, stride 2 (Conv-2's and VGG-11's), forward and backward ---
    #
    # The same values, chosen positions and gradients as torch's CPU kernels, bit for bit:
    # each window is scanned row by row, left to right, and a value replaces the maximum
    # so far when it is greater or NaN (torch's rule: the first of equal maxima wins, the
    # last NaN wins). No fastmath: it would let LLVM assume there are no NaNs. Indices are
    # flat h * W + w within each (sample, channel) plane, as torch's, in int32.

    @njit(boundscheck=False, cache=True, inline="always")
    def _max4(a, b, c, d, q, w):
        """(maximum, its index) of the window a b / c d whose top left is at index q, in
        torch's order; w is the input's row length. Selects, not branches, so that LLVM
        vectorises the loops around it."""
        t = b > a or b != b
        m, i = (b if t else a), (q + 1 if t else q)
        t = c > m or c != c
        m, i = (c if t else m), (q + w if t else i)
        t = d > m or d != d
        return (d if t else m), (q + w + 1 if t else i)

    @njit(boundscheck=False, cache=True, inline="always")
    def _pool2_planes(x, out, idx, p0, p1, h, w):
        """NCHW planes p0..p1-1 of x (flat) into out and idx (flat, (h // 2) x (w // 2)
        per plane)."""
        ho, wo = h // 2, w // 2
        for p in range(p0, p1):
            xb, ob = _u(p) * _u(h * w), _u(p) * _u(ho * wo)
            for i in range(ho):
                r0 = xb + _u(2 * i * w)
                r1 = r0 + _u(w)
                o = ob + _u(i * wo)
                q0 = 2 * i * w
                for j in range(wo):
                    m, k = _max4(
                        x[r0 + _u(2 * j)], x[r0 + _u(2 * j + 1)],
                        x[r1 + _u(2 * j)], x[r1 + _u(2 * j + 1)],
                        q0 + 2 * j, w,
                    )  # fmt: skip
                    out[o + _u(j)] = m
                    idx[o + _u(j)] = k

    @njit(boundscheck=False, cache=True)
    def max_pool2_nchw_serial(x, out, idx, planes, h, w):
        _pool2_planes(x, out, idx, 0, planes, h, w)

    @njit(boundscheck=False, cache=True, parallel=True)
    def max_pool2_nchw_parallel(x, out, idx, planes, h, w):
        for p in prange(planes):
            _pool2_planes(x, out, idx, p, p + 1, h, w)

    @njit(boundscheck=False, cache=True, inline="always")
    def _unpool2_planes(grad, idx, grad_x, p0, p1, h, w):
        """grad_x (NCHW planes p0..p1-1, flat) = the output gradient at the recorded
        maxima, 0.0 everywhere else (rows and columns the pooling dropped included),
        plane by plane, so each plane is zeroed and written while it is in cache."""
        ho, wo = h // 2, w // 2
        zero = grad_x.dtype.type(0)
        for p in range(p0, p1):
            xb, ob = _u(p) * _u(h * w), _u(p) * _u(ho * wo)
            for q in range(h * w):
                grad_x[xb + _u(q)] = zero
            for o in range(ho * wo):
                grad_x[xb + _u(idx[ob + _u(o)])] = grad[ob + _u(o)]

    @njit(boundscheck=False, cache=True)
    def unpool2_nchw_serial(grad, idx, grad_x, planes, h, w):
        _unpool2_planes(grad, idx, grad_x, 0, planes, h, w)

    @njit(boundscheck=False, cache=True, parallel=True)
    def unpool2_nchw_parallel(grad, idx, grad_x, planes, h, w):
        for p in prange(planes):
            _unpool2_planes(grad, idx, grad_x, p, p + 1, h, w)

    @njit(boundscheck=False, cache=True, inline="always")
    def _pool2_nhwc_rows(x, out, idx, r0, r1, h, w, c):
        """Output rows r0..r1-1 (row r: sample r // (h // 2), output row r % (h // 2)) of
        a channels-last x (flat, (n, h, w, c)); channels innermost, so each window's four
        loads are four contiguous runs of c values."""
        ho, wo = h // 2, w // 2
        for r in range(r0, r1):
            n, i = r // ho, r % ho
            top = (_u(n) * _u(h) + _u(2 * i)) * _u(w) * _u(c)
            below = top + _u(w) * _u(c)
            o = _u(r) * _u(wo) * _u(c)
            for j in range(wo):
                a = _u(2 * j) * _u(c)
                q = 2 * i * w + 2 * j
                for ch in range(c):
                    m, k = _max4(
                        x[top + a + _u(ch)], x[top + a + _u(c + ch)],
                        x[below + a + _u(ch)], x[below + a + _u(c + ch)],
                        q, w,
                    )  # fmt: skip
                    out[o + _u(j) * _u(c) + _u(ch)] = m
                    idx[o + _u(j) * _u(c) + _u(ch)] = k

    @njit(boundscheck=False, cache=True)
    def max_pool2_nhwc_serial(x, out, idx, n, h, w, c):
        _pool2_nhwc_rows(x, out, idx, 0, n * (h // 2), h, w, c)

    @njit(boundscheck=False, cache=True, parallel=True)
    def max_pool2_nhwc_parallel(x, out, idx, n, h, w, c):
        for r in prange(n * (h // 2)):
            _pool2_nhwc_rows(x, out, idx, r, r + 1, h, w, c)

    @njit(boundscheck=False, cache=True, inline="always")
    def _pool2_relu_rows(x, out, r0, r1, c, h, row_w, w):
        """Output rows r0..r1-1 of relu(2x2 max-pooling) of one sample held as c planes of
        h rows of row_w floats (the first w of each row are the image: a sparse
        convolution's output buffer at batch 1, `fedprune.sparse_conv`) into out,
        channels-last (flat, (h // 2, w // 2, c)). The maxima are `_max4`'s (torch's), and
        the ReLU keeps NaN and -0.0 as torch's does."""
        wo = w // 2
        zero = out.dtype.type(0)
        plane = _u(h) * _u(row_w)
        for i in range(r0, r1):
            for ch in range(c):
                top = _u(ch) * plane + _u(2 * i) * _u(row_w)
                below = top + _u(row_w)
                o = _u(i) * _u(wo) * _u(c) + _u(ch)
                for j in range(wo):
                    m, _k = _max4(
                        x[top + _u(2 * j)], x[top + _u(2 * j + 1)],
                        x[below + _u(2 * j)], x[below + _u(2 * j + 1)],
                        0, 0,
                    )  # fmt: skip
                    out[o + _u(j) * _u(c)] = zero if m < zero else m

    @njit(boundscheck=False, cache=True)
    def pool2_relu_serial(x, out, c, h, row_w, w):
        _pool2_relu_rows(x, out, 0, h // 2, c, h, row_w, w)

    @njit(boundscheck=False, cache=True, parallel=True)
    def pool2_relu_parallel(x, out, c, h, row_w, w):
        for r in prange(h // 2):
            _pool2_relu_rows(x, out, r, r + 1, c, h, row_w, w)

    @njit(boundscheck=False, cache=True, inline="always")
    def _unpool2_nhwc_samples(grad, idx, grad_x, n0, n1, h, w, c):
        """grad_x (channels-last samples n0..n1-1, flat) = the output gradient at the
        recorded maxima, 0.0 elsewhere, sample by sample (zeroed and written in cache)."""
        ho, wo = h // 2, w // 2
        zero = grad_x.dtype.type(0)
        for n in range(n0, n1):
            xb = _u(n) * _u(h * w) * _u(c)
            for q in range(_u(h * w) * _u(c)):
                grad_x[xb + q] = zero
            ob = _u(n) * _u(ho * wo) * _u(c)
            for o in range(ho * wo):
                for ch in range(c):
                    e = ob + _u(o) * _u(c) + _u(ch)
                    grad_x[xb + _u(idx[e]) * _u(c) + _u(ch)] = grad[e]

    @njit(boundscheck=False, cache=True)
    def unpool2_nhwc_serial(grad, idx, grad_x, n, h, w, c):
        _unpool2_nhwc_samples(grad, idx, grad_x, 0, n, h, w, c)

    @njit(boundscheck=False, cache=True, parallel=True)
    def unpool2_nhwc_parallel(grad, idx, grad_x, n, h, w, c):
        for s in prange(n):
            _unpool2_nhwc_samples(grad, idx, grad_x, s, s + 1, h, w, c)

    # --- Structure of a CSR layer (conversion to and from dense, once per round) ---

    @njit(cache=True, boundscheck=False)
    def csr_structure(mask, rows, cols):
        """Row pointers (int32), column indices (int32) and flat positions (int64) of the
        True entries of a flat row-major bool mask of rows x cols: two passes over the
        mask, against torch.nonzero's slower one plus a search."""
        crow = np.zeros(rows + 1, np.int32)
        cols_u = _u(cols)
        for i in range(rows):
            base = _u(i) * cols_u
            c = 0
            for j in range(cols_u):
                c += mask[base + j]
            crow[i + 1] = crow[i] + c
        nnz = crow[rows]
        col = np.empty(nnz, np.int32)
        flat = np.empty(nnz, np.int64)
        k = 0
        for i in range(rows):
            base = _u(i) * cols_u
            for j in range(cols_u):
                if mask[base + j]:
                    col[k] = j
                    flat[k] = base + j
                    k += 1
        return crow, col, flat

    @njit(cache=True, boundscheck=False)
    def csr_transpose(crow, col, cols):
        """The transpose's row pointers and column indices (int32), and the permutation
        (int32) that gathers its values from the original's: a counting sort by column,
        stable in row order."""
        rows = len(crow) - 1
        nnz = len(col)
        crow_t = np.zeros(cols + 1, np.int32)
        for k in range(nnz):
            crow_t[col[k] + 1] += 1
        for c in range(cols):
            crow_t[c + 1] += crow_t[c]
        pos = crow_t[:cols].copy()
        col_t = np.empty(nnz, np.int32)
        perm = np.empty(nnz, np.int32)
        for r in range(rows):
            for k in range(crow[r], crow[r + 1]):
                c = col[k]
                p = pos[c]
                col_t[p] = r
                perm[p] = k
                pos[c] = p + 1
        return crow_t, col_t, perm

    @njit(cache=True, boundscheck=False)
    def gather(src, idx, out):
        """out[k] = src[idx[k]] (idx non-negative)."""
        for k in range(len(idx)):
            out[k] = src[_u(idx[k])]

    @njit(cache=True, boundscheck=False)
    def scatter_into_zeros(out, idx, vals):
        """out = 0 except out[idx[k]] = vals[k] (idx non-negative)."""
        for i in range(_u(len(out))):
            out[i] = 0
        for k in range(len(idx)):
            out[_u(idx[k])] = vals[k]


# --- Running ------------------------------------------------------------------------

# One parallel kernel at a time: numba's thread pool is shared by the process, and two
# Python threads launching parallel kernels at once would oversubscribe it (or, with its
# workqueue layer, abort). A thread that finds it busy runs the serial kernel.
_parallel_lock = threading.Lock()


def run(serial, parallel, *args, parallel_alone: bool = False) -> None:
    """Call the `parallel` kernel with torch's thread count when that is above one (and
    no other thread is in a parallel kernel), else the `serial` one. With
    `parallel_alone`, one thread also runs the parallel kernel (on one numba thread), for
    kernels that LLVM vectorises only there (see `csr_panel_mm`)."""
    threads = torch.get_num_threads()
    wanted = threads > 1 and numba.config.NUMBA_NUM_THREADS > 1
    if (wanted or parallel_alone) and _parallel_lock.acquire(False):
        try:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            parallel(*args)
        finally:
            _parallel_lock.release()
            # numba's OpenMP layer and torch share OpenMP's thread count: a parallel
            # kernel run on fewer threads than numba's pool leaves it at the pool's size,
            # and torch would then run everything after it on two threads, not one.
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
    else:
        serial(*args)


def csr_panel_mm(
    x: np.ndarray,
    vals: np.ndarray,
    perm: np.ndarray | None,
    crow: np.ndarray,
    col: np.ndarray,
    bias: np.ndarray | None,
    out: np.ndarray,
    ld: int,
) -> None:
    """out = W x (+ bias) by `csr_panel_mm_*`: W the CSR structure (crow, col) with values
    `vals` (read through `perm` if given), x (columns of W x ld) and out (rows x ld), 1-D
    row-major views, ld a multiple of PANEL. Requires `available()`.

    One thread runs the parallel kernel too: compiled serially, LLVM keeps the inner loop
    scalar (it cannot rule out that `out` overlaps `x` without more runtime checks than
    it allows), and on fc1 at density 0.1, batch 20, the serial kernel took 1.42 against
    0.99 ms on one thread (a probe of 2026-12-05)."""
    run(csr_panel_mm_serial, csr_panel_mm_parallel, x, vals, perm, crow, col, bias, out, ld,
        parallel_alone=True)  # fmt: skip


def masked_sgd(p: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor, lr: float) -> None:
    """In place: p = p - lr * grad at the True entries of the bool mask `keep`, exactly
    0.0 elsewhere. All three contiguous, on the CPU, of one size; p and grad float32 or
    float64. Requires `available()`."""
    p_np = p.detach().view(-1).numpy()
    run(
        masked_sgd_serial,
        masked_sgd_parallel,
        p_np,
        grad.view(-1).numpy(),
        keep.view(-1).numpy(),
        p_np.dtype.type(lr),
    )


def _flat(t: torch.Tensor) -> np.ndarray:
    """A 1-D numpy view of a contiguous tensor (never a copy: kernels write through it)."""
    if not t.is_contiguous():
        raise ValueError(f"expected a contiguous tensor, got strides {t.stride()}")
    return t.numpy().reshape(-1)


def max_pool2(x: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """2x2 max-pooling with stride 2 of a 4-D CPU float tensor, contiguous NCHW or (with
    `channels_last`) contiguous channels-last: (output, int32 indices flat h * W + w
    within each plane), both in that memory format; the bits of torch's
    `max_pool2d_with_indices`. Requires `available()`."""
    n, c, h, w = x.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, memory_format=fmt)
    idx = torch.empty(out.shape, dtype=torch.int32, memory_format=fmt)
    if channels_last:
        flat = [_flat(t.detach().permute(0, 2, 3, 1)) for t in (x, out, idx)]
        run(max_pool2_nhwc_serial, max_pool2_nhwc_parallel, *flat, n, h, w, c)
    else:
        flat = [_flat(t.detach()) for t in (x, out, idx)]
        run(max_pool2_nchw_serial, max_pool2_nchw_parallel, *flat, n * c, h, w)
    return out, idx


def max_unpool2(
    grad: torch.Tensor, idx: torch.Tensor, input_shape, channels_last: bool
) -> torch.Tensor:
    """The input gradient of `max_pool2`: `grad` (the output's gradient) at the positions
    `idx` recorded, 0.0 elsewhere, in the memory format the pooling ran in. Requires
    `available()`."""
    n, c, h, w = input_shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grad = grad.contiguous(memory_format=fmt)
    grad_x = torch.empty((n, c, h, w), dtype=grad.dtype, memory_format=fmt)
    if channels_last:
        flat = [_flat(t.permute(0, 2, 3, 1)) for t in (grad, idx, grad_x)]
        run(unpool2_nhwc_serial, unpool2_nhwc_parallel, *flat, n, h, w, c)
    else:
        flat = [_flat(t) for t in (grad, idx, grad_x)]
        run(unpool2_nchw_serial, unpool2_nchw_parallel, *flat, n * c, h, w)
    return grad_x


def pool2_relu(planes: np.ndarray, c: int, h: int, row_w: int, w: int) -> torch.Tensor:
    """relu(max_pool2d(x, 2)) of one sample x (1, c, h, w) held as `planes` (flat: c planes
    of h rows of `row_w` floats, the first w of each row the image), as a new
    channels-last tensor (1, c, h // 2, w // 2): the bits of torch's pooling and ReLU.
    Requires `available()`."""
    out = torch.empty((1, c, h // 2, w // 2), dtype=torch.from_numpy(planes[:0]).dtype,
                      memory_format=torch.channels_last)  # fmt: skip
    run(pool2_relu_serial, pool2_relu_parallel, planes, _flat(out.permute(0, 2, 3, 1)),
        c, h, row_w, w)  # fmt: skip
    return out


class threads:
    """Temporarily run torch (and so the kernels) on `n` threads."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.before)


# --- Availability -------------------------------------------------------------------

_availability: dict[str, object] = {"checked": False, "ok": False, "reason": None}
_availability_lock = threading.Lock()


def available() -> bool:
    """Whether the compiled kernels run on this machine.

    The first call in a process compiles them (numba JIT: about 5 s on a fresh machine,
    under 1 s from numba's disk cache) and checks each one, serial and parallel, against
    a numpy reference. If anything fails, the reason is logged once as a warning
    (`unavailable_reason()` returns it) and the answer is False for the rest of the
    process."""
    with _availability_lock:
        if not _availability["checked"]:
            if _passed_before():
                reason = None
            else:
                reason = _self_test()
                if reason is None:
                    _remember_passed()
            _availability.update(checked=True, ok=reason is None, reason=reason)
            if reason is not None:
                _log.warning(
                    "compiled CPU kernels unavailable: sparse convolutions train masked "
                    "dense, masked SGD uses torch multiplies and max-pooling torch's "
                    "kernel instead: %s",
                    reason,
                )
        return bool(_availability["ok"])


# A deployed node starts a fresh process for every message, and the self-test loads every
# kernel, serial and parallel, in both precisions (about 0.5 s of CPU per message here). A
# pass is deterministic for one machine, numba, numpy and kernel source, so it is kept on
# disk under those (beside the device profiles) and not repeated. A failure is not kept:
# each process tests again and says why.


def _self_test_key() -> str:
    from fedprune import hardware

    digest = hashlib.sha256(Path(__file__).read_bytes())
    versions = (getattr(numba, "__version__", "none"), np.__version__)
    for part in (*versions, hardware.identity(), platform.machine()):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:20]


def _pass_marker() -> Path:
    from fedprune.profile_cache import cache_dir

    return cache_dir() / f"kernels-passed-{_self_test_key()}"


def _passed_before() -> bool:
    try:
        return numba is not None and _pass_marker().is_file()
    except OSError:
        return False


def _remember_passed() -> None:
    with contextlib.suppress(OSError):  # a read-only cache only costs the next test
        marker = _pass_marker()
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("the compiled kernels passed their self-test here\n")


_loaded: set[str] = set()


def load(sparse: bool) -> None:
    """Load, in this process, the kernels a training round uses, by running each once on a
    tiny problem in float32 at torch's thread count (masked SGD always; with `sparse`, the
    sparse convolution's and the CSR helpers too), so that a round's measured compute does
    not include numba loading machine code from its cache. That is a process's start-up,
    like importing torch: about 0.4 s in a fresh process here, and 2.8 s in the first
    round of a comparison run where five fresh nodes shared two cores. Once per process;
    nothing where the kernels do not run. The tiny problems are checked as in the
    self-test: a kernel that now disagrees with numpy makes the kernels unavailable for the
    rest of the process, and says why."""
    kind = "sparse" if sparse else "sgd"
    if kind in _loaded or not available():
        return
    if sparse:
        wrong = _check_kernels(np.random.default_rng(0), np.float32)
    else:
        p = torch.ones(_CHUNK + 3)
        masked_sgd(p, torch.ones_like(p), torch.arange(len(p)) % 2 == 0, 0.5)
        wrong = (
            None
            if torch.equal(p, torch.where(torch.arange(len(p)) % 2 == 0, 0.5, 0.0))
            else ("masked SGD update")
        )
    if wrong is not None:
        reason = f"the compiled {wrong} gives wrong results on this machine"
        with _availability_lock:
            _availability.update(ok=False, reason=reason)
        _log.warning("compiled CPU kernels unavailable from now on: %s", reason)
        return
    _loaded.update({"sgd", kind})


def unavailable_reason() -> str | None:
    """Why the kernels do not run here (None if they do); checks first if not yet done."""
    available()
    return _availability["reason"]  # type: ignore[return-value]


def _self_test() -> str | None:
    if numba is None:
        return _NUMBA_IMPORT_ERROR
    try:
        rng = np.random.default_rng(0)
        for dtype in (np.float32, np.float64):
            for n_threads in (1, 2):
                with threads(n_threads):
                    wrong = _check_kernels(rng, dtype)
                if wrong:
                    return f"the compiled {wrong} gives wrong results on this machine"
    except Exception as exc:  # any failure to compile or run: say it, use torch
        return f"the numba kernels failed to compile or run: {type(exc).__name__}: {exc}"
    return None


def _check_kernels(rng, dtype) -> str | None:
    """The name of the first kernel that disagrees with numpy on a small random problem."""
    tol = 1e-4 if dtype == np.float32 else 1e-10
    rows, nnz_per_row, nseg, seglen, x_stride, o_stride = 3, 11, 2, 37, 50, 40
    rowptr = np.arange(rows + 1, dtype=np.int64) * nnz_per_row
    offs = rng.integers(0, 60, rows * nnz_per_row).astype(np.uint64)
    vals = rng.standard_normal(rows * nnz_per_row).astype(dtype)
    x = rng.standard_normal(200).astype(dtype)
    bias = rng.standard_normal(rows).astype(dtype)
    o_row = nseg * o_stride
    out = np.zeros(rows * o_row, dtype)
    run(spmm_serial, spmm_parallel, x, out, rowptr, offs, vals, bias,
        nseg, seglen, x_stride, o_stride, o_row)  # fmt: skip
    g = rng.standard_normal(rows * o_row).astype(dtype)
    gbase = (np.arange(rows) * o_row).astype(np.uint64)
    dots = np.zeros(rows * nnz_per_row, dtype)
    run(sddmm_serial, sddmm_parallel, g, x, rowptr, offs, gbase, dots,
        nseg, seglen, o_stride, x_stride)  # fmt: skip
    for m in range(rows):
        ks = range(rowptr[m], rowptr[m + 1])
        for s in range(nseg):
            o = out[m * o_row + s * o_stride :][:seglen]
            want = bias[m] + sum(vals[k] * x[int(offs[k]) + s * x_stride :][:seglen] for k in ks)
            if not np.allclose(o, want, rtol=tol, atol=tol):
                return "sparse convolution product"
        for k in ks:
            want = sum(
                g[m * o_row + s * o_stride :][:seglen] @ x[int(offs[k]) + s * x_stride :][:seglen]
                for s in range(nseg)
            )
            if not np.isclose(dots[k], want, rtol=tol, atol=tol):
                return "sparse convolution weight gradient"
    mask = rng.random((7, 13)) < 0.4
    crow, col, flat = csr_structure(mask.reshape(-1), 7, 13)
    want_flat = np.flatnonzero(mask)
    # About 20 kept a row (blocks of eight and a tail), a batch of 21 (not a vector width).
    wide = rng.random((5, 40)) < 0.5
    w_crow, w_col, w_flat = csr_structure(wide.reshape(-1), 5, 40)
    gt, xt = rng.standard_normal((5, 21)).astype(dtype), rng.standard_normal((40, 21)).astype(dtype)
    wgrad = np.empty(len(w_col), dtype)
    run(
        csr_sddmm_serial,
        csr_sddmm_parallel,
        gt.reshape(-1),
        xt.reshape(-1),
        w_crow,
        w_col,
        wgrad,
        21,
        21,
    )
    if not np.allclose(wgrad, (gt @ xt.T).reshape(-1)[w_flat], rtol=tol, atol=tol):
        return "CSR weight gradient"
    # The batch product, padded to two panels, and through W^T's structure and permutation.
    ld = 2 * PANEL
    w_vals = rng.standard_normal(len(w_col)).astype(dtype)
    w_dense = np.zeros(wide.size, dtype)
    w_dense[w_flat] = w_vals
    w_dense = w_dense.reshape(5, 40)
    xp = np.zeros((40, ld), dtype)
    xp[:, :29] = rng.standard_normal((40, 29))
    gp = np.zeros((5, ld), dtype)
    gp[:, :29] = rng.standard_normal((5, 29))
    y, dx = np.empty((5, ld), dtype), np.empty((40, ld), dtype)
    csr_panel_mm(xp.reshape(-1), w_vals, None, w_crow, w_col, gt[:, 0].copy(), y.reshape(-1), ld)
    crow_t, col_t, perm = csr_transpose(w_crow, w_col, 40)
    csr_panel_mm(gp.reshape(-1), w_vals, perm, crow_t, col_t, None, dx.reshape(-1), ld)
    if not (
        np.allclose(y, w_dense @ xp + gt[:, :1], rtol=tol, atol=tol)
        and np.allclose(dx, w_dense.T @ gp, rtol=tol, atol=tol)
    ):
        return "CSR batch product"
    # One sample: rows of 0 to 40 kept (fours and a tail), uint16 and int32 columns.
    w_vals = rng.standard_normal(len(w_col)).astype(dtype)
    w_dense = np.zeros(wide.size, dtype)
    w_dense[w_flat] = w_vals
    x1, b1 = xt[:, 0].copy(), gt[:, 0].copy()
    for cols in (w_col, w_col.astype(np.uint16)):
        y1 = np.empty(5, dtype)
        run(csr_spmv_serial, csr_spmv_parallel, x1, w_vals, w_crow, cols, b1, y1)
        if not np.allclose(y1, w_dense.reshape(5, 40) @ x1 + b1, rtol=tol, atol=tol):
            return "CSR matrix-vector product"
    if not (
        np.array_equal(flat, want_flat)
        and np.array_equal(col, want_flat % 13)
        and np.array_equal(crow, np.searchsorted(want_flat, np.arange(8) * 13))
    ):
        return "CSR structure builder"
    crow_t, col_t, perm = csr_transpose(crow, col, 13)
    order = np.argsort(want_flat % 13, kind="stable")
    if not (
        np.array_equal(perm, order)
        and np.array_equal(col_t, (want_flat // 13)[order])
        and np.array_equal(crow_t, np.searchsorted((want_flat % 13)[order], np.arange(14)))
    ):
        return "CSR transpose"
    src = rng.standard_normal(91).astype(dtype)
    got = np.empty(len(flat), dtype)
    gather(src, flat, got)
    back = np.empty(91, dtype)
    scatter_into_zeros(back, flat, got)
    transposed = np.empty(len(perm), dtype)  # the transpose's values: int32 indices
    gather(got, perm, transposed)
    if not (
        np.array_equal(got, src[want_flat])
        and np.array_equal(back, np.where(mask.reshape(-1), src, 0))
        and np.array_equal(transposed, got[perm])
    ):
        return "gather/scatter"
    wrong = _check_pooling(rng, dtype)
    if wrong:
        return wrong
    p = torch.from_numpy(rng.standard_normal(3 * _CHUNK + 5).astype(dtype))
    grad = torch.from_numpy(rng.standard_normal(len(p)).astype(dtype))
    keep = torch.from_numpy(rng.random(len(p)) < 0.3)
    want = torch.where(keep, p - 0.1 * grad, 0.0)
    masked_sgd(p, grad, keep, 0.1)
    if not torch.allclose(p, want, rtol=tol, atol=tol):
        return "masked SGD update"
    return None


def _check_pooling(rng, dtype) -> str | None:
    """ "max-pooling" unless `max_pool2` and `max_unpool2` give torch's bits, in both memory
    formats, on odd sizes with ties, NaN and -inf in the windows."""
    x = torch.from_numpy(np.round(rng.standard_normal((2, 3, 5, 7)), 1).astype(dtype))
    x[0, 0, :2, :2] = 0.5  # a tie
    x[0, 1, 0, 1] = x[1, 2, 3, 3] = float("nan")
    x[1, 0, :2, 2:4] = float("-inf")
    want, where = torch.nn.functional.max_pool2d_with_indices(x, 2)
    grad = torch.from_numpy(rng.standard_normal(want.shape).astype(dtype))
    want_grad = torch.zeros(x.shape, dtype=x.dtype).view(2, 3, -1)
    want_grad.scatter_(2, where.view(2, 3, -1), grad.view(2, 3, -1))
    for channels_last in (False, True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out, idx = max_pool2(x.contiguous(memory_format=fmt), channels_last)
        back = max_unpool2(grad, idx, x.shape, channels_last)
        if not (
            torch.equal(out.isnan(), want.isnan())
            and torch.equal(out.nan_to_num(), want.nan_to_num())
            and torch.equal(idx.long(), where)
            and torch.equal(back, want_grad.view(x.shape))
        ):
            return "max-pooling"
    # Pooling and ReLU at once, from a buffer with two spare floats at each row's end.
    planes = torch.nn.functional.pad(x, (0, 2)).contiguous()
    planes[0, 2, 2:4, :2] = torch.tensor([[-0.0, -1.0], [-2.0, -0.5]])  # ReLU keeps -0.0
    want = torch.relu(torch.nn.functional.max_pool2d(planes[:1, :, :, :7], 2))
    got = pool2_relu(planes[0].numpy().reshape(-1), 3, 5, 9, 7)
    bits = [t.nan_to_num().contiguous().numpy().view(np.uint8) for t in (got, want)]
    if not (
        got.is_contiguous(memory_format=torch.channels_last)
        and torch.equal(got.isnan(), want.isnan())
        and np.array_equal(*bits)  # -0.0 included
    ):
        return "max-pooling with ReLU"
    return None
