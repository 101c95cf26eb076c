"""Device profiler: what one kept parameter of each layer costs on this device.

For each prunable layer of a model, the profiler times one round of local training of that
layer alone (K steps of forward, backward and the masked SGD update at batch B, as
`train_sparse` runs it, importance included), in each format the layer can train in:
- "dense": masked dense (every layer);
- "csr": `fedprune.sparse.SparseLinear` (Linear layers), including the conversion from
  and back to dense that a round of `train_sparse` pays;
at several densities, and fits seconds = intercept + slope * kept parameters by least
squares (slope and intercept kept non-negative) through the fastest of a few rounds per
density. It reports which format was fastest at each density and, per Linear layer, the
density below which CSR is the faster one (interpolated between measured densities).

The cost profile (`fedprune.costs.CostProfile`) takes, per layer, the format that is fastest
at the lowest measured density (where a pruned model lives): its slope is the layer's
compute time per kept parameter. The fixed cost comes from whole-model rounds of
`train_sparse` at one density: their time minus the slopes' share, which covers pooling,
activations, the loss and the per-layer intercepts; a second density checks the
prediction.
A masked dense layer costs the same at every density, so its slope is about 0: on a CPU,
pruning a convolution saves communication, not compute.

Everything measured travels as one flat dict of str, int, float, bool and lists of them
(a Flower ConfigRecord can carry it); `profile_from_measurements` rebuilds the profile.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
import platform
import random
import statistics
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedprune.costs import BYTES_PER_VALUE_ROUND_TRIP, CostProfile
from fedprune.data import Examples
from fedprune.models import MNIST_SHAPE, prunable_names
from fedprune.sparse import restore_dense, sparse_layers, to_sparse, train_sparse

DEFAULT_DENSITIES = (1.0, 0.5, 0.3, 0.1, 0.05, 0.01)
# CSR is measured at these densities and below only: above, it is several times slower
# than dense on a CPU, and timing it there would only spend the profiler's budget.
CSR_MAX_MEASURED_DENSITY = 0.5
FORMATS = ("dense", "csr")
MODEL_ROUND_REPEATS = 5
PROFILER_VERSION = 1


def fit_line(
    kept: Sequence[float], seconds: Sequence[float], min_t: float = 2.0
) -> tuple[float, float]:
    """Least-squares (slope, intercept) of seconds = intercept + slope * kept, with both
    constrained to be non-negative (seconds per parameter, seconds).

    With three points or more, a slope less than `min_t` standard errors above zero is
    indistinguishable from timing noise and is set to 0 (the intercept is then the mean):
    on a small layer whose cost does not depend on the mask (a masked dense convolution),
    noise alone would otherwise fit a large cost per parameter.
    """
    k = np.asarray(kept, dtype=float)
    t = np.asarray(seconds, dtype=float)
    if len(k) == 0:
        return 0.0, 0.0
    flat = (0.0, max(float(t.mean()), 0.0))
    if len(k) < 2 or np.ptp(k) == 0:
        return flat
    a = np.stack([k, np.ones_like(k)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(a, t, rcond=None)
    if slope < 0:  # the constrained optimum then lies on slope = 0
        return flat
    if len(k) >= 3:
        residual = t - (intercept + slope * k)
        spread = float(residual @ residual) / (len(k) - 2)
        stderr = (spread / float(((k - k.mean()) ** 2).sum())) ** 0.5
        if slope < min_t * stderr:
            return flat
    if intercept < 0:  # ... or on intercept = 0
        return max(float(k @ t / (k @ k)), 0.0), 0.0
    return float(slope), float(intercept)


def _layer_inputs(model: nn.Module, batch: torch.Tensor) -> dict[str, tuple[tuple, bool]]:
    """Per prunable weight name: (input shape, whether the input needs a gradient)."""
    modules = dict(model.named_modules())
    seen: dict[str, tuple[tuple, bool]] = {}
    hooks = []
    for weight_name in prunable_names(model):
        module_name = weight_name.rpartition(".")[0]

        def hook(_module, inputs, _output, name=weight_name):
            seen[name] = (tuple(inputs[0].shape), bool(inputs[0].requires_grad))

        hooks.append(modules[module_name].register_forward_hook(hook))
    try:
        with torch.enable_grad():
            model(batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


class _OneLayer(nn.Module):
    """A single layer wrapped so that `to_sparse` can replace it by name."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _random_mask(shape, density: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator) < density


