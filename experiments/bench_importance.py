"""Does PruneFL's solver build the same mask from coded importance? Bytes and Jaccard.

    python -m experiments.bench_importance [--rounds 30] [--out FILE.md]

The default task, offline and without Flower: Conv-2 on the embedded MNIST, the run
config's defaults (`fedprune.settings.Settings`), 10 IID clients
(`clients.partitions.client_partition`), all in every round.

1. The server's initial pruning (`fedprune.initial_pruning.initial_prune` on its share,
   the paper-conv2 cost profile), as the ServerApp runs it.
2. Federated rounds: every client trains `local_steps` masked SGD steps
   (`fedprune.training.train_masked`, importance tracked), the server averages the kept
   values (FedAvg weighted by examples; pruned positions keep their last value).
3. Every `reconfig_interval` rounds the server reconfigures (`fedprune.reconfigure`,
   delta from `stability_delta`, the paper-conv2 profile, the fixed importance of the
   never-pruned parameters exact as the metric carries it). It solves once from the exact
   importance (float32 sums of the clients' importance), and once from each coded variant:
   - "reconfig" upload (the default task's mode: all nodes in every round): each client
     codes the importance it accumulated since the last reconfiguration, once;
   - "every-round" upload (the mode under sampling): each client codes each round's
     importance; the server sums the decoded uploads over the rounds;
   - bfloat16 (today's wire) in the reconfig mode, for reference.
   The run continues from the exact solution, so every variant is compared on the same
   state.

It reports, per reconfiguration and variant, the upload's bytes against bfloat16's
(2 bytes per prunable weight) and the Jaccard index of the kept positions (all prunable
layers together) against the exact solution. Goals (issue 13): bytes <= 1/8 of bfloat16,
Jaccard >= 0.98 at every reconfiguration.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from clients.partitions import client_partition
from fedprune import hardware
from fedprune.costs import named_profile
from fedprune.data import data_shape, heldout_split, server_share
from fedprune.importance_code import ImportanceCode, ImportanceSum, decode_importance
from fedprune.initial_pruning import InitialPruning, initial_prune
from fedprune.models import build_model, prunable_names
from fedprune.reconfigure import reconfigure, stability_delta
from fedprune.settings import Settings
from fedprune.training import evaluate, train_masked

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_importance.md"
NUM_CLIENTS = 10  # the default task's simulated nodes (--federation-config num-supernodes=10)
WINDOWS = (1, 2)  # importance-window settings compared with the full accumulation
GOAL_RATIO = 1 / 8
GOAL_JACCARD = 0.98
REFERENCE = "bfloat16 (today)"

# (label, code, server imputation, mode). The first is the proposed default.
VARIANTS = [
    ("default", ImportanceCode(), 1.0, "reconfig"),
    ("default, no imputation", ImportanceCode(), 0.0, "reconfig"),
    ("top 5 %", ImportanceCode(top_fraction=0.05), 1.0, "reconfig"),
    ("3 mantissa bits", ImportanceCode(mantissa_bits=3), 1.0, "reconfig"),
    ("default, every-round", ImportanceCode(), 1.0, "every-round"),
    ("default, every-round, no imputation", ImportanceCode(), 0.0, "every-round"),
]


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
        f"{platform.platform()}, {hardware.describe()}, "
        f"torch {torch.__version__}, numpy {np.__version__}"
    )


def jaccard(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(Jaccard index of the kept positions over all layers, size of the symmetric
    difference)."""
    inter = sum(int((a[k] & b[k]).sum()) for k in a)
    union = sum(int((a[k] | b[k]).sum()) for k in a)
    return (inter / union if union else 1.0), union - inter


def code_upload(code: ImportanceCode, importance, masks) -> tuple[dict, int]:
    """One client's coded upload, decoded as the server would: (uploads, bytes)."""
    decoded, nbytes = {}, 0
    for name, mask in masks.items():
        data = code.encode(importance[name].numpy(), mask.numpy())
        nbytes += data.nbytes
        decoded[name] = decode_importance(data, mask.numpy(), what=f"gc/{name}")
    return decoded, nbytes


