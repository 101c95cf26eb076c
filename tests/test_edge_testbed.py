"""The edge testbed (deploy/edge_testbed.py): SuperNodes in network namespaces behind
tbf-shaped links, and where a deployed round's wall time goes (deploy/wallclock.py).

The fast tests check the analysis on hand-made probe events and the command's settings.
The slow test needs root, `ip` and `tc`; it starts a real testbed (2 shaped SuperNodes,
2 rounds of the small CNN) and checks that the links limit throughput, that the run
finishes, and that no process or namespace is left behind:

    python -m pytest -q -m slow tests/test_edge_testbed.py
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.edge_testbed import (
    DEFAULT_POLL_S,
    PAPER_RATE,
    build_parser,
    main,
    method_run_config,
    parse_rates,
)
from deploy.netns import burst_bytes, namespaces_with_prefix
from deploy.probe import cap_polling, wrapper_script
from deploy.wallclock import (
    ROUND_COLUMNS,
    MessagePath,
    error_stats,
    message_paths,
    read_events,
    round_table,
    run_summary,
    time_to_targets,
)
from experiments.local_run import _alive
from fedprune.settings import Settings

PROJECT_DIR = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------- fast: analysis
def _train_message(events, node, node_id, mid, rnd, t, startup=3.0, handler=2.0):
    """Probe events of one train message: pushed at t, through node `node`, collected."""
    server = [
        {
            "t": t,
            "kind": "push",
            "t0": t,
            "t1": t + 0.1,
            "ids": [mid],
            "messages": [{"type": "train", "dst": node_id, "src": 1, "round": rnd}],
        },
    ]
    pid = 1000 + rnd * 10 + int(node)
    proc = t + 2.0  # after a 1 s wait and a 0.5 s download
    node_events = [
        {"t": t + 1.6, "kind": "download", "t0": t + 1.1, "t1": t + 1.6, "bytes": 700_000},
        {"t": proc, "kind": "start", "pid": pid, "role": "clientapp", "proc_start": proc},
        {
            "t": proc + 1,
            "kind": "task_pulled",
            "pid": pid,
            "type": "train",
            "node_id": node_id,
            "round": rnd,
            "run_id": 5,
        },
        {"t": proc + startup, "kind": "handler_start", "pid": pid, "cpu": 2.5, "runqueue_s": 0.4},
        {
            "t": proc + startup + handler,
            "kind": "handler_end",
            "pid": pid,
            "wall_s": handler,
            "cpu_s": handler / 2,
            "runqueue_s": handler / 2,
        },
        {"t": proc + startup + handler + 0.1, "kind": "reply_pushed", "pid": pid},
    ]
    up0 = proc + startup + handler + 0.4
    node_events.append({"t": up0 + 0.5, "kind": "upload", "t0": up0, "t1": up0 + 0.5})
    server.append(
        {
            "t": up0 + 2.0,
            "kind": "pull",
            "t0": up0 + 1.9,
            "t1": up0 + 2.0,
            "replies": [{"reply_to": mid, "src": node_id, "type": "train", "error": False}],
        }
    )
    events["server"] += server
    events.setdefault(node, []).extend(node_events)


def _rows(walls, models, accs):
    rows, sim = [], 0.0
    for r, (wall, model, acc) in enumerate(zip(walls, models, accs, strict=True)):
        sim += model
        rows.append(
            {
                "round": str(r),
                "accuracy": str(acc),
                "wall_time_s": str(wall),
                "round_sim_time_s": str(model),
                "sim_time_s": str(sim),
                "bytes_down": "1400000",
                "bytes_up": "1400000",
                "replies": "2" if r else "0",
            }
        )
    return rows


def test_message_paths_follow_each_message_through_its_node():
    events = {"server": []}
    _train_message(events, "0", 11, "m1", 1, t=100.0)
    _train_message(events, "1", 22, "m2", 1, t=100.0, startup=4.0)
    paths = message_paths(
        sorted(events["server"], key=lambda e: e["t"]),
        {k: v for k, v in events.items() if k != "server"},
    )
    assert [p.node for p in paths] == ["0", "1"]
    assert all(p.complete for p in paths)
    phases = paths[1].phases()
    assert phases["wait"] == pytest.approx(1.0)
    assert phases["download"] == pytest.approx(0.5)
    assert phases["to_process"] == pytest.approx(1.4)  # launched 0.4 s after, then 1 s
    assert phases["app_load"] == pytest.approx(3.0)
    assert paths[1].startup() == pytest.approx(4.4) and paths[1].process_startup() == 4.0
    assert phases["handler"] == pytest.approx(2.0)
    assert phases["upload_wait"] == pytest.approx(0.3)
    assert phases["upload"] == pytest.approx(0.5)
    assert phases["collect"] == pytest.approx(1.5)
    # The steps add up to the message's time from dispatch to collection.
    assert sum(phases.values()) + 0.1 == pytest.approx(paths[1].collected - paths[1].dispatch)
    assert paths[1].cpu()["handler_runqueue_s"] == pytest.approx(1.0)


def test_round_table_compares_the_model_with_the_wall_clock():
    events = {"server": []}
    for rnd, t in ((1, 100.0), (2, 120.0)):
        _train_message(events, "0", 11, f"a{rnd}", rnd, t=t)
        _train_message(events, "1", 22, f"b{rnd}", rnd, t=t, startup=4.0)
    paths = message_paths(
        sorted(events["server"], key=lambda e: e["t"]),
        {k: v for k, v in events.items() if k != "server"},
    )
    rows = _rows([5.0, 20.0, 36.0], [0.0, 12.0, 20.0], [0.1, 0.5, 0.95])
    table = round_table(rows, paths, link_rate_bytes_per_s=PAPER_RATE)
    assert set(ROUND_COLUMNS) <= set(table[1])
    assert table[0]["wall_round_s"] == ""
    r1, r2 = table[1], table[2]
    assert r1["wall_round_s"] == 15.0 and r2["wall_round_s"] == 16.0
    assert r1["model_error"] == pytest.approx(12 / 15 - 1)
    assert r2["model_error"] == pytest.approx(20 / 16 - 1)
    # Node 1 (start-up 4 s) is the round's critical message.
    assert r2["startup_s"] == pytest.approx(4.4) and r2["startup_mean_s"] == pytest.approx(3.9)
    assert r2["process_startup_s"] == pytest.approx(4.0)
    assert r2["runqueue_s"] == pytest.approx(0.4 + 1.0)
    assert r2["corrected_round_s"] == pytest.approx(16.0 - 1.4)
    assert r2["model_comm_s"] == pytest.approx(1_400_000 / PAPER_RATE)
    assert r2["replies_probed"] == 2
    # What the model leaves out of each round, and the model plus that cost as measured in
    # the rounds before: nothing to add in round 1, round 1's 3 s in round 2.
    assert r1["runtime_s"] == pytest.approx(15 - 12) and r2["runtime_s"] == pytest.approx(16 - 20)
    assert r1["model_runtime_round_s"] == "" and r1["model_runtime_error"] == ""
    assert r2["model_runtime_round_s"] == pytest.approx(20 + 3)
    assert r2["model_runtime_error"] == pytest.approx(23 / 16 - 1)

    summary = run_summary(table, paths, [0.9, 0.99], {"initial_pruning": {"wall_time_s": 3}})
    assert summary["model_error"]["from_round_2"]["total_error"] == pytest.approx(0.25)
    plus = summary["model_plus_runtime_error"]["from_round_2"]
    assert plus["total_error"] == pytest.approx(23 / 16 - 1) and plus["rounds_within_0.2"] == 0
    assert summary["runtime_s"]["mean"] == pytest.approx(-0.5)
    parts = summary["round_parts_from_round_2_s"]
    assert parts["wall_round_s"] == {"mean": 16.0, "stdev": None, "min": 16.0, "max": 16.0}
    assert parts["startup_s"]["mean"] == pytest.approx(4.4)
    hit = summary["time_to_target"]["0.9"]
    assert hit == {
        "round": 2,
        "wall_s": 31.0,
        "model_s": 32.0,
        "corrected_s": pytest.approx(15.0 - 1.4 + 16.0 - 1.4),
    }
    assert summary["time_to_target"]["0.99"] is None
    assert summary["contention"]["handler_wall_over_cpu"] == pytest.approx(2.0)


def test_queries_before_the_round_are_not_its_setup():
    """The population check runs before initial pruning: round 1's setup holds only the
    queries in its own window (here a profile query 3 s before its training)."""
    events = {"server": []}
    _train_message(events, "0", 11, "a1", 1, t=100.0)
    paths = message_paths(
        sorted(events["server"], key=lambda e: e["t"]),
        {k: v for k, v in events.items() if k != "server"},
    )
    identify = MessagePath("q1", "query.identify", 11, None, 10.0, 10.1, collected=12.0)
    profile = MessagePath("q2", "query.profile", 11, None, 97.0, 97.1, collected=99.5)
    rows = _rows([60.0, 75.0], [0.0, 1.0], [0.5, 0.6])  # round 1: 15 s of wall time
    table = round_table(rows, [identify, profile, *paths], link_rate_bytes_per_s=PAPER_RATE)
    train_s = paths[0].collected - paths[0].dispatch
    start = 100.0 - (15.0 - train_s)
    assert table[1]["setup_s"] == pytest.approx(99.5 - max(start, 97.0))
    assert 0 < table[1]["setup_s"] <= 3.0 and table[1]["runtime_s"] > 0


def test_error_stats_and_targets_on_plain_numbers():
    s = error_stats([8.0, 12.0], [10.0, 10.0], within=0.2)
    assert s["total_error"] == 0.0 and s["mean_abs_error"] == 0.2 and s["rounds_within_0.2"] == 2
    assert error_stats([], []) == {"rounds": 0}
    table = [{"round": 0, "accuracy": 0.1, "wall_time_s": 2.0, "sim_time_s": 0.0}]
    assert time_to_targets(table, [0.5]) == {"0.5": None}


def test_events_outside_the_window_and_cut_lines_are_skipped(tmp_path):
    path = tmp_path / "node-0.jsonl"
    path.write_text('{"t": 1, "kind": "a"}\n{"t": 5, "kind": "b"}\n{"t": 6, "ki')
    assert [e["kind"] for e in read_events([path, tmp_path / "missing"], 2, 10)] == ["b"]


# ---------------------------------------------------------------------- fast: settings
def test_rates_one_for_all_or_one_per_node():
    assert parse_rates("1.44e6", 3) == [1.44e6] * 3
    assert parse_rates("1e6,2e6", 2) == [1e6, 2e6]
    for bad in ("1e6,2e6", "0", "-1"):
        with pytest.raises(SystemExit, match="--rates"):
            parse_rates(bad, 3)
    assert burst_bytes(PAPER_RATE) == 16 * 1024 and burst_bytes(1e8) == 400_000


def test_the_run_config_is_valid_and_gives_the_model_the_shaped_links(tmp_path):
    from flwr.common.config import parse_config_args

    before, after = method_run_config("fedavg", 5, [PAPER_RATE, 3e5], tmp_path / "o'ut x")
    settings = Settings.from_run_config(parse_config_args([before, after]))
    assert settings.cost_profile == "measured" and settings.method == "fedavg"
    assert settings.bandwidth(0) == PAPER_RATE and settings.bandwidth(1) == 3e5
    assert settings.clients_per_round == 2 and settings.num_server_rounds == 5
    assert settings.output_dir == str(tmp_path / "o'ut x") and settings.run_name == "fedavg"
    assert not settings.warm_start


def test_a_warm_method_gets_the_shared_server_phase(tmp_path):
    from flwr.common.config import parse_config_args

    before, after = method_run_config("fedavg-warm", 5, [PAPER_RATE], tmp_path)
    settings = Settings.from_run_config(parse_config_args([before, after]))
    assert settings.method == "fedavg" and settings.run_name == "fedavg-warm"
    assert settings.warm_start and settings.warm_start_cache == str(tmp_path / "warm-start-cache")


def test_the_probe_wrappers_load_it_by_path(tmp_path):
    script = wrapper_script("clientapp", python="/usr/bin/python3")
    assert script.startswith("#!/usr/bin/python3\n")
    assert "spec_from_file_location" in script and "sys.path" not in script


def test_the_poll_cap_shortens_flowers_sleeps_and_nothing_else():
    import time
    import types

    import flwr.supernode.start_client_internal as sci

    # The module the cap replaces its clock in is the one whose loop sleeps 3 s.
    assert sci.time is time and "time.sleep(3)" in Path(sci.__file__).read_text()
    fake = types.SimpleNamespace(__name__="fake", time=time)
    cap_polling(fake, 0.05)
    t0 = time.monotonic()
    fake.time.sleep(3)  # Flower's idle poll
    fake.time.sleep(0.01)  # shorter sleeps stay as they are
    assert time.monotonic() - t0 < 1.0
    assert abs(fake.time.time() - time.time()) < 1.0  # the rest is the time module
    assert fake.time.perf_counter is time.perf_counter


def test_the_poll_cap_refuses_what_it_cannot_do():
    import types

    with pytest.raises(SystemExit, match="positive"):
        cap_polling(types.SimpleNamespace(__name__="fake", time=__import__("time")), 0.0)
    with pytest.raises(SystemExit, match="no `time` module"):
        cap_polling(types.SimpleNamespace(__name__="fake"), 0.25)


def test_the_testbed_keeps_flowers_polling_unless_asked():
    assert build_parser().parse_args([]).supernode_poll_s == DEFAULT_POLL_S == 0
    assert build_parser().parse_args(["--supernode-poll-s", "0.5"]).supernode_poll_s == 0.5
    with pytest.raises(SystemExit):
        main(["--supernode-poll-s", "-1", "--check"])


# ---------------------------------------------------------------------- slow: a testbed
def _can_run_testbed() -> str:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs root on Linux"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "needs ip and tc (iproute2)"
    return ""


@pytest.mark.slow
@pytest.mark.skipif(bool(_can_run_testbed()), reason=_can_run_testbed() or "ok")
def test_two_shaped_supernodes_run_two_rounds_and_leave_nothing_behind(tmp_path):
    rate, size = PAPER_RATE, 2_000_000
    cmd = [
        sys.executable,
        "-m",
        "deploy.edge_testbed",
        "--methods",
        "prunefl",
        "--num-supernodes",
        "2",
        "--rounds",
        "2",
        "--rates",
        str(rate),
        "--link-check-bytes",
        str(size),
        "--run-config",
        "model='small-cnn' cost-profile='paper-uniform' ip-max-iterations=100",
        "--output-dir",
        str(tmp_path),
        "--run-name",
        "edge",
        "--timeout-s",
        "600",
        "--supernode-poll-s",
        "0.25",
    ]
    done = subprocess.run(
        cmd, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=900, check=False
    )
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "edge" / "testbed.json").read_text())

    # The links limit throughput: 2 MB each way took at least 2 MB / rate.
    for check in report["link_check"]:
        for direction in ("down", "up"):
            assert check[direction]["elapsed_s"] >= size / rate, check
            assert check[direction]["of_rate"] < 1.0, check

    # The run finished: two rounds, and the testbed's columns beside the ServerApp's.
    out = tmp_path / "edge" / "prunefl"
    assert report["methods"]["prunefl"]["status"] == "finished:completed"
    rows = list(csv.DictReader((out / "rounds.csv").open()))
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    for row in rows[1:]:
        assert float(row["wall_round_s"]) > 0 and float(row["startup_s"]) > 0
        assert int(row["replies_probed"]) == 2  # both messages followed end to end
    summary = json.loads((out / "testbed_summary.json").read_text())
    assert summary["messages"]["complete"] == summary["messages"]["probed"] >= 4
    assert "probe_missing" not in summary
    # Both SuperNodes ran with their polls capped as asked (deploy/probe.py).
    for node in range(2):
        events = tmp_path / "edge" / "work" / "events" / f"node-{node}.jsonl"
        caps = [json.loads(line) for line in events.read_text().splitlines()]
        assert [e["cap"] for e in caps if e["kind"] == "poll_cap"] == [0.25]
    traffic = json.loads((out / "deploy_summary.json").read_text())
    assert traffic["flower_network_traffic"]["total_bytes"] > 0
    assert (tmp_path / "edge" / "accuracy_vs_wallclock.png").is_file()

    # Nothing left behind: no process it started, no namespace of its prefix.
    assert report["left_behind"] == {"namespaces": [], "processes": []}
    assert not namespaces_with_prefix(report["namespace_prefix"])
    assert len(report["processes_started"]) >= 4  # SuperLink, 2 SuperNodes, log follower
    assert not [p for p in report["processes_started"] if _alive(p)]


@pytest.mark.slow
@pytest.mark.skipif(bool(_can_run_testbed()), reason=_can_run_testbed() or "ok")
def test_sigterm_in_the_middle_of_a_run_stops_everything(tmp_path):
    import signal
    import time

    log = tmp_path / "testbed.log"
    cmd = [
        sys.executable, "-m", "deploy.edge_testbed",
        "--methods", "fedavg",
        "--num-supernodes", "1",
        "--rounds", "50",
        "--link-check-bytes", "0",
        "--run-config", "model='small-cnn' cost-profile='paper-uniform'",
        "--output-dir", str(tmp_path),
        "--run-name", "edge",
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=PROJECT_DIR, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "fedavg: flwr run" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(1)
        time.sleep(15)  # inside the run
        prefix = f"fpt-{proc.pid}"
        assert namespaces_with_prefix(prefix)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    report = json.loads((tmp_path / "edge" / "testbed.json").read_text())
    assert report["left_behind"] == {"namespaces": [], "processes": []}
    assert not namespaces_with_prefix(prefix)
    assert not [p for p in report["processes_started"] if _alive(p)]
    assert "nothing left behind" in log.read_text()
