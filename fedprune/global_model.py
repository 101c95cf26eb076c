"""The server's global model: dense weights, the mask, and their versions.

The server keeps a dense copy of every weight: a pruned position keeps the last value it
had, so a parameter that grows back can restart from it (the paper) or from 0. Two
counters say what changed:
- `mask_version` goes up when the mask changes (a node holding an older mask must get the
  new one before it can place kept values);
- `model_version` goes up whenever any weight or the mask changes, so anything encoded
  from the model (a message payload) can be cached by it and never sent stale.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedprune.masks import Masks, density

REGROW_INITS = ("last", "zero")


class GlobalModel:
    """Dense global weights plus bool masks over the prunable ones.

    params: every parameter by state_dict name (float32; pruned positions ignored).
    masks: the prunable weights' masks (True = kept), a subset of `params`' keys.
    regrow_init: a parameter that grows back starts from its last value ("last", the
        paper) or from 0 ("zero").
    """

    def __init__(
        self, params: Mapping[str, torch.Tensor], masks: Masks, regrow_init: str = "last"
    ) -> None:
        if regrow_init not in REGROW_INITS:
            raise ValueError(f"regrow_init = {regrow_init!r}; choose one of {REGROW_INITS}")
        extra = sorted(set(masks) - set(params))
        if extra:
            raise ValueError(f"masks for parameters the model does not have: {extra}")
        self.params = {k: v.detach().clone().float() for k, v in params.items()}
        self.masks = {k: m.clone().bool() for k, m in masks.items()}
        self.shapes = {k: tuple(v.shape) for k, v in self.params.items()}
        self.regrow_init = regrow_init
        self.mask_version = 0
        self.model_version = 0
        self.previous_masks: Masks | None = None  # version mask_version - 1, for changes
        self._kept_index: dict[str, torch.Tensor] = {}
        self._density: float | None = None

    @property
    def never_pruned(self) -> int:
        """Parameters that are never pruned (biases, ...)."""
        return sum(v.numel() for k, v in self.params.items() if k not in self.masks)

    def density(self) -> float:
        """Kept fraction of the whole model, biases included (counted once per mask
        version: a round asks several times)."""
        if self._density is None:
            self._density = density(self.masks, always_kept=self.never_pruned)
        return self._density

    def kept_counts(self) -> dict[str, int]:
        """Kept parameters per prunable weight."""
        return {k: len(self.kept_index(k)) for k in self.masks}

    def kept_index(self, name: str) -> torch.Tensor:
        """Flat positions of the kept entries of a prunable parameter (ascending: the
        order of its kept values on the wire). Cached per mask version."""
        if name not in self._kept_index:
            self._kept_index[name] = torch.nonzero(self.masks[name].reshape(-1)).squeeze(1)
        return self._kept_index[name]

    def kept_values(self) -> dict[str, torch.Tensor]:
        """The values the nodes are sent, per parameter (1-D, wire order): the kept ones of
        a prunable parameter, the whole flattened tensor otherwise."""
        return {
            k: v.reshape(-1)[self.kept_index(k)] if k in self.masks else v.reshape(-1).clone()
            for k, v in self.params.items()
        }

    def masked_params(self) -> dict[str, torch.Tensor]:
        """The model as the nodes see it: exact zeros at pruned positions."""
        return {
            k: v * self.masks[k] if k in self.masks else v.clone() for k, v in self.params.items()
        }

    def set_kept(self, values: Mapping[str, torch.Tensor]) -> None:
        """Write kept values (1-D, wire order, for every parameter) into the weights;
        pruned positions keep their last value."""
        for name, v in values.items():
            if name in self.masks:
                self.params[name].view(-1)[self.kept_index(name)] = v.to(torch.float32)
            else:
                self.params[name] = v.reshape(self.shapes[name]).to(torch.float32).clone()
        self.model_version += 1

    def install_masks(self, masks: Masks) -> tuple[int, int]:
        """Adopt `masks`; return (grown, removed) parameter counts. A changed mask is a new
        mask version; an unchanged one changes nothing."""
        grown = sum(int(torch.count_nonzero(new & ~self.masks[k])) for k, new in masks.items())
        removed = sum(int(torch.count_nonzero(self.masks[k] & ~new)) for k, new in masks.items())
        if grown == 0 and removed == 0:
            return 0, 0
        if self.regrow_init == "zero":
            for k, new in masks.items():
                self.params[k] = torch.where(new & ~self.masks[k], 0.0, self.params[k])
        self.previous_masks = self.masks
        self.masks = {k: m.clone().bool() for k, m in masks.items()}
        self._kept_index.clear()
        self._density = None
        self.mask_version += 1
        self.model_version += 1
        return grown, removed

    def state_dict(self) -> dict:
        return {
            "params": {k: v.clone() for k, v in self.params.items()},
            "masks": {k: m.clone() for k, m in self.masks.items()},
            "mask_version": self.mask_version,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Adopt a `state_dict()`; its layers and shapes must be this model's."""
        params, masks = state["params"], state["masks"]
        if set(params) != set(self.params) or set(masks) != set(self.masks):
            raise ValueError("the checkpoint's layers are not this model's")
        for k, v in params.items():
            if tuple(v.shape) != self.shapes[k]:
                raise ValueError(
                    f"{k}: shape {tuple(v.shape)} in the checkpoint, model has {self.shapes[k]}"
                )
        self.params = {k: v.clone().float() for k, v in params.items()}
        self.masks = {k: m.clone().bool() for k, m in masks.items()}
        self._kept_index.clear()
        self._density = None
        self.previous_masks = None  # no node of a new run holds an older version
        self.mask_version = int(state["mask_version"])
        self.model_version += 1
