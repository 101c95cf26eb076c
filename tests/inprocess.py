"""Drive the PruneFL strategy and the ClientApp handlers in one process, without Ray.

Flower 1.41 needs a task identity before a Message can be built; the reply's source node
is taken from it, so each node's handler runs with its own node id set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

import clients.client_app as client_app
from fedprune import protocol as P
from fedprune.masks import full_masks
from fedprune.models import build_model, prunable_names
from fedprune.settings import Settings

TaskIdentity.task_id = 1
TaskIdentity.run_id = 1
TaskIdentity.node_id = 0


class FakeGrid:
    """The part of Flower's Grid that strategies call while configuring a round
    (`send_and_receive` delivers through `deliver`, e.g. profile queries)."""

    def __init__(self, node_ids: list[int], deliver=None) -> None:
        self.node_ids = node_ids
        self._deliver = deliver
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        messages = list(messages)
        self.sent.extend(messages)
        return self._deliver(messages)


HANDLERS = {
    "train": client_app.train,
    "evaluate": client_app.evaluate,
    f"query.{P.PROFILE_ACTION}": client_app.profile,
    f"query.{P.IDENTIFY_ACTION}": client_app.identify,
}


@dataclass
class Federation:
    """Nodes with their own Context (state persists across rounds, as on a SuperNode)."""

    settings: Settings
    num_nodes: int
    first_node_id: int = 100  # Flower's node ids are arbitrary; partition ids are 0..n-1
    contexts: dict[int, Context] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i in range(self.num_nodes):
            node_id = self.first_node_id + i
            self.contexts[node_id] = Context(
                run_id=1,
                node_id=node_id,
                node_config={"partition-id": i, "num-partitions": self.num_nodes},
                state=RecordDict(),
                run_config=self.settings.to_run_config(),
            )

    @property
    def grid(self) -> FakeGrid:
        return FakeGrid(list(self.contexts), self.deliver)

    errors_as_replies = False

    def deliver(self, messages) -> list[Message]:
        """Run each message's handler on its node and collect the replies."""
        replies = []
        for msg in messages:
            handler = HANDLERS[msg.metadata.message_type]
            replies.append(self.call(handler, msg, msg.metadata.dst_node_id))
        return replies

    def call(self, handler, msg: Message, node_id: int) -> Message:
        """`handler`'s reply on node `node_id`. With `errors_as_replies` an exception
        becomes an error reply, as Flower's ClientApp runner turns it into one; else it
        propagates, for tests that check the ClientApp refuses something."""
        TaskIdentity.node_id = node_id
        try:
            return handler(msg, self.contexts[node_id])
        except Exception as exc:
            if not self.errors_as_replies:
                raise
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(exc))
            return Message(error, reply_to=msg)
        finally:
            TaskIdentity.node_id = 0

    def train_round(self, strategy, server_round: int, tamper=None):
        """One training round; `tamper(replies)` may corrupt replies before aggregation."""
        config = ConfigRecord({P.LEARNING_RATE: self.settings.learning_rate})
        messages = list(strategy.configure_train(server_round, None, config, self.grid))
        replies = self.deliver(messages)
        if tamper is not None:
            replies = tamper(replies)
        return messages, replies, strategy.aggregate_train(server_round, replies)


def small_cnn_start(density: float = 0.5, seed: int = 0):
    """(weights, random masks at `density`, prunable names) of the small CNN: a strategy's
    starting point in tests."""
    model = build_model("small-cnn", seed=seed)
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(m.shape, generator=g) < density for n, m in full_masks(model).items()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return params, masks, prunable_names(model)
