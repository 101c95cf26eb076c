"""Sparse layers on the CPU: CSR fully connected layers, direct sparse convolutions,
mixed-format training rounds, sparse inference and export.

A pruned `nn.Linear` becomes a `SparseLinear`: its weight is a CSR matrix whose structure
(row pointers and column indices) is built from the layer's mask, and whose kept values
are the layer's one trainable tensor, `values` (1-D, in row-major order of the kept
positions, the order of `weight[mask]`). Building the structure from the mask, not from
the values, keeps a kept weight that happens to be exactly 0.0 in the structure
(`Tensor.to_sparse_csr()` would drop it, and with it the position's gradient).

The autograd function computes, for y = x W^T + b with W in CSR:
- forward: y^T = W x^T (CSR times dense), by the compiled panel kernel
  (`kernels.csr_panel_mm`) on x^T padded to the kernel's panel width: the same sums as
  MKL's CSR product, bit for bit, about 1.7x faster on two threads;
- input gradient: dx^T = W^T dy^T, by the same kernel on W^T's structure, reading
  `values` through a permutation fixed by the mask (no gathered copy); without the
  compiled kernels, MKL's product on a CSR copy of W^T with gathered values;
- value gradient: dy^T x sampled at the kept positions only (`kernels.csr_sddmm_*`, or
  `torch.sparse.sampled_addmm` without the compiled kernels);
- without autograd, for one sample (inference at batch 1): a compiled matrix-vector
  product over narrow column indices (`kernels.csr_spmv_*`), faster there than MKL's;
- when the layer tracks importance, the dense gradient at every position, pruned ones
  included. PruneFL only needs its sum over the local steps, so the layer keeps each
  step's (x, dy) and `dense_grad_sum()` forms the sum in one matrix product,
  [dy_1 .. dy_K]^T [x_1 .. x_K], at the end of the round.

Measured on 2 CPU cores (shared/design/environment.md), CSR beats a dense layer below
roughly 20-30 % density. Convolutions have their own kernels, `fedprune.sparse_conv`.

Formats: each prunable weight trains in one of `FORMATS`: "dense" (masked dense),
"csr" (`SparseLinear`, Linear layers) or "sparse-conv" (`SparseConv2d`, Conv2d layers).
`to_formats` converts a model layer by layer and `restore_dense` converts it back.
`train_sparse` is `fedprune.training.train_masked` with the layers in the given formats:
the same batches, the same updates of the kept values and the same importance, to float
tolerance.

Edge inference: `export_for_inference` writes the pruned model with each Linear layer in
the format that runs its forward fastest on this machine (measured), plus the masks;
`load_for_inference` rebuilds a runnable module from the file alone.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedprune import kernels
from fedprune.codec import dense_from_kept
from fedprune.data import Examples
from fedprune.models import MODELS, TwoConvNet, model_factory
from fedprune.sparse_conv import (
    SparseConv2d,
    check_supported,
    conv_padding,
    sparse_conv_available,
)
from fedprune.training import LocalRound, masked_steps, squared_importance

# PyTorch warns once per process that CSR support is "in beta"; the kernels used here are
# the documented CPU ones, and the tests check them against dense arithmetic.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

Masks = dict[str, torch.Tensor]

# A Linear layer trains in CSR when its mask density is at most this (a kept fraction).
# From measurement on 2 cores (environment.md); a device profile gives per-layer values
# (`fedprune.profiler.csr_max_densities`).
DEFAULT_MAX_CSR_DENSITY = 0.3

EXPORT_FORMAT = "fedprune-inference/1"

# The formats a prunable weight can train and run in.
FORMATS = ("dense", "csr", "sparse-conv")

# How a node picks each layer's format (the `layer-format` setting): "measured" from its
# own device profile (the sparse format where the layer's density is at most the crossover
# measured for that layer), "dense" masked dense everywhere, "sparse" every layer in its
# sparse format where it has one here (for benchmarks).
LAYER_FORMATS = ("measured", "dense", "sparse")


def _csr_structure(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row pointers and column indices (int32, which MKL's kernels take without a copy)
    of the True entries of a 2-D bool mask, in row-major order, and their flat positions
    (int64). One pass of `nonzero` over the mask; the row pointers come from a binary search
    in the sorted flat positions (summing the bool rows would widen them to int64 first,
    20x slower on fc1)."""
    rows, cols = mask.shape
    if mask.numel() >= 2**31:
        raise ValueError(f"a {rows}x{cols} layer is too large for int32 CSR indices")
    if kernels.available():  # two passes of a compiled loop: 3x faster on fc1
        crow, col, flat = kernels.csr_structure(mask.contiguous().view(-1).numpy(), rows, cols)
        return torch.from_numpy(crow), torch.from_numpy(col), torch.from_numpy(flat)
    flat = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    crow = torch.searchsorted(flat, torch.arange(rows + 1) * cols)
    return crow.to(torch.int32), (flat % cols).to(torch.int32), flat


