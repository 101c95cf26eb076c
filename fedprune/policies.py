"""Pruning policies of the baselines, as pure functions from tensors to masks.

Each takes the current weights, scores and masks (dicts keyed by prunable weight name)
and returns new bool masks; none touches a model or a network. PruneFL's own policy is
`fedprune.reconfigure.reconfigure`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedprune.masks import Masks


def _flat(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(torch.float64) for t in tensors.values()])


def _unflat(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> Masks:
    out, pos = {}, 0
    for name, t in like.items():
        out[name] = flat[pos : pos + t.numel()].reshape(t.shape).clone()
        pos += t.numel()
    return out


def keep_top(
    scores: Mapping[str, torch.Tensor],
    count: int,
    eligible: Mapping[str, torch.Tensor] | None = None,
) -> Masks:
    """Keep the `count` highest scores over all layers together (global ranking), among
    `eligible` entries only when given. Ties go to the lower position (stable)."""
    flat = _flat(scores)
    if eligible is not None:
        flat = torch.where(_flat(eligible) > 0, flat, torch.tensor(-math.inf, dtype=flat.dtype))
    count = max(0, min(count, flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:count]] = True
    return _unflat(keep, scores)


def target_count(masks: Mapping[str, torch.Tensor], density: float) -> int:
    """Kept entries for `density` (fraction of prunable weights), rounded."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return round(density * sum(m.numel() for m in masks.values()))


def snip(
    weights: Mapping[str, torch.Tensor], importance: Mapping[str, torch.Tensor], density: float
) -> Masks:
    """SNIP (Lee et al., 2019): keep the largest |w * g| over the whole model.

    `importance` is PruneFL's per-parameter G = (summed gradient)^2 * samples, summed over
    clients, so sqrt(G) stands in for |g|: the root of the clients' summed squared
    gradients rather than the magnitude of one pooled gradient.
    """
    scores = {k: weights[k].abs() * importance[k].clamp_min(0).sqrt() for k in weights}
    return keep_top(scores, target_count(weights, density))


def magnitude(
    weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], density: float
) -> Masks:
    """Global magnitude pruning: keep the largest |w| among the kept entries, to `density`.
    Never regrows (a pruned entry stays pruned)."""
    count = min(
        target_count(masks, density), sum(int(torch.count_nonzero(m)) for m in masks.values())
    )
    return keep_top({k: weights[k].abs() for k in weights}, count, eligible=masks)


def iterative_density(server_round: int, target: float, steps: int, ramp_rounds: int) -> float:
    """Density after `server_round` of iterative magnitude pruning: `steps` geometric steps
    from 1 to `target`, spread evenly over the first `ramp_rounds` rounds."""
    done = math.floor(steps * min(server_round, ramp_rounds) / max(ramp_rounds, 1))
    return target ** (done / steps)


def erk_densities(
    shapes: Mapping[str, torch.Size | tuple[int, ...]], density: float
) -> dict[str, float]:
    """Per-layer densities of the Erdős-Rényi-Kernel rule (Evci et al., 2020), which FedDST
    uses: layer l gets density proportional to sum(shape) / prod(shape), capped at 1, scaled
    so that the whole reaches `density`. Small layers (conv1, the classifier) stay denser;
    a uniform density would leave a 5x5 single-channel conv with a handful of weights."""
    numel = {k: math.prod(s) for k, s in shapes.items()}
    score = {k: sum(s) / numel[k] for k, s in shapes.items()}
    budget = density * sum(numel.values())
    dense: set[str] = set()
    while True:
        rest = [k for k in shapes if k not in dense]
        free = budget - sum(numel[k] for k in dense)
        scale = free / max(sum(score[k] * numel[k] for k in rest), 1e-300)
        over = [k for k in rest if scale * score[k] > 1.0]
        if not over:
            return {k: 1.0 if k in dense else scale * score[k] for k in shapes}
        dense.update(over)


def random_masks(
    shapes: Mapping[str, torch.Size | tuple[int, ...]],
    density: float | Mapping[str, float],
    generator: torch.Generator,
) -> Masks:
    """Each layer kept uniformly at random at its density (exact count per layer);
    `density` is one fraction for all layers or one per layer."""
    masks = {}
    for name, shape in shapes.items():
        n = math.prod(shape)
        d = density[name] if isinstance(density, Mapping) else density
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=generator)[: round(d * n)]] = True
        masks[name] = keep.reshape(shape)
    return masks


def prune_and_regrow(
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    importance: Mapping[str, torch.Tensor],
    fraction: float,
) -> Masks:
    """FedDST's mask update (Bibikar et al., 2022), at constant density per layer: drop the
    `fraction` smallest-|w| kept entries of each layer and regrow as many pruned entries
    with the largest gradient magnitude (sqrt of the importance)."""
    out = {}
    for name, mask in masks.items():
        flat_mask = mask.reshape(-1)
        kept = int(flat_mask.sum())
        # Swap as many as can come back, so the density holds (a full layer has none).
        k = min(math.floor(fraction * kept), flat_mask.numel() - kept)
        if k == 0:
            out[name] = mask.clone()
            continue
        w = weights[name].reshape(-1).abs().to(torch.float64)
        g = importance[name].reshape(-1).to(torch.float64)
        w_kept = torch.where(flat_mask, w, torch.tensor(math.inf, dtype=torch.float64))
        drop = torch.sort(w_kept, stable=True).indices[:k]
        new = flat_mask.clone()
        new[drop] = False
        # Regrow among the entries pruned before this update (not the ones just dropped).
        g_pruned = torch.where(flat_mask, torch.tensor(-math.inf, dtype=torch.float64), g)
        grow = torch.sort(g_pruned, descending=True, stable=True).indices[:k]
        new[grow] = True
        out[name] = new.reshape(mask.shape)
    return out
