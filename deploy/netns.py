"""The edge testbed's network: Linux network namespaces joined by rate-limited veth links.

One namespace (the hub) holds the SuperLink; each SuperNode gets a namespace of its own,
joined to the hub by a veth pair on a /30 of its own:

    hub namespace <prefix>-hub            node namespace <prefix>-n<i>
    dev n<i>  10.77.<i>.1/30  <-- veth -->  dev up0  10.77.<i>.2/30
    tbf at rate_i (egress: down)            tbf at rate_i (egress: up)

Each end shapes what it sends with a token bucket (`tc qdisc ... tbf`), so the link is
limited to its rate in both directions. The addresses exist only in these namespaces:
nothing is routed to or from any other network (no default route, no NAT), so nothing
leaves the machine. Namespaces are named `<prefix>-...` with a prefix unique to one
testbed (`fpt-<pid>`), and removed by that prefix.

`python -m deploy.netns recv|send ...` is the small transfer tool the testbed runs in two
namespaces to check that a shaped link really carries no more than its rate.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
PREFIX_PATTERN = re.compile(r"^fpt-(\d+)-")
HUB_PORT = 8000  # the SuperLink's, inside the hub namespace (nothing else listens there)
MAX_NODES = 250  # one 10.77.<i>.0/30 per node
# The token bucket: a burst of 16 KiB or 4 ms of the rate, whichever is larger (the kernel
# needs at least one packet's worth; more lets bursts through above the rate), and a queue
# of 200 ms at the rate before packets are dropped (TCP then backs off to the rate).
MIN_BURST_BYTES = 16 * 1024
BURST_S = 0.004
QUEUE_LATENCY_MS = 200


_TBF_TRIAL = ("tbf", "rate", "8mbit", "burst", "16kb", "latency", "100ms")


class PreflightError(RuntimeError):
    """The machine cannot run the testbed; the message says what is missing."""


def burst_bytes(rate_bytes_per_s: float) -> int:
    """The token bucket's depth for a link of `rate_bytes_per_s` (bytes)."""
    return max(MIN_BURST_BYTES, int(rate_bytes_per_s * BURST_S))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def _tc(*args: str) -> None:
    done = subprocess.run(["tc", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)}: {done.stderr.strip() or done.returncode}")


def shape(namespace: str, dev: str, rate_bytes_per_s: float) -> None:
    """Limit what `dev` in `namespace` sends to `rate_bytes_per_s` (a tbf root qdisc)."""
    bits = max(8, round(rate_bytes_per_s * 8))
    _tc(
        "-n",
        namespace,
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        f"{bits}bit",
        "burst",
        str(burst_bytes(rate_bytes_per_s)),
        "latency",
        f"{QUEUE_LATENCY_MS}ms",
    )


