"""Many nodes, few per round, on the real Simulation Engine."""

import csv
import json

from experiments.local_run import local_superlink


def test_50_nodes_5_sampled_per_round(tmp_path):
    run_config = (
        "model='small-cnn' cost-profile='paper-uniform' num-server-rounds=2 "
        "clients-per-round=5 ip-max-iterations=40 ip-interval=20 reconfig-interval=1 "
        f"output-dir='{tmp_path}' run-name='scale'"
    )
    with local_superlink(tmp_path / "flwr-home") as link:
        done = link.run(run_config, num_supernodes=50, timeout_s=600, capture=True)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    rows = list(csv.DictReader((tmp_path / "scale" / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert all(int(r["replies"]) == 5 and int(r["dropped"]) == 0 for r in rows[1:])
    assert "configure_train: 5 of 50 nodes" in log
    summary = json.loads((tmp_path / "scale" / "summary.json").read_text())
    assert summary["importance_upload"] == "every-round"
    assert int(rows[1]["reconfigured"]) == 1  # from the importance of round 1's 5 nodes
    sampled = summary["sampled_clients"]
    assert sorted(sampled) == ["1", "2"]
    assert all(len(set(c)) == 5 and all(0 <= i < 50 for i in c) for c in sampled.values())
    assert sampled["1"] != sampled["2"]
