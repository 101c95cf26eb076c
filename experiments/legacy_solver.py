"""The reconfiguration solver as it was at commit f3749d8, before issue 16: a reference.

`experiments.bench_solver` times it side by side with `fedprune.reconfigure.reconfigure`
and checks that both choose the same masks; tests/test_reconfigure.py compares the two on
medium instances. The code below the imports is that commit's, unchanged except that the
function is named `legacy_reconfigure` and the shared `Reconfiguration` result type is
imported. It sorts every candidate in float64 by `G_j / t_l` with a per-candidate time
tensor, and solves the capped case by Dinkelbach over all candidates with `torch.topk`.
Do not use it in the run: it is kept only to measure and check the new solver against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedprune.reconfigure import Reconfiguration

__all__ = ["legacy_reconfigure"]

# Dinkelbach converges superlinearly and in finitely many steps (lambda strictly increases
# over a finite family of subsets); this bound only guards against float pathologies.
_MAX_DINKELBACH_ITERATIONS = 100


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
        g = importance[name]
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"importance[{name!r}] has non-finite entries")
        if bool((g < 0).any()):
            raise ValueError(f"importance[{name!r}] has negative entries; G_j must be >= 0")
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


def _dinkelbach(
    g: torch.Tensor,
    t: torch.Tensor,
    a: float,
    b: float,
    m: int,
    start: torch.Tensor,
    start_value: float,
) -> torch.Tensor:
    """Indices of the best at-most-`m` subset for max (a + sum g) / (b + sum t).

    `start` is a feasible subset with objective `start_value`. Each step takes the best m
    positive values of `g - lambda * t`; if that subset does not strictly raise lambda,
    lambda is optimal (no subset of size <= m has `sum(g - lambda t) > lambda b - a`).
    """
    best, lam = start, start_value
    for _ in range(_MAX_DINKELBACH_ITERATIONS):
        value = g - lam * t
        take = torch.nonzero(value > 0).squeeze(1)
        if take.numel() > m:
            # Which of several equal values gets the last slot cannot change the objective.
            take = take[torch.topk(value[take], m, sorted=False).indices]
        new_lam = (a + float(g[take].sum())) / (b + float(t[take].sum()))
        if not new_lam > lam:
            break
        best, lam = take, new_lam
    return best


def legacy_reconfigure(
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
        parameter with `G_j = 0` is never added.

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
    device = masks[names[0]].device

    fixed_flat: list[torch.Tensor] = []
    cand_index: list[torch.Tensor] = []  # flat indices within the layer, per layer
    cand_g: list[torch.Tensor] = []
    cand_t: list[torch.Tensor] = []
    a = float(fixed_importance)  # numerator constant once the fixed set is known
    b = float(fixed_time_s)  # denominator constant
    n_fixed = 0
    for name in names:
        mask = masks[name].reshape(-1).to(device)
        g = importance[name].reshape(-1).to(device=device, dtype=torch.float64)
        t_l = float(time_per_param[name])
        kept_idx = torch.nonzero(mask).squeeze(1)  # ascending, so stable sort breaks ties by index
        magnitude = weights[name].reshape(-1).to(device)[kept_idx].abs()
        order = torch.sort(magnitude, stable=True).indices
        fixed_idx = kept_idx[order[_n_released(delta, kept_idx.numel()) :]]
        fixed = torch.zeros_like(mask)
        fixed[fixed_idx] = True
        fixed_flat.append(fixed)

        # With regrowth every non-fixed entry is a candidate; without, only released ones.
        candidate = ~fixed if allow_regrowth else mask & ~fixed
        # G_j = 0 can never raise the objective (t_j >= 0), so such entries are dropped here.
        idx = torch.nonzero(candidate & (g > 0)).squeeze(1)
        cand_index.append(idx)
        cand_g.append(g[idx])
        cand_t.append(torch.full((idx.numel(),), t_l, dtype=torch.float64, device=device))

        a += float(g[fixed_idx].sum())
        b += t_l * fixed_idx.numel()
        n_fixed += fixed_idx.numel()

    g_all = torch.cat(cand_g)
    t_all = torch.cat(cand_t)
    cap = math.floor(max_density * total)
    cap_met = True

    # G > 0 here, so t = 0 gives +inf: free importance is always worth taking.
    ratio = g_all / t_all
    order = torch.sort(ratio, descending=True, stable=True).indices
    zero = torch.zeros(1, dtype=torch.float64, device=device)
    cum_g = torch.cat([zero, torch.cumsum(g_all[order], 0)])
    cum_t = torch.cat([zero, torch.cumsum(t_all[order], 0)])
    prefix_value = (a + cum_g) / (b + cum_t)
    # argmax returns the first maximum, i.e. the shorter prefix on exact ties.
    best_len = int(torch.argmax(prefix_value))

    if n_fixed + best_len <= cap:
        selected = order[:best_len]
    elif n_fixed > cap:
        selected = order[:0]
        cap_met = False
    else:
        m = cap - n_fixed
        start_len = int(torch.argmax(prefix_value[: m + 1]))
        selected = _dinkelbach(
            g_all, t_all, a, b, m, order[:start_len], float(prefix_value[start_len])
        )

    chosen = torch.zeros(g_all.numel(), dtype=torch.bool, device=device)
    chosen[selected] = True
    new_masks: dict[str, torch.Tensor] = {}
    kept = 0
    kept_importance = float(fixed_importance)
    round_time_s = float(fixed_time_s)
    for name, fixed, idx, chosen_l in zip(
        names,
        fixed_flat,
        cand_index,
        torch.split(chosen, [i.numel() for i in cand_index]),
        strict=True,
    ):
        new = fixed.clone()
        new[idx[chosen_l]] = True
        kept_l = int(new.sum())
        kept += kept_l
        # Recomputed from the final mask so the reported figures describe exactly it.
        g = importance[name].reshape(-1).to(device=device, dtype=torch.float64)
        kept_importance += float(g[new].sum())
        round_time_s += kept_l * float(time_per_param[name])
        new_masks[name] = new.reshape(masks[name].shape).to(masks[name].device)

    return Reconfiguration(
        masks=new_masks,
        objective=kept_importance / round_time_s,
        round_time_s=round_time_s,
        kept=kept,
        total=total,
        cap_met=cap_met,
    )