def _time_round(
    wrapped: _OneLayer,
    mask: torch.Tensor,
    fmt: str,
    x: torch.Tensor,
    grad_out: torch.Tensor,
    steps: int,
    track_importance: bool,
    lr: float,
) -> float:
    """Seconds for one round of `steps` local steps of the wrapped layer in `fmt`,
    mirroring `fedprune.sparse.train_sparse` step for step."""
    masks = {"layer.weight": mask}
    start = time.perf_counter()
    originals = to_sparse(wrapped, masks, 1.0) if fmt == "csr" else {}
    params = dict(wrapped.named_parameters())
    masked = [(params["layer.weight"], mask)] if fmt == "dense" else []
    opt = torch.optim.SGD(wrapped.parameters(), lr=lr)
    grad_sum = None
    if track_importance:
        grad_sum = {n: torch.zeros_like(p) for n, p in params.items() if n != "layer.values"}
    for layer in sparse_layers(wrapped).values():
        layer.track_importance = track_importance
    for _ in range(steps):
        opt.zero_grad(set_to_none=False)
        wrapped(x).backward(grad_out)
        with torch.no_grad():
            if grad_sum is not None:
                for n, g in grad_sum.items():
                    g.add_(params[n].grad)
            for p, m in masked:
                p.grad.mul_(m)
        opt.step()
        with torch.no_grad():
            for p, m in masked:
                p.mul_(m)
    if grad_sum is not None:
        for g in grad_sum.values():
            g.square_()
        for layer in sparse_layers(wrapped).values():
            layer.dense_grad_sum().square_()
    if fmt == "csr":
        for layer in sparse_layers(wrapped).values():
            layer.track_importance = False
        restore_dense(wrapped, originals)
    return time.perf_counter() - start


def _time_model_round(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    track_importance: bool,
    lr: float,
    max_csr_density: float | Mapping[str, float],
) -> float:
    """Seconds for one round of `train_sparse` on the whole model (fixed batch)."""
    data = Examples(x, y)
    start = time.perf_counter()
    train_sparse(
        model,
        masks,
        data,
        steps=steps,
        batch_size=len(y),
        lr=lr,
        generator=torch.Generator().manual_seed(0),
        track_importance=track_importance,
        max_csr_density=max_csr_density,
    )
    return time.perf_counter() - start


