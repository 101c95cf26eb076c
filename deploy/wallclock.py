"""Where a deployed round's wall time goes, and how the cost model compares with it.

Inputs: a run's metrics.csv rows (the ServerApp's: `wall_time_s` after each round,
`round_sim_time_s` the cost model's time of that round) and the probe events
(`deploy.probe`) of the ServerApp, the SuperNodes and their ClientApp processes. Outputs:
one row per round (`round_table`), a run summary (`run_summary`: the model's error, time
to target accuracy on the clock and in the model, bytes per round, start-up cost,
contention), and the plot of accuracy against wall-clock and modelled time
(`plot_methods`).

A message's way through the deployment, and the name of each step here (they follow each
other, so they add up to the message's time from dispatch to collection):

    the ServerApp pushes it; the SuperNode pulls it (polls every 3 s)   `wait`
    the SuperNode downloads its objects over the node's link             `download`
    until the ClientApp process holds the message                        `to_process`
      (SuperExec polls every 1 s and starts the process; Flower is imported; the message
      is copied from the SuperNode over loopback. Flower creates the task before the
      download, so the process often starts during it: then only the copy is left)
    FAB install, the app's imports (ours), up to the handler's first line `app_load`
    the handler (train/evaluate/query)                                   `handler`
    the reply goes to the SuperNode over loopback                        `reply`
    the SuperNode sees it (polls every 0.5 s)                            `upload_wait`
    the SuperNode uploads it over the node's link                        `upload`
    the ServerApp polls (0.05 to 0.5 s, PromptGrid) and fetches it       `collect`

`upload_wait` can be negative: the SuperNode starts uploading objects as soon as the
reply's envelope arrives, while the ClientApp is still pushing the rest. A message's
*start-up* is `to_process + app_load`: from the message being on the node to the handler's
first line; the process's own start-up (from its start to that line, partly hidden behind
the download when that is long) is reported beside it.

A round's critical message is the one whose upload ended last: the round waited for it.
Times are seconds, bytes are bytes.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PHASES = (
    "wait",
    "download",
    "to_process",
    "app_load",
    "handler",
    "reply",
    "upload_wait",
    "upload",
    "collect",
)
# The columns added to metrics.csv's, per round.
ROUND_COLUMNS = [
    "wall_round_s",  # wall_time_s minus the previous round's: measured at the server
    "model_round_s",  # round_sim_time_s: the cost model's time of the round
    "model_error",  # model_round_s / wall_round_s - 1
    "train_phase_s",  # first train dispatch to last train reply collected
    "setup_s",  # queries before the round's training (identify, profile), first to last
    "server_s",  # wall_round_s - setup_s - train_phase_s: aggregation, test eval, checkpoint
    "startup_s",  # critical message: message on the node to the handler's first line
    "startup_mean_s",  # the same, mean over the round's train messages
    "process_startup_s",  # critical message: its process's start to the handler's first line
    "download_s",
    "upload_s",
    "handler_s",
    "handler_cpu_s",
    "runqueue_s",  # critical message: time its process waited for a CPU (start-up + handler)
    "polling_s",  # critical message: wait + upload_wait + collect (Flower's polls, fetch)
    "overhead_s",  # train_phase_s - download_s - handler_s - upload_s
    "corrected_round_s",  # wall_round_s - runqueue_s: without waiting for a busy CPU
    "model_comm_s",  # the model's transfer time of the round (mean node's bytes / link)
    "model_compute_s",  # model_round_s - model_comm_s
    # What the model leaves out: wall_round_s - setup_s - model_round_s (process start-up,
    # Flower's polls and copies, the handler's work beyond training, the server's step,
    # waits for a busy CPU).
    "runtime_s",
    # model_round_s plus the mean runtime_s of the rounds before (blank in round 1): the
    # cost model with the runtime's cost per round as measured so far.
    "model_runtime_round_s",
    "model_runtime_error",  # model_runtime_round_s / wall_round_s - 1
    "replies_probed",  # train replies whose path the probes saw end to end
]


# ---------------------------------------------------------------------- events
def read_events(paths: Iterable[Path], t0: float = -math.inf, t1: float = math.inf) -> list[dict]:
    """Probe events from JSON-lines files whose time `t` is in [t0, t1], sorted by time.
    A line cut short (a process killed mid-write) is skipped."""
    events = []
    for path in paths:
        if not Path(path).is_file():
            continue
        for line in Path(path).read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if t0 <= event.get("t", -math.inf) <= t1:
                event["file"] = Path(path).name
                events.append(event)
    return sorted(events, key=lambda e: e["t"])


@dataclass
class MessagePath:
    """One message from the ServerApp to a node and its reply back, with times."""

    id: str
    type: str
    node_id: int
    round: int | None
    dispatch: float
    pushed: float
    collected: float | None = None
    node: str = ""  # the node's probe name (its index in the testbed)
    download: dict | None = None
    upload: dict | None = None
    client: dict[str, Any] = field(default_factory=dict)  # ClientApp events by kind

    @property
    def complete(self) -> bool:
        keys = ("start", "task_pulled", "handler_start", "handler_end", "reply_pushed")
        return (
            self.collected is not None
            and self.download is not None
            and self.upload is not None
            and all(k in self.client for k in keys)
        )

    def phases(self) -> dict[str, float]:
        """Seconds of each step (PHASES) of a complete path; they add up to
        collected - pushed."""
        c = self.client
        return {
            "wait": self.download["t0"] - self.pushed,
            "download": self.download["t1"] - self.download["t0"],
            "to_process": c["task_pulled"]["t"] - self.download["t1"],
            "app_load": c["handler_start"]["t"] - c["task_pulled"]["t"],
            "handler": c["handler_end"]["wall_s"],
            "reply": c["reply_pushed"]["t"] - c["handler_end"]["t"],
            "upload_wait": self.upload["t0"] - c["reply_pushed"]["t"],
            "upload": self.upload["t1"] - self.upload["t0"],
            "collect": self.collected - self.upload["t1"],
        }

    def startup(self) -> float:
        """From the message being on the node to the handler's first line (seconds)."""
        return self.client["handler_start"]["t"] - self.download["t1"]

    def process_startup(self) -> float:
        """From the ClientApp process's start to the handler's first line (seconds)."""
        return self.client["handler_start"]["t"] - self.client["start"]["proc_start"]

    def cpu(self) -> dict[str, float]:
        """CPU seconds and run-queue waits of the ClientApp process: during start-up (from
        process start to the handler) and during the handler."""
        c = self.client
        start, end = c["handler_start"], c["handler_end"]
        return {
            "startup_cpu_s": start.get("cpu", math.nan),
            "startup_runqueue_s": start.get("runqueue_s", math.nan),
            "handler_cpu_s": end.get("cpu_s", math.nan),
            "handler_runqueue_s": end.get("runqueue_s", math.nan),
        }


