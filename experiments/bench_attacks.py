"""One hostile node in ten: final accuracy and mask agreement, defence off and on.

    python -m experiments.bench_attacks [--rounds 40] [--nodes 10] [--hostile 3]
        [--defence trimmed-mean] [--attacks num-partitions,client-id,...]
        [--run-config "key=value ..."] [--out experiments/results/bench_attacks.md]

Every run is a real `flwr run` on Flower's Simulation Engine (a private SuperLink this
script starts and stops by pid) of a copy of the project whose ClientApp is
`experiments.hostile.app`: partition `--hostile` plays one attack of issue 15, the other
nodes are honest. The task is the default run config (Conv-2 on the MNIST digits, 10 nodes,
every node in every round, PruneFL reconfiguring every 10 rounds), with `--rounds` rounds.

Arms, each against the honest run with the default settings (`aggregation = mean`):
- honest, defence on: what the defence costs when nobody attacks;
- per attack, defence off (`aggregation = mean`, `examples-from-split = false`: counts
  believed up to 10^9) and on (the default bounds, `aggregation = --defence`). The
  identity attacks have no switch (their defence is always on, `fedprune.identities`).
Reported: final test accuracy, and mask agreement: the Jaccard index of the final masks'
kept positions with the honest run's (1.0: the same mask). Finished runs are not repeated
(with the same run config: their summary.json is read back), so an interrupted bench
resumes.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import subprocess
import time
from pathlib import Path

import torch

from experiments.bench_sparse import machine
from experiments.hostile import hostile_project
from experiments.local_run import local_superlink
from fedprune.masks import from_prune_state
from fedprune.settings import ATTACKS

RESULTS = Path(__file__).resolve().parent / "results"
IDENTITY_ATTACKS = ("num-partitions", "client-id")  # no switch: always defended
OFF = "aggregation='mean' examples-from-split=false"


def jaccard(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Kept positions in both masks over those kept in either."""
    both = sum(int((a[k] & b[k]).sum()) for k in a)
    either = sum(int((a[k] | b[k]).sum()) for k in a)
    return both / either if either else 1.0


def arm_config(attack: str, defence: str, hostile: int) -> str:
    """The run-config keys of an arm (attack "" is the honest federation)."""
    attacks = f"simulate-attacks='{attack}@{hostile}'" if attack else ""
    guard = OFF if defence == "off" else f"aggregation='{defence}'"
    return f"{guard} {attacks}".strip()


def run_arm(
    link, project: Path, out_dir: Path, name: str, config: str, nodes: int, timeout_s: float
) -> dict:
    """One `flwr run` (skipped if `out_dir/name` finished with the same config): its final
    accuracy, masks and wall time."""
    run_dir = out_dir / name
    full = f"{config} output-dir='{out_dir}' run-name='{name}' checkpoint=false"
    recorded = run_dir / "bench_config.txt"
    if not recorded.exists() or recorded.read_text() != full:  # not run, or differently
        t0 = time.monotonic()
        with (out_dir / f"{name}.log").open("w") as log:
            done = link.run(full, nodes, project_dir=project, timeout_s=timeout_s, stdout=log)
        if done.returncode != 0 or not (run_dir / "summary.json").exists():
            raise RuntimeError(f"run {name} failed ({done.returncode}); see {name}.log")
        (run_dir / "bench_wall_s.txt").write_text(f"{time.monotonic() - t0:.1f}\n")
        recorded.write_text(full)
    summary = json.loads((run_dir / "summary.json").read_text())
    wall = run_dir / "bench_wall_s.txt"
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {
        "accuracy": float(summary["final_accuracy"]),
        "masks": from_prune_state(torch.load(run_dir / "mask.pt")),
        "wall_s": float(wall.read_text()) if wall.exists() else float("nan"),
        "dropped": sum(int(r["dropped"]) for r in rows),
        "skipped": sum(int(r["replies"]) == 0 for r in rows[1:]),
    }


