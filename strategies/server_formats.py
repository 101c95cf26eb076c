"""The formats the server's own copies of the model compute in: its phase 1 training
(PruneFL's initial pruning) and its evaluation of the global model each round
(`GlobalEvaluation`).

As on the nodes (`layer-format`), a layer whose mask is sparse enough computes in its
sparse format (CSR, the direct sparse convolution) up to the crossover density this
machine measured, with the server's threads, and masked dense above it. The profile is
measured once per machine and model and then read from the disk cache
(`fedprune.profiler.cached_measurements`); in a simulation the server and the nodes share
the cache, each under its own thread count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from logging import INFO

import torch
from flwr.common.logger import log
from torch import nn

from fedprune.data import Examples
from fedprune.masks import Masks
from fedprune.models import build_model, skeleton
from fedprune.profiler import cached_measurements, sparse_crossovers
from fedprune.settings import Settings
from fedprune.sparse import choose_formats, model_in_formats
from fedprune.training import evaluate

FormatsFor = Callable[[Masks], dict[str, str]]

# Test images per forward pass: on Conv-2 in channels-last on 2 cores, 100 took 0.14 s per
# 1,000 images against 0.21 s for 500 (measured 2026-12-02).
EVAL_BATCH = 100


def server_formats(settings: Settings, num_classes: int, input_shape) -> FormatsFor:
    """The function that gives the server's layer formats for a mask (`layer-format`, as
    on the nodes): with "measured", each layer's sparse format up to the crossover density
    the server measured on itself (`fedprune.profiler.cached_measurements`, the layers
    only, with the server's threads: once per machine and model, then from the disk
    cache), else masked dense. The profile is read (or measured) at the first call, not
    before: a run checks its federation first."""
    shapes = skeleton(settings.model, num_classes, input_shape=input_shape)
    crossovers: dict | None = None

    def measured() -> dict:
        nonlocal crossovers
        if crossovers is None:
            t0 = time.time()
            model = build_model(settings.model, num_classes, input_shape=input_shape)
            measurements, cached = cached_measurements(
                model,
                settings.local_steps,
                settings.batch_size,
                settings.bandwidth_bytes_per_s,
                repeats=settings.profile_repeats,
                input_shape=tuple(input_shape),
                seed=settings.seed,
                formats_only=True,
            )
            crossovers = sparse_crossovers(measurements)
            log(
                INFO,
                "[fedprune] server's device profile (%s, %.1f s, %d threads): sparse "
                "formats up to %s",
                "from the cache" if cached else "measured",
                time.time() - t0,
                torch.get_num_threads(),
                ", ".join(f"{n} {f} {d:.3f}" for n, (f, d) in crossovers.items()) or "none",
            )
        return crossovers

    def formats_for(masks: Masks) -> dict[str, str]:
        if settings.layer_format != "measured":
            return choose_formats(shapes, masks, settings.layer_format)
        return choose_formats(shapes, masks, "measured", measured())

    return formats_for


class GlobalEvaluation:
    """The server's evaluation of the global model on its test split: (loss, accuracy) of
    the model the nodes are sent, its kept values under its masks, built at each call as
    a node builds it (`fedprune.sparse.model_in_formats`): each pruned layer in the format
    `formats_for` gives (None: dense), straight from its kept values, so the server never
    scans a dense copy of fc1 to find them; a dense layer holds 0.0 at its pruned
    positions. It computes in channels-last memory (torch's CPU convolutions, ReLU and
    pooling of a batch ran 1.5x faster in it than in NCHW on Conv-2).

    `new_skeleton()` gives the model without memory (`fedprune.models.skeleton`)."""

    def __init__(
        self,
        new_skeleton: Callable[[], nn.Module],
        data: Examples,
        formats_for: FormatsFor | None = None,
    ) -> None:
        self.new_skeleton, self.data, self.formats_for = new_skeleton, data, formats_for

    def __call__(self, kept: Mapping[str, torch.Tensor], masks: Masks) -> tuple[float, float]:
        """(mean loss, accuracy) of the model with values `kept` (per parameter, 1-D: a
        prunable weight's kept values in position order, as `GlobalModel.kept_values`)
        under `masks`."""
        formats = self.formats_for(masks) if self.formats_for is not None else {}
        model = model_in_formats(self.new_skeleton(), kept, masks, formats)
        model = model.to(memory_format=torch.channels_last)
        return evaluate(model, self.data, batch_size=EVAL_BATCH)
