"""What a pruning method says, as hooks the strategy calls: its name and settings, where
it starts, when it needs the clients' importance and how its mask changes.

`SparseFedAvg` inherits these defaults (the dense FedAvg); each method overrides the few it
changes, and `strategies/methods.py` registers it (docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedprune.costs import CostProfile
from fedprune.data import Examples
from fedprune.masks import Masks, full_masks
from fedprune.settings import Settings


@dataclass
class Start:
    """What a method's starting point is built from: the freshly built (seeded) model,
    which the method may train or re-initialise in place, the prior cost profile, the
    server's own data, and the data's shape."""

    model: torch.nn.Module
    profile: CostProfile
    server_data: Examples
    num_classes: int
    input_shape: tuple[int, int, int]


class PruningMethod:
    """The hooks of a pruning method, with the defaults of dense FedAvg."""

    name: ClassVar[str] = ""  # the `method` setting that picks it
    reads: ClassVar[tuple[str, ...]] = ()  # settings only this method reads

    @classmethod
    def check_settings(cls, settings: Settings) -> None:
        """Raise SettingsError (naming the key and the fix) for settings this method
        cannot run with; called before any work."""

    @classmethod
    def options(cls, settings: Settings) -> dict:
        """This method's own constructor arguments, from the settings."""
        return {}

    @classmethod
    def starting_point(cls, settings: Settings, start: Start) -> tuple[Masks, dict]:
        """(masks of round 1, a summary of how they were found); the weights are
        `start.model`'s afterwards. The default: the dense model."""
        return full_masks(start.model), {"enabled": False}

    @classmethod
    def comparison_arms(cls) -> dict[str, dict]:
        """The arms `experiments.compare` runs for this method: arm name -> settings
        beyond `method` ("@density" / "@mask": PruneFL's final density / mask, same seed)."""
        return {cls.name: {}}

    def wants_importance(self, server_round: int) -> bool:
        """Whether the mask update at the end of this round uses the clients' importance."""
        return False

    def update_mask(
        self, server_round: int, importance: dict[str, torch.Tensor] | None, fixed: float
    ) -> Masks | None:
        """The mask after this round (None: unchanged). Called after averaging."""
        return None
