"""Equal starting points (`warm-start`): every method trains the dense model on the server's
share for PruneFL's phase-1 budget first, so they all start from the same weights, and
those are PruneFL's phase 1 without its pruning."""

import pytest
import torch

from fedprune.costs import named_profile
from fedprune.data import server_share
from fedprune.initial_pruning import initial_prune, warm_start
from fedprune.models import build_model, prunable_names
from fedprune.settings import Settings, SettingsError
from strategies.methods import REGISTERED, method_of
from strategies.server_app import starting_inputs

BASE = dict(
    model="small-cnn",
    cost_profile="paper-uniform",
    ip_max_iterations=20,
    ip_interval=10,
    local_steps=3,
    batch_size=10,
    target_density=0.3,
    seed=3,
)


def start_of(method: str, **extra):
    """(weights after the method's starting point, its summary) on a fresh start."""
    settings = Settings(**{**BASE, "method": method, **extra})
    cls = method_of(settings)
    start = starting_inputs(settings)
    _, info = cls.starting_point(settings, start)
    return {n: p.detach().clone() for n, p in start.model.named_parameters()}, info


def same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_warm_start_is_phase_one_without_its_pruning():
    settings = Settings(**BASE)
    data = server_share(settings.data_spec())
    model_a, model_b = build_model("small-cnn", seed=3), build_model("small-cnn", seed=3)
    kw = dict(lr=0.1, batch_size=10, local_steps=3, seed=3)
    assert warm_start(model_a, data, iterations=20, **kw) == 20
    # An interval beyond the budget: phase 1 never prunes, so it is the same training.
    profile = named_profile("paper-uniform", prunable_names(model_b))
    initial_prune(model_b, data, profile, num_classes=10, interval=10**6, max_iterations=20, **kw)
    assert same(dict(model_a.named_parameters()), dict(model_b.named_parameters()))


def test_with_warm_start_every_method_starts_from_the_same_weights():
    cold, _ = start_of("fedavg")
    reference, info = start_of("fedavg", warm_start=True)
    assert info["warm_start"]["iterations"] == 20
    assert not same(cold, reference)  # the server phase trained the model
    names = [cls.name for cls in REGISTERED if cls.name not in ("lottery", "prunefl")]
    assert {"fedavg", "snip", "iterative", "feddst"} <= set(names)
    for name in names:
        weights, info = start_of(name, warm_start=True)
        assert same(weights, reference), name
        assert info["warm_start"]["iterations"] == 20, name
    # PruneFL without phase 1 gets the same server phase; with it, phase 1 is its own.
    weights, _ = start_of("prunefl", warm_start=True, initial_pruning=False)
    assert same(weights, reference)
    _, info = start_of("prunefl", warm_start=True)
    assert info["enabled"] and "warm_start" not in info


def test_without_warm_start_the_baselines_start_cold():
    cold, info = start_of("fedavg")
    assert "warm_start" not in info
    for name in ("snip", "iterative", "feddst"):
        assert same(start_of(name)[0], cold), name


def test_lottery_refuses_a_warm_start():
    with pytest.raises(SettingsError, match="'warm-start'"):
        method_of(Settings(**{**BASE, "method": "lottery", "mask_path": "x.pt"}, warm_start=True))


def test_an_equal_server_phase_is_loaded_from_the_cache(tmp_path):
    cache = str(tmp_path / "cache")
    fresh, info = start_of("fedavg", warm_start=True)
    assert not info["warm_start"]["cached"]
    first, info = start_of("snip", warm_start=True, warm_start_cache=cache)
    assert not info["warm_start"]["cached"] and len(list((tmp_path / "cache").iterdir())) == 1
    again, info = start_of("feddst", warm_start=True, warm_start_cache=cache)
    assert info["warm_start"]["cached"]
    assert same(first, fresh) and same(again, fresh)
    # Another server phase (here: another seed) is another entry, not this one.
    _, info = start_of("fedavg", warm_start=True, warm_start_cache=cache, seed=4)
    assert not info["warm_start"]["cached"] and len(list((tmp_path / "cache").iterdir())) == 2
