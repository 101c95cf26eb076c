"""Run this app's simulation on a two-node Ray cluster started here, then stop it all by pid.

Flower's Simulation Engine calls `ray.init()` without an address, and Ray then joins the
cluster named by the RAY_ADDRESS environment variable. So a SuperLink started with
RAY_ADDRESS=HEAD:PORT runs every simulation on that cluster (docs/ray-cluster.md). This
script shows it on one machine:

1. starts a head node (`ray start --head --block`) and one worker node
   (`ray start --address HEAD:PORT --block`), each a child process in its own session,
   with 1 CPU, free ports and a private temporary directory, and waits until the
   cluster's GCS lists both nodes alive;
2. starts a private SuperLink (experiments.local_run) with RAY_ADDRESS set to the head
   and runs a short simulation of this app on it (`flwr run . --stream`);
3. reads from the cluster's GCS which driver connected (the simulation process) and on
   which node each ClientAppActor ran, and checks that the run wrote its summary.json;
4. stops every process it started, by pid: the SuperLink and everything below it, the
   worker node, then the head node (each `ray start --block` stops its own daemons on
   SIGTERM), then anything of ours still alive. While the cluster runs, this process is
   a child subreaper (Linux), so a Ray daemon whose parent exits stays below it instead
   of escaping to init; every process seen below it is recorded and must be gone at the
   end, and no process may still name the cluster's temporary directory.

Nothing here uses `ray stop` (it stops every Ray process of the user on the machine).

    python -m experiments.ray_cluster
    python -m experiments.ray_cluster --num-supernodes 4 --run-config "num-server-rounds=5"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.local_run import (
    PROJECT_DIR,
    QUIET_ENV,
    free_port,
    local_superlink,
    raise_on_sigterm,
    signals_held,
    stop_tree,
    tool_env,
)

CLIENT_ACTOR = "ClientAppActor"  # Flower's Ray actor class that runs the ClientApp
DEFAULT_RUN_CONFIG = (
    "model='small-cnn' cost-profile='paper-uniform' num-server-rounds=3 "
    "ip-max-iterations=100 reconfig-interval=2"
)
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


# ---------------------------------------------------------------------------- commands


def ray_start_command(
    temp_dir: Path,
    head_address: str | None = None,
    num_cpus: int = 1,
    object_store_bytes: int = 256 * 2**20,
) -> tuple[list[str], str | None]:
    """`ray start ... --block` for a head node (`head_address` None) or a worker node.

    Every port Ray would otherwise take at a fixed default (GCS 6379, client server
    10001, dashboard 8265, dashboard agent 52365) or at random is set to a free port,
    so the cluster does not collide with other Ray instances on the machine. Returns the
    command and, for a head node, the address workers and drivers connect to.
    """
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block"]
    address = None
    if head_address is None:
        address = f"127.0.0.1:{free_port()}"
        cmd += [
            "--head",
            "--port",
            address.rsplit(":", 1)[1],
            "--ray-client-server-port",
            str(free_port()),
            "--include-dashboard",
            "false",
            "--dashboard-port",
            str(free_port()),
        ]
    else:
        cmd += ["--address", head_address]
    cmd += [
        "--num-cpus",
        str(num_cpus),
        "--num-gpus",
        "0",
        "--object-store-memory",
        str(object_store_bytes),
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
    ]
    for flag in (
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    ):
        cmd += [flag, str(free_port())]
    return cmd, address


def federation_config(logging_level: str = "INFO") -> str:
    """Extra `--federation-config` keys for a run on an existing cluster.

    Ray refuses `num_cpus`/`num_gpus` in `ray.init()` when it joins a cluster, so no
    `init-args-num-*` key may be given; INFO makes the run's log show Ray's "Connecting
    to existing Ray cluster at address: ..." line.
    """
    return f"init-args-logging-level='{logging_level}'"


def merge_run_config(*parts: str) -> str:
    """One `--run-config` string from several, a key in a later part replacing the same
    key in an earlier one (Flower's parser refuses a key given twice in one string)."""
    from flwr.common.config import parse_config_args

    merged: dict[str, Any] = {}
    for part in parts:
        if part.strip():
            merged.update(parse_config_args([part]))
    return " ".join(f"{k}={_toml_value(v)}" for k, v in merged.items())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    return repr(value)


# ---------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time in clock ticks) of a process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _set_subreaper(on: bool) -> bool | None:
    """Make this process a child subreaper (Linux); returns the previous setting, or None
    where that is not possible."""
    if _LIBC is None:
        return None
    old = ctypes.c_int(0)
    if _LIBC.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(old), 0, 0, 0) != 0:
        return None
    if _LIBC.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        return None
    return bool(old.value)


