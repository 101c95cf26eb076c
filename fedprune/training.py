"""Masked local training and evaluation.

Only kept parameters change, and pruned weights stay exactly 0.0 whatever the optimiser
does (momentum, weight decay). The full gradient is still computed for every parameter,
because PruneFL's importance of a pruned parameter (whether it should grow back) is the
gradient at its current value, 0.

What a masked step costs beyond a plain one (measured on Conv-2, batch 20, 1 thread,
2026-12-01; a plain step is about 25 ms, most of it fc1's 6.4 M weights going through
memory): multiplying each gradient and each weight by a bool mask, every step, was two
extra passes over every prunable tensor with a bool-to-float conversion each (3.3 ms and
3.1 ms on fc1), and zeroing gradients in place instead of dropping them added a fill and
an accumulation pass (about 1.5 ms). `MaskedSGD` removes them: gradients are dropped
(`None`) between steps, and plain SGD applies the masked update in one pass over weight,
gradient and the 1-byte bool mask, `p = (p - lr * grad) where kept else 0`, with the
compiled kernel `fedprune.kernels.masked_sgd` (on fc1 1.0 ms against 0.84 ms for the
plain update; `p.addcmul_(grad, float_mask)` takes 1.4 ms plus 2 ms a round to convert
the mask). Where the kernels do not run (said once), the same update is made with torch
ops and float masks converted once per round. With momentum or weight decay, the
optimiser could move a pruned weight through its state, so that path masks gradient and
weight each step, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from fedprune import kernels
from fedprune.data import Examples


@dataclass
class LocalRound:
    """What one round of local training produced.

    num_examples: size of the local data set (the aggregation weight).
    steps: SGD steps taken; samples: examples drawn over those steps.
    loss: mean training loss over the steps.
    importance: per parameter (all of them, biases included), the square of the gradient
        summed over the steps, times the samples the round processed (K x B, as the
        reference code scales it, not the local data set's size, which would weigh
        large clients more under non-IID splits); None if not asked for.
    formats: per prunable weight name, the format its layer trained in ("dense", "csr",
        "sparse-conv"; see `fedprune.sparse.train_sparse`); None from `train_masked`.
    """

    num_examples: int
    steps: int
    samples: int
    loss: float
    importance: dict[str, torch.Tensor] | None
    formats: dict[str, str] | None = None


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


class MaskedSGD:
    """SGD (optionally with momentum and weight decay, as `torch.optim.SGD`) on the
    parameters of a model, where the parameters named in `masks` change at their kept
    positions only and are exactly 0.0 at pruned ones after every step.

    Parameters without a mask train plainly (biases, `SparseLinear.values`). Make one per
    round (masks are prepared at construction). Call `zero_grad()` before each backward
    pass and `step()` after it.
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        masks: Mapping[str, torch.Tensor],
        *,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        self.params = list(params.values())
        self.lr = float(lr)
        self.plain = momentum == 0 and weight_decay == 0
        # The fused kernel reads the bool mask itself; the torch path multiplies by masks
        # converted once here to the parameter's dtype.
        fused = self.plain and kernels.available()
        self.masked = []
        for n, p in params.items():
            # By parameter, not by mask: a mask whose layer is sparse names no parameter
            # here and is not read (`fedprune.sparse.LayerMasks` builds those on access).
            m = masks.get(n)
            if m is None:
                continue
            if fused and p.dtype in (torch.float32, torch.float64) and p.device.type == "cpu":
                self.masked.append((p, m.to(torch.bool).contiguous(), True))
            else:
                self.masked.append((p, m.to(device=p.device, dtype=p.dtype), False))
        masked_ids = {id(p) for p, _, _ in self.masked}
        self.unmasked = [p for p in self.params if id(p) not in masked_ids]
        self.opt = (
            None
            if self.plain
            else torch.optim.SGD(self.params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        )
        self._first = True

    def zero_grad(self) -> None:
        """Drop the gradients: the next backward pass writes them fresh, which is cheaper
        than zeroing them and then accumulating into zeros."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update from the gradients in `.grad` (parameters without one are left)."""
        if self.plain:
            for p, m, fused in self.masked:
                if p.grad is None:
                    continue
                if fused and p.is_contiguous() and p.grad.is_contiguous():
                    kernels.masked_sgd(p, p.grad, m, self.lr)
                    continue
                if fused:  # a non-contiguous parameter: the torch path, same result
                    m = m.to(p.dtype)
                p.addcmul_(p.grad, m, value=-self.lr)
                if self._first:  # pruned weights that came in nonzero; then they stay 0.0
                    p.mul_(m)
            for p in self.unmasked:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-self.lr)
        else:
            for p, m, _ in self.masked:
                if p.grad is not None:
                    p.grad.mul_(m)
            self.opt.step()
            for p, m, _ in self.masked:
                p.mul_(m)
        self._first = False


