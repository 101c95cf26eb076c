"""Run methods side by side on one preset and write one table and a few plots.

    python -m experiments.compare --preset default

Every method runs through the real Flower Simulation Engine (`flwr run`) on one private
SuperLink, with the same data, seeds, cost model and byte accounting. Results go to
`experiments/results/<preset>/`:

- `runs/<arm>-seed<k>-<key>/`: each run's own outputs (metrics.csv, summary.json, ...,
  and run.json: what the run is), and `runs/<arm>-seed<k>-<key>.log`, what `flwr run`
  printed. The key is a digest of the run's whole configuration (every setting, defaults
  included, as the preset, the arm and PruneFL's run of the seed make it, and the number
  of nodes) and of the code (the digest of the sources it runs; summary.json also records
  the commit): a run is reused only by the very same configuration at the very same code,
  so a `--rounds 5` trial is never taken for a full run, a commit that changes code never
  reuses older runs, and an interrupted comparison resumes where it stopped;
- `summary.csv` / `summary.md`: per arm and seed (this configuration and code only),
  final accuracy and density, total bytes, modelled time (the cost model) and measured
  device time (the nodes' own compute), and the modelled time, device time and bytes to
  reach each target accuracy;
- `accuracy_vs_modelled_time.png`, `accuracy_vs_device_time.png`,
  `accuracy_vs_bytes.png`, `density_vs_round.png` (means over seeds) and
  `layer_density.png` (each arm's final density per layer).

`python -m experiments.report` turns the summary.csv files into RESULTS.md's tables.

The warm arms of one seed train the same server phase: the first trains it and keeps it in
`runs/warm-start-cache/` (setting `warm-start-cache`), the others load it.

Baselines that prune to a density (snip, iterative, feddst, fedrts, topk's upload budget)
get PruneFL's final density on the same seed, and the lottery-ticket runs its final mask:
PruneFL runs first, and its results are passed on explicitly. Arms ending in "-warm" get
the equal server phase (`warm-start`); the others start as the paper's baselines do.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import re
import shutil
import statistics
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from experiments.local_run import local_superlink
from fedprune.masks import from_prune_state
from fedprune.settings import Settings, SettingsError
from strategies.methods import REGISTERED
from strategies.results import COMMIT_ENV, git_commit, source_digest

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROJECT_DIR = Path(__file__).resolve().parent.parent

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
    "rounds",
    "key",
    "commit",
    "final_accuracy",
    "final_density",
    "total_bytes",
    "total_sim_time_s",
    "total_device_time_s",
    "wall_time_s",
]


def target_columns(targets: list[float]) -> list[str]:
    """Per target: modelled seconds, measured device seconds and bytes to reach it."""
    return [
        c
        for t in targets
        for c in (f"time_to_{t:g}_s", f"device_time_to_{t:g}_s", f"bytes_to_{t:g}")
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


def parse_setting(text: str) -> tuple[str, Any]:
    """One `--set KEY=VALUE`: VALUE is read as TOML (300, 0.5, true, 'x'); a bare word is
    a string. The key must be a setting, so a typo fails here, not an hour into a run."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    try:
        Settings.from_run_config({key: value})
    except SettingsError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return key, value


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


def code_version() -> dict[str, str]:
    """The code the runs will run: the checkout's commit ("-dirty" if tracked files
    changed) and the digest of its sources (`strategies.results.source_digest`)."""
    return {"commit": git_commit(PROJECT_DIR) or "unknown", "source_sha256": source_digest()}


def full_config(values: dict[str, Any]) -> dict[str, Any]:
    """Every setting of a run: the app's defaults (pyproject.toml) with `values` over them,
    checked as the ServerApp checks them."""
    pyproject = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())
    defaults = pyproject["tool"]["flwr"]["app"]["config"]
    config = Settings.from_run_config({**defaults, **values}).to_run_config()
    # Where it goes and where the shared warm start is kept, not what the run is.
    for key in ("output-dir", "run-name", "warm-start-cache"):
        config.pop(key)
    return config


