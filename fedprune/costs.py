"""The round-time model: what one federated round costs, in seconds, as the mask changes.

    T(M) = fixed_s + sum_l kept_l * compute_l + comm_s_per_param * (values moved)

`compute_l` is the time one kept parameter of layer l adds to K local steps on the device,
`comm_s_per_param` the time to receive and send back one float32 value (8 bytes over the
link), `fixed_s` everything that does not scale with the mask. PruneFL's solver uses
t_l = compute_l + comm_s_per_param as the cost of keeping one parameter of layer l.

A profile is plain data, so a measured one (per device, later) drops in where the paper's
constants are used today.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
class CostProfile:
    """Per-layer cost of a kept parameter on the (slowest) device, in seconds.

    compute_s_per_param: prunable weight name -> seconds per kept parameter for one round
        of local training (K steps).
    comm_s_per_param: seconds to move one float32 value down and one up.
    fixed_s: seconds per round that do not depend on the mask.
    """

    name: str
    compute_s_per_param: Mapping[str, float]
    comm_s_per_param: float
    fixed_s: float
    source: str = field(default="", compare=False)

    def time_per_param(self) -> dict[str, float]:
        """t_l of the solver: compute plus communication per kept parameter, seconds."""
        return {k: v + self.comm_s_per_param for k, v in self.compute_s_per_param.items()}

    def fixed_time_s(self, never_pruned_params: int) -> float:
        """The solver's constant: fixed cost plus moving the never-pruned parameters."""
        return self.fixed_s + never_pruned_params * self.comm_s_per_param

    def compute_time_s(self, kept: Mapping[str, int]) -> float:
        """Fixed cost plus K local steps of compute for the kept parameters, seconds."""
        return self.fixed_s + sum(kept[k] * t for k, t in self.compute_s_per_param.items())

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
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> CostProfile:
        return cls(
            name=str(d["name"]),
            compute_s_per_param={str(k): float(v) for k, v in d["compute_s_per_param"].items()},
            comm_s_per_param=float(d["comm_s_per_param"]),
            fixed_s=float(d["fixed_s"]),
            source=str(d.get("source", "")),
        )


def paper_conv2(prunable: Sequence[str]) -> CostProfile:
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


def paper_uniform(prunable: Sequence[str]) -> CostProfile:
    """Any model: every layer costs the paper's fc1 slope, with the paper's link and
    fixed cost. For models the paper did not measure (the small test CNN)."""
    return CostProfile(
        name="paper-uniform",
        compute_s_per_param={name: PAPER_CONV2_COMPUTE_S_PER_PARAM[2] for name in prunable},
        comm_s_per_param=PAPER_COMM_S_PER_PARAM,
        fixed_s=PAPER_CONV2_FIXED_S,
        source="PruneFL paper's fc1 slope applied to every layer",
    )


PROFILES = {"paper-conv2": paper_conv2, "paper-uniform": paper_uniform}


def named_profile(name: str, prunable: Sequence[str]) -> CostProfile:
    if name not in PROFILES:
        raise ValueError(f"unknown cost profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name](prunable)
