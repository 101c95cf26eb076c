"""Same seed and settings, same metrics: two real simulations that sample 2 of 4 nodes
per round. Flower gives the nodes new ids in every run; the sample follows the seed."""

import csv
import json

import pytest

from experiments.local_run import local_superlink
from strategies.results import COLUMNS as RESULT_COLUMNS
from strategies.results import MEASURED_COLUMNS

# Everything a run records except what is read off a clock, which no two runs share.
COLUMNS = [c for c in RESULT_COLUMNS if c not in MEASURED_COLUMNS]


# Two real simulations (about 2 minutes on 2 cores): in the slow suite, which CI runs,
# to keep the default suite near 10 minutes.
@pytest.mark.slow
def test_two_runs_with_the_same_seed_give_the_same_metrics(tmp_path):
    tables, sampled = [], []
    with local_superlink(tmp_path / "flwr-home") as link:
        for name in ("a", "b"):
            run_config = (
                "model='small-cnn' cost-profile='paper-uniform' num-server-rounds=3 "
                "clients-per-round=2 ip-max-iterations=60 ip-interval=20 reconfig-interval=2 "
                f"seed=7 output-dir='{tmp_path}' run-name='{name}'"
            )
            done = link.run(run_config, num_supernodes=4, timeout_s=300, capture=True)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
            rows = list(csv.DictReader((tmp_path / name / "metrics.csv").open()))
            tables.append([[row[c] for c in COLUMNS] for row in rows])
            summary = json.loads((tmp_path / name / "summary.json").read_text())
            sampled.append(summary["sampled_clients"])
    assert len(tables[0]) == 4
    assert tables[0] == tables[1]
    assert sampled[0] == sampled[1] and len(sampled[0]["1"]) == 2
