"""PruneFL's reconfiguration solver, old (commit f3749d8) and new, side by side.

    flock /tmp/fedprune-cpu.lock python -m experiments.bench_solver \
        [--sizes 1e6 1e7 2e7] [--repeats 3] [--out experiments/results/bench_solver.md]

Instances are shaped like the real models, scaled to about 1 M, 10 M and 20 M prunable
weights:
- "conv2": Conv-2 (62 classes) with the width of fc1 scaled; the paper's Conv-2 cost
  profile (`paper-conv2`: per-layer compute slopes plus the link), so t differs by layer;
- "vgg": VGG-11 (CIFAR, 512-512-10 head) with every width scaled; t is the link plus the
  paper's fc1 compute slope times the layer's output positions (a conv weight is used at
  every position of its 32x32 ... 2x2 output), so conv layers cost more per weight.

Importance is a squared gradient with heavy tails, `G = (z * r_i * c_j * s_l)^2`: z
standard normal, per-row, per-column (lognormal, sigma 1) and per-layer (lognormal,
sigma 0.5) scales. Scenarios:
- "round": a mid-training reconfiguration with regrowth. The current mask keeps 5 % of
  the weights (the top 5 % of G times lognormal noise, as an earlier reconfiguration would
  have chosen), weights are standard normal, delta = 0.3 (so the stability rule fixes
  3.5 %). The fixed round cost c is calibrated (bisection, new solver) so that the
  uncapped optimum keeps about 5 %; "cap 4 %" adds `max_density = 0.04`, which binds and
  takes the Dinkelbach path.
- "phase 1": initial pruning's first reconfiguration: every weight kept, delta = 0.3, no
  regrowth, no cap (same c).
- "nothing fixed": the round with delta = 1, so the stability rule fixes nothing and the
  new solver's lower bound on the optimum (the fixed set's value) is 0: every weight with
  G > 0 is a candidate it must sort. Its worst case, not a setting the run uses.

Per cell, old and new run `--repeats` times each, interleaved (the order alternates
every repeat) so that load from other processes hits both alike; the table reports the
median and the fastest. Both must choose identical masks (checked on every call) and the
objectives are compared. The goal of issue 16: the new solver <= 0.5 s at 10 M, with and
without a binding cap, with `torch.set_num_threads(--threads)` (2, the target machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from experiments.legacy_solver import legacy_reconfigure
from fedprune import hardware
from fedprune.costs import PAPER_COMM_S_PER_PARAM, paper_conv2
from fedprune.reconfigure import reconfigure

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_solver.md"
SIZES = (1_000_000, 10_000_000, 20_000_000)
FAMILIES = ("conv2", "vgg")
ROUND_DENSITY = 0.05  # kept share of the current mask in a "round" and of its optimum
CAP = 0.04
DELTA = 0.3
GOAL_S, GOAL_SIZE = 0.5, 10_000_000
FC_COMPUTE_S_PER_PARAM = 1.93e-7  # the paper's fc1 slope (fedprune.costs)
VGG_CONVS = ((3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512))
VGG_CONVS += ((512, 512),)
VGG_POSITIONS = (1024, 256, 64, 64, 16, 16, 4, 4)  # output positions per conv on 32x32


def conv2_like(n: int) -> tuple[dict[str, tuple[int, ...]], dict[str, float]]:
    """Conv-2 layer shapes with fc1's width chosen for about n prunable weights, and the
    paper's per-layer t (seconds per kept weight)."""
    convs = 32 * 1 * 25 + 64 * 32 * 25
    hidden = max(8, round((n - convs) / (3136 + 62)))
    shapes = {
        "conv1.weight": (32, 1, 5, 5),
        "conv2.weight": (64, 32, 5, 5),
        "fc1.weight": (hidden, 3136),
        "fc2.weight": (62, hidden),
    }
    return shapes, paper_conv2(list(shapes)).time_per_param()


