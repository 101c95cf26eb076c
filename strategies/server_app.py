"""The ServerApp: settings, data, initial pruning, then PruneFL rounds, then results.

main(grid, context)
  1. validate the run config into Settings (a bad value stops here, naming the key);
  2. build the model and the server's data (its own share and the test split);
  3. phase 1: train and prune on the server's share (unless disabled);
  4. phase 2: `PruneFL.start`, evaluating the global model on the test split each round;
  5. write metrics.csv, summary.json, the final model, its mask and a plot.

After round 0 and every round, the server writes `checkpoint.pt` into the run's folder; a
run started with `resume=<that folder>` goes on from it (see `resume_run`).
"""

from __future__ import annotations

import os
import random
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedprune import protocol as P
from fedprune.checkpoint import CheckpointError, copy_checkpoint, load_checkpoint, save_checkpoint
from fedprune.costs import PAPER_CONV2_COMPUTE_S_PER_PARAM, CostProfile, named_profile
from fedprune.data import INPUT_SHAPE, NUM_CLASSES, heldout_split, server_share
from fedprune.initial_pruning import initial_prune
from fedprune.masks import Masks, check_masks, from_prune_state, full_masks, model_density
from fedprune.models import build_model, count_parameters, prunable_names
from fedprune.reconfigure import stability_delta
from fedprune.settings import Settings, SettingsError
from fedprune.training import evaluate
from strategies.baselines import FedDST, FixedMask, IterativeMagnitude, Snip, initial_random_masks
from strategies.prunefl import PruneFL
from strategies.results import RunRecorder, inference_summary
from strategies.sparse_fedavg import SparseFedAvg

app = ServerApp()

CHECKPOINT = "checkpoint.pt"  # after the last finished round
# After the last round that a new run can replay exactly: in the paper's accumulate-on-node
# mode, nodes hold importance between reconfigurations that a restarted run cannot get back.
RESTART_CHECKPOINT = "checkpoint-restart.pt"


def load_settings(context: Context) -> Settings:
    try:
        return Settings.from_run_config(context.run_config)
    except SettingsError as exc:
        log(ERROR, "[fedprune] bad run config: %s", exc)
        raise


def run_name(settings: Settings) -> str:
    return (
        settings.run_name
        or f"{time.strftime('%Y%m%d-%H%M%S')}-{settings.model}-seed{settings.seed}"
    )


def resume_run(settings: Settings) -> tuple[Settings, dict, Path]:
    """(the run's settings, the checkpoint state to go on from, the run folder) for
    `resume` = a run folder (or a checkpoint file in it).

    This run's config must be the resumed run's (plus `resume`): the nodes train by it.
    If the latest checkpoint needs importance
    that the nodes held (lost with the old run), the run goes on from the restart
    checkpoint instead and replays the rounds after it, which gives the same result.
    """
    path = Path(settings.resume)
    folder, latest = (path, path / CHECKPOINT) if path.is_dir() else (path.parent, path)
    try:
        state = load_checkpoint(latest)
        if state["strategy"]["nodes_hold_importance"]:
            restart = load_checkpoint(folder / RESTART_CHECKPOINT)
            log(
                WARNING,
                "[fedprune] resume: after round %d the nodes held importance not yet sent, "
                "which the old run took with it; going on from round %d, the last round "
                "after which they held none (rounds %d to %d run again, with the same result)",
                state["round"],
                restart["round"],
                restart["round"] + 1,
                state["round"],
            )
            state = restart
        saved = Settings.from_run_config(state["settings"])
    except (CheckpointError, KeyError, TypeError, SettingsError) as exc:
        message = f"setting 'resume' = {settings.resume!r}: cannot resume: {exc}"
        log(ERROR, "[fedprune] %s", message)
        raise SettingsError(message) from exc
    # The nodes read the run config, not the checkpoint: it must be the run's.
    given, kept = settings.to_run_config(), saved.to_run_config()
    changed = [
        f"{k} = {given[k]!r} (the run had {kept[k]!r})"
        for k in kept
        if k != "resume" and given[k] != kept[k]
    ]
    if changed:
        message = (
            f"setting 'resume' = {settings.resume!r}: the run config differs from the run "
            f"being resumed in: {'; '.join(changed)}. Resume with the run's own --run-config "
            "plus resume=..."
        )
        log(ERROR, "[fedprune] %s", message)
        raise SettingsError(message)
    log(INFO, "[fedprune] resuming %s after round %d", folder, state["round"])
    return saved, state, folder


