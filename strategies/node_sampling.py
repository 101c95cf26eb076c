"""Which nodes take part in a round, reproducibly from the seed.

Flower gives nodes fresh random ids in every run (in simulation and after a SuperNode
restarts), so sampling over node ids cannot be replayed. Here each node is asked once,
with a "query.identify" message, for its stable client id: the `partition-id` of its node
config (the simulation sets it; a real SuperNode is given one with `--node-config`). A
round's sample is then drawn from the sorted client ids with a generator seeded by
(seed, round, purpose) alone, so it depends neither on node ids nor on what earlier rounds
drew, and a resumed run draws what the uninterrupted one did.

What is kept per node is one small record: its client id (and, in the strategy, the mask
version it holds). Nothing else grows with the number of nodes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedprune import protocol as P

TRAIN, EVALUATE = 0, 1  # purposes: independent random streams for the two samples

# bytes of one message each way, for the strategy's traffic accounting
CountFn = Callable[[int, int, int], None]  # (node id, bytes sent, bytes received)


class NoDataError(ValueError):
    """A node answered its identity query but cannot train: no data, or none it can load."""


class NodeSampler:
    """Knows the federation's nodes by stable client id and samples them per round.

    Parameters
    ----------
    seed : int
        The run's seed; with the round it fixes every sample.
    num_clients : int
        The federation's size: how many nodes to wait for before sampling. 0 takes the
        largest `num-partitions` the nodes report (the simulation's num-supernodes), or,
        if none reports one, the sample size.
    wait_s : float
        How long to wait for that many nodes to connect before failing with a message.
    identify_timeout_s : float
        How long to wait for identity replies; a node that does not answer is asked again
        on the next round and is not sampled until it answers.
    """

    def __init__(
        self,
        *,
        seed: int,
        num_clients: int = 0,
        wait_s: float = 120.0,
        identify_timeout_s: float = 60.0,
    ) -> None:
        self.seed = seed
        self.num_clients = num_clients
        self.wait_s = wait_s
        self.identify_timeout_s = identify_timeout_s
        self.client_ids: dict[int, int] = {}  # node id -> stable client id
        self.reported_size = 0  # largest num-partitions a node reported
        self._warned_unstable = False
        self._asked_in: dict[int, int] = {}  # node id -> round it was last asked (unanswered)
        self.without_data: set[int] = set()  # nodes that answered but cannot load data

    # ------------------------------------------------------------------ identities
    def identify(self, grid: Grid, node_ids: list[int], server_round: int, count: CountFn) -> None:
        """Ask the nodes without a known client id for theirs (one query each, batched);
        a node that did not answer is asked again in a later round, not while waiting."""
        unknown = [
            n
            for n in node_ids
            if n not in self.client_ids
            and n not in self.without_data
            and self._asked_in.get(n) != server_round
        ]
        if not unknown:
            return
        messages = query_messages(P.IDENTIFY_ACTION, unknown, server_round, count)
        asked = set(unknown)
        self._asked_in.update(dict.fromkeys(unknown, server_round))
        without_data = {}
        for msg in grid.send_and_receive(messages, timeout=self.identify_timeout_s):
            node_id = msg.metadata.src_node_id
            if node_id not in asked:
                continue  # an error the SuperLink wrote for a vanished node, say
            if msg.has_content():
                count(node_id, 0, sum(r.count_bytes() for r in msg.content.values()))
            try:
                self.client_ids[node_id] = self._client_id(msg, node_id)
                self._asked_in.pop(node_id, None)
            except NoDataError as exc:  # answered, but cannot train: never sampled
                without_data[node_id] = str(exc)
                self.without_data.add(node_id)
                log(WARNING, "round %d: node %d is left out: %s", server_round, node_id, exc)
            except (ValueError, TypeError, KeyError) as exc:
                log(
                    WARNING,
                    "round %d: bad identity reply from node %d: %s",
                    server_round,
                    node_id,
                    exc,
                )
        if without_data and not asked & set(self.client_ids):
            node_id, reason = next(iter(without_data.items()))
            raise RuntimeError(
                f"none of the {len(without_data)} nodes that answered can train, e.g. node "
                f"{node_id}: {reason}. Check the data settings (partitioner, "
                "dirichlet-alpha, the number of clients) or the nodes' data-path"
            )
        log(
            INFO,
            "round %d: identified %d of %d new nodes (%d known)",
            server_round,
            len(asked & set(self.client_ids)),
            len(asked),
            len(self.client_ids),
        )

    def _client_id(self, msg: Message, node_id: int) -> int:
        record = reply_config(msg, P.IDENTITY)
        if P.DATA_ERROR in record:
            raise NoDataError(f"it cannot load its data: {record[P.DATA_ERROR]}")
        if record.get(P.NUM_EXAMPLES) == 0:
            raise NoDataError("it holds no training examples")
        size = record.get(P.NUM_PARTITIONS)
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ValueError(f"{P.NUM_PARTITIONS} = {size!r} is not a positive integer")
            self.reported_size = max(self.reported_size, size)
        client_id = record.get(P.PARTITION_ID)
        if client_id is None:
            if not self._warned_unstable:
                log(
                    WARNING,
                    "node %d has no partition-id in its node config: it is sampled by its "
                    "Flower node id, which changes between runs (give each SuperNode "
                    "--node-config 'partition-id=N' for replayable sampling)",
                    node_id,
                )
                self._warned_unstable = True
            return node_id
        if not isinstance(client_id, int) or isinstance(client_id, bool) or client_id < 0:
            raise ValueError(f"{P.PARTITION_ID} = {client_id!r} is not an integer >= 0")
        return client_id

    # ------------------------------------------------------------------ population
    def target_size(self, sample_size: int) -> int:
        """How many nodes the federation has (and the sampler waits for)."""
        return self.num_clients or self.reported_size or sample_size

    def population(
        self, grid: Grid, server_round: int, sample_size: int, count: CountFn
    ) -> dict[int, int]:
        """client id -> node id of the identified connected nodes, once the federation's
        size of them are connected (waiting up to `wait_s`)."""
        deadline = time.monotonic() + self.wait_s
        while True:
            connected = sorted(grid.get_node_ids())
            self.identify(grid, connected, server_round, count)
            by_client: dict[int, int] = {}
            for node_id in connected:  # sorted: a duplicated client id keeps its lowest node
                if node_id in self.client_ids:
                    by_client.setdefault(self.client_ids[node_id], node_id)
            target = max(self.target_size(sample_size), sample_size)
            if len(by_client) >= target:
                return by_client
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(by_client)} identified nodes after {self.wait_s:.0f} s, but "
                    f"the run needs {target} (num-clients = {self.num_clients or 'auto'}, "
                    f"{sample_size} sampled per round): start more SuperNodes (in "
                    f"simulation: --federation-config 'num-supernodes={target}') or lower "
                    "num-clients / clients-per-round"
                )
            time.sleep(0.5)

    def draw(
        self, by_client: dict[int, int], server_round: int, sample_size: int, purpose: int = TRAIN
    ) -> list[int]:
        """`sample_size` node ids of the population `by_client`, in client-id order, drawn
        by (seed, round, purpose) alone; all of them if it has no more."""
        clients = sorted(by_client)
        if sample_size >= len(clients):
            chosen = clients
        else:
            rng = np.random.default_rng([self.seed, server_round, purpose])
            picks = rng.choice(len(clients), size=sample_size, replace=False)
            chosen = [clients[i] for i in sorted(picks)]
        return [by_client[c] for c in chosen]


def query_messages(
    action: str, node_ids: list[int], server_round: int, count: CountFn
) -> list[Message]:
    """One "query.<action>" message per node (content: the round), counted as sent."""
    messages = []
    for node_id in node_ids:
        content = RecordDict({P.CONFIG: ConfigRecord({P.SERVER_ROUND: server_round})})
        count(node_id, sum(r.count_bytes() for r in content.values()), 0)
        messages.append(
            Message(
                content=content,
                message_type=f"{MessageType.QUERY}.{action}",
                dst_node_id=node_id,
            )
        )
    return messages


def reply_config(msg: Message, key: str) -> ConfigRecord:
    """The ConfigRecord under `key` of a query reply; ValueError if the node sent an error
    or no such record."""
    if msg.has_error():
        raise ValueError(f"client error: {msg.error.reason}")
    record = msg.content.get(key)
    if not isinstance(record, ConfigRecord):
        raise ValueError(f"no ConfigRecord under {key!r}")
    return record


def fraction_size(fraction: float, population: int, minimum: int = 1) -> int:
    """`fraction` of `population` nodes, rounded up, at least `minimum`."""
    return max(minimum, math.ceil(fraction * population - 1e-9))
