"""What a node keeps between messages, in `context.state` (it survives across rounds on
that node): the mask it was last sent and its version, the importance it holds for a
later upload, and its measured device profile."""

from __future__ import annotations

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
