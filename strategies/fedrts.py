"""FedRTS (NeurIPS 2025): dynamic sparse FL whose mask adjustment is Thompson sampling over
the links (`fedprune.thompson`), with clients uploading only their top-gradient positions.

It starts as FedDST does (a random Erdős-Rényi-Kernel mask at `target-density`, after the
warm start if set) and adjusts as often and as much (every `reconfig-interval` rounds, at
most delta of each layer's links, delta decaying like PruneFL's): the two differ only in
how the links to drop and grow are decided, which is the paper's contribution.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedprune import protocol as P
from fedprune.codec import CodecError
from fedprune.masks import Masks
from fedprune.reconfigure import stability_delta
from fedprune.replies import Expected, ReplyError, TrainUpdate
from fedprune.settings import Settings
from fedprune.thompson import (
    VOTES,
    LinkPosterior,
    decode_votes,
    rewards,
    sampled_topology,
)
from strategies.baselines import FedDST


class FedRTS(FedDST):
    """FedDST's schedule with FedRTS's TSAdj: Beta posteriors per link, updated from the
    aggregated model (kept links) and the clients' top-gradient positions (pruned links),
    sampled for each adjustment."""

    name = "fedrts"

    def __init__(self, *, rts_seed: int = 0, **kw) -> None:
        super().__init__(**kw)
        self.posterior = LinkPosterior.from_masks(self.masks)
        self.rts_seed = rts_seed
        self._fraction: float | None = None  # this round asks for top-gradient positions
        self._votes: dict[str, torch.Tensor] = {}
        self._voters = 0

    @classmethod
    def options(cls, settings: Settings) -> dict:
        return {**super().options(settings), "rts_seed": settings.seed}

    def adjusts(self, server_round: int) -> bool:
        """Whether the mask is adjusted after this round (never after the last one: the
        new mask would never be trained)."""
        last = self.importance.num_rounds
        return (
            self.interval > 0
            and server_round % self.interval == 0
            and (last == 0 or server_round < last)
        )

    def wants_importance(self, server_round: int) -> bool:
        return False  # the nodes send top-gradient positions instead (configure_train)

    def _delta(self, server_round: int) -> float:
        return stability_delta(server_round, self.delta_initial, self.delta_half_life)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._votes = {n: torch.zeros(m.numel(), dtype=torch.int32) for n, m in self.masks.items()}
        self._voters, self._fraction = 0, None
        if self.adjusts(server_round):
            self._fraction = self._delta(server_round)
            config = ConfigRecord({**dict(config), P.TOP_GRADIENTS: self._fraction})
        return super().configure_train(server_round, arrays, config, grid)

    def check_train_reply(self, arrays, metrics, expected: Expected) -> TrainUpdate:
        votes = {k: v for k, v in arrays.items() if k.startswith(f"{VOTES}/")}
        rest = {k: v for k, v in arrays.items() if k not in votes}
        update = super().check_train_reply(rest, metrics, expected)
        if self._fraction is None:
            if votes:
                raise ReplyError("top-gradient positions in a round that did not ask for them")
            return update
        try:
            positions = decode_votes(votes, self.masks, self._fraction)
        except CodecError as exc:
            raise ReplyError(str(exc)) from exc
        for name, where in positions.items():
            self._votes[name].index_add_(0, where, torch.ones(len(where), dtype=torch.int32))
        self._voters += 1
        return update

    def update_mask(self, server_round, importance, fixed) -> Masks | None:
        adjusting = self._fraction is not None
        fraction = self._fraction if adjusting else self._delta(server_round)
        if self.aggregated(server_round):
            # The kept links, observed in the new global model every round; the pruned ones
            # only when the clients voted (`fedprune.thompson`).
            weights = self.model.masked_params()
            kept = {k: weights[k] for k in self.masks}
            votes = {k: v.reshape(self.masks[k].shape) for k, v in self._votes.items()}
            reward = rewards(kept, self.masks, votes, self._voters, fraction)
            self.posterior.observe(reward, where=None if adjusting else self.masks)
        if not adjusting:
            return None
        rng = np.random.default_rng([self.rts_seed, server_round])
        theta = self.posterior.sample(rng)
        log(INFO, "round %d: FedRTS samples a topology (fraction %.3f, %d clients voted)",
            server_round, self._fraction, self._voters)  # fmt: skip
        return sampled_topology(theta, self.masks, self._fraction, self.posterior.evidence())

    # The posterior is part of the method's state: a resumed run goes on with it.
    def state_dict(self) -> dict:
        return {**super().state_dict(), "posterior": self.posterior.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.posterior.load_state_dict(state["posterior"])
