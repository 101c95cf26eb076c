"""The baselines of the paper's comparison, as SparseFedAvg subclasses.

Each overrides only when it needs importance and how its mask changes; the policies are
pure functions in fedprune.policies.
"""

from __future__ import annotations

from logging import INFO

import torch
from flwr.common.logger import log

from fedprune import policies
from fedprune.masks import Masks
from fedprune.reconfigure import stability_delta
from strategies.sparse_fedavg import SparseFedAvg


class FixedMask(SparseFedAvg):
    """FedAvg with a mask that never changes: dense FedAvg with full masks, or the
    lottery-ticket check with a mask found by another run."""


class Snip(SparseFedAvg):
    """SNIP: train round 1 dense, then prune once to `target_density` by |w * g| with the
    first round's aggregated gradients; the mask then stays fixed."""

    def __init__(self, *, target_density: float, **kw) -> None:
        super().__init__(**kw)
        self.target_density = target_density

    def wants_importance(self, server_round: int) -> bool:
        return server_round == 1

    def update_mask(self, server_round, importance, fixed_importance) -> Masks | None:
        if importance is None:
            return None
        log(INFO, "round %d: SNIP prunes to density %.4f", server_round, self.target_density)
        weights = {k: self.params[k] for k in self.masks}
        return policies.snip(weights, importance, self.target_density)


class IterativeMagnitude(SparseFedAvg):
    """Magnitude pruning during FL: `steps` geometric steps from dense to `target_density`
    over the first `ramp_rounds` rounds, each removing the smallest global |w|."""

    def __init__(
        self, *, target_density: float, steps: int = 20, ramp_rounds: int = 10, **kw
    ) -> None:
        super().__init__(**kw)
        self.target_density = target_density
        self.steps = steps
        self.ramp_rounds = ramp_rounds

    def update_mask(self, server_round, importance, fixed_importance) -> Masks | None:
        density = policies.iterative_density(
            server_round, self.target_density, self.steps, self.ramp_rounds
        )
        weights = {k: self.params[k] * self.masks[k] for k in self.masks}
        return policies.magnitude(weights, self.masks, density)


class FedDST(SparseFedAvg):
    """FedDST: constant density; every `interval` rounds each layer drops its smallest-|w|
    share (delta, decaying like PruneFL's) and regrows as many by gradient magnitude."""

    def __init__(
        self, *, interval: int = 10, delta_initial: float = 0.3, delta_half_life: float = 50.0, **kw
    ) -> None:
        super().__init__(**kw)
        self.interval = interval
        self.delta_initial = delta_initial
        self.delta_half_life = delta_half_life

    def wants_importance(self, server_round: int) -> bool:
        return self.interval > 0 and server_round % self.interval == 0

    def update_mask(self, server_round, importance, fixed_importance) -> Masks | None:
        if importance is None:
            return None
        fraction = stability_delta(server_round, self.delta_initial, self.delta_half_life)
        weights = {k: self.params[k] * self.masks[k] for k in self.masks}
        return policies.prune_and_regrow(weights, self.masks, importance, fraction)


def initial_random_masks(
    params: dict[str, torch.Tensor], names: list[str], density: float, seed: int
) -> Masks:
    """FedDST's starting mask: random within each layer, at the layer densities of the
    Erdős-Rényi-Kernel rule, `density` overall."""
    shapes = {n: tuple(params[n].shape) for n in names}
    generator = torch.Generator().manual_seed(seed)
    return policies.random_masks(shapes, policies.erk_densities(shapes, density), generator)
