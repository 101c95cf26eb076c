"""A real federation on this machine: one SuperLink and N SuperNodes as separate processes,
on loopback, with TLS and SuperNode authentication, all stopped by pid when done.

What it does, in the order docs/deployment.md describes for separate machines:
1. writes a CA and a server certificate for 127.0.0.1 / localhost, and one ECDSA key pair
   per SuperNode (deploy/credentials.py);
2. starts `flower-superlink` with TLS and `--enable-supernode-auth` on a free port, and
   waits until it answers on /health;
3. names the federation in a private $FLWR_HOME/config.toml and registers every node's
   public key (`flwr supernode register`);
4. starts one `flower-supernode` per key, each with its own Runtime API port and its own
   `--node-config "partition-id=i num-partitions=N"` (plus `data-path` with --data-dir),
   and waits until the SuperLink lists them all online;
5. runs the app (`flwr run <project> <federation>`), streams its log (`flwr log`), and
   when it ends compares Flower's network traffic (`flwr list --format json`) with the
   bytes the strategy counted (summary.json), writing both to deploy_summary.json;
6. stops every process it started (SuperNodes first, then the SuperLink), by pid and with
   everything below it, on normal exit, on an exception, on Ctrl-C and on SIGTERM. A
   Ctrl-C during a run first asks the SuperLink to stop the run (`flwr stop`).

    python -m deploy.local_federation --num-supernodes 3 \
        --run-config "model='small-cnn' cost-profile='paper-uniform' num-server-rounds=3 \
                      clients-per-round=3 ip-max-iterations=100"
    python -m deploy.local_federation --num-supernodes 3 --no-run   # then try flwr by hand

It lives in deploy/ with the credential tool rather than in experiments/: it is an
operations tool (certificates, keys, processes), not an experiment, and nothing in it
is part of the app the SuperLink ships to the nodes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.credentials import LOOPBACK_HOSTS, generate_node_key, generate_tls
from experiments.local_run import QUIET_ENV, descendants, executable, free_port, stop_tree, tool_env

PROJECT_DIR = Path(__file__).resolve().parent.parent
FEDERATION = "local-tls"
# A SuperNode the SuperLink refuses to activate (e.g. its public key is not registered)
# logs "Exit Code: 305 ... Failed to activate SuperNode" (flwr.supercore.exit) and exits
# with status 1.
REFUSED_EXIT_CODE = 305


def _die_with_parent() -> None:  # pragma: no cover (runs in the child before exec)
    """Linux: the child gets SIGTERM if this script dies without cleaning up (SIGKILL).
    Flower's own helpers below it already exit with their parent (--parent-pid)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(cmd: list[str], env: dict[str, str], cwd: Path, log: Path | None) -> subprocess.Popen:
    """Start a child with its output in `log` (None: this terminal), in its own session
    (a Ctrl-C in the terminal reaches only this script, which then stops the children in
    order)."""
    with contextlib.ExitStack() as stack:
        out = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            out = stack.enter_context(log.open("ab"))
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while stopping processes, so a second Ctrl-C cannot leave
    some of them running (each stop is bounded: SIGTERM, then SIGKILL after 10 s)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@dataclass
