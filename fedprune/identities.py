"""Who the nodes say they are, and what the server believes of it.

Flower gives nodes fresh ids in every run, so each node tells the server once its stable
client id (its `partition-id`), the federation's size as it knows it (`num-partitions`)
and how many examples it holds. None of it is taken on trust:

- A client id is bound to the first node that claims it. A second live node claiming
  the same id is a conflict: both are logged, and neither is sampled until one of them
  has left. With `bind` (deployment with node authentication, where a node id is a
  registered key) the binding is for good: a later claim from another node is refused.
  Without it, a node that restarted comes back under a new node id, so a claim on an id
  whose node has left moves the id to the new node.
- The federation's size is the server's setting (`num-clients`) when given; otherwise
  the size most nodes report, not the largest (one node cannot make the server wait for
  nodes that do not exist).
- A node that cannot load its data, or holds none, is never sampled.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from fedprune.protocol import DATA_ERROR, NUM_EXAMPLES, NUM_PARTITIONS, PARTITION_ID


class IdentityError(ValueError):
    """An identity that cannot be used (malformed, or refused); the text says why."""


class NoData(IdentityError):
    """A node that answered but cannot train: no data, or none it can load."""


def _non_negative_int(record: Mapping[str, Any], key: str, positive: bool = False) -> int | None:
    value = record.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < int(positive):
        raise IdentityError(f"{key} = {value!r} is not an integer >= {int(positive)}")
    return value


class Identities:
    """Client ids by node id, with conflicts, reported sizes and example counts."""

    def __init__(self, num_clients: int = 0, bind: bool = False) -> None:
        self.num_clients = num_clients
        self.bind = bind
        self.client_of: dict[int, int] = {}  # node id -> client id it holds
        self.holder: dict[int, int] = {}  # client id -> node id bound to it
        self.conflicts: dict[int, set[int]] = {}  # client id -> rival node ids
        self.reported_size: dict[int, int] = {}  # node id -> num-partitions it reported
        self.examples: dict[int, int] = {}  # client id -> examples its node reported
        self.without_data: dict[int, str] = {}  # node id -> why it cannot train
        self.refused: dict[int, str] = {}  # node id -> why its claim was refused
        self.unstable = False  # some node has no partition-id (sampled by node id)
        self.events: list[str] = []  # what the caller should log, in order

    def record(self, node_id: int, identity: Mapping[str, Any], live: Iterable[int]) -> None:
        """Take `node_id`'s identity reply; `live` are the nodes connected now. Raises
        NoData for a node that cannot train and IdentityError for a bad or refused
        claim; otherwise the node holds (or contests) a client id afterwards."""
        if DATA_ERROR in identity:
            self.without_data[node_id] = f"it cannot load its data: {identity[DATA_ERROR]}"
            raise NoData(self.without_data[node_id])
        examples = _non_negative_int(identity, NUM_EXAMPLES)
        if examples == 0:
            self.without_data[node_id] = "it holds no training examples"
            raise NoData(self.without_data[node_id])
        size = _non_negative_int(identity, NUM_PARTITIONS, positive=True)
        client_id = _non_negative_int(identity, PARTITION_ID)
        if client_id is None:  # sampled by its node id: not replayable across runs
            self.unstable, client_id = True, node_id
        self._claim(node_id, client_id, set(live))
        if size is not None:
            self.reported_size[node_id] = size
        if examples is not None:
            self.examples[client_id] = examples

    def _claim(self, node_id: int, client_id: int, live: set[int]) -> None:
        holder = self.holder.get(client_id)
        if holder is None or holder == node_id:
            self.holder[client_id], self.client_of[node_id] = node_id, client_id
            return
        if self.bind:
            self.refused[node_id] = f"it claims client id {client_id}, bound to node {holder}"
            raise IdentityError(f"{self.refused[node_id]}: refused")
        if holder in live:
            self.conflicts.setdefault(client_id, set()).update({holder, node_id})
            self.client_of[node_id] = client_id
            self.events.append(
                f"client id {client_id} is claimed by nodes {holder} and {node_id}: "
                "neither is sampled until one of them leaves"
            )
            return
        self.events.append(f"client id {client_id} moves from node {holder} (gone) to {node_id}")
        self.client_of.pop(holder, None)
        self.holder[client_id], self.client_of[node_id] = node_id, client_id

    def federation_size(self) -> int:
        """`num_clients` if set, else the size most nodes report (the smaller on a tie),
        else 0 (unknown)."""
        if self.num_clients:
            return self.num_clients
        counts = Counter(self.reported_size.values())
        if not counts:
            return 0
        return min(counts, key=lambda size: (-counts[size], size))

    def population(self, live: Iterable[int]) -> dict[int, int]:
        """client id -> node id of the live nodes that may be sampled: identified, with
        data, not in an unresolved conflict. A conflict resolves once one rival is gone."""
        live = set(live)
        for client_id, rivals in list(self.conflicts.items()):
            present = rivals & live
            if len(present) <= 1:
                del self.conflicts[client_id]
                for node_id in rivals - present:
                    self.client_of.pop(node_id, None)
                if present:
                    (winner,) = present
                    self.holder[client_id] = winner
                    self.events.append(f"client id {client_id}: conflict resolved, node {winner}")
        return {
            client_id: node_id
            for node_id, client_id in sorted(self.client_of.items())
            if node_id in live
            and client_id not in self.conflicts
            and self.holder.get(client_id) == node_id
        }

    def known(self, node_id: int) -> bool:
        """Whether the node has answered usefully (it need not be asked again)."""
        return node_id in self.client_of or node_id in self.without_data or node_id in self.refused

    def take_events(self) -> list[str]:
        events, self.events = self.events, []
        return events


def clients_of_node(total: int, partition_id: int, num_partitions: int) -> list[int]:
    """The client ids node `partition_id` of `num_partitions` trains as when a simulation
    stands for `total` clients (setting `simulated-clients`): its own id, then every
    `num_partitions`-th after it below `total`, so that the nodes share the ids 0 ..
    total - 1 out exactly (node 0 of 2 for 10 clients: 0, 2, 4, 6, 8). Just its own id
    when the federation has at least `total` nodes."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition id {partition_id} is not in 0 .. {num_partitions - 1}")
    return list(range(partition_id, max(total, partition_id + 1), num_partitions))
