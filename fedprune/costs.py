"""The round-time model: what one federated round costs, in seconds, as the mask changes.

    T(M) = fixed_s + sum_l kept_l * compute_l + comm_s_per_param * (values moved)

`compute_l` is the time one kept parameter of layer l adds to K local steps on the device,
`comm_s_per_param` the time to receive and send back one float32 value (8 bytes over the
link), `fixed_s` everything that does not scale with the mask. PruneFL's solver uses
t_l = compute_l + comm_s_per_param as the cost of keeping one parameter of layer l.

That linear model holds while every layer trains in one format. A measured profile also
knows, per layer, the format the device trains it in at each density (`LayerCost`): a
layer trains in its sparse format (CSR for a fully connected layer, the direct sparse
convolution for a convolution) up to a measured crossover density and masked dense above
it, and the two cost differently (sparse: a small fixed cost plus a time per kept
parameter; masked dense: about the same at every density). `compute_time_s`, the modelled
time, follows those pieces; the solver keeps the linear model of the sparse regime,
which is where a pruned model lives (`compute_l` is the slope of the format a layer trains
in at low density, `fixed_s` the round at zero kept parameters in those formats).

A profile is plain data, so a measured one drops in where the paper's constants are used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

# The paper's Raspberry Pi measurements for Conv-2 on FEMNIST, K = 5 (prunefl.md).
PAPER_CONV2_COMPUTE_S_PER_PARAM = (0.0, 7.1e-6, 1.93e-7, 1.78e-7)  # conv1, conv2, fc1, fc2
PAPER_COMM_S_PER_PARAM = 5.56e-6
PAPER_CONV2_DENSE_COMPUTE_S = 2.25
# Conv-2 with 62 classes: prunable weights per layer, to recover the fixed cost from the
# dense round time the paper reports.
_PAPER_CONV2_FEMNIST_NUMEL = (800, 51_200, 6_422_528, 126_976)
PAPER_CONV2_FIXED_S = PAPER_CONV2_DENSE_COMPUTE_S - sum(
    n * t for n, t in zip(_PAPER_CONV2_FEMNIST_NUMEL, PAPER_CONV2_COMPUTE_S_PER_PARAM, strict=True)
)

BYTES_PER_VALUE_ROUND_TRIP = 8  # one float32 down plus one float32 up


@dataclass(frozen=True)
class LayerCost:
    """What one prunable layer costs a round of local training, by the format it trains in.

    The layer trains in its sparse format `sparse_format` ("csr" for a fully connected
    layer, "sparse-conv" for a convolution; `fedprune.sparse.FORMATS`) while its density
    (kept / numel) is at most `sparse_max_density`, as `fedprune.sparse.choose_formats`
    decides from the profiler's crossovers, and masked dense above it;
    `sparse_max_density` 0 means never sparse (layers with no sparse kernel here, or where
    it never wins). Each format costs `*_fixed_s + *_s_per_param * kept` seconds per round
    (K steps): for masked dense the slope is about 0, the whole dense layer is computed
    whatever the mask.
    """

    numel: int
    dense_s_per_param: float
    dense_fixed_s: float
    sparse_max_density: float = 0.0
    sparse_s_per_param: float = 0.0
    sparse_fixed_s: float = 0.0
    sparse_format: str = "csr"

    def format_at(self, kept: int) -> str:
        """The format the layer trains in with `kept` parameters: `sparse_format` or
        "dense"."""
        sparse = self.sparse_max_density > 0 and kept <= self.sparse_max_density * self.numel
        return self.sparse_format if sparse else "dense"

    def seconds(self, kept: int) -> float:
        """Seconds this layer adds to a round with `kept` parameters, in its format then."""
        if self.format_at(kept) != "dense":
            return self.sparse_fixed_s + self.sparse_s_per_param * kept
        return self.dense_fixed_s + self.dense_s_per_param * kept

    def scaled(self, factor: float) -> LayerCost:
        """The same layer on a device `factor` times slower (the crossover unchanged)."""
        return replace(
            self,
            dense_s_per_param=self.dense_s_per_param * factor,
            dense_fixed_s=self.dense_fixed_s * factor,
            sparse_s_per_param=self.sparse_s_per_param * factor,
            sparse_fixed_s=self.sparse_fixed_s * factor,
        )

    def values(self) -> tuple[float, ...]:
        return (
            self.dense_s_per_param,
            self.dense_fixed_s,
            self.sparse_max_density,
            self.sparse_s_per_param,
            self.sparse_fixed_s,
        )

    def to_dict(self) -> dict:
        return {
            "numel": self.numel,
            "dense_s_per_param": self.dense_s_per_param,
            "dense_fixed_s": self.dense_fixed_s,
            "sparse_max_density": self.sparse_max_density,
            "sparse_s_per_param": self.sparse_s_per_param,
            "sparse_fixed_s": self.sparse_fixed_s,
            "sparse_format": self.sparse_format,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> LayerCost:
        """From `to_dict`'s output; also reads the "csr_*" keys written before sparse
        convolutions were measured (summary.json and checkpoints of older runs)."""

        def get(name: str) -> float:
            return float(d.get(f"sparse_{name}", d.get(f"csr_{name}", 0.0)))

        return cls(
            numel=int(d["numel"]),
            dense_s_per_param=float(d["dense_s_per_param"]),
            dense_fixed_s=float(d["dense_fixed_s"]),
            sparse_max_density=get("max_density"),
            sparse_s_per_param=get("s_per_param"),
            sparse_fixed_s=get("fixed_s"),
            sparse_format=str(d.get("sparse_format", "csr")),
        )


@dataclass(frozen=True)
class CostProfile:
    """Per-layer cost of a kept parameter on the (slowest) device, in seconds.

    compute_s_per_param: prunable weight name -> seconds per kept parameter for one round
        of local training (K steps).
    comm_s_per_param: seconds to move one float32 value down and one up.
    fixed_s: seconds per round that do not depend on the mask (with `layer_costs`: the
        round at zero kept parameters, each layer in its low-density format).
    layer_costs: prunable weight name -> its per-format cost (`LayerCost`), for the layers
        a device profile measured; `compute_time_s` then follows the format the layer
        trains in at its density. Empty (the paper's profiles): linear in kept parameters.
    """

    name: str
    compute_s_per_param: Mapping[str, float]
    comm_s_per_param: float
    fixed_s: float
    source: str = field(default="", compare=False)
    layer_costs: Mapping[str, LayerCost] = field(default_factory=dict)

    def time_per_param(self) -> dict[str, float]:
        """t_l of the solver: compute plus communication per kept parameter, seconds."""
        return {k: v + self.comm_s_per_param for k, v in self.compute_s_per_param.items()}

    def fixed_time_s(self, never_pruned_params: int) -> float:
        """The solver's constant: fixed cost plus moving the never-pruned parameters."""
        return self.fixed_s + never_pruned_params * self.comm_s_per_param

    def compute_time_s(self, kept: Mapping[str, int]) -> float:
        """Fixed cost plus K local steps of compute for the kept parameters, seconds.

        A layer with a `LayerCost` adds what it costs in the format it trains in at that
        density beyond its cost at zero kept (which `fixed_s` holds); one without adds
        its linear `compute_s_per_param` share. In the low-density format the two agree.
        """
        total = self.fixed_s
        for name, slope in self.compute_s_per_param.items():
            layer = self.layer_costs.get(name)
            if layer is None:
                total += kept[name] * slope
            else:
                total += layer.seconds(kept[name]) - layer.seconds(0)
        return total

    def layer_formats(self, kept: Mapping[str, int]) -> dict[str, str]:
        """Per layer with a `LayerCost`, the format it trains in with `kept` parameters."""
        return {name: layer.format_at(kept[name]) for name, layer in self.layer_costs.items()}

    def scaled(self, factor: float) -> CostProfile:
        """The profile of a device `factor` times slower at compute (same link)."""
        return replace(
            self,
            compute_s_per_param={k: v * factor for k, v in self.compute_s_per_param.items()},
            fixed_s=self.fixed_s * factor,
            layer_costs={k: v.scaled(factor) for k, v in self.layer_costs.items()},
        )

    def check(self) -> None:
        """ValueError unless every cost is finite and >= 0 and the link is > 0, and the
        layer costs (if any) are for the profile's layers."""
        costs = [*self.compute_s_per_param.values(), self.fixed_s]
        for layer in self.layer_costs.values():
            costs += layer.values()
        if not all(math.isfinite(v) and v >= 0 for v in costs):
            raise ValueError("compute and fixed costs must be finite and >= 0")
        if not (math.isfinite(self.comm_s_per_param) and self.comm_s_per_param > 0):
            raise ValueError(f"comm_s_per_param = {self.comm_s_per_param!r} is not > 0")
        if not set(self.layer_costs) <= set(self.compute_s_per_param):
            raise ValueError(
                f"layer costs for {sorted(set(self.layer_costs) - set(self.compute_s_per_param))}"
                " which the profile does not have"
            )

    def comm_time_s(self, bytes_moved: int) -> float:
        """Seconds to move `bytes_moved` bytes (down plus up) over the modelled link."""
        return bytes_moved * self.comm_s_per_param / BYTES_PER_VALUE_ROUND_TRIP

    def round_time_s(self, kept: Mapping[str, int], bytes_moved: int) -> float:
        """Modelled time of one round for a device that moved `bytes_moved` bytes."""
        return self.compute_time_s(kept) + self.comm_time_s(bytes_moved)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "compute_s_per_param": dict(self.compute_s_per_param),
            "comm_s_per_param": self.comm_s_per_param,
            "fixed_s": self.fixed_s,
            "source": self.source,
            "layer_costs": {k: v.to_dict() for k, v in self.layer_costs.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> CostProfile:
        return cls(
            name=str(d["name"]),
            compute_s_per_param={str(k): float(v) for k, v in d["compute_s_per_param"].items()},
            comm_s_per_param=float(d["comm_s_per_param"]),
            fixed_s=float(d["fixed_s"]),
            source=str(d.get("source", "")),
            layer_costs={
                str(k): LayerCost.from_dict(v) for k, v in d.get("layer_costs", {}).items()
            },
        )


def slowest(profiles: Iterable[CostProfile], name: str = "measured") -> CostProfile:
    """The element-wise slowest of some device profiles: per layer the largest compute
    time per kept parameter, the largest fixed cost and the slowest link. A synchronous
    round waits for its slowest node.

    Layer costs are kept for the layers every profile has them for: each cost the largest,
    and the sparse crossover the lowest (above it at least one node trains the layer
    masked dense, whose cost is then at least what the nodes still sparse pay, just below
    their own crossover); where the nodes' sparse formats differ, the layer counts as
    dense. For nodes that differ only by a speed factor (the simulation's
    heterogeneity) this is exactly the slowest node's profile; for different devices an
    upper bound on each layer's cost.
    """
    profiles = list(profiles)
    if not profiles:
        raise ValueError("no profiles to take the slowest of")
    layer_costs = {}
    for k in profiles[0].layer_costs:
        costs = [p.layer_costs.get(k) for p in profiles]
        if any(c is None for c in costs):
            continue
        same_format = len({c.sparse_format for c in costs}) == 1
        layer_costs[k] = LayerCost(
            numel=costs[0].numel,
            dense_s_per_param=max(c.dense_s_per_param for c in costs),
            dense_fixed_s=max(c.dense_fixed_s for c in costs),
            sparse_max_density=min(c.sparse_max_density for c in costs) if same_format else 0.0,
            sparse_s_per_param=max(c.sparse_s_per_param for c in costs),
            sparse_fixed_s=max(c.sparse_fixed_s for c in costs),
            sparse_format=costs[0].sparse_format,
        )
    return CostProfile(
        name=name,
        compute_s_per_param={
            k: max(p.compute_s_per_param[k] for p in profiles)
            for k in profiles[0].compute_s_per_param
        },
        comm_s_per_param=max(p.comm_s_per_param for p in profiles),
        fixed_s=max(p.fixed_s for p in profiles),
        source=f"element-wise slowest of {len(profiles)} measured node profiles",
        layer_costs=layer_costs,
    )


def paper_conv2(prunable: Sequence[str], positions: Mapping[str, int] | None = None) -> CostProfile:
    """The paper's measured Conv-2 constants, mapped onto the model's four prunable layers."""
    if len(prunable) != len(PAPER_CONV2_COMPUTE_S_PER_PARAM):
        raise ValueError(
            f"the paper-conv2 profile has {len(PAPER_CONV2_COMPUTE_S_PER_PARAM)} layers "
            f"(conv1, conv2, fc1, fc2); this model has {len(prunable)} prunable layers"
        )
    return CostProfile(
        name="paper-conv2",
        compute_s_per_param=dict(zip(prunable, PAPER_CONV2_COMPUTE_S_PER_PARAM, strict=True)),
        comm_s_per_param=PAPER_COMM_S_PER_PARAM,
        fixed_s=PAPER_CONV2_FIXED_S,
        source="PruneFL paper, Raspberry Pi, Conv-2 on FEMNIST, K=5",
    )


def paper_uniform(
    prunable: Sequence[str], positions: Mapping[str, int] | None = None
) -> CostProfile:
    """Any model: every layer costs the paper's fc1 slope, with the paper's link and
    fixed cost. For models the paper did not measure (the small test CNN)."""
    return CostProfile(
        name="paper-uniform",
        compute_s_per_param={name: PAPER_CONV2_COMPUTE_S_PER_PARAM[2] for name in prunable},
        comm_s_per_param=PAPER_COMM_S_PER_PARAM,
        fixed_s=PAPER_CONV2_FIXED_S,
        source="PruneFL paper's fc1 slope applied to every layer",
    )


# Conv-2's conv2 computes on 14x14 positions per image (28x28 input, one 2x2 pool before).
PAPER_CONV2_CONV_POSITIONS = 14 * 14


def paper_scaled(
    prunable: Sequence[str], positions: Mapping[str, int] | None = None
) -> CostProfile:
    """Any model, per layer type from the paper's Conv-2 constants: a fully connected
    weight at fc1's slope (1.93e-7 s); a convolution weight at conv2's slope (7.1e-6 s, 37x
    fc1's) times its output positions per image over conv2's 14 x 14 (a convolution weight
    does one multiply-add per output position, a fully connected one per example), with
    the paper's link and fixed cost.

    positions: per prunable weight, the output positions (height x width) per image of
    its convolution, 0 for a fully connected layer (`fedprune.models.output_positions`).
    """
    if positions is None or set(positions) != set(prunable):
        raise ValueError("the paper-scaled profile needs each prunable layer's output positions")
    conv, fc = PAPER_CONV2_COMPUTE_S_PER_PARAM[1], PAPER_CONV2_COMPUTE_S_PER_PARAM[2]
    return CostProfile(
        name="paper-scaled",
        compute_s_per_param={
            name: conv * positions[name] / PAPER_CONV2_CONV_POSITIONS if positions[name] else fc
            for name in prunable
        },
        comm_s_per_param=PAPER_COMM_S_PER_PARAM,
        fixed_s=PAPER_CONV2_FIXED_S,
        source="PruneFL paper's Conv-2 constants per layer type, convolutions scaled by "
        "output positions",
    )


PROFILES = {
    "paper-conv2": paper_conv2,
    "paper-uniform": paper_uniform,
    "paper-scaled": paper_scaled,
}


def named_profile(
    name: str, prunable: Sequence[str], positions: Mapping[str, int] | None = None
) -> CostProfile:
    """The profile `name` for a model with these prunable weights (`positions`: their
    output positions per image, which `paper-scaled` needs)."""
    if name not in PROFILES:
        raise ValueError(f"unknown cost profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name](prunable, positions)