class SuperNode:
    """One SuperNode: its key, its registered id, its node config and its process."""

    index: int
    key: Path
    node_config: str
    port: int
    home: Path
    node_id: int | None = None  # None: not registered
    process: subprocess.Popen | None = None
    starts: int = 0

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
class LocalFederation:
    """Handle on a running local federation; built by `local_federation()`."""

    workdir: Path
    project_dir: Path
    port: int
    ca_cert: Path
    env: dict[str, str]  # for the flwr CLI: FLWR_HOME with the federation in config.toml
    superlink: subprocess.Popen
    supernodes: list[SuperNode]
    name: str = FEDERATION
    _others: list[subprocess.Popen] = field(default_factory=list)
    seen_pids: set[int] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ flwr CLI
    def flwr(self, *args: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """Run a `flwr` command with `--format json` against this federation; its JSON."""
        cmd = [sys.executable, "-m", "flwr.cli.app", *args, "--format", "json"]
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
                        f"see {node.log}:\n{_tail(node.log)}"
                    )
            status = self.node_status()
            if all(status.get(nid) == s for nid, s in want.items()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not {want} after {timeout_s:.0f} s: {status}")
            time.sleep(1.0)

    # ------------------------------------------------------------------ processes
    def _popen(self, cmd: list[str], env: dict[str, str], log: Path | None) -> subprocess.Popen:
        proc = _spawn(cmd, env, self.project_dir, log)
        self.seen_pids.add(proc.pid)
        return proc

    def supernode_command(self, node: SuperNode) -> list[str]:
        return [
            executable("flower-supernode"),
            "--superlink",
            self.address,
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
        env = tool_env({**os.environ, **QUIET_ENV, "FLWR_HOME": str(node.home)})
        node.process = self._popen(self.supernode_command(node), env, node.log)
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

    def add_supernode(self, node_config: str, register: bool = True) -> SuperNode:
        """A further SuperNode with a new key (registered or not); not started yet."""
        index = len(self.supernodes)
        home = self.workdir / f"supernode-{index}"
        key, public = generate_node_key(home / "key", comment=f"supernode-{index}")
        node = SuperNode(index, key, node_config, free_port(), home)
        node.node_id = self.register(public) if register else None
        self.supernodes.append(node)
        return node

    def start_cli(self, *args: str, log: Path | None) -> subprocess.Popen:
        """A long-running `flwr` command (e.g. `log --stream`), stopped with the rest;
        its output goes to `log` (None: this terminal)."""
        proc = self._popen([sys.executable, "-m", "flwr.cli.app", *args], self.env, log)
        self._others.append(proc)
        return proc

    def stop(self) -> None:
        """Stop every process this federation started, SuperNodes before the SuperLink."""
        procs = [*self._others, *(n.process for n in self.supernodes if n.process)]
        with _signals_held():
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
        """Start a run, stream its log into `log` (or this terminal), wait for its end."""
        run_id = self.start_run(run_config)
        follower = self.start_cli("log", str(run_id), self.name, "--stream", log=log)
        try:
            info = self.wait_run(run_id, timeout_s)
        except BaseException:
            self.stop_run(run_id)
            raise
        with contextlib.suppress(subprocess.TimeoutExpired):
            follower.wait(timeout=30)  # `flwr log` ends by itself once the run is over
        return RunOutcome(run_id, info["status"], info, log)


@contextlib.contextmanager
def local_federation(
    num_supernodes: int = 3,
    workdir: Path | None = None,
    data_dir: Path | None = None,
    node_configs: list[str] | None = None,
    project_dir: Path = PROJECT_DIR,
    startup_timeout_s: float = 120.0,
) -> Iterator[LocalFederation]:
    """Start a SuperLink and `num_supernodes` registered SuperNodes; stop them all on exit.

    Node i gets `--node-config "partition-id=i num-partitions=N"`; with `data_dir` also
    `data-path="data_dir/partition-<i>"` (folders written by `python -m
    clients.prepare_data`), so it reads that folder instead of its partition of the
    embedded data. `node_configs` (one string per node) replaces all of that.
    """
    if node_configs is not None and len(node_configs) != num_supernodes:
        raise ValueError(f"{len(node_configs)} node configs for {num_supernodes} SuperNodes")
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fed-")))
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        tls = generate_tls(workdir / "certificates", LOOPBACK_HOSTS)
        port = free_port()
        link_home, cli_home = workdir / "superlink", workdir / "flwr-cli"
        link_home.mkdir(exist_ok=True)
        cli_home.mkdir(exist_ok=True)
        (cli_home / "config.toml").write_text(
            federation_toml(FEDERATION, f"127.0.0.1:{port}", tls["ca_cert"])
        )
        cli_env = tool_env({**os.environ, **QUIET_ENV, "FLWR_HOME": str(cli_home)})
        link_env = tool_env({**os.environ, **QUIET_ENV, "FLWR_HOME": str(link_home)})
        link_cmd = [
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
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(link_home / "state.db"),
        ]
        log = link_home / "superlink.log"
        link = _spawn(link_cmd, link_env, project_dir, log)
        fed = LocalFederation(
            workdir, project_dir, port, tls["ca_cert"], cli_env, link, [], seen_pids={link.pid}
        )
        try:
            _wait_https_health(link, port, tls["ca_cert"], startup_timeout_s, log)
            for i in range(num_supernodes):
                config = f"partition-id={i} num-partitions={num_supernodes}"
                if node_configs is not None:
                    config = node_configs[i]
                elif data_dir is not None:
                    folder = Path(data_dir).resolve() / f"partition-{i}"
                    if not (folder / "data.npz").is_file():
                        raise FileNotFoundError(
                            f"{folder}/data.npz missing: write it with `python -m "
                            f"clients.prepare_data --out {data_dir} "
                            f"--num-partitions {num_supernodes}`"
                        )
                    config += f' data-path="{folder}"'
                fed.add_supernode(config)
            for node in fed.supernodes:
                fed.start_supernode(node)
            fed.wait_nodes({n.node_id: "online" for n in fed.supernodes}, startup_timeout_s)
            yield fed
        finally:
            fed.stop()


def federation_toml(name: str, address: str, ca_cert: Path) -> str:
    """The $FLWR_HOME/config.toml that names a TLS federation for the flwr CLI."""
    return (
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca_cert}"\n'
    )


def _wait_https_health(
    proc: subprocess.Popen, port: int, ca_cert: Path, timeout_s: float, log: Path
) -> None:
    context = ssl.create_default_context(cafile=str(ca_cert))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {proc.returncode}:\n{_tail(log)}")
        try:
            url = f"https://127.0.0.1:{port}/health"
            with urllib.request.urlopen(url, timeout=1.0, context=context) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink not healthy after {timeout_s:.0f} s:\n{_tail(log)}")


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


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


# ---------------------------------------------------------------------- command line
def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-supernodes", type=int, default=3)
    parser.add_argument(
        "--run-config", default="", help='app settings, e.g. "num-server-rounds=5 seed=1"'
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="node i reads DATA_DIR/partition-<i> (python -m clients.prepare_data)",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"))
    parser.add_argument("--run-name", default="", help="default: deploy-<date>-<time>")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="certificates, keys, FLWR_HOMEs and logs (default: a temporary folder, "
        "removed at the end)",
    )
    parser.add_argument(
        "--no-run",
        action="store_true",
        help="start the federation, print how to use it, and wait for Ctrl-C",
    )
    parser.add_argument("--timeout-s", type=float, default=3600.0)
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # SIGINT raises KeyboardInterrupt
    run_name = args.run_name or time.strftime("deploy-%Y%m%d-%H%M%S")
    out_root = args.output_dir.resolve()
    try:
        with local_federation(args.num_supernodes, args.workdir, args.data_dir) as fed:
            print(
                f"[deploy] SuperLink https://{fed.address} (pid {fed.superlink.pid}); "
                f"{len(fed.supernodes)} SuperNodes online: "
                + ", ".join(f"{n.node_id} (pid {n.process.pid})" for n in fed.supernodes),
                flush=True,
            )
            if args.no_run:
                print(
                    "[deploy] federation "
                    f"{fed.name!r} is up. In another shell:\n"
                    f"  export FLWR_HOME={fed.env['FLWR_HOME']}\n"
                    f"  flwr run {fed.project_dir} {fed.name} --stream\n"
                    f"  flwr list {fed.name} --format json\n"
                    "Ctrl-C here stops everything.",
                    flush=True,
                )
                while True:
                    time.sleep(3600)
            # Nodes authenticate with registered keys: bind each client id to its node.
            ours = f"output-dir='{out_root}' run-name='{run_name}' node-auth=true"
            outcome = fed.run([args.run_config, ours], timeout_s=args.timeout_s)
            print(f"[deploy] run {outcome.run_id}: {outcome.status}", flush=True)
            if outcome.status != "finished:completed":
                return 1
            comparison = write_deploy_summary(
                out_root / run_name,
                outcome.run,
                {"num_supernodes": args.num_supernodes, "tls": True, "node_auth": True},
            )
            _print_comparison(comparison, out_root / run_name)
            return 0
    except KeyboardInterrupt:
        print("[deploy] interrupted; all processes stopped", file=sys.stderr)
        return 130


def _print_comparison(c: dict[str, Any], out_dir: Path) -> None:
    f, s, r = c["flower_network_traffic"], c["strategy_bytes"], c["flower_over_strategy"]
    print(
        "[deploy] bytes      Flower (flwr list)   strategy (summary.json)   difference\n"
        f"[deploy] down    {f['outbound_bytes']:>18,}   {s['down']:>23,}   {r['down']:+.1%}\n"
        f"[deploy] up      {f['inbound_bytes']:>18,}   {s['up']:>23,}   {r['up']:+.1%}\n"
        f"[deploy] total   {f['total_bytes']:>18,}   {s['total']:>23,}   {r['total']:+.1%}\n"
        f"[deploy] written to {out_dir / 'deploy_summary.json'} and summary.json",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
