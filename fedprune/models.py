"""Models of the paper, a small one for fast tests, and a user's own by import path.

Every model is built as `factory(num_classes, input_shape)` for images shaped (batch,
channels, height, width), with `input_shape` = (channels, height, width) and
`num_classes` from the data (`fedprune.data.data_shape`: MNIST and FEMNIST are
(1, 28, 28), CIFAR-10 (3, 32, 32), a local data set whatever its images are).

`model` names one of `MODELS`, or an import path "package.module:factory" to a user's
factory of an `nn.Module` (docs/extending-data-and-models.md). Which parameters can be
pruned is decided here, once, by layer type: the weights of `nn.Conv2d` and `nn.Linear`
modules (and their subclasses). Biases, normalisation layers and every other layer are
never pruned: they are trained and exchanged dense (PruneFL keeps them dense: they are
few and cheap).

A model's state must be its parameters alone (no buffers): only parameters travel
between the server and the clients, so a buffer (batch norm's running statistics) would
differ on every node, never be aggregated, and break loading the server's state.
ResNet-18's batch norm therefore normalises with batch statistics and keeps no running
averages.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping

import torch
from torch import nn

from fedprune import kernels

PRUNABLE_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)

Shape = tuple[int, int, int]
MNIST_SHAPE: Shape = (1, 28, 28)
CIFAR_SHAPE: Shape = (3, 32, 32)


class _PoolPairs(torch.autograd.Function):
    """2x2 max-pooling with stride 2 by the compiled kernels (`fedprune.kernels.max_pool2`),
    in the input's memory format (NCHW or channels-last). The backward writes the output
    gradient at the recorded maxima and zeros elsewhere, plane by plane while each is in
    cache (no zero fill of the whole gradient first): windows do not overlap, so each
    input position gets at most one value, which is what torch's backward adds to its
    zeros."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        pooled, where = kernels.max_pool2(x, channels_last)
        ctx.save_for_backward(where)
        ctx.input_shape, ctx.channels_last = x.shape, channels_last
        return pooled

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises, never wrong
    def backward(ctx, grad: torch.Tensor):
        (where,) = ctx.saved_tensors
        return kernels.max_unpool2(grad, where, ctx.input_shape, ctx.channels_last), None


class _PoolInChannelsLast(torch.autograd.Function):
    """Non-overlapping max-pooling (window = stride, no padding) of an NCHW tensor,
    computed in channels-last memory and returned NCHW. The backward scatters the output
    gradient to the recorded maxima directly into an NCHW gradient, as `_PoolPairs`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, window: int) -> torch.Tensor:
        pooled, where = torch.nn.functional.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), window
        )
        ctx.save_for_backward(where.contiguous())  # flat h * W + w within each plane
        ctx.input_shape = x.shape
        return pooled.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (where,) = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        grad_x = grad.new_zeros(n, c, h * w)
        grad_x.scatter_(2, where.view(n, c, -1), grad.contiguous().view(n, c, -1))
        return grad_x.view(n, c, h, w), None


class MaxPool2d(nn.MaxPool2d):
    """`nn.MaxPool2d` with the same result, computed faster on the CPU.

    torch's CPU max-pooling of an NCHW tensor was 14x slower than of the same values in
    channels-last on this project's machines (3.4 against 0.24 ms for Conv-2's conv1
    output at batch 20 on one thread, torch 2.14), a fifth of a client's training step at
    the final mask. So non-overlapping windows (window = stride, no padding) are pooled:
    - 2x2 windows of float32 or float64: by the compiled kernels (`fedprune.kernels`), in
      the input's own memory format, with no copy to another layout and back, and a
      backward that zeroes and writes each plane while it is in cache (`python -m
      experiments.bench_pooling` measures it);
    - other windows, or where the kernels do not run here (they say why, once): in
      channels-last memory by torch, returned NCHW.
    Pooling does no arithmetic, so the values, the chosen maxima (ties included: every
    path takes the first in the window, and the last NaN) and the gradients are the same
    bits as torch's; tests/test_models.py checks it on real digits, whose blank
    background makes ties in most windows. The output has the input's memory format, as
    torch's, so the next layer computes exactly what it did. Overlapping windows, other
    inputs and export (tracing, scripting) take torch's own path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = self.kernel_size
        plain = (
            x.dim() == 4
            and x.device.type == "cpu"
            and isinstance(window, int)
            and self.stride in (window, (window, window))
            and self.padding in (0, (0, 0))
            and self.dilation in (1, (1, 1))
            and not self.ceil_mode
            and not self.return_indices
            and not torch.jit.is_scripting()
            and not torch.jit.is_tracing()
        )
        if not plain:
            return super().forward(x)
        nchw = x.is_contiguous()
        channels_last = not nchw and x.is_contiguous(memory_format=torch.channels_last)
        if (
            window == 2
            and (nchw or channels_last)
            and x.dtype in (torch.float32, torch.float64)
            and x.shape[2] * x.shape[3] < 2**31  # int32 indices within a plane
            and kernels.available()
        ):
            return _PoolPairs.apply(x, channels_last)
        if nchw and not x.is_contiguous(memory_format=torch.channels_last):
            return _PoolInChannelsLast.apply(x, window)
        return super().forward(x)


