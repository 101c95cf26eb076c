"""Does the device profile predict a client's round time? Predicted vs measured, one run.

    python -m experiments.bench_profile [--out experiments/results/bench_profile.md]

Profiles this machine for Conv-2 (K = 5 steps, batch 20, importance tracked) with
`fedprune.profiler.profile_device`, then times whole local rounds of `train_sparse` (fc
layers in CSR below the measured crossover, as `sparse-training = true` clients run) on
the masks a PruneFL run goes through, and compares each with the profile's prediction
`CostProfile.compute_time_s(kept)`. Communication is not part of it: in simulation the
link is modelled, not measured.

The masks: each layer at the densities of the default run's rounds (initial pruning's
result, after the first and the second reconfiguration, the final mask; from README's
measured run), plus dense and a uniform 0.3. Rounds of all masks are interleaved within
each repetition, and each row reports the median over repetitions, so load from other
processes hits them alike. Goal of issue 4: prediction within 15 % of the measurement.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import time
from pathlib import Path

import torch

from experiments.bench_sparse import machine
from fedprune.costs import CostProfile
from fedprune.data import DataSpec, client_partition
from fedprune.masks import apply_masks, full_masks
from fedprune.models import conv2
from fedprune.policies import random_masks
from fedprune.profiler import csr_max_densities, profile_device
from fedprune.sparse import train_sparse

LOCAL_STEPS, BATCH, LR = 5, 20, 0.1
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_profile.md"
# Layer densities (conv1, conv2, fc1, fc2) of the default PruneFL run (README "Measured").
RUN_MASKS = {
    "dense": (1.0, 1.0, 1.0, 1.0),
    "uniform 0.3": (0.3, 0.3, 0.3, 0.3),
    "after initial pruning": (0.72, 0.11, 0.016, 0.50),
    "after reconfiguration 1": (0.74, 0.15, 0.029, 0.55),
    "after reconfiguration 2": (0.75, 0.17, 0.036, 0.57),
    "final": (0.76, 0.18, 0.039, 0.59),
}


def round_seconds(model, masks, data, max_csr) -> float:
    start = time.perf_counter()
    train_sparse(
        model,
        masks,
        data,
        steps=LOCAL_STEPS,
        batch_size=BATCH,
        lr=LR,
        generator=torch.Generator().manual_seed(0),
        max_csr_density=max_csr,
    )
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    model = conv2(10)
    names = list(full_masks(model))
    t0 = time.perf_counter()
    # Medians, like the measurement below (the profiler defaults to the fastest repeat).
    profile, measurements = profile_device(
        model, LOCAL_STEPS, BATCH, 1e6, statistic="median", repeats=5
    )
    profile_s = time.perf_counter() - t0
    max_csr = csr_max_densities(measurements)

    generator = torch.Generator().manual_seed(0)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in names}
    cases = {
        label: random_masks(shapes, dict(zip(names, d, strict=True)), generator)
        for label, d in RUN_MASKS.items()
    }
    data = client_partition(DataSpec(), 0, 10)
    models = {}
    for label, masks in cases.items():
        m = conv2(10)
        apply_masks(m, masks)
        models[label] = m
    for label in cases:  # warm-up
        round_seconds(models[label], cases[label], data, max_csr)
    samples: dict[str, list[float]] = {label: [] for label in cases}
    rng = random.Random(0)
    for _ in range(args.repeats):
        order = list(cases)
        rng.shuffle(order)
        for label in order:
            samples[label].append(round_seconds(models[label], cases[label], data, max_csr))

    rows = []
    for label, masks in cases.items():
        kept = {n: int(m.sum()) for n, m in masks.items()}
        predicted = profile.compute_time_s(kept)
        measured = statistics.median(samples[label])
        density = sum(kept.values()) / sum(m.numel() for m in masks.values())
        rows.append((label, density, predicted, measured, predicted / measured - 1))
    report = render(rows, profile, profile_s, max_csr, args, load_before)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    return 0


def render(rows, profile: CostProfile, profile_s, max_csr, args, load_before) -> str:
    m = machine()
    lines = [
        "# bench_profile: the device profile's predicted round time vs measured",
        "",
        f"- date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
        f"- machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, "
        f"torch {m['torch']}, {m['threads']} threads; load average (1 min) "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after",
        f"- Conv-2, one local round = {LOCAL_STEPS} steps of batch {BATCH}, importance "
        f"tracked, `train_sparse` with fc layers in CSR below {max_csr}; median of "
        f"{args.repeats} interleaved rounds per mask",
        f"- profiling took {profile_s:.1f} s; fitted fixed cost {profile.fixed_s * 1e3:.1f} ms, "
        "compute per kept parameter: "
        + ", ".join(f"{k} {v:.2e} s" for k, v in profile.compute_s_per_param.items()),
        "",
        "| mask | density (prunable) | predicted ms | measured ms | error |",
        "|---|---|---|---|---|",
    ]
    for label, density, predicted, measured, error in rows:
        lines.append(
            f"| {label} | {density:.4f} | {predicted * 1e3:.1f} | "
            f"{measured * 1e3:.1f} | {error * 100:+.1f} % |"
        )
    worst = max(abs(r[4]) for r in rows)
    run = [r for r in rows if r[0].startswith(("after", "final"))]
    worst_run = max(abs(r[4]) for r in run)
    lines += [
        "",
        f"Largest error over the PruneFL run's masks: {worst_run * 100:.1f} % "
        f"(goal: within 15 %); over all masks: {worst * 100:.1f} %.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
