"""Warm ClientApp starts: the shim hands a start to the fork server, whose child behaves as
the fresh process it replaces (arguments, environment, folder, output, exit status,
signals), and nothing outlives the launcher. A stand-in `flwr-clientapp` script and a
light preload (`json`) keep this fast; the slow edge-testbed and deployment tests run
Flower's real ClientApp through it."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deploy import warm_clientapp as warm
from experiments.local_run import descendants

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")

TARGET = textwrap.dedent(
    """\
    #!{python}
    import os, sys, time
    print("pid", os.getpid(), flush=True)
    print("ppid", os.getppid(), flush=True)
    print("argv", " ".join(sys.argv[1:]), flush=True)
    print("cwd", os.getcwd(), flush=True)
    print("env", os.environ.get("WARM_TEST", "-"), flush=True)
    print("preloaded", "json" in sys.modules, flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if "sleep" in sys.argv:
        time.sleep(60)
    sys.exit(int(sys.argv[-1]) if sys.argv[-1].isdigit() else 0)
    """
)


def stand_in(tmp_path) -> Path:
    """A folder holding the stand-in flwr-clientapp (TARGET)."""
    real = tmp_path / "real"
    real.mkdir()
    target = real / warm.COMMAND
    target.write_text(TARGET.format(python=sys.executable))
    target.chmod(0o755)
    return real


@pytest.fixture
def setup(tmp_path):
    """A stand-in flwr-clientapp on PATH, a running fork server and a shim in front."""
    real = stand_in(tmp_path)
    address = tmp_path / "fork.sock"
    server = warm.start_server(address, ["json"], timeout_s=60)
    shim = warm.install_shim(tmp_path / "shims")
    shims = shim.parent
    env = {
        **os.environ,
        "PATH": f"{shims}{os.pathsep}{real}{os.pathsep}{os.environ['PATH']}",
        warm.ENV_SOCKET: str(address),
        "WARM_TEST": "from-the-shim",
    }
    yield shim, env, server, tmp_path
    server.terminate()
    server.wait(timeout=10)


def lines(text: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in text.splitlines() if " " in line)


def test_a_start_runs_the_command_behind_the_shim_in_a_forked_child(setup):
    shim, env, server, tmp_path = setup
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [str(shim), "--token", "abc", "3"], env=env, cwd=work, capture_output=True, text=True
    )
    out = lines(done.stdout)
    assert done.returncode == 3, done.stderr
    assert out["argv"] == "--token abc 3"
    assert out["cwd"] == str(work)
    assert out["env"] == "from-the-shim"
    assert out["preloaded"] == "True"  # it is the fork server's child...
    assert int(out["ppid"]) == server.pid
    assert "to stderr" in done.stderr  # ...writing to the shim's own output
    assert "unreachable" not in done.stderr
    # A second start is a fresh child of its own.
    again = subprocess.run([str(shim), "0"], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and lines(again.stdout)["pid"] != out["pid"]


def start_sleeping(shim, env) -> tuple[subprocess.Popen, int]:
    """A shim whose child sleeps; (the shim's process, the child's pid)."""
    proc = subprocess.Popen(
        [str(shim), "sleep"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return proc, int(proc.stdout.readline().split()[1])


def gone(child: int, server: subprocess.Popen, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while child in descendants(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return child not in descendants(server.pid)


def test_a_signal_to_the_shim_reaches_the_child(setup):
    shim, env, server, _ = setup
    proc, child = start_sleeping(shim, env)
    assert child in descendants(server.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == -signal.SIGTERM  # ended as the child did
    assert gone(child, server)


def test_a_shim_that_dies_takes_its_child_with_it(setup):
    shim, env, server, _ = setup
    proc, child = start_sleeping(shim, env)
    proc.kill()  # SIGKILL: nothing forwarded, the connection just closes
    proc.wait(timeout=10)
    assert gone(child, server)


def test_without_the_fork_server_it_says_so_and_starts_cold(setup):
    shim, env, _, tmp_path = setup
    env = {**env, warm.ENV_SOCKET: str(tmp_path / "nothing-here.sock")}
    done = subprocess.run([str(shim), "--token", "t", "5"], env=env, capture_output=True, text=True)
    assert done.returncode == 5
    assert "unreachable" in done.stderr and "cold" in done.stderr
    assert lines(done.stdout)["preloaded"] == "False"  # a fresh process


def test_the_launcher_runs_the_command_and_leaves_nothing(tmp_path):
    real = stand_in(tmp_path)
    node = tmp_path / "node.sh"  # a "SuperNode" that starts two ClientApps by name
    node.write_text(f"#!/bin/sh\n{warm.COMMAND} first 0\n{warm.COMMAND} second 7\nexit $?\n")
    node.chmod(0o755)
    env = {**os.environ, "PATH": f"{real}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [sys.executable, str(Path(warm.__file__)), "--preload", "json", "--", str(node)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 7, err
    assert "fork server" in out and "ready" in out
    starts = [line for line in out.splitlines() if line.startswith("preloaded")]
    assert starts == ["preloaded True", "preloaded True"], out
    assert descendants(proc.pid) == []
    address = next(w for w in out.split() if w.endswith("fork.sock:"))[:-1]
    assert not Path(address).parent.exists()  # its socket and shim are gone


def test_a_killed_launchers_folder_is_removed_by_the_next(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{warm.TMP_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{warm.TMP_PREFIX}{os.getpid()}-def"
    for folder in (stale, live):
        (folder / "bin").mkdir(parents=True)
    assert warm.remove_stale(tmp_path) == [stale]
    assert not stale.exists() and live.exists()