def message_paths(server: list[dict], nodes: dict[str, list[dict]]) -> list[MessagePath]:
    """Join the ServerApp's pushes and pulls with each node's downloads, ClientApp
    processes and uploads.

    A SuperNode handles one message at a time, in the order it pulls them, and the
    ServerApp pushes a node's messages in that order too; so the k-th message pushed to
    a node is its k-th download, its k-th ClientApp process and its k-th upload. `nodes`
    maps a node's probe name to its events; the node id links it to the pushes.
    """
    paths: dict[str, MessagePath] = {}
    for e in server:
        if e["kind"] == "push":
            for mid, info in zip(e["ids"], e["messages"], strict=False):
                paths[mid] = MessagePath(
                    mid, info["type"], int(info["dst"]), info.get("round"), e["t0"], e["t1"]
                )
        elif e["kind"] == "pull":
            for reply in e["replies"]:
                path = paths.get(reply["reply_to"])
                if path is not None and path.collected is None:
                    path.collected = e["t1"]
    by_node: dict[int, list[MessagePath]] = defaultdict(list)
    for path in sorted(paths.values(), key=lambda p: p.dispatch):
        by_node[path.node_id].append(path)

    for name, events in nodes.items():
        downloads = [e for e in events if e["kind"] == "download"]
        uploads = [e for e in events if e["kind"] == "upload"]
        processes: dict[int, dict[str, dict]] = defaultdict(dict)
        for e in events:
            if e["kind"] in ("start", "flwr_imported", "task_pulled", "app_loaded") or e[
                "kind"
            ].startswith(("handler_", "reply_", "exit")):
                processes[e["pid"]].setdefault(e["kind"], e)
        clients = sorted(
            (p for p in processes.values() if p.get("start", {}).get("role") == "clientapp"),
            key=lambda p: p["start"]["proc_start"],
        )
        node_ids = {p["task_pulled"]["node_id"] for p in clients if "task_pulled" in p}
        if len(node_ids) != 1:
            continue  # no message reached this node in the window
        mine = by_node.get(node_ids.pop(), [])
        for k, path in enumerate(mine):
            path.node = name
            path.download = downloads[k] if k < len(downloads) else None
            path.upload = uploads[k] if k < len(uploads) else None
            if k < len(clients) and clients[k].get("task_pulled", {}).get("type") == path.type:
                path.client = clients[k]
    return sorted(paths.values(), key=lambda p: p.dispatch)


