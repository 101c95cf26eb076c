"""PruneFL's reconfiguration: the kept set that buys the most risk reduction per second.

Given the importance `G_j >= 0` of every prunable parameter (accumulated squared
gradients) and a linear model of the round time, `T(M) = c + sum_l n_l(M) * t_l`, choose
the kept set M that maximises

    (fixed_importance + sum_{j in M} G_j) / T(M)          [1/s]

subject to PruneFL's stability rule (the largest-magnitude `1 - delta` share of each
layer's currently kept weights must stay) and an optional cap on the overall density.

Without a binding cap the optimum takes exactly the candidates whose ratio `G_j / t_l`
exceeds the optimal value lambda*. With a binding cap that no longer holds when `t`
differs between layers (a high-ratio but cheap parameter may waste one of the few slots),
so the capped case is solved exactly with Dinkelbach's method, whose inner problem is the
best m of `G_j - lambda * t_l`.

The time per parameter is one number per layer, so within a layer every order the solver
needs (by ratio, by `G - lambda t`) is the order by `G`. Each layer's candidates are
therefore sorted once, by importance alone, and only those that can matter (ratio above
the value of the stability-fixed set, which lambda* never falls below) are sorted at all.
Both Dinkelbach loops then work on per-layer counts: "how many of layer l's candidates
clear this threshold" is a binary search and their importance a cumulative sum, so no
per-parameter time tensor and no global sort over all layers is ever built. Sorting and
selection run in numpy, whose CPU sorts are an order of magnitude faster than torch's.

Everything is vectorised over parameters; Python only loops over layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Reconfiguration", "reconfigure", "stability_delta"]

# Dinkelbach converges superlinearly and in finitely many steps (lambda strictly increases
# over a finite family of subsets); this bound only guards against float pathologies.
_MAX_DINKELBACH_ITERATIONS = 100


def stability_delta(step: float, initial: float = 0.3, half_life: float = 50.0) -> float:
    """Share (fraction in [0, 1]) of each layer's kept weights open to reconfiguration.

    `delta = initial * 0.5 ** (step / half_life)`, as in the paper, so the mask settles as
    training proceeds. `step` is usually the round (or reconfiguration) number and
    `half_life` is in the same unit. `half_life <= 0` or infinite means a constant
    `initial`.
    """
    if half_life <= 0 or math.isinf(half_life):
        return float(initial)
    return float(initial) * 0.5 ** (step / half_life)


@dataclass(frozen=True)
class Reconfiguration:
    """Result of `reconfigure`.

    Attributes:
        masks: new bool masks, same keys, shapes and devices as the input masks.
        objective: (fixed_importance + sum of G over kept) / round_time_s, in 1/s.
        round_time_s: modelled round time, fixed_time_s + sum_l kept_l * t_l, seconds.
        kept: kept prunable parameters.
        total: all prunable parameters.
        cap_met: False only when the stability rule alone keeps more than
            `max_density` allows; the mask is then the stability-fixed set.
    """

    masks: dict[str, torch.Tensor]
    objective: float
    round_time_s: float
    kept: int
    total: int
    cap_met: bool


def _n_released(delta: float, kept: int) -> int:
    """How many of a layer's `kept` weights the stability rule lets go: floor(delta * kept)."""
    return math.floor(delta * kept)


