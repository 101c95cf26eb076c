"""The ClientApp: decode what the server sent, train only the kept parameters, reply.

A node keeps the mask it was last sent (`clients.node_state`), so the server sends kept
values alone while the mask has not changed. In rounds the server marks, the node also
computes importance (accumulated squared gradients): it uploads it, or (the paper's full
participation) keeps it for a later upload. Each handler reads top to bottom, as in
Flower's quickstart: take the model out of the message, train or evaluate, reply.
"""

from __future__ import annotations

import hashlib
import time
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from clients import compression
from clients.node_state import (
    drop_importance,
    held_mask,
    held_partition,
    held_values,
    hold_importance,
    hold_mask,
    hold_partition,
    hold_values,
    with_held_importance,
)
from clients.partitions import partition_rows
from fedprune import kernels
from fedprune import protocol as P
from fedprune.codec import MASK_PREFIXES, decode_kept, encode_kept_update
from fedprune.costs import BYTES_PER_VALUE_ROUND_TRIP
from fedprune.data import client_examples, data_shape, load_folder
from fedprune.identities import clients_of_node
from fedprune.importance_code import ImportanceCode
from fedprune.jit_warmup import compile_node_path
from fedprune.memory import PeakMemory
from fedprune.models import build_model, param_shapes, prunable_names, skeleton
from fedprune.profiler import cached_measurements, sparse_crossovers
from fedprune.settings import Settings, parse_ids
from fedprune.sparse import (
    FORMATS,
    LayerMasks,
    choose_formats,
    kept_parameters,
    model_in_formats,
    supported_formats,
    train_sparse,
)
from fedprune.sparse_conv import check_supported, sparse_conv_unavailable_reason
from fedprune.training import evaluate as evaluate_model
from fedprune.training import train_as_clients

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    memory = PeakMemory()  # what this message costs the node's memory at its peak
    settings, model, kept, masks, version = receive(msg, context)
    data = local_data(settings, context)
    config = msg.content[P.CONFIG]
    partition_id = int(context.node_config.get(P.PARTITION_ID, 0))  # seeds batches only
    if partition_id in parse_ids(settings.simulate_failures):
        # Fault injection: this device "crashes" in training; Flower turns the exception
        # into an error reply, which the server must drop without stopping the run.
        raise RuntimeError(f"simulated failure of partition {partition_id} (simulate-failures)")
    send, keep = bool(config[P.SEND_IMPORTANCE]), bool(config[P.ACCUMULATE_IMPORTANCE])
    votes = float(config[P.TOP_GRADIENTS]) if P.TOP_GRADIENTS in config else None  # FedRTS
    track = send or keep or votes is not None
    # Chosen before the clock starts: the first call measures the device profile (once per
    # machine and model, then cached), which is no part of a round's compute.
    formats = layer_formats(settings, context, model, masks)
    # Also before it: the first use of the compiled kernels in a process loads them.
    kernels.load(sparse=any(f != "dense" for f in formats.values()))
    # The clock starts before the model is built: a sparse layer's structure (from its
    # mask) is work a dense node does not do, so it counts as the round's device time.
    t0 = time.perf_counter()
    if P.TOPK_VALUES in config:
        # The compression-only reference replies with a top-k update of the whole dense
        # model (clients/compression.py): dense, its layers converted for the round only.
        model = model_in_formats(model, kept, masks, {})
        received = compression.snapshot(model)
    else:
        # Each layer built in its format from the values received: a sparse layer is
        # never dense on the node (`model_in_formats`), and nothing is converted back.
        model, received = model_in_formats(model, kept, masks, formats), None
    del kept  # the model holds the values now (a sparse layer its own copy of them)
    # And a sparse layer holds its mask as its indices: no bool copy through the round.
    masks = LayerMasks(model, masks)
    clients = client_ids(config, context)
    if len(clients) > len(data):
        log(WARNING, "node with %d examples cannot train as %d clients: it trains as %d",
            len(data), len(clients), len(data))  # fmt: skip
        clients = clients[: len(data)]
    local = train_as_clients(
        model,
        data,
        len(clients),
        lambda share, j: train_locally(
            settings, model, masks, share, config, clients[j], track, formats
        ),
    )
    metrics = {
        P.NUM_EXAMPLES: local.num_examples,
        P.TRAIN_LOSS: local.loss,
        P.MASK_VERSION: version,
        # Per client the node trains as: each stands for a device of its own.
        P.COMPUTE_S: (time.perf_counter() - t0) / len(clients),
        P.IMPORTANCE_TRACKED: int(track),
        # The format each prunable layer trained in, in the model's prunable order.
        P.LAYER_FORMATS: [FORMATS.index(local.formats[name]) for name in masks],
    }
    uploaded = None
    if send or keep:
        importance, metrics[P.IMPORTANCE_ROUNDS] = with_held_importance(context, local.importance)
        if keep:
            hold_importance(context, importance, metrics[P.IMPORTANCE_ROUNDS])
        else:
            uploaded = {name: importance[name] for name in masks}
            metrics[P.FIXED_IMPORTANCE] = sum(
                float(g.sum()) for name, g in importance.items() if name not in masks
            )
    if not keep:
        drop_importance(context)
    t1 = time.perf_counter()  # what the node computes for its reply is device time too
    if received is not None:
        arrays = compression.topk_reply(context, received, model, int(config[P.TOPK_VALUES]))
    else:
        trained = kept_parameters(model, masks)
        code = ImportanceCode() if settings.importance_code == "coded" else None
        encoded = encode_kept_update(trained, masks, uploaded, importance_code=code)
        if P.VALUE_BITS in config:  # the update, quantised, instead of float32 values
            rng = np.random.default_rng([settings.seed, int(config[P.SERVER_ROUND]), partition_id])
            encoded = {k: v for k, v in encoded.items() if not k.startswith("v/")}
            encoded |= compression.quantised_values(
                context, trained, version, int(config[P.VALUE_BITS]), rng
            )
        arrays = ArrayRecord({k: Array(v) for k, v in encoded.items()})
    if votes is not None:
        for key, array in compression.vote_arrays(local.importance, masks, votes).items():
            arrays[key] = array
    if received is not None or votes is not None:
        metrics[P.COMPUTE_S] += time.perf_counter() - t1
    peak = memory.above_start_mb()
    if peak is not None:
        metrics[P.PEAK_MEMORY_MB] = peak
    reply = RecordDict({P.ARRAYS: arrays, P.METRICS: MetricRecord(metrics)})
    return Message(content=reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of the global model on this node's local data."""
    settings, model, kept, masks, version = receive(msg, context)
    model = model_in_formats(model, kept, masks, {})
    data = local_data(settings, context)
    loss, accuracy = evaluate_model(model, data)
    metrics = {
        P.NUM_EXAMPLES: len(data),
        P.EVAL_LOSS: loss,
        P.EVAL_ACCURACY: accuracy,
        P.MASK_VERSION: version,
    }
    return Message(content=RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.query(P.IDENTIFY_ACTION)
def identify(msg: Message, context: Context) -> Message:
    """The node's stable client id (its partition id, if its node config has one), the
    federation's size as it knows it, and how many examples it holds, or why it cannot
    load them: the server samples by these, not by node ids, and only nodes with data.

    It is a node's first message, before the server's initial pruning: the node compiles
    here what its rounds will run (`compile_node_path`), so that no round pays for it."""
    seconds = compile_node_path()
    if seconds > 1.0:
        log(INFO, "[fedprune] compiled this node's kernels and coders in %.1f s", seconds)
    identity = {}
    for key in (P.PARTITION_ID, P.NUM_PARTITIONS):
        if key in context.node_config:
            identity[key] = int(context.node_config[key])
    try:
        identity[P.NUM_EXAMPLES] = len(
            local_data(Settings.from_run_config(context.run_config), context)
        )
    # A split that cannot be made, a bad data folder, neither a data-path nor a partition-id.
    except (ValueError, OSError, KeyError) as exc:
        identity[P.DATA_ERROR] = str(exc)
    return Message(content=RecordDict({P.IDENTITY: ConfigRecord(identity)}), reply_to=msg)


@app.query(P.PROFILE_ACTION)
def profile(msg: Message, context: Context) -> Message:
    """The device profile: measured at first contact, then from the node's cache. In
    simulation, the node's speed factor and bandwidth (by partition id) apply."""
    settings = Settings.from_run_config(context.run_config)
    partition_id = int(context.node_config.get(P.PARTITION_ID, 0))
    measurements = scaled_measurements(
        device_measurements(settings, context),
        settings.speed_factor(partition_id),
        settings.bandwidth(partition_id),
    )
    measurements[P.PARTITION_ID] = partition_id
    return Message(content=RecordDict({P.PROFILE: ConfigRecord(measurements)}), reply_to=msg)


# ---------------------------------------------------------------------- the steps


def receive(msg: Message, context: Context):
    """(settings, the model's skeleton, the values the server sent (`decode_kept`: a
    prunable weight's kept values, never dense), the masks, their version). The handler
    builds the model from them (`model_in_formats`), each layer in the format it needs."""
    # Simulated clients share the machine's cores; one thread each avoids oversubscription.
    # Set here, not at import: the simulation engine also imports this module in the
    # process that runs the ServerApp.
    torch.set_num_threads(1)
    settings = Settings.from_run_config(context.run_config)
    num_classes, input_shape = node_data_shape(settings, context)
    # Shapes only: the decoded message becomes the weights (`model_in_formats`), so the node
    # never holds an initialised model beside it (one dense copy fewer at its peak).
    model = skeleton(settings.model, num_classes, input_shape=input_shape)
    shapes, prunable = param_shapes(model), prunable_names(model)
    config = msg.content[P.CONFIG]
    version = int(config[P.MASK_VERSION])
    record = msg.content[P.ARRAYS]
    arrays = {key: record[key].numpy() for key in record}
    carries_mask = any(key.split("/", 1)[0] in MASK_PREFIXES for key in arrays)
    held = held_mask(context, shapes)
    # Values alone need the current mask; a mask change ("md/") needs its base version.
    needed = int(config.get(P.MASK_BASE_VERSION, version)) if carries_mask else version
    if (not carries_mask or P.MASK_BASE_VERSION in config) and (held is None or held[0] != needed):
        raise RuntimeError(
            f"the server sent {'a mask change from' if carries_mask else 'values for'} mask "
            f"version {needed} without the mask, but this node holds "
            f"{'no mask' if held is None else f'version {held[0]}'}"
        )
    values = None
    if P.VALUES_BASE_VERSION in config:  # quantised changes: to the values it holds
        base = int(config[P.VALUES_BASE_VERSION])
        values = held_values(context, version)
        if values is None or values[0] != base:
            raise RuntimeError(
                f"the server sent value changes from values version {base}, but this node "
                f"holds {'none' if values is None else f'version {values[0]}'}"
            )
        values = values[1]
    kept, masks = decode_kept(arrays, shapes, prunable, None if held is None else held[1], values)
    if carries_mask:
        hold_mask(context, version, masks)
    if P.VALUES_VERSION in config:  # the reference for the next change and this update
        reference = {name: v.numpy().copy() for name, v in kept.items()}
        hold_values(context, int(config[P.VALUES_VERSION]), version, reference)
    return settings, model, kept, masks, version


def node_data_shape(settings: Settings, context: Context) -> tuple[int, tuple[int, int, int]]:
    """(classes, image shape) of the data: from the node's own data folder's meta.json if
    it has one (a device without the data source), else from the configured source."""
    data_path = str(context.node_config.get("data-path", "")).strip()
    return data_shape(settings.data_spec(), data_path)


def local_data(settings: Settings, context: Context):
    """The node's own data folder if its node config names one (`data-path`), else its
    partition of the configured data set by `partition-id` / `num-partitions`."""
    data_path = str(context.node_config.get("data-path", "")).strip()
    if data_path:
        return load_folder(data_path, *node_data_shape(settings, context))
    spec = settings.data_spec()
    partition_id = int(context.node_config[P.PARTITION_ID])
    num_partitions = int(context.node_config[P.NUM_PARTITIONS])
    # Made once per node and split, then held: a deployed node's every message is a fresh
    # process, and making the partition costs it seconds (`hold_partition`).
    split = hashlib.sha256(f"{spec!r}/{partition_id}/{num_partitions}".encode()).hexdigest()
    rows = held_partition(context, split)
    if rows is None:
        rows = partition_rows(spec, partition_id, num_partitions)
        hold_partition(context, split, rows)
    return client_examples(spec, rows)


def client_ids(config, context: Context) -> list[int]:
    """The client ids this node trains as this round: its partition id, or, when the
    server says the simulation stands for more clients than it has nodes
    (`simulated-clients`), those `fedprune.identities.clients_of_node` gives it."""
    partition_id = int(context.node_config.get(P.PARTITION_ID, 0))
    total = int(config.get(P.SIMULATED_CLIENTS, 0))
    if total <= 0 or P.NUM_PARTITIONS not in context.node_config:
        return [partition_id]
    return clients_of_node(total, partition_id, int(context.node_config[P.NUM_PARTITIONS]))


def train_locally(settings, model, masks, data, config, client_id, track, formats):
    """K local SGD steps on the kept parameters (see fedprune.training), each prunable
    layer in its format in `formats` (`layer_formats`); the result's `formats` says what
    each trained in. The batches are seeded by the run's seed, the round and the client."""
    server_round = int(config[P.SERVER_ROUND])
    generator = torch.Generator().manual_seed(
        settings.seed * 1_000_003 + server_round * 7919 + client_id
    )
    kw = dict(
        steps=settings.local_steps,
        batch_size=settings.batch_size,
        lr=float(config.get(P.LEARNING_RATE, settings.learning_rate)),
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        generator=generator,
        track_importance=track,
    )
    return train_sparse(model, masks, data, formats=formats, **kw)


_said_unavailable = False


def layer_formats(settings: Settings, context: Context, model, masks) -> dict[str, str]:
    """Per prunable weight, the format it trains in this round (`layer-format`): with
    "measured", the sparse format (CSR for Linear layers, the direct sparse convolution for
    supported Conv2d layers) where the layer's mask density is at most the crossover this
    device measured for it (`device_measurements`), else masked dense. Where the compiled
    kernels do not run, convolutions train masked dense, and the node says so once."""
    global _said_unavailable
    if settings.layer_format != "dense" and not _said_unavailable:
        reason = sparse_conv_unavailable_reason()
        convs = [name for name, f in supported_formats(model).items() if f == ("dense",)]
        if reason is not None and any(_conv_supported(model, name) for name in convs):
            _said_unavailable = True
            log(WARNING, "sparse convolutions unavailable on this node, they train masked "
                "dense: %s", reason)  # fmt: skip
    crossovers = None
    if settings.layer_format == "measured":
        crossovers = sparse_crossovers(device_measurements(settings, context))
    return choose_formats(model, masks, settings.layer_format, crossovers)


def _conv_supported(model, weight_name: str) -> bool:
    """Whether the layer of `weight_name` is a convolution the direct kernels support."""
    module = model.get_submodule(weight_name.rpartition(".")[0])
    try:
        check_supported(module)
    except ValueError:
        return False
    return isinstance(module, torch.nn.Conv2d)


def device_measurements(settings: Settings, context: Context) -> dict:
    """This device's raw profile (`fedprune.profiler.profile_device`): measured once per
    machine and model (`fedprune.profile_cache`: on disk, shared by the virtual nodes of a
    simulation), then kept in the node's `context.state`."""
    if P.STATE_PROFILE not in context.state:
        torch.set_num_threads(1)
        num_classes, shape = node_data_shape(settings, context)
        model = build_model(settings.model, num_classes, input_shape=shape)
        measurements, _ = cached_measurements(
            model,
            settings.local_steps,
            settings.batch_size,
            settings.bandwidth_bytes_per_s,
            repeats=settings.profile_repeats,
            input_shape=shape,
            seed=settings.seed,
        )
        context.state[P.STATE_PROFILE] = ConfigRecord(measurements)
    return dict(context.state[P.STATE_PROFILE])


def scaled_measurements(measurements: dict, speed_factor: float, bandwidth: float) -> dict:
    """The measurements as a device `speed_factor` times slower, on a `bandwidth` bytes/s
    link: compute slopes and fixed cost multiplied, communication from the bandwidth."""
    out = dict(measurements)
    for name in out["layers"]:
        key = f"{name}/compute_s_per_param"
        out[key] = float(out[key]) * speed_factor
    out["fixed_s"] = float(out["fixed_s"]) * speed_factor
    out["comm_s_per_param"] = BYTES_PER_VALUE_ROUND_TRIP / bandwidth
    out["speed_factor"] = float(speed_factor)
    out["bandwidth_bytes_per_s"] = float(bandwidth)
    return out
