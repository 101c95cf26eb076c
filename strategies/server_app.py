"""The ServerApp: settings, data, the method's starting point, the rounds, the results.

main(grid, context) reads top to bottom:
  1. settings (a bad value stops here, naming the key), or a resumed run's;
  2. the model, the prior cost profile and the server's data (its share, the test split);
  3. the method's starting point (PruneFL: initial pruning on the server's share);
  4. the rounds (`strategy.start`), evaluating the global model on the test split and
     writing a checkpoint after each;
  5. metrics.csv, summary.json, the final model and mask, plots, an inference export.
"""

from __future__ import annotations

import os
import random
import time
from functools import partial
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedprune import protocol as P
from fedprune.costs import PAPER_CONV2_COMPUTE_S_PER_PARAM, CostProfile, named_profile
from fedprune.data import data_shape, heldout_split, server_share
from fedprune.importance import ImportanceCollector
from fedprune.models import (
    build_model,
    count_parameters,
    output_positions,
    prunable_names,
    skeleton,
)
from fedprune.reconfigure import stability_delta
from fedprune.sample_counts import ExampleBounds
from fedprune.settings import Settings, SettingsError
from strategies.accounting import RoundStats
from strategies.expected_examples import example_bounds
from strategies.method import Start
from strategies.methods import ignored_settings, method_of
from strategies.node_sampling import NodeSampler
from strategies.prompt_grid import in_simulation, prompt
from strategies.results import RunRecorder, inference_summary, train_formats_summary
from strategies.run_state import CheckpointFiles, resume_run, rng_state, set_rng_state
from strategies.server_formats import GlobalEvaluation, server_formats
from strategies.sparse_fedavg import SparseFedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    t0 = time.time()
    grid = prompt(grid)  # replies collected within 0.5 s deployed (not 3 s), 20 ms simulated
    settings, resumed, out_dir = load_run(context)
    method = method_of(settings)
    for key in ignored_settings(settings):
        log(WARNING, "[fedprune] setting %r is ignored by method %r", key, settings.method)
    torch.set_num_threads(os.cpu_count() or 1)  # the server may use every core
    seed_everything(settings.seed)
    start = starting_inputs(settings)
    round0 = RoundStats()  # the identity queries of the federation check
    sampler, nodes = check_federation(grid, settings, round0)
    train_config = {P.LEARNING_RATE: settings.learning_rate}
    stand_in = simulated_clients(grid, settings, nodes)
    if stand_in:
        train_config[P.SIMULATED_CLIENTS] = stand_in
    out_dir = (out_dir or Path(settings.output_dir) / run_name(settings)).resolve()
    log(INFO, "[fedprune] %s, %s parameters, server share %d, test split %d; output %s",
        settings.model, f"{count_parameters(start.model):,}", len(start.server_data),
        len(heldout_split(settings.server_data_spec())), out_dir)  # fmt: skip

    split = {"setup": time.time() - t0, "initial_pruning": 0.0}  # wall seconds, by phase
    if resumed is None:
        t1 = time.time()
        masks, phase1 = method.starting_point(settings, start)
        split["initial_pruning"] = time.time() - t1
        strategy = build_strategy(settings, method, start, masks, sampler)
    else:
        phase1 = resumed["initial_pruning"]
        strategy = build_strategy(settings, method, start, resumed["strategy"]["masks"], sampler)
        strategy.load_state_dict(resumed["strategy"])
        set_rng_state(resumed["rng"])
    strategy.stats[0] = round0
    round_end = RoundEnd(settings, strategy, out_dir, t0, phase1, resumed, start.formats_for)
    t2 = time.time()
    strategy.start(
        grid=grid,
        initial_arrays=strategy.global_arrays(),
        num_rounds=settings.num_server_rounds,
        timeout=settings.round_timeout_s,
        train_config=ConfigRecord(train_config),
        evaluate_fn=round_end,
        first_round=resumed["round"] + 1 if resumed else 1,
    )
    split["rounds"] = time.time() - t2 - round_end.evaluation_s - round_end.checkpoint_s
    split["evaluation"], split["checkpoints"] = round_end.evaluation_s, round_end.checkpoint_s
    round_end.finish(settings, strategy, start, phase1, resumed, split)


def load_run(context: Context) -> tuple[Settings, dict | None, Path | None]:
    """(settings, checkpoint state, run folder): a new run's settings, or those of the run
    named by `resume` with the state to go on from."""
    try:
        settings = Settings.from_run_config(context.run_config)
        method_of(settings)
    except SettingsError as exc:
        log(ERROR, "[fedprune] bad run config: %s", exc)
        raise
    if not settings.resume:
        return settings, None, None
    return resume_run(settings)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)


def run_name(settings: Settings) -> str:
    return (
        settings.run_name
        or f"{time.strftime('%Y%m%d-%H%M%S')}-{settings.model}-seed{settings.seed}"
    )


