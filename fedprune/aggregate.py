"""FedAvg on the kept positions, summed as replies come in.

Each valid reply adds `num_examples * values` into one running sum per parameter, where
`values` are only the kept values (1-D, wire order). So the server holds one
kept-values-sized sum per round, however many nodes reply, and never a dense copy per
reply. The caller adds replies in a fixed order (by client id), so float sums, and runs,
do not depend on arrival order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


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
