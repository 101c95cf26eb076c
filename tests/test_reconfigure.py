"""Tests for fedprune.reconfigure: exactness against brute force, stability, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.legacy_solver import legacy_reconfigure
from fedprune.reconfigure import Reconfiguration, reconfigure, stability_delta

# --------------------------------------------------------------------------- helpers


def _reference_split(weights, masks, delta, allow_regrowth):
    """Fixed and candidate flat positions, per layer, written plainly from the rule."""
    fixed, candidates = {}, {}
    for name, mask in masks.items():
        m = mask.reshape(-1).tolist()
        w = weights[name].reshape(-1).tolist()
        kept = sorted((i for i, k in enumerate(m) if k), key=lambda i: (abs(w[i]), i))
        released = math.floor(delta * len(kept))
        fixed[name] = set(kept[released:])
        candidates[name] = set(kept[:released])
        if allow_regrowth:
            candidates[name] |= {i for i, k in enumerate(m) if not k}
    return fixed, candidates


def _objective_of(masks, importance, time_per_param, fixed_time_s, fixed_importance):
    num = fixed_importance + sum(float(importance[n][m].double().sum()) for n, m in masks.items())
    den = fixed_time_s + sum(int(m.sum()) * time_per_param[n] for n, m in masks.items())
    return num / den


def _brute_force(inst):
    """Best objective over every subset of candidates that respects the cap."""
    fixed, candidates = _reference_split(
        inst["weights"], inst["masks"], inst["delta"], inst["allow_regrowth"]
    )
    a = inst["fixed_importance"]
    b = inst["fixed_time_s"]
    g, t = [], []
    for name in inst["masks"]:
        imp = inst["importance"][name].reshape(-1).double()
        a += sum(float(imp[i]) for i in fixed[name])
        b += len(fixed[name]) * inst["time_per_param"][name]
        for i in sorted(candidates[name]):
            g.append(float(imp[i]))
            t.append(inst["time_per_param"][name])
    n_fixed = sum(len(f) for f in fixed.values())
    total = sum(m.numel() for m in inst["masks"].values())
    cap = math.floor(inst["max_density"] * total)
    if n_fixed > cap:
        return a / b, fixed, candidates, cap, n_fixed
    n = len(g)
    bits = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(np.float64)
    value = (a + bits @ np.array(g, dtype=np.float64)) / (b + bits @ np.array(t, dtype=np.float64))
    feasible = n_fixed + bits.sum(axis=1) <= cap
    return float(value[feasible].max()), fixed, candidates, cap, n_fixed


@st.composite
def instances(draw, max_layers=3, max_side=2):
    n_layers = draw(st.integers(2, max_layers))
    weights, masks, importance, time_per_param = {}, {}, {}, {}
    zero_time_layer = draw(st.one_of(st.none(), st.integers(0, n_layers - 1)))
    for layer in range(n_layers):
        name = f"l{layer}.weight"
        shape = (draw(st.integers(1, max_side)), draw(st.integers(1, 2)))
        n = shape[0] * shape[1]
        # Small integer magnitudes make ties in |w| and in G / t common.
        w = draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))
        m = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        g = draw(
            st.lists(
                st.one_of(
                    st.just(0.0),
                    st.integers(1, 4).map(float),
                    st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False),
                ),
                min_size=n,
                max_size=n,
            )
        )
        weights[name] = torch.tensor(w, dtype=torch.float32).reshape(shape)
        masks[name] = torch.tensor(m, dtype=torch.bool).reshape(shape)
        importance[name] = torch.tensor(g, dtype=torch.float32).reshape(shape)
        time_per_param[name] = (
            0.0
            if layer == zero_time_layer
            else draw(st.one_of(st.sampled_from([0.5, 1.0, 2.0]), st.floats(0.01, 5.0)))
        )
    return {
        "weights": weights,
        "masks": masks,
        "importance": importance,
        "time_per_param": time_per_param,
        "fixed_time_s": draw(st.one_of(st.just(1.0), st.floats(0.1, 10.0))),
        "fixed_importance": draw(st.one_of(st.just(0.0), st.floats(0.0, 10.0))),
        "delta": draw(st.one_of(st.sampled_from([0.0, 0.3, 0.5, 1.0]), st.floats(0.0, 1.0))),
        "max_density": draw(
            st.one_of(st.just(1.0), st.floats(0.0, 1.0, exclude_min=True), st.just(0.5))
        ),
        "allow_regrowth": draw(st.booleans()),
    }


def _layer(n, seed=0, density=0.5):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, generator=gen),
        torch.rand(n, generator=gen) < density,
        torch.rand(n, generator=gen),
    )


# --------------------------------------------------------------------------- exactness


@settings(max_examples=300, deadline=None)
@given(instances())
def test_matches_brute_force(inst):
    _check_against_brute_force(inst)


@settings(max_examples=200, deadline=None)
@given(instances(max_layers=7, max_side=1))
def test_many_small_layers_match_brute_force(inst):
    # Up to 7 layers of 1-2 entries: the per-layer candidate lists and their merge by
    # threshold, with equal ratios across layers common (slopes 0.5, 1, 2; integer G).
    _check_against_brute_force(inst)


def _check_against_brute_force(inst):
    result = reconfigure(**inst)
    best, fixed, candidates, cap, n_fixed = _brute_force(inst)

    assert math.isclose(result.objective, best, rel_tol=1e-9, abs_tol=1e-12)
    recomputed = _objective_of(
        result.masks,
        inst["importance"],
        inst["time_per_param"],
        inst["fixed_time_s"],
        inst["fixed_importance"],
    )
    assert math.isclose(result.objective, recomputed, rel_tol=1e-12)

    kept = 0
    for name, new in result.masks.items():
        assert new.dtype == torch.bool and new.shape == inst["masks"][name].shape
        on = set(torch.nonzero(new.reshape(-1)).squeeze(1).tolist())
        assert fixed[name] <= on, "a stability-fixed weight was dropped"
        assert on <= fixed[name] | candidates[name], "a non-candidate was turned on"
        kept += len(on)
    assert result.kept == kept
    assert result.total == sum(m.numel() for m in inst["masks"].values())
    expected_time = inst["fixed_time_s"] + sum(
        int(m.sum()) * inst["time_per_param"][n] for n, m in result.masks.items()
    )
    assert math.isclose(result.round_time_s, expected_time, rel_tol=1e-12)
    if n_fixed <= cap:
        assert result.cap_met and kept <= cap
    else:
        assert not result.cap_met and kept == n_fixed
    return result


def test_cap_needs_dinkelbach_not_ratio_prefix():
    # b has the better ratio (2 vs 1), but with one slot a's larger gain wins:
    # a alone 10 / 11 = 0.909 > b alone 1 / 1.5 = 0.667.
    weights = {"a": torch.zeros(1), "b": torch.zeros(1)}
    masks = {"a": torch.zeros(1, dtype=torch.bool), "b": torch.zeros(1, dtype=torch.bool)}
    importance = {"a": torch.tensor([10.0]), "b": torch.tensor([1.0])}
    time_per_param = {"a": 10.0, "b": 0.5}
    free = reconfigure(weights, masks, importance, time_per_param, fixed_time_s=1.0)
    assert free.kept == 2
    capped = reconfigure(
        weights, masks, importance, time_per_param, fixed_time_s=1.0, max_density=0.5
    )
    assert capped.masks["a"].item() and not capped.masks["b"].item()
    assert capped.objective == pytest.approx(10.0 / 11.0)


def test_zero_time_positive_importance_is_always_taken():
    weights, masks, _ = _layer(50, seed=1)
    importance = {"w": torch.full((50,), 1e-9)}
    result = reconfigure({"w": weights}, {"w": masks}, importance, {"w": 0.0}, fixed_time_s=1.0)
    assert bool(result.masks["w"].all())
    # However small: 1e-20 next to 1.0 does not change a float64 sum, but it raises the
    # objective all the same, so it is taken (its ratio is +inf).
    importance = {"w": torch.tensor([1.0, 1e-20, 0.0], dtype=torch.float64)}
    three = {"w": torch.zeros(3)}, {"w": torch.zeros(3, dtype=torch.bool)}
    result = reconfigure(*three, importance, {"w": 0.0}, fixed_time_s=1.0)
    assert result.masks["w"].tolist() == [True, True, False]


def test_cap_binding_exactly_at_a_layer_boundary():
    # Ratio order: a's three (6, 5, 4), then b's (3.9, 3.8). Uncapped, all five pay; a cap
    # of three ends exactly where layer a ends.
    weights = {"a": torch.zeros(3), "b": torch.zeros(2)}
    masks = {"a": torch.zeros(3, dtype=torch.bool), "b": torch.zeros(2, dtype=torch.bool)}
    importance = {"a": torch.tensor([4.0, 6.0, 5.0]), "b": torch.tensor([3.9, 3.8])}
    time_per_param = {"a": 1.0, "b": 1.0}
    free = reconfigure(weights, masks, importance, time_per_param, fixed_time_s=1.0)
    assert free.kept == 5
    inst = {
        "weights": weights,
        "masks": masks,
        "importance": importance,
        "time_per_param": time_per_param,
        "fixed_time_s": 1.0,
        "fixed_importance": 0.0,
        "delta": 0.3,
        "max_density": 0.6,
        "allow_regrowth": True,
    }
    capped = _check_against_brute_force(inst)
    assert capped.masks["a"].all() and not capped.masks["b"].any()
    assert capped.objective == pytest.approx(15.0 / 4.0)
    # One slot more crosses into b and takes its best.
    capped = _check_against_brute_force(inst | {"max_density": 0.8})
    assert capped.masks["a"].all() and capped.masks["b"].tolist() == [True, False]


def test_equal_importance_at_a_binding_cap_takes_lowest_flat_indices():
    # Four candidates of G = 2 pay uncapped; the cap leaves three slots among them.
    weights, masks = {"w": torch.zeros(6)}, {"w": torch.zeros(6, dtype=torch.bool)}
    importance = {"w": torch.tensor([1.0, 2.0, 2.0, 0.5, 2.0, 2.0])}
    free = reconfigure(weights, masks, importance, {"w": 1.0}, fixed_time_s=1.0)
    assert free.masks["w"].tolist() == [False, True, True, False, True, True]
    capped = reconfigure(weights, masks, importance, {"w": 1.0}, fixed_time_s=1.0, max_density=0.5)
    assert capped.masks["w"].tolist() == [False, True, True, False, True, False]


def test_identical_layers_with_equal_ratios_get_the_same_mask():
    w, mask, g = _layer(3000, seed=20, density=0.1)
    args = ({"a": w, "b": w.clone()}, {"a": mask, "b": mask.clone()}, {"a": g, "b": g.clone()})
    result = reconfigure(*args, {"a": 2e-4, "b": 2e-4}, fixed_time_s=0.05)
    assert torch.equal(result.masks["a"], result.masks["b"])
    assert 0 < result.kept < result.total


def test_zero_importance_everywhere_keeps_the_fixed_sets_under_a_cap():
    layers = {f"l{i}": _layer(400 + 50 * i, seed=30 + i, density=0.4) for i in range(5)}
    weights = {n: v[0] for n, v in layers.items()}
    masks = {n: v[1] for n, v in layers.items()}
    zeros = {n: torch.zeros_like(v[2]) for n, v in layers.items()}
    time_per_param = {n: 1e-3 * (i % 3) for i, n in enumerate(layers)}  # some t = 0
    result = reconfigure(
        weights,
        masks,
        zeros,
        time_per_param,
        fixed_time_s=1.0,
        fixed_importance=2.0,
        delta=0.5,
        max_density=0.3,
    )
    for name, mask in masks.items():
        k = int(mask.sum())
        new = result.masks[name]
        assert not bool((new & ~mask).any())
        assert int(new.sum()) == k - math.floor(0.5 * k)
    assert result.objective == pytest.approx(2.0 / result.round_time_s)


def test_zero_time_layer_under_a_binding_cap():
    # The free layer's candidates compete by G alone; the costly layer's by G - lambda t.
    gen = torch.Generator().manual_seed(3)
    inst = {
        "weights": {"free": torch.zeros(6), "costly": torch.zeros(6)},
        "masks": {
            "free": torch.zeros(6, dtype=torch.bool),
            "costly": torch.zeros(6, dtype=torch.bool),
        },
        "importance": {
            "free": torch.rand(6, generator=gen),
            "costly": 3 * torch.rand(6, generator=gen),
        },
        "time_per_param": {"free": 0.0, "costly": 0.5},
        "fixed_time_s": 1.0,
        "fixed_importance": 0.0,
        "delta": 0.3,
        "max_density": 5 / 12,
        "allow_regrowth": True,
    }
    result = _check_against_brute_force(inst)
    assert result.kept == 5
    chosen = inst["importance"]["free"][result.masks["free"]]
    left = inst["importance"]["free"][~result.masks["free"]]
    assert chosen.numel() == 0 or left.numel() == 0 or chosen.min() >= left.max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_importance_dtype_does_not_change_the_choice(dtype):
    w, mask, _ = _layer(2000, seed=40, density=0.2)
    gen = torch.Generator().manual_seed(41)
    # Small integers: exact in every dtype, with many equal values.
    g = torch.randint(0, 50, (2000,), generator=gen).float()
    args = ({"w": w}, {"w": mask})
    base = reconfigure(*args, {"w": g}, {"w": 1e-3}, fixed_time_s=0.5, max_density=0.15)
    other = reconfigure(*args, {"w": g.to(dtype)}, {"w": 1e-3}, fixed_time_s=0.5, max_density=0.15)
    assert torch.equal(base.masks["w"], other.masks["w"])
    assert other.objective == base.objective


def test_returned_masks_are_new_tensors():
    weights, mask, importance = _layer(100, seed=8)
    result = reconfigure(
        {"w": weights},
        {"w": mask},
        {"w": importance},
        {"w": 1e-3},
        fixed_time_s=1.0,
        delta=0.0,
        allow_regrowth=False,
    )
    assert torch.equal(result.masks["w"], mask)
    before = mask.clone()
    result.masks["w"].fill_(False)
    assert torch.equal(mask, before)


# --------------------------------------------------------------------------- the old solver


@st.composite
def medium_instances(draw):
    """Up to 25 layers of up to 600 entries, continuous float64 importance (no equal
    values, so the optimum is unique), integer weights (many magnitude ties)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n_layers = draw(st.integers(1, 25))
    weights, masks, importance, time_per_param = {}, {}, {}, {}
    for layer in range(n_layers):
        name = f"l{layer}.weight"
        n = draw(st.integers(1, 600))
        density = draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))
        weights[name] = torch.randint(-4, 5, (n,), generator=gen).float()
        masks[name] = torch.rand(n, generator=gen) < density
        # Heavy tails, but no G so small that adding it cannot change a float64 sum: the
        # old solver's prefix argmax then drops it, the new threshold takes it (see
        # test_zero_time_positive_importance_is_always_taken).
        power = draw(st.sampled_from([1, 4, 8]))
        g = 1e-6 + torch.rand(n, generator=gen, dtype=torch.float64) ** power
        importance[name] = torch.where(torch.rand(n, generator=gen) < 0.1, 0.0, g)
        time_per_param[name] = draw(st.sampled_from([0.0, 1e-3, 1e-2, 0.1]))
    return {
        "weights": weights,
        "masks": masks,
        "importance": importance,
        "time_per_param": time_per_param,
        "fixed_time_s": draw(st.sampled_from([0.01, 0.3, 3.0])),
        "fixed_importance": draw(st.sampled_from([0.0, 1.0])),
        "delta": draw(st.sampled_from([0.0, 0.3, 1.0])),
        "max_density": draw(st.sampled_from([1.0, 0.5, 0.1, 0.02])),
        "allow_regrowth": draw(st.booleans()),
    }


