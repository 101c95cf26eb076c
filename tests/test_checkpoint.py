"""Checkpoint files: atomic writes, damaged files refused by name and reason, and the
strategy's state going on in a fresh federation exactly as it would have."""

import os
import random

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from fedprune import checkpoint
from fedprune import protocol as P
from fedprune.checkpoint import (
    BackgroundWriter,
    CheckpointError,
    copy_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fedprune.costs import named_profile
from fedprune.settings import Settings
from strategies.prunefl import PruneFL
from strategies.run_state import rng_state, set_rng_state
from tests.inprocess import Federation, small_cnn_start

STATE = {"round": 3, "w": torch.arange(6.0).reshape(2, 3), "rows": [{"a": 1.5}], "s": "x"}


def test_round_trip_keeps_tensors_numbers_and_strings(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", STATE)
    state = load_checkpoint(path)
    assert state["round"] == 3 and state["rows"] == [{"a": 1.5}] and state["s"] == "x"
    assert torch.equal(state["w"], STATE["w"])
    assert not [p for p in tmp_path.iterdir() if p.name != "c.pt"], "temporary file left"


def damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:-100])
    elif how == "bit flipped":
        i = len(data) - 50
        path.write_bytes(data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :])
    elif how == "not a checkpoint":
        path.write_bytes(b"PK\x03\x04" + data)
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize(
    "how, reason",
    [
        ("truncated", "truncated"),
        ("bit flipped", "checksum"),
        ("not a checkpoint", "not a fedprune checkpoint"),
        ("empty", "not a fedprune checkpoint"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_file_and_reason(tmp_path, how, reason):
    path = save_checkpoint(tmp_path / "c.pt", STATE)
    damage(path, how)
    with pytest.raises(CheckpointError, match=reason) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_a_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "none.pt")


def test_a_crash_mid_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", STATE)

    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(checkpoint.os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(path, {**STATE, "round": 4})
    assert load_checkpoint(path)["round"] == 3
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]


def test_a_checkpoint_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    path = save_checkpoint(tmp_path / "c.pt", {"x": Evil()})
    with pytest.raises(CheckpointError, match="cannot load"):
        load_checkpoint(path)


def test_copy_is_a_snapshot_not_a_follower(tmp_path):
    latest = save_checkpoint(tmp_path / "latest.pt", STATE)
    copy_checkpoint(latest, tmp_path / "restart.pt")
    save_checkpoint(latest, {**STATE, "round": 9})
    assert load_checkpoint(tmp_path / "restart.pt")["round"] == 3
    assert load_checkpoint(latest)["round"] == 9


def test_random_generators_survive_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save_checkpoint(tmp_path / "c.pt", {"rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


SETTINGS = Settings(model="small-cnn", cost_profile="paper-uniform", local_steps=2, batch_size=10)


def make_strategy(upload, clients):
    params, masks, names = small_cnn_start(0.5)
    strategy = PruneFL(
        params=params,
        masks=masks,
        profile=named_profile("paper-uniform", names),
        clients_per_round=clients,
        reconfig_interval=2,
        importance_upload=upload,
        seed=5,
    )
    strategy.importance.num_rounds = 5
    return strategy


def run_rounds(strategy, fed, rounds):
    config = ConfigRecord({P.LEARNING_RATE: 0.1})
    for r in rounds:
        replies = fed.deliver(list(strategy.configure_train(r, None, config, fed.grid)))
        strategy.aggregate_train(r, replies)


@pytest.mark.parametrize("upload, clients", [("every-round", 2), ("reconfig", 4)])
def test_strategy_state_goes_on_in_a_fresh_federation_bitwise(tmp_path, upload, clients):
    """Stop after round 3, inside a reconfiguration window (importance gathered in round
    3 is used in round 4), and go on with new nodes, as after a server restart."""
    whole = make_strategy(upload, clients)
    run_rounds(whole, Federation(SETTINGS, 4), range(1, 6))

    first = make_strategy(upload, clients)
    run_rounds(first, Federation(SETTINGS, 4), range(1, 4))
    saved = first.state_dict()
    restart = 3
    if first.importance.nodes_hold_importance:  # the nodes' part of the state died with them
        assert upload == "reconfig"
        restart = 2
        first = make_strategy(upload, clients)
        run_rounds(first, Federation(SETTINGS, 4), range(1, 3))
        assert not first.importance.nodes_hold_importance
        saved = first.state_dict()
    path = save_checkpoint(tmp_path / "c.pt", {"strategy": saved})
    second = make_strategy(upload, clients)
    second.load_state_dict(load_checkpoint(path)["strategy"])
    run_rounds(second, Federation(SETTINGS, 4), range(restart + 1, 6))

    assert second.mask_version == whole.mask_version > 0
    for k, v in whole.masked_params().items():
        assert torch.equal(v, second.masked_params()[k]), k


def test_background_writes_are_snapshots_in_order_and_complete_on_wait(tmp_path):
    writer = BackgroundWriter()
    tensor = torch.arange(5.0)
    order = []
    for r in range(3):
        state = {"round": r, "t": tensor}
        writer.save(tmp_path / "c.pt", state, then=lambda r=r: order.append(r))
        tensor.add_(100.0)  # changed after save returned: the file must not see it
        state["round"] = -1
    writer.wait()
    saved = load_checkpoint(tmp_path / "c.pt")
    assert saved["round"] == 2 and torch.equal(saved["t"], torch.arange(5.0) + 200.0)
    assert order == [0, 1, 2]
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failed_background_write_is_raised_not_lost(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the checkpoint's folder should be")
    writer = BackgroundWriter()
    writer.save(blocker / "c.pt", STATE)  # returns: the write fails in the thread
    with pytest.raises(CheckpointError, match=r"writing checkpoint .*c\.pt failed"):
        writer.wait()
    writer.wait()  # reported once
    writer.save(tmp_path / "ok.pt", STATE)
    writer.wait()
    assert load_checkpoint(tmp_path / "ok.pt")["round"] == STATE["round"]


def test_run_checkpoints_copy_the_restart_file_only_when_nodes_hold_nothing(tmp_path):
    from strategies.run_state import CHECKPOINT, RESTART_CHECKPOINT, CheckpointFiles

    files = CheckpointFiles(tmp_path)
    files.write({**STATE, "round": 1}, nodes_hold_importance=False)
    files.write({**STATE, "round": 2}, nodes_hold_importance=True)
    files.close()
    assert load_checkpoint(tmp_path / CHECKPOINT)["round"] == 2
    assert load_checkpoint(tmp_path / RESTART_CHECKPOINT)["round"] == 1
