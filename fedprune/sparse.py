"""Fully connected layers in CSR on the CPU: sparse training, sparse inference, export.

A pruned `nn.Linear` becomes a `SparseLinear`: its weight is a CSR matrix whose structure
(row pointers and column indices) is built from the layer's mask, and whose kept values
are the layer's one trainable tensor, `values` (1-D, in row-major order of the kept
positions, the order of `weight[mask]`). Building the structure from the mask, not from
the values, keeps a kept weight that happens to be exactly 0.0 in the structure
(`Tensor.to_sparse_csr()` would drop it, and with it the position's gradient).

The autograd function computes, for y = x W^T + b with W in CSR:
- forward: y^T = W x^T (CSR times dense);
- input gradient: dx^T = W^T dy^T, through a CSR copy of W^T whose values are gathered
  from `values` with a permutation fixed by the mask;
- value gradient: dy^T x sampled at the kept positions only (`torch.sparse.sampled_addmm`);
- when the layer tracks importance, the dense gradient at every position, pruned ones
  included. PruneFL only needs its sum over the local steps, so the layer keeps each
  step's (x, dy) and `dense_grad_sum()` forms the sum in one matrix product,
  [dy_1 .. dy_K]^T [x_1 .. x_K], at the end of the round.

Measured on 2 CPU cores (shared/design/environment.md), CSR beats a dense layer below
roughly 20-30 % density; convolutions have no sparse CPU kernel and stay masked dense.
`train_sparse` is `fedprune.training.train_masked` with the sparse-enough Linear layers in
CSR: the same batches, the same updates of the kept values and the same importance, to
float tolerance.

Edge inference: `export_for_inference` writes the pruned model with each Linear layer in
the format that runs its forward fastest on this machine (measured), plus the masks;
`load_for_inference` rebuilds a runnable module from the file alone.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fedprune.data import Examples
from fedprune.models import MODELS, TwoConvNet, model_factory
from fedprune.training import LocalRound, batches

# PyTorch warns once per process that CSR support is "in beta"; the kernels used here are
# the documented CPU ones, and the tests check them against dense arithmetic.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

Masks = dict[str, torch.Tensor]

# A Linear layer trains in CSR when its mask density is at most this (a kept fraction).
# From measurement on 2 cores (environment.md); a device profile gives per-layer values
# (`fedprune.profiler.csr_max_densities`).
DEFAULT_MAX_CSR_DENSITY = 0.3

EXPORT_FORMAT = "fedprune-inference/1"


def _csr_structure(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row pointers and column indices (int32, which MKL's kernels take without a copy)
    of the True entries of a 2-D bool mask, in row-major order, and their flat positions
    (int64). One pass of `nonzero` over the mask; the row pointers come from a binary search
    in the sorted flat positions (summing the bool rows would widen them to int64 first,
    20x slower on fc1)."""
    rows, cols = mask.shape
    if mask.numel() >= 2**31:
        raise ValueError(f"a {rows}x{cols} layer is too large for int32 CSR indices")
    flat = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    crow = torch.searchsorted(flat, torch.arange(rows + 1) * cols)
    return crow.to(torch.int32), (flat % cols).to(torch.int32), flat