@settings(max_examples=150, deadline=None)
@given(medium_instances())
def test_same_masks_as_the_old_global_sort_solver(inst):
    old = legacy_reconfigure(**inst)
    new = reconfigure(**inst)
    for name in inst["masks"]:
        assert torch.equal(old.masks[name], new.masks[name]), name
    assert (new.kept, new.total, new.cap_met) == (old.kept, old.total, old.cap_met)
    assert math.isclose(new.objective, old.objective, rel_tol=1e-12)
    assert math.isclose(new.round_time_s, old.round_time_s, rel_tol=1e-12)


# --------------------------------------------------------------------------- stability


def test_delta_zero_without_regrowth_keeps_mask():
    weights, mask, importance = _layer(1000, seed=2)
    result = reconfigure(
        {"w": weights},
        {"w": mask},
        {"w": importance},
        {"w": 1e-3},
        fixed_time_s=1.0,
        delta=0.0,
        allow_regrowth=False,
    )
    assert torch.equal(result.masks["w"], mask)


def test_delta_bounds_what_each_layer_loses_and_largest_stay():
    layers = {f"l{i}": _layer(500 + 100 * i, seed=10 + i, density=0.7) for i in range(3)}
    weights = {n: v[0] for n, v in layers.items()}
    masks = {n: v[1] for n, v in layers.items()}
    # Costly parameters with little importance: the solver wants to drop as much as allowed.
    importance = {n: v[2] * 1e-6 for n, v in layers.items()}
    time_per_param = {n: 1.0 for n in layers}
    result = reconfigure(weights, masks, importance, time_per_param, fixed_time_s=1.0, delta=0.3)
    for name, mask in masks.items():
        k = int(mask.sum())
        new = result.masks[name]
        assert int((mask & ~new).sum()) <= math.floor(0.3 * k)
        kept_mag = weights[name][mask].abs()
        must_stay = k - math.floor(0.3 * k)
        threshold = torch.sort(kept_mag, descending=True).values[must_stay - 1]
        assert bool(new[mask & (weights[name].abs() > threshold)].all())


