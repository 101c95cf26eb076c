"""PruneFL: every few rounds, re-solve which parameters to keep from the clients' summed
importance and the round-time model (fedprune.reconfigure)."""

from __future__ import annotations

from logging import INFO

import torch
from flwr.common.logger import log

from fedprune.masks import Masks
from fedprune.reconfigure import reconfigure, stability_delta
from strategies.sparse_fedavg import SparseFedAvg


class PruneFL(SparseFedAvg):
    """PruneFL's phase 2 (the server's initial pruning runs before, in the ServerApp).

    Parameters (besides SparseFedAvg's)
    ----------
    reconfig_interval : int (default: 10)
        Reconfigure every this many rounds; 0 never reconfigures.
    delta_initial, delta_half_life : float (default: 0.3, 50 rounds)
        Stability rule: delta = delta_initial * 0.5 ** (round / delta_half_life).
    max_density : float (default: 1.0)
        Upper bound on the kept fraction of prunable weights.
    """

    def __init__(
        self,
        *,
        reconfig_interval: int = 10,
        delta_initial: float = 0.3,
        delta_half_life: float = 50.0,
        max_density: float = 1.0,
        **kw,
    ) -> None:
        super().__init__(**kw)
        self.reconfig_interval = reconfig_interval
        self.delta_initial = delta_initial
        self.delta_half_life = delta_half_life
        self.max_density = max_density

    def wants_importance(self, server_round: int) -> bool:
        return self.reconfig_interval > 0 and server_round % self.reconfig_interval == 0

    def update_mask(
        self, server_round: int, importance: dict[str, torch.Tensor] | None, fixed_importance: float
    ) -> Masks | None:
        if importance is None:
            return None
        delta = stability_delta(server_round, self.delta_initial, self.delta_half_life)
        # With measured costs, self.profile is this round's slowest sampled node.
        result = reconfigure(
            {k: self.params[k] * self.masks[k] for k in self.masks},
            self.masks,
            importance,
            self.profile.time_per_param(),
            self.profile.fixed_time_s(self.never_pruned),
            fixed_importance=fixed_importance,
            delta=delta,
            max_density=self.max_density,
            allow_regrowth=True,
        )
        log(
            INFO,
            "round %d: PruneFL reconfiguration (delta %.3f, cost profile %s): objective "
            "%.4g per s, modelled round %.2f s",
            server_round,
            delta,
            self.profile.name,
            result.objective,
            result.round_time_s,
        )
        return result.masks
