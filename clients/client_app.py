"""The ClientApp: decode what the server sent, train only the kept parameters, reply.

The node keeps the mask it was last sent in `context.state`, so the server can send
kept values alone while the mask has not changed. When the server says so (the paper's
full participation), it also keeps the importance it has accumulated since the server
last asked for it; otherwise importance is computed only in rounds that upload it.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.partitions import client_partition
from fedprune import protocol as P
from fedprune.codec import MASK_PREFIXES, decode_mask, decode_model, encode_mask, encode_update
from fedprune.costs import BYTES_PER_VALUE_ROUND_TRIP
from fedprune.data import INPUT_SHAPE, NUM_CLASSES, load_folder
from fedprune.masks import Masks
from fedprune.models import build_model, param_shapes, prunable_names
from fedprune.profiler import csr_max_densities, profile_device
from fedprune.settings import Settings, parse_ids
from fedprune.sparse import train_sparse
from fedprune.training import evaluate as evaluate_model
from fedprune.training import train_masked

app = ClientApp()


def _held_mask(context: Context, shapes: dict[str, tuple[int, ...]]) -> tuple[int, Masks] | None:
    """(version, masks) the node holds from an earlier message, if any."""
    if P.STATE_MASK not in context.state:
        return None
    record = context.state[P.STATE_MASK]
    masks = {}
    for key in record:
        prefix, name = key.split("/", 1)
        masks[name] = decode_mask(prefix, record[key].numpy(), shapes[name])
    return int(context.state[P.STATE_META]["version"]), masks


def _hold_mask(context: Context, version: int, masks: Masks) -> None:
    packed = {}
    for name, mask in masks.items():
        prefix, data = encode_mask(mask)
        packed[f"{prefix}/{name}"] = Array(data)
    context.state[P.STATE_MASK] = ArrayRecord(packed)
    context.state[P.STATE_META] = ConfigRecord({"version": version})


def _receive(msg: Message, context: Context):
    """Settings, model loaded with the server's weights, the masks, and the mask version."""
    # Simulated clients share the machine's cores; one thread each avoids oversubscription.
    # Set here, not at import: the simulation engine also imports this module in the
    # process that runs the ServerApp.
    torch.set_num_threads(1)
    settings = Settings.from_run_config(context.run_config)
    model = build_model(
        settings.model,
        NUM_CLASSES[settings.dataset],
        input_shape=INPUT_SHAPE[settings.dataset],
    )
    shapes, prunable = param_shapes(model), prunable_names(model)
    config = msg.content[P.CONFIG]
    version = int(config[P.MASK_VERSION])
    record = msg.content[P.ARRAYS]
    arrays = {key: record[key].numpy() for key in record}
    carries_mask = any(key.split("/", 1)[0] in MASK_PREFIXES for key in arrays)
    held = None if carries_mask else _held_mask(context, shapes)
    if not carries_mask and (held is None or held[0] != version):
        raise RuntimeError(
            f"the server sent values for mask version {version} without the mask, but this "
            f"node holds {'no mask' if held is None else f'version {held[0]}'}"
        )
    params, masks = decode_model(arrays, shapes, prunable, None if held is None else held[1])
    if carries_mask:
        _hold_mask(context, version, masks)
    model.load_state_dict(params)
    return settings, model, masks, config, version


def _local_data(settings: Settings, context: Context):
    """The node's own data folder if its node config names one (`data-path`), else its
    partition of the embedded data set by `partition-id` / `num-partitions`."""
    data_path = str(context.node_config.get("data-path", "")).strip()
    if data_path:
        return load_folder(data_path, NUM_CLASSES[settings.dataset], INPUT_SHAPE[settings.dataset])
    return client_partition(
        settings.data_spec(),
        int(context.node_config["partition-id"]),
        int(context.node_config["num-partitions"]),
    )