def _die_with_parent() -> None:  # pragma: no cover (runs in the child before exec)
    """Linux: the child gets SIGTERM if the thread that started it dies without cleaning
    up (e.g. this script is killed with SIGKILL); a `ray start --block` then stops its
    own daemons. libc is loaded beforehand: nothing is looked up in the forked child."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ProcessWatch:
    """Records every process that appears below this one while it runs (a thread looks
    every `interval_s`), with its start time, so that a pid is never confused with a
    later process that reuses it. Processes that existed before are not recorded."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.root = os.getpid()
        self.before = set(self._below())
        self.seen: dict[int, tuple[int, str]] = {}  # pid -> (start ticks, command line)
        self.actors: dict[int, int] = {}  # ClientAppActor pid -> its parent (a raylet)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="process-watch", daemon=True)

    def _below(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for pid in _all_pids():
            stat = _proc_stat(pid)
            if stat:
                children.setdefault(stat[1], []).append(pid)
        found, frontier = [], [self.root]
        while frontier:
            frontier = [c for p in frontier for c in children.get(p, [])]
            found.extend(frontier)
        return found

    def sample(self) -> None:
        for pid in self._below():
            if pid in self.before:
                continue
            stat = _proc_stat(pid)
            if stat is None or stat[0] == "Z":
                continue
            cmd = _cmdline(pid)
            with self._lock:
                known = self.seen.get(pid)
                # Keep the latest command line: a process seen between fork and exec
                # still shows its parent's.
                if known is None or known[0] != stat[2] or cmd:
                    self.seen[pid] = (stat[2], cmd)
                if cmd.startswith(f"ray::{CLIENT_ACTOR}"):
                    self.actors[pid] = stat[1]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def alive(self) -> dict[int, str]:
        """Recorded processes still running (zombies count as gone)."""
        with self._lock:
            seen = dict(self.seen)
        out = {}
        for pid, (start, cmd) in seen.items():
            stat = _proc_stat(pid)
            if stat and stat[2] == start and stat[0] != "Z":
                out[pid] = cmd
        return out

    def kill_survivors(self, grace_s: float = 10.0) -> list[int]:
        """SIGTERM every recorded process still alive, SIGKILL it after `grace_s`; reap
        the ones that ended up as this process's children. Returns the pids signalled."""
        survivors = list(self.alive())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace_s
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        self.reap()
        return survivors

    def reap(self) -> None:
        """Collect exit statuses of recorded processes that were reparented to this one
        (a subreaper must, or they stay zombies until it exits)."""
        with self._lock:
            seen = dict(self.seen)
        for pid, (start, _) in seen.items():
            stat = _proc_stat(pid)
            if stat and stat[2] == start and stat[1] == self.root and stat[0] == "Z":
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)


def processes_naming(text: str) -> dict[int, str]:
    """Running processes (anyone's) whose command line contains `text`."""
    out = {}
    for pid in _all_pids():
        cmd = _cmdline(pid)
        if text in cmd and pid != os.getpid():
            stat = _proc_stat(pid)
            if stat and stat[0] != "Z":
                out[pid] = cmd
    return out


# ---------------------------------------------------------------------------- the GCS


def _gcs(address: str):
    from ray._raylet import GcsClient  # Ray's own client of the cluster's GCS

    return GcsClient(address=address)


def alive_nodes(address: str) -> dict[str, dict[str, Any]]:
    """The cluster's alive nodes, from its GCS: node id -> {head, cpus}."""
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    nodes = _gcs(address).get_all_node_info(timeout=5)
    return {
        node_id.hex(): {
            "head": info.is_head_node,
            "cpus": info.resources_total.get("CPU", 0.0),
        }
        for node_id, info in nodes.items()
        if info.state == GcsNodeInfo.GcsNodeState.ALIVE
    }


def cluster_activity(address: str) -> dict[str, Any]:
    """What ran on the cluster, from its GCS: each driver (job) that connected, and each
    actor with the node it ran on."""
    client = _gcs(address)
    jobs = [
        {
            "job_id": job_id.hex(),
            "driver_pid": info.driver_pid,
            "entrypoint": info.entrypoint,
            "finished": info.is_dead,
        }
        for job_id, info in client.get_all_job_info(timeout=5).items()
    ]

    async def _actors():
        return await client.async_get_all_actor_info(timeout=5)

    actors = [
        {
            "class": info.class_name,
            "node_id": info.address.node_id.hex(),
            "pid": info.pid,
            "state": type(info).ActorState.Name(info.state),
        }
        for info in asyncio.run(_actors()).values()
    ]
    return {"jobs": jobs, "actors": actors}


# ---------------------------------------------------------------------------- the cluster


