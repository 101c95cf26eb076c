"""A run's state on disk: the checkpoint written after every round, and resuming from it.

After round 0 and every round the server writes `checkpoint.pt` into the run's folder:
the strategy's state, the metrics rows so far, the settings, the initial-pruning summary
and the random generators' states (`fedprune.checkpoint`: atomic, checked, weights-only).
In the paper's accumulate-on-node importance mode the nodes hold importance between
reconfigurations that a new run cannot get back, so `checkpoint-restart.pt` marks the last
round after which they held none; a resume goes on from there when it must.
"""

from __future__ import annotations

import random
from functools import partial
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.common.logger import log

from fedprune.checkpoint import (
    BackgroundWriter,
    CheckpointError,
    copy_checkpoint,
    load_checkpoint,
)
from fedprune.settings import Settings, SettingsError

CHECKPOINT = "checkpoint.pt"  # after the last finished round
RESTART_CHECKPOINT = "checkpoint-restart.pt"  # after the last round a new run can replay


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


class CheckpointFiles:
    """A run's checkpoint files, written off the round's critical path
    (`fedprune.checkpoint.BackgroundWriter`): `write` returns once the state is
    serialised; `close` returns once the last one is on disk."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.writer = BackgroundWriter()

    def write(self, state: dict, nodes_hold_importance: bool) -> None:
        """Write `state` (after its "round") as the latest checkpoint, and as the restart
        checkpoint too when no node holds importance the server has not received."""
        latest = self.out_dir / CHECKPOINT
        restart = partial(copy_checkpoint, latest, self.out_dir / RESTART_CHECKPOINT)
        self.writer.save(latest, state, then=None if nodes_hold_importance else restart)

    def close(self) -> None:
        self.writer.wait()


def resume_run(settings: Settings) -> tuple[Settings, dict, Path]:
    """(the run's settings, the checkpoint state to go on from, the run folder) for
    `resume` = a run folder (or a checkpoint file in it).

    This run's config must be the resumed run's (plus `resume`): the nodes train by it.
    If the latest checkpoint needs importance that the nodes held (lost with the old run),
    the run goes on from the restart checkpoint and replays the rounds after it, which
    gives the same result.
    """
    path = Path(settings.resume)
    folder, latest = (path, path / CHECKPOINT) if path.is_dir() else (path.parent, path)
    try:
        state = load_checkpoint(latest)
        if state["strategy"]["importance"]["held_rounds"]:
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
