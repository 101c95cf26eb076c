"""The comparison harness cannot mix runs: each run is keyed by its full configuration and
the code, and a finished run is reused only by the same key and the same sources. Fast:
no engine (tests/test_compare.py runs the real one)."""

import argparse
import json

import pytest

from experiments import compare

CODE = {"commit": "abc", "source_sha256": "f" * 64}


def key(values, nodes=10, code=CODE):
    return compare.run_key(values, nodes, code)


def test_the_key_follows_every_setting_the_nodes_and_the_sources():
    base = {"method": "fedavg", "num-server-rounds": 30, "seed": 0}
    assert key(base) == key(dict(base))
    assert key({**base, "num-server-rounds": 5}) != key(base)  # a short trial
    assert key({**base, "warm-start": True}) != key(base)
    assert key({**base, "seed": 1}) != key(base)
    assert key(base, nodes=3) != key(base)
    assert key(base, code={**CODE, "source_sha256": "e" * 64}) != key(base)
    # A setting given at its default is the same run as one left out.
    assert key({**base, "learning-rate": 0.1}) == key(base)
    # Where the results go is not what the run is.
    assert key({**base, "output-dir": "/elsewhere", "run-name": "x"}) == key(base)


def test_a_finished_run_is_reused_only_with_the_same_sources(tmp_path):
    plan = compare.Plan({"num-server-rounds": 30}, tmp_path, 10, CODE)
    run = plan.run("fedavg", 0)
    assert run.name == f"fedavg-seed0-{run.key}"
    assert not plan.finished(run)
    folder = tmp_path / run.name
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"code": CODE}))
    assert plan.finished(run)
    (folder / "summary.json").write_text(json.dumps({"code": {**CODE, "source_sha256": "0"}}))
    assert not plan.finished(run)
    short = compare.Plan({"num-server-rounds": 5}, tmp_path, 10, CODE).run("fedavg", 0)
    assert short.name != run.name


def test_arms_taking_prunefl_results_are_keyed_by_them(tmp_path):
    plan = compare.Plan({}, tmp_path, 10, CODE)
    with pytest.raises(RuntimeError, match="PruneFL's result for seed 0"):
        plan.run("snip", 0)
    assert set(compare.ARMS["snip-warm"]) == {"method", "target-density", "warm-start"}
    assert compare.ARMS["topk"]["target-density"] == "@density"
    assert {"fedavg-warm", "fedrts", "fedrts-warm", "topk-warm"} <= set(compare.ARMS)


def test_the_accuracy_axis_follows_the_runs():
    curves = {"a": {"accuracy": [0.1, 0.85, 0.93]}, "b": {"accuracy": [0.1, 0.6, 0.7]}}
    low, high = compare.accuracy_limits(curves, [0.9])
    assert low < 0.7 and 0.93 < high <= 1.0
    assert low > 0.1  # round 0's chance accuracy does not squash the axis


def test_a_second_invocation_adds_to_the_table(tmp_path):
    plan = compare.Plan({"num-server-rounds": 30}, tmp_path / "runs", 10, CODE)
    old, stale = plan.run("fedavg", 0), plan.run("fedavg-warm", 0)
    for run, code in ((old, CODE), (stale, {**CODE, "source_sha256": "0"})):
        folder = tmp_path / "runs" / run.name
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"code": code}))
    (tmp_path / "summary.csv").write_text(
        f"method,seed,key\nfedavg,0,{old.key}\nfedavg-warm,0,{stale.key}\nfedavg,1,{old.key}\n"
    )
    kept = compare.earlier_runs(tmp_path, [], plan)
    # The finished run at this code stays; one by other code, or without a folder, does not.
    assert [(r.arm, r.seed, r.key) for r in kept] == [("fedavg", 0, old.key)]
    # An arm this invocation runs again is not taken from the old table.
    assert compare.earlier_runs(tmp_path, [old], plan) == []


def test_set_overrides_a_setting_and_refuses_typos_and_bad_values():
    assert compare.parse_setting("ip-max-iterations=1000") == ("ip-max-iterations", 1000)
    assert compare.parse_setting("partitioner=dirichlet") == ("partitioner", "dirichlet")
    assert compare.parse_setting("warm-start=true") == ("warm-start", True)
    for bad, why in [
        ("ip-max-iteration=3", "did you mean 'ip-max-iterations'"),
        ("ip-max-iterations=-3", "non-negative"),
        ("ip-max-iterations", "KEY=VALUE"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            compare.parse_setting(bad)
    # An overridden setting is another run, so a sweep never reuses the preset's runs.
    base = {"method": "prunefl", "ip-max-iterations": 300, "seed": 0}
    assert key({**base, **dict([compare.parse_setting("ip-max-iterations=1000")])}) != key(base)
