"""The main job, measured: PruneFL's default run next to its variants and dense FedAvg.

Each arm is `flwr run .` with the app's defaults plus a few run-config keys, on a private
local SuperLink (`experiments.local_run`), one after another on this machine. From each
run's `summary.json` and `metrics.csv` it reports final accuracy and density, wall time
(total and by phase), bytes, and the devices' measured compute time per round (the slowest
sampled node's, `device_round_s`), and the ratio of that mean to dense FedAvg's on the same
machine in the same invocation.

    python -m experiments.bench_mainjob                       # window 0, 1, 2 and FedAvg
    python -m experiments.bench_mainjob --arms prunefl fedavg --num-supernodes 2

Writes experiments/results/bench_mainjob.{md,json} (with --out / --name, elsewhere).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from experiments.local_run import local_superlink
from strategies.results import code_version, machine

RESULTS = Path(__file__).resolve().parent / "results"

# arm -> run-config keys on top of the app's defaults
ARMS = {
    "prunefl": "",
    "prunefl-window-1": "importance-window=1",
    "prunefl-window-2": "importance-window=2",
    "prunefl-window-0": "importance-window=0",
    "prunefl-dense-format": "layer-format='dense'",
    "fedavg": "method='fedavg'",
    # kept values as quantised changes both ways (fedprune.value_code)
    "prunefl-q8": "value-code='q8'",
    "prunefl-q16": "value-code='q16'",
    # one client per node even in a federation smaller than the paper's 10 clients
    "prunefl-one-client-per-node": "simulated-clients=0",
}
DEFAULT_ARMS = ("prunefl", "prunefl-window-0", "prunefl-window-1", "prunefl-window-2", "fedavg")


def run_arm(link, arm: str, out_dir: Path, num_supernodes: int, rounds: int) -> dict:
    extra = ARMS[arm]
    config = f"output-dir='{out_dir}' run-name='{arm}'"
    if rounds:
        config += f" num-server-rounds={rounds}"
    if extra:
        config += f" {extra}"
    log_path = out_dir / f"{arm}.log"
    t0 = time.time()
    with log_path.open("w") as log:
        done = link.run(config, num_supernodes=num_supernodes, stdout=log)
    wall = time.time() - t0
    if done.returncode != 0:
        raise SystemExit(f"{arm}: flwr run failed ({done.returncode}); see {log_path}")
    summary = json.loads((out_dir / arm / "summary.json").read_text())
    first, *rows = list(csv.DictReader((out_dir / arm / "metrics.csv").open()))  # round 0 first
    device = [float(r["device_round_s"]) for r in rows]
    return {
        "arm": arm,
        "run_config": extra,
        "flwr_run_wall_s": round(wall, 1),
        "final_accuracy": summary["final_accuracy"],
        "final_density": summary["final_density"],
        "wall_time_split_s": summary.get("wall_time_split_s", {}),
        "total_bytes": summary["total_bytes"],
        "mean_device_round_s": statistics.fmean(device) if device else 0.0,
        "total_device_time_s": summary["total_device_time_s"],
        "train_formats": summary.get("train_formats", {}).get("compact", ""),
        "total_bytes_down": summary["total_bytes_down"],
        "total_bytes_up": summary["total_bytes_up"],
        "bytes_by_kind": summary.get("bytes_by_kind", {}),
        "layer_densities": summary.get("layer_densities", {}),
        "total_sim_time_s": summary["total_sim_time_s"],
        "round0_accuracy": float(first["accuracy"]),
        "round0_density": float(first["density"]),
        "node_peak_memory_mb": (summary.get("node_peak_memory") or {}).get("max_mb"),
        "inference": _inference(summary.get("inference") or {}),
    }


def _inference(block: dict) -> dict:
    """The exported model's forward against the dense model's (summary.json's "inference"
    block, timed on the server's machine after the run): pruned / dense seconds at each
    batch size, and the format of each layer."""
    ratios = {
        key.removeprefix("batch_"): cell.get("pruned_vs_dense")
        for key, cell in block.items()
        if key.startswith("batch_") and isinstance(cell, dict)
    }
    return {"pruned_vs_dense": ratios, "formats": block.get("formats", {})}


def markdown(result: dict) -> str:
    rows = result["rows"]
    dense = next((r for r in rows if r["arm"] == "fedavg"), None)
    out = [
        "# bench_mainjob: the main job (`flwr run .`), measured",
        "",
        f"- command: `{result.get('command', '')}`",
        f"- date: {result['date']}; commit {result['commit']}",
        f"- machine: {result['machine']}",
        f"- {result['num_supernodes']} simulated SuperNodes, every node in every round; "
        f"{result['rounds'] or 'the default number of'} rounds; one run per arm, in the "
        "order listed",
        "- device s: the slowest node's measured compute time of its local round "
        "(`device_round_s`), mean over the rounds; vs FedAvg: that mean over dense "
        "FedAvg's in this invocation (goal of issue 12: <= 0.4)",
        "- node MB: the largest peak memory a node's process measured in a train handler, "
        "above what it held at the handler's start (`node_peak_memory`)",
        "- inference b1 / b20: the exported pruned model's forward against the dense "
        "model's at batch 1 and 20, on the server's machine after the run (summary.json's "
        "`inference` block)",
        "",
        "| arm | run config | final acc | final density | flwr run s | initial pruning s | "
        "rounds s | evaluation s | MB moved | device s per round | vs FedAvg | node MB | "
        "formats (last round) | inference b1 / b20 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        split = r["wall_time_split_s"]
        ratio = (
            f"{r['mean_device_round_s'] / dense['mean_device_round_s']:.2f}"
            if dense and dense["mean_device_round_s"] > 0
            else ""
        )
        out.append(
            f"| {r['arm']} | `{r['run_config'] or 'defaults'}` | {r['final_accuracy']:.4f} | "
            f"{r['final_density']:.4f} | {r['flwr_run_wall_s']:.0f} | "
            f"{split.get('initial_pruning', 0):.1f} | {split.get('rounds', 0):.1f} | "
            f"{split.get('evaluation', 0):.1f} | {r['total_bytes'] / 1e6:.1f} | "
            f"{r['mean_device_round_s']:.3f} | {ratio} | {_mb(r.get('node_peak_memory_mb'))} | "
            f"{r['train_formats']} | {_inference_cell(r.get('inference'))} |"
        )
    out += kinds_table(rows)
    return "\n".join(out) + "\n"


def _mb(value) -> str:
    return "" if value is None else f"{value:.1f}"


def _inference_cell(inference: dict | None) -> str:
    ratios = (inference or {}).get("pruned_vs_dense", {})
    cells = [f"{ratios[b]:.2f}x" if ratios.get(b) else "-" for b in ("1", "20")]
    return "" if not ratios else " / ".join(cells)


KIND_NAMES = {
    "v": "values (float32)",
    "vq": "values, quantised changes",
    "m": "masks",
    "md": "mask changes",
    "g": "importance (bfloat16)",
    "gc": "importance (coded)",
    "config": "config records",
    "metric": "metric records",
    "query": "queries and answers",
}


def kinds_table(rows: list[dict]) -> list[str]:
    """Bytes by kind and direction (`strategies.accounting.bytes_by_kind`), per arm: MB
    over the run and per round."""
    arms = [r for r in rows if r.get("bytes_by_kind")]
    if not arms:
        return []
    kinds = sorted({k for r in arms for d in r["bytes_by_kind"].values() for k in d})
    out = [
        "",
        "Bytes by kind, MB over the run, down / up (what each round's records carried):",
        "",
        "| kind | " + " | ".join(r["arm"] for r in arms) + " |",
        "|---|" + "---|" * len(arms),
    ]
    for kind in kinds:
        cells = []
        for r in arms:
            down = r["bytes_by_kind"].get("down", {}).get(kind, 0) / 1e6
            up = r["bytes_by_kind"].get("up", {}).get(kind, 0) / 1e6
            cells.append(f"{down:.1f} / {up:.1f}")
        out.append(f"| {KIND_NAMES.get(kind, kind)} (`{kind}`) | " + " | ".join(cells) + " |")
    totals = [f"{r['total_bytes_down'] / 1e6:.1f} / {r['total_bytes_up'] / 1e6:.1f}" for r in arms]
    out.append("| **total** | " + " | ".join(totals) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ARMS))
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=0, help="0: the app's default")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="", help="file stem (default: bench_mainjob[_N])")
    parser.add_argument("--render", type=Path, help="only write the .md again from this .json")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(result))
        return 0
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, local_superlink(Path(tmp) / "flwr-home") as link:
        runs = Path(tmp) / "runs"
        runs.mkdir()
        for arm in args.arms:
            row = run_arm(link, arm, runs, args.num_supernodes, args.rounds)
            print(json.dumps(row), flush=True)
            rows.append(row)
    m = machine()
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "commit": code_version()["commit"][:12],
        "machine": f"{m['platform']}, {m['processor']}, {m.get('cpus', '')} CPUs, "
        f"torch {m.get('torch', '')}",
        "num_supernodes": args.num_supernodes,
        "rounds": args.rounds,
        "seconds": round(time.time() - t0),
        "command": "python -m experiments.bench_mainjob " + " ".join(argv or sys.argv[1:]),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or (
        "bench_mainjob" if args.num_supernodes == 10 else f"bench_mainjob_{args.num_supernodes}"
    )
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
