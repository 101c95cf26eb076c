"""Kept values as quantised changes, both ways (the `value-code` setting; FedPAQ).

With ``value-code = "exact"`` (the default) values travel as float32 (``"v/<name>"``).
With ``"q16"``, ``"q8"`` or ``"q4"`` they travel as changes quantised to that many bits
(``"vq/<name>"``, format 4 of docs/wire.md, `fedprune.quantisation`):

Download.  The server keeps a *reference* (`ValueReference`): the kept values every node
that followed the previous round holds.  Each round it moves the reference towards the
global values by the change ``global - reference``, quantised (round to nearest), and sends
that change to the nodes that hold the previous reference; the others (new, behind, or
after a mask change) get the reference itself as float32.  Every node then starts the
round from the same reference.  What a change failed to carry stays in
``global - reference`` and goes with the next change, so the reference never drifts more
than one quantisation step from the global model (error feedback by construction).  The
server's global values stay exact: it adds the nodes' updates to them, not to the
reference.

Upload.  A node replies with its update (trained kept values minus the reference it
started from), quantised with stochastic rounding and error feedback: its memory (what
earlier replies did not carry) is added before quantising and the new residual is kept
(`encode_value_update`).  The server decodes the update against the kept count of the mask
the node trained with and adds it to the round's global values.

Every parameter is coded alike, biases included: each is one vector (a prunable
parameter's kept values in position order, any other parameter whole).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedprune.quantisation import dequantise, quantise, quantise_with_feedback

__all__ = [
    "VALUE_CODES",
    "VALUE_UPDATE_PREFIX",
    "ValueReference",
    "encode_value_update",
    "value_bits",
]

VALUE_UPDATE_PREFIX = "vq"
"""Wire prefix of a quantised change of values (format 4)."""

VALUE_CODES: dict[str, int | None] = {"exact": None, "q16": 16, "q8": 8, "q4": 4}
"""The `value-code` setting: bits per value of the quantised changes (None: float32)."""

BUCKET = 1024
"""Values per float32 scale (format 4's ``bucket``): 4 bytes per 1024 values, 0.4 % of
the 8-bit codes."""


def value_bits(setting: str) -> int | None:
    """Bits per value of a `value-code` setting (None for "exact"); ValueError otherwise."""
    if setting not in VALUE_CODES:
        raise ValueError(f"value code {setting!r}: choose one of {sorted(VALUE_CODES)}")
    return VALUE_CODES[setting]


def _flat32(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().reshape(-1).to(torch.float32).cpu().numpy()
    return np.asarray(t, dtype=np.float32).reshape(-1)


def encode_value_update(
    trained: Mapping[str, np.ndarray | torch.Tensor],
    received: Mapping[str, np.ndarray],
    memory: Mapping[str, np.ndarray] | None,
    bits: int,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Client side: ``("vq/<name>" arrays, new memory)`` for the update ``trained -
    received`` per parameter (1-D kept values, wire order), each plus its ``memory`` (None:
    zeros) quantised to ``bits`` with stochastic rounding from ``rng``.  The new memory is
    what the message did not carry (float32, per parameter)."""
    if set(trained) != set(received):
        raise ValueError(f"trained {sorted(trained)} and received {sorted(received)} differ")
    arrays: dict[str, np.ndarray] = {}
    new_memory: dict[str, np.ndarray] = {}
    for name in trained:
        update = _flat32(trained[name]) - _flat32(received[name])
        held = None if memory is None else memory.get(name)
        if held is not None and held.shape != update.shape:
            held = None  # laid out by another mask: start afresh
        message, residual = quantise_with_feedback(update, held, bits, rng=rng, bucket=BUCKET)
        arrays[f"{VALUE_UPDATE_PREFIX}/{name}"] = message
        new_memory[name] = residual
    return arrays, new_memory


def apply_change(held: np.ndarray, change: np.ndarray, what: str) -> np.ndarray:
    """``held + dequantise(change)`` in float32, as both sides compute it (``held``
    trusted, its length the count expected; ``change`` untrusted: CodecError)."""
    return held + dequantise(change, held.shape[0], what=what)


class ValueReference:
    """Server side: the values the nodes start a round from, and the change that takes a
    node from the previous round's reference to this one's.

    ``values``: per parameter, 1-D float32 kept values (wire order); ``version`` counts
    references (0: none yet); ``change``: ``"vq/<name>"`` arrays from reference
    ``version - 1`` to ``version``, or None when there is no previous reference laid out by
    the same mask (the nodes then get ``values`` as float32).
    """

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.version = 0
        self.mask_version = -1
        self.values: dict[str, np.ndarray] = {}
        self.change: dict[str, np.ndarray] | None = None

    def advance(self, kept: Mapping[str, torch.Tensor], mask_version: int) -> None:
        """Make the next reference from the global kept values ``kept`` (laid out by mask
        ``mask_version``)."""
        target = {name: _flat32(v) for name, v in kept.items()}
        self.version += 1
        if mask_version != self.mask_version or set(target) != set(self.values):
            self.values, self.change = target, None
        else:
            change, values = {}, {}
            for name, g in target.items():
                message = quantise(g - self.values[name], self.bits, bucket=BUCKET)
                change[f"{VALUE_UPDATE_PREFIX}/{name}"] = message
                values[name] = apply_change(self.values[name], message, name)
            self.values, self.change = values, change
        self.mask_version = mask_version

    def dense(self, params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]):
        """``params`` with the reference's values at the kept positions (for encoding the
        float32 form; pruned positions are not sent)."""
        out = {}
        for name, p in params.items():
            v = torch.from_numpy(self.values[name])
            if name in masks:
                t = p.detach().clone().reshape(-1)
                t[masks[name].reshape(-1)] = v
                out[name] = t.reshape(p.shape)
            else:
                out[name] = v.reshape(p.shape).clone()
        return out
