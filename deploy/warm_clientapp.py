"""Warm ClientApp starts for a deployed SuperNode: a fork server with the libraries loaded.

Flower 1.41's SuperNode starts a fresh `flwr-clientapp` process for every message it gets
(`--isolation subprocess`: its SuperExec runs the command by name). Each such process
imports Python, Flower and torch before a handler that then runs for a few tenths of a
second: 2.9 s of wall time on an idle core here, the largest part of a deployed PruneFL
round (docs/edge-testbed.md, `experiments/results/bench_client_startup.md`).

    python deploy/warm_clientapp.py [--preload MODULE ...] -- flower-supernode ARGS...

runs the SuperNode command as its child, and beside it a fork server that has imported
the ClientApp's libraries once (torch, numpy, numba, Flower's ClientApp runtime: what
`PRELOAD` names). A `flwr-clientapp` shim first on the SuperNode's PATH hands every
ClientApp start to it:

1. SuperExec starts the shim as it would start Flower's `flwr-clientapp`. The shim (the
   standard library only) sends the fork server its command line, environment, working
   folder and stdin/stdout/stderr, and waits.
2. The fork server forks. The child runs the `flwr-clientapp` the shim stands for (the
   next one on PATH: Flower's console script, or the edge testbed's probe) as a fresh
   process would: same arguments, environment, folder and output, its own pid.
   **The app itself is never imported in the fork server**: Flower loads it in the child
   from the run's FAB, so a child always runs the code of the run it serves.
3. The child's exit status goes back to the shim, which exits with it. A signal to the
   shim is passed on to the child, and a shim that dies takes its child with it.

If the fork server cannot be reached, the shim says so on stderr and runs the command
cold, as Flower would have. The launcher stops the fork server when the SuperNode ends,
and both die with it (the fork server checks its parent every second).

The standard library only, at module level: the shim loads this file on every start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMAND = "flwr-clientapp"
ENV_SOCKET = "FEDPRUNE_WARM_SOCKET"
TMP_PREFIX = "fedprune-warm-"  # + the launcher's pid: its socket and shim
# What a ClientApp process of this app imports before its handler runs, minus the app.
PRELOAD = (
    "torch",
    "numpy",
    "numba",
    "flwr.clientapp",
    "flwr.supernode.cli.flwr_clientapp",
    "flwr.supernode.runtime.run_clientapp",
)
_HEADER = struct.Struct("!I")  # request length, before the JSON request


# ---------------------------------------------------------------------- the shim
def shim_script(python: str = sys.executable) -> str:
    """The `flwr-clientapp` shim: loads this file by path and calls `shim_main`."""
    return (
        f"#!{python}\n"
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_warm', {str(Path(__file__))!r})\n"
        "warm = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(warm)\n"
        "sys.exit(warm.shim_main(sys.argv))\n"
    )


def install_shim(bin_dir: Path) -> Path:
    """Write the shim as `bin_dir/flwr-clientapp` (put `bin_dir` first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / COMMAND
    shim.write_text(shim_script())
    shim.chmod(0o755)
    return shim


def cold_target(shim_path: str, env_path: str) -> str | None:
    """The `flwr-clientapp` this shim stands for: the first on PATH that is not a shim."""
    import shutil

    own = os.path.dirname(os.path.abspath(shim_path))
    rest = os.pathsep.join(p for p in env_path.split(os.pathsep) if p and os.path.abspath(p) != own)
    return shutil.which(COMMAND, path=rest)


def shim_main(argv: list[str]) -> int:
    target = cold_target(argv[0], os.environ.get("PATH", ""))
    if target is None:
        print(f"[warm-clientapp] no {COMMAND} on PATH behind the shim", file=sys.stderr)
        return 127
    args = [target, *argv[1:]]
    address = os.environ.get(ENV_SOCKET, "")
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(address)
    except OSError as exc:
        print(
            f"[warm-clientapp] fork server at {address!r} unreachable ({exc}): "
            f"starting {COMMAND} cold",
            file=sys.stderr,
            flush=True,
        )
        os.execv(target, args)  # as Flower would have run it
    for fd in (0, 1, 2):  # SuperExec may start it without one: pass /dev/null instead
        try:
            os.fstat(fd)
        except OSError:
            os.dup2(os.open(os.devnull, os.O_RDWR), fd)
    request = json.dumps({"argv": args, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    message = _HEADER.pack(len(request)) + request
    sent = socket.send_fds(conn, [message], [0, 1, 2])
    conn.sendall(message[sent:])
    replies = conn.makefile("r")
    first = replies.readline().split()
    if len(first) != 2 or first[0] != "pid":
        print("[warm-clientapp] the fork server did not start the ClientApp", file=sys.stderr)
        return 1
    child = int(first[1])

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    last = replies.readline().split()
    if len(last) != 2 or last[0] != "exit":
        print("[warm-clientapp] lost the fork server before the ClientApp ended", file=sys.stderr)
        return 1
    code = int(last[1])
    if code < 0:  # killed by a signal: end the same way, as the process would have
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


# ---------------------------------------------------------------------- the fork server
def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    if len(fds) != 3 or len(data) < _HEADER.size:
        for fd in fds:
            os.close(fd)
        raise ValueError("a request without its three file descriptors")
    (length,) = _HEADER.unpack_from(data)
    body = bytearray(data[_HEADER.size :])
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            raise ValueError("a truncated request")
        body += chunk
    return json.loads(bytes(body)), fds


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run_child(request: dict, fds: list[int], close: list) -> None:
    """In the forked child: become the process the shim stands for, run it, exit."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for thing in close:  # the fork server's sockets, selector and wake-up pipe
            os.close(thing) if isinstance(thing, int) else thing.close()
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        argv = request["argv"]
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(argv[0])  # as for a script started by path
        import runpy

        try:
            runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        import atexit

        atexit._run_exitfuncs()  # what interpreter exit would run: Flower's, the probe's
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def serve(address: str, preload: list[str], parent: int | None) -> int:
    """Import `preload`, then fork one child per shim connection until SIGTERM or until
    `parent` is gone. The socket appears only once everything is imported."""
    import importlib
    import selectors

    t0 = time.perf_counter()
    for name in preload:
        importlib.import_module(name)
    loaded = time.perf_counter() - t0

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    partial = address + ".partial"
    listener.bind(partial)
    listener.listen(64)
    os.rename(partial, address)  # appears whole, only now
    print(
        f"[warm-clientapp] fork server {os.getpid()} ready at {address}: "
        f"{', '.join(preload)} imported in {loaded:.1f} s",
        flush=True,
    )
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    children: dict[int, socket.socket] = {}

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = children.pop(pid, None)
            if conn is None:
                continue
            with contextlib.suppress(KeyError):  # already, if its shim went first
                sel.unregister(conn)
            with contextlib.suppress(OSError):
                conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
            conn.close()

    while not stopping:
        if parent is not None and os.getppid() != parent:
            break
        for key, _ in sel.select(timeout=1.0):
            if key.data == "wake":  # a signal came in: drain; reap() below collects exits
                while True:
                    try:
                        if not os.read(wake_r, 512):
                            break
                    except BlockingIOError:
                        break
            elif key.data == "accept":
                conn, _ = listener.accept()
                conn.settimeout(10.0)
                try:
                    request, fds = _recv_request(conn)
                except (OSError, ValueError) as exc:
                    print(f"[warm-clientapp] refused a start: {exc}", file=sys.stderr, flush=True)
                    conn.close()
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _run_child(
                        request, fds, [sel, listener, conn, wake_r, wake_w, *children.values()]
                    )
                for fd in fds:
                    os.close(fd)
                conn.settimeout(None)
                conn.sendall(f"pid {pid}\n".encode())
                children[pid] = conn
                sel.register(conn, selectors.EVENT_READ, pid)
            else:  # a shim's connection: it only ever closes (the shim is gone)
                pid = key.data
                if not key.fileobj.recv(1):
                    sel.unregister(key.fileobj)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
        reap()
    for pid in list(children):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    listener.close()
    Path(address).unlink(missing_ok=True)
    return 0


# ---------------------------------------------------------------------- the launcher
def start_server(address: Path, preload: list[str], timeout_s: float = 120.0):
    """Start the fork server as a child; return it once its socket exists."""
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__)), "serve", str(address), "--parent", str(os.getpid()),
         "--preload", *preload]
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while not address.exists():
        if server.poll() is not None:
            raise RuntimeError(f"the fork server exited ({server.returncode}) before it was ready")
        if time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"the fork server was not ready after {timeout_s:.0f} s")
        time.sleep(0.05)
    return server


def remove_stale(tmp_root: Path) -> list[Path]:
    """Delete the folders of launchers that were killed (SIGKILL leaves them: a socket and
    a shim); a folder is named after its launcher's pid. Returns what it deleted."""
    import shutil

    gone = []
    for folder in tmp_root.glob(f"{TMP_PREFIX}*-*"):
        pid = folder.name[len(TMP_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        gone.append(folder)
    return gone


def launch(command: list[str], preload: list[str]) -> int:
    """Run `command` (a SuperNode) with warm ClientApp starts; its exit status."""
    remove_stale(Path(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-") as tmp:
        address = Path(tmp) / "fork.sock"
        server = start_server(address, preload)
        bin_dir = install_shim(Path(tmp) / "bin").parent
        env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            ENV_SOCKET: str(address),
        }
        node = subprocess.Popen(command, env=env)

        def forward(signum, _frame):
            with contextlib.suppress(ProcessLookupError):
                node.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, forward)
        try:
            return node.wait()
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        p = argparse.ArgumentParser(prog="warm_clientapp.py serve")
        p.add_argument("address")
        p.add_argument("--parent", type=int)
        p.add_argument("--preload", nargs="*", default=list(PRELOAD))
        a = p.parse_args(argv[1:])
        return serve(a.address, a.preload, a.parent)
    p = argparse.ArgumentParser(
        prog="warm_clientapp.py",
        description="Run a SuperNode whose ClientApp processes start warm, forked from a "
        "process that has imported torch and Flower once.",
    )
    p.add_argument("--preload", nargs="*", default=list(PRELOAD), help="modules to import once")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- flower-supernode ARGS...")
    a = p.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        p.error("give the SuperNode command after --")
    return launch(command, a.preload)


if __name__ == "__main__":
    sys.exit(main())