def namespaces() -> list[str]:
    """Names of all named network namespaces (`ip netns list`)."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespaces_with_prefix(prefix: str) -> list[str]:
    return [ns for ns in namespaces() if ns.startswith(prefix + "-")]


def delete_namespaces(prefix: str) -> list[str]:
    """Delete every namespace named `<prefix>-...` (their veth ends go with them); return
    those that could not be deleted."""
    left = []
    for ns in namespaces_with_prefix(prefix):
        if _ip("netns", "delete", ns, check=False).returncode != 0:
            left.append(ns)
    return [ns for ns in left if ns in namespaces()]


def stale_namespaces() -> list[str]:
    """Namespaces of testbeds whose process no longer exists (killed with SIGKILL)."""
    stale = []
    for ns in namespaces():
        match = PREFIX_PATTERN.match(ns)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            stale.append(ns)
    return stale


def preflight(prefix: str) -> None:
    """Fail at once, saying everything that is missing, unless this machine can create
    network namespaces, veth pairs and tbf qdiscs (tried on a namespace `<prefix>-check`,
    removed again)."""
    missing = []
    if not sys.platform.startswith("linux"):
        raise PreflightError(f"the edge testbed needs Linux network namespaces ({sys.platform})")
    if os.geteuid() != 0:
        missing.append(
            "root: network namespaces, veth links and tc need CAP_NET_ADMIN and "
            "CAP_SYS_ADMIN (run as root, e.g. sudo)"
        )
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            missing.append(f"the `{tool}` command (package {package})")
    if not hasattr(os, "sched_setaffinity"):
        missing.append("os.sched_setaffinity (to pin nodes to cores)")
    if missing:
        raise PreflightError("the edge testbed cannot run here; missing: " + "; ".join(missing))
    ns = f"{prefix}-check"
    try:
        steps = [
            (["ip", "netns", "add", ns], "network namespaces (`ip netns add`)"),
            (
                ["ip", "link", "add", "a0", "netns", ns, "type", "veth", "peer", "b0", "netns", ns],
                "veth pairs (`ip link add ... type veth`)",
            ),
            (["ip", "-n", ns, "link", "set", "a0", "up"], "bringing a veth up"),
            (
                ["tc", "-n", ns, "qdisc", "add", "dev", "a0", "root", *_TBF_TRIAL],
                "the token bucket qdisc (`tc qdisc ... tbf`, kernel module sch_tbf)",
            ),
        ]
        for cmd, what in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise PreflightError(
                    f"the edge testbed cannot run here: {what} failed: "
                    f"`{' '.join(cmd)}`: {done.stderr.strip()}"
                )
    finally:
        _ip("netns", "delete", ns, check=False)


@dataclass
class NodeLink:
    """Node i's namespace and its link to the hub."""

    index: int
    namespace: str
    rate_bytes_per_s: float
    hub_dev: str
    hub_address: str  # the SuperLink, as this node reaches it
    node_address: str
    node_dev: str = "up0"

    @property
    def superlink(self) -> str:
        return f"{self.hub_address}:{HUB_PORT}"


@dataclass
class Network:
    """The namespaces and links of one testbed; `destroy()` removes them all."""

    prefix: str
    hub: str
    links: list[NodeLink] = field(default_factory=list)

    def exec_prefix(self, namespace: str) -> list[str]:
        """Put before a command to run it in `namespace` (`ip netns exec` execs it: the
        process keeps the pid its parent started)."""
        return ["ip", "netns", "exec", namespace]

    def destroy(self) -> list[str]:
        """Remove every namespace of this testbed; the names that remain (none, normally)."""
        return delete_namespaces(self.prefix)


def create_network(prefix: str, rates: Sequence[float]) -> Network:
    """The hub namespace and one namespace per rate, each joined to the hub by a veth pair
    shaped to its rate in both directions. On failure, what was made is removed."""
    if not 1 <= len(rates) <= MAX_NODES:
        raise ValueError(f"1 to {MAX_NODES} nodes, not {len(rates)}")
    net = Network(prefix, f"{prefix}-hub")
    try:
        _ip("netns", "add", net.hub)
        _ip("-n", net.hub, "link", "set", "lo", "up")
        for i, rate in enumerate(rates):
            if not rate > 0:
                raise ValueError(f"node {i}: link rate {rate} is not positive")
            hub_address, node_address = f"10.77.{i}.1", f"10.77.{i}.2"
            link = NodeLink(i, f"{prefix}-n{i}", float(rate), f"n{i}", hub_address, node_address)
            _ip("netns", "add", link.namespace)
            _ip("-n", link.namespace, "link", "set", "lo", "up")
            # Both ends are created inside their namespaces: no interface ever appears in
            # the machine's own namespace.
            _ip(
                "link",
                "add",
                link.hub_dev,
                "netns",
                net.hub,
                "type",
                "veth",
                "peer",
                link.node_dev,
                "netns",
                link.namespace,
            )
            _ip("-n", net.hub, "addr", "add", f"{link.hub_address}/30", "dev", link.hub_dev)
            _ip("-n", link.namespace, "addr", "add", f"{link.node_address}/30", "dev", "up0")
            _ip("-n", net.hub, "link", "set", link.hub_dev, "up")
            _ip("-n", link.namespace, "link", "set", link.node_dev, "up")
            shape(net.hub, link.hub_dev, rate)  # down: hub -> node
            shape(link.namespace, link.node_dev, rate)  # up: node -> hub
            net.links.append(link)
    except BaseException:
        net.destroy()
        raise
    return net


