"""A user's own model, given to fedprune by import path ("tests.tiny_model:build")."""

from torch import nn


def build(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """A convolution and a linear layer for images of `input_shape` (channels, height,
    width), with one GroupNorm (parameters only, no buffers)."""
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 4, kernel_size=3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, num_classes),
    )


def with_buffers(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """A model fedprune must refuse: batch norm keeps running statistics (buffers)."""
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 4, kernel_size=3, padding=1),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * input_shape[1] * input_shape[2], num_classes),
    )


NOT_A_FACTORY = 42


def five_outputs(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """A model fedprune must refuse unless there are 5 classes: its output size is fixed."""
    channels, height, width = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, 5))
