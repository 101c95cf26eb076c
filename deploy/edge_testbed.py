"""An edge testbed on one machine: SuperNodes behind real slow links, time to accuracy on the
clock, and the cost model checked against it.

    python -m deploy.edge_testbed --methods prunefl fedavg-warm --num-supernodes 4 --rounds 20

What it does (as root, Linux):
1. checks at once that it can create network namespaces, veth pairs and tbf qdiscs, and
   says what is missing if not;
2. builds the network (`deploy.netns`): the SuperLink's namespace and one namespace per
   SuperNode, each joined to it by a veth pair shaped with tbf in both directions to the
   node's rate (default the paper's 1.44 MB/s; `--rates` per node), on addresses that
   exist only in these namespaces; then sends a known number of bytes over every link
   both ways and records the time it took (`--link-check-bytes`);
3. starts the federation (`deploy.federation`, as `deploy.local_federation` does, TLS and
   SuperNode authentication on): the SuperLink in its namespace, each SuperNode in its
   own, pinned to a core (`--cpus`, round robin), all of Flower's processes started
   through `deploy.probe`, which timestamps each message's way (dispatch, download,
   ClientApp start-up, handler, upload, collection); the `flwr` CLI runs inside the
   SuperLink's namespace;
4. runs each method (`flwr run . edge-testbed`), one after the other on the same nodes,
   with the measured device cost profile (`cost-profile='measured'`) and the shaped link
   rates as the model's bandwidths, so the model and the clock see the same devices;
5. writes per method, under OUTPUT_DIR/RUN_NAME/METHOD/: the ServerApp's metrics.csv and
   summary.json, Flower's byte counts (deploy_summary.json), `rounds.csv` (metrics.csv's
   columns plus `wall_round_s`, the modelled round, the error and where the wall time
   went: start-up, transfer, handler, Flower's polling, run-queue waits) and
   `testbed_summary.json` (model error per round and overall, time to each target
   accuracy on the clock and in the model, bytes per round, start-up cost, contention);
   and for all methods `testbed.json`, `testbed.md` and `accuracy_vs_wallclock.png`;
6. stops every process it started, by pid, and deletes every namespace it created, by
   its prefix `fpt-<pid>-`, on normal exit, on failure, on Ctrl-C and on SIGTERM; then
   checks that none is left and says so. (After a SIGKILL its processes still get
   SIGTERM from the kernel; its namespaces are left: `--clean-stale` removes them.)

Results are only as honest as the CPUs: N nodes share this machine's cores. The testbed
pins node i to core i mod C, measures each ClientApp's CPU time and its run-queue wait
(/proc/self/schedstat: time runnable but waiting for a core), and reports the rounds
without those waits (`corrected_round_s`) beside the measured ones. Run it alone on the
machine (here: under `flock /tmp/fedprune-cpu.lock`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.credentials import LOOPBACK_HOSTS, generate_tls
from deploy.federation import (
    PROJECT_DIR,
    Federation,
    default_node_configs,
    federation_toml,
    spawn,
    superlink_command,
    wait_https_health,
    write_deploy_summary,
)
from deploy.netns import (
    HUB_PORT,
    Network,
    PreflightError,
    check_link,
    create_network,
    delete_namespaces,
    namespaces_with_prefix,
    preflight,
    qdisc_stats,
    stale_namespaces,
)
from deploy.probe import ENV_EVENTS, ENV_POLL, ENV_WHO, install_wrappers
from deploy.wallclock import (
    ROUND_COLUMNS,
    message_paths,
    plot_methods,
    read_events,
    round_table,
    run_summary,
    write_table,
)
from experiments.local_run import (
    QUIET_ENV,
    _alive,
    descendants,
    raise_on_sigterm,
    signals_held,
    tool_env,
)
from fedprune import hardware

FEDERATION = "edge-testbed"
PAPER_RATE = 1438848.9  # bytes/s: the paper's 1.44 MB/s link (the default bandwidth setting)
DEFAULT_TARGETS = (0.93, 0.95)  # the default comparison's (experiments/presets/default.toml)
# Flower's SuperNode polling (3 s when idle) is the default. Capped at 0.25 s the wait for
# it fell by about 2.3 s a round, but the rounds took as long (docs/edge-testbed.md), so
# the cap (deploy/probe.py) is an option for measuring it.
DEFAULT_POLL_S = 0.0
WARM_SUFFIX = "-warm"  # as in experiments.compare: the method after PruneFL's server phase


# ---------------------------------------------------------------------- CPU load
class CpuSampler:
    """Once a second: the machine's busy CPU time (/proc/stat), the time some task waited
    for a CPU (/proc/pressure/cpu, "some"), and the CPU time of this script's process tree.
    `between(t0, t1)` averages them over a window: how many cores were busy, how many of
    them with the testbed's processes, and how many with others (other users of the
    machine)."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self.samples: list[tuple[float, float, float, float]] = []
        self._stop = threading.Event()
        self._ours: dict[tuple, float] = {}  # process -> its last CPU seconds (kept after exit)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def _machine_busy_s(self) -> float:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        ticks = [int(v) for v in fields]
        idle = ticks[3] + ticks[4]  # idle + iowait
        return (sum(ticks[:8]) - idle) / self._tick

    @staticmethod
    def _psi_some_s() -> float:
        try:
            line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
            return int(line.rsplit("total=", 1)[1]) / 1e6
        except (OSError, IndexError, ValueError):
            return math.nan

    def _ours_s(self) -> float:
        """CPU seconds of this script's processes, each counted up to its last sample (a
        process's final second before it exits is missed: a lower bound)."""
        for pid in [os.getpid(), *descendants(os.getpid())]:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            cpu = (int(stat[11]) + int(stat[12])) / self._tick  # utime + stime
            key = (pid, stat[19])  # with its start time: a pid can be reused
            self._ours[key] = max(self._ours.get(key, 0.0), cpu)
        return sum(self._ours.values())

    def _sample(self) -> None:
        self.samples.append(
            (time.time(), self._machine_busy_s(), self._psi_some_s(), self._ours_s())
        )

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            with contextlib.suppress(OSError, ValueError):
                self._sample()

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def between(self, t0: float, t1: float) -> dict[str, float | None]:
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return {}
        (ta, busy_a, psi_a, ours_a), (tb, busy_b, psi_b, ours_b) = inside[0], inside[-1]
        dt = tb - ta
        busy, ours = (busy_b - busy_a) / dt, (ours_b - ours_a) / dt
        return {
            "seconds": round(dt, 1),
            "busy_cores": round(busy, 3),
            "testbed_cores_at_least": round(ours, 3),
            # The rest of the busy time: other users of the machine, at most.
            "other_cores_at_most": round(max(0.0, busy - ours), 3),
            "cpu_pressure_some": None if math.isnan(psi_a) else round((psi_b - psi_a) / dt, 4),
        }


