"""How a round's replies are combined: FedAvg on the kept positions, or a robust rule.

`mean` (the default, `KeptMean`): each valid reply adds `num_examples * values` into one
running sum per parameter, where `values` are only the kept values (1-D, wire order). So
the server holds one kept-values-sized sum per round, however many nodes reply, and never a
dense copy per reply. The caller adds replies in a fixed order (by client id), so float
sums, and runs, do not depend on arrival order.

The robust rules (`RobustRule`, `RobustKept`, `robust_importance`) bound what one hostile
node can do to the model and to the mask, coordinate by coordinate on the kept values:
- `clipped-mean`: each node's update (its kept values minus the global ones it was sent)
  is clipped in L2 norm to `clip_multiple` times the round's median update norm, then the
  clipped updates are averaged by samples;
- `trimmed-mean`: per coordinate, the `trim_fraction` largest and smallest values are
  dropped and the rest averaged (unweighted, as Flower's FedTrimmedAvg);
- `median`: per coordinate, the median (unweighted, as Flower's FedMedian).
They need all of a round's replies at once (kept values are small; importance is dense:
nodes x parameters float32 while the round is combined). `mean` stays streaming.

Flower 1.41 ships these rules as strategies (FedMedian, FedTrimmedAvg, the DP clipping
wrappers) that replace FedAvg's whole `aggregate_train` on dense ArrayRecords, which does
not fit a sparse reply checked part by part. What fits is their numerical kernels, on
numpy arrays stacked over nodes: `trim_mean` of `fedtrimmedavg` and `clip_inputs_inplace`
of `flwr.supercore.differential_privacy`; the server passes those in (`Kernels`), since
`fedprune/` imports no Flower. FedMedian's median is `np.median` inline (no function to
reuse), so it is `np.median` here. Krum, MultiKrum and Bulyan pick whole updates by
pairwise distances given an assumed number of attackers; they are not per-coordinate
rules and are not offered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

AGGREGATIONS = ("mean", "clipped-mean", "trimmed-mean", "median")


class KeptMean:
    """Running sample-weighted sum of kept values; `mean()` is FedAvg over them."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] | None = None
        self.weight = 0
        self.count = 0

    def add(self, num_examples: int, values: Mapping[str, torch.Tensor]) -> None:
        """Add one reply's kept values, weighted by its number of examples."""
        if num_examples <= 0:
            raise ValueError(f"num_examples = {num_examples} must be positive")
        if self.sums is None:
            self.sums = {k: torch.zeros(v.numel(), dtype=torch.float64) for k, v in values.items()}
        if set(values) != set(self.sums):
            raise ValueError("a reply's parameters differ from the round's first reply's")
        for name, v in values.items():
            # float64 sums: the average of many float32 replies stays exact to float32.
            self.sums[name].add_(v.reshape(-1), alpha=float(num_examples))
        self.weight += num_examples
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean per parameter (float32, 1-D); ValueError if nothing was added."""
        if self.sums is None or self.weight == 0:
            raise ValueError("no replies were added")
        return {k: (s / self.weight).to(torch.float32) for k, s in self.sums.items()}


class WeightedScalar:
    """Running sample-weighted mean of one number per reply (a loss, an accuracy)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.weight = 0

    def add(self, num_examples: int, value: float) -> None:
        self.total += num_examples * value
        self.weight += num_examples

    def mean(self) -> float:
        return self.total / self.weight if self.weight else float("nan")


@dataclass(frozen=True)
class Kernels:
    """The numerical kernels of the robust rules, on numpy arrays.

    trim_mean(stacked, fraction): the per-column trimmed mean of a (nodes, n) array,
        `fraction` of the rows cut at each end (Flower: `fedtrimmedavg.trim_mean`).
    clip_inplace(arrays, bound): scale the arrays in place so that their joint L2 norm is
        at most `bound` (Flower: `differential_privacy.clip_inputs_inplace`).
    """

    trim_mean: Callable[[np.ndarray, float], np.ndarray]
    clip_inplace: Callable[[list[np.ndarray], float], None]


