"""The compiled kernels compute float32 data in float32.

numba types a scalar expression from its operands, so one int64 literal or float64
constant in a kernel silently widens a float32 accumulator to float64: the results stay
close (they are stored back as float32), so only the speed shows it. The weight gradient
of the sparse convolution ran 2.3 to 2.5x slower that way (experiments/bench_kernel_parts.py).
Each kernel's row function is compiled here afresh (no disk cache, so its types can be
read) for float32 arguments, and no local variable may be float64.
"""

import numpy as np
import pytest

from fedprune import kernels

numba = pytest.importorskip("numba")

F32, U64 = np.float32, np.uint64


def float64_locals(kernel, *args) -> list[str]:
    fresh = numba.njit(fastmath=True, boundscheck=False)(kernel.py_func)
    fresh(*args)
    typemap = fresh.overloads[fresh.signatures[0]].type_annotation.typemap
    return sorted(name for name, t in typemap.items() if t == numba.float64)


def csr_row(nnz: int = 13):
    """Row 0 of a CSR structure with `nnz` kept weights (two blocks of eight would hide
    the tail loops; 13 runs the 8-, 4- and 1-weight paths), reading windows at offset 0."""
    return np.array([0, nnz], np.int64), np.zeros(nnz, U64)


@pytest.mark.skipif(kernels.numba is None, reason="numba does not import here")
def test_sparse_products_accumulate_float32_in_float32():
    rowptr, offs = csr_row()
    x, g = np.ones(64, F32), np.ones(64, F32)
    vals, bias, out = np.ones(13, F32), np.zeros(1, F32), np.zeros(64, F32)
    # forward and input gradient: out[row] = bias + sum of vals[k] * x window
    assert (
        float64_locals(
            kernels.spmm_row,
            x,
            out,
            rowptr,
            offs,
            vals,
            bias,
            0,
            U64(2),
            U64(8),
            U64(8),
            U64(8),
            U64(16),
        )
        == []
    )
    # weight gradient: out[k] = dot(g row, x window of k)
    assert float64_locals(
        kernels.sddmm_row, g, x, rowptr, offs, np.zeros(1, U64), np.zeros(13, F32), 0,
        U64(2), U64(8), U64(8), U64(8),
    ) == []  # fmt: skip


@pytest.mark.skipif(kernels.numba is None, reason="numba does not import here")
def test_masked_sgd_updates_float32_in_float32():
    p, keep = np.ones(10, F32), np.arange(10) % 2 == 0
    assert (
        float64_locals(
            kernels._masked_sgd_range, p, np.ones(10, F32), keep, F32(0.1), U64(0), U64(10)
        )
        == []
    )


@pytest.mark.skipif(kernels.numba is None, reason="numba does not import here")
def test_csr_weight_gradient_accumulates_float32_in_float32():
    crow, col = np.array([0, 13], np.int32), np.arange(13, dtype=np.int32)
    g, x, out = np.ones(20, F32), np.ones(13 * 20, F32), np.zeros(13, F32)
    assert float64_locals(kernels.csr_sddmm_row, g, x, crow, col, out, 0, U64(20), U64(20)) == []


@pytest.mark.skipif(kernels.numba is None, reason="numba does not import here")
def test_csr_batch_product_accumulates_float32_in_float32():
    crow, col = np.array([0, 13], np.int32), np.arange(13, dtype=np.int32)
    x, vals, out = np.ones(13 * 24, F32), np.ones(13, F32), np.zeros(24, F32)
    perm = np.arange(13, dtype=np.int32)
    for p, bias in ((None, np.ones(1, F32)), (perm, None)):
        assert (
            float64_locals(kernels.csr_panel_row, x, vals, p, crow, col, bias, out, 0, U64(24))
            == []
        )