class TwoConvNet(nn.Module):
    """Conv-2's shape: two 5x5 convolutions with 2x2 max-pooling, then two fully
    connected layers. Images (batch, *input_shape)."""

    def __init__(
        self,
        channels1: int,
        channels2: int,
        hidden: int,
        num_classes: int,
        input_shape: Shape = MNIST_SHAPE,
    ) -> None:
        super().__init__()
        in_channels, height, width = input_shape
        self.conv1 = nn.Conv2d(in_channels, channels1, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(channels1, channels2, kernel_size=5, padding=2)
        self.pool = MaxPool2d(2)
        self.fc1 = nn.Linear((height // 4) * (width // 4) * channels2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pool, then ReLU: max-pooling commutes with any non-decreasing function, so this is
        # relu(conv) pooled, value for value, and its gradient is the same bits too (a
        # window whose maximum is <= 0 passes no gradient either way). The ReLU then runs,
        # and keeps its backward's output, on a quarter of the elements (conv1's output is
        # 2 MB at batch 20 on 28x28). In place on the pooled tensor, which max-pooling's
        # backward does not read. Not on fc1's output: a sparse fc1's output is a view made
        # inside an autograd Function, which torch forbids modifying in place.
        x = self.conv_block(self.conv1, x)
        x = self.conv_block(self.conv2, x)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)

    def conv_block(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """relu(pool(conv(x))), as `forward` runs each convolution (whose formats
        `fedprune.sparse.fastest_inference_formats` times through it)."""
        # A sparse convolution (`fedprune.sparse_conv.SparseConv2d`) pools and rectifies a
        # single sample without autograd straight from its kernel's buffer, with the same
        # bits (conv1's at density 0.1: 0.04 against 0.08 ms for the three steps, `python
        # -m experiments.bench_kernel_parts`). It answers None where that does not apply.
        fused = getattr(conv, "pooled_relu", None)
        if fused is not None and not torch.jit.is_tracing() and not torch.jit.is_scripting():
            y = fused(x)
            if y is not None:
                return y
        return torch.relu_(self.pool(conv(x)))


def conv2(num_classes: int = 10, input_shape: Shape = MNIST_SHAPE) -> TwoConvNet:
    """The paper's FEMNIST model: 32 and 64 channels, fc 3136 -> 2048 -> classes
    (on 28x28 images).

    With 62 classes it has 6,603,710 parameters; with 10 classes 6,497,162.
    """
    return TwoConvNet(32, 64, 2048, num_classes, input_shape)


def small_cnn(num_classes: int = 10, input_shape: Shape = MNIST_SHAPE) -> TwoConvNet:
    """Conv-2 in miniature (8 and 16 channels, fc 784 -> 64 on 28x28 images): the same
    layer kinds and order in about 55k parameters, so tests and smoke runs take seconds."""
    return TwoConvNet(8, 16, 64, num_classes, input_shape)


# VGG-11's convolutions: output channels, "M" for a 2x2 max-pool.
_VGG11_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG-11 as in the paper for CIFAR-10: eight 3x3 convolutions with ReLU and five
    max-pools, no batch norm, then a 512-512-classes head (dropout-free).

    With 10 classes on 32x32 images it has 9,750,922 parameters.
    """

    def __init__(self, num_classes: int = 10, input_shape: Shape = CIFAR_SHAPE) -> None:
        super().__init__()
        in_channels, height, width = input_shape
        if height < 32 or width < 32:
            raise ValueError(
                f"vgg11 pools five times by 2 and needs images of at least 32x32, "
                f"not {height}x{width}"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for item in _VGG11_LAYERS:
            if item == "M":
                layers.append(MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU()]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        flat = channels * (height // 32) * (width // 32)
        self.classifier = nn.Sequential(
            nn.Linear(flat, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg11(num_classes: int = 10, input_shape: Shape = CIFAR_SHAPE) -> VGG11:
    return VGG11(num_classes, input_shape)


def resnet18(num_classes: int = 10, input_shape: Shape = CIFAR_SHAPE) -> nn.Module:
    """torchvision's ResNet-18 in its CIFAR form: a 3x3 stride-1 stem convolution and no
    stem max-pool, so 32x32 images keep their resolution into the residual stages.

    Batch norm keeps no running statistics (`track_running_stats=False`): it normalises
    with the statistics of the batch, in training and evaluation alike, so the model's
    whole state is its parameters, the part the server and clients exchange. 11,173,962
    parameters with 10 classes.
    """
    import torchvision  # a few seconds to import; only when this model is built

    norm = functools.partial(nn.BatchNorm2d, track_running_stats=False)
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes, norm_layer=norm)
    model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS: dict[str, Callable[[int, Shape], nn.Module]] = {
    "conv2": conv2,
    "small-cnn": small_cnn,
    "vgg11": vgg11,
    "resnet18": resnet18,
}


IMPORT_PATH_HELP = (
    'an import path "package.module:factory" to a function factory(num_classes, '
    "input_shape) -> nn.Module, importable on the server and every node"
)


@functools.lru_cache(maxsize=16)
def model_factory(name: str) -> Callable[[int, Shape], nn.Module]:
    """The factory `name` names: one of MODELS, or an import path "package.module:factory"
    (the attribute may be dotted: "package.module:Class.build"). Raises ValueError saying
    why it cannot be used (unknown name, module not importable, not callable)."""
    if name in MODELS:
        return MODELS[name]
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"unknown model {name!r}; choose one of {sorted(MODELS)}, or give {IMPORT_PATH_HELP}"
        )
    try:
        target = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the user's module failing as it imports
        raise ValueError(
            f"cannot import module {module_name!r} of model {name!r}: "
            f"{type(exc).__name__}: {exc}. Put the module in the app's folder (the one "
            "with pyproject.toml) or install it, and give " + IMPORT_PATH_HELP
        ) from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module {module_name!r} has no {attribute!r} (model {name!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(
            f"model {name!r} is a {type(target).__name__}, not callable; give {IMPORT_PATH_HELP}"
        )
    return target


def check_model(model: nn.Module, num_classes: int, input_shape: Shape, name: str = "") -> None:
    """Raise ValueError unless `model` fits fedprune: an nn.Module whose state is its
    parameters (no buffers), with a prunable layer, mapping a batch of `input_shape`
    images to `num_classes` outputs. Runs one forward pass on two blank images."""
    label = f"model {name!r}" if name else "the model"
    if not isinstance(model, nn.Module):
        raise ValueError(f"{label} built a {type(model).__name__}, not a torch.nn.Module")
    extra = sorted(set(model.state_dict()) - {n for n, _ in model.named_parameters()})
    if extra:
        raise ValueError(
            f"{label} has state that is not a parameter: {extra[:5]}. Only parameters "
            "travel between the server and the clients, so buffers (e.g. batch norm's "
            "running statistics) would differ on every node; use "
            "nn.BatchNorm2d(..., track_running_stats=False), GroupNorm or LayerNorm, and "
            "no register_buffer (or persistent=False for constants)"
        )
    if not prunable_names(model):
        raise ValueError(f"{label} has no nn.Conv2d or nn.Linear layer: nothing to prune")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as exc:
        raise ValueError(
            f"{label} fails on a batch of images of shape {tuple(input_shape)} "
            f"(channels, height, width): {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"{label} maps 2 images to {found}, not (2, {num_classes}): its output layer "
            f"must have num_classes = {num_classes} outputs (one logit per class)"
        )


# Import-path models already checked in this process, by (name, classes, shape).
_CHECKED: set[tuple[str, int, Shape]] = set()


def build_model(
    name: str,
    num_classes: int = 10,
    seed: int | None = None,
    input_shape: Shape = MNIST_SHAPE,
) -> nn.Module:
    """Build model `name` (one of MODELS, or an import path, see `model_factory`) for
    images of `input_shape` (channels, height, width) and `num_classes` classes; with
    `seed`, its initial weights are reproducible. A user's model is checked
    (`check_model`) the first time this process builds it for a shape."""
    factory = model_factory(name)
    input_shape = tuple(input_shape)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if name in MODELS:
            return factory(num_classes, input_shape)
        try:
            model = factory(num_classes, input_shape)
        except Exception as exc:
            raise ValueError(
                f"model {name!r} fails to build as {name.partition(':')[2]}(num_classes="
                f"{num_classes}, input_shape={input_shape}): {type(exc).__name__}: {exc}"
            ) from exc
    key = (name, num_classes, input_shape)
    if key not in _CHECKED:
        check_model(model, num_classes, input_shape, name)
        _CHECKED.add(key)
    return model


def skeleton(name: str, num_classes: int = 10, input_shape: Shape = MNIST_SHAPE) -> nn.Module:
    """Model `name` without memory for its weights (meta tensors): its names and shapes, for
    `with_parameters` or `fedprune.sparse.model_in_formats` to fill. Nothing is
    initialised."""
    with torch.device("meta"):
        return build_model(name, num_classes, input_shape=input_shape)


def with_parameters(model: nn.Module, params: Mapping[str, torch.Tensor]) -> nn.Module:
    """`model` (often a `skeleton`) with `params` as its parameters, taken as they are,
    not copied (`load_state_dict(assign=True)`): a node that decodes a message into
    tensors then holds one copy of the model, not two. Every parameter must be given."""
    model.load_state_dict(params, assign=True)
    return model


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


@torch.no_grad()
def output_positions(model: nn.Module, input_shape: Shape) -> dict[str, int]:
    """Per prunable weight, the output positions (height x width) per image of its
    convolution, 0 for a fully connected layer: a convolution weight does one multiply-add
    per output position (`fedprune.costs.paper_scaled`). One forward pass of one image."""
    found: dict[str, int] = {}
    hooks = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            name = f"{module_name}.weight" if module_name else "weight"

            def record(_m, _inputs, out, name=name) -> None:
                found[name] = int(out.shape[-2] * out.shape[-1])

            hooks.append(module.register_forward_hook(record))
    training = model.training
    try:
        model.eval()
        model(torch.zeros(1, *input_shape))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return {name: found.get(name, 0) for name in prunable_names(model)}