class _CSRLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W = CSR(layer structure, values); see the module docstring."""

    @staticmethod
    def forward(ctx, x, values, bias, layer):
        xt = x.t()
        if not xt.is_contiguous():
            xt = xt.contiguous()
        w = layer.csr(values)
        yt = torch.sparse.mm(w, xt) if bias is None else torch.addmm(bias.unsqueeze(1), w, xt)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        ctx.save_for_backward(xt, values)
        return yt.t()

    @staticmethod
    def backward(ctx, grad_out):
        xt, values = ctx.saved_tensors
        layer = ctx.layer
        gt = grad_out.t()
        if not gt.is_contiguous():
            gt = gt.contiguous()
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.sparse.mm(layer.csr_transposed(values, reuse_buffer=True), gt).t()
        if ctx.needs_input_grad[1]:
            # Written in place into a CSR tensor of the layer's structure: with out= being
            # its input, sampled_addmm skips copying the structure and values (a third of
            # its time on fc1 at density 0.1). The clone keeps the returned gradient
            # independent of that buffer.
            grad = layer._grad_buffer()
            torch.sparse.sampled_addmm(grad, gt, xt.t(), beta=0.0, out=grad)
            grad_values = grad.values().clone()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = gt.sum(1)
        if layer.track_importance:
            layer._stash.append((xt, gt))
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
        crow, col, flat = _csr_structure(mask)
        nnz = len(col)
        if values is None:
            values = torch.zeros(
                nnz, dtype=torch.get_default_dtype() if bias is None else bias.dtype
            )
        if values.shape != (nnz,):
            raise ValueError(f"values has shape {tuple(values.shape)}, the mask keeps {nnz}")
        self.register_buffer("crow_indices", crow, persistent=False)
        self.register_buffer("col_indices", col, persistent=False)
        self.register_buffer("flat_indices", flat, persistent=False)
        self.values = nn.Parameter(values.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.track_importance = False
        self._stash: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._transpose: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._buffers_for_backward: dict[str, torch.Tensor] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor) -> SparseLinear:
        """The kept part of `linear` (weight entries where `mask` is True, and its bias)."""
        if mask.shape != linear.weight.shape:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} != weight shape {tuple(linear.weight.shape)}"
            )
        bias = None if linear.bias is None else linear.bias.detach().clone()
        layer = cls(mask, bias=bias)
        layer.values.data = torch.index_select(
            linear.weight.detach().reshape(-1), 0, layer.flat_indices
        )
        return layer

    @property
    def nnz(self) -> int:
        return len(self.col_indices)

    @property
    def density(self) -> float:
        return self.nnz / max(self.in_features * self.out_features, 1)

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
            torch.index_select(values, 0, perm, out=out),
            (self.in_features, self.out_features),
            check_invariants=False,
        )

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
        weight = torch.zeros(self.out_features * self.in_features, dtype=self.values.dtype)
        weight.index_copy_(0, self.flat_indices, self.values.detach())
        return weight.view(self.out_features, self.in_features)

    def to_linear(self, out: nn.Linear | None = None) -> nn.Linear:
        """A dense `nn.Linear` with this layer's weights (written into `out` if given)."""
        if out is None:
            out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            flat = out.weight.view(-1)
            flat.zero_()
            flat.index_copy_(0, self.flat_indices, self.values.detach())
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
        else:
            w, xt = self.csr(), x2.t()
            yt = (
                torch.sparse.mm(w, xt)
                if self.bias is None
                else torch.addmm(self.bias.unsqueeze(1), w, xt)
            )
            y = yt.t()
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nnz={self.nnz}, density={self.density:.4f}, bias={self.bias is not None}"
        )


def _threshold(max_csr_density: float | Mapping[str, float], weight_name: str) -> float:
    if isinstance(max_csr_density, Mapping):
        return float(max_csr_density.get(weight_name, -1.0))
    return float(max_csr_density)


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
    replaced = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        weight_name = f"{name}.weight" if name else "weight"
        mask = masks.get(weight_name)
        if mask is None:
            continue
        density = int(torch.count_nonzero(mask)) / max(mask.numel(), 1)
        if density > _threshold(max_csr_density, weight_name):
            continue
        if not name:
            raise ValueError("the model itself is a Linear layer; wrap it to convert it")
        sparse = SparseLinear.from_linear(module, mask.to(torch.bool))
        _set_submodule(model, name, sparse)
        replaced[name] = module
    return replaced


def to_dense(model: nn.Module, originals: Mapping[str, nn.Linear] | None = None) -> Masks:
    """Replace, in place, every `SparseLinear` of `model` by a dense `nn.Linear`, exactly 0.0
    at pruned positions, and return their masks by weight name.

    With `originals` (what `to_sparse` returned), the layers' weights are written back into
    those very modules, so the model's parameter objects are the ones it had before.
    """
    masks = {name: layer.mask() for name, layer in sparse_layers(model).items()}
    _swap_back(model, originals or {})
    return masks


def restore_dense(model: nn.Module, originals: Mapping[str, nn.Linear]) -> None:
    """Undo `to_sparse` in place: write each converted layer's weights back into its
    original `nn.Linear` (`originals`, what `to_sparse` returned) and put that back."""
    _swap_back(model, originals, only_originals=True)