def run_key(values: dict[str, Any], num_supernodes: int, code: dict[str, str]) -> str:
    """12 hex digits that change with any setting of the run (its full configuration, the
    defaults included), the federation's size or the code it runs (the digest of its
    sources: a commit that changes no code keeps the key, any change of code, committed or
    not, changes it)."""
    blob = json.dumps(
        {
            "config": full_config(values),
            "num-supernodes": num_supernodes,
            "sources": code["source_sha256"],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class Run:
    """One arm on one seed, in this configuration."""

    arm: str
    seed: int
    values: dict[str, Any]  # its settings (run config keys), before output-dir/run-name
    key: str

    @property
    def name(self) -> str:
        return f"{self.arm}-seed{self.seed}-{self.key}"


@dataclass
class Plan:
    """Builds each run's settings and key; PruneFL's runs must be planned (and finished)
    before the arms that take its density or mask on the same seed."""

    overrides: dict[str, Any]
    runs_dir: Path
    num_supernodes: int
    code: dict[str, str]
    prunefl: dict[int, Run] = field(default_factory=dict)

    def run(self, arm: str, seed: int) -> Run:
        values = {**self.overrides, **ARMS[arm], "seed": seed}
        keyed = dict(values)
        for k, v in ARMS[arm].items():
            if v in ("@density", "@mask"):
                source = self.prunefl.get(seed)
                mask = self.runs_dir / source.name / "mask.pt" if source else None
                if mask is None or not mask.is_file():
                    raise RuntimeError(f"{arm} needs PruneFL's result for seed {seed}: no mask")
                if v == "@density":
                    values[k] = keyed[k] = round(prunable_density(mask), 6)
                else:
                    # The path is where the results lie; the key names the run instead.
                    values[k], keyed[k] = str(mask.resolve()), f"mask of {source.key}"
        run = Run(arm, seed, values, run_key(keyed, self.num_supernodes, self.code))
        if arm == "prunefl":
            self.prunefl[seed] = run
        return run

    def finished(self, run: Run) -> bool:
        """Whether the run's folder holds a summary written by this very code."""
        path = self.runs_dir / run.name / "summary.json"
        if not path.is_file():
            return False
        code = json.loads(path.read_text()).get("code", {})
        return code.get("source_sha256") == self.code["source_sha256"]


def earlier_runs(out: Path, runs: list[Run], plan: Plan) -> list[Run]:
    """The runs of the folder's summary.csv that this invocation did not name and that are
    still valid (finished by this very code), so that a second invocation (other arms,
    e.g. the ablations after the headline) adds to the table instead of replacing it."""
    path = out / "summary.csv"
    if not path.is_file():
        return []
    named = {(r.arm, r.seed) for r in runs}
    kept = []
    for row in csv.DictReader(path.open()):
        if row.get("method") not in ARMS or "key" not in row:
            continue
        run = Run(row["method"], int(row["seed"]), {}, row["key"])
        if (run.arm, run.seed) not in named and plan.finished(run):
            kept.append(run)
    return kept


def time_to_target(rows: list[dict[str, str]], target: float) -> tuple[str, str, str]:
    """(modelled seconds, device seconds, bytes) when test accuracy first reached
    `target`; blanks if never."""
    total = 0
    for row in rows:
        total += int(row["bytes_down"]) + int(row["bytes_up"])
        if float(row["accuracy"]) >= target:
            device = float(row.get("device_time_s") or 0.0)
            return f"{float(row['sim_time_s']):.1f}", f"{device:.2f}", str(total)
    return "", "", ""


def summarise(runs_dir: Path, runs: list[Run], targets: list[float]):
    """(csv row, metrics rows, summary) per finished run of `runs`, in their order."""
    out = []
    for run in runs:
        folder = runs_dir / run.name
        if not (folder / "summary.json").is_file():
            continue
        summary = json.loads((folder / "summary.json").read_text())
        metrics = list(csv.DictReader((folder / "metrics.csv").open()))
        row = {
            "method": run.arm,
            "seed": run.seed,
            "rounds": summary["rounds"],
            "key": run.key,
            "commit": summary.get("code", {}).get("commit", "unknown")[:12],
            "final_accuracy": f"{summary['final_accuracy']:.4f}",
            "final_density": f"{summary['final_density']:.4f}",
            "total_bytes": summary["total_bytes"],
            "total_sim_time_s": f"{summary['total_sim_time_s']:.1f}",
            "total_device_time_s": f"{float(summary.get('total_device_time_s', 0.0)):.2f}",
            "wall_time_s": f"{summary['total_wall_time_s']:.1f}",
        }
        for target in targets:
            t, d, b = time_to_target(metrics, target)
            row[f"time_to_{target:g}_s"], row[f"device_time_to_{target:g}_s"] = t, d
            row[f"bytes_to_{target:g}"] = b
        out.append((row, metrics, summary))
    return out


def write_tables(out: Path, rows, targets: list[float]) -> None:
    columns = COLUMNS + target_columns(targets)
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row, _, _ in rows:
            writer.writerow(row)
    header = ["method", "seed", "final acc", "final density", "total MB", "modelled s",
              "device s", "wall s"] + [
        c for t in targets for c in (f"modelled s to {t:g}", f"device s to {t:g}",
                                     f"MB to {t:g}")
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, _, _ in rows:
        cells = [
            row["method"],
            str(row["seed"]),
            row["final_accuracy"],
            row["final_density"],
            f"{int(row['total_bytes']) / 1e6:.1f}",
            row["total_sim_time_s"],
            row["total_device_time_s"],
            row["wall_time_s"],
        ]
        for t in targets:
            b = row[f"bytes_to_{t:g}"]
            cells += [
                row[f"time_to_{t:g}_s"] or "never",
                row[f"device_time_to_{t:g}_s"] or "never",
                f"{int(b) / 1e6:.1f}" if b else "never",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------- plots


def is_warm(arm: str) -> bool:
    """Arms with the server phase: the "-warm" ones and PruneFL's (its phase 1)."""
    return arm.endswith("-warm") or (arm.startswith("prunefl") and "reconfig-only" not in arm)


def mean_curves(rows) -> dict[str, dict[str, list[float]]]:
    """Per arm, the mean over its seeds of each metrics column per round (as many rounds
    as every seed has)."""
    by_arm: dict[str, list[list[dict[str, str]]]] = {}
    for row, metrics, _ in rows:
        by_arm.setdefault(row["method"], []).append(metrics)
    curves = {}
    for arm, runs in by_arm.items():
        n = min(len(m) for m in runs)
        cumulative_mb = []
        for m in runs:
            total, mb = 0, []
            for r in m[:n]:
                total += int(r["bytes_down"]) + int(r["bytes_up"])
                mb.append(total / 1e6)
            cumulative_mb.append(mb)
        curve = {"mb": [statistics.fmean(v) for v in zip(*cumulative_mb, strict=True)]}
        for col in ("round", "accuracy", "density", "sim_time_s", "device_time_s"):
            values = [[float(r.get(col) or 0.0) for r in m[:n]] for m in runs]
            curve[col] = [statistics.fmean(v) for v in zip(*values, strict=True)]
        curves[arm] = curve
    return curves


def accuracy_limits(curves, targets: list[float]) -> tuple[float, float]:
    """An accuracy axis that shows where the arms end up: from a little below the lowest
    final accuracy (or the lowest target) to just above the best accuracy."""
    finals = [c["accuracy"][-1] for c in curves.values()]
    best = max(max(c["accuracy"]) for c in curves.values())
    low = min([*finals, *targets]) if targets else min(finals)
    span = max(best - low, 0.02)
    return max(0.0, low - 0.35 * span), min(1.0, best + 0.08 * span)


def plot(out: Path, rows, targets: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = mean_curves(rows)
    arms = list(curves)
    # One colour per method: its warm and cold arms differ by line style only.
    methods = list(dict.fromkeys(arm.removesuffix("-warm") for arm in arms))
    palette = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    colors = {arm: palette[arm.removesuffix("-warm")] for arm in arms}
    specs = [
        ("accuracy_vs_modelled_time.png", "modelled time (s, the paper's cost model)",
         "sim_time_s", "accuracy"),
        ("accuracy_vs_device_time.png", "measured device time (s, slowest node's compute)",
         "device_time_s", "accuracy"),
        ("accuracy_vs_bytes.png", "bytes moved (MB, cumulative, down + up)", "mb", "accuracy"),
        ("density_vs_round.png", "round", "round", "density"),
    ]  # fmt: skip
    warm = [arm for arm in arms if is_warm(arm)]
    for filename, xlabel, xkey, ykey in specs:
        # Accuracy: all arms, and beside them the equal-start arms on their own axis (the
        # headline, whose curves the cold ones would squash).
        panels = [(arms, "all arms: solid equal server phase, dashed cold start")]
        if ykey == "accuracy" and warm and len(warm) < len(arms):
            panels.append((warm, "equal server phase (warm arms and PruneFL)"))
        fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 5), squeeze=False)
        for ax, (shown, title) in zip(axes[0], panels, strict=True):
            for arm in shown:
                ax.plot(
                    curves[arm][xkey],
                    curves[arm][ykey],
                    color=colors[arm],
                    linestyle="-" if is_warm(arm) else "--",
                    linewidth=1.4,
                    label=arm,
                )
            if ykey == "accuracy":
                ax.set_ylim(*accuracy_limits({a: curves[a] for a in shown}, targets))
                for t in targets:
                    ax.axhline(t, color="grey", linewidth=0.6, linestyle=":")
                ax.set_ylabel("test accuracy (mean over seeds)")
            else:
                ax.set_ylim(0, 1.05)
                ax.set_ylabel("density (kept fraction, mean over seeds)")
            if xkey != "round":
                # Methods differ by orders of magnitude; linear below 1 so round 0 shows.
                ax.set_xscale("symlog", linthresh=1.0)
                ax.set_xlim(left=0)
            ax.set_xlabel(xlabel)
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
    plot_layer_density(out, rows, colors)


def plot_layer_density(out: Path, rows, colors) -> None:
    """Each pruning arm's final density per prunable layer (mean over seeds), grouped by
    layer."""
    import matplotlib.pyplot as plt

    per_arm: dict[str, list[dict[str, float]]] = {}
    for row, _, summary in rows:
        per_arm.setdefault(row["method"], []).append(summary.get("layer_densities", {}))
    # Arms that never prune (fedavg, topk) would only draw bars at 1.
    per_arm = {
        arm: seeds
        for arm, seeds in per_arm.items()
        if any(d < 1.0 for s in seeds for d in s.values())
    }
    layers = list(next(iter(per_arm.values()))[0]) if per_arm else []
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(layers)), 5))
    width = 0.8 / max(len(per_arm), 1)
    for i, (arm, seeds) in enumerate(per_arm.items()):
        means = [statistics.fmean(s.get(layer, 0.0) for s in seeds) for layer in layers]
        xs = [j + i * width for j in range(len(layers))]
        ax.bar(xs, means, width=width, color=colors.get(arm), label=arm)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))])
    ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("final kept fraction of the layer (log)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "layer_density.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- running

ROUND_LINE = re.compile(r"\[fedprune\] round\s+(\d+) \|")


def last_round(log: Path) -> int | None:
    """The last round a run's log reports (the ServerApp's per-round line)."""
    try:
        with log.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 20_000))
            found = ROUND_LINE.findall(f.read().decode(errors="replace"))
    except OSError:
        return None
    return int(found[-1]) if found else None