def rng_state() -> dict:
    """The server's random generators, in types a weights-only checkpoint can hold."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def run_initial_pruning(settings: Settings, model, profile, server_data) -> tuple[Masks, dict]:
    """PruneFL's phase 1 on the server's own data; trains and prunes `model` in place."""

    def progress(iteration: int, kept: int, total: int, acc: float) -> None:
        log(
            INFO,
            "[fedprune] initial pruning: iteration %4d | train acc %.3f | "
            "kept %s of %s prunable weights (%.4f)",
            iteration,
            acc,
            f"{kept:,}",
            f"{total:,}",
            kept / total,
        )

    t_ip = time.time()
    phase1 = initial_prune(
        model,
        server_data,
        profile,
        num_classes=NUM_CLASSES[settings.dataset],
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
    )
    info = {
        "enabled": True,
        "iterations": phase1.iterations,
        "stopped_by": phase1.stopped_by,
        "density": model_density(model, phase1.masks),
        "wall_time_s": round(time.time() - t_ip, 3),
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


def starting_point(settings: Settings, model, profile, server_data):
    """(weights, masks, initial-pruning info) the first round starts from, per method."""
    info: dict = {"enabled": False}
    if settings.method == "prunefl" and settings.initial_pruning and settings.ip_max_iterations:
        masks, info = run_initial_pruning(settings, model, profile, server_data)
    elif settings.method == "feddst":
        masks = initial_random_masks(
            dict(model.named_parameters()),
            prunable_names(model),
            settings.target_density,
            settings.seed,
        )
    elif settings.method == "lottery":
        masks = load_mask(settings.mask_path, model)
        if settings.lottery_init == "random":
            # A fresh initialisation: same architecture, a seed no other run uses.
            model = build_model(
                settings.model,
                NUM_CLASSES[settings.dataset],
                seed=settings.seed + 1_000_003,
                input_shape=INPUT_SHAPE[settings.dataset],
            )
    else:
        masks = full_masks(model)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return params, masks, info


def load_mask(path: str, model) -> Masks:
    try:
        masks = from_prune_state(torch.load(path), prunable_names(model))
        check_masks(model, masks)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise SettingsError(f"setting 'mask-path' = {path!r}: cannot use it: {exc}") from exc
    return masks


def base_profile(settings: Settings, prunable: list[str]) -> CostProfile:
    """The named cost profile; with `cost-profile = measured`, the paper's profile that
    fits the model, used for initial pruning and until the first node has been profiled."""
    name = settings.cost_profile
    if name == "measured":
        name = (
            "paper-conv2"
            if len(prunable) == len(PAPER_CONV2_COMPUTE_S_PER_PARAM)
            else ("paper-uniform")
        )
    try:
        return named_profile(name, prunable)
    except ValueError as exc:
        raise SettingsError(f"setting 'cost-profile' = {settings.cost_profile!r}: {exc}") from exc


def final_inference(settings: Settings, strategy: SparseFedAvg, out_dir: Path) -> dict:
    """The "inference" block of summary.json; a failure is logged and recorded, not raised
    (the run's results are already on disk)."""
    num_classes, input_shape = NUM_CLASSES[settings.dataset], INPUT_SHAPE[settings.dataset]
    model = build_model(settings.model, num_classes, input_shape=input_shape)
    model.load_state_dict(strategy.masked_params())
    arch = {"name": settings.model, "num_classes": num_classes, "input_shape": list(input_shape)}
    try:
        block = inference_summary(
            model, strategy.masks, out_dir, arch=arch, input_shape=tuple(input_shape)
        )
    except (RuntimeError, ValueError, OSError) as exc:
        log(ERROR, "[fedprune] export for inference failed: %s", exc)
        return {"error": str(exc)}
    log(
        INFO,
        "[fedprune] inference, pruned vs dense: %.2fx at batch 1, %.2fx at batch 20 (%s)",
        block["batch_1"]["pruned_vs_dense"] or 0.0,
        block["batch_20"]["pruned_vs_dense"] or 0.0,
        block["file"],
    )
    return block


def build_strategy(settings: Settings, params, masks, profile) -> SparseFedAvg:
    """The strategy of `settings.method`, with the settings it uses."""
    common = dict(
        measure_costs=settings.cost_profile == "measured",
        query_timeout_s=settings.round_timeout_s,
        params=params,
        masks=masks,
        profile=profile,
        clients_per_round=settings.clients_per_round,
        fraction_train=settings.fraction_train,
        num_clients=settings.num_clients,
        seed=settings.seed,
        importance_upload=settings.importance_upload,
        fraction_evaluate=settings.fraction_evaluate,
        min_replies=settings.min_replies,
        regrow_init=settings.regrow_init,
    )
    ramp = settings.prune_ramp_rounds or max(1, settings.num_server_rounds // 2)
    if settings.method == "prunefl":
        return PruneFL(
            reconfig_interval=settings.reconfig_interval if settings.reconfigure else 0,
            delta_initial=settings.delta_initial,
            delta_half_life=settings.delta_half_life,
            max_density=settings.max_density,
            **common,
        )
    if settings.method == "snip":
        return Snip(target_density=settings.target_density, **common)
    if settings.method == "iterative":
        return IterativeMagnitude(
            target_density=settings.target_density,
            steps=settings.prune_steps,
            ramp_rounds=ramp,
            **common,
        )
    if settings.method == "feddst":
        return FedDST(
            interval=settings.reconfig_interval,
            delta_initial=settings.delta_initial,
            delta_half_life=settings.delta_half_life,
            **common,
        )
    return FixedMask(**common)  # fedavg (full masks) and lottery (a given mask)


@app.main()
def main(grid: Grid, context: Context) -> None:
    t0 = time.time()
    settings = load_settings(context)
    resumed, out_dir = None, None
    if settings.resume:
        settings, resumed, out_dir = resume_run(settings)
    # The server computes while the clients wait (initial pruning, aggregation, test
    # evaluation): it may use every core.
    torch.set_num_threads(os.cpu_count() or 1)
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)

    num_classes = NUM_CLASSES[settings.dataset]
    input_shape = INPUT_SHAPE[settings.dataset]
    model = build_model(settings.model, num_classes, seed=settings.seed, input_shape=input_shape)
    profile = base_profile(settings, prunable_names(model))
    spec = settings.data_spec()
    server_data, test_data = server_share(spec), heldout_split(spec)
    out_dir = (out_dir or Path(settings.output_dir) / run_name(settings)).resolve()
    log(
        INFO,
        "[fedprune] %s with %s parameters; server share %d, test split %d; output %s",
        settings.model,
        f"{count_parameters(model):,}",
        len(server_data),
        len(test_data),
        out_dir,
    )

    if resumed is None:
        params, masks, phase1_info = starting_point(settings, model, profile, server_data)
        strategy = build_strategy(settings, params, masks, profile)
    else:
        phase1_info = resumed["initial_pruning"]
        saved = resumed["strategy"]
        strategy = build_strategy(settings, saved["params"], saved["masks"], profile)
        strategy.load_state_dict(saved)
        set_rng_state(resumed["rng"])
    recorder = RunRecorder(out_dir, t0=t0, rows=resumed["rows"] if resumed else None)
    eval_model = build_model(settings.model, num_classes, input_shape=input_shape)
    sim_time = resumed["sim_time"] if resumed else 0.0

    def write_checkpoint(server_round: int) -> None:
        """Everything needed to go on after `server_round` (see fedprune.checkpoint)."""
        if not settings.checkpoint:
            return
        state = {
            "round": server_round,
            "strategy": strategy.state_dict(),
            "rows": recorder.rows,
            "sim_time": sim_time,
            "settings": settings.to_run_config(),
            "initial_pruning": phase1_info,
            "rng": rng_state(),
        }
        save_checkpoint(out_dir / CHECKPOINT, state)
        if not strategy.nodes_hold_importance:
            copy_checkpoint(out_dir / CHECKPOINT, out_dir / RESTART_CHECKPOINT)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        nonlocal sim_time
        eval_model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(eval_model, test_data)
        stats = strategy.stats.get(server_round)
        round_time = stats.sim_time_s if stats else 0.0
        sim_time += round_time
        recorder.add(
            {
                "round": server_round,
                "accuracy": accuracy,
                "loss": loss,
                "density": strategy.density(),
                "bytes_down": stats.bytes_down if stats else 0,
                "bytes_up": stats.bytes_up if stats else 0,
                "sim_time_s": round(sim_time, 3),
                "round_sim_time_s": round(round_time, 3),
                "mask_version": strategy.mask_version,
                "masks_sent": stats.masks_sent if stats else 0,
                "replies": stats.replies if stats else 0,
                "dropped": stats.dropped if stats else 0,
                "reconfigured": int(stats.reconfigured) if stats else 0,
            }
        )
        if server_round == 0:
            write_checkpoint(0)
        return MetricRecord({"accuracy": accuracy, "loss": loss, "density": strategy.density()})

    strategy.start(
        grid=grid,
        initial_arrays=strategy.global_arrays(),
        num_rounds=settings.num_server_rounds,
        timeout=settings.round_timeout_s,
        train_config=ConfigRecord({P.LEARNING_RATE: settings.learning_rate}),
        evaluate_fn=evaluate_global,
        first_round=resumed["round"] + 1 if resumed else 0,
        on_round_end=write_checkpoint,
    )
    recorder.finish(
        strategy.masked_params(),
        strategy.masks,
        {
            "settings": settings.to_run_config(),
            "cost_profile": strategy.profile.to_dict(),
            "node_profiles": {
                str(node): p.to_dict() for node, p in sorted(strategy.node_profiles.items())
            },
            "inference": final_inference(settings, strategy, out_dir),
            "initial_pruning": phase1_info,
            "final_delta": stability_delta(
                settings.num_server_rounds, settings.delta_initial, settings.delta_half_life
            ),
            "mask_version": strategy.mask_version,
            "importance_upload": strategy.upload_mode,
            "resumed_after_round": resumed["round"] if resumed else None,
            "sampled_clients": {str(r): c for r, c in sorted(strategy.sampled_clients.items())},
            "parameters": count_parameters(model),
        },
    )
