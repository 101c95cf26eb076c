"""PruneFL: the server prunes the model on its own data (phase 1), then every few rounds
re-solves which parameters to keep from the clients' summed importance and the round-time
model (`fedprune.reconfigure`)."""

from __future__ import annotations

import time
from logging import INFO

import torch
from flwr.common.logger import log

from fedprune.initial_pruning import initial_prune
from fedprune.masks import Masks, model_density
from fedprune.reconfigure import reconfigure, stability_delta
from fedprune.settings import Settings
from fedprune.sparse import compact_formats
from strategies.method import Start
from strategies.sparse_fedavg import SparseFedAvg


class PruneFL(SparseFedAvg):
    """PruneFL's phase 2, after its initial pruning (`starting_point`).

    Parameters (besides SparseFedAvg's)
    ----------
    reconfig_interval : int (default: 10)
        Reconfigure every this many rounds; 0 never reconfigures.
    delta_initial, delta_half_life : float (default: 0.3, 50 rounds)
        Stability rule: delta = delta_initial * 0.5 ** (round / delta_half_life).
    max_density : float (default: 1.0)
        Upper bound on the kept fraction of prunable weights.
    """

    name = "prunefl"
    reads = ("initial-pruning", "ip-interval", "ip-max-iterations", "ip-stop-window",
             "ip-stop-tolerance", "reconfigure", "reconfig-interval", "delta-initial",
             "delta-half-life", "max-density")  # fmt: skip

    def __init__(
        self,
        *,
        reconfig_interval: int = 10,
        delta_initial: float = 0.3,
        delta_half_life: float = 50.0,
        max_density: float = 1.0,
        **kw,
    ) -> None:
        self.reconfig_interval = reconfig_interval
        self.delta_initial, self.delta_half_life = delta_initial, delta_half_life
        self.max_density = max_density
        super().__init__(**kw)

    @classmethod
    def options(cls, settings: Settings) -> dict:
        return {
            "reconfig_interval": settings.reconfig_interval if settings.reconfigure else 0,
            "delta_initial": settings.delta_initial,
            "delta_half_life": settings.delta_half_life,
            "max_density": settings.max_density,
        }

    @classmethod
    def starting_point(cls, settings: Settings, start: Start) -> tuple[Masks, dict]:
        """Phase 1: train and prune on the server's own data (unless turned off; then the
        dense model, warm-started as every method's with `warm-start`). Phase 1 is the
        server phase `warm-start` gives the others, so that setting changes nothing here."""
        if not (settings.initial_pruning and settings.ip_max_iterations):
            return super().starting_point(settings, start)
        return initial_pruning(settings, start)

    @classmethod
    def comparison_arms(cls) -> dict[str, dict]:
        return {
            "prunefl": {},
            "prunefl-ip-only": {"reconfigure": False},
            "prunefl-reconfig-only": {"initial-pruning": False},
            "prunefl-reconfig-only-warm": {"initial-pruning": False, "warm-start": True},
        }

    def wants_importance(self, server_round: int) -> bool:
        return self.reconfig_interval > 0 and server_round % self.reconfig_interval == 0

    def update_mask(
        self, server_round: int, importance: dict[str, torch.Tensor] | None, fixed: float
    ) -> Masks | None:
        if importance is None:
            return None
        delta = stability_delta(server_round, self.delta_initial, self.delta_half_life)
        model = self.model
        # With measured costs, self.profile is this round's slowest sampled node.
        result = reconfigure(
            {k: model.params[k] * model.masks[k] for k in model.masks},
            model.masks,
            importance,
            self.profile.time_per_param(),
            self.profile.fixed_time_s(model.never_pruned),
            fixed_importance=fixed,
            delta=delta,
            max_density=self.max_density,
            allow_regrowth=True,
        )
        log(
            INFO,
            "round %d: PruneFL reconfiguration (delta %.3f, cost profile %s): objective "
            "%.4g per s, modelled round %.2f s",
            server_round,
            delta,
            self.profile.name,
            result.objective,
            result.round_time_s,
        )
        return result.masks


def initial_pruning(settings: Settings, start: Start) -> tuple[Masks, dict]:
    """PruneFL's phase 1 on the server's own data; trains and prunes `start.model` in
    place and returns its masks and a summary of the phase."""

    t0 = time.time()
    # The formats trained in since the last reconfiguration, and when training began
    # (after the server's profile is read or measured: the time left is the training's).
    phase = {"formats": "dense", "training_since": None}

    def chosen(masks: Masks) -> dict[str, str]:
        formats = start.formats_for(masks) if start.formats_for else {}
        phase["formats"] = compact_formats(formats) or "dense"
        if phase["training_since"] is None:
            phase["training_since"] = time.time()
        return formats

    def progress(iteration: int, kept: int, total: int, acc: float) -> None:
        # A line, not a bar: the ServerApp's output reaches the user through Flower's log
        # stream (`flwr run --stream`, `flwr log`), not a terminal a bar could redraw.
        done = iteration / settings.ip_max_iterations
        spent = time.time() - (phase["training_since"] or t0)
        left = spent * (1 - done) / done if done else float("nan")
        log(
            INFO,
            "[fedprune] initial pruning: iteration %4d of at most %d (%3.0f%%, at most %.0f s "
            "left) | train acc %.3f | kept %s of %s prunable weights (%.4f) | trained as %s",
            iteration,
            settings.ip_max_iterations,
            100 * done,
            left,
            acc,
            f"{kept:,}",
            f"{total:,}",
            kept / total,
            phase["formats"],
        )

    phase1 = initial_prune(
        start.model,
        start.server_data,
        start.profile,
        num_classes=start.num_classes,
        lr=settings.learning_rate,
        batch_size=settings.batch_size,
        local_steps=settings.local_steps,
        interval=settings.ip_interval,
        max_iterations=settings.ip_max_iterations,
        window=settings.ip_stop_window,
        tolerance=settings.ip_stop_tolerance,
        delta=settings.delta_initial,
        max_density=settings.max_density,
        seed=settings.seed,
        on_reconfigure=progress,
        formats_for=chosen,
    )
    info = {
        "enabled": True,
        "iterations": phase1.iterations,
        "stopped_by": phase1.stopped_by,
        "density": model_density(start.model, phase1.masks),
        "wall_time_s": round(time.time() - t0, 3),
        "history": phase1.history,
    }
    log(
        INFO,
        "[fedprune] initial pruning stopped (%s) after %d iterations at density %.4f",
        phase1.stopped_by,
        phase1.iterations,
        info["density"],
    )
    return phase1.masks, info