def profile_device(
    model: nn.Module,
    local_steps: int,
    batch_size: int,
    bandwidth_bytes_per_s: float,
    *,
    densities: Sequence[float] = DEFAULT_DENSITIES,
    repeats: int = 3,
    input_shape: tuple[int, int, int] = MNIST_SHAPE,
    track_importance: bool = True,
    calibration_density: float = 0.1,
    check_density: float | None = 0.03,
    time_budget_s: float | None = 25.0,
    statistic: str = "min",
    seed: int = 0,
    name: str = "measured",
) -> tuple[CostProfile, dict]:
    """Measure this device's cost per kept parameter of each prunable layer of `model`.

    local_steps, batch_size: K and B of a round of local training.
    bandwidth_bytes_per_s: the device's link; one kept value costs 8 bytes (down and up).
    densities: kept fractions to time each layer at (CSR only up to 0.5).
    repeats: timed rounds per (layer, format, density); the fastest is used (see
        `statistic`).
    input_shape: (channels, height, width) of one example.
    track_importance: time rounds that accumulate importance, as clients do today.
    calibration_density: the fixed cost is what whole-model rounds at this density
        (uniform random masks, each Linear in its faster format) take beyond the slopes.
    check_density: also time whole-model rounds at this density and report the profile's
        prediction next to the measurement; None skips it.
    statistic: "min" or "median" of the repeats. Other work on a device only ever adds
        time, so the fastest of a few rounds is the steadiest estimate of what the layer
        itself costs; "median" reports typical time under the load of the moment.
    time_budget_s: keep to about this many seconds: when the layer timings fall behind
        it, the remaining cells get fewer repeats (at least one), and the check is skipped
        once 80 % of it is spent. None: always `repeats`. Other work on the machine slows
        every timing; the dict records how many repeats each cell got at least.

    Returns the `CostProfile` and the raw measurements as a flat dict (str, int, float,
    bool and lists of them; see `profile_from_measurements`). The model is not changed.
    Takes a few seconds for Conv-2 on 2 CPU cores (its "seconds" entry says how many).
    """
    if bandwidth_bytes_per_s <= 0:
        raise ValueError(f"bandwidth_bytes_per_s must be positive, not {bandwidth_bytes_per_s}")
    if local_steps < 1 or batch_size < 1 or repeats < 1:
        raise ValueError("local_steps, batch_size and repeats must be at least 1")
    densities = sorted({float(d) for d in densities}, reverse=True)
    if not densities or not all(0.0 < d <= 1.0 for d in densities):
        raise ValueError(f"densities must lie in (0, 1], not {densities}")
    if statistic not in ("min", "median"):
        raise ValueError(f"statistic must be 'min' or 'median', not {statistic!r}")
    summarise = min if statistic == "min" else statistics.median
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    lr = 1e-3
    modules = dict(model.named_modules())
    batch = torch.rand((batch_size, *input_shape), generator=g)
    inputs = _layer_inputs(model, batch)
    out: dict = {
        "profiler_version": PROFILER_VERSION,
        "name": name,
        "local_steps": local_steps,
        "batch_size": batch_size,
        "bandwidth_bytes_per_s": float(bandwidth_bytes_per_s),
        "repeats": repeats,
        "statistic": statistic,
        "track_importance": track_importance,
        "densities": list(densities),
        "layers": list(inputs),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.platform()}; {platform.processor() or platform.machine()}; "
        f"{os.cpu_count()} CPUs; torch {torch.__version__}",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    compute: dict[str, float] = {}
    cells_total = len(inputs) * len(densities)
    cells_done, fewest_repeats = 0, repeats
    # The layer timings may use 70 % of the budget; the rest is for the whole-model runs.
    layer_budget = None if time_budget_s is None else 0.7 * time_budget_s
    for weight_name, (shape, needs_grad) in inputs.items():
        original = modules[weight_name.rpartition(".")[0]]
        is_linear = isinstance(original, nn.Linear)
        layer = _fresh_copy(original, g)
        wrapped = _OneLayer(layer)
        x = torch.randn(shape, generator=g).requires_grad_(needs_grad)
        with torch.no_grad():
            grad_out = torch.randn(wrapped(x).shape, generator=g)
        numel = layer.weight.numel()
        out[f"{weight_name}/numel"] = numel
        formats = ["dense", "csr"] if is_linear else ["dense"]
        out[f"{weight_name}/formats"] = formats
        masks = {d: _random_mask(layer.weight.shape, d, g) for d in densities}
        kept_at = {d: int(torch.count_nonzero(m)) for d, m in masks.items()}
        cells = [
            (d, f)
            for d in densities
            for f in formats
            if f == "dense" or d <= CSR_MAX_MEASURED_DENSITY
        ]
        for d, f in cells:  # warm-up, untimed: one step per cell, then one whole round
            _time_round(wrapped, masks[d], f, x, grad_out, 1, track_importance, lr)
        _time_round(
            wrapped, masks[densities[0]], "dense", x, grad_out, local_steps, track_importance, lr
        )
        times: dict[tuple[float, str], list[float]] = {c: [] for c in cells}
        cells_done += len(densities)
        order = random.Random(seed).sample(cells, len(cells))
        # Repeats outermost, cells in a fixed shuffled order inside: drifts in the
        # machine's speed (warming up, other load) then hit every density and format alike
        # instead of masquerading as a cost per parameter.
        for r in range(repeats):
            behind = layer_budget is not None and (
                time.perf_counter() - start > layer_budget * cells_done / cells_total
            )
            if r > 0 and behind:
                fewest_repeats = min(fewest_repeats, r)
                break
            for d, f in order:
                times[(d, f)].append(
                    _time_round(
                        wrapped, masks[d], f, x, grad_out, local_steps, track_importance, lr
                    )
                )
        seconds: dict[str, dict[float, float]] = {f: {} for f in formats}
        for (d, f), ts in times.items():
            seconds[f][d] = summarise(ts)
        fits = {}
        for f in formats:
            ds = sorted(seconds[f], reverse=True)
            kept = [kept_at[d] for d in ds]
            secs = [seconds[f][d] for d in ds]
            slope, intercept = fit_line(kept, secs)
            fits[f] = (slope, intercept)
            out[f"{weight_name}/{f}/densities"] = ds
            out[f"{weight_name}/{f}/kept"] = kept
            out[f"{weight_name}/{f}/seconds"] = secs
            out[f"{weight_name}/{f}/slope_s_per_param"] = slope
            out[f"{weight_name}/{f}/intercept_s"] = intercept
        fastest = [
            min(seconds, key=lambda f, d=d: seconds[f].get(d, float("inf"))) for d in densities
        ]
        out[f"{weight_name}/fastest"] = fastest
        out[f"{weight_name}/csr_max_density"] = (
            crossover_density(seconds["dense"], seconds["csr"]) if is_linear else 0.0
        )
        chosen = fastest[-1]
        out[f"{weight_name}/format"] = chosen
        compute[weight_name] = fits[chosen][0]
        out[f"{weight_name}/compute_s_per_param"] = compute[weight_name]
    out["timed_repeats_min"] = fewest_repeats
    out["time_budget_s"] = -1.0 if time_budget_s is None else float(time_budget_s)

    # The fixed cost, from whole-model rounds (`train_sparse`, each Linear in its faster
    # format): what the slopes leave unexplained at `calibration_density`. Timing layers
    # one by one cannot give it: pooling, activations, the loss and per-step overheads
    # belong to no layer, and each lone layer carries overheads of its own.
    model_copy = copy.deepcopy(model)
    labels = torch.randint(0, 2, (batch_size,), generator=g)
    csr = csr_max_densities(out)

    def model_round(density: float) -> tuple[float, dict[str, int]]:
        masks = {n: _random_mask(m.shape, density, g) for n, m in _prunable(model_copy).items()}
        _time_model_round(model_copy, masks, batch, labels, 1, track_importance, lr, csr)
        times = []
        # One number carries the whole fixed cost: a few more rounds than per layer,
        # while the budget lasts.
        for r in range(max(repeats, MODEL_ROUND_REPEATS)):
            late = time_budget_s is not None and time.perf_counter() - start > 0.9 * time_budget_s
            if r >= 1 and late:
                break
            times.append(
                _time_model_round(
                    model_copy, masks, batch, labels, local_steps, track_importance, lr, csr
                )
            )
        return summarise(times), {n: int(torch.count_nonzero(m)) for n, m in masks.items()}

    measured, kept = model_round(calibration_density)
    variable = sum(compute[n] * k for n, k in kept.items())
    out["calibration/density"] = float(calibration_density)
    out["calibration/measured_s"] = measured
    out["fixed_s"] = max(measured - variable, 0.0)
    out["comm_s_per_param"] = BYTES_PER_VALUE_ROUND_TRIP / float(bandwidth_bytes_per_s)
    profile = profile_from_measurements(out)
    over = time_budget_s is not None and time.perf_counter() - start > 0.8 * time_budget_s
    if check_density is not None and not over:
        measured, kept = model_round(check_density)
        out["check/density"] = float(check_density)
        out["check/measured_s"] = measured
        out["check/predicted_s"] = profile.compute_time_s(kept)
    out["seconds"] = time.perf_counter() - start
    return profile, out


