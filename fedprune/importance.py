"""When nodes compute and upload importance, and the server's running sum of it.

A method's mask update may need the clients' importance (accumulated squared gradients)
at the end of some rounds: `uses(round)` says which. Computing importance costs a node a
dense gradient of every weight, so nodes only compute it in the rounds that feed such an
update: the last `window` rounds before it (0: every round since the previous one, as
the paper does).

How it reaches the server (`mode`):
- "reconfig" (the paper; every node in every round): nodes keep what they compute and
  upload it all in the round whose update uses it;
- "every-round" (nodes are sampled): each sampled node uploads its own round's importance
  in every tracked round, and the server sums.

The plan of a round is a function of the round and of two pieces of state: how many
tracked rounds the nodes hold (reconfig mode), and whether an update is pending because
its round was skipped (too few valid replies). A skipped round loses nothing: whatever
valid replies uploaded is summed, and the next round asks again and runs the update.
A mask update after the last round would never be trained, so none is planned there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedprune.importance_code import ImportanceSum

MODES = ("reconfig", "every-round")


@dataclass(frozen=True)
class RoundPlan:
    """What the nodes of one round do with importance.

    track: compute it this round; send: upload it (with what they hold); keep: hold it
    for a later round; covers: local rounds each upload must cover (0 if none is sent);
    update: the method's mask update at the end of this round gets the sum.
    """

    track: bool = False
    send: bool = False
    keep: bool = False
    covers: int = 0
    update: bool = False


class ImportanceCollector:
    """Plans importance rounds and sums what the nodes upload.

    uses: the rounds at whose end the method updates its mask from importance.
    num_rounds: the run's last round (no update is planned after it); 0 while unknown.
    window: rounds before an update in which nodes compute importance; 0 = all since the
        previous update.
    shapes: the prunable weights' shapes (the sum's layers).

    Uploads are exact (dense tensors) or coded (`fedprune.importance_code`); the sum
    (`ImportanceSum`) takes both, and fills in what a coded upload left out.
    """

    def __init__(
        self,
        uses: Callable[[int], bool],
        num_rounds: int,
        window: int = 0,
        shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        if window < 0:
            raise ValueError(f"window = {window} must be >= 0")
        self.uses = uses
        self.num_rounds = num_rounds
        self.window = window
        self.mode = ""  # set by resolve_mode once participation is known
        self.held_rounds = 0  # tracked rounds the nodes hold, not yet uploaded (reconfig)
        self.pending = False  # an update whose round was skipped waits for the next one
        self.shapes = dict(shapes or {})
        self.sum = ImportanceSum(self.shapes)
        self.fixed = 0.0
        self.uploads = 0
        self.upload_rounds = 0  # rounds whose uploads are in the sum
        self.used = (0, 0)  # (uploads, rounds) in the sum the last update used

    # ----------------------------------------------------------------- planning
    def resolve_mode(self, requested: str, sampled: int, population: int) -> bool:
        """Set `mode` from the setting ("auto", "reconfig", "every-round") and this round's
        participation; True if it changed. "auto" is "reconfig" when every node takes part.
        ValueError for "reconfig" with sampling: nodes not sampled when the update runs
        would hold their importance back."""
        full = sampled >= population
        mode = ("reconfig" if full else "every-round") if requested == "auto" else requested
        if mode not in MODES:
            raise ValueError(f"importance upload {requested!r}; choose auto or one of {MODES}")
        if mode == "reconfig" and not full:
            raise ValueError(
                f"importance-upload = 'reconfig' needs every node in every round, but {sampled} "
                f"of {population} nodes are sampled: nodes that are not sampled when the server "
                "reconfigures would hold their importance back. Use 'every-round' (or 'auto')"
            )
        changed, self.mode = mode != self.mode, mode
        return changed

    def next_use(self, server_round: int) -> int | None:
        """The first round from `server_round` on whose end an update uses importance
        (before the number of rounds is known, 0, it looks a long way ahead)."""
        for r in range(server_round, self.num_rounds or server_round + 100_000):
            if self.uses(r):
                return r
        return None

    def _in_window(self, server_round: int, upcoming: int) -> bool:
        # With window 0 every round up to the update tracks: no earlier update lies
        # between them, since `upcoming` is the first from `server_round` on.
        return self.window == 0 or upcoming - server_round < self.window

    def plan(self, server_round: int) -> RoundPlan:
        """What the nodes of `server_round` do (a function of the round and the state)."""
        upcoming = self.next_use(server_round)
        due = self.pending or upcoming == server_round
        track = due or (upcoming is not None and self._in_window(server_round, upcoming))
        if not track:
            return RoundPlan()
        if self.mode == "every-round":
            return RoundPlan(track=True, send=True, covers=1, update=due)
        if due:
            return RoundPlan(track=True, send=True, covers=self.held_rounds + 1, update=True)
        return RoundPlan(track=True, keep=True)

    # ----------------------------------------------------------------- collecting
    def add(self, importance: Mapping[str, Any], fixed: float, uploads: int = 1) -> None:
        """Add one valid upload (already weighted by the node's samples): per prunable
        weight a dense tensor or a coded `ImportanceUpload`; or what a robust rule made of
        a round's `uploads` of them (`fedprune.aggregate.robust_importance`)."""
        self.sum.add(importance)
        self.fixed += fixed
        self.uploads += uploads

    def end_round(
        self, plan: RoundPlan, aggregated: bool
    ) -> tuple[dict[str, torch.Tensor] | None, float]:
        """Close a round run by `plan`. Returns the summed importance and fixed importance
        for the method's update if it is due now (else (None, 0.0)); `aggregated` is False
        for a round skipped for too few valid replies, whose update then waits."""
        if plan.keep:
            self.held_rounds += 1
        if plan.send:
            self.held_rounds = 0
            self.upload_rounds += 1
        if not plan.update:
            return None, 0.0
        if not aggregated or self.uploads == 0:
            self.pending = True
            return None, 0.0
        out, fixed, self.used = self.sum.total(), self.fixed, (self.uploads, self.upload_rounds)
        self.sum, self.fixed, self.uploads, self.upload_rounds = (
            ImportanceSum(self.shapes),
            0.0,
            0,
            0,
        )
        self.pending = False
        return out, fixed

    @property
    def nodes_hold_importance(self) -> bool:
        """Nodes hold importance the server has not received (lost if the run stops)."""
        return self.held_rounds > 0

    def state_dict(self) -> dict:
        return {
            "sum": self.sum.state_dict(),
            "fixed": self.fixed,
            "uploads": self.uploads,
            "upload_rounds": self.upload_rounds,
            "held_rounds": self.held_rounds,
            "pending": self.pending,
            "mode": self.mode,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.sum = ImportanceSum(self.shapes)
        self.sum.load_state_dict(state["sum"])
        self.fixed = float(state["fixed"])
        self.uploads = int(state["uploads"])
        self.upload_rounds = int(state["upload_rounds"])
        self.held_rounds = int(state["held_rounds"])
        self.pending = bool(state["pending"])
        self.mode = str(state["mode"])
