"""Direct sparse convolution on the CPU, for training and inference of pruned conv layers.

A pruned `nn.Conv2d` becomes a `SparseConv2d`: its one trainable weight tensor is `values`,
the kept weights (1-D, in row-major order of the mask's True entries, the order of
`weight[mask]`), beside a dense bias. The kernels follow Park et al., "Faster CNNs with
Direct Sparse Convolutions" (ICLR 2017): no im2col; each kept weight W[m, c, r, s] is one
scalar times one shifted window of the (padded) input, and the window's start is a single
integer offset into a flat buffer, computed once per input shape.

Layout (paid once per layer and step, not per kernel call). The input (B, C, H, W) is
copied once into a zero-padded buffer laid out (C, H + 2p, W + 2p, B): batch innermost,
so one output row of one channel, W_out * B floats, is contiguous, and so is every window
that feeds it. Then, for output channel m:

    out[m, y, :, :] += W[m, c, r, s] * xp[c, y + r, s : s + W_out, :]   (all kept c, r, s)

is a contiguous multiply-add of W_out * B floats at offset ((c*Hp + r)*Wp + s)*B + y*Wp*B.
With few floats per row (batch 1), each channel's whole output is computed as one run of
H_out * Wp floats that includes the Wp - W_out padding columns (Park's trick), which are
dropped afterwards.

Register blocking: each pass over an output row applies eight kept weights at once (eight
scalars in registers, eight input streams, one load and one store of the output per
eight multiply-adds), so the output row moves through the cache once per eight weights,
not once per weight.

The three products of a training step, all at the kept positions only:
- forward: the kernel above, bias fused;
- input gradient: the same kernel on the output gradient padded by K - 1 - p, with the
  weights transposed (rows are input channels) and flipped (r -> R - 1 - r): a stride-1
  convolution's input gradient is the "full" convolution with the flipped kernel;
- weight gradient: for each kept weight, one dot product of the output gradient's row
  with the input window the weight saw; eight kept weights of one output channel share
  each load of the gradient.
Every kernel runs over output channels (input channels for the input gradient) in a
`numba.prange` loop when torch is allowed more than one thread.

Memory formats: the output is channels-last, because the ReLU and max-pooling that
follow a convolution run an order of magnitude faster on it in torch on the CPU than on
NCHW (the transpose out of the kernel's layout costs the same either way); the input
gradient comes back in the input's format. The padded buffers are reused across steps
(`_Buffers`), so their padding is zeroed once, not at every step.

Measured (Conv-2's conv2 at density 0.18, batch 20, 1 thread, AMD EPYC with AVX-512,
fastest of 200 calls, `python -m experiments.bench_kernel_parts`): on 2026-12-03 (commit
7fec4ef), on a host that ran oneDNN's dense forward at 45 to 47, the kernels reached 19
to 20 G kept multiply-adds per second forward, 21 to 23 for the input gradient and 26
for the weight gradient. The weight gradient had been summing float32 in float64 (see
`fedprune.kernels`): 10 to 11 at commit 43c69aa on the same host, now the fastest of the
three. With it the layer's training step breaks even with dense near density 0.3
(`experiments/bench_kernels.py`).

When the layer tracks importance (PruneFL's grow-back scores), it keeps each step's input
and output gradient and `dense_grad_sum()` forms the dense weight gradient at every
position, pruned ones included, summed over the steps, with one dense
`torch.nn.grad.conv2d_weight` over all the steps' samples at the end of the round.

Supported: `nn.Conv2d` with stride 1, dilation 1, groups 1, zero padding of any size
(`padding_mode="zeros"`, numbers or "same"/"valid"), any channels and kernel size,
batch 1 and up, float32 and float64 on the CPU. Anything else raises `ValueError`
(`check_supported`).

The kernels live in `fedprune.kernels` (numba, compiled at first use: a few seconds on a
fresh machine, well under one from numba's disk cache). If they do not run here,
`sparse_conv_available()` is False and has said why, once, as a logged warning; callers
then train those layers masked dense.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedprune import kernels

# Output rows shorter than this many floats are computed as one run per channel that
# includes the padding columns (see the module docstring): four AVX-512 vectors.
MIN_ROW_FLOATS = 64

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def sparse_conv_available() -> bool:
    """Whether the direct sparse convolution runs on this machine: the compiled kernels
    (`fedprune.kernels.available()`, which compiles them once and logs once why not).
    Where it does not, callers train those layers masked dense."""
    return kernels.available()


def sparse_conv_unavailable_reason() -> str | None:
    """Why the kernels do not run here (None if they do)."""
    return kernels.unavailable_reason()


# --- Layer --------------------------------------------------------------------------


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def check_supported(conv: nn.Conv2d) -> None:
    """Raise ValueError, naming the setting, if `conv` is not a convolution the direct
    sparse kernels compute: stride 1, dilation 1, groups 1, zero padding."""
    problems = []
    if _pair(conv.stride) != (1, 1):
        problems.append(f"stride {conv.stride} (only 1)")
    if _pair(conv.dilation) != (1, 1):
        problems.append(f"dilation {conv.dilation} (only 1)")
    if conv.groups != 1:
        problems.append(f"groups {conv.groups} (only 1)")
    if conv.padding_mode != "zeros":
        problems.append(f"padding_mode {conv.padding_mode!r} (only 'zeros')")
    if isinstance(conv.padding, str):
        kh, kw = _pair(conv.kernel_size)
        if conv.padding == "same" and (kh % 2 == 0 or kw % 2 == 0):
            problems.append("padding 'same' with an even kernel (asymmetric padding)")
    if problems:
        raise ValueError("SparseConv2d does not support " + ", ".join(problems))


def conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """(rows, columns) of zero padding on each side of `conv`'s input."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        kh, kw = _pair(conv.kernel_size)
        return ((kh - 1) // 2, (kw - 1) // 2)
    return _pair(conv.padding)


def _reach(offset: int, nseg: int, stride: int, seglen: int) -> int:
    """One past the last float read by a run of `nseg` segments from `offset`."""
    return offset + (nseg - 1) * stride + seglen


@dataclass(frozen=True)
class _Run:
    """How one kernel call walks its buffers: `nseg` segments of `seglen` floats,
    `in_stride` apart in the input and `out_stride` apart in the output; each row
    (channel) of the output is `out_row` floats and `out_width` columns wide."""

    nseg: int
    seglen: int
    in_stride: int
    out_stride: int
    out_row: int
    out_width: int


@dataclass
class _Plan:
    """Offsets and buffer sizes of one input shape (batch, height, width)."""

    batch: int
    height: int
    width: int
    out_h: int
    out_w: int
    x_len: int  # padded input buffer, floats
    fwd_offs: np.ndarray  # uint64 per kept weight (mask order): window start in xp
    fwd: _Run
    g_len: int  # padded output-gradient buffer, floats
    bwd_offs: np.ndarray  # uint64 per kept weight (transposed order): window in g
    bwd: _Run
    g_base: np.ndarray  # uint64 per output channel: where its gradient rows start in g
    wgrad: _Run
    wgrad_in_padded_g: bool  # whether the weight gradient reads g (else a tight copy)


class _Lease:
    """A token that holds a pooled buffer for as long as it lives (see `_Buffers`)."""

    __slots__ = ("__weakref__",)


class _Buffers:
    """A layer's scratch buffers (flat, by role, length and dtype), reused across steps.

    Fresh buffers of a megabyte or more cost page faults and a zero fill at every step
    (0.8 ms of a Conv-2 step). Ownership is explicit: a buffer taken with a `holder` (a
    `_Lease`) stays taken while that holder lives, which the pool sees through a weak
    reference. The autograd context of a step keeps a lease on the padded input it saved,
    so that buffer is not reused while the graph may still run backward (two forwards
    before one backward, `retain_graph`). A buffer taken without a holder is scratch for
    one synchronous kernel call only, and free again as soon as that call returns: never
    hand such a buffer, or a view of it, out of the call (outputs and gradients are fresh
    tensors). Buffers with padding are zeroed once when made; their users write only the
    interior, and the kernels never write to them, so the padding stays zero.
    """

    MAX_PER_KEY = 4

    def __init__(self) -> None:
        # key -> [buffer, weak reference to its holder or None]
        self._pool: dict[tuple, list[list]] = {}

    def take(
        self,
        role: str,
        length: int,
        dtype: torch.dtype,
        zeroed: bool,
        holder: _Lease | None = None,
    ) -> torch.Tensor:
        entries = self._pool.setdefault((role, length, dtype, zeroed), [])
        held = None if holder is None else weakref.ref(holder)
        # A buffer made under `torch.inference_mode` cannot be written outside it (torch
        # raises): outside, such a free buffer is replaced.
        inference = torch.is_inference_mode_enabled()
        for entry in entries:
            if entry[1] is None or entry[1]() is None:
                if entry[0].is_inference() and not inference:
                    entry[0] = self._new(length, dtype, zeroed)
                entry[1] = held
                return entry[0]
        buf = self._new(length, dtype, zeroed)
        if len(entries) < self.MAX_PER_KEY:
            entries.append([buf, held])
        return buf

    @staticmethod
    def _new(length: int, dtype: torch.dtype, zeroed: bool) -> torch.Tensor:
        return torch.zeros(length, dtype=dtype) if zeroed else torch.empty(length, dtype=dtype)

    def clear(self) -> None:
        self._pool.clear()


def _fresh(shape, dtype, memory_format) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, memory_format=memory_format)


