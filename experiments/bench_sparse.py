"""Conv-2 on the CPU: CSR fully connected layers vs masked dense vs dense, side by side.

    python -m experiments.bench_sparse [--out experiments/results/bench_sparse.md]

Conv-2 (10 classes, 28x28x1 images), batch 20. At each density (all four prunable layers
pruned uniformly at random to that kept fraction) it times:
- a training step (forward, backward, SGD step on the kept parameters, no importance):
  "dense" is the unpruned model with a plain SGD step; "masked" is the masked dense step of
  `fedprune.training.train_masked` (gradient and weights multiplied by the mask); "sparse"
  has fc1 and fc2 as `fedprune.sparse.SparseLinear` (CSR) and the convolutions masked dense;
- inference at batch 20 and at batch 1 (`torch.inference_mode`), the same three models;
- a whole local round as a client runs it today (K = 5 steps, importance accumulated at
  every position, CSR conversion to and from dense included): `train_masked` on the
  unpruned model vs `train_masked` and `train_sparse` on the pruned one;
- the convolutional part alone (training step and inference), which no fc sparsity can
  remove: the measured floor.
Every measurement is one call, all of them interleaved in a shuffled order within each
repetition, and the table reports medians, so that load from other processes on the machine
hits every variant alike. It runs with `torch.set_num_threads(2)` (`--threads`), the two
cores of the target machine.

The FLOP floor is the fraction of the dense model's multiply-adds that remains when the fc
layers keep a fraction d of their weights and the convolutions stay dense:
(conv + d * fc) / (conv + fc), counted for forward, weight gradient and input gradient
(conv1's input needs none) in training, forward only in inference.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fedprune import hardware
from fedprune.data import Examples
from fedprune.masks import apply_masks, full_masks
from fedprune.models import conv2
from fedprune.sparse import to_sparse, train_sparse
from fedprune.training import train_masked

DENSITIES = (0.5, 0.3, 0.1, 0.05, 0.01)
BATCH = 20
LOCAL_STEPS = 5
LR = 0.01
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_sparse.md"
GOALS = {  # density -> (training step, inference) ratio vs dense, from issue 4
    0.1: (0.6, 0.5),
    0.05: (0.45, None),
}


def layer_macs(model: nn.Module, x: torch.Tensor) -> dict[str, dict]:
    """Per prunable layer: multiply-adds of its forward pass for the batch `x`, its kind,
    and whether its input needs a gradient in training."""
    out: dict[str, dict] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):

            def hook(m, inputs, output, name=name):
                if isinstance(m, nn.Conv2d):
                    per_out = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                    macs = output.numel() * per_out
                else:
                    macs = output.numel() * m.in_features
                out[name] = {
                    "kind": "conv" if isinstance(m, nn.Conv2d) else "fc",
                    "macs": macs,
                    "input_grad": bool(inputs[0].requires_grad),
                }

            hooks.append(module.register_forward_hook(hook))
    with torch.enable_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def flop_floors(macs: dict[str, dict], density: float) -> tuple[float, float]:
    """(training, inference) fraction of the dense multiply-adds that stays when fc layers
    keep `density` of their weights and convolutions stay dense."""

    def share(train: bool) -> float:
        kept = total = 0.0
        for layer in macs.values():
            passes = (2 + layer["input_grad"]) if train else 1
            work = layer["macs"] * passes
            total += work
            kept += work * (density if layer["kind"] == "fc" else 1.0)
        return kept / total

    return share(True), share(False)


def random_masks(model: nn.Module, density: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.shape, generator=g) < density for n, m in full_masks(model).items()}


class ConvPart(nn.Module):
    """Conv-2's convolutional part (convs, ReLU, pooling, flatten): the work fc sparsity
    cannot remove."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.conv1, self.conv2, self.pool = model.conv1, model.conv2, model.pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        return torch.flatten(self.pool(torch.relu(self.conv2(x))), 1)


def make_step(model: nn.Module, x, y, masks=None) -> Callable[[], None]:
    """One SGD step; with `masks`, the masked dense step of train_masked for those weights."""
    params = dict(model.named_parameters())
    masked = [(params[n], m) for n, m in (masks or {}).items() if n in params]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=not masked)
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p, m in masked:
                p.grad.mul_(m)
        opt.step()
        with torch.no_grad():
            for p, m in masked:
                p.mul_(m)

    return step


def make_conv_step(model: nn.Module, x) -> Callable[[], None]:
    part = ConvPart(copy.deepcopy(model))
    opt = torch.optim.SGD(part.parameters(), lr=LR)
    with torch.no_grad():
        grad_out = torch.randn(part(x).shape)

    def step() -> None:
        opt.zero_grad()
        part(x).backward(grad_out)
        opt.step()

    return step


