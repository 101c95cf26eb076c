"""Timestamps from inside Flower's own processes, for the edge testbed.

A deployed round passes through processes the testbed does not write: the ServerApp
(`flwr-serverapp`), each SuperNode (`flower-supernode`) and, per message, a fresh
ClientApp process (`flwr-clientapp`). To see where a round's wall time goes, the testbed
starts each of them through this file, which wraps a few of Flower's functions with a
timer and then runs Flower's own entry point unchanged:

- `supernode`: the download of a message's objects over the node's link (`pull_objects`)
  and the upload of its reply (`push_object_contents_from_iterable`), with their bytes;
- `clientapp`: the process's start (from /proc), Flower imported, the message pulled from
  the SuperNode, the app loaded (our imports), the handler's start and end with its CPU
  time, the reply pushed, and the process's CPU time at exit;
- `serverapp`: every push of messages and every pull that brought replies, with message
  ids, types, destination nodes and the server round they carry.

One change to what Flower does, and only where asked: with $FEDPRUNE_SUPERNODE_POLL_S set
(the testbed's `--supernode-poll-s`), a SuperNode waits at most that many seconds between
its requests to the SuperLink. Flower 1.41 hard-codes them (`start_client_internal`): 3 s
after a poll that found no message, 0.5 s while it waits for a reply to push, so a message
sits on the SuperLink for up to 3 s before its node fetches it. The sleeps are shortened
by giving that module a clock whose `sleep` is capped; nothing else in Flower changes.
(Measured on the testbed, this did not shorten the rounds: docs/edge-testbed.md.)

Each event is one JSON line, appended to the file named by $FEDPRUNE_PROBE_EVENTS with a
single write (O_APPEND), so processes of one node can share a file. Wall times are
`time.time()`: network namespaces share the clock.

This module imports only the standard library before it hands over to Flower, so it adds
nothing to the start-up it measures, and it is loaded by path (never from sys.path) so it
cannot change where the app's own modules are imported from. A function it cannot find
(another Flower version) is reported as a `probe_missing` event and left as it is.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import resource
import sys
import time
from pathlib import Path

ENV_EVENTS = "FEDPRUNE_PROBE_EVENTS"
ENV_WHO = "FEDPRUNE_PROBE_WHO"  # "server" or the node's index
ENV_POLL = "FEDPRUNE_SUPERNODE_POLL_S"  # the SuperNode's longest wait between polls
ROLES = ("supernode", "clientapp", "serverapp")

_fd: int | None = None


def emit(kind: str, **fields) -> None:
    """Append one event (wall time `t`, kind, pid, who, fields) to the events file."""
    global _fd
    path = os.environ.get(ENV_EVENTS)
    if not path:
        return
    if _fd is None:
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    record = {"t": time.time(), "kind": kind, "pid": os.getpid()}
    record["who"] = os.environ.get(ENV_WHO, "")
    record.update(fields)
    os.write(_fd, (json.dumps(record, default=str) + "\n").encode())


def process_start_time(pid: int | str = "self") -> float:
    """Wall time (s) at which process `pid` started, from /proc (10 ms resolution)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    boot = next(
        float(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime")
    )
    return boot + start_ticks / os.sysconf("SC_CLK_TCK")


def cpu_s() -> float:
    """CPU seconds (user + system) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def runqueue_s() -> float:
    """Seconds this process's main thread has waited for a CPU while runnable (the
    scheduler's run delay, /proc/self/schedstat): the time lost to other processes."""
    try:
        return int(Path("/proc/self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def _patch(owner, name: str, make_wrapper) -> None:
    """Replace owner.name by make_wrapper(original); report it if it is not there."""
    original = getattr(owner, name, None)
    if original is None:
        emit("probe_missing", name=f"{getattr(owner, '__name__', owner)}.{name}")
        return
    setattr(owner, name, functools.wraps(original)(make_wrapper(original)))


def _server_round(message) -> int | None:
    """The server round a fedprune message carries in its config record, if any."""
    try:
        config = message.content["config"]
        return int(config["server-round"])
    except Exception:  # a query, an error reply, another app: no round
        return None


def _message_info(message) -> dict:
    meta = message.metadata
    return {
        "type": meta.message_type,
        "dst": meta.dst_node_id,
        "src": meta.src_node_id,
        "round": _server_round(message),
    }


# ---------------------------------------------------------------------- supernode
class CappedSleep:
    """The `time` module, but `sleep(s)` waits at most `cap` seconds."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str):
        return getattr(time, name)


def cap_polling(sci, cap: float) -> None:
    """Make Flower's SuperNode loop (module `sci`) wait at most `cap` s between polls."""
    if not cap > 0:
        raise SystemExit(f"${ENV_POLL} must be a positive number of seconds, not {cap!r}")
    if getattr(sci, "time", None) is not time:  # another Flower: say so, do not run uncapped
        raise SystemExit(f"${ENV_POLL}: {sci.__name__} has no `time` module to cap")
    sci.time = CappedSleep(cap)
    emit("poll_cap", cap=cap)


def run_supernode(args: list[str]) -> int | None:
    import flwr.supernode.start_client_internal as sci
    from flwr.supernode.cli import flower_supernode

    if os.environ.get(ENV_POLL):
        cap_polling(sci, float(os.environ[ENV_POLL]))

    def timed_download(original):
        def wrapper(*a, **kw):
            t0 = time.time()
            contents = original(*a, **kw)
            size = sum(len(c) for c in contents.values())
            emit("download", t0=t0, t1=time.time(), bytes=size, objects=len(contents))
            return contents

        return wrapper

    def timed_upload(original):
        def wrapper(iterable, *a, **kw):
            sizes = []

            def counted():
                for object_id, content in iterable:
                    sizes.append(len(content))
                    yield object_id, content

            t0 = time.time()
            result = original(counted(), *a, **kw)
            emit("upload", t0=t0, t1=time.time(), bytes=sum(sizes), objects=len(sizes))
            return result

        return wrapper

    def timed_pull(original):
        def wrapper(*a, **kw):
            t0 = time.time()
            run_id = original(*a, **kw)
            if run_id is not None:  # most calls find nothing to pull (then it polls every 3 s)
                emit("pulled", t0=t0, t1=time.time(), run_id=run_id)
            return run_id

        return wrapper

    _patch(sci, "pull_objects", timed_download)
    _patch(sci, "push_object_contents_from_iterable", timed_upload)
    _patch(sci, "_pull_and_store_message", timed_pull)
    emit("start", role="supernode", proc_start=process_start_time())
    sys.argv = ["flower-supernode", *args]
    return flower_supernode()


# ---------------------------------------------------------------------- clientapp
def run_clientapp(args: list[str]) -> int | None:
    emit("start", role="clientapp", proc_start=process_start_time(), cpu=cpu_s())
    import flwr.supernode.runtime.run_clientapp as rc
    from flwr.clientapp import ClientApp
    from flwr.supernode.cli import flwr_clientapp

    emit("flwr_imported", cpu=cpu_s())

    def timed_pull_task(original):
        def wrapper(*a, **kw):
            message, context, run, fab = original(*a, **kw)
            info = _message_info(message)
            emit("task_pulled", node_id=context.node_id, run_id=context.run_id, **info)
            return message, context, run, fab

        return wrapper

    def timed_loader(original):
        def wrapper(*a, **kw):
            load = original(*a, **kw)

            def loaded(*la, **lkw):
                app = load(*la, **lkw)
                emit("app_loaded", cpu=cpu_s())
                return app

            return loaded

        return wrapper

    def timed_call(original):
        def wrapper(self, *a, **kw):
            t0, c0, q0 = time.time(), cpu_s(), runqueue_s()
            # cpu and runqueue_s here: since the process started (its start-up)
            emit("handler_start", cpu=c0, runqueue_s=q0)
            try:
                return original(self, *a, **kw)
            finally:
                emit(
                    "handler_end",
                    wall_s=time.time() - t0,
                    cpu_s=cpu_s() - c0,
                    runqueue_s=runqueue_s() - q0,
                )

        return wrapper

    def timed_push(original):
        def wrapper(*a, **kw):
            result = original(*a, **kw)
            emit("reply_pushed")
            return result

        return wrapper

    _patch(rc, "pull_task_input", timed_pull_task)
    _patch(rc, "get_load_client_app_fn", timed_loader)
    _patch(ClientApp, "__call__", timed_call)
    _patch(rc, "push_message", timed_push)
    atexit.register(lambda: emit("exit", cpu=cpu_s()))
    sys.argv = ["flwr-clientapp", *args]
    return flwr_clientapp()


# ---------------------------------------------------------------------- serverapp
def run_serverapp(args: list[str]) -> int | None:
    emit("start", role="serverapp", proc_start=process_start_time())
    from flwr.superlink.cli.flwr_serverapp import flwr_serverapp
    from flwr.superlink.grid.http_grid import HttpGrid

    def timed_push(original):
        def wrapper(self, messages, *a, **kw):
            messages = list(messages)
            info = [_message_info(m) for m in messages]
            t0 = time.time()
            ids = list(original(self, messages, *a, **kw))
            emit("push", t0=t0, t1=time.time(), ids=ids, messages=info)
            return ids

        return wrapper

    def timed_pull(original):
        def wrapper(self, message_ids, *a, **kw):
            t0 = time.time()
            replies = list(original(self, message_ids, *a, **kw))
            if replies:
                emit(
                    "pull",
                    t0=t0,
                    t1=time.time(),
                    replies=[
                        {
                            "reply_to": r.metadata.reply_to_message_id,
                            "src": r.metadata.src_node_id,
                            "type": r.metadata.message_type,
                            "error": r.has_error(),
                        }
                        for r in replies
                    ],
                )
            return replies

        return wrapper

    _patch(HttpGrid, "push_messages", timed_push)
    _patch(HttpGrid, "pull_messages", timed_pull)
    sys.argv = ["flwr-serverapp", *args]
    return flwr_serverapp()


def main(argv: list[str] | None = None) -> int | None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ROLES:
        raise SystemExit(f"usage: probe.py {{{','.join(ROLES)}}} ARGS...")
    role, args = argv[0], argv[1:]
    return {"supernode": run_supernode, "clientapp": run_clientapp, "serverapp": run_serverapp}[
        role
    ](args)


def wrapper_script(role: str, python: str = sys.executable) -> str:
    """An executable script that runs Flower's `role` entry point through this file, loaded
    by path (the process's sys.path is left as Flower's own script would have it)."""
    return (
        f"#!{python}\n"
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_probe', {str(Path(__file__))!r})\n"
        "probe = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(probe)\n"
        f"sys.exit(probe.main([{role!r}, *sys.argv[1:]]))\n"
    )


def install_wrappers(bin_dir: Path) -> Path:
    """Write `flwr-clientapp` and `flwr-serverapp` wrappers into `bin_dir` (put it first on
    PATH: Flower's SuperExec starts them by name) and `probe-supernode`, for the
    SuperNodes the testbed starts itself. Returns `bin_dir`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, role in (
        ("flwr-clientapp", "clientapp"),
        ("flwr-serverapp", "serverapp"),
        ("probe-supernode", "supernode"),
    ):
        path = bin_dir / name
        path.write_text(wrapper_script(role))
        path.chmod(0o755)
    return bin_dir


if __name__ == "__main__":
    sys.exit(main())
