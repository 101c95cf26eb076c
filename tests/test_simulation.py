"""The real thing: `flwr run` on Flower's Simulation Engine (Ray), 3 SuperNodes."""

import csv
import json

import pytest
import torch

from experiments.local_run import descendants, local_superlink
from fedprune.masks import from_prune_state


def masks_in(out):
    return from_prune_state(torch.load(out / "mask.pt"))


def test_prunefl_runs_end_to_end_on_the_simulation_engine(tmp_path):
    run_config = (
        f"model='small-cnn' cost-profile='paper-uniform' num-server-rounds=3 "
        f"clients-per-round=3 ip-max-iterations=100 reconfig-interval=2 fraction-evaluate=1.0 "
        f"output-dir='{tmp_path}' run-name='sim'"
    )
    with local_superlink(tmp_path / "flwr-home") as link:
        done = link.run(run_config, num_supernodes=3, timeout_s=300, capture=True)
        superlink_pid = link.process.pid
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not descendants(superlink_pid), "processes left behind"

    out = tmp_path / "sim"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    assert "[fedprune] round   3" in done.stdout + done.stderr
    # 3 nodes stand for the paper's 10 clients: each trains as 4 or 3 of them.
    assert "a simulation of 3 nodes stands for simulated-clients = 10" in done.stdout + done.stderr
    # Round 1 delivers the mask to each node; round 2 reconfigures, and the evaluate
    # messages that follow carry the change from the mask the nodes hold; round 3 sends
    # values only.
    assert [int(r["masks_sent"]) for r in rows[1:]] == [3, 0, 0]
    assert [int(r["mask_changes_sent"]) for r in rows[1:]] == [0, 3, 0]
    assert int(rows[2]["reconfigured"]) == 1 and int(rows[3]["mask_version"]) == 1
    assert all(int(r["replies"]) == 3 and int(r["dropped"]) == 0 for r in rows[1:])
    assert all(int(r["bytes_down"]) > 0 and int(r["bytes_up"]) > 0 for r in rows[1:])
    assert float(rows[-1]["sim_time_s"]) > 0
    # Measured on the devices: every training round's slowest node, and their sum.
    assert all(float(r["device_round_s"]) > 0 for r in rows[1:])
    # Each node measured its peak memory in the train handler (Linux /proc): what it needed
    # above what its process held at the handler's start. A warm node whose small-CNN round
    # fits in memory it already holds measures 0, so only presence and sign are certain.
    assert all(float(r["node_peak_memory_mb"]) >= 0 for r in rows[1:])
    assert float(rows[-1]["device_time_s"]) == pytest.approx(
        sum(float(r["device_round_s"]) for r in rows[1:]), abs=1e-3
    )
    assert "| device " in done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    # The default layer-format ("measured"): each layer's format came from the nodes'
    # own (cached) profile, and the last round's formats are in the summary.
    formats = summary["train_formats"]
    assert formats["round"] == 3 and formats["nodes"] == 3
    assert list(formats["layers"]) == list(masks_in(out))
    assert all(f in ("dense", "csr", "sparse-conv") for f in formats["layers"].values())
    assert formats["compact"].startswith("conv1:")
    assert summary["final_accuracy"] > 0.3  # ten classes: chance is 0.1
    assert summary["final_density"] < 1.0
    memory = summary["node_peak_memory"]
    assert memory["max_mb"] >= memory["last_round_mb"] >= 0 and memory["dense_weights_mb"] > 0
    portable = summary["inference"]["portable"]  # TorchScript and ONNX, checked
    assert portable["torchscript"]["max_abs_diff"] < 1e-4, portable
    assert portable["onnx"]["max_abs_diff"] < 1e-4, portable
    assert (out / "model_inference.torchscript.pt").exists() and (
        out / "model_inference.onnx"
    ).exists()
    kinds = summary["bytes_by_kind"]  # what the bytes carried, from the same records
    assert sum(kinds["down"].values()) == summary["total_bytes_down"]
    assert sum(kinds["up"].values()) == summary["total_bytes_up"]
    assert {"v", "m", "md", "config"} <= set(kinds["down"]) and {"v", "gc"} <= set(kinds["up"])
    per_round = list(csv.DictReader((out / "bytes_by_kind.csv").open()))
    assert sum(int(r["bytes"]) for r in per_round) == summary["total_bytes"]
    split = summary["wall_time_split_s"]
    phases = ["setup", "initial_pruning", "rounds", "evaluation", "checkpoints", "export"]
    assert list(split) == phases and all(split[p] >= 0 for p in phases)
    assert split["initial_pruning"] > 0 and split["rounds"] > 0
    # The phases before the export add up to the wall time of the last round's row.
    assert abs(sum(split.values()) - split["export"] - summary["total_wall_time_s"]) < 10
    assert "[fedprune] wall time by phase: setup" in done.stdout + done.stderr
    masks = from_prune_state(torch.load(out / "mask.pt"))
    model = torch.load(out / "model.pt")
    for name, mask in masks.items():
        assert torch.all(model[name][~mask] == 0)
    assert (out / "curves.png").stat().st_size > 0


def test_a_client_that_raises_does_not_stop_the_run(tmp_path):
    run_config = (
        "model='small-cnn' cost-profile='paper-uniform' num-server-rounds=3 "
        "clients-per-round=3 ip-max-iterations=40 ip-interval=20 simulate-failures='1' "
        f"output-dir='{tmp_path}' run-name='faulty'"
    )
    with local_superlink(tmp_path / "flwr-home") as link:
        done = link.run(run_config, num_supernodes=3, timeout_s=300, capture=True)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    rows = list(csv.DictReader((tmp_path / "faulty" / "metrics.csv").open()))
    assert [(int(r["replies"]), int(r["dropped"])) for r in rows[1:]] == [(2, 1)] * 3
    assert "simulated failure of partition 1" in log
    # The two healthy nodes go on learning (a seeded run: the same numbers every time).
    assert float(rows[-1]["accuracy"]) > float(rows[0]["accuracy"])
