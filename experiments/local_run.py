"""Run the app on a local simulation SuperLink that this process starts and stops.

`flwr run .` starts a detached `flower-superlink` on first use and leaves it running.
Scripts and tests should not leave processes behind, so this module starts its own
SuperLink (same flags as Flower's managed local one) in a private FLWR_HOME on free
ports, runs `flwr run`, and stops the SuperLink and every process below it by pid.

    python -m experiments.local_run --num-supernodes 10 --run-config "num-server-rounds=5"
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    # The app runs in this environment; otherwise the SuperLink builds a fresh virtualenv
    # per run and downloads torch (gigabytes) into it.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_DISABLE_USAGE_STATS": "1",
}

# This interpreter's scripts folder (a venv's bin/): Flower's executables are there, and the
# SuperLink starts its helpers (flower-superexec, flwr-simulation) by name from PATH, so
# they are found without an activated venv.
BIN_DIR = Path(sys.executable).parent


def executable(name: str) -> str:
    """A console script of this interpreter's environment (else from PATH)."""
    local = BIN_DIR / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def tool_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with this interpreter's scripts folder first on PATH."""
    return {**env, "PATH": os.pathsep.join([str(BIN_DIR), env.get("PATH", "")])}


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before by this process. The kernel may
    give a just-released port again: a Ray head and worker asked for 15 ports got one
    twice (CI, 2026-12-03), so each port is handed out once."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def descendants(pid: int) -> list[int]:
    """Pids of all processes below `pid`, read from /proc (children before grandchildren)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, frontier = [], [pid]
    while frontier:
        nxt = [c for p in frontier for c in children.get(p, [])]
        found.extend(nxt)
        frontier = nxt
    return found


def stop_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop `proc` and everything it started, by pid: SIGTERM, then SIGKILL stragglers."""
    pids = [*descendants(proc.pid), proc.pid]
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    for pid in pids:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def kill_tree(proc: subprocess.Popen) -> None:
    """A crash of `proc` and everything it started: freeze the whole tree (so nothing
    starts a new process or writes another byte), then SIGKILL it. Unlike `stop_tree`,
    no process gets to run its exit handlers: a SIGTERMed simulation keeps its ServerApp
    thread running while it shuts down, and that thread records the replies its dying
    nodes fail with as one more round."""
    frozen: list[int] = []
    while True:
        new = [p for p in [proc.pid, *descendants(proc.pid)] if p not in frozen]
        if not new:
            break
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frozen.extend(new)
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class LocalSuperLink:
    env: dict[str, str]
    process: subprocess.Popen
    flwr_home: Path
    # The `flwr run` processes in progress. They are this process's too: leaving the
    # `local_superlink` block stops them before the SuperLink. Otherwise a run whose
    # caller was interrupted (compare runs them in a thread) outlives its SuperLink, and
    # `flwr run`, finding no SuperLink, starts Flower's managed one, which nobody stops.
    runs: set[subprocess.Popen] = field(default_factory=set)

    def run(
        self,
        run_config: str = "",
        num_supernodes: int = 10,
        cpus_per_client: int = 1,
        project_dir: Path = PROJECT_DIR,
        timeout_s: float | None = None,
        capture: bool = False,
        stdout=None,
        federation_config: str = "",
    ) -> subprocess.CompletedProcess:
        """`flwr run <project> --stream` against this SuperLink; returns when the run ends.

        With `capture` the output comes back in the result; with `stdout` (a file) it goes
        there, stderr included; otherwise it goes to this process's output. Past
        `timeout_s`, the run and everything it started are stopped and
        `subprocess.TimeoutExpired` is raised. `federation_config` adds further
        `--federation-config` keys, e.g. "init-args-logging-level='INFO'".
        """
        cmd = [
            sys.executable,
            "-m",
            "flwr.cli.app",
            "run",
            str(project_dir),
            "--stream",
            "--federation-config",
            f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"
            + (f" {federation_config}" if federation_config else ""),
        ]
        if run_config:
            cmd += ["--run-config", run_config]
        pipe = subprocess.PIPE if capture else None
        proc = subprocess.Popen(
            cmd,
            env=self.env,
            cwd=project_dir,
            text=True,
            stdout=pipe if capture else stdout,
            stderr=pipe if capture else (subprocess.STDOUT if stdout else None),
        )
        self.runs.add(proc)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        finally:  # a timeout, or this thread interrupted: nothing of the run stays
            if proc.poll() is None:
                stop_tree(proc)
            self.runs.discard(proc)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def stop_runs(self) -> None:
        """Stop every `flwr run` still in progress, and what each started, by pid."""
        for proc in list(self.runs):
            stop_tree(proc)
            self.runs.discard(proc)


def raise_on_sigterm(signum, frame):
    """A SIGTERM handler: unwind as Ctrl-C does, so every `finally` that stops our
    processes runs (Python's default for SIGTERM exits at once and leaves them running)."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """In the block, SIGTERM raises SystemExit in the main thread. Only the main thread can
    set handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM while stopping processes, so a second Ctrl-C cannot cut the
    stop short (each stop is bounded: SIGTERM, then SIGKILL after 10 s)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def local_superlink(
    flwr_home: Path | None = None,
    startup_timeout_s: float = 60.0,
    extra_env: dict[str, str] | None = None,
) -> Iterator[LocalSuperLink]:
    """Start a simulation SuperLink in a private FLWR_HOME; on exit, also on Ctrl-C and on
    SIGTERM, stop the runs still in progress, then it and its children.

    `extra_env` goes into the SuperLink's environment (and so into the simulation it
    starts), e.g. {"RAY_ADDRESS": "HOST:PORT"} to run on an existing Ray cluster.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(sigterm_unwinds())
        if flwr_home is None:
            flwr_home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flwr-")))
        flwr_home.mkdir(parents=True, exist_ok=True)
        http_port, control_port = free_port(), free_port()
        env = tool_env(
            {
                **os.environ,
                **QUIET_ENV,
                "FLWR_HOME": str(flwr_home),
                "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
                "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
                **(extra_env or {}),
            }
        )
        log_file = flwr_home / "superlink.log"
        cmd = [
            executable("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--control-api-address",
            f"127.0.0.1:{control_port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(http_port),
            "--database",
            str(flwr_home / "state.db"),
            "--log-file",
            str(log_file),
            "--disable-runtime-dependency-installation",
        ]
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        link = None
        try:
            _wait_healthy(proc, http_port, startup_timeout_s, log_file)
            link = LocalSuperLink(env, proc, flwr_home)
            yield link
        finally:
            with signals_held():
                if link is not None:
                    link.stop_runs()
                stop_tree(proc)


def _wait_healthy(proc: subprocess.Popen, port: int, timeout_s: float, log_file: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {proc.returncode}; see {log_file}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink not healthy after {timeout_s:.0f} s; see {log_file}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--run-config", default="", help='e.g. "num-server-rounds=5 seed=1"')
    args = parser.parse_args(argv)
    with local_superlink() as link:
        return link.run(args.run_config, args.num_supernodes).returncode


if __name__ == "__main__":
    sys.exit(main())