def starting_inputs(settings: Settings) -> Start:
    """The seeded model, the prior cost profile and the server's own data."""
    spec = settings.server_data_spec()
    num_classes, input_shape = data_shape(spec)
    try:
        model = build_model(
            settings.model, num_classes, seed=settings.seed, input_shape=input_shape
        )
    except ValueError as exc:
        raise SettingsError(
            f"setting 'model' = {settings.model!r} does not fit dataset {settings.dataset!r}: {exc}"
        ) from exc
    profile = prior_profile(settings, model, input_shape)
    formats_for = server_formats(settings, num_classes, input_shape)
    return Start(model, profile, server_share(spec), num_classes, input_shape, formats_for)


def prior_profile(settings: Settings, model: torch.nn.Module, input_shape) -> CostProfile:
    """The named cost profile; with `cost-profile = measured`, the paper's profile that
    fits the model (Conv-2's own, else its constants per layer type), used for initial
    pruning and until the first node has been profiled."""
    name, prunable = settings.cost_profile, prunable_names(model)
    if name == "measured":
        fits_conv2 = len(prunable) == len(PAPER_CONV2_COMPUTE_S_PER_PARAM)
        name = "paper-conv2" if fits_conv2 else "paper-scaled"
    try:
        return named_profile(name, prunable, output_positions(model, input_shape))
    except ValueError as exc:
        raise SettingsError(
            f"setting 'cost-profile' = {settings.cost_profile!r}: {exc}. Use "
            "cost-profile='paper-scaled' (the paper's Conv-2 constants per layer type) or "
            "'measured' (each node's own profile)"
        ) from exc


def check_federation(grid: Grid, settings: Settings, stats: RoundStats) -> tuple[NodeSampler, int]:
    """Wait for the federation and check that the run can use it, before any work: the
    nodes exist and hold data, and the importance upload fits how many train per round.
    Returns the sampler and the federation's size."""
    sampler = NodeSampler(
        seed=settings.seed,
        num_clients=settings.num_clients,
        wait_s=settings.node_wait_s,
        bind=settings.node_auth,
    )
    per_round = settings.clients_per_round if settings.fraction_train == 0 else 0
    nodes = len(sampler.federation(grid, per_round, stats.count))
    sample = settings.sample_size(nodes)
    if settings.fraction_train == 0 and settings.clients_per_round > nodes:
        log(WARNING, "[fedprune] clients-per-round = %d, but the federation has %d nodes: "
            "every node trains", settings.clients_per_round, nodes)  # fmt: skip
    try:
        ImportanceCollector(lambda r: False, 0).resolve_mode(
            settings.importance_upload, sample, nodes
        )
    except ValueError as exc:
        raise SettingsError(f"setting 'importance-upload': {exc}") from exc
    log(INFO, "[fedprune] federation: %d nodes, %d train per round", nodes, sample)
    return sampler, nodes