def _accumulate_importance(context: Context, importance: dict[str, torch.Tensor]):
    """Add this round's importance to what the node has gathered since it last sent it."""
    if P.STATE_IMPORTANCE in context.state:
        record = context.state[P.STATE_IMPORTANCE]
        for name, g in importance.items():
            g.add_(torch.from_numpy(record[name].numpy()))
        rounds = int(context.state[P.STATE_IMPORTANCE_META][P.IMPORTANCE_ROUNDS]) + 1
    else:
        rounds = 1
    return importance, rounds


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings, model, masks, config, version = _receive(msg, context)
    data = _local_data(settings, context)
    server_round = int(config[P.SERVER_ROUND])
    partition_id = int(context.node_config.get("partition-id", 0))  # seeds batches only
    if partition_id in parse_ids(settings.simulate_failures):
        # Fault injection: this device "crashes" in training; Flower turns the exception
        # into an error reply, which the server must drop without stopping the run.
        raise RuntimeError(f"simulated failure of partition {partition_id} (simulate-failures)")
    generator = torch.Generator().manual_seed(
        settings.seed * 1_000_003 + server_round * 7919 + partition_id
    )
    kw = dict(
        steps=settings.local_steps,
        batch_size=settings.batch_size,
        lr=float(config.get(P.LEARNING_RATE, settings.learning_rate)),
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        generator=generator,
    )
    send = bool(config[P.SEND_IMPORTANCE])
    keep = bool(config.get(P.ACCUMULATE_IMPORTANCE, False))
    kw["track_importance"] = send or keep
    if settings.sparse_training:
        # Fully connected layers train in CSR below the density where this device
        # measured CSR to be the faster format.
        measurements = _measurements(settings, context)
        local = train_sparse(
            model, masks, data, max_csr_density=csr_max_densities(measurements), **kw
        )
    else:
        local = train_masked(model, masks, data, **kw)
    metrics = {
        P.NUM_EXAMPLES: local.num_examples,
        P.TRAIN_LOSS: local.loss,
        P.MASK_VERSION: version,
        P.PARTITION_ID: partition_id,
    }
    sent_importance = None
    if send or keep:
        importance, rounds = _accumulate_importance(context, local.importance)
        metrics[P.IMPORTANCE_ROUNDS] = rounds
    if send:
        sent_importance = {name: importance[name] for name in masks}
        metrics[P.FIXED_IMPORTANCE] = sum(
            float(g.sum()) for name, g in importance.items() if name not in masks
        )
    if keep:
        context.state[P.STATE_IMPORTANCE] = ArrayRecord(
            {name: Array(g.numpy()) for name, g in importance.items()}
        )
        context.state[P.STATE_IMPORTANCE_META] = ConfigRecord({P.IMPORTANCE_ROUNDS: rounds})
    else:  # uploaded now, or never to be: hold nothing
        context.state.pop(P.STATE_IMPORTANCE, None)
        context.state.pop(P.STATE_IMPORTANCE_META, None)
    state = {name: p.detach() for name, p in model.named_parameters()}
    arrays = encode_update(state, masks, sent_importance)
    reply = RecordDict(
        {
            P.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            P.METRICS: MetricRecord(metrics),
        }
    )
    return Message(content=reply, reply_to=msg)


def _measurements(settings: Settings, context: Context) -> dict:
    """This device's raw profile (`fedprune.profiler.profile_device`), measured once per
    node and cached in `context.state`."""
    if P.STATE_PROFILE in context.state:
        return dict(context.state[P.STATE_PROFILE])
    torch.set_num_threads(1)
    model = build_model(
        settings.model, NUM_CLASSES[settings.dataset], input_shape=INPUT_SHAPE[settings.dataset]
    )
    _, measurements = profile_device(
        model,
        settings.local_steps,
        settings.batch_size,
        settings.bandwidth_bytes_per_s,
        repeats=settings.profile_repeats,
        input_shape=INPUT_SHAPE[settings.dataset],
        seed=settings.seed,
    )
    context.state[P.STATE_PROFILE] = ConfigRecord(measurements)
    return dict(context.state[P.STATE_PROFILE])


def scaled_measurements(measurements: dict, speed_factor: float, bandwidth: float) -> dict:
    """The measurements as a device `speed_factor` times slower, on a `bandwidth` bytes/s
    link: compute slopes and fixed cost multiplied, communication from the bandwidth."""
    out = dict(measurements)
    for name in out["layers"]:
        out[f"{name}/compute_s_per_param"] = float(out[f"{name}/compute_s_per_param"]) * (
            speed_factor
        )
    out["fixed_s"] = float(out["fixed_s"]) * speed_factor
    out["comm_s_per_param"] = BYTES_PER_VALUE_ROUND_TRIP / bandwidth
    out["speed_factor"] = float(speed_factor)
    out["bandwidth_bytes_per_s"] = float(bandwidth)
    return out


@app.query(P.PROFILE_ACTION)
def profile(msg: Message, context: Context) -> Message:
    """The device profile: measured at first contact, then from the node's cache. In
    simulation, the node's speed factor and bandwidth (by partition id) apply."""
    settings = Settings.from_run_config(context.run_config)
    partition_id = int(context.node_config.get("partition-id", 0))
    measurements = scaled_measurements(
        _measurements(settings, context),
        settings.speed_factor(partition_id),
        settings.bandwidth(partition_id),
    )
    measurements[P.PARTITION_ID] = partition_id
    reply = RecordDict({P.PROFILE: ConfigRecord(measurements)})
    return Message(content=reply, reply_to=msg)


@app.query(P.IDENTIFY_ACTION)
def identify(msg: Message, context: Context) -> Message:
    """The node's stable client id (its partition id, if its node config has one), the
    federation's size as it knows it, and how many examples it holds, or why it cannot
    load them: the server samples by these, not by node ids, and only nodes with data."""
    identity = {}
    for key in (P.PARTITION_ID, P.NUM_PARTITIONS):
        if key in context.node_config:
            identity[key] = int(context.node_config[key])
    try:
        identity[P.NUM_EXAMPLES] = len(
            _local_data(Settings.from_run_config(context.run_config), context)
        )
    # A split that cannot be made, a bad data folder, neither a data-path nor a partition-id.
    except (ValueError, OSError, KeyError) as exc:
        identity[P.DATA_ERROR] = str(exc)
    return Message(content=RecordDict({P.IDENTITY: ConfigRecord(identity)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of the global model on this node's local data."""
    settings, model, _, _, version = _receive(msg, context)
    data = _local_data(settings, context)
    loss, accuracy = evaluate_model(model, data)
    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: len(data),
            P.EVAL_LOSS: loss,
            P.EVAL_ACCURACY: accuracy,
            P.MASK_VERSION: version,
        }
    )
    return Message(content=RecordDict({P.METRICS: metrics}), reply_to=msg)