# ---------------------------------------------------------------------- per round
def _f(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def round_table(
    rows: Sequence[dict[str, Any]],
    paths: Sequence[MessagePath],
    link_rate_bytes_per_s: float,
) -> list[dict[str, Any]]:
    """metrics.csv's rows, each with ROUND_COLUMNS added (rounds 1..: round 0 is the
    starting point and gets blanks). `link_rate_bytes_per_s` is the slowest sampled
    node's link, for the model's share of transfer time."""
    train = defaultdict(list)
    for p in paths:
        if p.type == "train" and p.round is not None:
            train[int(p.round)].append(p)
    table, prev_train_dispatch, runtimes = [], -math.inf, []
    for i, row in enumerate(rows):
        out = dict(row)
        r = int(_f(row["round"]))
        if i == 0 or r == 0:
            table.append({**out, **{c: "" for c in ROUND_COLUMNS}})
            continue
        wall = _f(row["wall_time_s"]) - _f(rows[i - 1]["wall_time_s"])
        model = _f(row["round_sim_time_s"])
        mine = train.get(r, [])
        first_dispatch = min((p.dispatch for p in mine), default=math.nan)
        collected = [p.collected for p in mine if p.collected is not None]
        train_s = max(collected) - first_dispatch if collected else math.nan
        # The round's queries (identify, profile) run between its start and its first
        # train message; the round started about (wall - training phase) before that
        # message. Queries before it belong to earlier work: the population check before
        # initial pruning is not round 1's.
        start = first_dispatch - (wall - (train_s if math.isfinite(train_s) else 0.0))
        setup = [
            p
            for p in paths
            if p.type != "train"
            and prev_train_dispatch < p.dispatch < first_dispatch
            and (p.collected or p.pushed) > start
        ]
        if mine:
            prev_train_dispatch = first_dispatch
        setup_s = (
            max(p.collected or p.pushed for p in setup) - max(start, min(p.dispatch for p in setup))
            if setup
            else 0.0
        )
        complete = [p for p in mine if p.complete]
        replies = max(1, int(_f(row.get("replies", 0)) or len(mine) or 1))
        model_comm = (_f(row["bytes_down"]) + _f(row["bytes_up"])) / replies / link_rate_bytes_per_s
        runtime = wall - setup_s - model
        predicted = model + sum(runtimes) / len(runtimes) if runtimes else math.nan
        runtimes.append(runtime)
        values: dict[str, Any] = {
            "wall_round_s": wall,
            "model_round_s": model,
            "model_error": model / wall - 1 if wall > 0 else math.nan,
            "runtime_s": runtime,
            "model_runtime_round_s": predicted,
            "model_runtime_error": predicted / wall - 1 if wall > 0 else math.nan,
            "train_phase_s": train_s,
            "setup_s": setup_s,
            "server_s": wall - setup_s - train_s,
            "model_comm_s": model_comm,
            "model_compute_s": model - model_comm,
            "replies_probed": len(complete),
        }
        if complete:
            critical = max(complete, key=lambda p: p.upload["t1"])
            ph, cpu = critical.phases(), critical.cpu()
            runqueue = cpu["startup_runqueue_s"] + cpu["handler_runqueue_s"]
            values.update(
                startup_s=critical.startup(),
                startup_mean_s=sum(p.startup() for p in complete) / len(complete),
                process_startup_s=critical.process_startup(),
                download_s=ph["download"],
                upload_s=ph["upload"],
                handler_s=ph["handler"],
                handler_cpu_s=cpu["handler_cpu_s"],
                runqueue_s=runqueue,
                polling_s=ph["wait"] + max(0.0, ph["upload_wait"]) + ph["collect"],
                overhead_s=train_s - ph["download"] - ph["handler"] - ph["upload"],
                corrected_round_s=wall - runqueue,
            )
        table.append({**out, **{c: _round(values.get(c, "")) for c in ROUND_COLUMNS}})
    return table


def _round(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else round(value, digits)
    return value


def write_table(path: Path, table: Sequence[dict[str, Any]]) -> None:
    """The rows as CSV, columns in the order of the first row."""
    if not table:
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)


# ---------------------------------------------------------------------- per run
def error_stats(model: Sequence[float], measured: Sequence[float], within: float = 0.2) -> dict:
    """How far `model` is from `measured`, round by round: the error of the sums, the
    mean and largest absolute relative error, and the share of rounds within `within`."""
    pairs = [(m, w) for m, w in zip(model, measured, strict=True) if w > 0 and not math.isnan(m)]
    if not pairs:
        return {"rounds": 0}
    errors = [m / w - 1 for m, w in pairs]
    return {
        "rounds": len(pairs),
        "model_s": round(sum(m for m, _ in pairs), 3),
        "measured_s": round(sum(w for _, w in pairs), 3),
        "total_error": round(sum(m for m, _ in pairs) / sum(w for _, w in pairs) - 1, 4),
        "mean_abs_error": round(sum(abs(e) for e in errors) / len(errors), 4),
        "max_abs_error": round(max(abs(e) for e in errors), 4),
        f"rounds_within_{within:g}": sum(abs(e) <= within for e in errors),
    }


def time_to_targets(table: Sequence[dict[str, Any]], targets: Sequence[float]) -> dict:
    """Per target accuracy, the first round that reached it, and the time to it: on the
    clock from round 0 (`wall_s`; initial pruning and set-up before it excluded, as in the
    model), in the model (`model_s`, sim_time_s), and on the clock without run-queue
    waits (`corrected_s`). None where never reached."""
    out = {}
    for target in targets:
        hit = None
        corrected = 0.0
        for i, row in enumerate(table):
            if i > 0:
                corrected += (
                    _f(row.get("corrected_round_s"))
                    if row.get("corrected_round_s") != ""
                    else _f(row.get("wall_round_s"))
                )
            if _f(row["accuracy"]) >= target:
                hit = {
                    "round": int(_f(row["round"])),
                    "wall_s": round(_f(row["wall_time_s"]) - _f(table[0]["wall_time_s"]), 3),
                    "model_s": round(_f(row["sim_time_s"]), 3),
                    "corrected_s": round(corrected, 3),
                }
                break
        out[f"{target:g}"] = hit
    return out


def _mean(values: Iterable[Any]) -> float | None:
    vals = [_f(v) for v in values if v != "" and not math.isnan(_f(v))]
    return round(sum(vals) / len(vals), 4) if vals else None


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, standard deviation, minimum and maximum (None where there are too few)."""
    return {
        "mean": round(statistics.fmean(values), 3) if values else None,
        "stdev": round(statistics.stdev(values), 3) if len(values) > 1 else None,
        "min": round(min(values), 3) if values else None,
        "max": round(max(values), 3) if values else None,
    }


# The round and the steps of its critical message, summarised over rounds 2.. in the run's
# summary: where a round's time goes, and how much each part varies from round to round.
ROUND_PARTS = (
    "wall_round_s", "polling_s", "startup_s", "download_s", "upload_s", "handler_s",
    "runqueue_s", "server_s",
)  # fmt: skip


def run_summary(
    table: Sequence[dict[str, Any]],
    paths: Sequence[MessagePath],
    targets: Sequence[float],
    summary: dict[str, Any],
) -> dict[str, Any]:
    """The testbed's view of one run: model error (all rounds, and rounds 2.. without the
    first round's one-off queries), the round and its parts over rounds 2.. (mean, spread),
    time to each target, bytes per round, the start-up
    cost and the other per-message phases (mean over complete train messages), and
    contention (CPU and run-queue seconds of the ClientApp processes)."""
    rounds = [r for r in table[1:] if r.get("wall_round_s") not in ("", None)]
    later = [r for r in rounds if int(_f(r["round"])) >= 2]

    def stats(rs, measured_key="wall_round_s", model_key="model_round_s"):
        return error_stats([_f(r[model_key]) for r in rs], [_f(r[measured_key]) for r in rs])

    runtime = [_f(r.get("runtime_s")) for r in rounds if r.get("runtime_s") not in ("", None)]

    train = [p for p in paths if p.type == "train" and p.complete]
    phases = {name: _mean(p.phases()[name] for p in train) for name in PHASES}
    cpu = [p.cpu() for p in train]
    handler_cpu = sum(c["handler_cpu_s"] for c in cpu)
    handler_wall = sum(p.phases()["handler"] for p in train)
    return {
        "rounds": len(rounds),
        "model_error": {
            "per_round": {str(int(_f(r["round"]))): r["model_error"] for r in rounds},
            "all_rounds": stats(rounds),
            "from_round_2": stats(later),
            "from_round_2_train_phase": stats(later, "train_phase_s"),
            "from_round_2_without_runqueue": stats(later, "corrected_round_s")
            if all(r.get("corrected_round_s") not in ("", None) for r in later)
            else None,
        },
        # The cost model plus the runtime's cost per round measured in the rounds before
        # (so from round 2): how well a round is predicted once that cost is known.
        "model_plus_runtime_error": {
            "per_round": {str(int(_f(r["round"]))): r.get("model_runtime_error") for r in later},
            "from_round_2": stats(later, model_key="model_runtime_round_s"),
        },
        "runtime_s": _spread(runtime),
        "round_parts_from_round_2_s": {
            key: _spread([_f(r[key]) for r in later if r.get(key) not in ("", None)])
            for key in ROUND_PARTS
        },
        "time_to_target": time_to_targets(table, targets),
        "wall_time_s": {
            "initial_pruning": (summary.get("initial_pruning") or {}).get("wall_time_s"),
            "to_round_0": _f(table[0]["wall_time_s"]) if table else None,
            "rounds": round(_f(table[-1]["wall_time_s"]) - _f(table[0]["wall_time_s"]), 3)
            if table
            else None,
            "mean_round": _mean(r["wall_round_s"] for r in rounds),
            "mean_round_from_2": _mean(r["wall_round_s"] for r in later),
        },
        "bytes_per_round": {
            "strategy_down": _mean(r["bytes_down"] for r in rounds),
            "strategy_up": _mean(r["bytes_up"] for r in rounds),
        },
        "train_message_phases_mean_s": phases,
        "startup": {
            "mean_s": _mean(p.startup() for p in train),
            "per_round_critical_mean_s": _mean(r.get("startup_s", "") for r in rounds),
            "process_mean_s": _mean(p.process_startup() for p in train),
            "mean_cpu_s": _mean(c["startup_cpu_s"] for c in cpu),
            "mean_runqueue_s": _mean(c["startup_runqueue_s"] for c in cpu),
        },
        "contention": {
            "train_messages": len(train),
            "handler_wall_s": round(handler_wall, 3),
            "handler_cpu_s": round(handler_cpu, 3),
            "handler_runqueue_s": round(sum(c["handler_runqueue_s"] for c in cpu), 3),
            # 1.0: each handler had a core to itself; 2.0: it got half a core on average
            "handler_wall_over_cpu": round(handler_wall / handler_cpu, 3) if handler_cpu else None,
        },
        "messages": {
            "probed": len(paths),
            "complete": sum(p.complete for p in paths),
            "by_type": _count(p.type for p in paths),
        },
    }


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for item in items:
        out[item] += 1
    return dict(out)


# ---------------------------------------------------------------------- plot
def plot_methods(tables: dict[str, Sequence[dict[str, Any]]], path: Path) -> None:
    """Accuracy against wall-clock time (solid) and against the cost model's time (dashed)
    for every method, and each round's wall time against the modelled one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (method, table) in enumerate(tables.items()):
        color = colors[k % len(colors)]
        t0 = _f(table[0]["wall_time_s"])
        acc = [_f(r["accuracy"]) for r in table]
        ax[0].plot(
            [_f(r["wall_time_s"]) - t0 for r in table],
            acc,
            "-o",
            ms=3,
            color=color,
            label=f"{method}: wall clock",
        )
        ax[0].plot(
            [_f(r["sim_time_s"]) for r in table],
            acc,
            "--",
            color=color,
            label=f"{method}: cost model",
        )
        rounds = [int(_f(r["round"])) for r in table[1:]]
        ax[1].plot(
            rounds,
            [_f(r["wall_round_s"]) for r in table[1:]],
            "-o",
            ms=3,
            color=color,
            label=f"{method}: wall",
        )
        ax[1].plot(
            rounds,
            [_f(r["model_round_s"]) for r in table[1:]],
            "--",
            color=color,
            label=f"{method}: model",
        )
        startup = [_f(r.get("startup_s")) for r in table[1:]]
        ax[1].plot(rounds, startup, ":", color=color, label=f"{method}: ClientApp start-up")
    ax[0].set(
        xlabel="seconds since round 0",
        ylabel="test accuracy",
        title="accuracy vs time: wall clock and cost model",
    )
    ax[1].set(
        xlabel="round", ylabel="seconds", title="round time: measured vs modelled", ylim=(0, None)
    )
    ax[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
