"""The model's max-pooling (`fedprune.models.MaxPool2d`: the compiled 2x2 kernels) against
torch's (`nn.MaxPool2d`) and against pooling a channels-last copy (the model's pooling
before the kernels), side by side in one process.

    python -m experiments.bench_pooling [--threads 1 2] [--repeats 15]

Run it alone on the machine (`flock /tmp/fedprune-cpu.lock ...`). For each thread count,
interleaved in a shuffled order within each repetition (`bench_kernels.interleaved`):
- the pooling alone, forward and backward, on Conv-2's two pooled tensors at batch 20
  (conv1's output 32x28x28, conv2's 64x14x14, both NCHW as a dense convolution leaves
  them, and conv2's in channels-last, as the sparse convolution leaves it);
- K = 5 training steps of Conv-2 at batch 20 (`masked_steps`, as a node trains), dense
  and at the default run's final mask with the layers in the formats a node uses there
  (conv1 masked dense, conv2 the sparse convolution, fc1 CSR, fc2 masked dense), with
  each pooling module in turn.
It also checks that all three give the same bits (outputs and input gradients).
Writes experiments/results/bench_pooling.{md,json} (with --out, elsewhere).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
from pathlib import Path

import torch
from torch import nn

from experiments.bench_kernels import (
    BATCH,
    FINAL_MASK,
    LOCAL_STEPS,
    git_commit,
    interleaved,
    random_masks,
    step_fn,
)
from fedprune.data import Examples
from fedprune.masks import apply_masks
from fedprune.models import MaxPool2d, _PoolInChannelsLast, conv2
from fedprune.sparse import to_formats
from strategies.results import machine

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_pooling.md"
FORMATS = {
    "conv1.weight": "dense",
    "conv2.weight": "sparse-conv",
    "fc1.weight": "csr",
    "fc2.weight": "dense",
}


class ChannelsLastPool(nn.MaxPool2d):
    """The previous `MaxPool2d` (until the compiled kernels): NCHW input pooled by torch in
    channels-last memory and returned NCHW; channels-last input pooled by torch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
            return _PoolInChannelsLast.apply(x, self.kernel_size)
        return super().forward(x)


# torch's own pooling (NCHW input pooled NCHW), the channels-last route, and the model's
# pooling (`fedprune.models.MaxPool2d`: the compiled kernels where they run).
POOLS = {
    "torch": lambda: nn.MaxPool2d(2),
    "channels-last": lambda: ChannelsLastPool(2),
    "kernel": lambda: MaxPool2d(2),
}


def pool_task(pool: nn.Module, x: torch.Tensor):
    upstream = torch.randn(x[:, :, ::2, ::2].shape, generator=torch.Generator().manual_seed(1))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        leaf = x.detach().requires_grad_()
        out = pool(leaf)
        (out * upstream).sum().backward()
        return out.detach(), leaf.grad

    return run


def bench(threads: int, repeats: int, seed: int) -> dict:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    model = conv2()
    data = Examples(
        torch.rand(BATCH * 20, 1, 28, 28, generator=g),
        torch.randint(0, 10, (BATCH * 20,), generator=g),
    )
    with torch.no_grad():
        features = {
            "conv1 output 32x28x28": model.conv1(data.x[:BATCH]),
            "conv2 output 64x14x14": model.conv2(
                torch.relu(nn.functional.max_pool2d(model.conv1(data.x[:BATCH]), 2))
            ),
        }
        features["conv2 output 64x14x14, channels-last"] = features[
            "conv2 output 64x14x14"
        ].contiguous(memory_format=torch.channels_last)
    tasks, same_bits = {}, {}
    for label, x in features.items():
        runs = {name: pool_task(make(), x) for name, make in POOLS.items()}
        (out_a, grad_a), *others = (run() for run in runs.values())
        same_bits[label] = all(
            torch.equal(out_a, out) and torch.equal(grad_a, grad) for out, grad in others
        )
        for name, run in runs.items():
            tasks[("pool", label, name)] = run
    masks = random_masks(model, FINAL_MASK, seed)
    for case in ("dense", "final mask"):
        for name, make in POOLS.items():
            net = conv2()
            net.load_state_dict(model.state_dict())
            net.pool = make()
            held = {}
            if case == "final mask":
                apply_masks(net, masks)
                to_formats(net, masks, FORMATS)
                held = {n: masks[n] for n, f in FORMATS.items() if f == "dense"}
            tasks[("steps", case, name)] = step_fn(net, held, data)
    samples = interleaved(tasks, repeats, seed)
    rows = []
    for kind, label in dict.fromkeys((k[0], k[1]) for k in tasks):
        ms = {name: 1000 * statistics.median(samples[(kind, label, name)]) for name in POOLS}
        rows.append(
            {
                "what": "pooling, forward + backward" if kind == "pool" else f"{LOCAL_STEPS} steps",
                "case": label,
                "torch_ms": round(ms["torch"], 3),
                "channels_last_ms": round(ms["channels-last"], 3),
                "kernel_ms": round(ms["kernel"], 3),
                "ratio": round(ms["channels-last"] / ms["torch"], 3),
                "kernel_ratio": round(ms["kernel"] / ms["torch"], 3),
                "kernel_vs_channels_last": round(ms["kernel"] / ms["channels-last"], 3),
                "same_bits": same_bits.get(label),
            }
        )
    return {"threads": threads, "rows": rows}


def markdown(result: dict) -> str:
    lines = [
        "# bench_pooling: the model's max-pooling vs torch's",
        "",
        f"- date: {result['date']}; commit {result['commit']}",
        f"- machine: {result['machine']['platform']}, {result['machine']['processor']}, "
        f"{result['machine']['cpus']} CPUs, torch {result['machine']['torch']}",
        f"- {result['repeats']} interleaved samples per cell, medians; batch {BATCH}; "
        f"the final mask {FINAL_MASK} (random masks at those densities) in the formats "
        f"{FORMATS}",
        f"- command: `{result['command']}`",
        "",
        "Arms: torch's `nn.MaxPool2d`; channels-last (torch pooling a channels-last copy, "
        "returned NCHW; the model's pooling until the compiled kernels); the model's "
        "`fedprune.models.MaxPool2d` (the compiled 2x2 kernels in the input's own format). "
        "Ratios are against torch's.",
        "",
        "| threads | what | case | torch ms | channels-last ms | kernel ms | channels-last "
        "ratio | kernel ratio | kernel / channels-last | same bits |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        for row in run["rows"]:
            same = "" if row["same_bits"] is None else ("yes" if row["same_bits"] else "NO")
            lines.append(
                f"| {run['threads']} | {row['what']} | {row['case']} | {row['torch_ms']} | "
                f"{row['channels_last_ms']} | {row['kernel_ms']} | {row['ratio']:.2f} | "
                f"{row['kernel_ratio']:.2f} | {row['kernel_vs_channels_last']:.2f} | {same} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    command = "python -m experiments.bench_pooling " + " ".join(
        ["--threads", *map(str, args.threads), "--repeats", str(args.repeats)]
    )
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    runs = [bench(t, args.repeats, args.seed) for t in args.threads]
    result = {
        "date": date,
        "commit": git_commit(),
        "machine": machine(),
        "repeats": args.repeats,
        "command": command,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(result))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"written: {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
