"""Run methods side by side on one preset and write one table and a few plots.

    python -m experiments.compare --preset default

Every method runs through the real Flower Simulation Engine (`flwr run`) on one private
SuperLink, with the same data, seeds, cost model and byte accounting. Results go to
`experiments/results/<preset>/`:

- `runs/<method>-seed<k>/`: each run's own outputs (metrics.csv, summary.json, ...) and
  `runs/<method>-seed<k>.log`, what `flwr run` printed;
- `summary.csv` / `summary.md`: per method and seed, final accuracy and density, total
  bytes, modelled and wall time, and modelled time and bytes to reach each target;
- `accuracy_vs_time.png`, `accuracy_vs_bytes.png`, `density_vs_round.png`.

A finished run (its summary.json exists) is not run again, so an interrupted comparison
resumes where it stopped. Baselines that prune to a density (snip, iterative, feddst)
get PruneFL's final density on the same seed, and the lottery-ticket runs its final mask:
PruneFL runs first, and its results are passed on explicitly.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

from experiments.local_run import local_superlink
from fedprune.masks import from_prune_state
from strategies.methods import REGISTERED

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Each arm is a method plus the settings that define it, as each registered method
# declares them (`comparison_arms`). "@density" and "@mask" are filled from the PruneFL run
# of the same seed.
ARMS: dict[str, dict[str, Any]] = {
    arm: {"method": cls.name, **extra}
    for cls in REGISTERED
    for arm, extra in cls.comparison_arms().items()
}

COLUMNS = [
    "method",
    "seed",
    "final_accuracy",
    "final_density",
    "total_bytes",
    "total_sim_time_s",
    "wall_time_s",
]


def load_preset(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run-config overrides, harness options) of a preset name or .toml path."""
    path = Path(name) if name.endswith(".toml") else PRESETS_DIR / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))
        raise SystemExit(f"no preset {name!r}: {path} does not exist; known presets: {known}")
    data = tomllib.loads(path.read_text())
    harness = data.pop("harness", {})
    return data, harness


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("'", "") + "'"
    return repr(value)