def run(rounds: int, seed: int, cache: Path | None = None) -> dict:
    torch.set_num_threads(1)
    s = Settings(seed=seed)
    spec = s.data_spec()
    num_classes, shape = data_shape(s.data_spec())
    model = build_model(s.model, num_classes, seed=s.seed, input_shape=shape)
    names = prunable_names(model)
    profile = named_profile(s.cost_profile, names)
    t0 = time.time()
    if cache is not None and cache.exists():
        saved = torch.load(cache)
        model.load_state_dict(saved["state"])
        phase1 = InitialPruning(**saved["phase1"])
    else:
        phase1 = initial_prune(
            model,
            server_share(spec),
            profile,
            num_classes=num_classes,
            lr=s.learning_rate,
            batch_size=s.batch_size,
            local_steps=s.local_steps,
            interval=s.ip_interval,
            max_iterations=s.ip_max_iterations,
            window=s.ip_stop_window,
            tolerance=s.ip_stop_tolerance,
            delta=s.delta_initial,
            max_density=s.max_density,
            seed=s.seed,
        )
        if cache is not None:
            torch.save({"state": model.state_dict(), "phase1": vars(phase1)}, cache)
    masks = phase1.masks
    print(
        f"initial pruning: {phase1.iterations} iterations ({phase1.stopped_by}), "
        f"{time.time() - t0:.0f} s, kept {sum(int(m.sum()) for m in masks.values()):,}",
        flush=True,
    )
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    shapes = {n: tuple(masks[n].shape) for n in names}
    never_pruned = sum(p.numel() for n, p in params.items() if n not in masks)
    prunable_total = sum(m.numel() for m in masks.values())
    num_clients = NUM_CLIENTS
    clients = [client_partition(spec, i, num_clients) for i in range(num_clients)]
    test = heldout_split(spec)

    accumulated: list[dict[str, torch.Tensor] | None] = [None] * num_clients
    # Each client's importance of its last max(WINDOWS) rounds: what importance-window = W
    # would have computed (only the last W rounds before the reconfiguration).
    recent: list[list[dict[str, torch.Tensor]]] = [[] for _ in range(num_clients)]
    every_round = {
        label: ImportanceSum(shapes, imputation)
        for label, _, imputation, mode in VARIANTS
        if mode == "every-round"
    }
    bytes_every_round = {label: [] for label in every_round}
    rows = []
    t_fl = time.time()
    for server_round in range(1, rounds + 1):
        replies = []
        for i, data in enumerate(clients):
            local = copy.deepcopy(model)
            with torch.no_grad():
                for n, p in local.named_parameters():
                    p.copy_(params[n] * masks[n] if n in masks else params[n])
            generator = torch.Generator().manual_seed(s.seed * 1_000_003 + server_round * 7919 + i)
            result = train_masked(
                local,
                masks,
                data,
                steps=s.local_steps,
                batch_size=s.batch_size,
                lr=s.learning_rate,
                generator=generator,
            )
            replies.append((result.num_examples, dict(local.named_parameters())))
            g = result.importance
            coded = {}  # variants that differ only in the server's imputation share uploads
            for label, code, _, mode in VARIANTS:
                if mode == "every-round":
                    if code not in coded:
                        coded[code] = code_upload(code, g, masks)
                    upload, nbytes = coded[code]
                    every_round[label].add(upload)
                    bytes_every_round[label].append(nbytes)
            recent[i] = [*recent[i], {n: v.clone() for n, v in g.items()}][-max(WINDOWS) :]
            if accumulated[i] is None:
                accumulated[i] = g
            else:
                for n, v in g.items():
                    accumulated[i][n].add_(v)
        total = sum(n for n, _ in replies)
        with torch.no_grad():
            for n in params:
                avg = sum(v[n].detach() * (k / total) for k, v in replies)
                params[n] = torch.where(masks[n], avg, params[n]) if n in masks else avg

        if server_round % s.reconfig_interval or server_round == s.num_server_rounds:
            continue
        delta = stability_delta(server_round, s.delta_initial, s.delta_half_life)
        fixed = sum(float(a[n].sum()) for a in accumulated for n in params if n not in masks)
        weights = {k: params[k] * masks[k] for k in masks}

        def solve(importance, weights=weights, delta=delta, fixed=fixed, masks=masks):
            return reconfigure(
                weights,
                masks,
                importance,
                profile.time_per_param(),
                profile.fixed_time_s(never_pruned),
                fixed_importance=fixed,
                delta=delta,
                max_density=s.max_density,
            ).masks

        exact = {n: sum(a[n] for a in accumulated) for n in names}
        reference = solve(exact)
        kept = sum(int(m.sum()) for m in reference.values())
        grown = sum(int((reference[k] & ~masks[k]).sum()) for k in names)
        row = {
            "round": server_round,
            "delta": delta,
            "kept_before": sum(int(m.sum()) for m in masks.values()),
            "kept_after": kept,
            "grown": grown,
            "variants": {},
        }
        for w in WINDOWS:  # exact importance of only the last w rounds (the fixed part too)
            window = {n: sum(r[n] for rounds_ in recent for r in rounds_[-w:]) for n in names}
            fixed_w = sum(
                float(r[n].sum())
                for rs in recent
                for r in rs[-w:]
                for n in params
                if n not in masks
            )
            got = reconfigure(
                weights, masks, window, profile.time_per_param(),
                profile.fixed_time_s(never_pruned), fixed_importance=fixed_w, delta=delta,
                max_density=s.max_density,
            ).masks  # fmt: skip
            j, diff = jaccard(reference, got)
            row.setdefault("windows", {})[w] = {"jaccard": j, "diff": diff}
            print(f"round {server_round}: importance-window {w}: Jaccard {j:.5f}", flush=True)
        bf16 = {n: sum(a[n].to(torch.bfloat16).float() for a in accumulated) for n in names}
        j, diff = jaccard(reference, solve(bf16))
        row["variants"][REFERENCE] = {"ratio": 1.0, "jaccard": j, "diff": diff}
        coded: dict[ImportanceCode, list] = {}
        for label, code, imputation, mode in VARIANTS:
            if mode == "every-round":
                agg = every_round[label]
                sizes = bytes_every_round[label]
            else:
                if code not in coded:
                    coded[code] = [code_upload(code, a, masks) for a in accumulated]
                agg = ImportanceSum(shapes, imputation)
                for upload, _ in coded[code]:
                    agg.add(upload)
                sizes = [nbytes for _, nbytes in coded[code]]
            j, diff = jaccard(reference, solve(agg.total()))
            ratios = [b / (2 * prunable_total) for b in sizes]
            row["variants"][label] = {
                "ratio": float(np.mean(ratios)),
                "ratio_max": float(np.max(ratios)),
                "bytes_mean": float(np.mean(sizes)),
                "jaccard": j,
                "diff": diff,
            }
            print(
                f"round {server_round}: {label}: bytes {np.mean(ratios):.4f} of bfloat16 "
                f"(1/{1 / np.mean(ratios):.1f}), Jaccard {j:.5f} ({diff} positions differ)",
                flush=True,
            )
        rows.append(row)
        masks = reference
        accumulated = [None] * num_clients
        for label in every_round:
            every_round[label] = ImportanceSum(shapes, every_round[label].imputation)
            bytes_every_round[label] = []
    model.load_state_dict({n: params[n] * masks[n] if n in masks else params[n] for n in params})
    _, accuracy = evaluate(model, test)
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "commit": commit(),
        "rounds": rounds,
        "clients": num_clients,
        "initial_pruning": {"iterations": phase1.iterations, "stopped_by": phase1.stopped_by},
        "fl_seconds": time.time() - t_fl,
        "final_accuracy_exact_masks": accuracy,
        "prunable": prunable_total,
        "variants": {
            label: {"code": vars(code), "imputation": imputation, "mode": mode}
            for label, code, imputation, mode in VARIANTS
        },
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        "# bench_importance: PruneFL's solver on coded importance",
        "",
        f"- date: {result['date']}; commit {result['commit']}",
        f"- machine: {result['machine']}",
        f"- default task offline: Conv-2, MNIST (embedded), {result['clients']} IID clients "
        f"all in every round, {result['rounds']} rounds, paper-conv2 profile; initial "
        f"pruning {result['initial_pruning']['iterations']} iterations "
        f"({result['initial_pruning']['stopped_by']}); {result['prunable']:,} prunable "
        "weights",
        "- bytes: a node's upload against bfloat16 (2 B per prunable weight), mean over "
        "uploads; Jaccard: kept positions (all layers) against the solution from exact "
        "float32 importance; goals <= 1/8 and >= 0.98",
        "",
        "| variant | code | imputation | mode |",
        "|---|---|---|---|",
    ]
    for label, v in result["variants"].items():
        c = v["code"]
        lines.append(
            f"| {label} | {c['mantissa_bits']} mantissa bits, top {c['top_fraction']:.0%} "
            f"of pruned (>= {c['min_sent']:,}) | {v['imputation']} | {v['mode']} |"
        )
    lines += [
        "",
        "| round | delta | kept before | kept after | grown | variant | bytes vs bfloat16 | "
        "Jaccard | positions differing | goals |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        for label, v in row["variants"].items():
            ok = v["ratio"] <= GOAL_RATIO + 1e-12 and v["jaccard"] >= GOAL_JACCARD
            verdict = "reference" if label == REFERENCE else ("met" if ok else "MISSED")
            lines.append(
                f"| {row['round']} | {row['delta']:.3f} | {row['kept_before']:,} | "
                f"{row['kept_after']:,} | {row['grown']:,} | {label} | "
                f"{v['ratio']:.4f} (1/{1 / v['ratio']:.1f}) | {v['jaccard']:.5f} | "
                f"{v['diff']:,} | {verdict} |"
            )
    lines += [
        "",
        "importance-window: the mask from exact importance of only the last W rounds before "
        "each reconfiguration, against the full accumulation (W = 0, the paper):",
        "",
        "| round | "
        + " | ".join(f"W = {w}: Jaccard (positions differing)" for w in WINDOWS)
        + " |",
        "|---|" + "---|" * len(WINDOWS),
    ]
    for row in result["rows"]:
        cells = [
            f"{row['windows'][w]['jaccard']:.5f} ({row['windows'][w]['diff']:,})" for w in WINDOWS
        ]
        lines.append(f"| {row['round']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"FL rounds took {result['fl_seconds']:.0f} s; final test accuracy (exact-importance "
        f"masks): {result['final_accuracy_exact_masks']:.4f}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="keep the initial pruning's result in this file and reuse it (saves a minute)",
    )
    args = parser.parse_args()
    result = run(args.rounds, args.seed, args.cache)
    text = markdown(result)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
