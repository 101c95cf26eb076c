"""What a node keeps between messages, in `context.state` (it survives across rounds on
that node): the mask it was last sent and its version, the importance it holds for a
later upload, its measured device profile, the rows of its data partition, and under the
value-code setting the reference values it was sent and its upload's error feedback
memory."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from fedprune import protocol as P
from fedprune.codec import decode_mask, encode_mask
from fedprune.masks import Masks


def held_mask(context: Context, shapes: dict[str, tuple[int, ...]]) -> tuple[int, Masks] | None:
    """(version, masks) the node holds from an earlier message, if any."""
    if P.STATE_MASK not in context.state:
        return None
    record = context.state[P.STATE_MASK]
    masks = {}
    for key in record:
        prefix, name = key.split("/", 1)
        masks[name] = decode_mask(prefix, record[key].numpy(), shapes[name])
    return int(context.state[P.STATE_META]["version"]), masks


def hold_mask(context: Context, version: int, masks: Masks) -> None:
    """Keep `masks` (packed, as on the wire) as mask `version`."""
    packed = {}
    for name, mask in masks.items():
        prefix, data = encode_mask(mask)
        packed[f"{prefix}/{name}"] = Array(data)
    context.state[P.STATE_MASK] = ArrayRecord(packed)
    context.state[P.STATE_META] = ConfigRecord({"version": version})


def with_held_importance(
    context: Context, importance: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], int]:
    """This round's importance plus what the node holds from earlier rounds, and over how
    many rounds the sum runs."""
    if P.STATE_IMPORTANCE not in context.state:
        return importance, 1
    record = context.state[P.STATE_IMPORTANCE]
    for name, g in importance.items():
        g.add_(torch.from_numpy(record[name].numpy()))
    return importance, int(context.state[P.STATE_IMPORTANCE_META][P.IMPORTANCE_ROUNDS]) + 1


def hold_importance(context: Context, importance: dict[str, torch.Tensor], rounds: int) -> None:
    context.state[P.STATE_IMPORTANCE] = ArrayRecord(
        {name: Array(g.numpy()) for name, g in importance.items()}
    )
    context.state[P.STATE_IMPORTANCE_META] = ConfigRecord({P.IMPORTANCE_ROUNDS: rounds})


def drop_importance(context: Context) -> None:
    """Uploaded, or never to be: hold nothing."""
    context.state.pop(P.STATE_IMPORTANCE, None)
    context.state.pop(P.STATE_IMPORTANCE_META, None)


# ---------------------------------------------------------------- the value-code setting
# The reference values the node was last sent (`fedprune.value_code`) and its upload's
# error feedback memory, each tagged with the mask version it is laid out by: a node that
# gets a new mask holds neither any longer.


def _values_meta(context: Context) -> dict:
    if P.STATE_VALUES_META not in context.state:
        return {}
    return dict(context.state[P.STATE_VALUES_META])


def held_values(context: Context, mask_version: int) -> tuple[int, dict[str, np.ndarray]] | None:
    """(version, kept values per parameter) of the reference the node holds, if it holds
    one laid out by mask `mask_version`."""
    meta = _values_meta(context)
    if P.STATE_VALUES not in context.state or meta.get("mask-version") != mask_version:
        return None
    record = context.state[P.STATE_VALUES]
    return int(meta["version"]), {name: record[name].numpy() for name in record}


def hold_values(
    context: Context, version: int, mask_version: int, values: dict[str, np.ndarray]
) -> None:
    """Keep `values` (kept values per parameter) as reference `version`, laid out by mask
    `mask_version`; error feedback memory of another mask is dropped."""
    meta = _values_meta(context)
    context.state[P.STATE_VALUES] = ArrayRecord({k: Array(v) for k, v in values.items()})
    memory_mask = meta.get("memory-mask-version")
    if memory_mask is not None and memory_mask != mask_version:
        context.state.pop(P.STATE_VALUE_MEMORY, None)
        memory_mask = None
    new = {"version": version, "mask-version": mask_version}
    if memory_mask is not None:
        new["memory-mask-version"] = memory_mask
    context.state[P.STATE_VALUES_META] = ConfigRecord(new)


def value_memory(context: Context, mask_version: int) -> dict[str, np.ndarray] | None:
    """The upload's error feedback memory, if the node holds one for mask `mask_version`
    (after a mask change it starts again from zero)."""
    meta = _values_meta(context)
    if P.STATE_VALUE_MEMORY not in context.state:
        return None
    if meta.get("memory-mask-version") != mask_version:
        return None
    record = context.state[P.STATE_VALUE_MEMORY]
    return {name: record[name].numpy() for name in record}


def hold_value_memory(context: Context, mask_version: int, memory: dict[str, np.ndarray]) -> None:
    context.state[P.STATE_VALUE_MEMORY] = ArrayRecord({k: Array(v) for k, v in memory.items()})
    meta = _values_meta(context)
    meta["memory-mask-version"] = mask_version
    context.state[P.STATE_VALUES_META] = ConfigRecord(meta)


# ---------------------------------------------------------------- the node's partition
# A deployed node starts a fresh process for every message, and making its partition
# imports flwr-datasets (pandas, HF datasets: about 2 s of CPU). The partition's rows are
# kept instead, under the split they belong to (`split`: the data spec, the partition id
# and the partition count), and a message whose split differs makes it again.


def held_partition(context: Context, split: str) -> np.ndarray | None:
    """The rows of the node's partition of `split`, if it holds them."""
    record = context.state.get(P.STATE_PARTITION)
    if record is None or split not in record:
        return None
    return record[split].numpy()


def hold_partition(context: Context, split: str, rows: np.ndarray) -> None:
    """Keep the rows of the node's partition of `split` (and only those)."""
    context.state[P.STATE_PARTITION] = ArrayRecord({split: Array(np.asarray(rows, np.int64))})
