"""What one deployed message costs the ClientApp beyond training: imports and per-message work.

Flower 1.41's Deployment Engine starts a fresh `flwr-clientapp` process for every message,
so everything the client path imports, and everything a handler builds before it trains
(settings, model, data partition), is paid once per message and per node. This measures
both, each in a fresh process, as a SuperNode's ClientApp sees them:

1. `import clients.client_app`: wall time (median of `--repeats` fresh interpreters) and,
   from `python -X importtime`, the share of each top-level package (torch, flwr,
   flwr_datasets and what it pulls in: pandas, HF datasets, matplotlib and seaborn for
   its plots, ...);
2. one train message and one identify query through the real handlers, in a fresh
   process: each step timed by wrapping the module's functions (settings, model, decode,
   data partition, training, encode), then the same message again in that process (what a
   process that outlived its message would pay).

    python -m experiments.bench_client_startup --model conv2 --num-partitions 4

Prints a table and writes JSON (`--out`). Wrap it in `flock /tmp/fedprune-cpu.lock`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent

# Top-level packages, and the parts of flwr_datasets worth naming.
GROUPS = (
    ("flwr_datasets: visualization (matplotlib, seaborn)", "flwr_datasets.visualization"),
    ("flwr_datasets: metrics", "flwr_datasets.metrics"),
    ("flwr_datasets: partitioner (HF datasets, pandas)", "flwr_datasets.partitioner"),
)


def import_wall_s(repeats: int) -> list[float]:
    """Wall seconds of `python -c "import clients.client_app"`, `repeats` fresh processes."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", "import clients.client_app"], cwd=PROJECT_DIR, check=True
        )
        times.append(time.perf_counter() - t0)
    return times


def import_profile() -> dict[str, float]:
    """Cumulative import seconds per top-level package (and per part of flwr_datasets),
    from `python -X importtime -c "import clients.client_app"`; "total" is the whole."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import clients.client_app"],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        check=True,
    )
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        _, self_us, cum_us, name = (part.strip() for part in line.replace(":", "|", 1).split("|"))
        rows.append((int(self_us), int(cum_us), name))
    out: dict[str, float] = {}
    # Every module's own time, charged to its top-level package: the package shares add up.
    for self_us, _, name in rows:
        top = name.split(".")[0]
        out[top] = out.get(top, 0.0) + self_us / 1e6
    out["total"] = sum(self_us for self_us, _, _ in rows) / 1e6
    # Parts of flwr_datasets: the cumulative time of the first import of each (what
    # importing that part cost, its dependencies included).
    for label, module in GROUPS:
        hits = [cum for _, cum, name in rows if name == module]
        if hits:
            out[label] = hits[0] / 1e6
    # Packages under 5 ms together make the rest.
    big = {k: v for k, v in out.items() if v >= 0.005 or k == "total"}
    big["(packages under 5 ms each)"] = sum(v for k, v in out.items() if k not in big)
    return dict(sorted(big.items(), key=lambda kv: -kv[1]))


_HANDLER_SCRIPT = r"""
import json, sys, time
t_start = time.perf_counter()
import clients.client_app as ca
t_imported = time.perf_counter()
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedprune import protocol as P
from fedprune.codec import encode_model
from fedprune.data import DataSpec, data_shape
from fedprune.masks import full_masks
from fedprune.models import build_model
from fedprune.settings import Settings

model_name, num_partitions = sys.argv[1], int(sys.argv[2])
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
settings = Settings.from_run_config({"model": model_name})
num_classes, input_shape = data_shape(DataSpec())
model = build_model(model_name, num_classes, input_shape=input_shape)
params = {n: p.detach().clone() for n, p in model.named_parameters()}
arrays = encode_model(params, full_masks(model), include_masks=True)
config = ConfigRecord({P.SERVER_ROUND: 1, P.MASK_VERSION: 0, P.SEND_IMPORTANCE: False,
                       P.ACCUMULATE_IMPORTANCE: False, P.LEARNING_RATE: 0.1})

def message(kind):
    content = RecordDict({P.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          P.CONFIG: config}) if kind == "train" else RecordDict()
    return Message(content=content, message_type=kind, dst_node_id=7)

def context():
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0,
                   "num-partitions": num_partitions}, state=RecordDict(),
                   run_config=settings.to_run_config())

steps = {}
def timed(owner, name, label):
    original = getattr(owner, name)
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            steps[label] = steps.get(label, 0.0) + time.perf_counter() - t0
    setattr(owner, name, wrapper)

import fedprune.settings as fs
timed(fs.Settings, "from_run_config", "settings")
timed(ca, "build_model", "build model")
timed(ca, "decode_model", "decode arrays")
timed(ca, "_local_data", "data partition")
timed(ca, "train_masked", "local training (K steps)")
timed(ca, "encode_update", "encode reply")

out = {"import_s": t_imported - t_start}
for run in ("first", "again"):
    for kind, handler in (("train", ca.train), (f"query.{P.IDENTIFY_ACTION}", ca.identify)):
        steps.clear()
        t0 = time.perf_counter()
        handler(message(kind), context())
        total = time.perf_counter() - t0
        out[f"{kind} ({run})"] = {"total_s": total, **steps,
                                  "other": total - sum(steps.values())}
print(json.dumps(out))
"""


def handler_costs(model: str, num_partitions: int) -> dict:
    """Per-step seconds of a train message and an identify query in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", _HANDLER_SCRIPT, model, str(num_partitions)],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def git_commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True
    )
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="conv2")
    parser.add_argument("--num-partitions", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0],
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": git_commit(),
        "model": args.model,
        "import_wall_s": import_wall_s(args.repeats),
        "import_profile_s": import_profile(),
        "handlers": handler_costs(args.model, args.num_partitions),
    }
    print(f"{result['date']}, commit {result['commit']}, {result['machine']['platform']}")
    walls = result["import_wall_s"]
    print(
        f"import clients.client_app, fresh process: median {statistics.median(walls):.2f} s "
        f"({', '.join(f'{w:.2f}' for w in walls)})"
    )
    print("importtime, seconds (own time of each package's modules; parts: cumulative):")
    for name, seconds in result["import_profile_s"].items():
        if seconds >= 0.02:
            print(f"  {seconds:6.3f}  {name}")
    print(f"handlers in a fresh process ({args.model}, {args.num_partitions} partitions):")
    for kind, steps in result["handlers"].items():
        if not isinstance(steps, dict):
            print(f"  {kind}: {steps:.3f} s")
            continue
        parts = ", ".join(f"{k} {v:.3f}" for k, v in steps.items() if k != "total_s")
        print(f"  {kind}: {steps['total_s']:.3f} s ({parts})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