class _SparseConvFunction(torch.autograd.Function):
    """y = conv2d(x, W, b) with W given by the layer's structure and `values`."""

    @staticmethod
    def forward(ctx, x, values, bias, layer):
        plan = layer._plan(x)
        # The padded input is a pooled buffer the backward pass reads: the context's lease
        # keeps it from reuse while this graph exists.
        ctx.lease = _Lease()
        xp = layer._pad_input(x, plan, ctx.lease)
        y = layer._forward_kernel(xp, values, bias, plan)
        ctx.layer, ctx.plan = layer, plan
        ctx.has_bias = bias is not None
        ctx.xp = xp  # not save_for_backward: an intermediate, owned through the lease
        ctx.save_for_backward(values)
        ctx.x = x.detach() if layer.track_importance else None
        # The input gradient goes back in the input's memory format.
        ctx.x_format = torch.contiguous_format if x.is_contiguous() else torch.channels_last
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (values,) = ctx.saved_tensors
        xp, layer, plan = ctx.xp, ctx.layer, ctx.plan
        grad_x = grad_values = grad_bias = None
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = None
        if need_x or (need_w and plan.wgrad_in_padded_g):
            g = layer._pad_grad(grad_out, plan)
        if need_x:
            grad_x = layer._input_grad_kernel(g, values, plan, ctx.x_format)
        if need_w:
            # The padded gradient if it holds the rows, else a tight copy.
            gw = g if plan.wgrad_in_padded_g else layer._tight_grad(grad_out)
            grad_values = layer._weight_grad_kernel(gw, xp, plan)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3))
        if layer.track_importance and ctx.x is not None:
            layer._stash.append((ctx.x, grad_out))
        return grad_x, grad_values, grad_bias, None


