"""Mask bytes against their entropy bound, and the coder's speed, on Conv-2-sized masks.

    python -m experiments.bench_wire [--n 6500000] [--repeats 5] [--out FILE.md]

For each density (0.001 ... 0.99) it draws a uniformly random mask of n positions with
exactly round(density * n) kept, and codes
- the whole mask (`fedprune.maskcode.encode_mask_bytes`), against log2 C(n, k) / 8;
- a change of 1 % and of 10 %: each kept position removed and each pruned position
  added with that probability (exact counts), so about that share of all positions flip,
  against (log2 C(k, removed) + log2 C(n - k, added)) / 8.
Issue 13's goal for each: bytes <= 1.03 x bound + 64 bytes (one layer). For reference it
shows what today's codec sent for the whole mask (the smallest of a bitmap and uint32
indices) and for the change (the whole mask again).

Speed: encode and decode of each whole mask and change, `--repeats` times, interleaved in
a shuffled order (so load from other processes hits every cell alike), medians in ms;
goal: a 6.5 M-position mask encodes and decodes in under 50 ms each.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from fedprune import hardware
from fedprune.maskcode import (
    decode_mask_bytes,
    decode_mask_change,
    encode_mask_bytes,
    encode_mask_change,
    mask_bound_bits,
)

DENSITIES = (0.001, 0.01, 0.04, 0.1, 0.3, 0.5, 0.9, 0.99)
CHANGES = (0.01, 0.1)
GOAL_FACTOR, GOAL_SLACK_BYTES, GOAL_MS = 1.03, 64, 50.0
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_wire.md"


def commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{rev}{' (uncommitted changes)' if dirty else ''}"


def machine() -> str:
    return (
        f"{platform.platform()}, {hardware.describe()}, numpy {np.__version__}, "
        f"load average (1 min) {os.getloadavg()[0]:.1f}"
    )


def random_mask(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(n, dtype=np.bool_)
    mask[rng.choice(n, size=k, replace=False)] = True
    return mask


def changed(old: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """``old`` with round(share * k) kept positions removed and round(share * (n - k))
    pruned positions added, chosen uniformly."""
    kept, pruned = np.flatnonzero(old), np.flatnonzero(~old)
    new = old.copy()
    new[rng.choice(kept, size=round(share * kept.size), replace=False)] = False
    new[rng.choice(pruned, size=round(share * pruned.size), replace=False)] = True
    return new


def today_bytes(n: int, k: int) -> int:
    """What the previous codec sent for a whole mask: bitmap or uint32 indices."""
    return min((n + 7) // 8, 4 * k, 4 * (n - k))


def within_goal(nbytes: int, bound_bytes: float) -> bool:
    return nbytes <= GOAL_FACTOR * bound_bytes + GOAL_SLACK_BYTES


def run(n: int, repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    cases = []  # (label, density, change share or None, old, new)
    for d in DENSITIES:
        mask = random_mask(n, round(d * n), rng)
        cases.append((f"mask {d}", d, None, None, mask))
        for share in CHANGES:
            cases.append((f"change {share} at {d}", d, share, mask, changed(mask, share, rng)))

    rows = []
    for label, d, share, old, new in cases:
        k = int(new.sum())
        if share is None:
            data = encode_mask_bytes(new)
            assert np.array_equal(decode_mask_bytes(data, n), new)
            bound = mask_bound_bits(n, k) / 8
            reference = today_bytes(n, k)
        else:
            data = encode_mask_change(old, new)
            assert np.array_equal(decode_mask_change(old, data), new)
            k_old = int(old.sum())
            removed, added = int((old & ~new).sum()), int((new & ~old).sum())
            bound = (mask_bound_bits(k_old, removed) + mask_bound_bits(n - k_old, added)) / 8
            reference = today_bytes(n, k)  # the whole new mask again
        rows.append(
            {
                "label": label,
                "density": d,
                "change": share,
                "kept": k,
                "flipped": None if share is None else int((old ^ new).sum()),
                "bytes": int(data.nbytes),
                "bound_bytes": bound,
                "ratio": data.nbytes / bound if bound else float("inf"),
                "over_bytes": data.nbytes - bound,
                "goal_met": within_goal(data.nbytes, bound),
                "today_bytes": reference,
                "data": data,
            }
        )

    # Timing: every (case, direction) once per repetition, in a shuffled order.
    cells = [(i, direction) for i in range(len(cases)) for direction in ("encode", "decode")]
    samples: dict[tuple[int, str], list[float]] = {cell: [] for cell in cells}
    order = random.Random(seed)
    t0 = time.time()
    for _ in range(repeats):
        order.shuffle(cells)
        for i, direction in cells:
            _, _, share, old, new = cases[i]
            data = rows[i]["data"]
            start = time.perf_counter()
            if direction == "encode":
                encode_mask_bytes(new) if share is None else encode_mask_change(old, new)
            else:
                decode_mask_bytes(data, n) if share is None else decode_mask_change(old, data)
            samples[(i, direction)].append((time.perf_counter() - start) * 1e3)
    for i, row in enumerate(rows):
        row["encode_ms"] = statistics.median(samples[(i, "encode")])
        row["decode_ms"] = statistics.median(samples[(i, "decode")])
        del row["data"]
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "commit": commit(),
        "n": n,
        "repeats": repeats,
        "timing_seconds": time.time() - t0,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    n = result["n"]
    lines = [
        "# bench_wire: masks and mask changes against log2 C(n, k)",
        "",
        f"- date: {result['date']}; commit {result['commit']}",
        f"- machine: {result['machine']}",
        f"- n = {n:,} positions (Conv-2's prunable weights), uniformly random masks; changes "
        "remove that share of the kept and add that share of the pruned positions",
        f"- goal: bytes <= {GOAL_FACTOR} x bound + {GOAL_SLACK_BYTES} B; encode and decode "
        f"< {GOAL_MS:.0f} ms each; times are medians of {result['repeats']} interleaved runs "
        f"({result['timing_seconds']:.0f} s of timing)",
        "",
        "| what | density | kept | positions flipped | bytes | bound (B) | bytes / bound | "
        "over bound (B) | goal | before (B) | before / now | encode ms | decode ms | "
        "decode M positions/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        what = "whole mask" if r["change"] is None else f"{r['change']:.0%} change"
        flipped = "" if r["flipped"] is None else f"{r['flipped']:,}"
        lines.append(
            f"| {what} | {r['density']} | {r['kept']:,} | {flipped} | {r['bytes']:,} | "
            f"{r['bound_bytes']:,.0f} | {r['ratio']:.5f} | {r['over_bytes']:.1f} | "
            f"{'met' if r['goal_met'] else 'MISSED'} | {r['today_bytes']:,} | "
            f"{r['today_bytes'] / r['bytes']:.1f}x | {r['encode_ms']:.1f} | "
            f"{r['decode_ms']:.1f} | {n / r['decode_ms'] / 1e3:.0f} |"
        )
    worst_ratio = max(r["ratio"] for r in result["rows"])
    worst_over = max(r["over_bytes"] for r in result["rows"])
    masks = [r for r in result["rows"] if r["change"] is None]
    lines += [
        "",
        f"Every row within the goal: {all(r['goal_met'] for r in result['rows'])} (largest "
        f"ratio {worst_ratio:.5f}, at most {worst_over:.1f} bytes over the bound).",
        f"Whole masks: slowest encode {max(r['encode_ms'] for r in masks):.1f} ms, slowest "
        f"decode {max(r['decode_ms'] for r in masks):.1f} ms (goal < {GOAL_MS:.0f} ms): "
        f"{all(max(r['encode_ms'], r['decode_ms']) < GOAL_MS for r in masks)}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=6_500_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    # Compile (or load the cached compilation of) the coder before anything is timed.
    warm = np.arange(1000) % 3 == 0
    other = warm ^ (np.arange(1000) % 5 == 0)
    decode_mask_change(warm, encode_mask_change(warm, other))
    decode_mask_bytes(encode_mask_bytes(warm), warm.size)
    result = run(args.n, args.repeats, args.seed)
    text = markdown(result)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
