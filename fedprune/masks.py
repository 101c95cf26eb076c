"""Per-parameter boolean masks over the prunable weights.

A mask set is a `dict[str, torch.Tensor]` of dtype bool, keyed by the state_dict name of
each prunable weight ("fc1.weight"), True where the parameter is kept. Parameters that are
not in the dict (biases, norm layers) are never pruned.

`torch.nn.utils.prune` stores the same information as a float buffer `<param>_mask` next to
`<param>_orig`; `to_prune_state` / `from_prune_state` / `attach` convert to and from that
form so a mask found here can be used with PyTorch's own pruning utilities, and back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import prune

from fedprune.models import prunable_names

Masks = dict[str, torch.Tensor]


def full_masks(model: nn.Module) -> Masks:
    """All-kept masks (density 1) for every prunable weight of `model`."""
    params = dict(model.named_parameters())
    return {name: torch.ones_like(params[name], dtype=torch.bool) for name in prunable_names(model)}


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned entries of `model`'s weights in place (exactly 0.0)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)


def masked_state(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict:
    """A copy of `state` with pruned entries set to exactly 0."""
    return {k: (v * masks[k] if k in masks else v.clone()) for k, v in state.items()}


def kept_counts(masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {name: int(torch.count_nonzero(m)) for name, m in masks.items()}


def layer_densities(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Kept fraction per prunable weight."""
    return {name: int(torch.count_nonzero(m)) / max(m.numel(), 1) for name, m in masks.items()}


def density(masks: Mapping[str, torch.Tensor], always_kept: int = 0) -> float:
    """Overall kept fraction.

    `always_kept` adds parameters that are never pruned (biases) to both the kept count
    and the total, so the result is the fraction of the whole model that remains.
    """
    kept = sum(int(torch.count_nonzero(m)) for m in masks.values()) + always_kept
    total = sum(m.numel() for m in masks.values()) + always_kept
    return kept / max(total, 1)


def model_density(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of all of `model`'s parameters that are kept, biases included."""
    never_pruned = sum(p.numel() for n, p in model.named_parameters() if n not in masks)
    return density(masks, always_kept=never_pruned)


def check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError unless `masks` covers exactly `model`'s prunable weights."""
    expected = prunable_names(model)
    if list(masks) != expected:
        raise ValueError(f"masks cover {list(masks)}, model's prunable weights are {expected}")
    params = dict(model.named_parameters())
    for name, m in masks.items():
        if m.dtype != torch.bool or m.shape != params[name].shape:
            raise ValueError(
                f"mask {name!r} is {m.dtype} {tuple(m.shape)}, "
                f"expected torch.bool {tuple(params[name].shape)}"
            )


def to_prune_state(masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks in `torch.nn.utils.prune`'s buffer form: {"fc1.weight_mask": float 0/1}."""
    return {f"{name}_mask": m.to(torch.float32) for name, m in masks.items()}


def from_prune_state(
    state: Mapping[str, torch.Tensor], names: Iterable[str] | None = None
) -> Masks:
    """Masks from `*_mask` buffers (as written by `torch.nn.utils.prune` or `to_prune_state`).

    With `names`, exactly those masks are read and a missing one is an error.
    """
    if names is None:
        names = [k[: -len("_mask")] for k in state if k.endswith("_mask")]
    masks = {}
    for name in names:
        key = f"{name}_mask"
        if key not in state:
            raise KeyError(f"no {key!r} in the given state")
        masks[name] = state[key] != 0
    return masks


def attach(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Install `masks` on `model` with `torch.nn.utils.prune.custom_from_mask`, so that
    the model's forward pass uses `weight_orig * weight_mask` as PyTorch's pruning does."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module_name, _, param = name.rpartition(".")
        prune.custom_from_mask(modules[module_name], param, mask)