def run_config(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def prunable_density(mask_path: Path) -> float:
    masks = from_prune_state(torch.load(mask_path))
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def resolve_arm(arm: str, runs_dir: Path, seed: int) -> dict[str, Any]:
    """The arm's settings with PruneFL's results of the same seed filled in."""
    values = dict(ARMS[arm])
    needs = {v for v in values.values() if isinstance(v, str) and v.startswith("@")}
    if needs:
        mask = runs_dir / f"prunefl-seed{seed}" / "mask.pt"
        if not mask.is_file():
            raise RuntimeError(f"{arm} needs PruneFL's result for seed {seed}: {mask} is missing")
        for key, v in values.items():
            if v == "@density":
                values[key] = round(prunable_density(mask), 6)
            elif v == "@mask":
                values[key] = str(mask)
    return values


def time_to_target(rows: list[dict[str, str]], target: float) -> tuple[str, str]:
    """(modelled seconds, bytes) when test accuracy first reached `target`; blank if never."""
    total = 0
    for row in rows:
        total += int(row["bytes_down"]) + int(row["bytes_up"])
        if float(row["accuracy"]) >= target:
            return f"{float(row['sim_time_s']):.1f}", str(total)
    return "", ""


def summarise(runs_dir: Path, arms: list[str], seeds: list[int], targets: list[float]):
    """One row per finished run, with time and bytes to each target."""
    rows = []
    for arm in arms:
        for seed in seeds:
            run_dir = runs_dir / f"{arm}-seed{seed}"
            if not (run_dir / "summary.json").is_file():
                continue
            summary = json.loads((run_dir / "summary.json").read_text())
            metrics = list(csv.DictReader((run_dir / "metrics.csv").open()))
            row = {
                "method": arm,
                "seed": seed,
                "final_accuracy": f"{summary['final_accuracy']:.4f}",
                "final_density": f"{summary['final_density']:.4f}",
                "total_bytes": summary["total_bytes"],
                "total_sim_time_s": f"{summary['total_sim_time_s']:.1f}",
                "wall_time_s": f"{summary['total_wall_time_s']:.1f}",
            }
            for target in targets:
                t, b = time_to_target(metrics, target)
                row[f"time_to_{target:g}_s"], row[f"bytes_to_{target:g}"] = t, b
            rows.append((row, metrics))
    return rows


def write_tables(out: Path, rows, targets: list[float]) -> None:
    columns = COLUMNS + [c for t in targets for c in (f"time_to_{t:g}_s", f"bytes_to_{t:g}")]
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row, _ in rows:
            writer.writerow(row)
    header = [
        "method",
        "seed",
        "final acc",
        "final density",
        "total MB",
        "modelled s",
        "wall s",
    ] + [c for t in targets for c in (f"s to {t:g}", f"MB to {t:g}")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, _ in rows:
        cells = [
            row["method"],
            str(row["seed"]),
            row["final_accuracy"],
            row["final_density"],
            f"{int(row['total_bytes']) / 1e6:.1f}",
            row["total_sim_time_s"],
            row["wall_time_s"],
        ]
        for t in targets:
            b = row[f"bytes_to_{t:g}"]
            cells += [row[f"time_to_{t:g}_s"] or "never", f"{int(b) / 1e6:.1f}" if b else "never"]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def plot(out: Path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(row["method"] for row, _ in rows))
    colors = {arm: plt.cm.tab10(i % 10) for i, arm in enumerate(arms)}
    specs = [
        (
            "accuracy_vs_time.png",
            "modelled time (s)",
            "test accuracy",
            lambda m: [float(r["sim_time_s"]) for r in m],
            "accuracy",
        ),
        (
            "accuracy_vs_bytes.png",
            "bytes moved (MB, cumulative)",
            "test accuracy",
            lambda m: _cumulative_mb(m),
            "accuracy",
        ),
        (
            "density_vs_round.png",
            "round",
            "density (kept fraction)",
            lambda m: [int(r["round"]) for r in m],
            "density",
        ),
    ]
    for filename, xlabel, ylabel, xs, ykey in specs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        labelled = set()
        for row, metrics in rows:
            arm = row["method"]
            ax.plot(
                xs(metrics),
                [float(r[ykey]) for r in metrics],
                color=colors[arm],
                alpha=0.85,
                linewidth=1.2,
                label=None if arm in labelled else arm,
            )
            labelled.add(arm)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        if ykey == "accuracy":
            ax.set_ylim(0.5, 1.0)
        if "bytes" in filename or "time" in filename:
            # Methods differ by orders of magnitude; linear below 1 so that round 0 shows.
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)


def _cumulative_mb(metrics) -> list[float]:
    total, out = 0, []
    for r in metrics:
        total += int(r["bytes_down"]) + int(r["bytes_up"])
        out.append(total / 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare pruning methods on one preset.")
    parser.add_argument(
        "--preset", default="default", help="name in experiments/presets or a .toml path"
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    parser.add_argument(
        "--methods", nargs="+", choices=sorted(ARMS), help="override the preset's methods"
    )
    parser.add_argument("--rounds", type=int, help="override num-server-rounds")
    parser.add_argument(
        "--out", type=Path, help="results folder (default experiments/results/<preset>)"
    )
    parser.add_argument(
        "--restart", action="store_true", help="discard finished runs and start over"
    )
    args = parser.parse_args(argv)

    overrides, harness = load_preset(args.preset)
    if args.rounds:
        overrides["num-server-rounds"] = args.rounds
    seeds = args.seeds or harness.get("seeds", [0])
    arms = args.methods or harness.get("methods", list(ARMS))
    targets = [float(t) for t in harness.get("targets", [0.9])]
    num_supernodes = int(harness.get("num-supernodes", 10))
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {sorted(ARMS)}")
    # PruneFL first: the baselines take its density and mask.
    arms = sorted(arms, key=lambda a: a != "prunefl")
    out = args.out or RESULTS_DIR / Path(args.preset).stem
    runs_dir = out / "runs"
    if args.restart and runs_dir.exists():
        shutil.rmtree(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)

    jobs = [(seed, arm) for seed in seeds for arm in arms]
    todo = [(s, a) for s, a in jobs if not (runs_dir / f"{a}-seed{s}" / "summary.json").is_file()]
    print(
        f"[compare] preset {args.preset}: {len(jobs)} runs ({len(jobs) - len(todo)} done "
        f"already), {num_supernodes} simulated nodes, results in {out}",
        flush=True,
    )
    t_start = time.time()
    if todo:
        with local_superlink() as link:
            for i, (seed, arm) in enumerate(todo, 1):
                name = f"{arm}-seed{seed}"
                shutil.rmtree(runs_dir / name, ignore_errors=True)  # a half-finished run
                values = {
                    **overrides,
                    **resolve_arm(arm, runs_dir, seed),
                    "seed": seed,
                    "output-dir": str(runs_dir),
                    "run-name": name,
                }
                print(f"[compare] {i}/{len(todo)} {name} ...", flush=True)
                t0 = time.time()
                with (runs_dir / f"{name}.log").open("w") as log:
                    done = link.run(run_config(values), num_supernodes, stdout=log)
                summary_path = runs_dir / name / "summary.json"
                if done.returncode != 0 or not summary_path.is_file():
                    print(
                        f"[compare] {name} FAILED (exit {done.returncode}); see "
                        f"{runs_dir / (name + '.log')}",
                        flush=True,
                    )
                    return 1
                s = json.loads(summary_path.read_text())
                print(
                    f"[compare] {i}/{len(todo)} {name}: accuracy {s['final_accuracy']:.4f}, "
                    f"density {s['final_density']:.4f}, {s['total_bytes'] / 1e6:.0f} MB, "
                    f"{s['total_sim_time_s']:.0f} s modelled, {time.time() - t0:.0f} s wall "
                    f"(elapsed {(time.time() - t_start) / 60:.1f} min)",
                    flush=True,
                )
    rows = summarise(runs_dir, arms, seeds, targets)
    write_tables(out, rows, targets)
    plot(out, rows)
    print((out / "summary.md").read_text(), flush=True)
    print(f"[compare] done in {(time.time() - t_start) / 60:.1f} min; tables and plots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
