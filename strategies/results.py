"""What a run prints and writes: one line per round, metrics.csv, summary.json, plots.

Rows are appended and flushed as rounds finish, so a run that dies midway still leaves
its metrics so far on disk.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import subprocess
import time
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.common.logger import log

from fedprune import hardware
from fedprune.masks import layer_densities, to_prune_state
from fedprune.portable import export_portable
from fedprune.sparse import (
    compact_formats,
    export_for_inference,
    inference_latency,
    load_for_inference,
)

INFERENCE_FILE = "model_inference.pt"
INFERENCE_BATCHES = (1, 20)
INFERENCE_ROUNDS = 3

COLUMNS = [
    "round",
    "accuracy",
    "loss",
    "density",
    "bytes_down",
    "bytes_up",
    "sim_time_s",
    "wall_time_s",
    "round_sim_time_s",
    "device_round_s",
    "device_time_s",
    "node_peak_memory_mb",
    "importance_tracked",
    "mask_version",
    "masks_sent",
    "mask_changes_sent",
    "replies",
    "dropped",
    "reconfigured",
]

# Read off a clock, so no two runs share them; every other column is a function of the
# seed and settings (tests/test_determinism.py).
MEASURED_COLUMNS = ("wall_time_s", "device_round_s", "device_time_s", "node_peak_memory_mb")


# The packages whose code a run executes: their sources identify the code of a run.
SOURCE_PACKAGES = ("fedprune", "strategies", "clients")
# Set by experiments.compare for the SuperLink it starts: the commit it runs (a ServerApp
# runs from an unpacked app bundle, outside the git checkout).
COMMIT_ENV = "FEDPRUNE_COMMIT"


def source_digest(root: Path | None = None) -> str:
    """sha256 over the paths and contents of the `SOURCE_PACKAGES`' .py files under
    `root` (default: this checkout or app bundle): equal digests, equal code."""
    root = root or Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def git_commit(root: Path | None = None) -> str | None:
    """HEAD's commit of the git checkout at `root`, with "-dirty" if the code (the
    `SOURCE_PACKAGES`, pyproject.toml) differs from it; None outside a checkout."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no", "--", *SOURCE_PACKAGES, "pyproject.toml"],
                               capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def code_version() -> dict[str, str]:
    """The code a run ran: its commit (from the harness's environment, else git, else
    "unknown") and the digest of its sources (`source_digest`), for summary.json."""
    commit = os.environ.get(COMMIT_ENV) or git_commit() or "unknown"
    return {"commit": commit, "source_sha256": source_digest()}


