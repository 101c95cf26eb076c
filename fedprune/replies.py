"""Validate and decode one node's reply into what the server may use, or a reason.

A reply arrives as plain parts: its arrays (name -> numpy array, the codec's wire form)
and its metrics (name -> number). Nothing a reply claims is used before it is checked:
counts are integers in range, numbers finite, the mask version the one the server
delivered, the arrays what the codec expects for that mask. A reply that fails any check
raises `ReplyError` saying why; the caller drops it whole and logs the reason.

Importance is the one part that may be set aside while the values are kept: a reply whose
importance covers a different number of local rounds than every other node's (a node that
restarted and lost what it had accumulated) would skew the sum, so its importance is not
used (`TrainUpdate.importance_note` says why) but its values are averaged as usual.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedprune import protocol as P
from fedprune.codec import CodecError, decode_reply

MAX_NUM_EXAMPLES = 10**9  # a reply claiming more samples than this is not believed


class ReplyError(ValueError):
    """A reply that cannot be used; the text says why."""


@dataclass
class TrainUpdate:
    """A train reply that passed validation.

    values: per parameter, a 1-D float32 tensor: the kept values in wire order for a
        prunable one, the whole flattened tensor otherwise.
    importance: dense importance per prunable parameter, or None (not asked for, or set
        aside: then `importance_note` says why).
    fixed_importance: importance summed over the never-pruned parameters.
    importance_rounds: local rounds the importance covers (0 without importance).
    compute_s: the node's measured seconds of local computation this round.
    peak_memory_mb: the node's measured peak memory in the handler (`fedprune.memory`),
        or None if the reply does not say.
    formats: per prunable weight, the format its layer trained in (`fedprune.sparse.FORMATS`),
        or None if the reply does not say.
    """

    num_examples: int
    loss: float
    values: dict[str, torch.Tensor]
    importance: dict[str, torch.Tensor] | None = None
    fixed_importance: float = 0.0
    importance_rounds: int = 0
    importance_note: str = ""
    compute_s: float = 0.0
    formats: dict[str, str] | None = None
    peak_memory_mb: float | None = None


# The formats a layer can train in, by their wire index (P.LAYER_FORMATS); equal to
# fedprune.sparse.FORMATS, which tests/test_sparse_conv.py checks.
FORMAT_CODES = ("dense", "csr", "sparse-conv")


def layer_formats(metrics: Mapping[str, Any], names: list[str]) -> dict[str, str] | None:
    """The reply's per-layer training formats (P.LAYER_FORMATS: one index into
    FORMAT_CODES per prunable weight, in `names` order), or None where it has none;
    ReplyError unless it is exactly one valid index per layer."""
    if P.LAYER_FORMATS not in metrics:
        return None
    codes = metrics[P.LAYER_FORMATS]
    if not isinstance(codes, list) or len(codes) != len(names):
        raise ReplyError(f"{P.LAYER_FORMATS} is not a list of {len(names)} format indices")
    formats = {}
    for name, code in zip(names, codes, strict=True):
        if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code < len(FORMAT_CODES):
            raise ReplyError(f"{P.LAYER_FORMATS}: {code!r} for {name} is not a format index")
        formats[name] = FORMAT_CODES[code]
    return formats


@dataclass(frozen=True)
class Expected:
    """What the server expects of this round's train replies.

    shapes: every parameter's shape; masks: the delivered masks of the prunable weights;
    importance_rounds: rounds each upload must cover, 0 if importance was not asked for.
    base: the round's global kept values (1-D float32 per parameter, wire order), to which
        a quantised update ("vq/") is added; None: replies carry float32 values only.
    """

    mask_version: int
    shapes: Mapping[str, tuple[int, ...]]
    masks: Mapping[str, torch.Tensor]
    importance_rounds: int = 0
    base: Mapping[str, torch.Tensor] | None = None


def _integer(metrics: Mapping[str, Any], key: str) -> int:
    value = metrics.get(key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ReplyError(f"{key} = {value!r} is not an integer")
    return value


def _finite(metrics: Mapping[str, Any], key: str, minimum: float = -math.inf) -> float:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReplyError(f"{key} = {value!r} is not a number")
    if not math.isfinite(value) or value < minimum:
        bound = "" if minimum == -math.inf else f" and >= {minimum}"
        raise ReplyError(f"{key} = {value!r} is not finite{bound}")
    return float(value)


def peak_memory(metrics: Mapping[str, Any]) -> float | None:
    """The reply's P.PEAK_MEMORY_MB (a finite number >= 0), or None where it has none."""
    return _finite(metrics, P.PEAK_MEMORY_MB, 0.0) if P.PEAK_MEMORY_MB in metrics else None


def check_common(metrics: Mapping[str, Any], mask_version: int) -> int:
    """The checks every reply (train or evaluate) passes; returns its number of examples."""
    n = _integer(metrics, P.NUM_EXAMPLES) if P.NUM_EXAMPLES in metrics else None
    if n is None or not 0 < n <= MAX_NUM_EXAMPLES:
        raise ReplyError(
            f"{P.NUM_EXAMPLES} = {metrics.get(P.NUM_EXAMPLES)!r} is not an integer in "
            f"[1, {MAX_NUM_EXAMPLES}]"
        )
    version = metrics.get(P.MASK_VERSION)
    if version != mask_version:
        raise ReplyError(f"mask version {version!r}, expected {mask_version}")
    return n


def check_train_reply(
    arrays: Mapping[str, np.ndarray], metrics: Mapping[str, Any], expected: Expected
) -> TrainUpdate:
    """A `TrainUpdate` from a train reply's parts; ReplyError saying what is wrong."""
    n = check_common(metrics, expected.mask_version)
    loss = _finite(metrics, P.TRAIN_LOSS)
    compute_s = _finite(metrics, P.COMPUTE_S, 0.0) if P.COMPUTE_S in metrics else 0.0
    asked = expected.importance_rounds > 0
    try:
        values, importance = decode_reply(
            arrays, expected.shapes, expected.masks, expect_importance=asked, base=expected.base
        )
    except CodecError as exc:
        raise ReplyError(str(exc)) from exc
    formats = layer_formats(metrics, list(expected.masks))
    update = TrainUpdate(n, loss, values, compute_s=compute_s, formats=formats)
    update.peak_memory_mb = peak_memory(metrics)
    if asked:
        update.fixed_importance = _finite(metrics, P.FIXED_IMPORTANCE, 0.0)
        rounds = _integer(metrics, P.IMPORTANCE_ROUNDS)
        if rounds != expected.importance_rounds:
            update.importance_note = (
                f"its importance covers {rounds} local rounds, the others' "
                f"{expected.importance_rounds} (a node that restarted?): not used"
            )
        else:
            update.importance, update.importance_rounds = importance, rounds
    return update


def check_evaluate_reply(metrics: Mapping[str, Any], mask_version: int) -> tuple[int, float, float]:
    """(examples, accuracy, loss) of an evaluate reply; ReplyError if unusable."""
    n = check_common(metrics, mask_version)
    accuracy = _finite(metrics, P.EVAL_ACCURACY, 0.0)
    if accuracy > 1.0:
        raise ReplyError(f"{P.EVAL_ACCURACY} = {accuracy!r} is above 1")
    return n, accuracy, _finite(metrics, P.EVAL_LOSS, 0.0)


def order_key(client_id: int, node_id: int) -> tuple[int, int]:
    """Replies are summed in (client id, node id) order, whatever order they arrive in:
    float sums then do not depend on timing, so runs are reproducible. The client id is
    the server's own record of the node (`NodeSampler`), not a claim in the reply."""
    return (client_id, node_id)
