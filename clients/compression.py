"""Sparse uploads beyond the kept values, on the device side.

- The compression-only reference (`strategies.compression`): reply with a top-k sparsified
  update and keep the rest as error memory in `context.state`. When the server's config
  carries `protocol.TOPK_VALUES`, the ClientApp's reply is `topk_reply` instead of the kept
  values.
- The value-code setting (`fedprune.value_code`): when the config carries
  `protocol.VALUE_BITS`, the kept values go up as the node's update, quantised with error
  feedback (`quantised_values`).
- FedRTS (`strategies.fedrts`): when the config carries `protocol.TOP_GRADIENTS`, the reply
  also holds the positions of the node's largest gradients among pruned links
  (`vote_arrays`).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context

from clients.node_state import held_values, hold_value_memory, value_memory
from fedprune import protocol as P
from fedprune.thompson import encode_votes, top_gradient_positions
from fedprune.topk import encode_sparse, topk_step
from fedprune.value_code import encode_value_update


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights as received, before training changes them in place."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def held_error(context: Context, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor] | None:
    """The node's error memory (what earlier rounds did not send), if it holds one that
    fits this model."""
    if P.STATE_TOPK_ERROR not in context.state:
        return None
    record = context.state[P.STATE_TOPK_ERROR]
    if set(record) != set(shapes):
        return None  # another model's: start afresh
    return {name: torch.from_numpy(record[name].numpy()).reshape(shapes[name]) for name in shapes}


def topk_reply(
    context: Context, received: dict[str, torch.Tensor], model: torch.nn.Module, k: int
) -> ArrayRecord:
    """Wire arrays of at most `k` entries of (trained - received + error memory), with
    their positions; the rest becomes the node's new error memory."""
    trained = {name: p.detach() for name, p in model.named_parameters()}
    update = {name: trained[name] - received[name] for name in trained}
    error = held_error(context, {name: t.shape for name, t in update.items()})
    sent, new_error = topk_step(update, error, k)
    context.state[P.STATE_TOPK_ERROR] = ArrayRecord(
        {name: Array(e.numpy()) for name, e in new_error.items()}
    )
    return ArrayRecord({key: Array(a) for key, a in encode_sparse(sent).items()})


def vote_arrays(
    importance: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], fraction: float
) -> dict[str, Array]:
    """FedRTS's upload: per layer, the positions of the pruned links with the largest
    gradients (`fedprune.thompson.top_gradient_positions`), as wire arrays."""
    positions = top_gradient_positions(importance, masks, fraction)
    return {key: Array(a) for key, a in encode_votes(positions).items()}


def quantised_values(
    context: Context,
    trained: dict[str, torch.Tensor],
    mask_version: int,
    bits: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The "vq/<name>" arrays of the node's update (`trained`, the values it replies with
    as `fedprune.sparse.kept_parameters` gives them, minus the reference values it
    received this round, which `receive` kept), quantised to `bits` with stochastic
    rounding and this node's error feedback memory, which it then updates."""
    held = held_values(context, mask_version)
    if held is None:
        raise RuntimeError("asked for a quantised update, but this node holds no values")
    memory = value_memory(context, mask_version)
    arrays, memory = encode_value_update(trained, held[1], memory, bits, rng)
    hold_value_memory(context, mask_version, memory)
    return arrays