def test_no_regrowth_never_turns_on_a_pruned_entry():
    weights, mask, _ = _layer(2000, seed=3, density=0.3)
    # Pruned entries are the most important and free: they would be taken if allowed.
    importance = torch.where(mask, torch.tensor(0.01), torch.tensor(100.0))
    result = reconfigure(
        {"w": weights},
        {"w": mask},
        {"w": importance},
        {"w": 1e-4},
        fixed_time_s=1.0,
        allow_regrowth=False,
    )
    assert not bool((result.masks["w"] & ~mask).any())
    regrown = reconfigure(
        {"w": weights}, {"w": mask}, {"w": importance}, {"w": 1e-4}, fixed_time_s=1.0
    )
    assert bool((regrown.masks["w"] & ~mask).any())


def test_all_zero_importance_keeps_only_fixed_set():
    weights, mask, _ = _layer(1000, seed=4)
    importance = torch.zeros(1000)
    result = reconfigure(
        {"w": weights}, {"w": mask}, {"w": importance}, {"w": 1e-3}, fixed_time_s=1.0, delta=0.5
    )
    k = int(mask.sum())
    assert result.kept == k - math.floor(0.5 * k)
    assert not bool((result.masks["w"] & ~mask).any())
    assert result.objective == 0.0


def test_fixed_set_above_cap_reports_cap_not_met():
    weights, mask, importance = _layer(100, seed=5, density=0.9)
    result = reconfigure(
        {"w": weights},
        {"w": mask},
        {"w": importance},
        {"w": 1e-3},
        fixed_time_s=1.0,
        delta=0.0,
        max_density=0.1,
    )
    assert not result.cap_met
    assert torch.equal(result.masks["w"], mask)


