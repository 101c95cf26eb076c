"""The baselines of the paper's comparison, as SparseFedAvg subclasses.

Each says only when it needs importance, how its mask changes, and (where it differs)
where it starts; the policies are pure functions in `fedprune.policies`.
"""

from __future__ import annotations

from logging import INFO

import torch
from flwr.common.logger import log

from fedprune import policies
from fedprune.masks import Masks, check_masks, from_prune_state
from fedprune.models import build_model, prunable_names
from fedprune.reconfigure import stability_delta
from fedprune.settings import Settings, SettingsError
from strategies.method import Start
from strategies.sparse_fedavg import SparseFedAvg


class FedAvgDense(SparseFedAvg):
    """Conventional FedAvg on the dense model, with the same byte accounting."""

    name = "fedavg"


class TargetDensity(SparseFedAvg):
    """A method that prunes to a given density (`target-density`, which it needs)."""

    reads = ("target-density",)

    @classmethod
    def comparison_arms(cls) -> dict[str, dict]:
        density = {"target-density": "@density"}
        return {cls.name: density, f"{cls.name}-warm": {**density, "warm-start": True}}

    @classmethod
    def check_settings(cls, settings: Settings) -> None:
        if settings.target_density <= 0:
            raise SettingsError(
                f"setting 'target-density' = {settings.target_density}: method "
                f"{cls.name!r} prunes to a given density; set it in (0, 1] (e.g. PruneFL's "
                "final density)"
            )


class Snip(TargetDensity):
    """SNIP: train round 1 dense, then prune once to `target_density` by |w * g| with the
    first round's aggregated gradients; the mask then stays fixed."""

    name = "snip"

    def __init__(self, *, target_density: float, **kw) -> None:
        super().__init__(**kw)
        self.target_density = target_density

    @classmethod
    def options(cls, settings: Settings) -> dict:
        return {"target_density": settings.target_density}

    def wants_importance(self, server_round: int) -> bool:
        return server_round == 1

    def update_mask(self, server_round, importance, fixed) -> Masks | None:
        if importance is None:
            return None
        log(INFO, "round %d: SNIP prunes to density %.4f", server_round, self.target_density)
        weights = {k: self.model.params[k] for k in self.masks}
        return policies.snip(weights, importance, self.target_density)


class IterativeMagnitude(TargetDensity):
    """Magnitude pruning during FL: `steps` geometric steps from dense to `target_density`
    over the first `ramp_rounds` rounds, each removing the smallest global |w|."""

    name = "iterative"
    reads = ("target-density", "prune-steps", "prune-ramp-rounds")

    def __init__(
        self, *, target_density: float, steps: int = 20, ramp_rounds: int = 10, **kw
    ) -> None:
        super().__init__(**kw)
        self.target_density, self.steps, self.ramp_rounds = target_density, steps, ramp_rounds

    @classmethod
    def options(cls, settings: Settings) -> dict:
        ramp = settings.prune_ramp_rounds or max(1, settings.num_server_rounds // 2)
        return {
            "target_density": settings.target_density,
            "steps": settings.prune_steps,
            "ramp_rounds": ramp,
        }

    def update_mask(self, server_round, importance, fixed) -> Masks | None:
        density = policies.iterative_density(
            server_round, self.target_density, self.steps, self.ramp_rounds
        )
        weights = self.model.masked_params()
        return policies.magnitude({k: weights[k] for k in self.masks}, self.masks, density)


class FedDST(TargetDensity):
    """FedDST: a random mask at `target_density` (Erdős-Rényi-Kernel layer densities);
    every `interval` rounds each layer drops its smallest-|w| share (delta, decaying like
    PruneFL's) and regrows as many by gradient magnitude."""

    name = "feddst"
    reads = ("target-density", "reconfig-interval", "delta-initial", "delta-half-life")

    def __init__(
        self, *, interval: int = 10, delta_initial: float = 0.3, delta_half_life: float = 50.0, **kw
    ) -> None:
        super().__init__(**kw)
        self.interval = interval
        self.delta_initial, self.delta_half_life = delta_initial, delta_half_life

    @classmethod
    def options(cls, settings: Settings) -> dict:
        return {
            "interval": settings.reconfig_interval,
            "delta_initial": settings.delta_initial,
            "delta_half_life": settings.delta_half_life,
        }

    @classmethod
    def starting_point(cls, settings: Settings, start: Start) -> tuple[Masks, dict]:
        _, info = super().starting_point(settings, start)  # the warm start, if set
        params = dict(start.model.named_parameters())
        names = prunable_names(start.model)
        shapes = {n: tuple(params[n].shape) for n in names}
        densities = policies.erk_densities(shapes, settings.target_density)
        generator = torch.Generator().manual_seed(settings.seed)
        return policies.random_masks(shapes, densities, generator), info

    def wants_importance(self, server_round: int) -> bool:
        return self.interval > 0 and server_round % self.interval == 0

    def update_mask(self, server_round, importance, fixed) -> Masks | None:
        if importance is None:
            return None
        fraction = stability_delta(server_round, self.delta_initial, self.delta_half_life)
        weights = self.model.masked_params()
        return policies.prune_and_regrow(
            {k: weights[k] for k in self.masks}, self.masks, importance, fraction
        )


class Lottery(SparseFedAvg):
    """The lottery-ticket check: train a mask found by an earlier run (`mask-path`) from
    the original initialisation or a fresh one (`lottery-init`); the mask never changes."""

    name = "lottery"
    reads = ("mask-path", "lottery-init")

    @classmethod
    def comparison_arms(cls) -> dict[str, dict]:
        return {
            f"lottery-{init}": {"mask-path": "@mask", "lottery-init": init}
            for init in ("original", "random")
        }

    @classmethod
    def check_settings(cls, settings: Settings) -> None:
        if not settings.mask_path:
            raise SettingsError(
                "setting 'mask-path' is empty: method 'lottery' trains a mask found by an "
                "earlier run; give the path of its mask.pt"
            )
        if settings.warm_start:
            raise SettingsError(
                "setting 'warm-start' = true: method 'lottery' tests an initialisation (the "
                "original or a fresh one), which a server phase would replace; set it false"
            )

    @classmethod
    def starting_point(cls, settings: Settings, start: Start) -> tuple[Masks, dict]:
        try:
            masks = from_prune_state(torch.load(settings.mask_path), prunable_names(start.model))
            check_masks(start.model, masks)
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise SettingsError(
                f"setting 'mask-path' = {settings.mask_path!r}: cannot use it: {exc}"
            ) from exc
        if settings.lottery_init == "random":
            # A fresh initialisation: same architecture, a seed no other run uses.
            fresh = build_model(
                settings.model,
                start.num_classes,
                seed=settings.seed + 1_000_003,
                input_shape=start.input_shape,
            )
            start.model.load_state_dict(fresh.state_dict())
        return masks, {"enabled": False}