def _prunable(model: nn.Module) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {name: params[name] for name in prunable_names(model)}


def _fresh_copy(layer: nn.Module, g: torch.Generator) -> nn.Module:
    """A layer of the same kind and size with random weights (the model stays untouched)."""
    if isinstance(layer, nn.Linear):
        copy = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    elif isinstance(layer, nn.Conv2d):
        copy = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
        )
    else:
        raise TypeError(f"cannot profile a {type(layer).__name__}")
    with torch.no_grad():
        for p in copy.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return copy


def crossover_density(dense: Mapping[float, float], csr: Mapping[float, float]) -> float:
    """The density below which CSR is the faster format, from seconds per round by density.

    Going up from the lowest density timed in both formats, it is where the time
    difference, interpolated linearly between the two measured densities that bracket its
    change of sign, crosses zero; 0.0 if CSR is not faster at the lowest density, and the
    highest density timed in CSR if CSR is faster at every one (no extrapolation).
    """
    both = sorted(d for d in csr if d in dense)
    if not both:
        return 0.0
    diff = [csr[d] - dense[d] for d in both]
    if diff[0] >= 0:
        return 0.0
    for (d0, g0), (d1, g1) in zip(
        zip(both, diff, strict=True), zip(both[1:], diff[1:], strict=True), strict=False
    ):
        if g1 >= 0:
            return d0 + (d1 - d0) * (-g0) / (g1 - g0)
    return both[-1]


