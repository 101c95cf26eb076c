"""The compression-only reference: FedAvg on the dense model with top-k sparsified updates
and error feedback (`fedprune.topk`), in the style of Sattler et al.'s sparse ternary
compression. It answers the question a reader asks first: is pruning the model better
than compressing the updates?

The model is never pruned; each sampled node replies with at most k entries of (its update
plus its error memory) and their positions, and keeps the rest in its `context.state`
(`clients.compression`). k is what a model pruned to `target-density` sends back each round
(`fedprune.topk.budget`; the comparison gives it PruneFL's final density). The server sends
the dense model, as FedAvg does: only the upload is compressed (STC also compresses the
download, which needs every node to hold the model between rounds).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedprune import protocol as P
from fedprune.replies import Expected, TrainUpdate
from fedprune.settings import Settings
from fedprune.topk import budget, check_topk_reply
from strategies.baselines import TargetDensity


class TopKCompression(TargetDensity):
    """Dense FedAvg whose nodes upload top-k updates with error feedback."""

    name = "topk"

    def __init__(self, *, target_density: float, **kw) -> None:
        super().__init__(**kw)
        prunable = sum(m.numel() for m in self.model.masks.values())
        self.k = budget(target_density, prunable, self.model.never_pruned)

    @classmethod
    def options(cls, settings: Settings) -> dict:
        return {"target_density": settings.target_density}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord({**dict(config), P.TOPK_VALUES: self.k})
        return super().configure_train(server_round, arrays, config, grid)

    def check_train_reply(self, arrays, metrics, expected: Expected) -> TrainUpdate:
        # The model every node of this round was sent: the global model, dense.
        return check_topk_reply(arrays, metrics, expected, self.k, self.model.params)
