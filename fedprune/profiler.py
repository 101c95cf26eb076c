"""Device profiler: what one kept parameter of each layer costs on this device.

For each prunable layer of a model, the profiler times one round of local training of that
layer alone (K steps of forward, backward and the masked SGD update at batch B, as
`train_sparse` runs it, importance included), in each format the layer can train in:
- "dense": masked dense (every layer);
- its sparse format, including the conversion from and back to dense that a round of
  `train_sparse` pays: "csr" (`fedprune.sparse.SparseLinear`) for a Linear layer,
  "sparse-conv" (`fedprune.sparse_conv.SparseConv2d`) for a Conv2d layer the direct
  kernels support where they run on this machine;
at several densities, and fits seconds = intercept + slope * kept parameters by least
squares (slope and intercept kept non-negative) through the fastest of a few rounds per
density. It reports which format was fastest at each density and, per layer with a sparse
format, the density below which that format is the faster one (interpolated between
measured densities).

The cost profile (`fedprune.costs.CostProfile`) is piecewise per layer (`LayerCost`): the
layer trains in its sparse format up to its crossover density and masked dense above it,
exactly as `fedprune.sparse.choose_formats` decides from `sparse_crossovers`, and each
format costs its fitted line
(masked dense: a constant, the mean of its cells, since it runs the same kernels whatever
the mask). The solver's linear slope of a layer is the one of its format at low density.

Whole-model rounds of `train_sparse` at a few densities (sparse to dense, interleaved) set
the rest: `fit_level` fits measured = fixed + scale * (what the layer costs say the mask
adds). The fixed cost covers what belongs to no layer (pooling, activations, the loss, the
optimiser and importance over all parameters, per-step overheads); the scale brings the
lone-layer timings to the level of whole rounds (a lone layer need not cost what it costs
inside the model, and the machine's load moves between the two measurements). A last
density, not fitted, checks the prediction.

Everything measured travels as one flat dict of str, int, float, bool and lists of them
(a Flower ConfigRecord can carry it); `profile_from_measurements` rebuilds the profile.
"""

from __future__ import annotations

import copy
import datetime as _dt
import platform
import random
import statistics
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedprune import hardware
from fedprune.costs import BYTES_PER_VALUE_ROUND_TRIP, CostProfile, LayerCost
from fedprune.data import Examples
from fedprune.models import MNIST_SHAPE, prunable_names
from fedprune.sparse import (
    choose_formats,
    restore_dense,
    sparse_layers,
    supported_formats,
    to_formats,
    train_sparse,
)
from fedprune.sparse_conv import sparse_conv_unavailable_reason

DEFAULT_DENSITIES = (1.0, 0.5, 0.3, 0.1, 0.05, 0.01)
# Sparse formats are measured at these densities and below only: above, they are several
# times slower than dense on a CPU, and timing them there would only spend the profiler's
# budget.
SPARSE_MAX_MEASURED_DENSITY = 0.5
CSR_MAX_MEASURED_DENSITY = SPARSE_MAX_MEASURED_DENSITY  # the name before sparse-conv
FORMATS = ("dense", "csr", "sparse-conv")
NO_SPARSE_FORMAT = "none"  # "<layer>/sparse_format" of a layer with no sparse kernel here
# Whole-model rounds per calibration density: they set the profile's level, and on a
# machine with other work the fastest of a few is what the device itself takes only if
# some of them ran undisturbed; at least MIN_MODEL_ROUNDS even past the time budget (one
# round may be many times slower).
MODEL_ROUND_REPEATS = 8
MIN_MODEL_ROUNDS = 3
# Whole-model rounds that set the fixed cost and the level: the sparse regime PruneFL
# keeps fc layers in, densities where fc1 is still in CSR, and dense (fc layers masked
# dense), so that what the mask adds spans its whole range.
DEFAULT_CALIBRATION_DENSITIES = (0.02, 0.05, 0.1, 1.0)
# 3: sparse convolutions measured; "<layer>/sparse_format" and "<layer>/sparse_max_density"
PROFILER_VERSION = 4
# The profile times rounds without importance: under `importance-window` most rounds track
# none, and the importance a sparse layer keeps (a dense weight gradient over all
# positions) hides its savings, so timed with importance a layer's crossover density
# comes out too low for the rounds that track none.
TRACKS_IMPORTANCE = False


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


