"""Scale: many virtual clients with few sampled, and what sparse messages save in Flower.

    python -m experiments.bench_scale [--rounds 20] [--density-rounds 8] [--repeats 2]
                                      [--out experiments/results/bench_scale.md]

Every arm is a real `flwr run` on Flower's Simulation Engine (a private SuperLink this
script starts and stops by pid), one after the other on this machine:

1. clients: Conv-2 PruneFL with the default settings for `--rounds` rounds, with
   - 1,000 nodes, 10 sampled per round (importance uploaded every round: `auto`);
   - 10 nodes, all in every round, importance uploaded every round as well, so the
     two differ only in the number of nodes;
   - 10 nodes, all in every round, `auto` (the paper's accumulate-on-node upload).
   Reported: wall time per round (round 1 apart: it identifies every node), and the peak
   memory of the whole simulation: every process under the SuperLink (the ServerApp,
   the simulation and Ray's processes), sampled every 0.5 s, as the sum of RSS and the
   sum of PSS (shared pages split between the processes that map them; RSS counts Ray's
   shared object store once per process).
2. densities: 10 nodes, one fixed mask per run (FedAvg at 1.0; FedDST with its
   reconfiguration off, i.e. a random ERK mask, at 0.3 and 0.1), `--density-rounds`
   rounds: rounds per minute and bytes per round, so the cost of Flower's transport
   shows as the messages shrink.

Wall times per round come from each run's metrics.csv (wall_time_s at each round's end).
With `--repeats N` each group's arms run N times, interleaved (A B C A B C), so load from
other processes hits them alike; the table gives each arm's median over its runs.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import itertools
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from experiments.bench_sparse import machine
from experiments.local_run import descendants, local_superlink

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_scale.md"


def _kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class MemorySampler:
    """Peak summed RSS and PSS of a process and everything below it."""

    def __init__(self, root_pid: int, every_s: float = 0.5) -> None:
        self.root_pid, self.every_s = root_pid, every_s
        self.peak_rss_kib = self.peak_pss_kib = self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = [self.root_pid, *descendants(self.root_pid)]
            rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
            pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            self.peak_pss_kib = max(self.peak_pss_kib, pss)
            self.peak_processes = max(self.peak_processes, len(pids))
            self._stop.wait(self.every_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_arm(name: str, nodes: int, run_config: str, work: Path) -> dict:
    """One simulation; its per-round wall times, traffic and peak memory."""
    out = work / "outputs"
    config = f"{run_config} output-dir='{out}' run-name='{name}' checkpoint=false"
    log_path = work / f"{name}.log"
    t0 = time.time()
    with (
        local_superlink(work / f"home-{name}") as link,
        MemorySampler(link.process.pid) as mem,
        log_path.open("w") as log,
    ):
        done = link.run(config, num_supernodes=nodes, stdout=log)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: flwr run exited with {done.returncode}; see {log_path}")
    rows = list(csv.DictReader((out / name / "metrics.csv").open()))
    walls = [float(r["wall_time_s"]) for r in rows]
    per_round = [b - a for a, b in itertools.pairwise(walls)]
    summary = json.loads((out / name / "summary.json").read_text())
    rest = per_round[1:]
    return {
        "arm": name,
        "nodes": nodes,
        "rounds": len(per_round),
        "round_1_s": per_round[0],
        "mean_round_s": statistics.fmean(rest),
        "median_round_s": statistics.median(rest),
        "rounds_per_min": 60.0 / statistics.fmean(rest),
        "mb_per_round": statistics.fmean(
            (int(r["bytes_down"]) + int(r["bytes_up"])) / 1e6 for r in rows[2:]
        ),
        "final_density": summary["final_density"],
        "final_accuracy": summary["final_accuracy"],
        "importance_upload": summary.get("importance_upload"),
        "peak_rss_gib": mem.peak_rss_kib / 2**20,
        "peak_pss_gib": mem.peak_pss_kib / 2**20,
        "peak_processes": mem.peak_processes,
        "end_to_end_s": time.time() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--density-rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", choices=("clients", "densities"), default=None)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    info = {**machine(), "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    base = f"num-server-rounds={args.rounds} clients-per-round=10"
    clients_arms = [
        ("1000-nodes-10-sampled", 1000, base),
        ("10-nodes-every-round", 10, f"{base} importance-upload='every-round'"),
        ("10-nodes-auto", 10, base),
    ]
    dense = f"num-server-rounds={args.density_rounds} clients-per-round=10"
    fixed = "method='feddst' reconfig-interval=100000"
    density_arms = [
        ("density-1.0", 10, f"{dense} method='fedavg'"),
        ("density-0.3", 10, f"{dense} {fixed} target-density=0.3"),
        ("density-0.1", 10, f"{dense} {fixed} target-density=0.1"),
    ]
    arms = {"clients": clients_arms, "densities": density_arms}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for group, group_arms in arms.items():
            if args.only and group != args.only:
                continue
            runs: dict[str, list[dict]] = {name: [] for name, _, _ in group_arms}
            for k in range(args.repeats):
                for name, nodes, config in group_arms:
                    print(f"[bench_scale] {name} (run {k + 1}) ...", flush=True)
                    row = run_arm(f"{name}-run{k + 1}", nodes, config, Path(tmp))
                    row["arm"] = name
                    print(f"[bench_scale] {json.dumps(row)}", flush=True)
                    runs[name].append(row)
            results[group] = [median_row(rows) for rows in runs.values()]
            results[f"{group}_runs"] = [row for rows in runs.values() for row in rows]
    info["load_average_1m_after"] = os.getloadavg()[0]
    text = report(results, info, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": info, **results}, indent=2))
    return 0


def median_row(rows: list[dict]) -> dict:
    """One arm over its runs: the median of every number, the rest from the first run."""
    out = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, float):
            out[key] = statistics.median(r[key] for r in rows)
    out["runs"] = len(rows)
    return out


def report(results: dict, info: dict, args) -> str:
    lines = [
        "# bench_scale",
        "",
        f"`python -m experiments.bench_scale --rounds {args.rounds} "
        f"--density-rounds {args.density_rounds} --repeats {args.repeats}`, {info['date']}, "
        f"{info['processor']}, "
        f"{info['cpu_count']} CPUs, torch {info['torch']}; load average "
        f"{info['load_average_1m_before']:.2f} before, {info['load_average_1m_after']:.2f} after.",
        "",
    ]
    if "clients" in results:
        rows = results["clients"]
        ref = next(r for r in rows if r["arm"] == "10-nodes-every-round")
        lines += [
            "## Many clients, 10 sampled per round (Conv-2 PruneFL, default settings)",
            "",
            "| arm | nodes | importance upload | round 1 s | mean round s (2..) | vs 10 nodes, "
            "same upload | MB per round | peak RSS GiB | peak PSS GiB | processes | "
            "final acc | final density |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['arm']} | {r['nodes']} | {r['importance_upload']} | "
                f"{r['round_1_s']:.1f} | {r['mean_round_s']:.2f} | "
                f"{r['mean_round_s'] / ref['mean_round_s']:.2f}x | {r['mb_per_round']:.1f} | "
                f"{r['peak_rss_gib']:.2f} | {r['peak_pss_gib']:.2f} | {r['peak_processes']} | "
                f"{r['final_accuracy']:.3f} | {r['final_density']:.3f} |"
            )
        lines.append("")
    if "densities" in results:
        lines += [
            "## Rounds per minute by density (Conv-2, 10 nodes, fixed mask)",
            "",
            "| arm | density | mean round s (2..) | rounds per minute | MB per round |",
            "|---|---|---|---|---|",
        ]
        for r in results["densities"]:
            lines.append(
                f"| {r['arm']} | {r['final_density']:.3f} | {r['mean_round_s']:.2f} | "
                f"{r['rounds_per_min']:.1f} | {r['mb_per_round']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