def _validate(
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    importance: Mapping[str, torch.Tensor],
    time_per_param: Mapping[str, float],
    fixed_time_s: float,
    fixed_importance: float,
    delta: float,
    max_density: float,
) -> None:
    """Keys, shapes, dtypes and scalars; the importance values are checked in `_Layer`."""
    names = set(masks)
    for label, mapping in (
        ("weights", weights),
        ("importance", importance),
        ("time_per_param", time_per_param),
    ):
        if set(mapping) != names:
            missing = sorted(names - set(mapping))
            extra = sorted(set(mapping) - names)
            raise ValueError(
                f"{label} keys do not match the mask keys: missing {missing}, extra {extra}"
            )
    for name, mask in masks.items():
        if mask.dtype != torch.bool:
            raise ValueError(f"mask {name!r} must have dtype torch.bool, got {mask.dtype}")
        for label, mapping in (("weights", weights), ("importance", importance)):
            if mapping[name].shape != mask.shape:
                raise ValueError(
                    f"{label}[{name!r}] has shape {tuple(mapping[name].shape)}, "
                    f"mask has shape {tuple(mask.shape)}"
                )
        t = float(time_per_param[name])
        if not (math.isfinite(t) and t >= 0):
            raise ValueError(f"time_per_param[{name!r}] = {t} must be finite and >= 0 seconds")
    if not (math.isfinite(fixed_time_s) and fixed_time_s > 0):
        raise ValueError(f"fixed_time_s = {fixed_time_s} must be finite and > 0 seconds")
    if not (math.isfinite(fixed_importance) and fixed_importance >= 0):
        raise ValueError(f"fixed_importance = {fixed_importance} must be finite and >= 0")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta = {delta} must be in [0, 1]")
    if not 0.0 < max_density <= 1.0:
        raise ValueError(f"max_density = {max_density} must be in (0, 1]")