class SparseConv2d(nn.Module):
    """A 2-D convolution whose weight has a fixed sparsity structure, computed by direct
    sparse kernels (see the module docstring).

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
        padding: tuple[int, int] | int = 0,
    ) -> None:
        super().__init__()
        if mask.dim() != 4 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a 4-D bool tensor, not {mask.dtype} {mask.dim()}-D")
        self.out_channels, self.in_channels, kh, kw = (int(v) for v in mask.shape)
        self.kernel_size = (kh, kw)
        self.padding = _pair(padding)
        if min(self.padding) < 0:
            raise ValueError(f"padding must be non-negative, not {self.padding}")
        flat = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
        nnz = len(flat)
        dtype = torch.get_default_dtype() if bias is None else bias.dtype
        if values is None:
            values = torch.zeros(nnz, dtype=dtype)
        if values.shape != (nnz,):
            raise ValueError(f"values has shape {tuple(values.shape)}, the mask keeps {nnz}")
        self.register_buffer("flat_indices", flat, persistent=False)
        self.values = nn.Parameter(values.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.track_importance = False
        self._stash: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._plans: dict[tuple[int, int, int], _Plan] = {}
        self._scratch = _Buffers()
        # The structure in numpy, once: kernel row pointers and the kept weights'
        # (m, c, r, s), in mask order and in the transposed order of the input gradient.
        f = flat.numpy()
        m, rest = np.divmod(f, self.in_channels * kh * kw)
        c, rest = np.divmod(rest, kh * kw)
        r, s = np.divmod(rest, kw)
        self._mcrs = (m, c, r, s)
        self._rowptr = np.searchsorted(m, np.arange(self.out_channels + 1)).astype(np.int64)
        # Transposed: rows are input channels; within a row, ordered by the window offset
        # (m, flipped r, flipped s), so consecutive weights read nearby memory.
        t_perm = np.lexsort((kw - 1 - s, kh - 1 - r, m, c))
        self._t_perm = t_perm.astype(np.int64)
        self._t_perm_torch = torch.from_numpy(self._t_perm)
        self._t_rowptr = np.searchsorted(c[t_perm], np.arange(self.in_channels + 1)).astype(
            np.int64
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mask: torch.Tensor) -> SparseConv2d:
        """The kept part of `conv` (weight entries where `mask` is True, and its bias).
        Raises ValueError if `conv` is not supported (`check_supported`)."""
        check_supported(conv)
        if mask.shape != conv.weight.shape:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} != weight shape {tuple(conv.weight.shape)}"
            )
        mask = mask.to(torch.bool)
        flat = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
        values = torch.index_select(conv.weight.detach().reshape(-1), 0, flat)
        bias = None if conv.bias is None else conv.bias.detach()
        layer = cls(mask, values=values, bias=bias, padding=conv_padding(conv))
        return layer

    # --- Structure and conversion ---

    @property
    def nnz(self) -> int:
        return len(self.flat_indices)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    @property
    def density(self) -> float:
        return self.nnz / max(int(np.prod(self.weight_shape)), 1)

    def mask(self) -> torch.Tensor:
        """The bool mask (out, in, kh, kw) of the kept positions."""
        mask = torch.zeros(int(np.prod(self.weight_shape)), dtype=torch.bool)
        mask[self.flat_indices] = True
        return mask.view(self.weight_shape)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense tensor, exactly 0.0 at pruned positions."""
        weight = torch.zeros(int(np.prod(self.weight_shape)), dtype=self.values.dtype)
        weight.index_copy_(0, self.flat_indices, self.values.detach())
        return weight.view(self.weight_shape)

    def to_conv(self, out: nn.Conv2d | None = None) -> nn.Conv2d:
        """A dense `nn.Conv2d` with this layer's weights (written into `out` if given)."""
        if out is None:
            out = nn.Conv2d(
                self.in_channels,
                self.out_channels,
                self.kernel_size,
                padding=self.padding,
                bias=self.bias is not None,
            )
        with torch.no_grad():
            flat = out.weight.view(-1)
            flat.zero_()
            flat.index_copy_(0, self.flat_indices, self.values.detach().to(flat.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def dense_grad_sum(self) -> torch.Tensor | None:
        """Dense weight gradient (out, in, kh, kw), summed over the backward passes run
        with `track_importance` since the last call; None if there were none. One dense
        weight-gradient convolution over all the passes' samples."""
        if not self._stash:
            return None
        xs = torch.cat([x for x, _ in self._stash])
        gs = torch.cat([g for _, g in self._stash])
        self._stash.clear()
        return torch.nn.grad.conv2d_weight(xs, self.weight_shape, gs, padding=self.padding)

    # --- Kernels' plumbing ---

    def _plan(self, x: torch.Tensor) -> _Plan:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"input must be (batch, {self.in_channels}, height, width), not {tuple(x.shape)}"
            )
        if x.dtype not in SUPPORTED_DTYPES or x.device.type != "cpu":
            raise ValueError(
                f"SparseConv2d runs float32/float64 on the CPU, not {x.dtype} on {x.device}"
            )
        key = (int(x.shape[0]), int(x.shape[2]), int(x.shape[3]))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 8:  # a few shapes (training, last batch, evaluation)
                self._plans.clear()
                self._scratch.clear()
            plan = self._plans[key] = self._make_plan(*key)
        return plan

    def _make_plan(self, batch: int, height: int, width: int) -> _Plan:
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        cin, cout, b = self.in_channels, self.out_channels, batch
        hp, wp = height + 2 * ph, width + 2 * pw
        oh, ow = hp - kh + 1, wp - kw + 1
        if oh < 1 or ow < 1:
            raise ValueError(
                f"a {height}x{width} input with padding {self.padding} is smaller than "
                f"the {kh}x{kw} kernel"
            )
        m, c, r, s = self._mcrs
        # Forward: windows of xp (cin, hp, wp, b).
        fwd_offs = (((c * hp + r) * wp + s) * b).astype(np.uint64)
        if ow * b >= MIN_ROW_FLOATS:
            fwd = _Run(oh, ow * b, wp * b, ow * b, oh * ow * b, ow)
        else:  # one run per channel, padding columns included
            fwd = _Run(1, oh * wp * b, 0, 0, oh * wp * b, wp)
        # Input gradient: the output gradient padded by k - 1 - p (cropped where negative)
        # into g (cout, gh, gw, b), and the transposed, flipped weights.
        qh, qw = kh - 1 - ph, kw - 1 - pw
        gh, gw = oh + 2 * qh, ow + 2 * qw  # = height + kh - 1, width + kw - 1
        t = self._t_perm
        bwd_offs = (((m[t] * gh + (kh - 1 - r[t])) * gw + (kw - 1 - s[t])) * b).astype(np.uint64)
        if width * b >= MIN_ROW_FLOATS:
            bwd = _Run(height, width * b, gw * b, width * b, height * width * b, width)
        else:
            bwd = _Run(1, height * gw * b, 0, 0, height * gw * b, gw)
        # Weight gradient: dot products of gradient rows with input windows. The padded
        # gradient holds the rows (from row qh, column qw) when the padding is at most
        # k - 1; otherwise a tight copy (cout, oh, ow, b) does.
        in_padded = qh >= 0 and qw >= 0
        if in_padded:
            g_base = (np.arange(cout) * gh * gw * b + (qh * gw + qw) * b).astype(np.uint64)
            if ow * b < MIN_ROW_FLOATS and gw == wp:
                # One run per channel: the gradient's padding columns are zeros.
                wgrad = _Run(1, oh * gw * b, 0, 0, 0, 0)
            else:
                wgrad = _Run(oh, ow * b, gw * b, wp * b, 0, 0)
        else:
            g_base = (np.arange(cout) * oh * ow * b).astype(np.uint64)
            wgrad = _Run(oh, ow * b, ow * b, wp * b, 0, 0)
        # Buffer lengths: the farthest float any run reads, plus one. Runs that include
        # padding columns pass the last row by up to kw - 1 columns, into a zero tail.
        corner = ((cin - 1) * hp + kh - 1) * wp * b + (kw - 1) * b  # the largest offset
        x_len = max(
            cin * hp * wp * b,
            _reach(corner, fwd.nseg, fwd.in_stride, fwd.seglen),
            _reach(corner, wgrad.nseg, wgrad.out_stride, wgrad.seglen),
        )
        g_corner = ((cout - 1) * gh + kh - 1) * gw * b + (kw - 1) * b
        g_len = max(
            cout * gh * gw * b,
            _reach(g_corner, bwd.nseg, bwd.in_stride, bwd.seglen),
            _reach(int(g_base[-1]), wgrad.nseg, wgrad.in_stride, wgrad.seglen),
        )
        return _Plan(
            batch, height, width, oh, ow, x_len, fwd_offs, fwd, g_len, bwd_offs, bwd,
            g_base, wgrad, in_padded,
        )  # fmt: skip

    def _pad_input(
        self, x: torch.Tensor, plan: _Plan, holder: _Lease | None = None
    ) -> torch.Tensor:
        """x (B, C, H, W) into a zeroed flat buffer laid out (C, H + 2ph, W + 2pw, B)."""
        (ph, pw), b = self.padding, plan.batch
        hp, wp = plan.height + 2 * ph, plan.width + 2 * pw
        xp = self._scratch.take("x", plan.x_len, x.dtype, zeroed=True, holder=holder)
        view = xp[: self.in_channels * hp * wp * b].view(self.in_channels, hp, wp, b)
        view[:, ph : ph + plan.height, pw : pw + plan.width, :].copy_(
            x.detach().permute(1, 2, 3, 0)
        )
        return xp

    def _pad_grad(self, grad_out: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """The output gradient (B, C_out, H_out, W_out) into a zeroed flat buffer laid out
        (C_out, H + kh - 1, W + kw - 1, B), at row kh - 1 - ph and column kw - 1 - pw
        (cropped where those are negative)."""
        (kh, kw), (ph, pw), b = self.kernel_size, self.padding, plan.batch
        qh, qw = kh - 1 - ph, kw - 1 - pw
        gh, gw = plan.out_h + 2 * qh, plan.out_w + 2 * qw
        g = self._scratch.take("g", plan.g_len, grad_out.dtype, zeroed=True)
        view = g[: self.out_channels * gh * gw * b].view(self.out_channels, gh, gw, b)
        src = grad_out.permute(1, 2, 3, 0)
        src = src[:, max(-qh, 0) : plan.out_h - max(-qh, 0), max(-qw, 0) : plan.out_w - max(-qw, 0)]
        view[
            :, max(qh, 0) : max(qh, 0) + src.shape[1], max(qw, 0) : max(qw, 0) + src.shape[2]
        ].copy_(src)
        return g

    def _tight_grad(self, grad_out: torch.Tensor) -> torch.Tensor:
        """The output gradient as a flat buffer laid out (C_out, H_out, W_out, B)."""
        b, c, h, w = grad_out.shape
        buf = self._scratch.take("g_tight", b * c * h * w, grad_out.dtype, zeroed=False)
        buf.view(c, h, w, b).copy_(grad_out.permute(1, 2, 3, 0))
        return buf

    def _forward_kernel(self, xp, values, bias, plan: _Plan) -> torch.Tensor:
        run, b = plan.fwd, plan.batch
        out = self._forward_into_scratch(xp, values, bias, plan)
        y = out.view(self.out_channels, plan.out_h, run.out_width, b)[:, :, : plan.out_w]
        # Channels-last: the ReLU and max-pooling that follow a convolution are an order of
        # magnitude faster on it than on NCHW on the CPU (Conv-2's pool after conv2: 0.07
        # against 1.0 ms at batch 20), and the transpose costs the same either way. Always
        # a fresh tensor, never a view of the pooled buffer.
        shape = (b, self.out_channels, plan.out_h, plan.out_w)
        return _fresh(shape, xp.dtype, torch.channels_last).copy_(y.permute(3, 0, 1, 2))

    def _forward_into_scratch(self, xp, values, bias, plan: _Plan) -> torch.Tensor:
        """The forward kernel's output, laid out (C_out, H_out, row, B) in the layer's
        scratch buffer "y" (free again once the caller has read it)."""
        run = plan.fwd
        out = self._scratch.take("y", self.out_channels * run.out_row, xp.dtype, zeroed=False)
        vals = values.detach()
        if vals.dtype != xp.dtype:
            raise ValueError(f"input is {xp.dtype}, weights are {vals.dtype}")
        bias_np = (
            np.zeros(self.out_channels, dtype=vals.numpy().dtype)
            if bias is None
            else bias.detach().numpy()
        )
        kernels.run(
            kernels.spmm_serial, kernels.spmm_parallel,
            xp.numpy(), out.numpy(), self._rowptr, plan.fwd_offs, vals.numpy(), bias_np,
            run.nseg, run.seglen, run.in_stride, run.out_stride, run.out_row,
        )  # fmt: skip
        return out

    def _input_grad_kernel(self, g, values, plan: _Plan, memory_format) -> torch.Tensor:
        run, b = plan.bwd, plan.batch
        vals_t = torch.index_select(values.detach(), 0, self._t_perm_torch)
        out = self._scratch.take("dx", self.in_channels * run.out_row, g.dtype, zeroed=False)
        zeros = np.zeros(self.in_channels, dtype=vals_t.numpy().dtype)
        kernels.run(
            kernels.spmm_serial, kernels.spmm_parallel,
            g.numpy(), out.numpy(), self._t_rowptr, plan.bwd_offs, vals_t.numpy(), zeros,
            run.nseg, run.seglen, run.in_stride, run.out_stride, run.out_row,
        )  # fmt: skip
        dx = out.view(self.in_channels, plan.height, run.out_width, b)[:, :, : plan.width]
        shape = (b, self.in_channels, plan.height, plan.width)
        return _fresh(shape, g.dtype, memory_format).copy_(dx.permute(3, 0, 1, 2))

    def _weight_grad_kernel(self, g, xp, plan: _Plan) -> torch.Tensor:
        run = plan.wgrad
        out = torch.empty(self.nnz, dtype=xp.dtype)
        kernels.run(
            kernels.sddmm_serial, kernels.sddmm_parallel,
            g.numpy(), xp.numpy(), self._rowptr, plan.fwd_offs, plan.g_base, out.numpy(),
            run.nseg, run.seglen, run.in_stride, run.out_stride,
        )  # fmt: skip
        return out

    def _needs_graph(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (
            x.requires_grad
            or self.values.requires_grad
            or (self.bias is not None and self.bias.requires_grad)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._needs_graph(x):
            return _SparseConvFunction.apply(x, self.values, self.bias, self)
        plan = self._plan(x)
        return self._forward_kernel(self._pad_input(x, plan), self.values, self.bias, plan)

    def pooled_relu(self, x: torch.Tensor) -> torch.Tensor | None:
        """relu(max_pool2d(self(x), 2)), the same bits, for one sample without autograd
        (inference at batch 1); None where that does not apply (a batch, or a graph to
        record), and the caller runs the three steps.

        At batch 1 the kernel's output buffer is already one plane per channel, so the
        pooling and the ReLU read it straight from there (`kernels.pool2_relu`): no
        full-size output tensor, no transpose into channels-last and back, no pooling
        indices. The result is channels-last, as the three steps' is, so the layers after
        it compute what they would."""
        if x.dim() != 4 or x.shape[0] != 1 or self._needs_graph(x):
            return None
        plan = self._plan(x)
        out = self._forward_into_scratch(self._pad_input(x, plan), self.values, self.bias, plan)
        return kernels.pool2_relu(
            out.numpy(), self.out_channels, plan.out_h, plan.fwd.out_width, plan.out_w
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"padding={self.padding}, nnz={self.nnz}, density={self.density:.4f}, "
            f"bias={self.bias is not None}"
        )
