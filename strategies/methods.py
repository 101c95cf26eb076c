"""Every method a run can pick with the `method` setting, registered once.

A method is a policy in `fedprune/` plus a small `SparseFedAvg` subclass that names itself
(`name`), says which settings it reads and checks them, where it starts, and how its mask
changes. Adding one is adding its class to `REGISTERED` (see docs/extending.md).
"""

from __future__ import annotations

import difflib

from fedprune.settings import Settings, SettingsError
from strategies.baselines import FedAvgDense, FedDST, IterativeMagnitude, Lottery, Snip
from strategies.compression import TopKCompression
from strategies.fedrts import FedRTS
from strategies.prunefl import PruneFL
from strategies.sparse_fedavg import SparseFedAvg

REGISTERED: tuple[type[SparseFedAvg], ...] = (
    PruneFL,
    FedAvgDense,
    Snip,
    IterativeMagnitude,
    FedDST,
    Lottery,
    TopKCompression,
    FedRTS,
)
METHODS: dict[str, type[SparseFedAvg]] = {cls.name: cls for cls in REGISTERED}


def method_of(settings: Settings) -> type[SparseFedAvg]:
    """The strategy class of `settings.method`, after its own settings checks; a
    SettingsError that names the key (and the closest method name) otherwise."""
    cls = METHODS.get(settings.method)
    if cls is None:
        close = difflib.get_close_matches(settings.method, list(METHODS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SettingsError(
            f"setting 'method' = {settings.method!r} is not a method{hint} "
            f"(choose one of {sorted(METHODS)})"
        )
    cls.check_settings(settings)
    return cls


def ignored_settings(settings: Settings) -> list[str]:
    """Settings read only by other methods that this run sets away from their default:
    the chosen method ignores them, which the user should hear about."""
    ours = set(method_of(settings).reads)
    others = {key for cls in REGISTERED for key in cls.reads} - ours
    given, default = settings.to_run_config(), Settings().to_run_config()
    return sorted(key for key in others if given[key] != default[key])
