"""Checkpoint and resume on the real Simulation Engine: a run whose server dies after a
round and is resumed ends with the same model and metrics as one that never stopped."""

import csv
import threading
import time

import pytest
import torch

from experiments.local_run import kill_tree, local_superlink
from fedprune.checkpoint import CheckpointError, load_checkpoint

# Everything a run records that follows from the model: traffic and modelled time are not
# in it, because a resumed run really sends every node its mask again once.
SAME = [
    "round",
    "accuracy",
    "loss",
    "density",
    "mask_version",
    "replies",
    "dropped",
    "reconfigured",
]
ROUNDS = 6

MODES = {
    # every node in every round: nodes accumulate importance until the reconfiguration
    # (round 3), so a stop after round 1 or 2 restarts from round 0
    "full participation": ("clients-per-round=3", 3),
    # 2 of 4 nodes per round, importance uploaded every round: goes on from the last round
    "2 of 4 sampled": ("clients-per-round=2", 4),
}


def run_config(tmp_path, name: str, extra: str) -> str:
    return (
        "model='small-cnn' cost-profile='paper-uniform' ip-max-iterations=40 ip-interval=20 "
        f"reconfig-interval=3 local-steps=20 num-server-rounds={ROUNDS} seed=3 {extra} "
        f"output-dir='{tmp_path}' run-name='{name}'"
    )


def table(folder):
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    return [[row[c] for c in SAME] for row in rows]


def kill_after_a_round(link, checkpoint, config, nodes) -> int:
    """Start a run, crash the SuperLink and everything under it (the ServerApp, the nodes)
    as soon as a checkpoint after round 1 or later exists; return the round it holds.

    A crash, not a stop: a SIGTERMed simulation lets its ServerApp run on while its nodes
    die, and it then records (and checkpoints) one more round whose replies all failed,
    which an uninterrupted run never has."""
    done = {}
    runner = threading.Thread(
        target=lambda: done.update(r=link.run(config, num_supernodes=nodes, capture=True))
    )
    runner.start()
    deadline = time.monotonic() + 240
    saved = 0
    while time.monotonic() < deadline and runner.is_alive():
        try:
            saved = load_checkpoint(checkpoint)["round"]
        except CheckpointError:
            saved = 0
        if saved >= 1:
            break
        time.sleep(0.05)
    kill_tree(link.process)
    runner.join(timeout=60)
    return load_checkpoint(checkpoint)["round"]


# Three real simulations per mode (about 3 minutes each on 2 cores): in the slow suite,
# which CI runs, to keep the default suite near 10 minutes. The checkpoint format and the
# refusal of a bad checkpoint have fast tests (test_checkpoint.py and the one below).
@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_a_resumed_run_ends_as_an_uninterrupted_one(tmp_path, mode):
    extra, nodes = MODES[mode]
    with local_superlink(tmp_path / "home-a") as link:
        done = link.run(run_config(tmp_path, "whole", extra), num_supernodes=nodes, capture=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with local_superlink(tmp_path / "home-b") as link:
        stopped = kill_after_a_round(
            link, tmp_path / "cut" / "checkpoint.pt", run_config(tmp_path, "cut", extra), nodes
        )
    assert 1 <= stopped < ROUNDS, f"the run was not cut short (checkpoint after {stopped})"
    assert len(table(tmp_path / "cut")) == stopped + 1
    cut_rows = list(csv.DictReader((tmp_path / "cut" / "metrics.csv").open()))
    assert all(row["dropped"] == "0" for row in cut_rows), "the crashed run recorded drops"
    with local_superlink(tmp_path / "home-c") as link:
        config = run_config(tmp_path, "cut", extra) + f" resume='{tmp_path / 'cut'}'"
        done = link.run(config, num_supernodes=nodes, capture=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        log = done.stdout + done.stderr
    assert "resuming" in log
    assert table(tmp_path / "cut") == table(tmp_path / "whole"), log[-4000:]
    whole = torch.load(tmp_path / "whole" / "model.pt")
    resumed = torch.load(tmp_path / "cut" / "model.pt")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), "final models differ"


def test_a_corrupt_checkpoint_is_refused_with_a_clear_message(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"FEDPRUNE-CHECKPOINT 1 10 abc\n0123")
    with local_superlink(tmp_path / "home") as link:
        done = link.run(f"resume='{folder}'", num_supernodes=2, capture=True, timeout_s=300)
    log = done.stdout + done.stderr
    assert "cannot resume" in log and "truncated" in log