def fit_level(
    variable: Sequence[float], measured: Sequence[float], bounds: tuple[float, float] = (0.5, 2.0)
) -> tuple[float, float]:
    """(scale, fixed) of measured = fixed + scale * variable: whole-model rounds against
    what the lone-layer costs say the mask adds.

    The scale corrects the level of the layer timings to that of whole rounds (a layer
    timed alone need not cost in a model exactly what it costs alone, and the machine's
    load moves between the two measurements); it is kept within `bounds`, and 1.0 where
    the rounds do not tell it (fewer than two distinct variables). Least squares in
    relative terms (each round weighted by 1 / measured^2): the prediction is judged by its
    relative error, and a dense round, twice as long as a sparse one, would otherwise pull
    the line its way. The fixed cost is at least 0.
    """
    v = np.asarray(variable, dtype=float)
    t = np.asarray(measured, dtype=float)
    w = 1.0 / np.maximum(t, 1e-12) ** 2
    scale = 1.0
    if len(v) >= 2 and np.ptp(v) > 0:
        vm, tm = (w @ v) / w.sum(), (w @ t) / w.sum()
        scale = float((w * (v - vm)) @ (t - tm) / ((w * (v - vm)) @ (v - vm)))
        scale = min(max(scale, bounds[0]), bounds[1])
    return scale, max(float(w @ (t - scale * v) / w.sum()), 0.0)


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
    originals = to_formats(wrapped, masks, {"layer.weight": fmt}) if fmt != "dense" else {}
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
    if fmt != "dense":
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
    crossovers: Mapping[str, tuple[str, float]],
) -> float:
    """Seconds for one round of `train_sparse` on the whole model (fixed batch), each
    layer in the format the crossovers give it at its density."""
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
        formats=choose_formats(model, masks, "measured", crossovers),
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
    track_importance: bool = TRACKS_IMPORTANCE,
    calibration_densities: Sequence[float] = DEFAULT_CALIBRATION_DENSITIES,
    fit_scale: bool = True,
    check_density: float | None = 0.03,
    time_budget_s: float | None = 25.0,
    statistic: str = "min",
    seed: int = 0,
    name: str = "measured",
) -> tuple[CostProfile, dict]:
    """Measure this device's cost per kept parameter of each prunable layer of `model`.

    local_steps, batch_size: K and B of a round of local training.
    bandwidth_bytes_per_s: the device's link; one kept value costs 8 bytes (down and up).
    densities: kept fractions to time each layer at (sparse formats only up to 0.5).
    repeats: timed rounds per (layer, format, density); the fastest is used (see
        `statistic`).
    input_shape: (channels, height, width) of one example.
    track_importance: time rounds that accumulate importance (default: not, see
        TRACKS_IMPORTANCE).
    calibration_densities: the fixed cost is what whole-model rounds at these densities
        (uniform random masks, each layer in the format its crossover gives) take beyond
        the layer costs (`fit_level`).
    fit_scale: also fit the level of the layer costs to those rounds (`fit_level`);
        False keeps the lone-layer timings as they are and fits the fixed cost only.
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
    supported = supported_formats(model)
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
        "machine": f"{platform.platform()}; {hardware.describe()}; torch {torch.__version__}",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    if sparse_conv_unavailable_reason() is not None:  # why convolutions were not timed sparse
        out["sparse_conv_unavailable"] = sparse_conv_unavailable_reason()
    compute: dict[str, float] = {}
    cells_total = len(inputs) * len(densities)
    cells_done, fewest_repeats = 0, repeats
    # The layer timings may use 70 % of the budget; the rest is for the whole-model runs.
    layer_budget = None if time_budget_s is None else 0.7 * time_budget_s
    for weight_name, (shape, needs_grad) in inputs.items():
        original = modules[weight_name.rpartition(".")[0]]
        sparse_format = next((f for f in supported.get(weight_name, ()) if f != "dense"), None)
        layer = _fresh_copy(original, g)
        wrapped = _OneLayer(layer)
        x = torch.randn(shape, generator=g).requires_grad_(needs_grad)
        with torch.no_grad():
            grad_out = torch.randn(wrapped(x).shape, generator=g)
        numel = layer.weight.numel()
        out[f"{weight_name}/numel"] = numel
        formats = ["dense", sparse_format] if sparse_format else ["dense"]
        out[f"{weight_name}/formats"] = formats
        # "none" rather than "": Flower's ConfigRecord cannot count an empty string's bytes.
        out[f"{weight_name}/sparse_format"] = sparse_format or NO_SPARSE_FORMAT
        masks = {d: _random_mask(layer.weight.shape, d, g) for d in densities}
        kept_at = {d: int(torch.count_nonzero(m)) for d, m in masks.items()}
        cells = [
            (d, f)
            for d in densities
            for f in formats
            if f == "dense" or d <= SPARSE_MAX_MEASURED_DENSITY
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
            if f == "dense":
                # Masked dense runs the same kernels on the same shapes whatever the mask:
                # its cost is one constant, and a slope fitted through its cells is noise
                # (one that passes the t-test now and then, and would make a dense layer
                # look cheaper at a lower density).
                slope, intercept = 0.0, statistics.fmean(secs)
            else:
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
        out[f"{weight_name}/sparse_max_density"] = (
            crossover_density(seconds["dense"], seconds[sparse_format]) if sparse_format else 0.0
        )
        chosen = fastest[-1]
        out[f"{weight_name}/format"] = chosen
        compute[weight_name] = fits[chosen][0]
        out[f"{weight_name}/compute_s_per_param"] = compute[weight_name]
    out["timed_repeats_min"] = fewest_repeats
    out["layer_seconds"] = time.perf_counter() - start
    out["time_budget_s"] = -1.0 if time_budget_s is None else float(time_budget_s)

    # The fixed cost, from whole-model rounds (`train_sparse`, each layer in the format the
    # crossovers give): what the layer costs leave unexplained. Timing layers one by one
    # cannot give it: pooling, activations, the loss, the optimiser and importance over
    # all parameters and per-step overheads belong to no layer, and each lone layer
    # carries overheads of its own. Several densities, interleaved, from the sparse regime
    # to dense: one density's residual carries all of one moment's timing noise, and the
    # dense round checks the masked dense side of each crossover.
    model_copy = copy.deepcopy(model)
    labels = torch.randint(0, 2, (batch_size,), generator=g)
    crossovers = sparse_crossovers(out)
    out["fixed_s"] = 0.0
    out["comm_s_per_param"] = BYTES_PER_VALUE_ROUND_TRIP / float(bandwidth_bytes_per_s)
    shape_only = profile_from_measurements(out)  # layer costs, fixed cost still 0

    def model_rounds(densities: Sequence[float], rounds: int, until: float) -> list[dict]:
        cases = []
        for d in densities:
            masks = {n: _random_mask(m.shape, d, g) for n, m in _prunable(model_copy).items()}
            kept = {n: int(torch.count_nonzero(m)) for n, m in masks.items()}
            cases.append({"density": float(d), "masks": masks, "kept": kept, "times": []})
        for case in cases:  # warm-up: one step
            _time_model_round(
                model_copy, case["masks"], batch, labels, 1, track_importance, lr, crossovers
            )
        for r in range(rounds):
            late = time_budget_s is not None and time.perf_counter() - start > until
            if r >= MIN_MODEL_ROUNDS and late:
                break
            for case in cases:
                case["times"].append(
                    _time_model_round(
                        model_copy,
                        case["masks"],
                        batch,
                        labels,
                        local_steps,
                        track_importance,
                        lr,
                        crossovers,
                    )
                )
        for case in cases:
            case["measured"] = summarise(case["times"])
            case["variable"] = shape_only.compute_time_s(case["kept"])
        return cases

    budget = 0.0 if time_budget_s is None else time_budget_s
    rounds = max(repeats, MODEL_ROUND_REPEATS)
    cases = model_rounds(calibration_densities, rounds, 0.85 * budget)
    measured = [c["measured"] for c in cases]
    variable = [c["variable"] for c in cases]
    if fit_scale:
        scale, fixed = fit_level(variable, measured)
    else:
        scale = 1.0
        fixed = max(statistics.fmean(m - v for m, v in zip(measured, variable, strict=True)), 0.0)
    out["fixed_s"] = fixed
    out["calibration/scale"] = scale
    for name in out["layers"]:
        out[f"{name}/compute_s_per_param"] *= scale
    out["calibration/densities"] = [c["density"] for c in cases]
    out["calibration/measured_s"] = measured
    out["calibration/variable_s"] = variable
    out["calibration/residual_s"] = [
        m - fixed - scale * v for m, v in zip(measured, variable, strict=True)
    ]
    out["calibration/rounds"] = min(len(c["times"]) for c in cases)
    profile = profile_from_measurements(out)
    over = time_budget_s is not None and time.perf_counter() - start > 0.85 * time_budget_s
    if check_density is not None and not over:
        (case,) = model_rounds([check_density], rounds, 0.95 * budget)
        out["check/density"] = float(check_density)
        out["check/measured_s"] = case["measured"]
        out["check/predicted_s"] = profile.compute_time_s(case["kept"])
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


def crossover_density(dense: Mapping[float, float], sparse: Mapping[float, float]) -> float:
    """The density below which the sparse format (`sparse`: its seconds per round by
    density) is the faster one, from seconds per round by density.

    Going up from the lowest density timed in both formats, it is where the time
    difference, interpolated linearly between the two measured densities that bracket its
    change of sign, crosses zero; 0.0 if the sparse format is not faster at the lowest
    density, and the highest density timed sparse if it is faster at every one (no
    extrapolation).
    """
    both = sorted(d for d in sparse if d in dense)
    if not both:
        return 0.0
    diff = [sparse[d] - dense[d] for d in both]
    if diff[0] >= 0:
        return 0.0
    for (d0, g0), (d1, g1) in zip(
        zip(both, diff, strict=True), zip(both[1:], diff[1:], strict=True), strict=False
    ):
        if g1 >= 0:
            return d0 + (d1 - d0) * (-g0) / (g1 - g0)
    return both[-1]


def sparse_crossovers(measurements: Mapping) -> dict[str, tuple[str, float]]:
    """Per prunable weight name measured in a sparse format: (that format, the density up
    to which it trains faster than masked dense; 0.0: never), for
    `fedprune.sparse.choose_formats`."""
    return {
        name: (
            str(measurements[f"{name}/sparse_format"]),
            float(measurements[f"{name}/sparse_max_density"]),
        )
        for name in measurements["layers"]
        if measurements.get(f"{name}/sparse_format", NO_SPARSE_FORMAT) != NO_SPARSE_FORMAT
    }


def csr_max_densities(measurements: Mapping) -> dict[str, float]:
    """Per Linear weight name, the density up to which CSR trains faster than masked dense
    (`crossover_density`; 0.0: never), for `train_sparse`'s `max_csr_density`."""
    return {
        name: density
        for name, (fmt, density) in sparse_crossovers(measurements).items()
        if fmt == "csr"
    }