def simulated_clients(grid: Grid, settings: Settings, nodes: int) -> int:
    """How many clients the run stands for (`simulated-clients`), 0 for one per node: only
    in a simulation (Flower's in-memory grid; a deployment's devices are real) whose
    federation has fewer nodes than that. Says so once, with how to turn it off."""
    if not in_simulation(grid) or not 0 < nodes < settings.simulated_clients:
        return 0
    per_node = -(-settings.simulated_clients // nodes)
    log(INFO, "[fedprune] a simulation of %d nodes stands for simulated-clients = %d: each "
        "node trains as up to %d clients (one local round each, on its share of the node's "
        "data) and replies with their mean, so that a round is the paper's; "
        "simulated-clients = 0 trains one client per node", nodes, settings.simulated_clients,
        per_node)  # fmt: skip
    return settings.simulated_clients


def build_strategy(settings: Settings, method, start: Start, masks, sampler=None) -> SparseFedAvg:
    """The strategy of the run's method, with the settings every method shares."""
    params = {name: p.detach().clone() for name, p in start.model.named_parameters()}
    return method(
        params=params,
        masks=masks,
        profile=start.profile,
        clients_per_round=settings.clients_per_round,
        fraction_train=settings.fraction_train,
        num_clients=settings.num_clients,
        seed=settings.seed,
        importance_upload=settings.importance_upload,
        fraction_evaluate=settings.fraction_evaluate,
        regrow_init=settings.regrow_init,
        min_replies=settings.min_replies,
        measure_costs=settings.cost_profile == "measured",
        query_timeout_s=settings.round_timeout_s,
        importance_window=settings.importance_window,
        node_wait_s=settings.node_wait_s,
        sampler=sampler,
        aggregation=settings.aggregation,
        clip_multiple=settings.clip_multiple,
        trim_fraction=settings.trim_fraction,
        value_code=settings.value_code,
        example_bounds=(
            example_bounds(settings, sampler.identities)
            if sampler is not None
            else ExampleBounds(limit=settings.max_examples_per_node)
        ),
        **method.options(settings),
    )


class RoundEnd:
    """Called by the round loop after each round (and for round 0): evaluate the global
    model on the test split, record the round's row, write a checkpoint."""

    def __init__(
        self, settings, strategy, out_dir: Path, t0: float, phase1, resumed, formats_for=None
    ) -> None:
        self.settings, self.strategy, self.out_dir, self.phase1 = (
            settings,
            strategy,
            out_dir,
            phase1,
        )
        self.test_data = heldout_split(settings.server_data_spec())
        num_classes, input_shape = data_shape(settings.server_data_spec())
        self.evaluate = GlobalEvaluation(
            partial(skeleton, settings.model, num_classes, input_shape), self.test_data, formats_for
        )
        self.recorder = RunRecorder(out_dir, t0=t0, rows=resumed["rows"] if resumed else None)
        self.evaluation_s = self.checkpoint_s = 0.0  # wall time inside the round loop
        self.checkpoints = CheckpointFiles(out_dir)
        if resumed is None:
            self(0, strategy.global_arrays())

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if self.recorder.rows and self.recorder.rows[-1]["round"] >= server_round:
            return MetricRecord({})  # round 0 was recorded when the run began
        t0 = time.time()
        # The strategy's own global model: `arrays` is its wire form (`global_arrays`).
        loss, accuracy = self.evaluate(self.strategy.kept_values(), self.strategy.masks)
        self.evaluation_s += time.time() - t0
        self.recorder.add_round(server_round, accuracy, loss, self.strategy)
        t1 = time.time()
        if self.settings.checkpoint:
            state = {
                "round": server_round,
                "strategy": self.strategy.state_dict(),
                "rows": self.recorder.rows,
                "settings": self.settings.to_run_config(),
                "initial_pruning": self.phase1,
                "rng": rng_state(),
            }
            self.checkpoints.write(state, self.strategy.importance.nodes_hold_importance)
        self.checkpoint_s += time.time() - t1
        return MetricRecord(
            {"accuracy": accuracy, "loss": loss, "density": self.strategy.density()}
        )

    def finish(
        self, settings, strategy: SparseFedAvg, start: Start, phase1, resumed, split: dict
    ) -> None:
        """Write the run's files and summary; `split`: wall seconds by phase so far (the
        export for inference is timed here)."""
        t0 = time.time()
        inference = final_inference(settings, strategy, start, self.out_dir)
        export_s = time.time() - t0
        t1 = time.time()
        self.checkpoints.close()  # the last round's, written while the model was exported
        split["checkpoints"] += time.time() - t1
        split = {key: round(seconds, 2) for key, seconds in {**split, "export": export_s}.items()}
        log(INFO, "[fedprune] wall time by phase: %s",
            ", ".join(f"{key} {seconds:.1f} s" for key, seconds in split.items()))  # fmt: skip
        self.recorder.finish(
            strategy.masked_params(),
            strategy.masks,
            {
                "settings": settings.to_run_config(),
                "cost_profile": strategy.profile.to_dict(),
                "node_profiles": strategy.profiles.to_dict(),
                "train_formats": train_formats_summary(strategy.stats),
                "inference": inference,
                "wall_time_split_s": split,
                "initial_pruning": phase1,
                "final_delta": stability_delta(
                    settings.num_server_rounds, settings.delta_initial, settings.delta_half_life
                ),
                "mask_version": strategy.mask_version,
                "importance_upload": strategy.importance.mode,
                "resumed_after_round": resumed["round"] if resumed else None,
                "sampled_clients": {str(r): c for r, c in sorted(strategy.sampled_clients.items())},
                "parameters": count_parameters(start.model),
            },
        )


def final_inference(
    settings: Settings, strategy: SparseFedAvg, start: Start, out_dir: Path
) -> dict:
    """The "inference" block of summary.json; a failure is logged and recorded, not raised
    (the run's results are already on disk)."""
    model = build_model(settings.model, start.num_classes, input_shape=start.input_shape)
    model.load_state_dict(strategy.masked_params())
    arch = {
        "name": settings.model,
        "num_classes": start.num_classes,
        "input_shape": list(start.input_shape),
    }
    try:
        block = inference_summary(
            model, strategy.masks, out_dir, arch=arch, input_shape=tuple(start.input_shape)
        )
    except (RuntimeError, ValueError, OSError) as exc:
        log(ERROR, "[fedprune] export for inference failed: %s", exc)
        return {"error": str(exc)}
    log(INFO, "[fedprune] inference, pruned vs dense: %.2fx at batch 1, %.2fx at batch 20 (%s)",
        block["batch_1"]["pruned_vs_dense"] or 0.0, block["batch_20"]["pruned_vs_dense"] or 0.0,
        block["file"])  # fmt: skip
    return block
