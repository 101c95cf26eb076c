"""Which nodes take part in a round, reproducibly from the seed.

Flower gives nodes fresh random ids in every run (in simulation and after a SuperNode
restarts), so sampling over node ids cannot be replayed. Each node is asked once, with a
"query.identify" message, for its stable client id (the `partition-id` of its node
config), and what it says is checked (`fedprune.identities`: conflicts, the federation's
size, nodes without data). A round's sample is drawn from the sorted client ids with a
generator seeded by (seed, round, purpose) alone, so it depends neither on node ids nor on
what earlier rounds drew, and a resumed run draws what the uninterrupted one did.

Before any work the run waits (up to `wait_s`) for the whole federation, so a missing node
or a bad setting fails in seconds with a message that says what to do. Afterwards a round
goes on with the nodes that are connected, as long as it has enough of them: a node that
leaves for good, or one that lies about the federation's size, does not stop the run.
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
from fedprune.identities import Identities, IdentityError, NoData

TRAIN, EVALUATE = 0, 1  # purposes: independent random streams for the two samples

# bytes of one message each way, for the strategy's traffic accounting
CountFn = Callable[[int, int, int], None]  # (node id, bytes sent, bytes received)


class NodeSampler:
    """Knows the federation's nodes by stable client id and samples them per round.

    Parameters
    ----------
    seed : int
        The run's seed; with the round it fixes every sample.
    num_clients : int
        The federation's size; 0 takes the size most nodes report (`num-partitions`).
    wait_s : float
        How long to wait for enough nodes: the whole federation before the run starts,
        then enough to sample in each round.
    identify_timeout_s : float
        How long to wait for identity replies; a node that does not answer is asked again
        in a later round and is not sampled until it answers.
    bind : bool
        Bind each client id to the first node that claims it, for good (deployment with
        node authentication: a node id is a registered key).
    """

    def __init__(
        self,
        *,
        seed: int,
        num_clients: int = 0,
        wait_s: float = 120.0,
        identify_timeout_s: float = 60.0,
        bind: bool = False,
    ) -> None:
        self.seed, self.wait_s, self.identify_timeout_s = seed, wait_s, identify_timeout_s
        self.identities = Identities(num_clients, bind)
        self._asked_in: dict[int, int] = {}  # node id -> round it was last asked (unanswered)
        self._warned_unstable = False

    @property
    def client_ids(self) -> dict[int, int]:
        """node id -> the client id it holds."""
        return self.identities.client_of

    # ------------------------------------------------------------------ identities
    def identify(self, grid: Grid, node_ids: list[int], server_round: int, count: CountFn) -> None:
        """Ask the nodes not yet identified for their identity (one query each, batched);
        a node that did not answer is asked again in a later round, not while waiting."""
        ids = self.identities
        unknown = [
            n for n in node_ids if not ids.known(n) and self._asked_in.get(n) != server_round
        ]
        if not unknown:
            return
        self._asked_in.update(dict.fromkeys(unknown, server_round))
        answered = 0
        messages = query_messages(P.IDENTIFY_ACTION, unknown, server_round, count)
        for msg in grid.send_and_receive(messages, timeout=self.identify_timeout_s):
            node_id = msg.metadata.src_node_id
            if node_id not in unknown:
                continue  # an error the SuperLink wrote for a vanished node, say
            if msg.has_content():
                count(node_id, 0, sum(r.count_bytes() for r in msg.content.values()))
            try:
                ids.record(node_id, dict(reply_config(msg, P.IDENTITY)), node_ids)
                answered += 1
            except NoData as exc:
                log(WARNING, "round %d: node %d is left out: %s", server_round, node_id, exc)
            except (IdentityError, ValueError, TypeError) as exc:
                log(WARNING, "round %d: bad identity from node %d: %s", server_round, node_id, exc)
            self._asked_in.pop(node_id, None)
        self._log_events(server_round)
        log(INFO, "round %d: identified %d of %d new nodes (%d known)",
            server_round, answered, len(unknown), len(ids.client_of))  # fmt: skip

    def _log_events(self, server_round: int) -> None:
        for event in self.identities.take_events():
            log(WARNING, "round %d: %s", server_round, event)
        if self.identities.unstable and not self._warned_unstable:
            self._warned_unstable = True
            log(WARNING, "a node has no partition-id in its node config: it is sampled by its "
                "Flower node id, which changes between runs (give each SuperNode "
                "--node-config 'partition-id=N' for replayable sampling)")  # fmt: skip

    # ------------------------------------------------------------------ population
    def federation(self, grid: Grid, sample_size: int, count: CountFn) -> dict[int, int]:
        """The whole federation, before any work: wait (up to `wait_s`) until as many
        nodes as it has are identified (less those that answered but cannot take part or
        contest a client id);
        a RuntimeError that says what to start or change otherwise. Where no node reports
        the federation's size and `num_clients` is 0, it waits for `sample_size` nodes."""
        ids, deadline = self.identities, time.monotonic() + self.wait_s
        while True:
            connected = sorted(grid.get_node_ids())
            population = self._current(grid, connected, 0, count)
            # Nodes in an unresolved client-id conflict are not sampled either: one node
            # claiming another's id must not stall the start (it is logged instead).
            contested = sum(len(rivals) for rivals in ids.conflicts.values())
            unusable = len(ids.without_data) + len(ids.refused) + contested
            if ids.without_data and not population and all(ids.known(n) for n in connected):
                self._no_data_error()
            size = ids.federation_size()
            target = max(size - unusable, 1) if size else max(sample_size, 1)
            if len(population) >= target:
                return population
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(population)} identified nodes with data after "
                    f"{self.wait_s:.0f} s, but the run needs {target} (num-clients = "
                    f"{ids.num_clients or 'auto'}, clients-per-round = {sample_size or 'all'}):"
                    f" start more SuperNodes (in simulation: --federation-config "
                    f"'num-supernodes={target}') or lower num-clients / clients-per-round"
                )
            time.sleep(0.5)

    def population(
        self, grid: Grid, server_round: int, minimum: int, count: CountFn
    ) -> dict[int, int]:
        """client id -> node id of the nodes that may be sampled now; waits (up to
        `wait_s`) only while fewer than `minimum` are connected."""
        deadline = time.monotonic() + self.wait_s
        while len(population := self._current(grid, None, server_round, count)) < minimum:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"round {server_round}: only {len(population)} nodes can be sampled after "
                    f"{self.wait_s:.0f} s, fewer than the {minimum} a round needs (min-replies)"
                )
            time.sleep(0.5)
        return population

    def _current(self, grid: Grid, connected, server_round: int, count: CountFn) -> dict[int, int]:
        connected = sorted(grid.get_node_ids()) if connected is None else connected
        self.identify(grid, connected, server_round, count)
        population = self.identities.population(connected)
        self._log_events(server_round)
        return population

    def _no_data_error(self) -> None:
        node_id, reason = next(iter(self.identities.without_data.items()))
        raise RuntimeError(
            f"none of the {len(self.identities.without_data)} nodes that answered can train, "
            f"e.g. node {node_id}: {reason}. Check the data settings (partitioner, "
            "dirichlet-alpha, the number of clients) or the nodes' data-path"
        )

    def draw(
        self, by_client: dict[int, int], server_round: int, sample_size: int, purpose: int = TRAIN
    ) -> list[int]:
        """`sample_size` node ids of the population `by_client`, in client-id order, drawn
        by (seed, round, purpose) alone; all of them if it has no more (or size is 0)."""
        clients = sorted(by_client)
        if sample_size == 0 or sample_size >= len(clients):
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