def inference_summary(
    model: torch.nn.Module,
    masks: dict[str, torch.Tensor],
    out_dir: Path,
    *,
    arch: dict,
    input_shape: tuple[int, ...],
    repeats: int = 20,
    formats: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Export the pruned `model` (its masked weights) for inference into
    `out_dir`/model_inference.pt, reload it, and time dense vs pruned forward passes.

    Also writes the portable forms (TorchScript and ONNX, `fedprune.portable`), each
    checked against the pruned model.

    Returns the "inference" block of summary.json: the file, the portable files with their
    largest output difference, the format chosen per layer (the faster here at batch 1,
    unless `formats` names them), and per batch size the seconds of one forward pass of
    the dense model and of the reloaded pruned one (the fastest of `INFERENCE_ROUNDS`
    interleaved medians), and their ratio.
    """
    path = Path(out_dir) / INFERENCE_FILE
    chosen = export_for_inference(model, masks, path, batch_size=1, formats=formats, arch=arch)
    portable = export_portable(model, masks, Path(out_dir), tuple(input_shape))
    pruned = load_for_inference(path)
    g = torch.Generator().manual_seed(0)
    block: dict[str, Any] = {"file": INFERENCE_FILE, "formats": chosen, "portable": portable}
    for batch_size in INFERENCE_BATCHES:
        x = torch.rand((batch_size, *input_shape), generator=g)
        # Interleaved, the fastest of a few medians: load from other processes (other
        # clients, a busy server) only ever adds time, and hits both models alike.
        dense_t, pruned_t = [], []
        for _ in range(INFERENCE_ROUNDS):
            dense_t.append(inference_latency(model, x, repeats=repeats))
            pruned_t.append(inference_latency(pruned, x, repeats=repeats))
        dense_s, pruned_s = min(dense_t), min(pruned_t)
        block[f"batch_{batch_size}"] = {
            "dense_s": dense_s,
            "pruned_s": pruned_s,
            "pruned_vs_dense": pruned_s / dense_s if dense_s > 0 else None,
        }
    return block


def train_formats_summary(stats: dict) -> dict[str, Any] | None:
    """The "train_formats" block of summary.json: the format each prunable layer trained
    in, in the last round whose replies said so (`RoundStats.layer_formats`); a layer that
    trained in different formats on different nodes lists them joined by "|". None if no
    reply said."""
    rounds = [r for r in sorted(stats) if stats[r].layer_formats]
    if not rounds:
        return None
    per_node = stats[rounds[-1]].layer_formats
    layers: dict[str, set[str]] = {}
    for formats in per_node.values():
        for name, fmt in formats.items():
            layers.setdefault(name, set()).add(fmt)
    merged = {name: "|".join(sorted(fmts)) for name, fmts in layers.items()}
    return {
        "round": rounds[-1],
        "nodes": len(per_node),
        "layers": merged,
        "compact": compact_formats(merged),
    }


class RunRecorder:
    """Collects one row per round and writes the run's files under `out_dir`."""

    def __init__(
        self, out_dir: Path, t0: float | None = None, rows: list[dict[str, Any]] | None = None
    ) -> None:
        """`rows`: the rounds of a resumed run so far; they are written again, and wall
        time goes on from the last of them (the time the run was down is not counted)."""
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time() if t0 is None else t0
        self.rows: list[dict[str, Any]] = [dict(r) for r in rows or []]
        if self.rows:
            self.t0 = time.time() - float(self.rows[-1]["wall_time_s"])
        self._csv = (out_dir / "metrics.csv").open("w", newline="")
        self._writer = csv.DictWriter(self._csv, fieldnames=COLUMNS)
        self._writer.writeheader()
        for row in self.rows:
            self._writer.writerow({k: row.get(k, "") for k in COLUMNS})
        self._csv.flush()

    def add_round(self, server_round: int, accuracy: float, loss: float, strategy) -> None:
        """Record a round from the test-split evaluation and the strategy's round stats
        (round 0, before any training, has none)."""
        stats = strategy.stats.get(server_round)
        last = self.rows[-1] if self.rows else {}
        round_time = stats.sim_time_s if stats else 0.0
        device_s = stats.device_round_s if stats else 0.0
        self.add(
            {
                "round": server_round,
                "accuracy": accuracy,
                "loss": loss,
                "density": strategy.density(),
                "bytes_down": stats.bytes_down if stats else 0,
                "bytes_up": stats.bytes_up if stats else 0,
                "sim_time_s": round(float(last.get("sim_time_s", 0.0)) + round_time, 3),
                "round_sim_time_s": round(round_time, 3),
                "device_round_s": round(device_s, 4),
                "device_time_s": round(float(last.get("device_time_s", 0.0)) + device_s, 4),
                "node_peak_memory_mb": ""
                if stats is None or stats.node_peak_memory_mb is None
                else round(stats.node_peak_memory_mb, 2),
                "importance_tracked": int(stats.importance_tracked) if stats else 0,
                "mask_version": strategy.mask_version,
                "masks_sent": stats.masks_sent if stats else 0,
                "mask_changes_sent": stats.mask_changes_sent if stats else 0,
                "replies": stats.replies if stats else 0,
                "dropped": stats.dropped if stats else 0,
                "reconfigured": int(stats.reconfigured) if stats else 0,
                "bytes_by_kind": {
                    "down": dict(stats.down_by_kind) if stats else {},
                    "up": dict(stats.up_by_kind) if stats else {},
                },
            }
        )

    def add(self, row: dict[str, Any]) -> None:
        row = {**row, "wall_time_s": round(time.time() - self.t0, 3)}
        self.rows.append(row)
        self._writer.writerow({k: row.get(k, "") for k in COLUMNS})
        self._csv.flush()
        log(
            INFO,
            "[fedprune] round %3d | acc %.4f | loss %.4f | density %.4f | down %s | up %s | "
            "modelled round %.1f s | device %.2f s%s | wall %.1f s",
            row["round"],
            row["accuracy"],
            row["loss"],
            row["density"],
            human_bytes(row["bytes_down"]),
            human_bytes(row["bytes_up"]),
            row["round_sim_time_s"],
            float(row.get("device_round_s", 0.0)),
            " (importance)" if row.get("importance_tracked") else "",
            row["wall_time_s"],
        )

    def finish(
        self,
        params: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
        summary_extra: dict[str, Any],
    ) -> dict[str, Any]:
        """Write the final model, its mask, summary.json and the plot; return the summary."""
        self._csv.close()
        torch.save(params, self.out_dir / "model.pt")
        torch.save(to_prune_state(masks), self.out_dir / "mask.pt")
        last = self.rows[-1]
        summary = {
            "final_accuracy": last["accuracy"],
            "final_loss": last["loss"],
            "final_density": last["density"],
            "layer_densities": layer_densities(masks),
            "rounds": last["round"],
            "total_bytes_down": sum(r["bytes_down"] for r in self.rows),
            "total_bytes_up": sum(r["bytes_up"] for r in self.rows),
            "total_sim_time_s": last["sim_time_s"],
            "total_device_time_s": last.get("device_time_s", 0.0),
            "node_peak_memory": node_peak_memory(self.rows, params),
            "total_wall_time_s": last["wall_time_s"],
            "dropped_replies": sum(r["dropped"] for r in self.rows),
            "machine": machine(),
            "code": code_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            **summary_extra,
        }
        summary["total_bytes"] = summary["total_bytes_down"] + summary["total_bytes_up"]
        summary["bytes_by_kind"] = write_bytes_by_kind(self.rows, self.out_dir / KINDS_FILE)
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot(self.rows, self.out_dir / "curves.png")
        log(
            INFO,
            "[fedprune] final accuracy %.4f at density %.4f, %s moved, %.0f s modelled, "
            "%.1f s measured on the devices; layers trained as %s; results in %s",
            summary["final_accuracy"],
            summary["final_density"],
            human_bytes(summary["total_bytes"]),
            summary["total_sim_time_s"],
            float(summary["total_device_time_s"]),
            (summary.get("train_formats") or {}).get("compact", "?"),
            self.out_dir,
        )
        return summary


def node_peak_memory(rows: list[dict[str, Any]], params: dict[str, torch.Tensor]) -> dict:
    """summary.json's "node_peak_memory": the largest peak memory a node measured in a
    train handler over the run, and in the last round (MB above the handler's start,
    `fedprune.memory`; None where no node could measure it), beside the dense model's
    float32 weights alone (a dense node also holds their gradients and the message)."""
    measured = [
        float(r["node_peak_memory_mb"])
        for r in rows
        if r.get("node_peak_memory_mb") not in ("", None)
    ]
    last = rows[-1].get("node_peak_memory_mb") if rows else None
    return {
        "max_mb": max(measured) if measured else None,
        "last_round_mb": float(last) if last not in ("", None) else None,
        "dense_weights_mb": round(sum(p.numel() for p in params.values()) * 4 / 1e6, 2),
        "what": "the largest peak resident memory of a replying node's process in its train "
        "handler, above what it held at the handler's start; experiments/bench_memory.py "
        "measures the same against a dense node side by side",
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


KINDS_FILE = "bytes_by_kind.csv"


def write_bytes_by_kind(rows: list[dict[str, Any]], path: Path) -> dict[str, dict[str, int]]:
    """Write each round's bytes by kind and direction (`strategies.accounting.bytes_by_kind`)
    as CSV rows (round, direction, kind, bytes); return the run's totals by direction and
    kind. Rows from before this column existed (a resumed older run) count nothing."""
    totals: dict[str, dict[str, int]] = {"down": {}, "up": {}}
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["round", "direction", "kind", "bytes"])
        for row in rows:
            for direction, kinds in row.get("bytes_by_kind", {}).items():
                for kind, n in sorted(kinds.items()):
                    writer.writerow([row["round"], direction, kind, n])
                    totals[direction][kind] = totals[direction].get(kind, 0) + n
    return totals


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": hardware.cpu(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against modelled time and bytes, and density per round, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    cum_bytes, total = [], 0
    for r in rows:
        total += r["bytes_down"] + r["bytes_up"]
        cum_bytes.append(total / 1e6)
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].plot([r["sim_time_s"] for r in rows], [r["accuracy"] for r in rows], marker=".")
    ax[0].set(xlabel="modelled time (s)", ylabel="test accuracy", title="accuracy vs time")
    ax[1].plot(cum_bytes, [r["accuracy"] for r in rows], marker=".")
    ax[1].set(
        xlabel="bytes moved (MB, down + up)", ylabel="test accuracy", title="accuracy vs bytes"
    )
    ax[2].plot(rounds, [r["density"] for r in rows], marker=".")
    ax[2].set(
        xlabel="round", ylabel="density (kept fraction)", title="density per round", ylim=(0, 1.05)
    )
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