def csr_max_densities(measurements: Mapping) -> dict[str, float]:
    """Per Linear weight name, the density up to which CSR trains faster than masked dense
    (`crossover_density`; 0.0: never), for `train_sparse`'s `max_csr_density`."""
    return {
        name: float(measurements[f"{name}/csr_max_density"])
        for name in measurements["layers"]
        if "csr" in measurements[f"{name}/formats"]
    }


def profile_from_measurements(measurements: Mapping) -> CostProfile:
    """The `CostProfile` described by a `profile_device` measurement dict (for example
    after it travelled in a Flower ConfigRecord)."""
    return CostProfile(
        name=str(measurements["name"]),
        compute_s_per_param={
            name: float(measurements[f"{name}/compute_s_per_param"])
            for name in measurements["layers"]
        },
        comm_s_per_param=float(measurements["comm_s_per_param"]),
        fixed_s=float(measurements["fixed_s"]),
        source=(
            f"fedprune.profiler on {measurements['machine']}, "
            f"{measurements['threads']} threads, K={measurements['local_steps']}, "
            f"B={measurements['batch_size']}, {measurements['date']}"
        ),
    )


def format_report(measurements: Mapping) -> str:
    """A short human-readable table of a measurement dict: per layer and density, the
    seconds per round in each format and the fastest one."""
    lines = [
        f"device profile: K={measurements['local_steps']} B={measurements['batch_size']} "
        f"threads={measurements['threads']} took {measurements.get('seconds', 0.0):.1f} s",
    ]
    for name in measurements["layers"]:
        formats = measurements[f"{name}/formats"]
        lines.append(
            f"  {name} ({measurements[f'{name}/numel']:,} weights): profile uses "
            f"{measurements[f'{name}/format']}, "
            f"{measurements[f'{name}/compute_s_per_param']:.3g} s/param; "
            f"CSR fastest up to density {measurements.get(f'{name}/csr_max_density', 0.0)}"
        )
        for d, fastest in zip(
            measurements["densities"], measurements[f"{name}/fastest"], strict=True
        ):
            cells = []
            for f in formats:
                ds = measurements[f"{name}/{f}/densities"]
                if d in ds:
                    cells.append(
                        f"{f} {measurements[f'{name}/{f}/seconds'][ds.index(d)] * 1e3:7.2f} ms"
                    )
            lines.append(f"    density {d:5.2f}: " + ", ".join(cells) + f"  -> {fastest}")
    lines.append(
        f"  fixed {measurements['fixed_s'] * 1e3:.1f} ms (whole model at density "
        f"{measurements['calibration/density']}: "
        f"{measurements['calibration/measured_s'] * 1e3:.1f} ms per round), "
        f"comm {measurements['comm_s_per_param']:.3g} s/param"
    )
    if "check/measured_s" in measurements:
        lines.append(
            f"  whole model at density {measurements['check/density']}: measured "
            f"{measurements['check/measured_s'] * 1e3:.1f} ms per round, profile predicts "
            f"{measurements['check/predicted_s'] * 1e3:.1f} ms"
        )
    return "\n".join(lines)