class Progress:
    """A rich progress display: runs done of the total, the current arm, seed and round,
    time elapsed and an estimate of the time left (mean run time so far)."""

    def __init__(self, total: int, done: int, rounds: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self.rounds, self.durations, self.total, self.done = rounds, [], total, done
        console = Console()
        if not console.is_terminal:  # a log file: whole lines, not 80 columns
            console = Console(width=240)
        self.bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("runs"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[left]}"),
            refresh_per_second=2,
            console=console,
        )
        self.task = self.bar.add_task("starting", total=total, completed=done, left="")
        self.console = self.bar.console
        self.started = time.time()

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def left(self, current_elapsed: float) -> str:
        if not self.durations:
            return "time left: after the first run"
        mean = statistics.fmean(self.durations)
        remaining = self.total - self.done
        seconds = max(0.0, remaining * mean - current_elapsed)
        return f"about {seconds / 60:.0f} min left ({mean:.0f} s per run)"

    def update(self, run: Run, log: Path, t0: float) -> None:
        r = last_round(log)
        where = "starting" if r is None else f"round {r}/{self.rounds}"
        self.bar.update(
            self.task,
            description=f"{run.arm} seed {run.seed}: {where}",
            left=self.left(time.time() - t0),
        )

    def finished(self, seconds: float) -> None:
        self.durations.append(seconds)
        self.done += 1
        self.bar.update(self.task, completed=self.done, left=self.left(0.0))