@dataclass(frozen=True)
class RobustRule:
    """A way to combine one round's replies per coordinate (`name` in AGGREGATIONS).

    clip_multiple: `clipped-mean` clips each update's norm to this many times the round's
        median norm. trim_fraction: `trimmed-mean` cuts floor(fraction * replies) values
        at each end of every coordinate (with 0.2: 1 of 5 replies, 2 of 10).
    """

    name: str
    kernels: Kernels
    clip_multiple: float = 2.0
    trim_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.name not in AGGREGATIONS:
            raise ValueError(f"aggregation {self.name!r}; choose one of {AGGREGATIONS}")
        if not self.clip_multiple > 0:
            raise ValueError(f"clip_multiple = {self.clip_multiple} must be positive")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction = {self.trim_fraction} must be in [0, 0.5)")

    def combine(
        self, rows: Sequence[list[np.ndarray]], weights: Sequence[float]
    ) -> tuple[list[np.ndarray], int]:
        """One array per column of `rows` (rows[i][j]: node i's j-th 1-D array; every
        node's j-th has the same length) and how many rows were clipped. `weights` (e.g.
        samples) weigh the means; median and trimmed mean are unweighted. Rows may be
        scaled in place (clipped). Float64 results."""
        if not rows:
            raise ValueError("no replies were added")
        w = np.asarray(weights, dtype=np.float64)
        if len(w) != len(rows) or not np.all(w > 0):
            raise ValueError("one positive weight per row is needed")
        clipped = self._clip(rows) if self.name == "clipped-mean" else 0
        out = []
        for j in range(len(rows[0])):
            if self.name in ("mean", "clipped-mean"):
                total = np.zeros(rows[0][j].shape, dtype=np.float64)
                for wi, row in zip(w, rows, strict=True):
                    total += wi * row[j]
                out.append(total / w.sum())
                continue
            stacked = np.stack([row[j] for row in rows]).astype(np.float64, copy=False)
            if self.name == "median":
                out.append(np.median(stacked, axis=0))
            else:
                out.append(np.asarray(self.kernels.trim_mean(stacked, self.trim_fraction)))
        return out, clipped

    def _clip(self, rows: Sequence[list[np.ndarray]]) -> int:
        """Clip every row's joint norm to clip_multiple x the median norm; the count."""
        norms = np.array(
            [np.sqrt(sum(float(np.dot(a.astype(np.float64), a)) for a in row)) for row in rows]
        )
        bound = self.clip_multiple * float(np.median(norms))
        clipped = 0
        for row, norm in zip(rows, norms, strict=True):
            if norm <= bound:
                continue
            clipped += 1
            if bound == 0:  # most nodes did not move: neither may this one
                for a in row:
                    a *= 0
            else:
                self.kernels.clip_inplace(row, bound)
        return clipped


class RobustKept:
    """All of a round's kept values, combined by a `RobustRule` when asked (`mean()`): the
    same interface as `KeptMean`, but it holds every reply until then.

    base: the global kept values the nodes were sent (1-D per parameter, wire order); the
        rules act on updates, values minus base (translation does not change a median or
        a trimmed mean, and it is what clipping bounds).
    """

    def __init__(self, rule: RobustRule, base: Mapping[str, torch.Tensor]) -> None:
        self.rule = rule
        self.base = {k: v.reshape(-1).to(torch.float32) for k, v in base.items()}
        self.rows: list[list[np.ndarray]] = []
        self.weights: list[int] = []
        self.count = 0
        self.clipped = 0  # replies whose update was clipped (clipped-mean), after mean()

    def add(self, num_examples: int, values: Mapping[str, torch.Tensor]) -> None:
        """Keep one reply's kept values (and its number of examples, for the means)."""
        if num_examples <= 0:
            raise ValueError(f"num_examples = {num_examples} must be positive")
        if set(values) != set(self.base):
            raise ValueError("a reply's parameters differ from the model's")
        row = []
        for name, base in self.base.items():
            v = values[name].reshape(-1).to(torch.float32)
            if v.numel() != base.numel():
                raise ValueError(f"{name}: {v.numel()} values, the model has {base.numel()}")
            row.append((v - base).numpy())
        self.rows.append(row)
        self.weights.append(num_examples)
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        """The combined kept values per parameter (float32, 1-D); ValueError if empty."""
        combined, self.clipped = self.rule.combine(self.rows, self.weights)
        return {
            name: base + torch.from_numpy(update).to(torch.float32)
            for (name, base), update in zip(self.base.items(), combined, strict=True)
        }


def _flat_importance(item: Any) -> np.ndarray:
    """One layer's importance as a flat float32 array: a coded upload (anything with
    `dense()`, `fedprune.importance_code.ImportanceUpload`: 0 where the node sent nothing)
    or a dense tensor."""
    if hasattr(item, "dense"):
        return item.dense()
    return item.reshape(-1).to(torch.float32).numpy()


def robust_importance(
    rule: RobustRule,
    uploads: Sequence[tuple[int, Mapping[str, Any], float]],
    shapes: Mapping[str, Sequence[int]],
) -> tuple[dict[str, torch.Tensor], float, int]:
    """The importance uploads of one round combined by `rule`, on the scale of their sum.

    uploads: (examples the node is counted for, its importance per prunable parameter
    (dense tensors or coded uploads) and its fixed importance, both already weighted by
    those examples, as `mean` sums them).
    The rule acts on each node's importance per example (a node holding more data is no
    outlier for it), the fixed importance as one more coordinate; the result is multiplied
    by the examples counted in all, so it replaces the plain sum. Returns (importance per
    parameter, fixed importance, uploads clipped).
    """
    if not uploads:
        raise ValueError("no importance uploads")
    names = list(uploads[0][1])
    rows = []
    for n, importance, fixed in uploads:
        if list(importance) != names:
            raise ValueError("an upload's parameters differ from the round's first upload's")
        row = [_flat_importance(importance[name]) / n for name in names]
        rows.append([*row, np.array([fixed / n], dtype=np.float64)])
    weights = [n for n, _, _ in uploads]
    combined, clipped = rule.combine(rows, weights)
    total = float(sum(weights))
    out = {
        name: torch.from_numpy((a * total).astype(np.float32)).reshape(shapes[name])
        for name, a in zip(names, combined, strict=False)
    }
    return out, float(combined[-1][0] * total), clipped
