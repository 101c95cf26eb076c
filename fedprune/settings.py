"""One typed settings object, validated once from the run config.

Every tunable value of a run is a field here, with its run-config key (kebab-case, as in
`[tool.flwr.app.config]` of pyproject.toml), its type and its allowed range. A bad value
stops the run at start with a message naming the key. The defaults here are the ones in
pyproject.toml (a test keeps the two equal).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedprune.aggregate import AGGREGATIONS
from fedprune.costs import PROFILES
from fedprune.data import DATASETS, PARTITIONERS, DataSpec
from fedprune.models import model_factory
from fedprune.sparse import LAYER_FORMATS
from fedprune.value_code import VALUE_CODES

# How importance reaches the server: "reconfig" (the paper) has every node accumulate it
# over the rounds and upload it when the server reconfigures, which needs every node in
# every round; "every-round" has each sampled node upload the importance of its round and
# the server accumulate it; "auto" picks "reconfig" when all nodes take part, else
# "every-round".
IMPORTANCE_UPLOADS = ("auto", "reconfig", "every-round")


# TEST ONLY: what a hostile node plays in `simulate-attacks` (only the hostile ClientApp of
# `experiments.hostile` reads it; the project's own ClientApp ignores it).
ATTACKS = ("num-partitions", "client-id", "num-examples", "values", "importance")


# Keys that were renamed or replaced: a run config that still has one gets told what to
# write instead (not just "unknown setting").
REPLACED_KEYS = {
    "sparse-training": (
        "'layer-format' replaces it: 'measured' (the default: each layer trains in the format "
        "the node's own profile measured faster at its density), 'dense' (masked dense "
        "everywhere, what sparse-training=false did) or 'sparse' (every layer in its sparse "
        "format, for benchmarks)"
    ),
}


class SettingsError(ValueError):
    """A run-config value that cannot be used; the message names the key."""


def _opt(default: Any, check: Callable[[Any], bool] | None = None, why: str = "", **kw) -> Any:
    return field(default=default, metadata={"check": check, "why": why, **kw})


def _in(choices) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), f"one of {sorted(choices)}"


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


def _fraction_open(v) -> bool:
    return 0 < v < 1


def _fraction_closed(v) -> bool:
    return 0 <= v <= 1


def parse_factors(text: str) -> list[float]:
    """Comma-separated positive numbers ("1, 2.5,1") as floats; "" gives []. Raises
    ValueError on a bad entry."""
    if not text.strip():
        return []
    values = [float(part) for part in text.split(",")]
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"not all positive and finite: {text!r}")
    return values


def _parses(parse: Callable[[str], Any]) -> Callable[[str], bool]:
    """A check that `parse` accepts the text."""

    def ok(text: str) -> bool:
        try:
            parse(text)
        except ValueError:
            return False
        return True

    return ok


def parse_ids(text: str) -> set[int]:
    """Comma-separated non-negative integers ("0, 3") as a set; "" gives an empty set."""
    if not text.strip():
        return set()
    ids = {int(part) for part in text.split(",")}
    if any(i < 0 for i in ids):
        raise ValueError(f"negative id in {text!r}")
    return ids


def parse_attacks(text: str) -> dict[int, tuple[str, ...]]:
    """TEST ONLY. "attack@partition-id" pairs, comma-separated ("values@3, importance@3"),
    as partition id -> its attacks (names in ATTACKS); "" gives {}. ValueError on a bad
    entry."""
    attacks: dict[int, tuple[str, ...]] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, _, pid = entry.partition("@")
        if name not in ATTACKS or not pid.strip().isdigit():
            raise ValueError(f"{entry!r} is not attack@partition-id with an attack of {ATTACKS}")
        attacks[int(pid)] = (*attacks.get(int(pid), ()), name)
    return attacks


@dataclass(frozen=True)
class Settings:
    """All settings of a run. Field `foo_bar` is run-config key `foo-bar`."""

    # --- federated rounds
    num_server_rounds: int = _opt(40, _positive, "a positive integer")
    clients_per_round: int = _opt(
        0, _non_negative, "a non-negative integer (0: every node of the federation)"
    )
    num_clients: int = _opt(
        0, _non_negative, "a non-negative integer (0: as many as the nodes report)"
    )
    fraction_train: float = _opt(0.0, _fraction_closed, "in [0, 1] (0: use clients-per-round)")
    # The paper's main job trains 10 clients per round. A simulation with fewer nodes
    # (Flower's default local federation has 2) has each node train as several of those
    # clients, one local round each on its share of the node's data, and reply with their
    # mean, so that the job is the paper's whatever the federation's size. Deployments:
    # one client per node, always (the devices are real).
    simulated_clients: int = _opt(
        10, _non_negative, "a non-negative number of clients (0: one client per node)"
    )
    importance_upload: str = _opt("auto", *_in(IMPORTANCE_UPLOADS))
    fraction_evaluate: float = _opt(0.0, _fraction_closed, "in [0, 1]")
    round_timeout_s: float = _opt(600.0, _positive, "positive seconds")
    min_replies: int = _opt(1, _positive, "a positive number of valid replies")
    node_wait_s: float = _opt(120.0, _positive, "positive seconds to wait for the nodes")
    node_auth: bool = _opt(False)  # the SuperLink authenticates nodes: bind client ids for good
    importance_code: str = _opt("coded", *_in({"coded", "exact"}))
    # Kept values as float32 ("exact") or as quantised changes both ways (fedprune.value_code)
    value_code: str = _opt("exact", *_in(VALUE_CODES))
    # --- what the server believes of the nodes (docs/threat-model.md)
    examples_from_split: bool = _opt(True)  # nodes hold the configured split: bound by it
    max_examples_per_node: int = _opt(
        0, _non_negative, "a non-negative number of examples (0: no bound below 10^9)"
    )
    aggregation: str = _opt("mean", *_in(AGGREGATIONS))
    clip_multiple: float = _opt(2.0, _positive, "a positive multiple of the median norm")
    trim_fraction: float = _opt(0.2, lambda v: 0 <= v < 0.5, "in [0, 0.5)")
    # 1, from measurement (experiments/results/bench_mainjob_window.md): on the main job the
    # paper's accuracy (0.966 for 0 and 1), 0.45x FedAvg's device time per round (0: 0.63x)
    importance_window: int = _opt(
        1, _non_negative, "a non-negative number of rounds (0: every round since the last update)"
    )
    # --- model and data
    # A name in fedprune.models.MODELS or "package.module:factory"; see __post_init__.
    model: str = _opt("conv2")
    dataset: str = _opt("mnist", *_in(DATASETS))
    data_source: str = _opt(
        "", None, "a local copy of the data set (empty: embedded mnist or the hub)"
    )
    # The server's test split and initial-pruning share (empty: data-source's).
    server_data_source: str = _opt("", None, "the server's local data (empty: data-source)")
    partitioner: str = _opt("iid", *_in(PARTITIONERS))
    dirichlet_alpha: float = _opt(0.5, _positive, "positive")
    shards_per_client: int = _opt(2, _positive, "a positive integer")
    test_fraction: float = _opt(0.2, _fraction_open, "in (0, 1)")
    server_fraction: float = _opt(0.1, _fraction_open, "in (0, 1)")
    # --- local training (the paper: K = 5, batch 20, no momentum)
    local_steps: int = _opt(5, _positive, "a positive integer")
    batch_size: int = _opt(20, _positive, "a positive integer")
    learning_rate: float = _opt(0.1, _positive, "positive")
    momentum: float = _opt(0.0, lambda v: 0 <= v < 1, "in [0, 1)")
    weight_decay: float = _opt(0.0, _non_negative, "non-negative")
    # --- phase 1: initial pruning on the server's own data
    initial_pruning: bool = _opt(True)
    ip_interval: int = _opt(50, _positive, "a positive number of iterations")
    ip_max_iterations: int = _opt(1000, _non_negative, "a non-negative number of iterations")
    ip_stop_window: int = _opt(5, _positive, "a positive number of reconfigurations")
    ip_stop_tolerance: float = _opt(0.1, _non_negative, "a non-negative fraction")
    # Equal starting points: every method trains the dense model on the server's share for
    # PruneFL's phase-1 budget (ip-max-iterations) first; PruneFL's phase 1 is its own.
    warm_start: bool = _opt(False)
    warm_start_cache: str = _opt(
        "", None, "a folder for warm-started models, reused by equal server phases (empty: none)"
    )
    # --- phase 2: reconfiguration during federated training
    reconfigure: bool = _opt(True)
    reconfig_interval: int = _opt(10, _positive, "a positive number of rounds")
    delta_initial: float = _opt(0.3, _fraction_closed, "in [0, 1]")
    delta_half_life: float = _opt(50.0, _positive, "a positive number of rounds")
    max_density: float = _opt(1.0, lambda v: 0 < v <= 1, "in (0, 1]")
    regrow_init: str = _opt("last", *_in({"last", "zero"}))
    cost_profile: str = _opt("paper-conv2", *_in({*PROFILES, "measured"}))
    # --- measured device costs, sparse training, simulated heterogeneity
    bandwidth_bytes_per_s: float = _opt(1438848.9, _positive, "positive bytes per second")
    # Each layer's training format: from the node's measured profile, or forced.
    layer_format: str = _opt("measured", *_in(LAYER_FORMATS))
    profile_repeats: int = _opt(2, _positive, "a positive number of timed rounds")
    speed_factors: str = _opt(
        "", _parses(parse_factors), "comma-separated positive numbers (empty: all 1)"
    )
    bandwidths: str = _opt(
        "",
        _parses(parse_factors),
        "comma-separated positive bytes per second (empty: all bandwidth-bytes-per-s)",
    )
    simulate_failures: str = _opt(
        "", _parses(parse_ids), "comma-separated partition ids whose training raises (empty: none)"
    )
    # TEST ONLY: hostile nodes for the attack bench (read by experiments.hostile's ClientApp)
    simulate_attacks: str = _opt(
        "",
        _parses(parse_attacks),
        f"comma-separated attack@partition-id, attacks one of {list(ATTACKS)} (empty: none)",
    )
    # --- the method (prunefl, or a baseline of the paper's comparison)
    # Checked against the registered methods by the server (strategies.methods).
    method: str = _opt("prunefl", lambda v: v != "", "a method name (strategies.methods)")
    target_density: float = _opt(
        0.0, _fraction_closed, "in [0, 1] (snip, iterative, feddst need it > 0)"
    )
    prune_steps: int = _opt(20, _positive, "a positive number of pruning steps")
    prune_ramp_rounds: int = _opt(0, _non_negative, "rounds (0: half of num-server-rounds)")
    mask_path: str = _opt("", None, "a mask.pt written by an earlier run (lottery)")
    lottery_init: str = _opt("original", *_in({"original", "random"}))
    # --- bookkeeping
    seed: int = _opt(0, _non_negative, "a non-negative integer")
    output_dir: str = _opt("outputs", lambda v: v != "", "a folder path")
    run_name: str = _opt("", lambda v: "/" not in v, "a name without '/' (empty: automatic)")
    checkpoint: bool = _opt(True)
    resume: str = _opt("", None, "a run folder with a checkpoint.pt (empty: a new run)")

    def __post_init__(self) -> None:
        # Checks that involve more than one key.
        try:
            model_factory(self.model)
        except ValueError as exc:
            raise SettingsError(f"setting 'model' = {self.model!r}: {exc}") from exc
        if self.partitioner == "writers" and self.dataset not in ("femnist", "local"):
            raise SettingsError(
                f"setting 'partitioner' = 'writers': {self.dataset!r} has no writers (femnist "
                "has, and a local data set with a writer_id column); use iid, dirichlet or "
                "shards"
            )
        if self.dataset == "local" and not (self.data_source or self.server_data_source):
            raise SettingsError(
                "setting 'data-source' is empty: dataset 'local' reads its images from it; "
                "give the absolute path of a datasets.save_to_disk folder, a parquet file "
                "or folder, or an image folder (train/<class>/*.png)"
            )
        if (
            self.num_clients
            and self.fraction_train == 0
            and (self.clients_per_round > self.num_clients)
        ):
            raise SettingsError(
                f"setting 'clients-per-round' = {self.clients_per_round} is more than "
                f"'num-clients' = {self.num_clients}; sample at most num-clients nodes"
            )

    def sample_size(self, num_clients: int) -> int:
        """Nodes sampled per round out of `num_clients`: `fraction-train` of them (at
        least 1) if set, else `clients-per-round` (every node if 0 or more than there are)."""
        if self.fraction_train > 0:
            return max(1, math.ceil(self.fraction_train * num_clients - 1e-9))
        return min(self.clients_per_round or num_clients, num_clients)

    def speed_factor(self, partition_id: int) -> float:
        """Multiplier of this partition's compute time (`speed-factors`, cycled)."""
        factors = parse_factors(self.speed_factors)
        return factors[partition_id % len(factors)] if factors else 1.0

    def bandwidth(self, partition_id: int) -> float:
        """This partition's link in bytes/s (`bandwidths`, cycled; else the default)."""
        values = parse_factors(self.bandwidths)
        return values[partition_id % len(values)] if values else self.bandwidth_bytes_per_s

    @staticmethod
    def key(field_name: str) -> str:
        return field_name.replace("_", "-")

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> Settings:
        """Validate a run config (Flower's `context.run_config`) into Settings.

        Unknown keys are errors too: a typo must not silently fall back to a default.
        """
        fields = {cls.key(f.name): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - set(fields))
        replaced = [key for key in unknown if key in REPLACED_KEYS]
        if replaced:
            raise SettingsError(
                "; ".join(f"setting {key!r} is gone: {REPLACED_KEYS[key]}" for key in replaced)
            )
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise SettingsError(
                f"unknown setting(s) {', '.join(hints)}; every setting is listed in "
                "[tool.flwr.app.config] of pyproject.toml and in docs/settings.md"
            )
        values = {}
        for key, f in fields.items():
            if key in config:
                values[f.name] = _coerce(key, config[key], type(f.default), f.metadata)
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        return {self.key(k): v for k, v in dataclasses.asdict(self).items()}

    def data_spec(self) -> DataSpec:
        return DataSpec(
            dataset=self.dataset,
            test_fraction=self.test_fraction,
            server_fraction=self.server_fraction,
            partitioner=self.partitioner,
            dirichlet_alpha=self.dirichlet_alpha,
            shards_per_client=self.shards_per_client,
            seed=self.seed,
            source=self.data_source,
        )

    def server_data_spec(self) -> DataSpec:
        """The spec of the server's data (its test split and initial-pruning share):
        `server-data-source` if set, else the clients' `data-source`."""
        return dataclasses.replace(
            self.data_spec(), source=self.server_data_source or self.data_source
        )


def _coerce(key: str, value: Any, kind: type, meta: Mapping[str, Any]) -> Any:
    def fail(reason: str) -> SettingsError:
        return SettingsError(f"setting {key!r} = {value!r}: {reason}")

    if kind is bool:
        if not isinstance(value, bool):
            raise fail("expected true or false")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise fail("expected an integer")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail("expected a number")
        value = float(value)
        if not math.isfinite(value):
            raise fail("expected a finite number")
    elif kind is str and not isinstance(value, str):
        raise fail("expected a string")
    check = meta.get("check")
    if check is not None and not check(value):
        raise fail(f"expected {meta['why']}")
    return value