def make_infer(model: nn.Module, x) -> Callable[[], None]:
    model.eval()

    def infer() -> None:
        with torch.inference_mode():
            model(x)

    return infer


def make_round(fn, model: nn.Module, masks, data: Examples, **kw) -> Callable[[], None]:
    def run() -> None:
        fn(
            model,
            masks,
            data,
            steps=LOCAL_STEPS,
            batch_size=BATCH,
            lr=LR,
            generator=torch.Generator().manual_seed(0),
            track_importance=True,
            **kw,
        )

    return run


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": hardware.cpu(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1m_before": os.getloadavg()[0],
    }


def run(densities, repeats: int, round_repeats: int, seed: int) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(BATCH, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    x1 = x[:1].clone()
    data = Examples(x, y)
    base = conv2()
    macs = layer_macs(base, x[:1])

    # Training steps and inference: one call per sample.
    tasks: dict[tuple, Callable[[], None]] = {}
    # Whole local rounds: slower, sampled fewer times.
    round_tasks: dict[tuple, Callable[[], None]] = {}
    dense = copy.deepcopy(base)
    tasks[("train", "dense", None)] = make_step(dense, x, y)
    tasks[("train", "convs", None)] = make_conv_step(base, x)
    infer_models = {"dense": copy.deepcopy(base), "convs": ConvPart(copy.deepcopy(base))}
    round_dense = copy.deepcopy(base)
    round_tasks[("round", "dense", None)] = make_round(
        train_masked, round_dense, full_masks(round_dense), data
    )
    for d in densities:
        masks = random_masks(base, d, seed + int(d * 1e6))
        masked = copy.deepcopy(base)
        apply_masks(masked, masks)
        sparse = copy.deepcopy(masked)
        to_sparse(sparse, masks, max_csr_density=1.0)  # CSR at every density
        conv_masks = {n: m for n, m in masks.items() if n.startswith("conv")}
        tasks[("train", "masked", d)] = make_step(masked, x, y, masks)
        tasks[("train", "sparse", d)] = make_step(sparse, x, y, conv_masks)
        infer_models[("masked", d)] = copy.deepcopy(masked)
        infer_models[("sparse", d)] = copy.deepcopy(sparse)
        round_masked, round_sparse = copy.deepcopy(masked), copy.deepcopy(masked)
        round_tasks[("round", "masked", d)] = make_round(train_masked, round_masked, masks, data)
        round_tasks[("round", "sparse", d)] = make_round(
            train_sparse, round_sparse, masks, data, max_csr_density=1.0
        )
    for key, model in infer_models.items():
        variant, d = key if isinstance(key, tuple) else (key, None)
        tasks[("infer20", variant, d)] = make_infer(model, x)
        tasks[("infer1", variant, d)] = make_infer(model, x1)

    start = time.perf_counter()
    samples = _interleaved(tasks, repeats, seed)
    samples.update(_interleaved(round_tasks, round_repeats, seed + 1))
    elapsed = time.perf_counter() - start
    medians = {k: statistics.median(v) for k, v in samples.items()}
    bests = {k: min(v) for k, v in samples.items()}

    rows = []
    for d in densities:
        floor_train, floor_infer = flop_floors(macs, d)
        row = {"density": d, "flop_floor_train": floor_train, "flop_floor_infer": floor_infer}
        for stat, values in (("", medians), ("_min", bests)):
            for what in ("train", "infer20", "infer1", "round"):
                base_t = values[(what, "dense", None)]
                for variant in ("sparse", "masked"):
                    row[f"{what}_{variant}{stat}"] = values[(what, variant, d)] / base_t
                if (what, "convs", None) in values:
                    row[f"{what}_convs{stat}"] = values[(what, "convs", None)] / base_t
        rows.append(row)
    conv_macs = sum(v["macs"] for v in macs.values() if v["kind"] == "conv")
    fc_macs = sum(v["macs"] for v in macs.values() if v["kind"] == "fc")
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "load_average_1m_after": os.getloadavg()[0]},
        "batch": BATCH,
        "local_steps": LOCAL_STEPS,
        "repeats": repeats,
        "round_repeats": round_repeats,
        "seconds": elapsed,
        "fc_share_of_forward_macs": fc_macs / (fc_macs + conv_macs),
        "dense_ms": {
            what: medians[(what, "dense", None)] * 1e3
            for what in ("train", "infer20", "infer1", "round")
        },
        "dense_min_ms": {
            what: bests[(what, "dense", None)] * 1e3
            for what in ("train", "infer20", "infer1", "round")
        },
        "convs_ms": {
            what: medians[(what, "convs", None)] * 1e3 for what in ("train", "infer20", "infer1")
        },
        "rows": rows,
    }