# --------------------------------------------------------------------------- scale


def test_two_million_parameters_vectorised():
    big_w, big_m, big_g = _layer(2_000_000, seed=6)
    small_w, small_m, small_g = _layer(300_000, seed=7)
    args = (
        {"big": big_w, "small": small_w},
        {"big": big_m, "small": small_m},
        {"big": big_g, "small": small_g * 3},
        {"big": 1e-7, "small": 4e-7},
    )
    free = reconfigure(*args, fixed_time_s=0.5)
    capped = reconfigure(*args, fixed_time_s=0.5, max_density=0.45)
    cap = math.floor(0.45 * capped.total)
    assert capped.total == 2_300_000
    # The unconstrained optimum keeps more than the cap, so the capped optimum fills it.
    assert free.kept > cap
    assert capped.cap_met and capped.kept == cap
    assert capped.objective <= free.objective
    # Zero importance keeps exactly the stability-fixed set, which the capped mask must hold.
    fixed_only = reconfigure(
        *args[:2],
        {n: torch.zeros_like(g) for n, g in args[2].items()},
        args[3],
        fixed_time_s=0.5,
        max_density=0.45,
    )
    for name, fixed in fixed_only.masks.items():
        assert not bool((fixed & ~capped.masks[name]).any())
    assert isinstance(capped, Reconfiguration)