def layer_costs_from_measurements(measurements: Mapping) -> dict[str, LayerCost]:
    """Per prunable layer, its cost in each format it can train in and its crossover, from
    the fitted lines of a measurement dict; {} for a dict without them (profiler version
    1). Times are multiplied by the dict's `speed_factor` (default 1), which a simulated
    node sets to be that many times slower than the device measured (the client's
    `scaled_measurements` scales `compute_s_per_param` and `fixed_s` itself and leaves
    the measured lines as measured)."""
    # The whole-model level (`fit_level`) applies to every layer's fitted lines, as it
    # does to `compute_s_per_param`.
    factor = float(measurements.get("speed_factor", 1.0)) * float(
        measurements.get("calibration/scale", 1.0)
    )
    costs = {}
    for name in measurements["layers"]:
        formats = measurements.get(f"{name}/formats", [])
        if "dense" not in formats or f"{name}/numel" not in measurements:
            return {}
        sparse = str(measurements.get(f"{name}/sparse_format", NO_SPARSE_FORMAT))
        sparse = "" if sparse == NO_SPARSE_FORMAT else sparse
        if sparse and sparse not in formats:
            return {}
        costs[name] = LayerCost(
            numel=int(measurements[f"{name}/numel"]),
            dense_s_per_param=float(measurements[f"{name}/dense/slope_s_per_param"]),
            dense_fixed_s=float(measurements[f"{name}/dense/intercept_s"]),
            sparse_max_density=(
                float(measurements[f"{name}/sparse_max_density"]) if sparse else 0.0
            ),
            sparse_s_per_param=(
                float(measurements[f"{name}/{sparse}/slope_s_per_param"]) if sparse else 0.0
            ),
            sparse_fixed_s=float(measurements[f"{name}/{sparse}/intercept_s"]) if sparse else 0.0,
            sparse_format=sparse or "csr",
        ).scaled(factor)
    return costs


