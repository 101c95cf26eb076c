import json
from dataclasses import replace

import pytest

from fedprune.costs import (
    BYTES_PER_VALUE_ROUND_TRIP,
    PAPER_COMM_S_PER_PARAM,
    CostProfile,
    LayerCost,
    named_profile,
    slowest,
)
from fedprune.models import build_model, output_positions, prunable_names


def test_paper_profile_reproduces_the_papers_dense_round():
    names = prunable_names(build_model("conv2", num_classes=62))
    profile = named_profile("paper-conv2", names)
    dense = {
        "conv1.weight": 800,
        "conv2.weight": 51_200,
        "fc1.weight": 6_422_528,
        "fc2.weight": 126_976,
    }
    assert profile.compute_time_s(dense) == pytest.approx(2.25)
    assert profile.time_per_param()["fc1.weight"] == pytest.approx(1.93e-7 + 5.56e-6)


def test_round_time_adds_compute_and_communication():
    p = CostProfile("t", {"a": 1e-3, "b": 2e-3}, comm_s_per_param=8e-3, fixed_s=1.0)
    # 8 bytes (one value down and up) cost comm_s_per_param.
    assert p.round_time_s({"a": 10, "b": 5}, bytes_moved=80) == pytest.approx(
        1.0 + 10e-3 + 10e-3 + 80e-3
    )
    # The solver's constant is the modelled round of a model with every prunable weight
    # pruned: the fixed cost plus moving the 3 never-pruned values.
    empty = p.round_time_s({"a": 0, "b": 0}, bytes_moved=3 * BYTES_PER_VALUE_ROUND_TRIP)
    assert p.fixed_time_s(never_pruned_params=3) == pytest.approx(empty)
    assert CostProfile.from_dict(p.to_dict()) == p


def test_profiles_check_the_model_shape():
    with pytest.raises(ValueError, match="4 layers"):
        named_profile("paper-conv2", ["a.weight", "b.weight"])
    uniform = named_profile("paper-uniform", ["a.weight", "b.weight"])
    assert uniform.comm_s_per_param == PAPER_COMM_S_PER_PARAM
    with pytest.raises(ValueError, match="unknown cost profile"):
        named_profile("nope", [])


def piecewise_profile() -> CostProfile:
    """fc: CSR (2 ms + 1e-6 s per kept) up to density 0.25 of 1,000 weights, masked dense
    (10 ms) above; conv: masked dense only (3 ms)."""
    return CostProfile(
        "measured",
        {"conv.weight": 0.0, "fc.weight": 1e-6},
        comm_s_per_param=8e-6,
        fixed_s=0.020,
        layer_costs={
            "conv.weight": LayerCost(numel=100, dense_s_per_param=0.0, dense_fixed_s=0.003),
            "fc.weight": LayerCost(
                numel=1000,
                dense_s_per_param=0.0,
                dense_fixed_s=0.010,
                sparse_max_density=0.25,
                sparse_s_per_param=1e-6,
                sparse_fixed_s=0.002,
            ),
        },
    )


def test_layer_cost_picks_the_format_the_device_trains_in_by_density():
    fc = piecewise_profile().layer_costs["fc.weight"]
    assert [fc.format_at(k) for k in (0, 10, 250, 251, 1000)] == [
        "csr",
        "csr",
        "csr",  # at the crossover itself, as train_sparse: CSR while density <= it
        "dense",
        "dense",
    ]
    assert fc.seconds(100) == pytest.approx(0.002 + 100e-6)
    assert fc.seconds(600) == fc.seconds(1000) == pytest.approx(0.010)
    conv = piecewise_profile().layer_costs["conv.weight"]
    assert conv.format_at(0) == conv.format_at(100) == "dense"  # no crossover: never CSR


