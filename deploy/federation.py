"""A running Flower federation made of processes this script started: one SuperLink and its
SuperNodes, with TLS and SuperNode authentication, driven with the `flwr` CLI, and
stopped by pid.

Shared by `deploy.local_federation` (everything on loopback) and `deploy.edge_testbed`
(each process in its own network namespace behind a shaped link). What differs between
them is only *where* a process runs and *which address* reaches the SuperLink:

- `Federation.cli_prefix` goes before every `flwr` command (the testbed: `ip netns exec
  <the SuperLink's namespace>`, where the CLI reaches the SuperLink on 127.0.0.1);
- a `SuperNode` has its own `wrap` prefix, extra environment, CPU set, program and
  SuperLink address (the testbed: its namespace, its core, the probe, the address of the
  SuperLink at the other end of its link).

Everything else (registering keys, waiting for nodes, starting, following and stopping
runs, reading Flower's traffic counters) is written once here.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.credentials import generate_node_key
from experiments.local_run import (
    QUIET_ENV,
    descendants,
    executable,
    free_port,
    signals_held,
    stop_tree,
    tool_env,
)

PROJECT_DIR = Path(__file__).resolve().parent.parent
WARM_CLIENTAPP = Path(__file__).resolve().parent / "warm_clientapp.py"
# A SuperNode the SuperLink refuses to activate (e.g. its public key is not registered)
# logs "Exit Code: 305 ... Failed to activate SuperNode" (flwr.supercore.exit) and exits
# with status 1.
REFUSED_EXIT_CODE = 305


def _child_setup(cpus: frozenset[int] | None):  # pragma: no cover (runs in the child)
    """What a child does before exec: on Linux, get SIGTERM if this script dies without
    cleaning up (SIGKILL; Flower's own helpers below it already exit with their parent,
    --parent-pid), and run on `cpus` only (inherited by everything it starts)."""

    def setup() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


def spawn(
    cmd: list[str],
    env: dict[str, str],
    cwd: Path,
    log: Path | None,
    cpus: Sequence[int] | None = None,
) -> subprocess.Popen:
    """Start a child with its output in `log` (None: this terminal), in its own session
    (a Ctrl-C in the terminal reaches only this script, which then stops the children in
    order), optionally pinned to the CPUs `cpus`."""
    with contextlib.ExitStack() as stack:
        out = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            out = stack.enter_context(log.open("ab"))
        linux = sys.platform.startswith("linux")
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            preexec_fn=_child_setup(frozenset(cpus) if cpus else None) if linux else None,
        )


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def superlink_command(tls: dict[str, Path], host: str, port: int, database: Path) -> list[str]:
    """`flower-superlink` with TLS, SuperNode authentication and no runtime dependency
    installation (the app runs in the environment that is installed)."""
    return [
        executable("flower-superlink"),
        "--ssl-ca-certfile",
        str(tls["ca_cert"]),
        "--ssl-certfile",
        str(tls["server_cert"]),
        "--ssl-keyfile",
        str(tls["server_key"]),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(database),
    ]


def federation_toml(name: str, address: str, ca_cert: Path) -> str:
    """The $FLWR_HOME/config.toml that names a TLS federation for the flwr CLI."""
    return (
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca_cert}"\n'
    )


def default_node_configs(num_supernodes: int, data_dir: Path | None = None) -> list[str]:
    """Node i's `--node-config`: "partition-id=i num-partitions=N", plus
    `data-path="data_dir/partition-<i>"` with `data_dir` (folders written by `python -m
    clients.prepare_data`), so it reads that folder instead of its share of the embedded
    data."""
    configs = []
    for i in range(num_supernodes):
        config = f"partition-id={i} num-partitions={num_supernodes}"
        if data_dir is not None:
            folder = Path(data_dir).resolve() / f"partition-{i}"
            if not (folder / "data.npz").is_file():
                raise FileNotFoundError(
                    f"{folder}/data.npz missing: write it with `python -m "
                    f"clients.prepare_data --out {data_dir} --num-partitions {num_supernodes}`"
                )
            config += f' data-path="{folder}"'
        configs.append(config)
    return configs


_HEALTH_CHECK = """
import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[1])
try:
    with urllib.request.urlopen(sys.argv[2], timeout=1.0, context=ctx) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError:
    sys.exit(1)