# --------------------------------------------------------------------------- validation


def _valid_kwargs():
    return {
        "weights": {"w": torch.ones(2, 3)},
        "masks": {"w": torch.ones(2, 3, dtype=torch.bool)},
        "importance": {"w": torch.ones(2, 3)},
        "time_per_param": {"w": 1.0},
        "fixed_time_s": 1.0,
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weights": {"v": torch.ones(2, 3)}}, "weights keys"),
        ({"time_per_param": {"w": 1.0, "extra": 1.0}}, "time_per_param keys"),
        ({"importance": {"w": torch.ones(3, 2)}}, "shape"),
        ({"masks": {"w": torch.ones(2, 3)}}, "torch.bool"),
        ({"importance": {"w": -torch.ones(2, 3)}}, "negative"),
        ({"importance": {"w": torch.full((2, 3), math.nan)}}, "non-finite"),
        ({"importance": {"w": torch.full((2, 3), math.inf)}}, "non-finite"),
        ({"importance": {"w": torch.full((2, 3), -math.inf)}}, "non-finite"),
        ({"importance": {"w": torch.tensor([[1.0, math.nan, 2.0], [0, 0, 0]])}}, "non-finite"),
        ({"time_per_param": {"w": -1.0}}, "time_per_param"),
        ({"fixed_time_s": 0.0}, "fixed_time_s"),
        ({"fixed_importance": -1.0}, "fixed_importance"),
        ({"delta": 1.5}, "delta"),
        ({"delta": -0.1}, "delta"),
        ({"max_density": 0.0}, "max_density"),
        ({"max_density": 1.1}, "max_density"),
    ],
)
def test_invalid_inputs_raise(change, message):
    kwargs = _valid_kwargs() | change
    with pytest.raises(ValueError, match=message):
        reconfigure(**kwargs)


def test_valid_inputs_pass():
    result = reconfigure(**_valid_kwargs())
    assert result.kept == 6 and result.total == 6


def test_empty_masks():
    result = reconfigure({}, {}, {}, {}, fixed_time_s=2.0, fixed_importance=1.0)
    assert result.kept == result.total == 0 and result.objective == 0.5


# --------------------------------------------------------------------------- delta schedule


def test_stability_delta_halves_at_half_life():
    assert stability_delta(0) == pytest.approx(0.3)
    assert stability_delta(50) == pytest.approx(0.15)
    assert stability_delta(100, initial=0.4, half_life=50) == pytest.approx(0.1)
    assert stability_delta(1000, half_life=0) == 0.3
    assert stability_delta(1000, half_life=math.inf) == 0.3