def vgg_like(n: int) -> tuple[dict[str, tuple[int, ...]], dict[str, float]]:
    """VGG-11 layer shapes with every width scaled for about n prunable weights, and t
    = link + fc slope x output positions."""
    base = sum(i * o * 9 for i, o in VGG_CONVS) + 512 * 512 * 2 + 512 * 10
    w = math.sqrt(n / base)
    widths = [max(4, round(o * w)) for _, o in VGG_CONVS]
    shapes: dict[str, tuple[int, ...]] = {}
    t: dict[str, float] = {}
    c_in = 3
    for i, (c_out, positions) in enumerate(zip(widths, VGG_POSITIONS, strict=True)):
        shapes[f"features.{i}.weight"] = (c_out, c_in, 3, 3)
        t[f"features.{i}.weight"] = PAPER_COMM_S_PER_PARAM + FC_COMPUTE_S_PER_PARAM * positions
        c_in = c_out
    hidden = widths[-1]
    for name, shape in (
        ("fc1.weight", (hidden, c_in)),
        ("fc2.weight", (hidden, hidden)),
        ("fc3.weight", (10, hidden)),
    ):
        shapes[name] = shape
        t[name] = PAPER_COMM_S_PER_PARAM + FC_COMPUTE_S_PER_PARAM
    return shapes, t


def instance(family: str, n: int, seed: int) -> dict:
    """A "round" instance (without fixed_time_s, see `calibrate`)."""
    shapes, time_per_param = (conv2_like if family == "conv2" else vgg_like)(n)
    gen = torch.Generator().manual_seed(seed)
    importance, weights, score = {}, {}, {}
    for name, shape in shapes.items():
        rows, cols = shape[0], math.prod(shape[1:])
        r = torch.exp(torch.randn(rows, 1, generator=gen))
        c = torch.exp(torch.randn(1, cols, generator=gen))
        s = math.exp(0.5 * torch.randn(1, generator=gen).item())
        grad = torch.randn(rows, cols, generator=gen) * r * c * s
        importance[name] = grad.square_().reshape(shape)
        weights[name] = torch.randn(shape, generator=gen)
        noise = torch.exp(torch.randn(shape, generator=gen))
        score[name] = (importance[name] * noise).reshape(-1)
    # The current mask: the top 5 % of noisy importance over the model.
    flat = torch.cat(list(score.values()))
    k = round(ROUND_DENSITY * flat.numel())
    threshold = torch.topk(flat, k, sorted=False).values.min()
    masks = {name: score[name].reshape(shapes[name]) >= threshold for name in shapes}
    for name in shapes:  # pruned weights are zero on the server
        weights[name] = weights[name] * masks[name]
    return {
        "weights": weights,
        "masks": masks,
        "importance": importance,
        "time_per_param": time_per_param,
        "delta": DELTA,
    }


def calibrate(kwargs: dict, target: float = ROUND_DENSITY, steps: int = 16) -> float:
    """The fixed round cost c (seconds) at which the uncapped optimum keeps about `target`
    of the weights: a larger c dilutes the value, so more weights pay for themselves."""
    lo, hi = -6.0, 6.0  # log10 seconds
    for _ in range(steps):
        mid = (lo + hi) / 2
        result = reconfigure(**kwargs, fixed_time_s=10.0**mid)
        if result.kept / result.total < target:
            lo = mid
        else:
            hi = mid
    return 10.0 ** ((lo + hi) / 2)


def _timed(fn, kwargs: dict):
    gc.collect()
    t0 = time.perf_counter()
    result = fn(**kwargs)
    return time.perf_counter() - t0, result


def compare(kwargs: dict, repeats: int) -> dict:
    """Old and new on one instance, interleaved; identical masks checked on every call."""
    samples = {"old": [], "new": []}
    identical, objectives, kept = True, {}, {}
    for rep in range(repeats):
        order = ("old", "new") if rep % 2 == 0 else ("new", "old")
        results = {}
        for which in order:
            fn = legacy_reconfigure if which == "old" else reconfigure
            seconds, results[which] = _timed(fn, kwargs)
            samples[which].append(seconds)
        old, new = results["old"], results["new"]
        identical &= old.masks.keys() == new.masks.keys() and all(
            torch.equal(old.masks[k], new.masks[k]) for k in old.masks
        )
        identical &= old.kept == new.kept and old.cap_met == new.cap_met
        objectives = {"old": old.objective, "new": new.objective}
        kept = {"kept": new.kept, "total": new.total, "cap_met": new.cap_met}
    return {
        "old_median_s": statistics.median(samples["old"]),
        "new_median_s": statistics.median(samples["new"]),
        "old_min_s": min(samples["old"]),
        "new_min_s": min(samples["new"]),
        "identical_masks": bool(identical),
        "objective_old": objectives["old"],
        "objective_new": objectives["new"],
        **kept,
    }


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": hardware.cpu(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1m_before": os.getloadavg()[0],
    }


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (with uncommitted changes)" if dirty else "")