def _interleaved(tasks: dict, repeats: int, seed: int) -> dict[tuple, list[float]]:
    """Each task once per repetition, in a fresh shuffled order, after one warm-up call."""
    order = list(tasks)
    rng = random.Random(seed)
    for fn in tasks.values():
        fn()
    samples: dict[tuple, list[float]] = {k: [] for k in order}
    for _ in range(repeats):
        rng.shuffle(order)
        for key in order:
            start = time.perf_counter()
            tasks[key]()
            samples[key].append(time.perf_counter() - start)
    return samples


def goal_lines(result: dict) -> list[str]:
    lines = []
    by_density = {r["density"]: r for r in result["rows"]}
    for d, (train_goal, infer_goal) in GOALS.items():
        row = by_density.get(d)
        if row is None:
            continue
        t = row["train_sparse"]
        lines.append(
            f"- density {d}: training step {t:.2f}x dense (goal <= {train_goal}x: "
            f"{'met' if t <= train_goal else 'missed'}; FLOP floor {row['flop_floor_train']:.2f}x, "
            f"convolutions alone {row['train_convs']:.2f}x)"
        )
        if infer_goal is not None:
            i = row["infer20_sparse"]
            lines.append(
                f"- density {d}: inference at batch 20 {i:.2f}x dense (goal <= {infer_goal}x: "
                f"{'met' if i <= infer_goal else 'missed'}; FLOP floor "
                f"{row['flop_floor_infer']:.2f}x, convolutions alone {row['infer20_convs']:.2f}x); "
                f"at batch 1 {row['infer1_sparse']:.2f}x"
            )
    return lines


def markdown(result: dict) -> str:
    m = result["machine"]
    dense = result["dense_ms"]
    convs = result["convs_ms"]
    head = [
        "# bench_sparse: Conv-2, CSR fc layers vs masked dense vs dense",
        "",
        f"- date: {result['date']}",
        f"- machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, "
        f"torch {m['torch']}, {m['threads']} threads; load average (1 min) "
        f"{m['load_average_1m_before']:.1f} before, {m['load_average_1m_after']:.1f} after",
        f"- batch {result['batch']}; medians of {result['repeats']} interleaved samples per "
        f"step/inference cell, {result['round_repeats']} per round cell; "
        f"{result['seconds']:.0f} s of timing",
        f"- dense medians: training step {dense['train']:.2f} ms, inference batch 20 "
        f"{dense['infer20']:.2f} ms, batch 1 {dense['infer1']:.2f} ms, local round "
        f"(K={result['local_steps']}, importance) {dense['round']:.1f} ms",
        f"- convolutional part alone: training step {convs['train']:.2f} ms, inference batch 20 "
        f"{convs['infer20']:.2f} ms, batch 1 {convs['infer1']:.2f} ms",
        f"- fc layers are {result['fc_share_of_forward_macs']:.1%} of the forward multiply-adds",
        "",
        "Ratios vs dense (lower is faster). sparse: fc1/fc2 in CSR, convs masked dense; "
        "masked: train_masked's masked dense step.",
        "",
        "| density | train FLOP floor | train sparse | train masked | inference FLOP floor "
        "| infer b20 sparse | infer b20 masked | infer b1 sparse | infer b1 masked "
        "| round (K=5, importance) sparse | round masked |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        head.append(
            f"| {r['density']} | {r['flop_floor_train']:.2f} | {r['train_sparse']:.2f} "
            f"| {r['train_masked']:.2f} | {r['flop_floor_infer']:.2f} "
            f"| {r['infer20_sparse']:.2f} | {r['infer20_masked']:.2f} "
            f"| {r['infer1_sparse']:.2f} | {r['infer1_masked']:.2f} "
            f"| {r['round_sparse']:.2f} | {r['round_masked']:.2f} |"
        )
    head += [
        "",
        "The same ratios from the fastest sample of each cell (the least disturbed by other "
        "load on the machine; medians above are the primary result):",
        "",
        "| density | train sparse | train masked | infer b20 sparse | infer b1 sparse "
        "| round sparse | round masked |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        head.append(
            f"| {r['density']} | {r['train_sparse_min']:.2f} | {r['train_masked_min']:.2f} "
            f"| {r['infer20_sparse_min']:.2f} | {r['infer1_sparse_min']:.2f} "
            f"| {r['round_sparse_min']:.2f} | {r['round_masked_min']:.2f} |"
        )
    best = result["dense_min_ms"]
    head.append(
        f"\nFastest dense samples: training step {best['train']:.2f} ms, inference batch 20 "
        f"{best['infer20']:.2f} ms, batch 1 {best['infer1']:.2f} ms, round {best['round']:.1f} ms."
    )
    head += ["", "Goals of issue 4 (medians):", *goal_lines(result), ""]
    return "\n".join(head)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown or .json path")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--round-repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.densities, args.repeats, args.round_repeats, args.seed)
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