@dataclass
class RayCluster:
    """A head and a worker node started by `local_ray_cluster`."""

    address: str
    temp_dir: Path
    head: subprocess.Popen
    worker: subprocess.Popen
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # node id -> info

    def role(self, node_id: str) -> str:
        info = self.nodes.get(node_id)
        if info is None:
            return "unknown"
        return "head" if info["head"] else "worker"


def _start_node(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )


def _wait_for_nodes(
    address: str, count: int, procs: list[subprocess.Popen], logs: list[Path], timeout_s: float
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    nodes: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"`ray start` exited with {proc.returncode}:\n{tail}")
        with contextlib.suppress(Exception):  # the GCS is not up yet
            nodes = alive_nodes(address)
            if len(nodes) >= count:
                return nodes
        time.sleep(0.5)
    raise RuntimeError(
        f"Ray cluster at {address}: {len(nodes)} of {count} nodes alive after {timeout_s:.0f} s"
    )


@contextlib.contextmanager
def local_ray_cluster(
    num_cpus_per_node: int = 1,
    object_store_bytes: int = 256 * 2**20,
    startup_timeout_s: float = 180.0,
    keep_temp: bool = False,
) -> Iterator[RayCluster]:
    """A head node and one worker node on this machine; both stopped by pid on exit.

    The temporary directory is a short one under the system's (Ray's socket paths must
    stay under 108 characters) and is removed at the end unless `keep_temp`.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-"))
    env = tool_env({**os.environ, **QUIET_ENV})
    env.pop("RAY_ADDRESS", None)  # the worker is told the head's address explicitly
    procs: list[subprocess.Popen] = []
    try:
        head_cmd, address = ray_start_command(
            temp_dir, num_cpus=num_cpus_per_node, object_store_bytes=object_store_bytes
        )
        assert address is not None
        logs = [temp_dir / "head.log", temp_dir / "worker.log"]
        procs.append(_start_node(head_cmd, env, logs[0]))
        _wait_for_nodes(address, 1, procs, logs[:1], startup_timeout_s)
        worker_cmd, _ = ray_start_command(
            temp_dir, address, num_cpus=num_cpus_per_node, object_store_bytes=object_store_bytes
        )
        procs.append(_start_node(worker_cmd, env, logs[1]))
        nodes = _wait_for_nodes(address, 2, procs, logs, startup_timeout_s)
        yield RayCluster(address, temp_dir, procs[0], procs[1], nodes)
    finally:
        with signals_held():
            for proc in reversed(procs):  # the worker first, then the head
                stop_tree(proc)
            if not keep_temp:
                shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------- one run


@dataclass
class ClusterRun:
    """What `run_on_cluster` saw."""

    returncode: int
    summary: dict[str, Any] | None
    output_dir: Path
    address: str
    temp_dir: Path  # the cluster's (removed at the end)
    nodes: dict[str, dict[str, Any]]
    activity: dict[str, Any]
    actor_nodes: dict[str, int]  # "head"/"worker" -> ClientAppActors that ran there
    actor_processes: dict[str, int]  # the same, counted from the processes seen
    processes: dict[int, tuple[int, str]]  # recorded below this one: pid -> (start, cmd)
    left: dict[int, str]  # of those, still alive after the stop (must be empty)
    killed: list[int]  # survivors of the orderly stop that needed a signal of their own
    seconds: dict[str, float]
    output: str = ""


def _actors_per_node(
    cluster: RayCluster, activity: dict[str, Any], watch: ProcessWatch
) -> tuple[dict[str, int], dict[str, int]]:
    """ClientAppActors per node ("head"/"worker"): from the GCS's actor table, and from
    the processes seen (an actor's parent is a raylet, whose parent is a `ray start`)."""
    from_gcs: dict[str, int] = {}
    for actor in activity["actors"]:
        if actor["class"] == CLIENT_ACTOR:
            role = cluster.role(actor["node_id"])
            from_gcs[role] = from_gcs.get(role, 0) + 1
    roles = {cluster.head.pid: "head", cluster.worker.pid: "worker"}
    from_processes: dict[str, int] = {}
    for raylet in watch.actors.values():
        stat = _proc_stat(raylet)
        role = roles.get(stat[1], "unknown") if stat else "unknown"
        from_processes[role] = from_processes.get(role, 0) + 1
    return from_gcs, from_processes


def run_on_cluster(
    run_config: str = "",
    num_supernodes: int = 4,
    output_dir: Path = PROJECT_DIR / "outputs",
    run_name: str | None = None,
    flwr_home: Path | None = None,
    timeout_s: float = 900.0,
    capture: bool = False,
    log=print,
) -> ClusterRun:
    """Start the cluster, run the app on it, stop everything; see the module docstring."""
    run_name = run_name or time.strftime("ray-cluster-%Y%m%d-%H%M%S")
    output_dir = output_dir.resolve()
    config = merge_run_config(
        DEFAULT_RUN_CONFIG,
        f"clients-per-round={num_supernodes}",
        run_config,
        f"output-dir={json.dumps(str(output_dir))} run-name={json.dumps(run_name)}",
    )
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    previous = _set_subreaper(True)
    watch = ProcessWatch()
    try:
        with watch, local_ray_cluster() as cluster:
            seconds["cluster_start"] = time.monotonic() - t0
            log(
                f"[ray-cluster] {len(cluster.nodes)} nodes alive at {cluster.address}: "
                f"head pid {cluster.head.pid}, worker pid {cluster.worker.pid}, "
                f"temp dir {cluster.temp_dir}"
            )
            t1 = time.monotonic()
            with local_superlink(flwr_home, extra_env={"RAY_ADDRESS": cluster.address}) as link:
                done = link.run(
                    config,
                    num_supernodes=num_supernodes,
                    timeout_s=timeout_s,
                    capture=capture,
                    federation_config=federation_config(),
                )
            seconds["simulation"] = time.monotonic() - t1
            activity = cluster_activity(cluster.address)
            actor_nodes, actor_processes = _actors_per_node(cluster, activity, watch)
            t2 = time.monotonic()
    finally:
        with signals_held():
            killed = watch.kill_survivors()
            if previous is not None:
                _set_subreaper(previous)
    seconds["stop"] = time.monotonic() - t2
    seconds["total"] = time.monotonic() - t0
    left = {**watch.alive(), **processes_naming(str(cluster.temp_dir))}
    summary_path = output_dir / run_name / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return ClusterRun(
        returncode=done.returncode,
        summary=summary,
        output_dir=output_dir / run_name,
        address=cluster.address,
        temp_dir=cluster.temp_dir,
        nodes=cluster.nodes,
        activity=activity,
        actor_nodes=actor_nodes,
        actor_processes=actor_processes,
        processes=dict(watch.seen),
        left=left,
        killed=killed,
        seconds=seconds,
        output=(done.stdout or "") + (done.stderr or "") if capture else "",
    )


def report(r: ClusterRun) -> str:
    lines = [f"[ray-cluster] simulation exit code {r.returncode}; results in {r.output_dir}"]
    if r.summary:
        lines.append(
            f"[ray-cluster] {r.summary['rounds']} rounds, final accuracy "
            f"{r.summary['final_accuracy']:.4f} at density {r.summary['final_density']:.4f}"
        )
    for job in r.activity["jobs"]:
        lines.append(
            f"[ray-cluster] driver connected to {r.address}: pid {job['driver_pid']}, "
            f"{job['entrypoint'].split(' --')[0]}"
        )
    lines.append(
        "[ray-cluster] ClientAppActors per node (GCS): "
        + ", ".join(f"{k} {v}" for k, v in sorted(r.actor_nodes.items()))
        + "; processes seen: "
        + ", ".join(f"{k} {v}" for k, v in sorted(r.actor_processes.items()))
    )
    lines.append(
        f"[ray-cluster] {len(r.processes)} processes started below this one; "
        f"{len(r.left)} left after the stop"
        + (f" (stopped by a signal of their own: {r.killed})" if r.killed else "")
    )
    s = r.seconds
    lines.append(
        f"[ray-cluster] cluster start {s.get('cluster_start', 0):.1f} s, simulation "
        f"{s.get('simulation', 0):.1f} s, stop {s.get('stop', 0):.1f} s, "
        f"total {s['total']:.1f} s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-supernodes", type=int, default=4)
    parser.add_argument(
        "--run-config",
        default="",
        help=f'added to "{DEFAULT_RUN_CONFIG}", e.g. "num-server-rounds=5 seed=1"',
    )
    parser.add_argument("--output-dir", type=Path, default=PROJECT_DIR / "outputs")
    parser.add_argument("--run-name", default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    try:
        r = run_on_cluster(args.run_config, args.num_supernodes, args.output_dir, args.run_name)
    except KeyboardInterrupt:
        print("[ray-cluster] interrupted; all processes stopped", file=sys.stderr)
        return 130
    except SystemExit as exc:  # SIGTERM (raise_on_sigterm)
        print("[ray-cluster] terminated; all processes stopped", file=sys.stderr)
        return int(exc.code)
    print(report(r), flush=True)
    if r.left:
        for pid, cmd in r.left.items():
            print(f"[ray-cluster] still running: {pid} {cmd[:120]}", file=sys.stderr)
    ok = r.returncode == 0 and r.summary is not None and not r.left
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
