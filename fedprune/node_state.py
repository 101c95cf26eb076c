"""What the server knows each node holds, and so what it must be sent.

A node keeps the last mask it was sent (its version) between rounds. The server sends:
- nothing of the mask to a node that holds the current version (kept values only);
- the change since the previous version to a node that holds exactly that one;
- the whole mask to a node that is new, further behind, or may have lost its state.

A node's record is trusted only once it has answered with a valid reply: the server
records the version when a reply confirms it, and forgets it when the node is silent or
its reply is dropped (it may have crashed and lost its mask, or hold one the server no
longer knows about).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

FULL, CHANGE, NONE = "full", "change", "none"
# No mask, and the values as the quantised change from the reference values the node holds
# (the value-code setting, `fedprune.value_code`).
VALUE_CHANGE = "value-change"


class NodeLedger:
    """Per node id, the mask version it holds (only nodes that confirmed one)."""

    def __init__(self) -> None:
        self.mask_version: dict[int, int] = {}
        # With the value-code setting: the reference values version a node holds (laid out
        # by the mask version above), confirmed by a valid train reply.
        self.values_version: dict[int, int] = {}

    def mask_to_send(self, node_id: int, current: int, change_available: bool = False) -> str:
        """FULL, CHANGE or NONE: what of the mask `node_id` needs to use version `current`.
        CHANGE only where the caller can encode the change from `current - 1`."""
        held = self.mask_version.get(node_id)
        if held == current:
            return NONE
        if change_available and held == current - 1:
            return CHANGE
        return FULL

    def values_change(self, node_id: int, reference: int) -> bool:
        """Whether `node_id` holds reference values `reference - 1` (so it can be sent the
        change to `reference`); the caller checks that its mask is current."""
        return self.values_version.get(node_id) == reference - 1

    def confirm(self, node_id: int, version: int, values_version: int | None = None) -> None:
        """A valid reply from `node_id` shows it holds mask `version` (and, from a train
        reply under the value code, reference values `values_version`)."""
        self.mask_version[node_id] = version
        if values_version is not None:
            self.values_version[node_id] = values_version

    def forget_values(self, node_id: int) -> None:
        """`node_id` is sent a mask: the values it holds were laid out by another one."""
        self.values_version.pop(node_id, None)

    def forget(self, node_ids: Iterable[int]) -> None:
        """These nodes may no longer hold what we think: send them everything next time."""
        for node_id in node_ids:
            self.mask_version.pop(node_id, None)
            self.values_version.pop(node_id, None)

    def forget_all(self) -> None:
        """A new run (a resume): no node holds a mask yet."""
        self.mask_version.clear()
        self.values_version.clear()

    def __len__(self) -> int:
        return len(self.mask_version)

    def state_dict(self) -> dict:
        return {"mask_version": dict(self.mask_version)}

    def load_state_dict(self, state: Mapping) -> None:
        self.mask_version = {int(k): int(v) for k, v in state["mask_version"].items()}
