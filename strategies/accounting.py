"""What each round cost: bytes of the records really sent and received, per node and in
total, replies kept and dropped, and the devices' measured compute time."""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import Message, RecordDict


def content_bytes(content: RecordDict) -> int:
    """Bytes of all records in a message's content, as Flower serialises them."""
    return sum(record.count_bytes() for record in content.values())


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
    importance_tracked: bool = False
    replies: int = 0
    dropped: int = 0
    masks_sent: int = 0
    mask_changes_sent: int = 0
    reconfigured: bool = False
    per_node_bytes: dict[int, int] = field(default_factory=dict)
    # Per replying node: the format each prunable layer trained in (weight name -> format).
    layer_formats: dict[int, dict[str, str]] = field(default_factory=dict)

    def count(self, node_id: int, sent: int = 0, received: int = 0) -> None:
        self.bytes_down += sent
        self.bytes_up += received
        self.per_node_bytes[node_id] = self.per_node_bytes.get(node_id, 0) + sent + received

    def count_reply(self, msg: Message) -> None:
        if msg.has_content():
            self.count(msg.metadata.src_node_id, received=content_bytes(msg.content))

    def busiest_node_bytes(self) -> int:
        return max(self.per_node_bytes.values(), default=0)