class Steps(NamedTuple):
    """What `masked_steps` did: mean loss, samples drawn, the summed gradient per
    parameter (None without importance tracking), and how many of the samples the model
    classified right as it trained on them (a running training accuracy, free: the
    logits exist anyway)."""

    loss: float
    samples: int
    grad_sum: dict[str, torch.Tensor] | None
    correct: int


def masked_steps(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    data: Examples,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    generator: torch.Generator,
    track_importance: bool,
) -> Steps:
    """The training loop of `train_masked` (and of `fedprune.sparse.train_sparse`, whose
    sparse layers' parameters simply have no mask). The summed gradients (every
    parameter, pruned positions included) are only formed when `track_importance` is
    set."""
    params = dict(model.named_parameters())
    opt = MaskedSGD(params, masks, lr=lr, momentum=momentum, weight_decay=weight_decay)
    grad_sum: dict[str, torch.Tensor] | None = {} if track_importance else None
    model.train()
    total_loss = 0.0
    samples = 0
    correct = torch.zeros((), dtype=torch.int64)
    for idx in batches(len(data), steps, batch_size, generator):
        opt.zero_grad()
        logits, labels = model(data.x[idx]), data.y[idx]
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        if grad_sum is not None:
            with torch.no_grad():
                for n, p in params.items():
                    if p.grad is None:
                        continue
                    if n in grad_sum:
                        grad_sum[n].add_(p.grad)
                    else:  # the first step's gradient is the sum so far: no zeros to add.
                        # Plain SGD leaves .grad as it is and the next zero_grad drops it,
                        # so the sum can own it; the masked path rewrites it in place.
                        grad_sum[n] = p.grad if opt.plain else p.grad.clone()
        opt.step()
        total_loss += loss.item()
        samples += len(idx)
        correct += (logits.detach().argmax(1) == labels).sum()
    opt.zero_grad()  # no stale gradients held beyond the round
    return Steps(total_loss / max(steps, 1), samples, grad_sum, int(correct))


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
    """K = `steps` SGD steps of batch `batch_size` on the kept parameters of `model`
    (`MaskedSGD`: pruned weights exactly 0.0 after the first step), and with
    `track_importance` the importance of every parameter, pruned positions included."""
    if len(data) == 0:
        raise ValueError("no local training data")
    loss, samples, grad_sum, _ = masked_steps(
        model,
        masks,
        data,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        generator=generator,
        track_importance=track_importance,
    )
    importance = None
    if grad_sum is not None:
        importance = squared_importance(grad_sum, model.named_parameters(), samples)
    return LocalRound(len(data), steps, samples, loss, importance)


def squared_importance(grad_sum, named_params, samples: int) -> dict[str, torch.Tensor]:
    """PruneFL's importance per parameter from the gradients summed over a round (in
    place): their square times the samples the round processed (K x B); zeros for a
    parameter without a summed gradient."""
    return {
        n: grad_sum[n].square_().mul_(samples) if n in grad_sum else torch.zeros_like(p)
        for n, p in named_params
    }


def train_as_clients(
    model: nn.Module,
    data: Examples,
    num_clients: int,
    train_one: Callable[[Examples, int], LocalRound],
) -> LocalRound:
    """Local rounds of `num_clients` clients on one node, as FedAvg over them would see it:
    client j trains (`train_one(its share, j)`) from the weights `model` holds now, on
    every `num_clients`-th example of `data` from the j-th; `model` ends with their mean
    weighted by share size, and the result's importance is their sum (the server sums the
    clients' importance), its loss their weighted mean, its samples their sum. One client
    is just `train_one(data, 0)`."""
    if num_clients <= 1:
        return train_one(data, 0)
    if len(data) < num_clients:
        raise ValueError(f"{len(data)} examples cannot be shared by {num_clients} clients")
    params = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}
    total = {n: torch.zeros_like(p) for n, p in start.items()}
    rounds: list[LocalRound] = []
    for j in range(num_clients):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
        share = Examples(data.x[j::num_clients], data.y[j::num_clients])
        local = train_one(share, j)
        with torch.no_grad():
            for n, p in params.items():
                total[n].add_(p, alpha=len(share) / len(data))
        rounds.append(local)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(total[n])
    importance = None
    if all(r.importance is not None for r in rounds):
        importance = {n: sum(r.importance[n] for r in rounds) for n in rounds[0].importance}
    return LocalRound(
        num_examples=len(data),
        steps=rounds[0].steps,
        samples=sum(r.samples for r in rounds),
        loss=sum(r.loss * r.num_examples for r in rounds) / sum(r.num_examples for r in rounds),
        importance=importance,
        formats=rounds[-1].formats,
    )


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