def run(sizes, families, repeats: int, seed: int) -> dict:
    machine_info = machine()
    t0 = time.perf_counter()
    rows = []
    for n in sizes:
        for family in families:
            kwargs = instance(family, n, seed)
            fixed_time_s = calibrate(kwargs)
            scenarios = (
                ("round", "none", {}),
                ("round", f"{CAP:.0%}", {"max_density": CAP}),
                ("phase 1", "none", {"allow_regrowth": False}),
                ("nothing fixed", "none", {"delta": 1.0}),
            )
            for scenario, cap, extra in scenarios:
                cell = dict(kwargs, fixed_time_s=fixed_time_s, **extra)
                if scenario == "phase 1":
                    gen = torch.Generator().manual_seed(seed + 1)
                    cell["masks"] = {k: torch.ones_like(m) for k, m in kwargs["masks"].items()}
                    cell["weights"] = {  # dense weights, none pruned yet
                        k: torch.randn(w.shape, generator=gen) for k, w in kwargs["weights"].items()
                    }
                row = {
                    "size": n,
                    "family": family,
                    "params": sum(m.numel() for m in kwargs["masks"].values()),
                    "layers": len(kwargs["masks"]),
                    "scenario": scenario,
                    "cap": cap,
                    "fixed_time_s": fixed_time_s,
                    **compare(cell, repeats),
                }
                rows.append(row)
                print(_row_line(row), flush=True)
            del kwargs
            gc.collect()
    goal_rows = [r for r in rows if r["size"] == GOAL_SIZE and r["scenario"] == "round"]
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": {**machine_info, "load_average_1m_after": os.getloadavg()[0]},
        "repeats": repeats,
        "seconds": time.perf_counter() - t0,
        "rows": rows,
        "goal": _goal(goal_rows),
    }


def _goal(rows: list[dict]) -> dict:
    if not rows:
        return {"checked": False}
    worst = max(r["new_median_s"] for r in rows)
    return {
        "checked": True,
        "limit_s": GOAL_S,
        "worst_new_median_s": worst,
        "met": worst <= GOAL_S and all(r["identical_masks"] for r in rows),
    }


def _row_line(r: dict) -> str:
    return (
        f"| {r['family']} | {r['params'] / 1e6:.1f} M ({r['layers']}) | {r['scenario']} | "
        f"{r['cap']} | {r['kept'] / r['total']:.2%}{'' if r['cap_met'] else ' (cap not met)'} | "
        f"{r['old_median_s']:.3f} ({r['old_min_s']:.3f}) | "
        f"{r['new_median_s']:.3f} ({r['new_min_s']:.3f}) | "
        f"{r['old_median_s'] / r['new_median_s']:.1f}x | "
        f"{'yes' if r['identical_masks'] else 'NO'} | "
        f"{abs(r['objective_new'] - r['objective_old']) / abs(r['objective_old']):.1e} |"
    )


HEADER = (
    "| model | prunable weights (layers) | scenario | cap | kept | old s, median (min) | "
    "new s, median (min) | speed-up | same masks | objective rel. diff |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def markdown(result: dict) -> str:
    m = result["machine"]
    goal = result["goal"]
    lines = [
        "# bench_solver: the reconfiguration solver, old (f3749d8) vs new",
        "",
        f"- date: {result['date']}; commit {result['commit']}",
        f"- machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, "
        f"torch {m['torch']}, {m['threads']} threads; load average (1 min) "
        f"{m['load_average_1m_before']:.1f} before, {m['load_average_1m_after']:.1f} after",
        f"- {result['repeats']} interleaved calls of each per cell; {result['seconds']:.0f} s "
        "in all (calibration included)",
        "",
        HEADER,
        *(_row_line(r) for r in result["rows"]),
        "",
    ]
    if goal["checked"]:
        lines.append(
            f"Goal (issue 16): new solver <= {goal['limit_s']} s at 10 M, with and without a "
            f"cap, same masks: **{'met' if goal['met'] else 'missed'}** (slowest 10 M cell, "
            f"median: {goal['worst_new_median_s']:.3f} s)."
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown or .json path")
    parser.add_argument("--sizes", type=float, nargs="+", default=list(SIZES))
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(HEADER, flush=True)
    result = run([int(s) for s in args.sizes], args.families, args.repeats, args.seed)
    text = markdown(result)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path = args.out if args.out.suffix == ".json" else args.out.with_suffix(".json")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    if args.out.suffix != ".json":
        args.out.write_text(text + "\n")
    print(f"written: {args.out}" + ("" if args.out == json_path else f" and {json_path}"))


if __name__ == "__main__":
    main()