def _gather(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """src[idx] for a contiguous 1-D float tensor and int32 or int64 indices (into `out`,
    of len(idx) and src's dtype, if given)."""
    if kernels.available() and src.is_contiguous() and src.dtype in (torch.float32, torch.float64):
        if out is None:
            out = torch.empty(len(idx), dtype=src.dtype)
        kernels.gather(src.detach().numpy(), idx.numpy(), out.numpy())
        return out
    return torch.index_select(src, 0, idx, out=out)


def _scatter_into_zeros(out: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> None:
    """out = 0.0 except out[idx] = vals, in place (out 1-D)."""
    if (
        kernels.available()
        and out.is_contiguous()
        and out.dtype == vals.dtype
        and out.dtype in (torch.float32, torch.float64)
    ):
        kernels.scatter_into_zeros(out.numpy(), idx.numpy(), vals.contiguous().numpy())
        return
    out.zero_()
    out.index_copy_(0, idx, vals.to(out.dtype))


class _CSRLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W = CSR(layer structure, values); see the module docstring."""

    @staticmethod
    def forward(ctx, x, values, bias, layer):
        ctx.panels = layer._panels_run(x)
        if ctx.panels:
            xt = layer._padded_t(x)
            yt = layer._panel_product(xt, values, bias)
        else:
            xt = x.t()
            if not xt.is_contiguous():
                xt = xt.contiguous()
            w = layer.csr(values)
            yt = torch.sparse.mm(w, xt) if bias is None else torch.addmm(bias.unsqueeze(1), w, xt)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        ctx.batch = x.shape[0]
        ctx.save_for_backward(xt, values)
        return yt[:, : x.shape[0]].t()

    @staticmethod
    def backward(ctx, grad_out):
        xt, values = ctx.saved_tensors
        layer, batch = ctx.layer, ctx.batch
        if ctx.panels:
            gt = layer._padded_t(grad_out)
        else:
            gt = grad_out.t()
            if not gt.is_contiguous():
                gt = gt.contiguous()
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            if ctx.panels:
                grad_x = layer._panel_product(gt, values, None, transposed=True)[:, :batch].t()
            else:
                grad_x = torch.sparse.mm(layer.csr_transposed(values, reuse_buffer=True), gt).t()
        if ctx.needs_input_grad[1]:
            grad_values = layer._weight_grad(gt, xt, batch)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = gt[:, :batch].sum(1)
        if layer.track_importance:
            layer._stash.append((xt[:, :batch], gt[:, :batch]))
        return grad_x, grad_values, grad_bias, None


class SparseLinear(nn.Module):
    """A fully connected layer whose weight is CSR with a fixed sparsity structure.

    Parameters: `values` (the kept weights, 1-D, row-major order of the mask's True
    entries) and `bias` (dense, or None). The structure is fixed at construction from the
    mask; pruned positions do not exist in the layer, so they stay exactly zero whatever
    the optimiser does.

    With `track_importance` set, each backward pass in training also keeps what is needed
    for the dense weight gradient at every position; `dense_grad_sum()` returns that
    gradient summed over the passes since the last call.
    """

    def __init__(
        self,
        mask: torch.Tensor,
        values: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if mask.dim() != 2 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a 2-D bool tensor, not {mask.dtype} {mask.dim()}-D")
        self.out_features, self.in_features = mask.shape
        crow, col, _ = _csr_structure(mask)
        nnz = len(col)
        if values is None:
            values = torch.zeros(
                nnz, dtype=torch.get_default_dtype() if bias is None else bias.dtype
            )
        if values.shape != (nnz,):
            raise ValueError(f"values has shape {tuple(values.shape)}, the mask keeps {nnz}")
        self.register_buffer("crow_indices", crow, persistent=False)
        self.register_buffer("col_indices", col, persistent=False)
        self.values = nn.Parameter(values.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.track_importance = False
        self._stash: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._transpose: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._buffers_for_backward: dict[str, torch.Tensor] = {}
        self._narrow_cols: np.ndarray | None = None  # for `_matrix_vector`, made at need

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor) -> SparseLinear:
        """The kept part of `linear` (weight entries where `mask` is True, and its bias)."""
        if mask.shape != linear.weight.shape:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} != weight shape {tuple(linear.weight.shape)}"
            )
        bias = None if linear.bias is None else linear.bias.detach().clone()
        layer = cls(mask, bias=bias)
        layer.values.data = _gather(linear.weight.detach().reshape(-1), layer.flat_indices)
        return layer

    @property
    def nnz(self) -> int:
        return len(self.col_indices)

    @property
    def flat_indices(self) -> torch.Tensor:
        """The kept weights' flat positions in the (out, in) weight, row-major (int64).
        Made from the CSR structure when asked for, not held: at 8 bytes a kept weight it
        would be the layer's largest array (2.4 MB on the main job's fc1), and only
        conversions to and from dense read it."""
        counts = torch.diff(self.crow_indices.to(torch.int64))
        rows = torch.repeat_interleave(torch.arange(self.out_features), counts)
        return rows.mul_(self.in_features).add_(self.col_indices)

    @property
    def density(self) -> float:
        return self.nnz / max(self.in_features * self.out_features, 1)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def csr(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as a CSR tensor (out_features, in_features) sharing `values`."""
        return torch.sparse_csr_tensor(
            self.crow_indices,
            self.col_indices,
            self.values if values is None else values,
            (self.out_features, self.in_features),
            check_invariants=False,
        )

    def csr_transposed(
        self, values: torch.Tensor | None = None, reuse_buffer: bool = False
    ) -> torch.Tensor:
        """W^T as a CSR tensor (in_features, out_features); its values are a gathered copy
        (with `reuse_buffer`, into one buffer the layer reuses at the next call)."""
        if self._transpose is None:
            self._transpose = self._transpose_plan()
        crow_t, col_t, perm = self._transpose
        values = self.values if values is None else values
        out = None
        if reuse_buffer:
            out = self._buffers_for_backward.get("values_t")
            if out is None or out.dtype != values.dtype:
                out = self._buffers_for_backward["values_t"] = torch.empty_like(values)
        return torch.sparse_csr_tensor(
            crow_t,
            col_t,
            _gather(values, perm, out),
            (self.in_features, self.out_features),
            check_invariants=False,
        )

    def _weight_grad(
        self, gt: torch.Tensor, xt: torch.Tensor, batch: int | None = None
    ) -> torch.Tensor:
        """The weight gradient at the kept positions, (grad_out^T x)[kept], from the
        output gradient and the input transposed (features x batch, row-major; their rows
        may be padded past `batch`, which defaults to their width).

        The compiled kernel (`kernels.csr_sddmm_*`) where it runs: on fc1 at the main
        job's density it took 0.53 against MKL's sampled_addmm's 0.85 ms on one thread and
        0.48 against 0.8 ms on two (`python -m experiments.bench_kernel_parts`,
        2026-12-03, AVX-512)."""
        batch = gt.shape[1] if batch is None else batch
        if (
            kernels.available()
            and gt.dtype in (torch.float32, torch.float64)
            and gt.dtype == xt.dtype
            and gt.stride() == (gt.shape[1], 1)
            and xt.stride() == (xt.shape[1], 1)
            and gt.shape[1] == xt.shape[1]
        ):
            out = torch.empty(len(self.col_indices), dtype=gt.dtype)
            kernels.run(
                kernels.csr_sddmm_serial, kernels.csr_sddmm_parallel,
                gt.detach().numpy().reshape(-1), xt.detach().numpy().reshape(-1),
                self.crow_indices.numpy(), self.col_indices.numpy(), out.numpy(), batch,
                gt.shape[1],
            )  # fmt: skip
            return out
        # Written in place into a CSR tensor of the layer's structure: with out= being its
        # input, sampled_addmm skips copying the structure and values (a third of its time
        # on fc1 at density 0.1). The clone keeps the returned gradient independent of
        # that buffer.
        grad = self._grad_buffer()
        torch.sparse.sampled_addmm(grad, gt[:, :batch], xt[:, :batch].t(), beta=0.0, out=grad)
        return grad.values().clone()

    def _panels_run(self, x: torch.Tensor) -> bool:
        """Whether a batch's products run on the compiled panel kernel
        (`kernels.csr_panel_mm`): the same sums as MKL's CSR product, bit for bit, faster
        on two threads (see the kernel)."""
        return (
            kernels.available()
            and x.dtype == self.values.dtype
            and x.dtype in (torch.float32, torch.float64)
        )

    def _padded_t(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch x features) transposed into features x ld, row-major, zero past the
        batch: ld is the batch rounded up to the kernel's panel width."""
        batch, features = x.shape
        ld = -(-max(batch, 1) // kernels.PANEL) * kernels.PANEL
        out = torch.empty(features, ld, dtype=x.dtype)
        out[:, :batch].copy_(x.detach().t())
        out[:, batch:].zero_()
        return out

    def _panel_product(
        self,
        xt: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None,
        transposed: bool = False,
    ) -> torch.Tensor:
        """W xt + bias (or W^T xt, through the transpose's permutation), xt from
        `_padded_t`: (out or in features) x ld."""
        if transposed:
            if self._transpose is None:
                self._transpose = self._transpose_plan()
            crow, col, perm = (t.numpy() for t in self._transpose)
            rows = self.in_features
        else:
            crow, col, perm = self.crow_indices.numpy(), self.col_indices.numpy(), None
            rows = self.out_features
        ld = xt.shape[1]
        out = torch.empty(rows, ld, dtype=xt.dtype)
        kernels.csr_panel_mm(
            xt.numpy().reshape(-1), values.detach().numpy(), perm, crow, col,
            None if bias is None else bias.detach().numpy(), out.numpy().reshape(-1), ld,
        )  # fmt: skip
        return out

    def _grad_buffer(self) -> torch.Tensor:
        grad = self._buffers_for_backward.get("grad")
        if grad is None or grad.dtype != self.values.dtype:
            grad = self._buffers_for_backward["grad"] = torch.sparse_csr_tensor(
                self.crow_indices,
                self.col_indices,
                torch.zeros_like(self.values.detach()),
                (self.out_features, self.in_features),
                check_invariants=False,
            )
        return grad

    def _transpose_plan(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if kernels.available():  # a counting sort, O(nnz), against torch's sort
            parts = kernels.csr_transpose(
                self.crow_indices.numpy(), self.col_indices.numpy(), self.in_features
            )
            return tuple(torch.from_numpy(a) for a in parts)
        # Entries are in row-major order, so a stable sort by column puts them in
        # row-major order of W^T: position k of W^T's values holds values[perm[k]].
        _, perm = torch.sort(self.col_indices, stable=True)
        rows = self.flat_indices // self.in_features
        crow_t = torch.zeros(self.in_features + 1, dtype=torch.int64)
        counts = torch.bincount(self.col_indices, minlength=self.in_features)
        torch.cumsum(counts, 0, out=crow_t[1:])
        col_t = torch.index_select(rows, 0, perm).to(torch.int32)
        # An int32 permutation: less to read at every gather (about 15 % faster on fc1).
        return crow_t.to(torch.int32), col_t, perm.to(torch.int32)

    def mask(self) -> torch.Tensor:
        """The bool mask (out_features, in_features) of the kept positions."""
        mask = torch.zeros(self.out_features * self.in_features, dtype=torch.bool)
        mask[self.flat_indices] = True
        return mask.view(self.out_features, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense tensor, exactly 0.0 at pruned positions."""
        weight = torch.empty(self.out_features * self.in_features, dtype=self.values.dtype)
        _scatter_into_zeros(weight, self.flat_indices, self.values.detach())
        return weight.view(self.out_features, self.in_features)

    def to_linear(self, out: nn.Linear | None = None) -> nn.Linear:
        """A dense `nn.Linear` with this layer's weights (written into `out` if given)."""
        if out is None:
            out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            _scatter_into_zeros(out.weight.view(-1), self.flat_indices, self.values.detach())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def dense_grad_sum(self) -> torch.Tensor | None:
        """Dense weight gradient (out, in), summed over the backward passes run with
        `track_importance` since the last call; None if there were none."""
        if not self._stash:
            return None
        xs = torch.cat([xt for xt, _ in self._stash], dim=1)  # (in, sum of batches)
        gs = torch.cat([gt for _, gt in self._stash], dim=1)  # (out, sum of batches)
        self._stash.clear()
        return gs @ xs.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and (
            x2.requires_grad
            or self.values.requires_grad
            or (self.bias is not None and self.bias.requires_grad)
        ):
            y = _CSRLinearFunction.apply(x2, self.values, self.bias, self)
        elif x2.shape[0] == 1 and self._vector_product_runs(x2):
            y = self._matrix_vector(x2)
        else:
            w, xt = self.csr(), x2.t()
            yt = (
                torch.sparse.mm(w, xt)
                if self.bias is None
                else torch.addmm(self.bias.unsqueeze(1), w, xt)
            )
            y = yt.t()
        return y.reshape(*lead, self.out_features)

    def _vector_product_runs(self, x: torch.Tensor) -> bool:
        return (
            kernels.available()
            and x.dtype == self.values.dtype
            and x.dtype in (torch.float32, torch.float64)
        )

    def _matrix_vector(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b for one sample x (1, in_features), without autograd, by the compiled
        matrix-vector product (`kernels.csr_spmv_*`): on fc1 it streams uint16 column
        indices, half the int32 ones MKL takes, and ran 1.3x to 1.5x faster than MKL's
        product (see the kernel). The narrow copy of the column indices is made at the
        first call and kept. Batches of more samples use MKL's product, which the server's
        evaluation and training use, so their sums are unchanged."""
        if self._narrow_cols is None:
            col = self.col_indices.numpy()
            self._narrow_cols = col.astype(np.uint16) if self.in_features <= 1 << 16 else col
        values = self.values.detach().numpy()
        if self.bias is None:
            bias = np.zeros(self.out_features, dtype=values.dtype)
        else:
            bias = self.bias.detach().numpy()
        out = torch.empty(1, self.out_features, dtype=self.values.dtype)
        kernels.run(
            kernels.csr_spmv_serial, kernels.csr_spmv_parallel,
            x.detach().contiguous().view(-1).numpy(), values, self.crow_indices.numpy(),
            self._narrow_cols, bias, out.view(-1).numpy(),
        )  # fmt: skip
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nnz={self.nnz}, density={self.density:.4f}, bias={self.bias is not None}"
        )


def _threshold(max_csr_density: float | Mapping[str, float], weight_name: str) -> float:
    if isinstance(max_csr_density, Mapping):
        return float(max_csr_density.get(weight_name, -1.0))
    return float(max_csr_density)


def supported_formats(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Per prunable weight name ("conv1.weight"): the formats its layer can train in here.
    "dense" always; "csr" for Linear layers; "sparse-conv" for Conv2d layers the direct
    kernels support (`fedprune.sparse_conv.check_supported`) when they run on this machine
    (`sparse_conv_available()`, which says once why not)."""
    out = {}
    for name, module in model.named_modules():
        weight_name = f"{name}.weight" if name else "weight"
        if isinstance(module, nn.Linear | SparseLinear):
            out[weight_name] = ("dense", "csr")
        elif isinstance(module, nn.Conv2d):
            try:
                check_supported(module)
                ok = True
            except ValueError:
                ok = False
            ok = ok and sparse_conv_available()
            out[weight_name] = ("dense", "sparse-conv") if ok else ("dense",)
        elif isinstance(module, SparseConv2d):
            out[weight_name] = ("dense", "sparse-conv")
    return out


def layer_formats(model: nn.Module) -> dict[str, str]:
    """Per prunable weight name: the format its layer is in now ("dense", "csr",
    "sparse-conv")."""
    out = {}
    for name, module in model.named_modules():
        weight_name = f"{name}.weight" if name else "weight"
        if isinstance(module, SparseLinear):
            out[weight_name] = "csr"
        elif isinstance(module, SparseConv2d):
            out[weight_name] = "sparse-conv"
        elif isinstance(module, nn.Linear | nn.Conv2d):
            out[weight_name] = "dense"
    return out


def to_formats(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    formats: Mapping[str, str],
) -> dict[str, nn.Module]:
    """Convert, in place, each layer whose weight name `formats` maps to "csr" (an
    `nn.Linear` becomes a `SparseLinear`) or "sparse-conv" (an `nn.Conv2d` becomes a
    `SparseConv2d`), with the structure of its mask in `masks`. "dense" layers, layers
    not named, and layers that are already sparse stay as they are.

    Where "sparse-conv" is asked but the compiled kernels do not run on this machine
    (`fedprune.sparse_conv.sparse_conv_available()`, which logs why, once), the layer stays
    dense (masked dense in training); `layer_formats(model)` tells what each layer is in.
    Raises ValueError for an unknown format, a format that does not fit the layer type,
    a convolution the kernels do not support, or a missing mask.

    Returns the replaced modules by module name, for `restore_dense`.
    """
    replaced: dict[str, nn.Module] = {}
    for weight_name, fmt, name, module, mask in _layers_to_convert(model, masks, formats):
        values = module.weight.detach().reshape(-1)[mask.reshape(-1)]
        bias = None if module.bias is None else module.bias.detach()
        sparse = _sparse_layer(weight_name, fmt, module, mask, values, bias)
        if sparse is None:
            continue
        _set_submodule(model, name, sparse)
        replaced[name] = module
    return replaced


def _layers_to_convert(
    model: nn.Module, masks: Mapping[str, torch.Tensor], formats: Mapping[str, str]
) -> Iterator[tuple[str, str, str, nn.Module, torch.Tensor]]:
    """(weight name, format, module name, module, bool mask) of each layer `formats` puts
    in a sparse format and that is not sparse already, checked: ValueError for an unknown
    format, a weight the model does not have, or a missing or misshapen mask."""
    modules = dict(model.named_modules())
    for weight_name, fmt in formats.items():
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r} for {weight_name}; one of {FORMATS}")
        if fmt == "dense":
            continue
        name = weight_name.rpartition(".")[0]
        module = modules.get(name) if name else None
        if module is None:
            raise ValueError(f"{weight_name}: no such layer in the model (or the model itself)")
        if isinstance(module, SparseLinear | SparseConv2d):
            continue
        mask = masks.get(weight_name)
        if mask is None:
            raise ValueError(f"{weight_name}: format {fmt!r} needs its mask")
        mask = mask.to(torch.bool)
        if mask.shape != module.weight.shape:
            raise ValueError(
                f"{weight_name}: mask shape {tuple(mask.shape)} != weight shape "
                f"{tuple(module.weight.shape)}"
            )
        yield weight_name, fmt, name, module, mask


def _sparse_layer(
    weight_name: str,
    fmt: str,
    module: nn.Module,
    mask: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
) -> nn.Module | None:
    """`module` in sparse format `fmt` ("csr" or "sparse-conv"), with its kept weights
    `values` (position order) and `bias`; None where the sparse convolution's compiled
    kernels do not run here (the layer stays dense). ValueError for a format that does
    not fit the layer or a convolution the kernels do not support."""
    if fmt == "csr":
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{weight_name}: 'csr' is for Linear layers, not {module}")
        return SparseLinear(mask, values=values, bias=bias)
    if not isinstance(module, nn.Conv2d):
        raise ValueError(f"{weight_name}: 'sparse-conv' is for Conv2d layers, not {module}")
    check_supported(module)
    if not sparse_conv_available():
        return None
    return SparseConv2d(mask, values=values, bias=bias, padding=conv_padding(module))


def model_in_formats(
    model: nn.Module,
    kept: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    formats: Mapping[str, str],
) -> nn.Module:
    """`model` (a `fedprune.models.skeleton`: shapes, no memory) with the values a node
    received (`fedprune.codec.decode_kept`: per parameter, 1-D, a prunable one's kept
    values) as its weights, each layer named in `formats` already in its format: a sparse
    layer is built from its kept values alone, so the node never holds it dense (fc1 of
    Conv-2 is 26 MB dense, about 1 MB in CSR at the main job's final mask). Every other
    parameter is made dense (0.0 at pruned positions). Sparse convolutions stay dense
    where the compiled kernels do not run here, as in `to_formats`.

    `train_sparse` trains such a model's sparse layers as they are; `kept_parameters`
    gives back the values for the reply.
    """
    in_sparse: set[str] = set()  # parameters that live in a sparse layer
    for weight_name, fmt, name, module, mask in _layers_to_convert(model, masks, formats):
        if weight_name not in kept:
            raise ValueError(f"{weight_name}: format {fmt!r} needs its kept values")
        bias_name = f"{name}.bias"
        bias = kept.get(bias_name) if module.bias is not None else None
        sparse = _sparse_layer(weight_name, fmt, module, mask, kept[weight_name], bias)
        if sparse is None:
            continue
        _set_submodule(model, name, sparse)
        in_sparse |= {weight_name, bias_name}
    dense, missing = {}, []
    for name, p in model.named_parameters():
        if _in_sparse_layer(model, name):
            continue
        if name not in kept:
            missing.append(name)
            continue
        dense[name] = dense_from_kept(kept[name], masks.get(name), p.shape)
    extra = sorted(set(kept) - set(dense) - in_sparse)
    if extra or missing:
        raise ValueError(f"values do not fit the model: extra {extra}, missing {missing}")
    model.load_state_dict(dense, strict=False, assign=True)
    return model


class LayerMasks(Mapping[str, torch.Tensor]):
    """The masks of a model's prunable weights, without a bool copy of those the model's
    sparse layers already hold as their index structure.

    A node keeps the masks for its whole round (training reads the dense layers'; the
    reply and the importance upload read all of them), and fc1's alone is 6.4 MB of bools
    on Conv-2, where a warm local round in the main job's formats peaks near 30 MB
    (`experiments/bench_memory.py`). For a weight whose layer is sparse in `model`
    (`sparse_layers`), this mapping holds the layer instead and builds the bool mask from
    its indices each time it is read (a fresh tensor): nothing in the training loop reads those
    (`fedprune.training.MaskedSGD` looks up masks by parameter), so the bools exist only
    briefly, after training, for the reply. The other masks are held as given. Names and
    their order are those of `masks`."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        sparse = sparse_layers(model)
        self._names = list(masks)
        self._layers = {n: sparse[n] for n in self._names if n in sparse}
        self._held = {n: m for n, m in masks.items() if n not in self._layers}

    def __getitem__(self, name: str) -> torch.Tensor:
        layer = self._layers.get(name)
        return self._held[name] if layer is None else layer.mask()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._layers or name in self._held

    def kept_count(self, name: str) -> int:
        """How many positions the mask of `name` keeps, without building it."""
        layer = self._layers.get(name)
        return int(torch.count_nonzero(self._held[name])) if layer is None else layer.nnz


def _in_sparse_layer(model: nn.Module, param_name: str) -> bool:
    module_name = param_name.rpartition(".")[0]
    return isinstance(model.get_submodule(module_name), SparseLinear | SparseConv2d)


def kept_parameters(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per parameter of the wire (the dense model's names and order), its values as the
    reply carries them (`fedprune.codec.encode_kept_update`): a sparse layer's own
    values (they are the kept ones, in position order), a dense prunable weight's values
    where its mask is True, any other parameter whole. Views where possible: the encoder
    copies."""
    sparse = {name.rpartition(".")[0]: layer for name, layer in sparse_layers(model).items()}
    out: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        if module_name in sparse:
            out[f"{module_name}.weight"] = module.values.detach()
            if module.bias is not None:
                out[f"{module_name}.bias"] = module.bias.detach()
            continue
        if isinstance(module, SparseLinear | SparseConv2d):
            continue
        for pname, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{pname}" if module_name else pname
            flat = p.detach().reshape(-1)
            out[name] = flat[masks[name].reshape(-1)] if name in masks else flat
    return out


def to_sparse(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    max_csr_density: float | Mapping[str, float] = DEFAULT_MAX_CSR_DENSITY,
) -> dict[str, nn.Linear]:
    """Replace, in place, each `nn.Linear` of `model` whose weight has a mask of density
    (kept fraction) at most `max_csr_density` by a `SparseLinear`.

    `max_csr_density` is one threshold for all layers or one per weight name ("fc1.weight");
    a layer missing from the mapping stays dense. Returns the replaced `nn.Linear` modules
    by module name, to hand back to `to_dense` for an in-place round trip.
    """
    return to_formats(model, masks, csr_formats(model, masks, max_csr_density))


def csr_formats(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    max_csr_density: float | Mapping[str, float] = DEFAULT_MAX_CSR_DENSITY,
) -> dict[str, str]:
    """The format "csr" for each `nn.Linear` weight whose mask density is at most `max_csr_density`
    (one threshold, or one per weight name; a missing name stays dense), else "dense"."""
    formats = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight_name = f"{name}.weight" if name else "weight"
        mask = masks.get(weight_name)
        if mask is None:
            continue
        density = mask_density(mask)
        if density > _threshold(max_csr_density, weight_name):
            formats[weight_name] = "dense"
            continue
        if not name:
            raise ValueError("the model itself is a Linear layer; wrap it to convert it")
        formats[weight_name] = "csr"
    return formats


def mask_density(mask: torch.Tensor) -> float:
    """Kept fraction of a mask (0.0 for an empty one)."""
    return int(torch.count_nonzero(mask)) / max(mask.numel(), 1)


def choose_formats(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    layer_format: str,
    crossovers: Mapping[str, tuple[str, float]] | None = None,
) -> dict[str, str]:
    """Per weight name in `masks` whose layer can be converted: the format it trains in.

    layer_format: "dense" (masked dense everywhere), "sparse" (each layer in its sparse
        format where it has one here, `supported_formats`) or "measured": a layer trains
        in the sparse format `crossovers` gives it (weight name -> (format, density), from
        `fedprune.profiler.sparse_crossovers`) while its mask density is at most that
        density, else masked dense; a layer the crossovers do not name, or whose measured
        format it cannot run here, stays masked dense.
    """
    if layer_format not in LAYER_FORMATS:
        raise ValueError(f"unknown layer format {layer_format!r}; one of {LAYER_FORMATS}")
    if layer_format == "measured" and crossovers is None:
        raise ValueError("layer format 'measured' needs the device's crossovers")
    supported = supported_formats(model)
    formats = {}
    for name, mask in masks.items():
        if name not in supported:
            continue
        sparse = [f for f in supported[name] if f != "dense"]
        fmt = "dense"
        if layer_format == "sparse" and sparse:
            fmt = sparse[0]
        elif layer_format == "measured" and name in crossovers:
            measured, max_density = crossovers[name]
            if measured in sparse and mask_density(mask) <= max_density:
                fmt = measured
        formats[name] = fmt
    return formats


def compact_formats(formats: Mapping[str, str]) -> str:
    """One short line for logs and summaries: "conv1:dense,conv2:sparse-conv,fc1:csr"
    from {"conv1.weight": "dense", ...}."""
    return ",".join(f"{name.removesuffix('.weight')}:{fmt}" for name, fmt in formats.items())


def to_dense(model: nn.Module, originals: Mapping[str, nn.Module] | None = None) -> Masks:
    """Replace, in place, every sparse layer of `model` (`SparseLinear`, `SparseConv2d`) by
    a dense `nn.Linear` / `nn.Conv2d`, exactly 0.0 at pruned positions, and return their
    masks by weight name.

    With `originals` (what `to_formats` or `to_sparse` returned), the layers' weights are
    written back into those very modules, so the model's parameter objects are the ones
    it had before.
    """
    masks = {name: layer.mask() for name, layer in sparse_layers(model).items()}
    _swap_back(model, originals or {})
    return masks


def restore_dense(model: nn.Module, originals: Mapping[str, nn.Module]) -> None:
    """Undo `to_formats` / `to_sparse` in place: write each converted layer's weights back
    into its original module (`originals`, what those returned) and put that back."""
    _swap_back(model, originals, only_originals=True)


def _swap_back(
    model: nn.Module, originals: Mapping[str, nn.Module], only_originals: bool = False
) -> None:
    for name, module in list(model.named_modules()):
        if name in originals or not only_originals:
            if isinstance(module, SparseLinear):
                _set_submodule(model, name, module.to_linear(originals.get(name)))
            elif isinstance(module, SparseConv2d):
                _set_submodule(model, name, module.to_conv(originals.get(name)))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear | SparseConv2d]:
    """The sparse layers (`SparseLinear`, `SparseConv2d`) of `model`, by weight name
    ("fc1.weight")."""
    return {
        f"{name}.weight": module
        for name, module in model.named_modules()
        if isinstance(module, SparseLinear | SparseConv2d)
    }


def train_sparse(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    data: Examples,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    generator: torch.Generator,
    track_importance: bool = True,
    max_csr_density: float | Mapping[str, float] = DEFAULT_MAX_CSR_DENSITY,
    formats: Mapping[str, str] | None = None,
) -> LocalRound:
    """`fedprune.training.train_masked` with layers in sparse formats.

    The same arguments and result: K = `steps` SGD steps of batch `batch_size` on the kept
    parameters, pruned weights exactly 0.0, and (with `track_importance`) the importance of
    every parameter, pruned positions included. `formats` (weight name -> "dense", "csr"
    or "sparse-conv", see `to_formats`) says which layer trains in which format; without
    it, Linear layers whose mask density is at most `max_csr_density` train in CSR and
    the rest masked dense. The model is converted for the round and back at its end, in
    place, so its parameters (names and objects) are those it came with; layers that were
    already sparse train as they are and stay sparse (their importance is keyed
    "<module>.weight"). The result's `formats` says what each layer trained in.
    """
    if len(data) == 0:
        raise ValueError("no local training data")
    if formats is None:
        formats = csr_formats(model, masks, max_csr_density)
    originals = to_formats(model, masks, formats)
    try:
        used = layer_formats(model)
        result = _train_loop(
            model,
            masks,
            data,
            steps,
            batch_size,
            lr,
            momentum,
            weight_decay,
            generator,
            track_importance,
        )
        result.formats = used
    finally:
        for layer in sparse_layers(model).values():
            layer.track_importance = False
            layer._stash.clear()
        restore_dense(model, originals)
    if result.importance is not None:
        order = [name for name, _ in model.named_parameters()]
        ordered = {n: result.importance[n] for n in order if n in result.importance}
        ordered.update(result.importance)  # layers that stay sparse, keyed by their weight
        result.importance = ordered
    return result


def _train_loop(
    model,
    masks,
    data,
    steps,
    batch_size,
    lr,
    momentum,
    weight_decay,
    generator,
    track_importance,
) -> LocalRound:
    sparse = sparse_layers(model)
    for layer in sparse.values():
        layer.track_importance = track_importance
        layer._stash.clear()
    # The sparse layers' values have no mask (pruned positions do not exist in them); the
    # masks of the layers that stay dense apply as in train_masked.
    loss, samples, grad_sum, _ = masked_steps(
        model,
        masks,
        data,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        generator=generator,
        track_importance=track_importance,
    )
    importance = None
    if grad_sum is not None:
        sparse_values = {f"{name[: -len('.weight')]}.values" for name in sparse}
        importance = squared_importance(
            grad_sum,
            ((n, p) for n, p in model.named_parameters() if n not in sparse_values),
            samples,
        )
        for weight_name, layer in sparse.items():
            g = layer.dense_grad_sum()
            if g is None:
                g = torch.zeros(layer.weight_shape)
            importance[weight_name] = g.square_().mul_(samples)
    return LocalRound(len(data), steps, samples, loss, importance)


# --- Edge inference ---------------------------------------------------------------


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` calls, seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inference_latency(
    model: nn.Module, batch: torch.Tensor, repeats: int = 20, warmup: int = 3
) -> float:
    """Median seconds of one forward pass of `model` on `batch` (inference mode)."""
    model.eval()
    with torch.inference_mode():
        return median_seconds(lambda: model(batch), repeats, warmup)


def _model_spec(model: nn.Module) -> dict:
    """How to rebuild `model`'s architecture: TwoConvNet (Conv-2, small CNN) from its
    layer sizes; other models need `arch` given to `export_for_inference`."""
    if isinstance(model, TwoConvNet):
        side = round((model.fc1.in_features / model.conv2.out_channels) ** 0.5) * 4
        return {
            "name": "two-conv-net",
            "channels1": model.conv1.out_channels,
            "channels2": model.conv2.out_channels,
            "hidden": model.fc1.out_features,
            "num_classes": model.fc2.out_features,
            "input_shape": [model.conv1.in_channels, side, side],
        }
    raise ValueError(
        f"cannot tell how to rebuild a {type(model).__name__}; pass arch={{'name': <one of "
        f"{sorted(MODELS)}>, 'num_classes': ..., 'input_shape': [c, h, w]}}"
    )


def _build_from_spec(spec: Mapping) -> nn.Module:
    if spec["name"] == "two-conv-net":
        return TwoConvNet(
            int(spec["channels1"]),
            int(spec["channels2"]),
            int(spec["hidden"]),
            int(spec["num_classes"]),
            tuple(int(v) for v in spec["input_shape"]),
        )
    return model_factory(spec["name"])(
        int(spec["num_classes"]), tuple(int(v) for v in spec["input_shape"])
    )


def fastest_inference_formats(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    batch_size: int = 1,
    repeats: int = 25,
    input_shape: tuple[int, int, int] | None = None,
) -> dict[str, str]:
    """For each prunable weight in `masks`: the format ("dense", "csr" for Linear layers,
    "sparse-conv" for supported Conv2d layers where the kernels run) whose forward pass of
    that layer at `batch_size` is fastest here; a convolution's with the pooling and ReLU
    after it where the model runs them as one block (`TwoConvNet.conv_block`: a sparse
    convolution pools a single sample in the same pass).

    Each layer's input shape is taken from one forward pass of `model` on a random batch
    of `input_shape` ((channels, height, width); by default the model's own for Conv-2 and
    the small CNN, else it is needed when convolutions are to be timed). The formats are
    timed interleaved, after a warm-up (the first sparse products of a process are slow),
    and compared by their fastest call: load from other processes only ever adds time, so
    the minimum is the steadier estimate of what each format costs. On a heavily loaded
    2-core machine, sparse products with 2 threads can still lose every call (each waits
    for both threads), so pass `formats` to `export_for_inference` where the choice must
    not depend on the moment's load."""
    modules = dict(model.named_modules())
    supported = supported_formats(model)
    shapes = _layer_input_shapes(model, masks, batch_size, input_shape)
    formats = {}
    for weight_name, mask in masks.items():
        module = modules.get(weight_name.rpartition(".")[0])
        choices = supported.get(weight_name, ("dense",))
        if len(choices) < 2 or weight_name not in shapes:
            if module is not None and weight_name in supported:
                formats[weight_name] = "dense"
            continue
        mask = mask.to(torch.bool)
        candidates = {"dense": module}
        if "csr" in choices:
            candidates["csr"] = SparseLinear.from_linear(module, mask)
        if "sparse-conv" in choices:
            candidates["sparse-conv"] = SparseConv2d.from_conv(module, mask)
        x = torch.randn(shapes[weight_name])
        # A convolution is timed with what follows it in the model where the model says
        # (`conv_block`, Conv-2's): a sparse one pools and rectifies a single sample in
        # the same pass, a dense one does not.
        block = getattr(model, "conv_block", None)
        if isinstance(module, nn.Conv2d) and block is not None:
            run = {f: partial(block, layer, x) for f, layer in candidates.items()}
        else:
            run = {f: partial(layer, x) for f, layer in candidates.items()}
        times: dict[str, list[float]] = {f: [] for f in candidates}
        with torch.inference_mode():
            for _ in range(5):
                for fn in run.values():
                    fn()
            for _ in range(repeats):
                for f, fn in run.items():
                    start = time.perf_counter()
                    fn()
                    times[f].append(time.perf_counter() - start)
        formats[weight_name] = min(times, key=lambda f: min(times[f]))
    return formats


def _layer_input_shapes(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    batch_size: int,
    input_shape: tuple[int, int, int] | None,
) -> dict[str, tuple[int, ...]]:
    """Per weight name in `masks`: the shape of its layer's input at `batch_size`. Linear
    layers need no forward pass ((batch, in_features)); convolutions do, on a batch of
    `input_shape` (or the model's own, for Conv-2 and the small CNN)."""
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    convs = {}
    for weight_name in masks:
        module = modules.get(weight_name.rpartition(".")[0])
        if isinstance(module, nn.Linear):
            shapes[weight_name] = (batch_size, module.in_features)
        elif isinstance(module, nn.Conv2d):
            convs[weight_name] = module
    if not convs:
        return shapes
    if input_shape is None:
        try:
            input_shape = tuple(_model_spec(model)["input_shape"])
        except ValueError:
            return shapes  # convolutions cannot be timed without an input shape
    hooks = [
        module.register_forward_hook(
            lambda _m, inputs, _o, name=name: shapes.__setitem__(name, tuple(inputs[0].shape))
        )
        for name, module in convs.items()
    ]
    try:
        with torch.inference_mode():
            model(torch.randn(batch_size, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def export_for_inference(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    batch_size: int = 1,
    formats: Mapping[str, str] | None = None,
    arch: Mapping | None = None,
) -> dict[str, str]:
    """Write the pruned `model` to `path` for inference on this kind of device.

    Each prunable layer is stored in the format whose forward pass is fastest here at
    `batch_size` ("csr" for Linear layers, "sparse-conv" for convolutions, or "dense";
    measured unless `formats` names them); pruned weights are exactly 0.0 and the masks go
    along (bool, by weight name). The file holds tensors, numbers and strings only
    (`torch.load(weights_only=True)`). `arch` ({"name": a `fedprune.models` name,
    "num_classes", "input_shape"}) says how to rebuild the model; Conv-2 and the small CNN
    are recognised without it. Returns the chosen format per prunable weight.
    """
    spec = dict(arch) if arch is not None else _model_spec(model)
    if formats is None:
        formats = fastest_inference_formats(
            model, masks, batch_size, input_shape=tuple(spec["input_shape"])
        )
    masks = {name: m.to(torch.bool) for name, m in masks.items()}
    modules = dict(model.named_modules())
    state, csr, sparse_conv = {}, {}, {}
    for name, p in model.named_parameters():
        fmt = formats.get(name)
        module = modules.get(name.rpartition(".")[0])
        if fmt == "csr" and isinstance(module, nn.Linear):
            crow, col, _ = _csr_structure(masks[name])
            csr[name] = {
                "crow_indices": crow,
                "col_indices": col,
                "values": p.detach()[masks[name]],
            }
        elif fmt == "sparse-conv" and isinstance(module, nn.Conv2d):
            check_supported(module)
            sparse_conv[name] = {"values": p.detach()[masks[name]]}
        elif fmt not in (None, "dense"):
            raise ValueError(f"{name}: format {fmt!r} does not fit {module}")
        else:
            state[name] = (p.detach() * masks[name]) if name in masks else p.detach().clone()
    payload = {
        "format": EXPORT_FORMAT,
        "arch": spec,
        "state": state,
        "csr": csr,
        "sparse_conv": sparse_conv,
        "masks": {name: m.clone() for name, m in masks.items()},
        "layer_formats": dict(formats),
    }
    torch.save(payload, Path(path))
    return dict(formats)


def read_export(path: str | Path) -> dict:
    """The raw content of a file written by `export_for_inference`."""
    payload = torch.load(Path(path), weights_only=True)
    if payload.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a {EXPORT_FORMAT} file")
    return payload


def load_for_inference(path: str | Path) -> nn.Module:
    """A runnable module (eval mode, no gradients) from an `export_for_inference` file,
    with its CSR layers as `SparseLinear` and its "sparse-conv" layers as `SparseConv2d`
    (dense convolutions with the same weights where the kernels do not run here). The
    masks are in `read_export(path)["masks"]`."""
    payload = read_export(path)
    model = _build_from_spec(payload["arch"])
    loaded = model.load_state_dict(payload["state"], strict=False)
    missing = set(loaded.missing_keys) - set(payload["csr"]) - set(payload.get("sparse_conv", {}))
    if missing or loaded.unexpected_keys:
        raise ValueError(
            f"{path} does not fit its architecture: missing {sorted(missing)}, "
            f"unexpected {sorted(loaded.unexpected_keys)}"
        )
    for weight_name, parts in payload["csr"].items():
        module_name = weight_name.rpartition(".")[0]
        linear = model.get_submodule(module_name)
        layer = SparseLinear(payload["masks"][weight_name], parts["values"], linear.bias)
        if not (
            torch.equal(layer.crow_indices, parts["crow_indices"])
            and torch.equal(layer.col_indices, parts["col_indices"])
        ):
            raise ValueError(f"{path}: the CSR structure of {weight_name} does not match its mask")
        _set_submodule(model, module_name, layer)
    for weight_name, parts in payload.get("sparse_conv", {}).items():
        module_name = weight_name.rpartition(".")[0]
        conv = model.get_submodule(module_name)
        mask = payload["masks"].get(weight_name)
        if not isinstance(conv, nn.Conv2d) or mask is None or mask.shape != conv.weight.shape:
            raise ValueError(f"{path}: {weight_name} is not a convolution with a fitting mask")
        # SparseConv2d checks that the values match the mask's count.
        layer = SparseConv2d(
            mask.to(torch.bool), parts["values"], conv.bias, padding=conv_padding(conv)
        )
        if sparse_conv_available():
            _set_submodule(model, module_name, layer)
        else:  # the kernels do not run here (logged once): the same weights, dense
            layer.to_conv(conv)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
