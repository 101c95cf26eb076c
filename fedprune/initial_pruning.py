"""Phase 1 of PruneFL: the server trains the full model on its own data and prunes it.

`warm_start` is the same server phase without pruning: the baselines' equal starting point
(setting `warm-start`), drawing the very same batches as `initial_prune` until its first
reconfiguration.

Every `interval` iterations, once training accuracy (on the batches of the last `interval`
iterations) is above chance (1.5 / classes), the server reconfigures the mask
with removals only. It stops when the kept size changed by at most `tolerance` (relative)
over the last `window` reconfigurations, or at `max_iterations`. No target density is
given: the cost model decides how small the model gets.

Between reconfigurations the mask is fixed, so the model can train in sparse formats
(`fedprune.sparse.to_formats`: CSR for Linear layers, the direct sparse convolution for
convolutions) chosen by `formats_for(masks)`, as a node's layers follow its measured
crossovers. Phase 1 only removes weights, so it needs importance at kept positions only:
the gradients of the sparse layers' kept values are all it sums, and no dense gradient
is formed once a layer is sparse. The model is dense again at each reconfiguration and at
the end.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from fedprune.costs import CostProfile
from fedprune.data import Examples
from fedprune.masks import Masks, full_masks, kept_counts
from fedprune.reconfigure import reconfigure
from fedprune.sparse import restore_dense, sparse_layers, to_formats
from fedprune.training import masked_steps, squared_importance, train_masked


@dataclass
class InitialPruning:
    """The result of phase 1. `history` rows: (iteration, kept prunable params, training
    accuracy on the interval's batches)."""

    masks: Masks
    iterations: int
    stopped_by: str  # "converged" | "max-iterations" | "disabled"
    history: list[tuple[int, int, float]] = field(default_factory=list)


def split_importance(
    importance: dict[str, torch.Tensor], prunable: list[str]
) -> tuple[dict[str, torch.Tensor], float]:
    """(importance of prunable weights, summed importance of the never-pruned params)."""
    fixed = sum(float(g.sum()) for n, g in importance.items() if n not in prunable)
    return {n: importance[n] for n in prunable}, fixed


def size_converged(sizes: list[int], window: int, tolerance: float) -> bool:
    """True when the last `window` reconfigurations changed the size by at most
    `tolerance` relative to the size before them."""
    if len(sizes) <= window:
        return False
    before, recent = sizes[-1 - window], sizes[-window:]
    return max(abs(s - before) for s in recent) <= tolerance * max(before, 1)


def warm_start(
    model: nn.Module,
    data: Examples,
    *,
    iterations: int,
    lr: float,
    batch_size: int,
    local_steps: int,
    seed: int = 0,
) -> int:
    """Train `model` (dense) in place on the server's data for `iterations` SGD steps, in
    blocks of `local_steps` as `initial_prune` trains, with the same seeded batches and
    no importance; returns the iterations done."""
    masks = full_masks(model)
    generator = torch.Generator().manual_seed(seed)
    done = 0
    while done < iterations:
        steps = min(local_steps, iterations - done)
        train_masked(
            model,
            masks,
            data,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            generator=generator,
            track_importance=False,
        )
        done += steps
    return done


def initial_prune(
    model: nn.Module,
    data: Examples,
    profile: CostProfile,
    *,
    num_classes: int,
    lr: float,
    batch_size: int,
    local_steps: int,
    interval: int = 50,
    max_iterations: int = 1000,
    window: int = 5,
    tolerance: float = 0.1,
    delta: float = 0.3,
    max_density: float = 1.0,
    seed: int = 0,
    on_reconfigure=None,
    formats_for: Callable[[Masks], Mapping[str, str]] | None = None,
) -> InitialPruning:
    """Train `model` in place on the server's data and prune it by PruneFL's objective.

    Importance is accumulated like a client's: the square of the gradient summed over
    each block of `local_steps` iterations, summed over blocks since the last
    reconfiguration. `on_reconfigure(iteration, kept, total, train_acc)` is called after
    each reconfiguration (progress output). `formats_for(masks)` (weight name -> "dense",
    "csr" or "sparse-conv", as `fedprune.sparse.choose_formats` gives) says which layers
    train in a sparse format until the next reconfiguration; None trains masked dense.
    """
    masks = full_masks(model)
    prunable = list(masks)
    never_pruned = sum(p.numel() for n, p in model.named_parameters() if n not in masks)
    time_per_param = profile.time_per_param()
    fixed_time_s = profile.fixed_time_s(never_pruned)
    generator = torch.Generator().manual_seed(seed)
    chance = 1.5 / num_classes
    accumulated: dict[str, torch.Tensor] | None = None
    sizes: list[int] = []
    history: list[tuple[int, int, float]] = []
    iteration, since_reconfig = 0, 0
    # (examples, classified right) of the blocks of the last `interval` iterations
    recent: deque[tuple[int, int]] = deque(maxlen=max(1, -(-interval // local_steps)))
    originals: dict[str, nn.Module] = {}  # layers in sparse formats until the next reconfig
    converted = False
    try:
        while iteration < max_iterations:
            if formats_for is not None and not converted:
                originals = to_formats(model, masks, formats_for(masks))
                converted = True
            steps = min(local_steps, max_iterations - iteration)
            importance, drawn, right = _train_block(
                model, masks, data, steps, batch_size, lr, generator
            )
            iteration += steps
            since_reconfig += steps
            recent.append((drawn, right))
            if accumulated is None:
                accumulated = importance
            else:
                for n, g in importance.items():
                    accumulated[n].add_(g)
            if since_reconfig < interval:
                continue
            # The accuracy on the batches of the last `interval` iterations, as the model
            # was when it trained on each: free, where evaluating the whole share at each
            # reconfiguration cost a tenth of the phase (Conv-2, 400 examples). Over a
            # whole interval, as at the first check, also when a check fails: an
            # untrained model scores above chance on one block's 100 examples by luck.
            seen = sum(n for n, _ in recent)
            train_acc = sum(r for _, r in recent) / max(seen, 1)
            if train_acc <= chance:
                continue  # too early: gradients of an untrained model say little
            accumulated = _dense_importance(model, accumulated)
            restore_dense(model, originals)
            originals, converted = {}, False
            weights = {n: p.detach() for n, p in model.named_parameters() if n in masks}
            importance, fixed_importance = split_importance(accumulated, prunable)
            masks = reconfigure(
                weights,
                masks,
                importance,
                time_per_param,
                fixed_time_s,
                fixed_importance=fixed_importance,
                delta=delta,
                max_density=max_density,
                allow_regrowth=False,
            ).masks
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in masks:
                        p.mul_(masks[n])
            kept = sum(kept_counts(masks).values())
            total = sum(m.numel() for m in masks.values())
            sizes.append(kept)
            history.append((iteration, kept, train_acc))
            if on_reconfigure is not None:
                on_reconfigure(iteration, kept, total, train_acc)
            accumulated, since_reconfig = None, 0
            recent.clear()
            if size_converged(sizes, window, tolerance):
                return InitialPruning(masks, iteration, "converged", history)
        return InitialPruning(masks, iteration, "max-iterations", history)
    finally:
        restore_dense(model, originals)


def _train_block(model, masks, data, steps, batch_size, lr, generator) -> tuple[dict, int, int]:
    """One block of `steps` SGD iterations: its importance per parameter, as
    `train_masked` computes it (a sparse layer's for its kept values only, keyed
    "<layer>.values"), the samples it drew and how many of them it classified right."""
    _, samples, grad_sum, correct = masked_steps(
        model,
        masks,
        data,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        momentum=0.0,
        weight_decay=0.0,
        generator=generator,
        track_importance=True,
    )
    return squared_importance(grad_sum, model.named_parameters(), samples), samples, correct


def _dense_importance(model: nn.Module, importance: dict[str, torch.Tensor]) -> dict:
    """`importance` keyed by the dense model's parameter names: a sparse layer's
    "<layer>.values" scattered into its weight's shape as "<layer>.weight" (0.0 at pruned
    positions, which phase 1 never regrows, so nothing reads them)."""
    layers = {
        weight_name.removesuffix(".weight") + ".values": (weight_name, layer)
        for weight_name, layer in sparse_layers(model).items()
    }
    out = {}
    for name, scores in importance.items():  # in the model's order, as the dense path
        if name not in layers:
            out[name] = scores
            continue
        weight_name, layer = layers[name]
        dense = torch.zeros(layer.weight_shape, dtype=scores.dtype)
        dense.view(-1)[layer.mask().reshape(-1)] = scores
        out[weight_name] = dense
    return out
