"""What each round cost: bytes of the records really sent and received, per node and in
total, replies kept and dropped, and the devices' measured compute time."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message, RecordDict


def content_bytes(content: RecordDict) -> int:
    """Bytes of all records in a message's content, as Flower serialises them."""
    return sum(record.count_bytes() for record in content.values())


def bytes_by_kind(content: RecordDict) -> Counter:
    """`content_bytes` split by what the bytes carry: each array by its key's prefix (the
    wire's kinds, docs/wire.md: `v` values, `vq` quantised values, `m` masks, `md` mask
    changes, `g` / `gc` importance), each other record by its type (`config`, `metric`).
    An array counts its key and its serialised data, as Flower's ArrayRecord does."""
    kinds: Counter = Counter()
    for record in content.values():
        if isinstance(record, ArrayRecord):
            for key, array in record.items():
                kinds[key.split("/", 1)[0]] += len(key) + len(array.data)
        else:
            kinds[type(record).__name__.removesuffix("Record").lower()] += record.count_bytes()
    return kinds


@dataclass
class RoundStats:
    """One round's traffic and outcome, from the records really sent and received.

    device_round_s is the slowest replying node's measured compute time (seconds), the
    part of a synchronous round the devices themselves take; sim_time_s the modelled
    round time (cost model, slowest node).
    """

    bytes_down: int = 0
    bytes_up: int = 0
    sim_time_s: float = 0.0
    device_round_s: float = 0.0
    # The largest peak memory a replying node measured in its handler (MB; None: none said)
    node_peak_memory_mb: float | None = None
    importance_tracked: bool = False
    replies: int = 0
    dropped: int = 0
    masks_sent: int = 0
    mask_changes_sent: int = 0
    reconfigured: bool = False
    per_node_bytes: dict[int, int] = field(default_factory=dict)
    # Per replying node: the format each prunable layer trained in (weight name -> format).
    layer_formats: dict[int, dict[str, str]] = field(default_factory=dict)
    # Bytes by kind (`bytes_by_kind`; queries and their answers as "query"), each way.
    down_by_kind: Counter = field(default_factory=Counter)
    up_by_kind: Counter = field(default_factory=Counter)

    def count(self, node_id: int, sent: int = 0, received: int = 0) -> None:
        """Bytes of a query sent to a node, or of its answer."""
        self._count(node_id, sent, received)
        self.down_by_kind["query"] += sent
        self.up_by_kind["query"] += received

    def count_sent(self, node_id: int, content: RecordDict) -> None:
        kinds = bytes_by_kind(content)
        self._count(node_id, sent=sum(kinds.values()))
        self.down_by_kind.update(kinds)

    def count_reply(self, msg: Message) -> None:
        if msg.has_content():
            kinds = bytes_by_kind(msg.content)
            self._count(msg.metadata.src_node_id, received=sum(kinds.values()))
            self.up_by_kind.update(kinds)

    def _count(self, node_id: int, sent: int = 0, received: int = 0) -> None:
        self.bytes_down += sent
        self.bytes_up += received
        self.per_node_bytes[node_id] = self.per_node_bytes.get(node_id, 0) + sent + received

    def busiest_node_bytes(self) -> int:
        return max(self.per_node_bytes.values(), default=0)
