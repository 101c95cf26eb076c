"""The deployed ServerApp's grid collects replies within 0.5 s of their arrival, stops at
its timeout, and is otherwise the grid it wraps (on a fake clock: no real waiting)."""

from types import SimpleNamespace

import pytest

from strategies import prompt_grid
from strategies.prompt_grid import PromptGrid, in_simulation, prompt


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now

    def sleep(self, s):
        assert s > 0
        self.now += s


class FakeGrid:
    """Replies to message i become available at `ready[i]` seconds on the clock."""

    def __init__(self, clock, ready):
        self.clock, self.ready = clock, ready
        self.pulls, self.collected_at = 0, {}

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        out = []
        for mid in sorted(ids):
            if self.ready[int(mid[1:])] <= self.clock.now:
                self.collected_at[mid] = self.clock.now
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid)))
        return out

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return ("message", content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return [7, 8]

    node = "the node"


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(prompt_grid, "time", fake)
    return fake


def test_replies_are_collected_within_half_a_second_of_arriving(clock):
    ready = [0.01, 2.0, 2.05, 7.3, 30.0]
    grid = FakeGrid(clock, ready)
    replies = PromptGrid(grid).send_and_receive([None] * len(ready), timeout=None)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == [f"m{i}" for i in range(5)]
    for i, t in enumerate(ready):
        assert t <= grid.collected_at[f"m{i}"] <= t + 0.5  # Flower's grid: up to 3 s
    # ...and it does not hammer the SuperLink: over 30 s, about 2 requests a second.
    assert grid.pulls <= 30 / 0.5 + 20


def test_it_stops_at_the_timeout_with_the_replies_it_has(clock):
    grid = FakeGrid(clock, [1.0, 100.0])
    replies = PromptGrid(grid).send_and_receive([None, None], timeout=10.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 10.0 <= clock.now <= 10.0 + 1e-9  # not a poll interval past it


def test_everything_else_is_the_wrapped_grids():
    grid = FakeGrid(FakeClock(), [])
    wrapped = prompt(grid)
    assert isinstance(wrapped, PromptGrid) and prompt(wrapped) is wrapped
    assert wrapped.get_node_ids() == [7, 8]
    assert wrapped.create_message("c", "train", 7, "1", ttl=5.0) == (
        "message", "c", "train", 7, "1", 5.0
    )  # fmt: skip
    assert wrapped.node == "the node"


def test_the_simulation_engines_grid_is_asked_every_5_to_20_ms(clock):
    InMemoryGrid = type("InMemoryGrid", (FakeGrid,), {})  # matched by name, as server_app does
    grid = InMemoryGrid(clock, [0.3, 1.0, 1.004])
    wrapped = prompt(grid)
    assert isinstance(wrapped, PromptGrid) and in_simulation(wrapped) and in_simulation(grid)
    assert not in_simulation(prompt(FakeGrid(clock, [])))
    assert len(wrapped.send_and_receive([None] * 3, timeout=None)) == 3
    lags = [grid.collected_at[f"m{i}"] - t for i, t in enumerate(grid.ready)]
    assert all(0 <= lag <= 0.02 + 1e-9 for lag in lags), lags


def test_bad_intervals_are_refused():
    with pytest.raises(ValueError):
        PromptGrid(FakeGrid(FakeClock(), []), first_interval_s=1.0, max_interval_s=0.5)
