"""Peak memory of one local round on a node: dense against the pruned model's formats.

Edge devices are short of memory as well as of time. This measures, for Conv-2 on one
node's share of the digits (360 examples), the memory a train message costs the node at
its peak, from the message's arrays in to the reply's arrays out, as the ClientApp does
it (`clients.client_app.receive` and `train`): the model's skeleton, the server's message
decoded into the values it carries (`fedprune.codec.decode_kept`), the model built from
them with each layer in its format (`fedprune.sparse.model_in_formats`: a sparse layer
never dense), the masks then held as the node holds them (`fedprune.sparse.LayerMasks`:
a sparse layer's as its indices, no bool copy), K = 5 steps of batch 20
(`fedprune.sparse.train_sparse`), the reply encoded from the layers' kept values
(`fedprune.sparse.kept_parameters`, `fedprune.codec.encode_kept_update`).
Cases:

- `dense`: FedAvg's node, every weight kept, dense layers;
- `masked-dense`: the main job's final mask, every layer masked dense;
- `formats`: the same mask in the formats the main job's nodes chose for it (conv1 dense,
  conv2 direct sparse convolution, fc1 CSR, fc2 dense);
- `formats-importance`: the same, in a round that tracks importance (dense importance
  of every weight, pruned ones included, as PruneFL's regrowth needs).

Each case runs in a fresh interpreter (`--repeats` of them): after the imports and the
data, the round's peak is measured as a node measures it in its handler
(`fedprune.memory.PeakMemory`: VmHWM reset, then read back, less the resident set before
it); then
again for a second round in the same process. Before each, the heap the allocator kept
from earlier frees is handed back (`malloc_trim`), else a warm round that reuses it seems
to need nothing. The first round is what a deployed node
pays (Flower 1.41 starts a fresh ClientApp process per message): it includes what the
process loads on first use (compiled kernels, oneDNN's primitives). The second is a
simulated node's (its process lives across rounds). The
message arrives as numpy arrays, as Flower hands them over. Memory does not depend on the
machine's load, so this may run beside other work. Linux only.

    python -m experiments.bench_memory

Writes experiments/results/bench_memory.{md,json} (`--out` for elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from fedprune import hardware

PROJECT_DIR = Path(__file__).resolve().parent.parent
RESULTS_DIR = PROJECT_DIR / "experiments" / "results"
# The main job's final mask (README "Measured": conv1 0.74, conv2 0.18, fc1 0.046, fc2
# 0.56) and the formats its nodes trained it in, by layer.
FINAL_DENSITIES = {
    "conv1.weight": 0.74,
    "conv2.weight": 0.18,
    "fc1.weight": 0.046,
    "fc2.weight": 0.56,
}
FINAL_FORMATS = {
    "conv1.weight": "dense",
    "conv2.weight": "sparse-conv",
    "fc1.weight": "csr",
    "fc2.weight": "dense",
}
CASES = ("dense", "masked-dense", "formats", "formats-importance")
EXAMPLES = 360  # one node's share of the digits in the main job (3,600 over 10 clients)


def release_free_heap() -> None:
    """Hand the heap memory glibc's allocator keeps after frees back to the system, so
    that a round's allocations show in the resident set even where they reuse memory an
    earlier round freed (without it a warm round can seem to need nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def child(case: str) -> dict:
    """One local round of `case` in this (fresh) process: its peak memory above what the
    process held before it, in MB (10^6 bytes)."""
    import gc

    import torch

    from fedprune.codec import decode_kept, encode_kept_update, encode_model
    from fedprune.data import Examples
    from fedprune.masks import full_masks
    from fedprune.memory import PeakMemory
    from fedprune.models import build_model, param_shapes, prunable_names, skeleton
    from fedprune.sparse import LayerMasks, kept_parameters, model_in_formats, train_sparse

    torch.set_num_threads(1)  # as a node of the simulation
    g = torch.Generator().manual_seed(0)
    server = build_model("conv2", 10, seed=0)
    if case == "dense":
        masks = full_masks(server)
    else:
        masks = {
            name: torch.rand(p.shape, generator=g) < FINAL_DENSITIES[name]
            for name, p in server.named_parameters()
            if name in FINAL_DENSITIES
        }
    with torch.no_grad():
        params = {
            n: p.detach() * masks[n] if n in masks else p.detach()
            for n, p in server.named_parameters()
        }
    message = encode_model(params, masks, include_masks=True)
    shapes, prunable = param_shapes(server), prunable_names(server)
    data = Examples(
        torch.rand(EXAMPLES, 1, 28, 28, generator=g), torch.randint(0, 10, (EXAMPLES,), generator=g)
    )
    formats = FINAL_FORMATS if case.startswith("formats") else {n: "dense" for n in masks}
    track = case == "formats-importance"
    del server, params

    def node_round() -> tuple[dict, object, dict]:
        # The message's arrays are the node's own (Flower hands each message over anew):
        # decoding may take whole parameters (biases) as they are, and training writes them.
        arrays = {k: v.copy() for k, v in message.items()}
        kept, got_masks = decode_kept(arrays, shapes, prunable, None)
        model = model_in_formats(skeleton("conv2", 10), kept, got_masks, formats)
        got_masks = LayerMasks(model, got_masks)  # as the ClientApp holds them
        del kept, arrays
        result = train_sparse(
            model,
            got_masks,
            data,
            steps=5,
            batch_size=20,
            lr=0.1,
            generator=torch.Generator().manual_seed(1),
            track_importance=track,
            formats=formats,
        )
        uploaded = {n: result.importance[n] for n in got_masks} if track else None
        reply = encode_kept_update(kept_parameters(model, got_masks), got_masks, uploaded)
        return reply, result, got_masks

    peaks = []
    for _ in range(2):  # the process's first round (a deployed node's), then a warm one
        gc.collect()
        release_free_heap()
        memory = PeakMemory()  # what a node measures in its train handler
        reply, result, got_masks = node_round()
        peak = memory.above_start_mb()
        if peak is None:
            raise SystemExit("bench_memory needs Linux's /proc (VmHWM, clear_refs)")
        peaks.append(peak)
        del reply
    reply, result, got_masks = node_round()
    return {
        "case": case,
        "peak_above_start_mb": peaks[0],
        "warm_peak_above_start_mb": peaks[1],
        "rss_before_mb": memory.start_kb * 1024 / 1e6,
        "message_mb": sum(a.nbytes for a in message.values()) / 1e6,
        "reply_mb": sum(a.nbytes for a in reply.values()) / 1e6,
        "formats": dict(result.formats or {}),
        "kept": int(sum(int(m.sum()) for m in got_masks.values())),
    }


def run_case(case: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "experiments.bench_memory", "--child", case],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def git_commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def report(rows: dict[str, list[dict]], repeats: int) -> str:
    dense = statistics.median(r["peak_above_start_mb"] for r in rows["dense"])
    lines = [
        "# bench_memory: peak memory of one local round on a node, Conv-2",
        "",
        f"- command: `python -m experiments.bench_memory --repeats {repeats}`",
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}; "
        f"commit {git_commit()}",
        f"- machine: {platform.platform()}, {hardware.describe()}",
        f"- one fresh process per case and repeat ({repeats} each, median shown); peak = "
        "VmHWM after the round less VmRSS before it, from the message's arrays in to the "
        "reply's arrays out (build, decode, load, 5 steps of batch 20, encode); "
        f"{EXAMPLES} examples; final mask: "
        + ", ".join(f"{n.removesuffix('.weight')} {d}" for n, d in FINAL_DENSITIES.items()),
        "",
        "| case | layer formats | kept weights | message in MB | reply MB "
        "| first round of a process: peak above start, MB (median; range) | vs dense "
        "| a warm process's round: peak, MB (median; range) | vs dense |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    warm_dense = statistics.median(r["warm_peak_above_start_mb"] for r in rows["dense"])
    for case, rs in rows.items():
        fmts = ",".join(f"{n.removesuffix('.weight')}:{f}" for n, f in rs[0]["formats"].items())
        cells = []
        for key, ref in (("peak_above_start_mb", dense), ("warm_peak_above_start_mb", warm_dense)):
            peaks = [r[key] for r in rs]
            median = statistics.median(peaks)
            cells.append(
                f"{median:.1f} ({min(peaks):.1f} - {max(peaks):.1f}) | {median / ref:.2f}x"
            )
        lines.append(
            f"| {case} | {fmts} | {rs[0]['kept']:,} | {rs[0]['message_mb']:.2f} | "
            f"{rs[0]['reply_mb']:.2f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_memory")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    rows = {case: [] for case in args.cases}
    for _ in range(args.repeats):  # interleaved
        for case in args.cases:
            rows[case].append(run_case(case))
            print(
                f"[bench_memory] {case}: {rows[case][-1]['peak_above_start_mb']:.1f} MB", flush=True
            )
    text = report(rows, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
