"""Flower's records on the server side: what goes into a message, what comes out of a reply.

The model's ArrayRecord is encoded once per model version and shared by every message that
carries it (`ModelPayloads`); a reply is taken apart into plain dicts (`reply_parts`) for
the checks in `fedprune.replies`, which know nothing of Flower.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedprune import protocol as P
from fedprune.codec import encode_model
from fedprune.global_model import GlobalModel
from fedprune.node_profiles import NodeProfiles
from fedprune.node_state import CHANGE, NONE, VALUE_CHANGE
from fedprune.replies import ReplyError
from fedprune.value_code import ValueReference
from strategies.accounting import RoundStats
from strategies.node_sampling import query_messages


def reply_parts(msg: Message) -> tuple[dict | None, dict]:
    """(arrays, metrics) of a reply as plain dicts (arrays None if it has no ArrayRecord);
    ReplyError for an error reply or one without a MetricRecord."""
    if msg.has_error():
        raise ReplyError(f"client error: {msg.error.reason}")
    metrics = msg.content.get(P.METRICS)
    if not isinstance(metrics, MetricRecord):
        raise ReplyError(f"no MetricRecord under {P.METRICS!r}")
    record = msg.content.get(P.ARRAYS)
    arrays = {k: record[k].numpy() for k in record} if isinstance(record, ArrayRecord) else None
    return arrays, dict(metrics)


@dataclass
class SentRound:
    """What a round sent: the mask version and the messages themselves (Flower fills in
    their ids when it pushes them)."""

    version: int = 0
    messages: list[Message] = field(default_factory=list)
    # The destination nodes, once: `node_of` runs for every reply of the round.
    nodes: set[int] = field(init=False)

    def __post_init__(self) -> None:
        self.nodes = {msg.metadata.dst_node_id for msg in self.messages}

    def node_of(self, reply: Message) -> int | None:
        """The node a reply is about: its sender, if this round asked it. An error the
        SuperLink writes on a node's behalf (Node Unavailable when the node missed its
        heartbeats) comes from the SuperLink, so it is matched to the node by the message
        it answers. None for a reply this round did not ask for."""
        src = reply.metadata.src_node_id
        if src in self.nodes:
            return src
        if reply.has_error():
            asked = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in self.messages}
            return asked.get(reply.metadata.reply_to_message_id)
        return None


class ModelPayloads:
    """The global model's ArrayRecord in each of its three forms (`fedprune.node_state`):
    kept values only (NONE), with the whole mask (FULL), or with the change from the
    previous mask version (CHANGE), each encoded once per model version: any change to the
    weights or the mask is a new version, so a payload is never stale, and one round's
    messages share one encoding."""

    def __init__(self, model: GlobalModel) -> None:
        self.model = model
        self._cache: dict[tuple[int, str], ArrayRecord] = {}

    def arrays(self, form: str, reference: ValueReference | None = None) -> ArrayRecord:
        """The payload of `form`; with a `reference` (the value-code setting, train
        messages), its values instead of the global ones, and for VALUE_CHANGE its change
        from the previous reference."""
        key = (self.model.model_version, form, reference.version if reference else 0)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if (k[0], k[2]) == (key[0], key[2])}
            model = self.model
            if form == VALUE_CHANGE:
                arrays = reference.change
            else:
                held = model.previous_masks if form == CHANGE else None
                params = (
                    model.params
                    if reference is None
                    else reference.dense(model.params, model.masks)
                )
                arrays = encode_model(
                    params,
                    model.masks,
                    include_masks=form != NONE,
                    held_masks=held,
                    kept_index={name: model.kept_index(name) for name in model.masks},
                )
            self._cache[key] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return self._cache[key]


def query_profiles(
    grid: Grid,
    profiles: NodeProfiles,
    node_ids: list[int],
    server_round: int,
    stats: RoundStats,
    timeout_s: float,
) -> None:
    """Ask the nodes among `node_ids` that have no device profile yet for theirs (a
    "query.profile" message each) and keep the valid answers; a bad one is logged."""
    missing = profiles.missing(node_ids)
    if not missing:
        return
    queries = query_messages(P.PROFILE_ACTION, missing, server_round, stats.count)
    for msg in grid.send_and_receive(queries, timeout=timeout_s):
        stats.count_reply(msg)
        node_id = msg.metadata.src_node_id
        try:
            if node_id not in missing:
                raise ValueError("a profile this round did not ask this node for")
            if msg.has_error():
                raise ValueError(f"client error: {msg.error.reason}")
            record = msg.content.get(P.PROFILE)
            if not isinstance(record, ConfigRecord):
                raise ValueError(f"no ConfigRecord under {P.PROFILE!r}")
            profiles.add(node_id, dict(record))
        except (ValueError, TypeError, KeyError) as exc:
            log(
                WARNING,
                "round %d: dropped profile reply from node %d: %s",
                server_round,
                node_id,
                exc,
            )