def qdisc_stats(namespace: str, dev: str) -> dict:
    """The tbf qdisc's counters on `dev` (bytes and packets sent, drops, overlimits)."""
    out = subprocess.run(
        ["tc", "-n", namespace, "-s", "-j", "qdisc", "show", "dev", dev],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    with contextlib.suppress(ValueError):
        for q in json.loads(out or "[]"):
            if q.get("kind") == "tbf":
                return {k: q.get(k) for k in ("bytes", "packets", "drops", "overlimits")}
    return {}


# ---------------------------------------------------------------------- link check
def _recv(bind: str, nbytes: int) -> None:
    """Accept one connection, read `nbytes`, answer one byte, print timings as JSON."""
    with socket.socket() as server:
        server.bind((bind, 0))
        server.listen(1)
        print(json.dumps({"port": server.getsockname()[1]}), flush=True)
        conn, _ = server.accept()
        with conn:
            got, first = 0, None
            while got < nbytes:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                first = first or time.monotonic()
                got += len(chunk)
            last = time.monotonic()
            conn.sendall(b"k")
    print(json.dumps({"received": got, "first_to_last_s": last - (first or last)}), flush=True)


def _send(host: str, port: int, nbytes: int) -> None:
    """Send `nbytes` to host:port and wait for the answer; print the time as JSON."""
    payload = b"\0" * (1 << 20)
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=120) as conn:
        left = nbytes
        while left > 0:
            n = min(left, len(payload))
            conn.sendall(payload[:n])
            left -= n
        conn.recv(1)
    print(json.dumps({"sent": nbytes, "elapsed_s": time.monotonic() - t0}), flush=True)


def measure_transfer(
    src_ns: str, dst_ns: str, dst_address: str, nbytes: int, timeout_s: float = 300.0
) -> dict:
    """Send `nbytes` over TCP from namespace `src_ns` to `dst_address` in `dst_ns`; the
    sender's time from connect to the receiver's answer, and the rate it gives."""
    base = [sys.executable, "-m", "deploy.netns"]
    recv = subprocess.Popen(
        ["ip", "netns", "exec", dst_ns, *base, "recv", dst_address, str(nbytes)],
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = json.loads(recv.stdout.readline())["port"]
        send = subprocess.run(
            ["ip", "netns", "exec", src_ns, *base, "send", dst_address, str(port), str(nbytes)],
            cwd=PROJECT_DIR,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if send.returncode != 0:
            raise RuntimeError(f"transfer {src_ns} -> {dst_ns} failed: {send.stderr[-2000:]}")
        sent = json.loads(send.stdout.strip().splitlines()[-1])
        received = json.loads(recv.communicate(timeout=30)[0].strip().splitlines()[-1])
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    return {
        "bytes": nbytes,
        "elapsed_s": sent["elapsed_s"],
        "receiver_first_to_last_s": received["first_to_last_s"],
        "bytes_per_s": nbytes / sent["elapsed_s"],
    }


def check_link(net: Network, link: NodeLink, nbytes: int) -> dict:
    """Transfer `nbytes` down (hub -> node) and up (node -> hub) over one link; the rates
    against the link's, and the least time the token bucket allows: (bytes - burst) / rate."""
    down = measure_transfer(net.hub, link.namespace, link.node_address, nbytes)
    up = measure_transfer(link.namespace, net.hub, link.hub_address, nbytes)
    floor = max(0, nbytes - burst_bytes(link.rate_bytes_per_s)) / link.rate_bytes_per_s
    return {
        "node": link.index,
        "rate_bytes_per_s": link.rate_bytes_per_s,
        "min_expected_s": floor,
        "down": {**down, "of_rate": down["bytes_per_s"] / link.rate_bytes_per_s},
        "up": {**up, "of_rate": up["bytes_per_s"] / link.rate_bytes_per_s},
        "limited": down["elapsed_s"] >= floor and up["elapsed_s"] >= floor,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["recv"] and len(argv) == 3:
        _recv(argv[1], int(argv[2]))
    elif argv[:1] == ["send"] and len(argv) == 4:
        _send(argv[1], int(argv[2]), int(argv[3]))
    else:
        print("usage: python -m deploy.netns recv ADDR BYTES | send ADDR PORT BYTES")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
