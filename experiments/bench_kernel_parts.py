"""Each product of Conv-2's two sparse layers timed alone: the numbers behind the kernel
claims in `fedprune/sparse_conv.py`, `fedprune/sparse.py` and experiments/RESULTS.md.

- conv2 (32 -> 64 channels, 5x5, padding 2, 14x14, batch 20) as a `SparseConv2d` at
  density 0.18: the forward, input-gradient and weight-gradient kernels alone, in G kept
  multiply-adds per second, beside oneDNN's dense forward of the same layer;
- fc1 (3136 -> 2048, batch 20) as a `SparseLinear` at density 0.039: its forward and
  input gradient by MKL (on the transposed structure, the gather included) and by the
  layer's compiled panel kernel, weight gradient (`SparseLinear._weight_grad`, MKL's
  sampled_addmm beside it), and the layer's forward and backward against dense
  `nn.Linear`;
- inference of one sample with every layer at density 0.1: fc1's product (MKL's CSR
  product, the layer's compiled matrix-vector product, dense), and each convolution with
  the pooling and ReLU after it (three steps, the layer's fused `pooled_relu`, dense);
- where a training step goes with every layer at 0.1, in a node's default formats, and
  dense: torch.profiler's self CPU time per operator.

Fastest of `--calls` calls per cell (these kernels take about a millisecond, and the
fastest call is the least disturbed by the rest of the machine), at each of `--threads`.
The report names the directory fedprune was imported from and that checkout's commit, so
the same script measures older code too:

    python -m experiments.bench_kernel_parts
    git worktree add /tmp/old <commit>
    PYTHONPATH=/tmp/old python experiments/bench_kernel_parts.py --out /tmp/old.md

Writes experiments/results/bench_kernel_parts.{md,json} (`--out` for elsewhere).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import fedprune
from fedprune import hardware
from fedprune.data import Examples
from fedprune.masks import apply_masks, full_masks
from fedprune.models import MaxPool2d, conv2
from fedprune.sparse import SparseLinear, to_formats
from fedprune.sparse_conv import SparseConv2d
from fedprune.training import masked_steps

RESULTS = Path(__file__).resolve().parent / "results" / "bench_kernel_parts.md"
BATCH = 20
CONV2_DENSITY = 0.18
FC1_DENSITY = 0.039
BATCH1_DENSITY = 0.1
STEP_FORMATS = {
    "conv1.weight": "dense",
    "conv2.weight": "sparse-conv",
    "fc1.weight": "csr",
    "fc2.weight": "dense",
}


def fastest_ms(fn: Callable[[], object], calls: int) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def conv2_cells(calls: int) -> dict:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 64, 5, padding=2)
    mask = torch.rand(conv.weight.shape) < CONV2_DENSITY
    layer = SparseConv2d(mask, conv.weight.detach()[mask], conv.bias.detach(), padding=2)
    x = torch.rand(BATCH, 32, 14, 14)
    grad_out = torch.rand(BATCH, 64, 14, 14)
    plan = layer._plan(x)
    xp = layer._pad_input(x, plan)
    g = layer._pad_grad(grad_out, plan)
    g_w = g if plan.wgrad_in_padded_g else layer._tight_grad(grad_out)
    weight, bias = conv.weight.detach(), conv.bias.detach()
    ms = {
        "forward": fastest_ms(
            lambda: layer._forward_kernel(xp, layer.values, layer.bias, plan), calls
        ),
        "input gradient": fastest_ms(
            lambda: layer._input_grad_kernel(g, layer.values, plan, torch.contiguous_format), calls
        ),
        "weight gradient": fastest_ms(lambda: layer._weight_grad_kernel(g_w, xp, plan), calls),
        "dense forward (oneDNN)": fastest_ms(
            lambda: torch.nn.functional.conv2d(x, weight, bias, padding=2), calls
        ),
    }
    kept = int(mask.sum()) * 14 * 14 * BATCH
    dense = mask.numel() * 14 * 14 * BATCH
    return {
        name: {"ms": t, "gmac_s": (dense if name.startswith("dense") else kept) / t / 1e6}
        for name, t in ms.items()
    }


def fc1_cells(calls: int) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2048, 3136, generator=g) < FC1_DENSITY
    dense = torch.nn.Linear(3136, 2048)
    layer = SparseLinear(mask, dense.weight.detach()[mask], dense.bias.detach())
    xt = torch.rand(3136, BATCH, generator=g)
    gt = torch.rand(2048, BATCH, generator=g)
    values = layer.values.detach()
    x = torch.rand(BATCH, 3136, generator=g, requires_grad=True)
    grad_out = torch.rand(BATCH, 2048, generator=g)

    def mkl_weight_grad():
        grad = layer._grad_buffer()
        torch.sparse.sampled_addmm(grad, gt, xt.t(), beta=0.0, out=grad)
        return grad.values().clone()

    cells = {
        "forward": lambda: torch.addmm(layer.bias.detach().unsqueeze(1), layer.csr(values), xt),
        "input gradient (transposed, gather included)": lambda: torch.sparse.mm(
            layer.csr_transposed(values, reuse_buffer=True), gt
        ),
        "weight gradient, MKL sampled_addmm": mkl_weight_grad,
        "sparse layer forward and backward": lambda: layer(x).backward(grad_out),
        "dense layer forward and backward": lambda: dense(x).backward(grad_out),
    }
    if hasattr(layer, "_weight_grad"):  # the layer's own path (compiled where it runs)
        cells["weight gradient, the layer's"] = lambda: layer._weight_grad(gt, xt)
    if hasattr(layer, "_panel_product"):  # the compiled batch products, on padded panels
        xp, gp = layer._padded_t(xt.t()), layer._padded_t(gt.t())
        cells["forward, the layer's (compiled panels)"] = lambda: layer._panel_product(
            xp, values, layer.bias
        )
        cells["input gradient, the layer's (compiled panels, no gather)"] = lambda: (
            layer._panel_product(gp, values, None, transposed=True)
        )
    return {name: {"ms": fastest_ms(fn, calls)} for name, fn in cells.items()}


def batch1_cells(calls: int) -> dict:
    """Inference of one sample, every layer at density `BATCH1_DENSITY`: fc1's product
    (MKL's CSR product beside the layer's compiled matrix-vector product, and dense), and
    each convolution with the 2x2 max-pooling and ReLU after it (the three steps, the
    sparse layer's `pooled_relu`, and dense)."""
    g = torch.Generator().manual_seed(0)
    cells: dict[str, Callable[[], object]] = {}
    dense_fc1 = torch.nn.Linear(3136, 2048)
    mask = torch.rand(2048, 3136, generator=g) < BATCH1_DENSITY
    fc1 = SparseLinear(mask, dense_fc1.weight.detach()[mask], dense_fc1.bias.detach())
    x = torch.rand(1, 3136, generator=g)
    bias = fc1.bias.detach().unsqueeze(1)
    cells["fc1, MKL CSR product"] = lambda: torch.addmm(bias, fc1.csr(), x.t())
    cells["fc1, the layer's"] = lambda: fc1(x)
    cells["fc1, dense"] = lambda: dense_fc1(x)
    pool = MaxPool2d(2)
    for name, cin, cout, side in (("conv1", 1, 32, 28), ("conv2", 32, 64, 14)):
        conv = torch.nn.Conv2d(cin, cout, 5, padding=2)
        mask = torch.rand(conv.weight.shape, generator=g) < BATCH1_DENSITY
        sparse = SparseConv2d.from_conv(conv, mask)
        xc = torch.rand(1, cin, side, side, generator=g)
        three = f"{name} + pool + ReLU, three steps"
        cells[three] = lambda sp=sparse, xc=xc: torch.relu_(pool(sp(xc)))
        if hasattr(sparse, "pooled_relu"):
            fused = f"{name} + pool + ReLU, the layer's pooled_relu"
            cells[fused] = lambda sp=sparse, xc=xc: sp.pooled_relu(xc)
        cells[f"{name} + pool + ReLU, dense"] = lambda c=conv, xc=xc: torch.relu_(pool(c(xc)))
    with torch.inference_mode():
        return {name: {"ms": fastest_ms(fn, calls)} for name, fn in cells.items()}


def step_profile(steps: int = 25, top: int = 12) -> dict:
    """Where a training step goes, every layer at density 0.1 (issue 12's second case),
    in the formats a node picks by default there (conv1 dense, conv2 sparse, fc1 CSR, fc2
    dense) and dense: torch.profiler's self CPU time per operator over `steps` steps of
    batch 20, in ms a step, the largest `top` of each (a sparse layer's own kernels are
    its autograd Function's forward and backward)."""
    g = torch.Generator().manual_seed(0)
    data = Examples(torch.rand(BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (BATCH,)))
    dense = conv2()
    masks = {
        n: torch.rand(m.shape, generator=g) < BATCH1_DENSITY for n, m in full_masks(dense).items()
    }
    sparse = conv2()
    sparse.load_state_dict(dense.state_dict())
    apply_masks(sparse, masks)
    to_formats(sparse, masks, STEP_FORMATS)
    out = {}
    for name, model, held in (("dense", dense, {}), ("every layer at 0.1", sparse, masks)):

        def run(n, model=model, held=held):
            masked_steps(model, held, data, steps=n, batch_size=BATCH, lr=0.01, momentum=0.0,
                         weight_decay=0.0, generator=torch.Generator().manual_seed(0),
                         track_importance=False)  # fmt: skip

        run(5)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            run(steps)
            wall = (time.perf_counter() - start) / steps * 1e3
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        out[name] = {
            "step_ms": wall,
            "ops": {e.key: e.self_cpu_time_total / steps / 1e3 for e in rows[:top]},
        }
    return out


def checkout() -> dict:
    where = Path(fedprune.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        commit = sha + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"fedprune_from": str(where), "commit": commit}


def markdown(result: dict) -> str:
    out = [
        "# bench_kernel_parts: each product of Conv-2's sparse layers alone",
        "",
        f"- date: {result['date']}; fedprune from {result['fedprune_from']} at commit "
        f"{result['commit']}",
        f"- machine: {result['machine']}",
        f"- batch {BATCH}; fastest of {result['calls']} calls per cell; conv2 at density "
        f"{CONV2_DENSITY}, fc1 at density {FC1_DENSITY}",
        "",
    ]
    for threads, run in result["threads"].items():
        out += [
            f"## {threads} thread{'s' if threads != '1' else ''}",
            "",
            "| conv2 (SparseConv2d) | ms | G multiply-adds per second |",
            "|---|---:|---:|",
        ]
        out += [
            f"| {name} | {c['ms']:.3f} | {c['gmac_s']:.1f} |" for name, c in run["conv2"].items()
        ]
        out += ["", "| fc1 (SparseLinear) | ms |", "|---|---:|"]
        out += [f"| {name} | {c['ms']:.3f} |" for name, c in run["fc1"].items()]
        out += ["", f"| batch 1, inference, density {BATCH1_DENSITY} | ms |", "|---|---:|"]
        out += [f"| {name} | {c['ms']:.3f} |" for name, c in run["batch1"].items()]
        out.append("")
        for case, prof in run.get("step_profile", {}).items():
            out += [
                f"Training step, {case} (batch {BATCH}): {prof['step_ms']:.2f} ms a step "
                "under the profiler; self CPU time per operator, ms a step:",
                "",
                "| operator | ms |",
                "|---|---:|",
            ]
            out += [f"| `{op}` | {ms:.3f} |" for op, ms in prof["ops"].items()]
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown path (+ .json)")
    args = parser.parse_args(argv)
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **checkout(),
        "machine": f"{platform.platform()}, {hardware.describe()}, torch {torch.__version__}",
        "calls": args.calls,
        "threads": {},
    }
    before = torch.get_num_threads()
    try:
        for n in args.threads:
            torch.set_num_threads(n)
            result["threads"][str(n)] = {
                "conv2": conv2_cells(args.calls),
                "fc1": fc1_cells(args.calls),
                "batch1": batch1_cells(args.calls),
                "step_profile": step_profile(),
            }
    finally:
        torch.set_num_threads(before)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(result))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