def test_piecewise_compute_time_is_linear_below_the_crossover_and_flat_above():
    p = piecewise_profile()
    linear = CostProfile("t", p.compute_s_per_param, p.comm_s_per_param, p.fixed_s)
    sparse = {"conv.weight": 70, "fc.weight": 200}
    # In the low-density format the piecewise and the solver's linear model agree ...
    assert p.compute_time_s(sparse) == pytest.approx(linear.compute_time_s(sparse))
    assert p.compute_time_s(sparse) == pytest.approx(0.020 + 200e-6)
    assert p.layer_formats(sparse) == {"conv.weight": "dense", "fc.weight": "csr"}
    # ... above the crossover fc trains masked dense: its dense cost replaces the CSR one
    # that fixed_s holds, and does not grow with kept parameters.
    for kept in (300, 1000):
        dense = {"conv.weight": 100, "fc.weight": kept}
        assert p.compute_time_s(dense) == pytest.approx(0.020 - 0.002 + 0.010)
    assert linear.compute_time_s({"conv.weight": 100, "fc.weight": 1000}) == pytest.approx(0.021)
    # The solver's interface is the linear one.
    assert p.time_per_param() == pytest.approx({"conv.weight": 8e-6, "fc.weight": 1e-6 + 8e-6})
    assert p.fixed_time_s(5) == pytest.approx(0.020 + 5 * 8e-6)


def test_layer_costs_survive_to_dict_and_json():
    p = piecewise_profile()
    assert CostProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    old = {k: v for k, v in p.to_dict().items() if k != "layer_costs"}
    assert CostProfile.from_dict(old).layer_costs == {}  # a summary.json from before


def test_slowest_of_speed_scaled_profiles_is_the_slowest_one():
    p = piecewise_profile()
    slow = p.scaled(3.0)
    assert slow.layer_costs["fc.weight"].sparse_fixed_s == pytest.approx(0.006)
    assert slow.layer_costs["fc.weight"].sparse_max_density == 0.25
    both = slowest([p, slow])
    assert both.layer_costs == slow.layer_costs
    assert both.fixed_s == slow.fixed_s and both.compute_s_per_param == slow.compute_s_per_param
    for kept in (0, 100, 250, 600):
        k = {"conv.weight": 50, "fc.weight": kept}
        assert both.compute_time_s(k) == pytest.approx(3 * p.compute_time_s(k))
    # Different crossovers: the lowest one, an upper bound on the slowest node's cost.
    other = replace(
        p,
        layer_costs={
            **p.layer_costs,
            "fc.weight": replace(p.layer_costs["fc.weight"], sparse_max_density=0.1),
        },
    )
    assert slowest([p, other]).layer_costs["fc.weight"].sparse_max_density == 0.1
    # A profile without layer costs makes the slowest one linear.
    assert slowest([p, CostProfile("t", p.compute_s_per_param, 1e-6, 0.0)]).layer_costs == {}


def test_check_rejects_bad_layer_costs():
    p = piecewise_profile()
    p.check()
    bad = replace(p.layer_costs["fc.weight"], sparse_fixed_s=float("nan"))
    with pytest.raises(ValueError, match="finite"):
        replace(p, layer_costs={**p.layer_costs, "fc.weight": bad}).check()
    with pytest.raises(ValueError, match="does not have"):
        replace(p, layer_costs={**p.layer_costs, "x.weight": p.layer_costs["fc.weight"]}).check()


def test_paper_scaled_prices_layers_by_type_and_output_positions():
    model = build_model("conv2")
    positions = output_positions(model, (1, 28, 28))
    assert positions == {"conv1.weight": 784, "conv2.weight": 196, "fc1.weight": 0,
                         "fc2.weight": 0}  # fmt: skip
    profile = named_profile("paper-scaled", prunable_names(model), positions)
    # On Conv-2 itself: conv2 at the paper's conv2 slope, 37x fc1's; fc layers at fc1's.
    assert profile.compute_s_per_param["conv2.weight"] == pytest.approx(7.1e-6)
    assert profile.compute_s_per_param["fc1.weight"] == pytest.approx(1.93e-7)
    assert profile.compute_s_per_param["fc2.weight"] == pytest.approx(1.93e-7)
    vgg = build_model("vgg11", input_shape=(3, 32, 32))
    names = prunable_names(vgg)
    vgg_positions = output_positions(vgg, (3, 32, 32))
    scaled = named_profile("paper-scaled", names, vgg_positions)
    # VGG-11's first convolution sees 32x32 positions, its last 2x2; the head is fc.
    assert vgg_positions[names[0]] == 1024 and vgg_positions[names[7]] == 4
    assert scaled.compute_s_per_param[names[0]] == pytest.approx(7.1e-6 * 1024 / 196)
    assert scaled.compute_s_per_param[names[-1]] == pytest.approx(1.93e-7)
    with pytest.raises(ValueError, match="output positions"):
        named_profile("paper-scaled", names)
