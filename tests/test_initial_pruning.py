import itertools

import torch

from fedprune.costs import named_profile
from fedprune.data import DataSpec, server_share
from fedprune.initial_pruning import initial_prune, size_converged
from fedprune.models import build_model, prunable_names


def test_size_converged_needs_a_full_window_within_tolerance():
    assert not size_converged([100, 95, 94], window=5, tolerance=0.1)
    assert size_converged([200, 100, 99, 98, 97, 96, 95], window=5, tolerance=0.1)
    assert not size_converged([200, 100, 99, 98, 97, 96, 80], window=5, tolerance=0.1)


def run_phase1(**kw):
    model = build_model("small-cnn", seed=0)
    profile = named_profile("paper-uniform", prunable_names(model))
    seen = []
    result = initial_prune(
        model,
        server_share(DataSpec()),
        profile,
        num_classes=10,
        lr=0.1,
        batch_size=20,
        local_steps=5,
        interval=20,
        seed=0,
        on_reconfigure=lambda it, kept, total, acc: seen.append((it, kept, total, acc)),
        **kw,
    )
    return model, result, seen


def test_initial_pruning_only_removes_and_keeps_pruned_weights_at_zero():
    model, result, seen = run_phase1(max_iterations=200)
    sizes = [kept for _, kept, _, _ in seen]
    assert sizes, "no reconfiguration happened"
    assert all(b <= a for a, b in itertools.pairwise(sizes)), "size grew"
    assert sizes[-1] < seen[0][2], "nothing was pruned"
    params = dict(model.named_parameters())
    for name, mask in result.masks.items():
        assert torch.all(params[name][~mask] == 0)
    # 200 iterations hold at most 4 reconfigurations, fewer than the stop window (5) needs.
    assert result.iterations == 200 and result.stopped_by == "max-iterations"
    # Reconfigurations wait for training accuracy above chance (1.5 / 10).
    assert all(acc > 0.15 for *_, acc in seen)


def test_initial_pruning_stops_when_the_size_settles():
    # delta = 0: the stability rule forbids any removal, so the size never changes and
    # phase 1 stops after `window` reconfigurations instead of running to the cap.
    _, result, seen = run_phase1(max_iterations=2000, delta=0.0, window=3)
    assert result.stopped_by == "converged"
    assert len(seen) == 4 and result.iterations < 2000


def test_density_cap_is_honoured():
    _, result, _ = run_phase1(max_iterations=300, max_density=0.2)
    kept = sum(int(m.sum()) for m in result.masks.values())
    total = sum(m.numel() for m in result.masks.values())
    # A reconfiguration removes at most delta = 0.3 of each layer, so the cap is reachable
    # after 5 of the 15 reconfigurations; from then on it holds.
    assert kept / total <= 0.2