def _flat_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A flat CPU numpy view of `tensor`, in a dtype whose values equal the tensor's.

    float32 and float64 stay as they are (no copy on the CPU); narrower floats widen to
    float32 and everything else to float64, both exactly, so orders and sums are those of
    the float64 values.
    """
    flat = tensor.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64, torch.bool):
        narrow = flat.is_floating_point() and flat.element_size() < 4
        flat = flat.to(torch.float32 if narrow else torch.float64)
    return flat.cpu().numpy()


def _below(threshold: float, dtype: np.dtype) -> np.generic:
    """The largest value of `dtype` that is <= `threshold` (rounding toward -inf), so that
    `x > _below(th, x.dtype)` holds for every `x > th`."""
    with np.errstate(over="ignore"):  # beyond the dtype's range: inf, then its max
        value = dtype.type(threshold)
    if float(value) > threshold:
        value = np.nextafter(value, dtype.type(-np.inf))
    return value


def _above(threshold: float, dtype: np.dtype) -> np.generic:
    """The smallest value of `dtype` that is >= `threshold` (rounding toward +inf)."""
    with np.errstate(over="ignore"):  # beyond the dtype's range: inf, above every value
        value = dtype.type(threshold)
    if float(value) < threshold:
        value = np.nextafter(value, dtype.type(np.inf))
    return value


class _Layer:
    """One prunable layer: its stability-fixed set and its sorted candidates.

    `top` holds the importance of the candidates that can enter the kept set (those whose
    ratio `G / t` exceeds a lower bound of lambda*), sorted descending (`ascending` is
    the same array the other way round); `sum_top(k)` is the float64 sum of its first k.
    Choosing "the first k of `top`" is then a threshold on G plus, for equal G at the
    boundary, the lowest flat indices.
    """

    __slots__ = (
        "ascending",
        "cand",
        "fixed",
        "fixed_g",
        "g",
        "mask",
        "n_fixed",
        "name",
        "t",
        "top",
        "top_sums",
    )

    def __init__(
        self,
        name: str,
        weights: torch.Tensor,
        mask: torch.Tensor,
        importance: torch.Tensor,
        t: float,
        delta: float,
        allow_regrowth: bool,
    ) -> None:
        self.name = name
        self.t = float(t)
        self.mask = _flat_numpy(mask)
        self.g = _flat_numpy(importance)
        if self.g.size:
            # min/max propagate NaN and see +-inf: two cheap reductions instead of
            # isfinite over the layer.
            lo, hi = float(self.g.min()), float(self.g.max())
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"importance[{name!r}] has non-finite entries")
            if lo < 0:
                raise ValueError(f"importance[{name!r}] has negative entries; G_j must be >= 0")
        self.fixed = self._stability_fixed(_flat_numpy(weights), delta)
        self.n_fixed = int(np.count_nonzero(self.fixed))
        self.fixed_g = float(self.g[self.fixed].sum(dtype=np.float64)) if self.n_fixed else 0.0
        if allow_regrowth:
            self.cand = ~self.fixed
        elif self.fixed is self.mask:
            self.cand = np.zeros_like(self.mask)  # nothing released, nothing regrows
        else:
            self.cand = self.mask & ~self.fixed
        self.top = self.g[:0]
        self.top_sums: dict[int, float] = {0: 0.0}
        self.ascending = self.top

    def _stability_fixed(self, w: np.ndarray, delta: float) -> np.ndarray:
        """Bool mask of the kept weights the stability rule keeps: all but the
        floor(delta * k) smallest |w| of the k kept, ties released lowest index first.
        May be `self.mask` itself (nothing released); never written to afterwards."""
        kept = int(np.count_nonzero(self.mask))
        released = _n_released(delta, kept)
        if released == 0:
            return self.mask
        if released >= kept:
            return np.zeros_like(self.mask)
        magnitude = np.abs(w)
        kept_magnitude = magnitude if kept == self.mask.size else magnitude[self.mask]
        # The released-th smallest kept magnitude: a partial selection, not a sort.
        tau = np.partition(kept_magnitude, released - 1)[released - 1]
        # NaN magnitudes compare False everywhere and so stay fixed, as the largest would.
        fixed = self.mask & ~(magnitude <= tau)
        n_below = int(np.count_nonzero(self.mask & (magnitude < tau)))
        ties = np.flatnonzero(self.mask & (magnitude == tau))
        fixed[ties[released - n_below :]] = True
        return fixed

    def gather_candidates(self, lam: float) -> None:
        """Sort the candidates whose ratio can exceed `lam` (a lower bound of every
        value the solver will consider); the rest can never be chosen."""
        if not self.cand.any():
            return
        # A superset of {G / t > lam}: the product rounds, so the bound is lowered by a
        # margin far above float64 rounding; the exact ratio decides later. G = 0 never
        # passes, as the bound is >= 0.
        bound = _below(lam * self.t * (1.0 - 1e-9), self.g.dtype)
        values = self.g[self.cand & (self.g > bound)]
        self.ascending = np.sort(values)
        self.top = self.ascending[::-1]

    def count_above(self, lam: float) -> int:
        """How many candidates have ratio `G / t` (in float64, as the old global sort had
        it) strictly above `lam`.

        Two binary searches on G bracket the boundary a relative 1e-9 either side of
        `lam * t` (far wider than any rounding); only the few values in between, all
        but equal, get their ratio computed. No ratio array over all candidates.
        """
        n = self.ascending.size
        if self.t == 0:
            return n  # G > 0 here, so the ratio is +inf
        theta = lam * self.t
        dtype = self.ascending.dtype
        lo = int(np.searchsorted(self.ascending, _below(theta * (1 - 1e-9), dtype), "right"))
        hi = int(np.searchsorted(self.ascending, _above(theta * (1 + 1e-9), dtype), "left"))
        window = self.ascending[lo:hi].astype(np.float64) / self.t
        return n - hi + int(np.count_nonzero(window > lam))

    def sum_top(self, k: int) -> float:
        """Importance of the first k candidates (float64).

        Summed on demand rather than from a cumulative sum over all candidates: the
        solver asks for a few k per layer, mostly small ones, and a float64 cumsum of a
        large candidate list costs more than those sums together.
        """
        total = self.top_sums.get(k)
        if total is None:
            total = float(self.top[:k].sum(dtype=np.float64))
            self.top_sums[k] = total
        return total

    def new_mask(self, k: int) -> np.ndarray:
        """Fixed set plus the first k candidates by importance; among equal importance at
        the boundary, the lowest flat indices."""
        if k == 0:
            return self.fixed.copy()
        theta = self.top[k - 1]
        n = self.ascending.size
        n_greater = n - int(np.searchsorted(self.ascending, theta, side="right"))
        n_at_least = n - int(np.searchsorted(self.ascending, theta, side="left"))
        if n_at_least == k:
            return self.fixed | (self.cand & (self.g >= theta))
        chosen = self.cand & (self.g > theta)
        ties = np.flatnonzero(self.cand & (self.g == theta))
        chosen[ties[: k - n_greater]] = True
        return self.fixed | chosen


def _value(layers: list[_Layer], counts: list[int], a: float, b: float) -> float:
    """Objective of the fixed sets plus the first counts[l] candidates of each layer."""
    num = a + sum(layer.sum_top(k) for layer, k in zip(layers, counts, strict=True))
    den = b + sum(k * layer.t for layer, k in zip(layers, counts, strict=True))
    return num / den


def _best_unconstrained(layers: list[_Layer], a: float, b: float) -> list[int]:
    """Per-layer counts of the optimal set without a cap: {G / t > lambda*}.

    Dinkelbach on the ratio threshold: from lambda = a / b (the fixed set alone), take
    every candidate whose ratio exceeds lambda and re-evaluate. The value rises strictly
    until the set repeats, which is lambda*; candidates whose ratio equals lambda* are
    left out, so ties in the objective keep the smaller set.
    """
    counts = [0] * len(layers)
    lam = a / b
    for _ in range(_MAX_DINKELBACH_ITERATIONS):
        new_counts = [layer.count_above(lam) for layer in layers]
        new_lam = _value(layers, new_counts, a, b)
        if new_lam < lam:  # float rounding only: keep the last set that reached lam
            break
        counts = new_counts
        if new_lam == lam:
            break
        lam = new_lam
    return counts


def _best_m(layers: list[_Layer], lam: float, m: int) -> list[int]:
    """Per-layer counts of the best at-most-m candidates by `G - lam * t`, positive only.

    Within a layer the order by `G - lam * t_l` is the order by G, and no layer gives
    more than m, so only each layer's first m are looked at. Equal values across layers
    (which are not equal ratios) go to the earlier layer.
    """
    values = []
    for layer in layers:
        v = layer.top[:m].astype(np.float64) - lam * layer.t
        values.append(v[: int(np.count_nonzero(v > 0))])  # v is non-increasing
    positive = [v.size for v in values]
    if sum(positive) <= m:
        return positive
    pooled = np.concatenate(values)
    mu = np.partition(pooled, pooled.size - m)[pooled.size - m]  # the m-th largest
    counts = [int(np.count_nonzero(v > mu)) for v in values]
    left = m - sum(counts)
    for i, v in enumerate(values):
        take = min(left, int(np.count_nonzero(v == mu)))
        counts[i] += take
        left -= take
    return counts


def _best_capped(layers: list[_Layer], a: float, b: float, m: int) -> list[int]:
    """Per-layer counts of the best set of at most m candidates (Dinkelbach).

    Each step takes the best m positive values of `G - lambda * t`; if that does not
    strictly raise lambda, lambda is optimal (no set of size <= m has
    `sum(G - lambda t) > lambda b - a`). Starts from the fixed set alone, lambda = a / b.
    """
    counts = [0] * len(layers)
    lam = a / b
    for _ in range(_MAX_DINKELBACH_ITERATIONS):
        new_counts = _best_m(layers, lam, m)
        new_lam = _value(layers, new_counts, a, b)
        if not new_lam > lam:
            break
        counts, lam = new_counts, new_lam
    return counts


def reconfigure(
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    importance: Mapping[str, torch.Tensor],
    time_per_param: Mapping[str, float],
    fixed_time_s: float,
    fixed_importance: float = 0.0,
    delta: float = 0.3,
    max_density: float = 1.0,
    allow_regrowth: bool = True,
) -> Reconfiguration:
    """Choose new masks maximising importance per second of modelled round time.

    Args:
        weights: current values of the prunable parameters; pruned entries may hold any
            value (only the magnitudes of kept entries are read).
        masks: current bool masks, True where kept.
        importance: `G_j >= 0` per parameter, same shapes (any float dtype).
        time_per_param: `t_l`, seconds per kept parameter of layer l (local compute plus
            communication), >= 0.
        fixed_time_s: fixed round cost `c` plus the time of never-pruned parameters,
            seconds, > 0.
        fixed_importance: sum of G over never-pruned parameters (biases...), >= 0.
        delta: stability share in [0, 1]: per layer, the `floor(delta * k_l)`
            smallest-|w| of the `k_l` kept weights may be dropped; the rest must stay.
            Magnitude ties release the lower flat index first.
        max_density: cap on kept / total over all prunable parameters, fraction in (0, 1];
            the kept count is at most `floor(max_density * total)`.
        allow_regrowth: whether currently pruned parameters are candidates. False is the
            server's initial pruning, which may only remove.

    Returns:
        A `Reconfiguration`. Ties in the objective prefer the smaller kept set; a
        parameter with `G_j = 0` is never added, and without a binding cap one with
        `G_j > 0` and `t_l = 0` always is, however small `G_j` (ratios are compared,
        not rounded sums). Under a binding cap, candidates of one layer with equal
        importance at the boundary are taken lowest flat index first.
        The computation runs on the CPU; the masks come back on the input masks' devices.

    Raises:
        ValueError: on mismatched keys, shapes or mask dtype, negative or non-finite
            importance, negative time_per_param, `fixed_time_s <= 0`, `delta` outside
            [0, 1] or `max_density` outside (0, 1].
    """
    _validate(
        weights,
        masks,
        importance,
        time_per_param,
        fixed_time_s,
        fixed_importance,
        delta,
        max_density,
    )
    names = list(masks)
    total = sum(masks[n].numel() for n in names)
    if not names:
        return Reconfiguration({}, fixed_importance / fixed_time_s, fixed_time_s, 0, 0, True)

    layers = [
        _Layer(n, weights[n], masks[n], importance[n], time_per_param[n], delta, allow_regrowth)
        for n in names
    ]
    a = float(fixed_importance) + sum(layer.fixed_g for layer in layers)
    b = float(fixed_time_s) + sum(layer.n_fixed * layer.t for layer in layers)
    n_fixed = sum(layer.n_fixed for layer in layers)
    # Every set the solver considers is worth at least the fixed set alone, a / b, so a
    # candidate with G / t <= a / b is never taken (unconstrained: its ratio is below
    # lambda*; capped: its G - lambda t is <= 0) and need not be sorted.
    for layer in layers:
        layer.gather_candidates(a / b)

    cap = math.floor(max_density * total)
    cap_met = True
    counts = _best_unconstrained(layers, a, b)
    if n_fixed + sum(counts) > cap:
        if n_fixed > cap:
            counts = [0] * len(layers)
            cap_met = False
        else:
            counts = _best_capped(layers, a, b, cap - n_fixed)

    new_masks: dict[str, torch.Tensor] = {}
    kept = 0
    kept_importance = float(fixed_importance)
    round_time_s = float(fixed_time_s)
    for name, layer, k in zip(names, layers, counts, strict=True):
        new = layer.new_mask(k)
        kept_l = layer.n_fixed + k
        kept += kept_l
        # The chosen candidates are exactly the first k of `top`, so their importance is
        # sum_top(k): the figures describe exactly the returned mask.
        kept_importance += layer.fixed_g + layer.sum_top(k)
        round_time_s += kept_l * layer.t
        mask = masks[name]
        new_masks[name] = torch.from_numpy(new).reshape(mask.shape).to(mask.device)

    return Reconfiguration(
        masks=new_masks,
        objective=kept_importance / round_time_s,
        round_time_s=round_time_s,
        kept=kept,
        total=total,
        cap_met=cap_met,
    )