"""


def wait_https_health(
    proc: subprocess.Popen,
    port: int,
    ca_cert: Path,
    timeout_s: float,
    log: Path,
    prefix: Sequence[str] = (),
) -> None:
    """Wait until the SuperLink answers 200 on https://127.0.0.1:`port`/health, as seen
    from where `prefix` runs a command (e.g. inside its network namespace)."""
    url = f"https://127.0.0.1:{port}/health"
    cmd = [*prefix, sys.executable, "-c", _HEALTH_CHECK, str(ca_cert), url]
    context = ssl.create_default_context(cafile=str(ca_cert))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {proc.returncode}:\n{tail(log)}")
        if prefix:  # another network namespace: ask from there
            with contextlib.suppress(subprocess.TimeoutExpired):
                done = subprocess.run(cmd, capture_output=True, timeout=10, check=False)
                if done.returncode == 0:
                    return
        else:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(url, timeout=1.0, context=context) as r,
            ):
                if r.status == 200:
                    return
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink not healthy after {timeout_s:.0f} s:\n{tail(log)}")


@dataclass
class SuperNode:
    """One SuperNode: its key, its registered id, its node config and its process.

    `wrap` goes before its command (e.g. `ip netns exec NS`), `env` adds to its
    environment, `cpus` pins it (and everything it starts), `program` replaces
    `flower-supernode` (a wrapper that ends in Flower's), and `superlink` is the address
    it reaches the SuperLink at (None: the federation's)."""

    index: int
    key: Path
    node_config: str
    port: int
    home: Path
    node_id: int | None = None  # None: not registered
    process: subprocess.Popen | None = None
    starts: int = 0
    wrap: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cpus: tuple[int, ...] | None = None
    program: list[str] | None = None
    superlink: str | None = None

    @property
    def log(self) -> Path:
        # One log per start, so a restarted node's output is its own.
        return self.home / f"supernode-{self.starts}.log"


@dataclass
class RunOutcome:
    run_id: int
    status: str
    run: dict[str, Any]  # the run as `flwr list --format json` reports it
    log: Path | None = None


@dataclass
class Federation:
    """Handle on a running federation: its SuperLink process, its SuperNodes, and the
    `flwr` CLI environment (FLWR_HOME with the federation named `name` in config.toml)."""

    workdir: Path
    project_dir: Path
    address: str  # the SuperLink's Fleet API, as SuperNodes reach it (unless their own)
    ca_cert: Path
    env: dict[str, str]  # for the flwr CLI
    superlink: subprocess.Popen
    supernodes: list[SuperNode]
    name: str
    cli_prefix: list[str] = field(default_factory=list)
    # SuperNodes start their ClientApp processes forked from a process that has imported
    # torch and Flower once (deploy/warm_clientapp.py); False: Flower's cold starts.
    warm_clientapp: bool = True
    _others: list[subprocess.Popen] = field(default_factory=list)
    seen_pids: set[int] = field(default_factory=set)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    # ------------------------------------------------------------------ flwr CLI
    def flwr(self, *args: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """Run a `flwr` command with `--format json` against this federation; its JSON."""
        cmd = [*self.cli_prefix, sys.executable, "-m", "flwr.cli.app", *args, "--format", "json"]
        done = subprocess.run(
            cmd,
            env=self.env,
            cwd=self.project_dir,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        try:
            out = json.loads(done.stdout[done.stdout.index("{") :])
        except ValueError:
            out = {"success": False}
        if not out.get("success"):
            raise RuntimeError(
                f"{' '.join(args)} failed ({done.returncode}): {done.stdout[-2000:]}"
                f"{done.stderr[-2000:]}"
            )
        return out

    def register(self, public_key: Path) -> int:
        """`flwr supernode register KEY.pub <federation>`; the node id it gets."""
        out = self.flwr("supernode", "register", str(public_key), self.name)
        return int(out["node-id"])

    def node_status(self) -> dict[int, str]:
        """{node id: registered | online | offline | ...} as the SuperLink reports it."""
        out = self.flwr("supernode", "list", self.name)
        return {int(n["node-id"]): n["status"] for n in out["nodes"]}

    def wait_nodes(self, want: dict[int, str], timeout_s: float = 120.0) -> None:
        """Wait until every node in `want` has the wanted status."""
        deadline = time.monotonic() + timeout_s
        while True:
            for node in self.supernodes:
                if want.get(node.node_id) != "online" or node.process is None:
                    continue
                if node.process.poll() is not None:
                    raise RuntimeError(
                        f"SuperNode {node.index} exited with {node.process.returncode}; "
                        f"see {node.log}:\n{tail(node.log)}"
                    )
            status = self.node_status()
            if all(status.get(nid) == s for nid, s in want.items()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not {want} after {timeout_s:.0f} s: {status}")
            time.sleep(1.0)

    # ------------------------------------------------------------------ processes
    def _popen(
        self,
        cmd: list[str],
        env: dict[str, str],
        log: Path | None,
        cpus: Sequence[int] | None = None,
    ) -> subprocess.Popen:
        proc = spawn(cmd, env, self.project_dir, log, cpus)
        self.seen_pids.add(proc.pid)
        return proc

    def supernode_command(self, node: SuperNode) -> list[str]:
        warm = [sys.executable, str(WARM_CLIENTAPP), "--"] if self.warm_clientapp else []
        return [
            *node.wrap,
            *warm,
            *(node.program or [executable("flower-supernode")]),
            "--superlink",
            node.superlink or self.address,
            "--root-certificates",
            str(self.ca_cert),
            "--auth-supernode-private-key",
            str(node.key),
            "--node-config",
            node.node_config,
            "--host",
            "127.0.0.1",
            "--port",
            str(node.port),
        ]

    def start_supernode(self, node: SuperNode) -> subprocess.Popen:
        node.starts += 1
        # node.env last: a PATH of its own (the edge testbed's probe wrappers) must win
        # over the interpreter's scripts folder that tool_env puts first.
        env = {**tool_env({**os.environ, **QUIET_ENV}), "FLWR_HOME": str(node.home), **node.env}
        node.process = self._popen(self.supernode_command(node), env, node.log, node.cpus)
        return node.process

    def kill_supernode(self, node: SuperNode, hard: bool = True) -> None:
        """Stop a SuperNode: SIGKILL to it and everything below it (a crash), or a
        graceful SIGTERM stop (it tells the SuperLink it leaves)."""
        if node.process is None:
            return
        if hard:
            for pid in [node.process.pid, *descendants(node.process.pid)]:
                self.seen_pids.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            node.process.wait(timeout=10)
        else:
            self.seen_pids.update(descendants(node.process.pid))
            stop_tree(node.process)

    def add_supernode(self, node_config: str, register: bool = True, **where) -> SuperNode:
        """A further SuperNode with a new key (registered or not); not started yet.
        `where`: the SuperNode fields that say where it runs (wrap, env, cpus, program,
        superlink)."""
        index = len(self.supernodes)
        home = self.workdir / f"supernode-{index}"
        key, public = generate_node_key(home / "key", comment=f"supernode-{index}")
        # In its own network namespace a node could use any port; a free one works in both.
        node = SuperNode(index, key, node_config, free_port(), home, **where)
        node.node_id = self.register(public) if register else None
        self.supernodes.append(node)
        return node

    def start_cli(self, *args: str, log: Path | None) -> subprocess.Popen:
        """A long-running `flwr` command (e.g. `log --stream`), stopped with the rest;
        its output goes to `log` (None: this terminal)."""
        cmd = [*self.cli_prefix, sys.executable, "-m", "flwr.cli.app", *args]
        proc = self._popen(cmd, self.env, log)
        self._others.append(proc)
        return proc

    def stop(self) -> None:
        """Stop every process this federation started, SuperNodes before the SuperLink."""
        procs = [*self._others, *(n.process for n in self.supernodes if n.process)]
        with signals_held():
            for proc in [*procs, self.superlink]:
                self.seen_pids.update(descendants(proc.pid))
                stop_tree(proc)

    # ------------------------------------------------------------------ runs
    def start_run(self, run_config: list[str] | str = ()) -> int:
        """`flwr run <project> <federation>` (detached); the run id."""
        args = ["run", str(self.project_dir), self.name]
        for rc in [run_config] if isinstance(run_config, str) else run_config:
            if rc:
                args += ["--run-config", rc]
        return int(self.flwr(*args, timeout_s=300)["run-id"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        """The run as `flwr list <federation> --run-id ID --format json` reports it."""
        return self.flwr("list", self.name, "--run-id", str(run_id))["runs"][0]

    def wait_run(self, run_id: int, timeout_s: float = 900.0, poll_s: float = 2.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while (info := self.run_info(run_id))["status"].split(":")[0] != "finished":
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {info['status']} after {timeout_s} s")
            time.sleep(poll_s)
        return info

    def stop_run(self, run_id: int) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.flwr("stop", str(run_id), self.name, timeout_s=60)

    def run(
        self, run_config: list[str] | str = (), timeout_s: float = 900.0, log: Path | None = None
    ) -> RunOutcome:
        """Start a run, stream its log into `log` (or this terminal), wait for its end.

        It waits for the log stream to end (`flwr log --stream` ends with the run), then
        reads the run's state; only if the stream ended early does it poll `flwr list`.
        Each `flwr` call costs about a CPU-second here, on the cores the nodes train on.
        """
        deadline = time.monotonic() + timeout_s
        run_id = self.start_run(run_config)
        follower = self.start_cli("log", str(run_id), self.name, "--stream", log=log)
        try:
            with contextlib.suppress(subprocess.TimeoutExpired):
                follower.wait(timeout=timeout_s)
            left = max(30.0, deadline - time.monotonic())
            info = self.wait_run(run_id, timeout_s=left, poll_s=10.0)
        except BaseException:
            self.stop_run(run_id)
            raise
        return RunOutcome(run_id, info["status"], info, log)


# ---------------------------------------------------------------------- bytes on the wire
def compare_traffic(run: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """Flower's network traffic of a run against the bytes the strategy accounted.

    Flower counts, at the SuperLink's Fleet API (its link to the SuperNodes), the
    serialized size of every request and response of the run: outbound = SuperLink to
    SuperNodes (our bytes down), inbound = SuperNodes to SuperLink (our bytes up). The
    strategy counts the records it puts in / takes out of messages
    (`count_bytes()` of each record), i.e. payload only.
    """
    traffic = run["network-traffic"]
    down, up = int(summary["total_bytes_down"]), int(summary["total_bytes_up"])
    out_b, in_b = int(traffic["outbound-bytes"]), int(traffic["inbound-bytes"])

    def rel(flower: int, ours: int) -> float | None:
        return round(flower / ours - 1.0, 4) if ours else None

    result = {
        "run_id": run["run-id"],
        "status": run["status"],
        "flower_network_traffic": {
            "outbound_bytes": out_b,
            "inbound_bytes": in_b,
            "total_bytes": out_b + in_b,
        },
        "strategy_bytes": {"down": down, "up": up, "total": down + up},
        "flower_over_strategy": {
            "down": rel(out_b, down),
            "up": rel(in_b, up),
            "total": rel(out_b + in_b, down + up),
        },
    }
    total = result["flower_over_strategy"]["total"]
    result["agree_within_10_percent"] = total is not None and abs(total) <= 0.10
    return result


def write_deploy_summary(out_dir: Path, run: dict[str, Any], extra: dict | None = None) -> dict:
    """Add the traffic comparison to the run's summary.json (under "deployment") and
    write it alone to deploy_summary.json; return it."""
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    comparison = {**compare_traffic(run, summary), **(extra or {})}
    (out_dir / "deploy_summary.json").write_text(json.dumps(comparison, indent=2) + "\n")
    summary["deployment"] = comparison
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return comparison
