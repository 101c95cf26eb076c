"""A deployed ServerApp's grid that collects replies promptly.

Flower 1.41's deployed grid (`HttpGrid`) pushes a round's messages, then asks the
SuperLink for replies every 3 s. A round therefore waits on average 1.5 s past its last
reply, at each exchange (identification, training, evaluation), and a PruneFL round on a
deployed federation is about 20 s long: several percent of every round is that sleep.

`PromptGrid` wraps such a grid and replaces only that wait: it asks again after 0.05 s,
then backs off to at most `max_interval_s` (0.5 s), so a reply is collected at most half
a second after it arrives, at the cost of a few small `PullMessages` requests per second
to the SuperLink while a round is out. Everything else is the wrapped grid's.

The Simulation Engine's in-memory grid pulls every 0.1 s: a round waits 0.05 s past its
last reply on average, about 2 s over the main job's 41 exchanges (of 90 s). Its pulls
are reads of the SuperLink's state in this process, so it is wrapped to ask every 5 ms
to 20 ms instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid


class PromptGrid(Grid):
    """`grid`, with `send_and_receive` polling for replies every 0.05 s to 0.5 s."""

    def __init__(
        self, grid: Grid, *, first_interval_s: float = 0.05, max_interval_s: float = 0.5
    ) -> None:
        if not 0 < first_interval_s <= max_interval_s:
            raise ValueError("need 0 < first_interval_s <= max_interval_s")
        self.grid = grid
        self.first_interval_s = first_interval_s
        self.max_interval_s = max_interval_s

    # The wrapped grid's own methods.
    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def __getattr__(self, name: str):  # anything else a concrete grid has (close, node)
        return getattr(self.grid, name)

    # The one change.
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push `messages`, then collect their replies until all are in or `timeout`
        seconds have passed (None: no limit), as Flower's grids do, asking the SuperLink
        again after 0.05 s, 0.075 s, ... up to every `max_interval_s`."""
        waiting = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        interval = self.first_interval_s
        replies: list[Message] = []
        while waiting:
            got = list(self.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting:
                break
            if got:  # replies come in bunches: look again soon after one
                interval = self.first_interval_s
            if end is not None:
                left = end - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(interval, left))
            else:
                time.sleep(interval)
            interval = min(interval * 1.5, self.max_interval_s)
        return replies


def in_simulation(grid: Grid) -> bool:
    """Whether `grid` is the Simulation Engine's (Flower's in-memory grid), wrapped or
    not."""
    if isinstance(grid, PromptGrid):
        grid = grid.grid
    # By name: importing the class would load the SuperLink's modules into a deployed
    # ServerApp, which never has this grid.
    return type(grid).__name__ == "InMemoryGrid"


def prompt(grid: Grid) -> Grid:
    """The grid to run the ServerApp on, wrapped to collect replies promptly: a deployed
    grid's every 0.05 s to 0.5 s (a request to the SuperLink each), the Simulation
    Engine's every 5 ms to 20 ms (a read of state in this process)."""
    if isinstance(grid, PromptGrid):
        return grid
    if in_simulation(grid):
        return PromptGrid(grid, first_interval_s=0.005, max_interval_s=0.02)
    return PromptGrid(grid)
