"""What one deployed message costs the ClientApp beyond training: imports and per-message work.

Flower 1.41's Deployment Engine starts a fresh `flwr-clientapp` process for every message,
so everything the client path imports, and everything a handler builds before it trains
(settings, model, data partition), is paid once per message and per node. This measures
both, each in a fresh process, as a SuperNode's ClientApp sees them:

1. `import clients.client_app`: wall time (median of `--repeats` fresh interpreters) and,
   from `python -X importtime`, the share of each top-level package (torch, flwr,
   flwr_datasets and what it pulls in: pandas, HF datasets, matplotlib and seaborn for
   its plots, ...);
2. a deployed node's messages through the real handlers, each in a fresh process, in a
   run's order: the identify query (the node makes its partition; before and after a
   server on this machine cut the split, `fedprune.partition_cache`), the profile query,
   a train message whose node state holds what the ones before kept (partition rows,
   device profile), and one of a node that holds nothing; each step timed by wrapping
   the module's functions (settings, model and decode, data, layer formats, training,
   encode), then the same message again in that process (what a process that outlived
   its message would pay).

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
import tempfile
import time
from pathlib import Path

from fedprune import hardware

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
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedprune import protocol as P
from fedprune.codec import encode_model
from fedprune.data import DataSpec, data_shape
from fedprune.masks import full_masks
from fedprune.models import build_model
from fedprune.settings import Settings

model_name, num_partitions, mode, state_file = sys.argv[1], int(sys.argv[2]), *sys.argv[3:5]
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

def context(state):
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0,
                   "num-partitions": num_partitions}, state=state,
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
timed(ca, "receive", "model and decode")
timed(ca, "local_data", "data (partition)")
timed(ca, "layer_formats", "layer formats (profile)")
timed(ca, "train_as_clients", "local training (K steps)")
timed(ca, "encode_kept_update", "encode reply")

def saved_state():
    # What the SuperNode kept of this node's state from the messages before (the
    # partition's rows, the device profile): a deployed node's context.state.
    state = RecordDict()
    try:
        saved = json.load(open(state_file))
    except FileNotFoundError:
        return state
    if saved.get("partition"):
        split, rows = saved["partition"]
        state[P.STATE_PARTITION] = ArrayRecord({split: Array(np.asarray(rows, np.int64))})
    if saved.get("profile"):
        state[P.STATE_PROFILE] = ConfigRecord(saved["profile"])
    return state

def save(state):
    out = {}
    if P.STATE_PARTITION in state:
        record = state[P.STATE_PARTITION]
        split = next(iter(record))
        out["partition"] = [split, record[split].numpy().tolist()]
    if P.STATE_PROFILE in state:
        out["profile"] = dict(state[P.STATE_PROFILE])
    json.dump(out, open(state_file, "w"))

out = {"import_s": t_imported - t_start}
kinds = {"train": ca.train, "identify": ca.identify, "profile": ca.profile}
ctx = context(saved_state() if mode.endswith("held") else RecordDict())
kind = mode.split(":")[0]
for run in ("first", "again"):
    steps.clear()
    t0 = time.perf_counter()
    kinds[kind](message("train" if kind == "train" else f"query.{kind}"), ctx)
    total = time.perf_counter() - t0
    out[run] = {"total_s": total, **steps, "other": total - sum(steps.values())}
save(ctx.state)
print(json.dumps(out))
"""

# A deployed node's messages, each in a fresh process, in the order a run sends them: the
# identify query (the node makes its partition) before and after a server on the machine
# has cut the split (`fedprune.partition_cache`), the profile query (its device profile:
# from the machine's cache), then train messages whose node state holds both; and, for
# comparison, a train message in a fresh process of a node that holds nothing.
NOT_CUT = "identify query, first contact"
SEQUENCE = (
    (NOT_CUT, "identify"),
    ("identify query, first contact, the split cut by a server on this machine", "identify"),
    ("profile query", "profile:held"),
    ("train message, node state held", "train:held"),
    ("train message, nothing held", "train"),
)


def handler_costs(model: str, num_partitions: int) -> dict:
    """Per-step seconds of a deployed node's messages, each in a fresh process."""
    import flwr_datasets.partitioner

    from fedprune.partition_cache import every_partition, partitions_path
    from fedprune.settings import Settings

    out = {}
    spec = Settings.from_run_config({"model": model}).data_spec()  # the handler script's
    with tempfile.TemporaryDirectory() as tmp:
        state_file = str(Path(tmp) / "state.json")
        for label, mode in SEQUENCE:
            if label == NOT_CUT:  # no server has cut this split here: the node cuts it
                partitions_path(spec, num_partitions).unlink(missing_ok=True)
            else:  # as the server does at the start of its rounds
                every_partition(spec, num_partitions, lambda: flwr_datasets.partitioner)
            done = subprocess.run(
                [sys.executable, "-c", _HANDLER_SCRIPT, model, str(num_partitions), mode,
                 state_file if mode != "train" else str(Path(tmp) / "none.json")],
                cwd=PROJECT_DIR,
                capture_output=True,
                text=True,
                check=False,
            )  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-3000:])
            result = json.loads(done.stdout.strip().splitlines()[-1])
            out[label] = {"import_s": result["import_s"], **result["first"]}
            out[f"{label}, again in the same process"] = result["again"]
    return out


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
            "processor": hardware.cpu(),
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
    print(
        f"{result['date']}, commit {result['commit']}, {result['machine']['platform']}, "
        f"{result['machine']['processor']}"
    )
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
