"""What a pruning method says, as hooks the strategy calls: its name and settings, where
it starts, when it needs the clients' importance and how its mask changes.

`SparseFedAvg` inherits these defaults (the dense FedAvg); each method overrides the few it
changes, and `strategies/methods.py` registers it (docs/extending.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import ClassVar

import torch
from flwr.common.logger import log

from fedprune.costs import CostProfile
from fedprune.data import Examples
from fedprune.initial_pruning import warm_start
from fedprune.masks import Masks, full_masks
from fedprune.replies import Expected, TrainUpdate, check_train_reply
from fedprune.settings import Settings
from fedprune.training import evaluate
from strategies.results import source_digest


@dataclass
class Start:
    """What a method's starting point is built from: the freshly built (seeded) model,
    which the method may train or re-initialise in place, the prior cost profile, the
    server's own data, the data's shape, and the formats the server's layers compute in
    for a mask (`strategies.server_formats`; None: masked dense)."""

    model: torch.nn.Module
    profile: CostProfile
    server_data: Examples
    num_classes: int
    input_shape: tuple[int, int, int]
    formats_for: Callable[[Masks], dict[str, str]] | None = None


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
        `start.model`'s afterwards. The default: the dense model, trained on the server's
        share first with `warm-start` (`server_warm_start`)."""
        return full_masks(start.model), {"enabled": False, **server_warm_start(settings, start)}

    @classmethod
    def comparison_arms(cls) -> dict[str, dict]:
        """The arms `experiments.compare` runs for this method: arm name -> settings
        beyond `method` ("@density" / "@mask": PruneFL's final density / mask, same seed).
        By default the paper's (cold) start and the equal server phase ("-warm")."""
        return {cls.name: {}, f"{cls.name}-warm": {"warm-start": True}}

    def check_train_reply(self, arrays, metrics, expected: Expected) -> TrainUpdate:
        """A train reply's parts (untrusted) as a `TrainUpdate`, or ReplyError saying why.
        The default: kept values as `fedprune.codec` lays them out; a method whose nodes
        reply in another form (top-k updates) decodes that here."""
        return check_train_reply(arrays, metrics, expected)

    def wants_importance(self, server_round: int) -> bool:
        """Whether the mask update at the end of this round uses the clients' importance."""
        return False

    def update_mask(
        self, server_round: int, importance: dict[str, torch.Tensor] | None, fixed: float
    ) -> Masks | None:
        """The mask after this round (None: unchanged). Called after averaging."""
        return None


def server_warm_start(settings: Settings, start: Start) -> dict:
    """With `warm-start`, train `start.model` dense on the server's share for PruneFL's
    phase-1 budget (`ip-max-iterations`, same data, batches, learning rate and seed as
    `fedprune.initial_pruning.initial_prune`), so that every method starts where PruneFL's
    server phase would have, without its pruning. Returns the summary's "warm_start"
    entry (empty without the setting)."""
    if not settings.warm_start:
        return {}
    t0 = time.time()
    cached = warm_start_file(settings) if settings.warm_start_cache else None
    from_cache = cached is not None and cached.is_file()
    if from_cache:
        start.model.load_state_dict(torch.load(cached))
        iterations = settings.ip_max_iterations
    else:
        iterations = warm_start(
            start.model,
            start.server_data,
            iterations=settings.ip_max_iterations,
            lr=settings.learning_rate,
            batch_size=settings.batch_size,
            local_steps=settings.local_steps,
            seed=settings.seed,
        )
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{os.getpid()}.tmp")
            torch.save(start.model.state_dict(), partial)
            partial.replace(cached)  # atomic: a reader never sees half a file
    _, train_acc = evaluate(start.model, start.server_data)
    info = {
        "iterations": iterations,
        "train_accuracy": train_acc,
        "wall_time_s": round(time.time() - t0, 3),
        "cached": from_cache,
    }
    log(INFO, "[fedprune] warm start: %d dense iterations on the server's %d examples "
        "(train accuracy %.3f, %.1f s%s)", iterations, len(start.server_data), train_acc,
        info["wall_time_s"], ", from the cache" if info["cached"] else "")  # fmt: skip
    return {"warm_start": info}


def warm_start_file(settings: Settings) -> Path:
    """Where `warm-start-cache` keeps this run's warm-started model: named by a digest of
    everything the server phase depends on (model and initialisation, data split, seed,
    iterations, batch, learning rate, local steps, the sources, torch and its threads)."""
    what = {
        "model": settings.model,
        "data": dataclasses.asdict(settings.server_data_spec()),
        "seed": settings.seed,
        "iterations": settings.ip_max_iterations,
        "lr": settings.learning_rate,
        "batch": settings.batch_size,
        "local_steps": settings.local_steps,
        "sources": source_digest(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    model = re.sub(r"[^A-Za-z0-9_.-]", "_", settings.model)  # may be "package.module:factory"
    name = f"warm-{model}-seed{settings.seed}-{digest}.pt"
    return Path(settings.warm_start_cache) / name
