"""How many examples the server believes a node holds: what it claims, bounded by what the
server expects of it.

A reply's `num-examples` weighs the node's kept values in the mean (its importance is
scaled by the samples its round processed, K x B, not by this count: `fedprune.training`).
A node that claims more than it holds would steer the mean, so the count used is

    min(claimed, the node's expected size, max-examples-per-node, MAX_NUM_EXAMPLES)

where the expected size is known when the nodes hold the configured split (simulation, or
`clients.prepare_data` folders): then it is the size of the node's own partition, which the
server computes from the same split (`fedprune.partition_cache.partition_sizes`), never what a node
reports.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedprune.replies import MAX_NUM_EXAMPLES


class ExampleBounds:
    """The most examples the server believes of each node.

    expected: client id -> examples the server expects that node to hold (its partition
        of the configured split); a client id missing here has no size of its own.
    limit: the bound for every node (`max-examples-per-node`); 0: none below
        MAX_NUM_EXAMPLES.
    """

    def __init__(self, expected: Mapping[int, int] | None = None, limit: int = 0) -> None:
        if limit < 0:
            raise ValueError(f"limit = {limit} must be >= 0")
        if any(n < 1 for n in (expected or {}).values()):
            raise ValueError("every expected size must be positive")
        self.expected = dict(expected or {})
        self.limit = limit

    def bound(self, client_id: int | None) -> int:
        """The most examples counted for the node holding `client_id` (None: unknown)."""
        bounds = [MAX_NUM_EXAMPLES]
        if self.limit:
            bounds.append(self.limit)
        if client_id in self.expected:
            bounds.append(self.expected[client_id])
        return min(bounds)

    def count(self, client_id: int | None, claimed: int) -> int:
        """The examples a reply claiming `claimed` is counted for."""
        return min(claimed, self.bound(client_id))
