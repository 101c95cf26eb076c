"""Masked local training and evaluation.

Only kept parameters change: the gradient of a pruned entry is zeroed before the
optimiser step and the weight is re-zeroed after it, so pruned weights stay exactly 0.0
whatever the optimiser does (momentum, weight decay). The full gradient is still computed
for every parameter, because PruneFL's importance of a pruned parameter (whether it
should grow back) is the gradient at its current value, 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedprune.data import Examples


@dataclass
class LocalRound:
    """What one round of local training produced.

    num_examples: size of the local data set (the aggregation weight).
    steps: SGD steps taken; samples: examples drawn over those steps.
    loss: mean training loss over the steps.
    importance: per parameter (all of them, biases included), the square of the gradient
        summed over the steps, times num_examples; None if not asked for.
    """

    num_examples: int
    steps: int
    samples: int
    loss: float
    importance: dict[str, torch.Tensor] | None


def batches(n: int, steps: int, batch_size: int, generator: torch.Generator):
    """Index batches for `steps` SGD steps: epochs of a fresh permutation, in order."""
    batch_size = min(batch_size, n)
    order = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def train_masked(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    data: Examples,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    generator: torch.Generator,
    track_importance: bool = True,
) -> LocalRound:
    """K = `steps` SGD steps of batch `batch_size` on the kept parameters of `model`."""
    if len(data) == 0:
        raise ValueError("no local training data")
    params = dict(model.named_parameters())
    masked = [(params[name], mask) for name, mask in masks.items()]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    grad_sum = {n: torch.zeros_like(p) for n, p in params.items()} if track_importance else None
    model.train()
    total_loss = 0.0
    samples = 0
    for idx in batches(len(data), steps, batch_size, generator):
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
        loss.backward()
        with torch.no_grad():
            if grad_sum is not None:
                for n, p in params.items():
                    grad_sum[n].add_(p.grad)
            for p, mask in masked:
                p.grad.mul_(mask)
        opt.step()
        with torch.no_grad():
            for p, mask in masked:
                p.mul_(mask)
        total_loss += loss.item()
        samples += len(idx)
    importance = None
    if grad_sum is not None:
        importance = {n: g.square_().mul_(len(data)) for n, g in grad_sum.items()}
    return LocalRound(len(data), steps, samples, total_loss / max(steps, 1), importance)


@torch.no_grad()
def evaluate(model: nn.Module, data: Examples, batch_size: int = 500) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy in [0, 1]) of `model` on `data`."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        x, y = data.x[start : start + batch_size], data.y[start : start + batch_size]
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    n = max(len(data), 1)
    return loss_sum / n, correct / n