def profile_from_measurements(measurements: Mapping) -> CostProfile:
    """The `CostProfile` described by a `profile_device` measurement dict (for example
    after it travelled in a Flower ConfigRecord), with its per-format layer costs."""
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
        layer_costs=layer_costs_from_measurements(measurements),
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
            f"{measurements.get(f'{name}/sparse_format', NO_SPARSE_FORMAT)} fastest up "
            f"to density {measurements.get(f'{name}/sparse_max_density', 0.0):.3g}"
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
    calibration = ", ".join(
        f"{d} {t * 1e3:.1f} ms"
        for d, t in zip(
            measurements["calibration/densities"],
            measurements["calibration/measured_s"],
            strict=True,
        )
    )
    lines.append(
        f"  fixed {measurements['fixed_s'] * 1e3:.1f} ms, layer costs x "
        f"{measurements.get('calibration/scale', 1.0):.2f} (whole model per round at density "
        f"{calibration}), comm {measurements['comm_s_per_param']:.3g} s/param"
    )
    if "check/measured_s" in measurements:
        lines.append(
            f"  whole model at density {measurements['check/density']}: measured "
            f"{measurements['check/measured_s'] * 1e3:.1f} ms per round, profile predicts "
            f"{measurements['check/predicted_s'] * 1e3:.1f} ms"
        )
    return "\n".join(lines)