def execute(link, run: Run, runs_dir: Path, num_supernodes: int, progress: Progress) -> int:
    """Run one arm through `flwr run`, showing its rounds; returns the exit status."""
    folder = runs_dir / run.name
    shutil.rmtree(folder, ignore_errors=True)  # a half-finished run
    folder.mkdir(parents=True)
    values = {**run.values, "output-dir": str(runs_dir), "run-name": run.name}
    # The warm arms of a seed share one server phase (fedprune: warm-start-cache).
    values["warm-start-cache"] = str(runs_dir / "warm-start-cache")
    about = {"arm": run.arm, "seed": run.seed, "key": run.key, "values": run.values}
    about["num-supernodes"] = num_supernodes
    (folder / "run.json").write_text(json.dumps(about, indent=2) + "\n")
    log = runs_dir / f"{run.name}.log"
    result: dict[str, Any] = {}
    with log.open("w") as stdout:

        def target() -> None:
            result["done"] = link.run(run_config(values), num_supernodes, stdout=stdout)

        thread = threading.Thread(target=target, daemon=True)
        t0 = time.time()
        thread.start()
        while thread.is_alive():
            progress.update(run, log, t0)
            thread.join(timeout=1.0)
    return result["done"].returncode if "done" in result else 1


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
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        type=parse_setting,
        help="override one run-config setting of the preset (repeatable; runs are keyed "
        "by it), e.g. --set ip-max-iterations=1000",
    )
    parser.add_argument(
        "--out", type=Path, help="results folder (default experiments/results/<preset>)"
    )
    parser.add_argument(
        "--restart", action="store_true", help="discard finished runs and start over"
    )
    args = parser.parse_args(argv)

    overrides, harness = load_preset(args.preset)
    overrides.update(dict(args.set))
    if args.rounds:
        overrides["num-server-rounds"] = args.rounds
    seeds = args.seeds or harness.get("seeds", [0])
    arms = args.methods or harness.get("methods", list(ARMS))
    targets = [float(t) for t in harness.get("targets", [0.9])]
    num_supernodes = int(harness.get("num-supernodes", 10))
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {sorted(ARMS)}")
    needs_prunefl = any(v in ("@density", "@mask") for a in arms for v in ARMS[a].values())
    if needs_prunefl and "prunefl" not in arms:
        arms = ["prunefl", *arms]  # the baselines take its density and mask
    # PruneFL first: the baselines take its density and mask.
    arms = sorted(arms, key=lambda a: a != "prunefl")
    out = args.out or RESULTS_DIR / Path(args.preset).stem
    runs_dir = out / "runs"
    if args.restart and runs_dir.exists():
        shutil.rmtree(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)

    code = code_version()
    plan = Plan(overrides, runs_dir, num_supernodes, code)
    jobs = [(seed, arm) for seed in seeds for arm in arms]
    rounds = int(overrides.get("num-server-rounds", 40))
    print(
        f"[compare] preset {args.preset}: {len(arms)} arms x {len(seeds)} seeds = {len(jobs)} "
        f"runs, {num_supernodes} simulated nodes, {rounds} rounds; code {code['commit'][:12]} "
        f"(sources {code['source_sha256'][:12]}); results in {out}",
        flush=True,
    )
    t_start, runs, failed, reused = time.time(), [], None, 0
    with Progress(len(jobs), 0, rounds) as progress, contextlib.ExitStack() as stack:
        link = None
        for seed, arm in jobs:
            run = plan.run(arm, seed)
            runs.append(run)
            if plan.finished(run):  # this configuration at this code: reused
                reused += 1
                progress.finished(0.0)
                progress.durations.pop()  # a reused run says nothing about run time
                continue
            if link is None:  # the SuperLink starts only if something is to run
                env = {COMMIT_ENV: code["commit"]}
                link = stack.enter_context(local_superlink(extra_env=env))
            t0 = time.time()
            status = execute(link, run, runs_dir, num_supernodes, progress)
            summary_path = runs_dir / run.name / "summary.json"
            if status != 0 or not summary_path.is_file():
                failed = f"{run.name} FAILED (exit {status}); see {runs_dir / run.name}.log"
                progress.console.print(f"[compare] {failed}")
                break
            s = json.loads(summary_path.read_text())
            if s.get("code", {}).get("source_sha256") != code["source_sha256"]:
                progress.console.print(
                    f"[compare] warning: {run.name} ran other sources than this checkout's"
                )
            progress.finished(time.time() - t0)
            progress.console.print(
                f"[compare] {progress.done}/{len(jobs)} {run.arm} seed {seed}: accuracy "
                f"{s['final_accuracy']:.4f}, density {s['final_density']:.4f}, "
                f"{s['total_bytes'] / 1e6:.0f} MB, {s['total_sim_time_s']:.0f} s modelled, "
                f"{float(s.get('total_device_time_s', 0.0)):.1f} s device, "
                f"{time.time() - t0:.0f} s wall (elapsed {(time.time() - t_start) / 60:.1f} min)"
            )
    print(f"[compare] {reused} of {len(jobs)} runs done already (same configuration and code)")
    if failed:
        return 1
    runs = earlier_runs(out, runs, plan) + runs
    order: dict[str, int] = {}
    # PruneFL, then the preset's order, then arms added on the command line, then the rest.
    for arm in ["prunefl", *harness.get("methods", []), *arms, *ARMS]:
        order.setdefault(arm, len(order))
    runs.sort(key=lambda r: (order.get(r.arm, len(order)), r.arm, r.seed))
    rows = summarise(runs_dir, runs, targets)
    write_tables(out, rows, targets)
    plot(out, rows, targets)
    print((out / "summary.md").read_text(), flush=True)
    print(f"[compare] done in {(time.time() - t_start) / 60:.1f} min; tables and plots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