# ---------------------------------------------------------------------- the federation
@dataclass
class Placement:
    """Which CPUs each process may use (None: any)."""

    server: tuple[int, ...] | None
    nodes: list[tuple[int, ...] | None] = field(default_factory=list)

    @classmethod
    def round_robin(
        cls, num_nodes: int, cpus: Sequence[int], pin: bool, server: Sequence[int] | None
    ) -> Placement:
        nodes = [(cpus[i % len(cpus)],) if pin else None for i in range(num_nodes)]
        return cls(tuple(server) if server else None, nodes)

    def to_dict(self) -> dict:
        return {
            "server": list(self.server) if self.server else "any",
            "nodes": {str(i): list(c) if c else "any" for i, c in enumerate(self.nodes)},
        }


@contextlib.contextmanager
def testbed_federation(
    net: Network,
    workdir: Path,
    placement: Placement,
    node_configs: list[str],
    project_dir: Path = PROJECT_DIR,
    startup_timeout_s: float = 180.0,
    started: list[Federation] | None = None,
    warm_clientapp: bool = True,
    supernode_poll_s: float = DEFAULT_POLL_S,
) -> Iterator[Federation]:
    """The SuperLink in the hub namespace and one registered SuperNode in each node
    namespace, all started through the probe; everything stopped on exit. The federation
    is appended to `started` as soon as its SuperLink runs, so that a caller can check its
    processes are gone even when start-up fails. `supernode_poll_s` > 0 caps the
    SuperNodes' wait between polls of the SuperLink (`deploy.probe`); 0 keeps Flower's."""
    workdir.mkdir(parents=True, exist_ok=True)
    hub_addresses = [link.hub_address for link in net.links]
    tls = generate_tls(workdir / "certificates", [*LOOPBACK_HOSTS, *hub_addresses])
    bin_dir = install_wrappers(workdir / "bin")
    events = workdir / "events"
    events.mkdir(exist_ok=True)
    # The probe's wrappers first, then this interpreter's scripts (Flower's own tools)
    path = f"{bin_dir}{os.pathsep}{tool_env(dict(os.environ))['PATH']}"
    link_home, cli_home = workdir / "superlink", workdir / "flwr-cli"
    link_home.mkdir(exist_ok=True)
    cli_home.mkdir(exist_ok=True)
    # The CLI runs in the hub namespace, where the SuperLink is on 127.0.0.1.
    (cli_home / "config.toml").write_text(
        federation_toml(FEDERATION, f"127.0.0.1:{HUB_PORT}", tls["ca_cert"])
    )
    cli_env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(cli_home)}
    link_env = {
        **os.environ,
        **QUIET_ENV,
        "FLWR_HOME": str(link_home),
        "PATH": path,
        ENV_EVENTS: str(events / "server.jsonl"),
        ENV_WHO: "server",
    }
    hub = net.exec_prefix(net.hub)
    log = link_home / "superlink.log"
    cmd = [*hub, *superlink_command(tls, "0.0.0.0", HUB_PORT, link_home / "state.db")]
    link = spawn(cmd, link_env, project_dir, log, placement.server)
    fed = Federation(
        workdir,
        project_dir,
        f"127.0.0.1:{HUB_PORT}",
        tls["ca_cert"],
        cli_env,
        link,
        [],
        FEDERATION,
        cli_prefix=hub,
        seen_pids={link.pid},
        warm_clientapp=warm_clientapp,
    )
    if started is not None:
        started.append(fed)
    try:
        wait_https_health(link, HUB_PORT, tls["ca_cert"], startup_timeout_s, log, prefix=hub)
        for node_link, config, cpus in zip(net.links, node_configs, placement.nodes, strict=True):
            fed.add_supernode(
                config,
                wrap=net.exec_prefix(node_link.namespace),
                env={
                    "PATH": path,
                    ENV_EVENTS: str(events / f"node-{node_link.index}.jsonl"),
                    ENV_WHO: str(node_link.index),
                    **({ENV_POLL: repr(supernode_poll_s)} if supernode_poll_s > 0 else {}),
                },
                cpus=cpus,
                program=[str(bin_dir / "probe-supernode")],
                superlink=node_link.superlink,
            )
        for node in fed.supernodes:
            fed.start_supernode(node)
        fed.wait_nodes({n.node_id: "online" for n in fed.supernodes}, startup_timeout_s)
        yield fed
    finally:
        fed.stop()