def bench(args: argparse.Namespace) -> dict:
    out_dir = Path(args.work_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    project = hostile_project(out_dir / "project")
    common = f"num-server-rounds={args.rounds} {args.run_config}".strip()
    arms = [("honest", "", "off"), ("honest", "", args.defence)]
    for attack in args.attacks:
        if attack not in IDENTITY_ATTACKS:
            arms.append((attack, attack, "off"))
        arms.append((attack, attack, args.defence))
    results = {}
    t0 = time.monotonic()
    with local_superlink(out_dir / "flwr-home") as link:
        for label, attack, defence in arms:
            name = f"{label}-{defence}"
            config = f"{common} {arm_config(attack, defence, args.hostile)}"
            print(f"[bench_attacks] {name}: {config}", flush=True)
            results[name] = run_arm(
                link, project, out_dir, name, config, args.nodes, args.timeout_s
            )
            print(f"[bench_attacks] {name}: accuracy {results[name]['accuracy']:.4f}", flush=True)
    honest = results["honest-off"]
    rows = []
    for label, _, defence in arms:
        r, same = results[f"{label}-{defence}"], results[f"honest-{defence}"]
        rows.append(
            {
                "attack": label,
                "defence": defence,
                "accuracy": r["accuracy"],
                "accuracy_vs_same_defence": r["accuracy"] - same["accuracy"],
                "jaccard": jaccard(r["masks"], honest["masks"]),
                "jaccard_same_defence": jaccard(r["masks"], same["masks"]),
                "dropped": r["dropped"],
                "skipped_rounds": r["skipped"],
                "density": sum(int(m.sum()) for m in r["masks"].values())
                / sum(m.numel() for m in r["masks"].values()),
                "wall_s": r["wall_s"],
            }
        )
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": machine(),
        "settings": {
            "rounds": args.rounds,
            "nodes": args.nodes,
            "hostile": args.hostile,
            "defence": args.defence,
            "run_config": common,
        },
        "seconds": time.monotonic() - t0,
        "rows": rows,
    }


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        "# bench_attacks: one hostile node in ten, defence off and on",
        "",
        f"- date: {result['date']}, commit {result['commit']}",
        f"- machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, torch "
        f"{m['torch']}; load average (1 min) {m['load_average_1m_before']:.1f} before",
        f"- task: the default run config (Conv-2, MNIST digits, PruneFL) with "
        f"`{s['run_config']}`, {s['nodes']} simulated nodes, every node in every round; "
        f"partition {s['hostile']} hostile (`experiments.hostile`)",
        f"- defence on: `examples-from-split = true` (the default) and `aggregation = "
        f"{s['defence']}`; off: `aggregation = mean`, `examples-from-split = false`",
        "- mask agreement: Jaccard index of the final mask's kept positions with the honest "
        "run's: the honest run with the defence off (the default settings), and the honest "
        "run with the same defence (the attack's own effect); identity attacks have no off "
        "switch",
        "- dropped: replies the server refused over the run (non-finite values after the "
        "model blew up, say); skipped: rounds without a valid reply",
        f"- {len(result['rows'])} runs, one after the other, "
        f"{sum(r['wall_s'] for r in result['rows']) / 60:.0f} min of wall time in all "
        "(runs finished by an earlier, interrupted invocation are read back, not repeated)",
        "",
        "| attack | defence | final accuracy | vs honest, same defence | mask agreement | "
        "same defence | final density | dropped | skipped | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['attack']} | {r['defence']} | {r['accuracy']:.4f} | "
            f"{r['accuracy_vs_same_defence']:+.4f} | {r['jaccard']:.4f} | "
            f"{r['jaccard_same_defence']:.4f} | {r['density']:.4f} | {r['dropped']} | "
            f"{r['skipped_rounds']} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="the default run config's 40")
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--hostile", type=int, default=3, help="the hostile partition id")
    parser.add_argument("--defence", default="trimmed-mean", help="aggregation when on")
    parser.add_argument("--attacks", type=lambda t: t.split(","), default=list(ATTACKS))
    parser.add_argument("--run-config", default="", help='more keys, e.g. "seed=1"')
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--work-dir", default="outputs/bench_attacks", help="the runs' folders")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_attacks.md")
    args = parser.parse_args(argv)
    result = bench(args)
    args.out.write_text(markdown(result))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
