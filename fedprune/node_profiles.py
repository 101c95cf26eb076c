"""The server's record of each node's measured device profile.

A node measures its own costs once (`fedprune.profiler`) and reports them when first
asked; the server checks the report, keeps one `CostProfile` per node, and models a round
with the element-wise slowest profile of the nodes sampled for it (a synchronous round
waits for its slowest node). Until any sampled node has answered, a prior profile (the
paper's constants) stands in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fedprune.costs import CostProfile, slowest
from fedprune.profiler import profile_from_measurements


class NodeProfiles:
    """Checked device profiles by node id, and the prior used where there is none."""

    def __init__(self, prior: CostProfile, prunable: Sequence[str]) -> None:
        self.prior = prior
        self.prunable = list(prunable)
        self.by_node: dict[int, CostProfile] = {}
        self.queries: dict[int, int] = {}  # node id -> profile queries sent

    def missing(self, node_ids: Iterable[int]) -> list[int]:
        """The nodes among `node_ids` without a profile yet (each counted as asked)."""
        missing = [n for n in node_ids if n not in self.by_node]
        for n in missing:
            self.queries[n] = self.queries.get(n, 0) + 1
        return missing

    def add(self, node_id: int, measurements: Mapping[str, Any]) -> None:
        """Keep a node's profile from its reported measurements; ValueError (or KeyError,
        TypeError) if they are not a usable profile of this model."""
        profile = profile_from_measurements(measurements)
        if set(profile.compute_s_per_param) != set(self.prunable):
            raise ValueError(
                f"profile layers {sorted(profile.compute_s_per_param)} are not the model's "
                f"prunable layers {sorted(self.prunable)}"
            )
        profile.check()  # finite, non-negative costs and a positive link
        self.by_node[node_id] = dataclasses.replace(profile, name=f"measured-node-{node_id}")

    def for_round(self, node_ids: Iterable[int]) -> CostProfile | None:
        """The element-wise slowest profile of the nodes that have one; None if none has
        (the caller then uses `prior` and says so)."""
        profiles = [self.by_node[n] for n in node_ids if n in self.by_node]
        return slowest(profiles) if profiles else None

    def to_dict(self) -> dict[str, dict]:
        return {str(n): p.to_dict() for n, p in sorted(self.by_node.items())}