def cached_measurements(
    model: nn.Module,
    local_steps: int,
    batch_size: int,
    bandwidth_bytes_per_s: float,
    *,
    repeats: int,
    input_shape: tuple[int, int, int],
    seed: int = 0,
    formats_only: bool = False,
) -> tuple[dict, bool]:
    """(this machine's raw profile of `model`, whether it came from the disk cache):
    `profile_device` measured once per machine, model, round shape and thread count
    (`fedprune.profile_cache`), so the virtual nodes of a simulation on one machine
    measure it once between them. Runs with torch's current number of threads, which is
    part of the key.

    formats_only: measure what `sparse_crossovers` needs and no more (the layers alone;
    one whole-model calibration round, no check round): half the time, for a caller that
    picks layer formats but prices no round (the server). Part of the key."""
    # Imported here: profile_cache reads the hardware, which nothing else here needs.
    from fedprune.models import param_shapes
    from fedprune.profile_cache import cached_profile, profile_key

    round_shape = {
        "local_steps": local_steps,
        "batch_size": batch_size,
        "input_shape": list(input_shape),
        "repeats": repeats,
        "profiler": PROFILER_VERSION,
        "track_importance": TRACKS_IMPORTANCE,
    }
    lean = {}
    if formats_only:
        round_shape["formats_only"] = True
        lean = {"calibration_densities": (1.0,), "check_density": None}

    def measure() -> dict:
        _, measurements = profile_device(
            model,
            local_steps,
            batch_size,
            bandwidth_bytes_per_s,
            repeats=repeats,
            input_shape=tuple(input_shape),
            seed=seed,
            **lean,
        )
        return measurements

    return cached_profile(profile_key(param_shapes(model), round_shape), measure)