# ---------------------------------------------------------------------- run config
def toml_string(value: str) -> str:
    """`value` quoted for `flwr run --run-config`: Flower takes '...' or "..." with no
    quote of the same kind inside (and reads it as TOML: '...' literally)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return '"' + value.replace("\\", "\\\\") + '"'
    raise SystemExit(f"{value!r}: a run-config value cannot hold both kinds of quote")


def method_run_config(
    method: str, rounds: int, rates: Sequence[float], out_root: Path
) -> tuple[str, str]:
    """(the run config the testbed sets before the user's, the one it sets after it):
    full participation, the measured device profile with the shaped rates as the model's
    links; and the method and where the ServerApp writes its results."""
    before = (
        f"num-server-rounds={rounds} clients-per-round={len(rates)} "
        f"cost-profile='measured' bandwidth-bytes-per-s={rates[0]} "
        f"bandwidths={toml_string(','.join(repr(float(r)) for r in rates))}"
    )
    # "fedavg-warm" is FedAvg after the same server phase as PruneFL's (warm-start); the
    # warm methods of one testbed share it through one cache, so it is trained once.
    base = method.removesuffix(WARM_SUFFIX)
    warm = (
        f" warm-start=true warm-start-cache={toml_string(str(out_root / 'warm-start-cache'))}"
        if method.endswith(WARM_SUFFIX)
        else ""
    )
    after = (
        f"method={toml_string(base)} output-dir={toml_string(str(out_root))} "
        f"run-name={toml_string(method)} node-auth=true{warm}"
    )
    return before, after


# ---------------------------------------------------------------------- results
def read_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


def analyse_run(
    out_dir: Path,
    events_dir: Path,
    t0: float,
    t1: float,
    rates: Sequence[float],
    targets: Sequence[float],
) -> tuple[list[dict], dict]:
    """rounds.csv and testbed_summary.json of one finished run; (its table, its summary)."""
    rows = read_rows(out_dir / "metrics.csv")
    summary = json.loads((out_dir / "summary.json").read_text())
    server = read_events([events_dir / "server.jsonl"], t0, t1)
    nodes = {
        p.stem.removeprefix("node-"): read_events([p], t0, t1)
        for p in sorted(events_dir.glob("node-*.jsonl"))
    }
    paths = message_paths(server, nodes)
    table = round_table(rows, paths, min(rates))
    write_table(out_dir / "rounds.csv", table)
    result = run_summary(table, paths, targets, summary)
    missing = sorted(
        {
            e["name"]
            for evs in [server, *nodes.values()]
            for e in evs
            if e["kind"] == "probe_missing"
        }
    )
    if missing:
        result["probe_missing"] = missing
    return table, result


def analyse_method(
    out_root: Path,
    method: str,
    entry: dict[str, Any],
    events_dir: Path,
    rates: Sequence[float],
    targets: Sequence[float],
) -> list[dict]:
    """Analyse one finished method run (its window of probe events) into its folder and
    into `entry` (its part of testbed.json); its round table."""
    out_dir = out_root / method
    t0, t1 = entry["window"]
    table, summary = analyse_run(out_dir, events_dir, t0, t1, rates, targets)
    summary["cpu"] = entry.get("cpu")
    summary["qdisc"] = entry.get("qdisc")
    (out_dir / "testbed_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    entry["final_accuracy"] = float(table[-1]["accuracy"])
    entry["testbed"] = summary
    entry["rounds"] = [{k: r[k] for k in ("round", *ROUND_COLUMNS)} for r in table[1:]]
    return table


def reanalyse(out_root: Path) -> int:
    """Analyse a finished testbed's results again from what it stored (testbed.json,
    each method's metrics.csv, the probe events under work/events): after a change to
    the analysis, without running anything."""
    path = out_root / "testbed.json"
    report = json.loads(path.read_text())
    events_dir = Path(report.get("workdir", out_root / "work")) / "events"
    tables = {}
    for method, entry in report["methods"].items():
        if "error" in entry:
            continue
        tables[method] = analyse_method(
            out_root, method, entry, events_dir, report["rates_bytes_per_s"], report["targets"]
        )
        _print_method(method, entry["testbed"])
    if tables:
        plot_methods(tables, out_root / "accuracy_vs_wallclock.png")
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_root / "testbed.md").write_text(markdown_report(report))
    print(f"[testbed] analysed again: {out_root}", flush=True)
    return 0


def git_commit(project_dir: Path) -> str:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=project_dir, capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain") else "")


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": hardware.cpu(),
        "cpus": os.cpu_count(),
        "cpus_usable": sorted(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "load_average_1m_at_start": os.getloadavg()[0],
    }


def _fmt(value: Any, spec: str = ".1f", none: str = "-") -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def poll_text(cap_s: float) -> str:
    """How the report names the SuperNodes' polling."""
    if cap_s > 0:
        return f"at most {cap_s:g} s apart (Flower's: 3 s when idle)"
    return "Flower's (3 s when idle, 0.5 s while a reply is made)"


def markdown_report(report: dict) -> str:
    """The table for README: per method, time to each target (clock, clock without
    run-queue waits, model), bytes per round, the model's error, start-up per message."""
    targets = report["targets"]
    lines = [
        f"Edge testbed, {report['date']}, commit {report['commit']}; "
        f"{report['num_supernodes']} SuperNodes, links "
        + ", ".join(f"{r / 1e6:.3g} MB/s" for r in report["rates_bytes_per_s"])
        + f"; CPUs: {json.dumps(report['placement'])}"
        + f"; ClientApp starts: {report.get('clientapp_start', 'cold')}"
        + f"; SuperNode polls: {poll_text(report.get('supernode_poll_s', 0.0))}",
        "",
        "| method | rounds | final acc. | "
        + " | ".join(f"to {t:g}: wall / no run-queue / model (s)" for t in targets)
        + " | bytes per round (down + up) | Flower's bytes per round | model error, rounds "
        "2.. (total / mean abs / max abs) | runtime per round, beyond the model (s) | "
        "model + runtime of the rounds before: error, rounds 2.. (total / mean abs / max "
        "abs; rounds within 20 %) | ClientApp start-up per message (s) | "
        "wall / CPU of handlers |",
        "|---|---:|---:|" + "---:|" * len(targets) + "---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, m in report["methods"].items():
        if "error" in m:
            lines.append(f"| {method} | failed: {m['error']} |")
            continue
        s = m["testbed"]
        hits = []
        for t in targets:
            hit = s["time_to_target"].get(f"{t:g}")
            hits.append(
                "not reached"
                if hit is None
                else f"{hit['wall_s']:.0f} / {hit['corrected_s']:.0f} / {hit['model_s']:.0f}"
                f" (round {hit['round']})"
            )
        b = s["bytes_per_round"]
        per_round = (b["strategy_down"] or 0) + (b["strategy_up"] or 0)
        flower = m["traffic"]["flower_network_traffic"]["total_bytes"] / max(1, s["rounds"])
        err = _error_cell(s["model_error"]["from_round_2"])
        plus = (s.get("model_plus_runtime_error") or {}).get("from_round_2") or {}
        err_plus = _error_cell(plus)
        if plus.get("rounds"):
            err_plus += f" ({plus['rounds_within_0.2']} of {plus['rounds']})"
        runtime = s.get("runtime_s") or {}
        runtime_cell = _fmt(runtime.get("mean"))
        if runtime.get("stdev") is not None:
            runtime_cell += f" ± {runtime['stdev']:.1f}"
        lines.append(
            f"| {method} | {s['rounds']} | {_fmt(m['final_accuracy'], '.4f')} | "
            + " | ".join(hits)
            + f" | {per_round / 1e6:.3f} MB | {flower / 1e6:.3f} MB | {err} | "
            f"{runtime_cell} | {err_plus} | {_fmt(s['startup']['mean_s'], '.2f')} | "
            f"{_fmt(s['contention']['handler_wall_over_cpu'], '.2f')} |"
        )
    lines += ["", "Per round (wall vs model, seconds):", ""]
    for method, m in report["methods"].items():
        if "error" in m:
            continue
        lines.append(
            f"- {method}: "
            + "; ".join(
                f"r{r['round']} {_fmt(r['wall_round_s'])} vs {_fmt(r['model_round_s'])}"
                f" ({_fmt(r['model_error'], '+.0%')}; model + runtime so far "
                f"{_fmt(r.get('model_runtime_round_s'))} "
                f"({_fmt(r.get('model_runtime_error'), '+.0%')}); start-up {_fmt(r['startup_s'])}, "
                f"transfer {_fmt(_sum(r['download_s'], r['upload_s']))}, "
                f"handler {_fmt(r['handler_s'])}, polling {_fmt(r['polling_s'])}, "
                f"server {_fmt(r['server_s'])}, run-queue {_fmt(r['runqueue_s'])})"
                for r in m["rounds"]
            )
        )
    return "\n".join(lines) + "\n"


def _error_cell(e: dict) -> str:
    """The "total / mean abs / max abs" cell of `wallclock.error_stats`; "-" without rounds."""
    if not e.get("rounds"):
        return "-"
    return f"{e['total_error']:+.0%} / {e['mean_abs_error']:.0%} / {e['max_abs_error']:.0%}"


def _sum(*values: Any) -> float | None:
    try:
        return sum(float(v) for v in values)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------- command line
def parse_rates(text: str, num_nodes: int) -> list[float]:
    """`--rates`: one rate (bytes/s) for all nodes, or one per node."""
    rates = [float(v) for v in text.split(",") if v.strip()]
    if len(rates) == 1:
        rates *= num_nodes
    if len(rates) != num_nodes or not all(r > 0 and math.isfinite(r) for r in rates):
        raise SystemExit(
            f"--rates {text!r}: give one positive rate in bytes/s, or one per node ({num_nodes})"
        )
    return rates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["prunefl", "fedavg-warm"],
        help='methods, one run each; "<method>-warm" starts it after the same server phase '
        "as PruneFL's (warm-start), as the comparison's warm arms do",
    )
    parser.add_argument("--num-supernodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20, help="num-server-rounds")
    parser.add_argument(
        "--rates",
        default=f"{PAPER_RATE}",
        help="link rate in bytes/s, for all nodes or one per node "
        "(e.g. 1.44e6,1.44e6,0.3e6,1.44e6); default the paper's 1.44 MB/s",
    )
    parser.add_argument(
        "--run-config", default="", help="app settings for every method, e.g. \"model='small-cnn'\""
    )
    parser.add_argument(
        "--method-config",
        action="append",
        default=[],
        metavar="METHOD=SETTINGS",
        help='app settings for one method, e.g. "fedavg=learning-rate=0.05" (repeatable)',
    )
    parser.add_argument(
        "--targets",
        type=float,
        nargs="+",
        default=list(DEFAULT_TARGETS),
        help="test accuracies to report the time to",
    )
    parser.add_argument(
        "--cpus",
        default="",
        help="CPUs the nodes are pinned to, round robin (default: all this process may use)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin nodes to CPUs")
    parser.add_argument(
        "--cold-clientapp",
        action="store_true",
        help="Flower's own ClientApp starts (a fresh process that imports everything, per "
        "message) instead of forking them warm (deploy/warm_clientapp.py)",
    )
    parser.add_argument(
        "--supernode-poll-s",
        type=float,
        default=DEFAULT_POLL_S,
        help="longest wait of a SuperNode between its polls of the SuperLink, in seconds "
        "(Flower 1.41 hard-codes 3 s when idle; deploy/probe.py caps it); 0: Flower's own",
    )
    parser.add_argument(
        "--server-cpus", default="", help="CPUs of the SuperLink and ServerApp (default: any)"
    )
    parser.add_argument(
        "--link-check-bytes",
        type=int,
        default=2_000_000,
        help="bytes sent each way over every link before the runs (0: no check)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="node i reads DATA_DIR/partition-<i> (python -m clients.prepare_data)",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"))
    parser.add_argument("--run-name", default="", help="default: edge-<date>-<time>")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="certificates, keys, logs and probe events (default: OUTPUT/RUN/work)",
    )
    parser.add_argument("--timeout-s", type=float, default=7200.0, help="per method")
    parser.add_argument(
        "--clean-stale",
        action="store_true",
        help="first delete namespaces left by testbeds that were killed (fpt-<dead pid>-*)",
    )
    parser.add_argument(
        "--check", action="store_true", help="only check that this machine can run it"
    )
    parser.add_argument(
        "--reanalyse",
        type=Path,
        metavar="OUTPUT/RUN",
        help="analyse a finished testbed's stored results again (runs nothing)",
    )
    return parser