def _swap_back(
    model: nn.Module, originals: Mapping[str, nn.Linear], only_originals: bool = False
) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear) and (name in originals or not only_originals):
            _set_submodule(model, name, module.to_linear(originals.get(name)))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """The `SparseLinear` layers of `model`, by weight name ("fc1.weight")."""
    return {
        f"{name}.weight": module
        for name, module in model.named_modules()
        if isinstance(module, SparseLinear)
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
) -> LocalRound:
    """`fedprune.training.train_masked` with the sparse-enough Linear layers in CSR.

    The same arguments and result: K = `steps` SGD steps of batch `batch_size` on the kept
    parameters, pruned weights exactly 0.0, and (with `track_importance`) the importance of
    every parameter, pruned positions included. Linear layers whose mask density is at most
    `max_csr_density` train as `SparseLinear`; the others (and all convolutions) train
    masked dense. The model is converted for the round and back at its end, in place, so
    its parameters (names and objects) are those it came with; layers that were already
    `SparseLinear` train as they are and stay sparse (their importance is keyed
    "<module>.weight").
    """
    if len(data) == 0:
        raise ValueError("no local training data")
    originals = to_sparse(model, masks, max_csr_density)
    try:
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
    params = dict(model.named_parameters())
    masked = [(params[name], mask) for name, mask in masks.items() if name in params]
    sparse_values = {f"{name[: -len('.weight')]}.values" for name in sparse}
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    grad_sum = None
    if track_importance:
        grad_sum = {n: torch.zeros_like(p) for n, p in params.items() if n not in sparse_values}
    for layer in sparse.values():
        layer.track_importance = track_importance
        layer._stash.clear()
    model.train()
    total_loss, samples = 0.0, 0
    for idx in batches(len(data), steps, batch_size, generator):
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
        loss.backward()
        with torch.no_grad():
            if grad_sum is not None:
                for n, g in grad_sum.items():
                    g.add_(params[n].grad)
            for p, mask in masked:
                p.grad.mul_(mask)
        opt.step()
        with torch.no_grad():
            for p, mask in masked:
                p.mul_(mask)
        total_loss += loss.item()
        samples += len(idx)
    importance = None
    if grad_sum is not None:
        importance = {n: g.square_().mul_(len(data)) for n, g in grad_sum.items()}
        for weight_name, layer in sparse.items():
            g = layer.dense_grad_sum()
            if g is None:
                g = torch.zeros(layer.out_features, layer.in_features)
            importance[weight_name] = g.square_().mul_(len(data))
    return LocalRound(len(data), steps, samples, total_loss / max(steps, 1), importance)


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


def _seconds(module: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    module(x)
    return time.perf_counter() - start


def fastest_inference_formats(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    batch_size: int = 1,
    repeats: int = 25,
) -> dict[str, str]:
    """For each Linear weight in `masks`: "csr" or "dense", whichever runs that layer's
    forward pass at `batch_size` faster here.

    The two are timed interleaved, after a warm-up (the first sparse products of a process
    are slow), and compared by their fastest call: load from other processes only ever
    adds time, so the minimum is the steadier estimate of what each format costs. On a
    heavily loaded 2-core machine, CSR products with 2 threads can still lose every call
    (each waits for both threads), so pass `formats` to `export_for_inference` where the
    choice must not depend on the moment's load."""
    formats = {}
    modules = dict(model.named_modules())
    for weight_name, mask in masks.items():
        module = modules.get(weight_name.rpartition(".")[0])
        if not isinstance(module, nn.Linear):
            continue
        sparse = SparseLinear.from_linear(module, mask.to(torch.bool))
        x = torch.randn(batch_size, module.in_features)
        dense_t, csr_t = [], []
        with torch.inference_mode():
            for _ in range(5):
                module(x), sparse(x)
            for _ in range(repeats):
                dense_t.append(_seconds(module, x))
                csr_t.append(_seconds(sparse, x))
        formats[weight_name] = "csr" if min(csr_t) < min(dense_t) else "dense"
    return formats


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

    Each Linear layer is stored in the format whose forward pass is faster here at
    `batch_size` ("csr" or "dense", measured unless `formats` names them), convolutions
    dense; pruned weights are exactly 0.0 and the masks go along (bool, by weight name).
    The file holds tensors, numbers and strings only (`torch.load(weights_only=True)`).
    `arch` ({"name": a `fedprune.models` name, "num_classes", "input_shape"}) says how to
    rebuild the model; Conv-2 and the small CNN are recognised without it.
    Returns the chosen format per Linear weight.
    """
    spec = dict(arch) if arch is not None else _model_spec(model)
    if formats is None:
        formats = fastest_inference_formats(model, masks, batch_size)
    masks = {name: m.to(torch.bool) for name, m in masks.items()}
    state, csr = {}, {}
    for name, p in model.named_parameters():
        if formats.get(name) == "csr":
            crow, col, _ = _csr_structure(masks[name])
            csr[name] = {
                "crow_indices": crow,
                "col_indices": col,
                "values": p.detach()[masks[name]],
            }
        else:
            state[name] = (p.detach() * masks[name]) if name in masks else p.detach().clone()
    payload = {
        "format": EXPORT_FORMAT,
        "arch": spec,
        "state": state,
        "csr": csr,
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
    with its CSR layers as `SparseLinear`. The masks are in `read_export(path)["masks"]`."""
    payload = read_export(path)
    model = _build_from_spec(payload["arch"])
    loaded = model.load_state_dict(payload["state"], strict=False)
    missing = set(loaded.missing_keys) - set(payload["csr"])
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
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
