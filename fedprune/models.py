"""Models of the paper, plus a small one for fast tests.

Every model takes images shaped (batch, 1, 28, 28) with values in [0, 1]. Which parameters
can be pruned is decided here, once, by layer type: the weights of convolutions and fully
connected layers. Biases and normalisation layers are never pruned (PruneFL keeps them
dense: they are few and cheap).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

PRUNABLE_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


class TwoConvNet(nn.Module):
    """Conv-2's shape: two 5x5 convolutions with 2x2 max-pooling, then two fully
    connected layers. Images (batch, 1, 28, 28)."""

    def __init__(self, channels1: int, channels2: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels1, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(channels1, channels2, kernel_size=5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(7 * 7 * channels2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def conv2(num_classes: int = 10) -> TwoConvNet:
    """The paper's FEMNIST model: 32 and 64 channels, fc 3136 -> 2048 -> classes.

    With 62 classes it has 6,603,710 parameters; with 10 classes 6,497,162.
    """
    return TwoConvNet(32, 64, 2048, num_classes)


def small_cnn(num_classes: int = 10) -> TwoConvNet:
    """Conv-2 in miniature (8 and 16 channels, fc 784 -> 64): the same layer kinds and
    order in about 55k parameters, so tests and smoke runs take seconds."""
    return TwoConvNet(8, 16, 64, num_classes)


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "conv2": conv2,
    "small-cnn": small_cnn,
}


def build_model(name: str, num_classes: int = 10, seed: int | None = None) -> nn.Module:
    """Build a model by name; with `seed`, its initial weights are reproducible."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if seed is None:
        return MODELS[name](num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](num_classes)


def prunable_names(model: nn.Module) -> list[str]:
    """Names (as in `state_dict`) of the prunable weights, in model order."""
    return [
        f"{module_name}.weight" if module_name else "weight"
        for module_name, module in model.named_modules()
        if isinstance(module, PRUNABLE_LAYER_TYPES)
    ]


def param_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of all trainable parameters, in model order: the layout of the wire."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
