"""The simulation on a two-node Ray cluster (experiments/ray_cluster.py), and its helpers."""

import subprocess
import sys
import time

import pytest
from flwr.common.config import parse_config_args
from flwr.supercore.utils import simulation_config_from_json

from experiments.ray_cluster import (
    CLIENT_ACTOR,
    ProcessWatch,
    _proc_stat,
    _set_subreaper,
    federation_config,
    merge_run_config,
    processes_naming,
    ray_start_command,
    run_on_cluster,
)


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_ray_start_commands_use_their_own_ports_and_temp_dir(tmp_path):
    head, address = ray_start_command(tmp_path, num_cpus=1)
    worker, none = ray_start_command(tmp_path, address, num_cpus=1)
    assert none is None and address.startswith("127.0.0.1:")
    assert "--head" in head and "--head" not in worker
    assert _flag(head, "--port") == address.rsplit(":", 1)[1]
    assert _flag(worker, "--address") == address
    for cmd in (head, worker):
        assert cmd[:5] == [sys.executable, "-m", "ray.scripts.scripts", "start", "--block"]
        assert _flag(cmd, "--temp-dir") == str(tmp_path)
        assert _flag(cmd, "--num-cpus") == "1"
    # No fixed default port (6379, 10001, 8265, 52365): every port is chosen free.
    ports = [int(_flag(c, f)) for c in (head, worker) for f in c if f.endswith("-port")]
    assert len(ports) == 3 + 2 * 6 and len(set(ports)) == len(ports)
    assert not {6379, 10001, 8265, 52365} & set(ports)


def test_federation_config_is_accepted_by_flower_and_sets_no_cpu_count():
    # Ray refuses num_cpus/num_gpus in ray.init() when it joins an existing cluster.
    extra = federation_config()
    parsed = parse_config_args([f"num-supernodes=3 client-resources-num-cpus=1 {extra}"])
    config = simulation_config_from_json({k.replace("-", "_"): v for k, v in parsed.items()})
    assert config.init_args_logging_level == "INFO"
    assert not config.HasField("init_args_num_cpus")
    assert not config.HasField("init_args_num_gpus")


def test_merge_run_config_lets_later_keys_win_and_keeps_types():
    merged = merge_run_config(
        "model='small-cnn' num-server-rounds=3 layer-format='dense'",
        "",
        "num-server-rounds=5 speed-factors='1,2.5' learning-rate=0.05 layer-format='sparse'",
        'output-dir="/tmp/a b"',
    )
    assert parse_config_args([merged]) == {
        "model": "small-cnn",
        "num-server-rounds": 5,
        "layer-format": "sparse",
        "speed-factors": "1,2.5",
        "learning-rate": 0.05,
        "output-dir": "/tmp/a b",
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="child subreaper is Linux")
def test_process_watch_catches_an_orphan_and_stops_it():
    previous = _set_subreaper(True)
    try:
        with ProcessWatch(interval_s=0.05) as watch:
            # The shell exits at once; its background `sleep` is orphaned and, with this
            # process a subreaper, reparented here rather than to init.
            subprocess.run(["sh", "-c", "sleep 60 &"], check=True, stdout=subprocess.DEVNULL)
            deadline = time.monotonic() + 5
            while not any("sleep 60" in c for c in watch.alive().values()):
                assert time.monotonic() < deadline, "orphan not seen"
                time.sleep(0.05)
        killed = watch.kill_survivors(grace_s=5)
    finally:
        _set_subreaper(bool(previous))
    assert len(killed) == 1
    assert not watch.alive()


@pytest.mark.slow
def test_simulation_runs_on_a_two_node_ray_cluster_and_nothing_is_left(tmp_path):
    r = run_on_cluster(
        num_supernodes=3,
        output_dir=tmp_path / "outputs",
        run_name="ray",
        flwr_home=tmp_path / "flwr-home",
        timeout_s=600,
        capture=True,
        log=lambda *_: None,
    )
    assert r.returncode == 0, r.output[-4000:]
    # The run finished: three rounds, results written.
    assert r.summary is not None and r.summary["rounds"] == 3, r.output[-6000:]
    assert (tmp_path / "outputs" / "ray" / "metrics.csv").exists()
    assert "[fedprune] round   3" in r.output
    # It ran on this cluster: Flower's simulation process was the cluster's driver,
    # and ClientApp actors ran on both nodes.
    assert "Connecting to existing Ray cluster" in r.output
    assert len(r.nodes) == 2 and sorted(n["head"] for n in r.nodes.values()) == [False, True]
    assert any("flwr-simulation" in job["entrypoint"] for job in r.activity["jobs"])
    assert r.actor_nodes.get("head", 0) >= 1 and r.actor_nodes.get("worker", 0) >= 1
    assert sum(a["class"] == CLIENT_ACTOR for a in r.activity["actors"]) == 2
    # Every process it started is gone, Ray's daemons of both nodes included.
    commands = [cmd for _, cmd in r.processes.values()]
    assert sum("raylet/raylet" in c for c in commands) == 2
    assert any("gcs_server" in c for c in commands)
    assert any("flower-superlink" in c for c in commands)
    assert not r.left
    for pid, (start, cmd) in r.processes.items():
        stat = _proc_stat(pid)
        assert stat is None or stat[2] != start or stat[0] == "Z", f"{pid} alive: {cmd}"
    assert not processes_naming(str(r.temp_dir))
    assert not r.temp_dir.exists()