def _cpu_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.supernode_poll_s >= 0:
        parser.error(f"--supernode-poll-s must be 0 or more seconds, not {args.supernode_poll_s}")
    if args.reanalyse:
        return reanalyse(args.reanalyse.resolve())
    prefix = f"fpt-{os.getpid()}"
    try:
        preflight(prefix)
    except PreflightError as exc:
        print(f"[testbed] {exc}", file=sys.stderr)
        return 2
    if args.check:
        print("[testbed] this machine can run the edge testbed", flush=True)
        return 0
    stale = stale_namespaces()
    if stale and args.clean_stale:
        for ns in stale:
            subprocess.run(["ip", "netns", "delete", ns], check=False)
        print(f"[testbed] deleted stale namespaces: {' '.join(stale)}", flush=True)
    elif stale:
        print(
            f"[testbed] namespaces left by killed testbeds: {' '.join(stale)} "
            "(--clean-stale deletes them)",
            file=sys.stderr,
        )
    if args.num_supernodes < 1:
        raise SystemExit("--num-supernodes must be at least 1")
    rates = parse_rates(args.rates, args.num_supernodes)
    method_configs: dict[str, list[str]] = {}
    for item in args.method_config:
        method, _, settings = item.partition("=")
        method_configs.setdefault(method.strip(), []).append(settings)
    cpus = _cpu_list(args.cpus) or sorted(os.sched_getaffinity(0))
    placement = Placement.round_robin(
        args.num_supernodes, cpus, not args.no_pin, _cpu_list(args.server_cpus) or None
    )
    node_configs = default_node_configs(args.num_supernodes, args.data_dir)
    run_name = args.run_name or time.strftime("edge-%Y%m%d-%H%M%S")
    out_root = (args.output_dir / run_name).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    workdir = (args.workdir or out_root / "work").resolve()
    signal.signal(signal.SIGTERM, raise_on_sigterm)  # SIGINT raises KeyboardInterrupt

    report: dict[str, Any] = {
        "command": "python -m deploy.edge_testbed "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": git_commit(PROJECT_DIR),
        "machine": machine_info(),
        "namespace_prefix": prefix,
        "workdir": str(workdir),
        "num_supernodes": args.num_supernodes,
        "rates_bytes_per_s": rates,
        "placement": placement.to_dict(),
        "clientapp_start": "cold" if args.cold_clientapp else "warm",
        "supernode_poll_s": args.supernode_poll_s,
        "targets": args.targets,
        "methods": {},
    }
    status = 1
    started: list[Federation] = []
    try:
        with CpuSampler() as sampler:
            net = create_network(prefix, rates)  # on failure, it removes what it made
            links = [f"{k.namespace} ({k.rate_bytes_per_s / 1e6:.3g} MB/s)" for k in net.links]
            print(f"[testbed] network {net.hub} + {', '.join(links)}", flush=True)
            if args.link_check_bytes > 0:
                report["link_check"] = [
                    check_link(net, link, args.link_check_bytes) for link in net.links
                ]
                for c in report["link_check"]:
                    print(
                        f"[testbed] link {c['node']}: {args.link_check_bytes:,} B down in "
                        f"{c['down']['elapsed_s']:.2f} s ({c['down']['of_rate']:.1%} of the "
                        f"rate), up in {c['up']['elapsed_s']:.2f} s ({c['up']['of_rate']:.1%}); "
                        f"the bucket allows no less than {c['min_expected_s']:.2f} s",
                        flush=True,
                    )
            with testbed_federation(
                net,
                workdir,
                placement,
                node_configs,
                started=started,
                warm_clientapp=not args.cold_clientapp,
                supernode_poll_s=args.supernode_poll_s,
            ) as fed:
                print(
                    f"[testbed] SuperLink (pid {fed.superlink.pid}) in {net.hub}; "
                    f"{len(fed.supernodes)} SuperNodes online: "
                    + ", ".join(
                        f"{n.node_id} (pid {n.process.pid}, cpus {n.cpus or 'any'})"
                        for n in fed.supernodes
                    ),
                    flush=True,
                )
                tables = {}
                for method in args.methods:
                    before, after = method_run_config(method, args.rounds, rates, out_root)
                    configs = [before, args.run_config, *method_configs.get(method, []), after]
                    print(
                        f"[testbed] {method}: flwr run . {FEDERATION} "
                        + " ".join(f"--run-config {shlex.quote(c)}" for c in configs if c),
                        flush=True,
                    )
                    t0 = time.time()
                    outcome = fed.run(configs, args.timeout_s, out_root / f"{method}.log")
                    t1 = time.time()
                    entry: dict[str, Any] = {
                        "run_id": outcome.run_id,
                        "status": outcome.status,
                        "run_config": [c for c in configs if c],
                        "elapsed_s": round(t1 - t0, 1),
                        "window": [t0, t1],
                        "cpu": sampler.between(t0, t1),
                    }
                    report["methods"][method] = entry
                    out_dir = out_root / method
                    if (
                        outcome.status != "finished:completed"
                        or not (out_dir / "summary.json").is_file()
                    ):
                        entry["error"] = f"run {outcome.status}; see {out_root / f'{method}.log'}"
                        print(f"[testbed] {method}: {entry['error']}", flush=True)
                        continue
                    entry["traffic"] = write_deploy_summary(out_dir, outcome.run)
                    entry["qdisc"] = {
                        str(link.index): {
                            "down": qdisc_stats(net.hub, link.hub_dev),
                            "up": qdisc_stats(link.namespace, link.node_dev),
                        }
                        for link in net.links
                    }
                    tables[method] = analyse_method(
                        out_root, method, entry, workdir / "events", rates, args.targets
                    )
                    _print_method(method, entry["testbed"])
                if tables:
                    plot_methods(tables, out_root / "accuracy_vs_wallclock.png")
                status = 0 if all("error" not in m for m in report["methods"].values()) else 1
    except KeyboardInterrupt:
        print("[testbed] interrupted; stopping everything", file=sys.stderr)
        status = 130
    except SystemExit as exc:  # SIGTERM
        status = exc.code if isinstance(exc.code, int) else 1
        print("[testbed] terminated; stopping everything", file=sys.stderr)
    finally:
        with signals_held():
            left = cleanup(prefix, started[0] if started else None)
        report["left_behind"] = left
        report["processes_started"] = sorted(started[0].seen_pids) if started else []
        (out_root / "testbed.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        if report["methods"]:
            (out_root / "testbed.md").write_text(markdown_report(report))
        if left["namespaces"] or left["processes"]:
            print(f"[testbed] LEFT BEHIND: {left}", file=sys.stderr)
            status = status or 1
        else:
            print(
                f"[testbed] stopped {len(report['processes_started'])} processes and deleted "
                f"the namespaces {prefix}-*; nothing left behind. Results: {out_root}",
                flush=True,
            )
    return status


def cleanup(prefix: str, fed: Federation | None) -> dict[str, list]:
    """Stop the federation's processes (if it got that far), delete the namespaces of
    this testbed's prefix; what is still there afterwards."""
    with contextlib.suppress(Exception):
        if fed is not None:
            fed.stop()  # a second stop is harmless: every stop is by pid, and bounded
    delete_namespaces(prefix)
    alive = sorted(p for p in (fed.seen_pids if fed else ()) if _alive(p))
    return {"namespaces": namespaces_with_prefix(prefix), "processes": alive}


def _print_method(method: str, s: dict) -> None:
    e = s["model_error"]["from_round_2"]
    hits = ", ".join(
        f"{t}: "
        + (
            "not reached"
            if h is None
            else f"{h['wall_s']:.0f} s wall / {h['model_s']:.0f} s model (round {h['round']})"
        )
        for t, h in s["time_to_target"].items()
    )
    err = (
        f"{e['total_error']:+.1%} total, {e['mean_abs_error']:.1%} mean abs"
        if e.get("rounds")
        else "-"
    )
    plus = (s.get("model_plus_runtime_error") or {}).get("from_round_2") or {}
    if plus.get("rounds"):
        err += (
            f"; with the runtime of the rounds before: {plus['total_error']:+.1%} total, "
            f"{plus['mean_abs_error']:.1%} mean abs"
        )
    print(
        f"[testbed] {method}: mean round {s['wall_time_s']['mean_round']} s wall; "
        f"model error from round 2: {err}"
        + f"; ClientApp start-up {s['startup']['mean_s']} s per message; "
        f"handlers wall/CPU {s['contention']['handler_wall_over_cpu']}; to target: {hits}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
