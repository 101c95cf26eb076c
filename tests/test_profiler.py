import math

import pytest
import torch
from flwr.app import ConfigRecord  # the record a profile travels in

from fedprune.models import build_model, prunable_names
from fedprune.profiler import (
    crossover_density,
    csr_max_densities,
    fit_level,
    fit_line,
    format_report,
    profile_device,
    profile_from_measurements,
    sparse_crossovers,
)
from fedprune.sparse_conv import sparse_conv_available

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")


@pytest.fixture(scope="module")
def profiled():
    model = build_model("small-cnn", seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    profile, measurements = profile_device(model, 2, 8, 1e6, densities=(1.0, 0.3, 0.05), repeats=1)
    return model, before, profile, measurements


def test_profile_has_one_finite_non_negative_slope_per_prunable_layer(profiled):
    model, _, profile, measurements = profiled
    names = prunable_names(model)
    assert list(profile.compute_s_per_param) == names
    for name, slope in profile.compute_s_per_param.items():
        assert math.isfinite(slope) and slope >= 0, name
    assert math.isfinite(profile.fixed_s) and profile.fixed_s >= 0
    assert profile.comm_s_per_param == pytest.approx(8 / 1e6)
    assert measurements["layers"] == names
    for name in names:
        formats = measurements[f"{name}/formats"]
        conv = "sparse-conv" if sparse_conv_available() else None
        sparse = "csr" if name.startswith("fc") else conv
        assert formats == (["dense", sparse] if sparse else ["dense"])
        assert measurements[f"{name}/sparse_format"] == (sparse or "none")
        assert len(measurements[f"{name}/fastest"]) == 3
        for f in formats:
            secs = measurements[f"{name}/{f}/seconds"]
            assert len(secs) == len(measurements[f"{name}/{f}/densities"])
            assert all(math.isfinite(s) and s > 0 for s in secs)
            assert measurements[f"{name}/{f}/slope_s_per_param"] >= 0
            assert measurements[f"{name}/{f}/intercept_s"] >= 0
    # Sparse formats are timed at 0.5 and below only.
    assert measurements["fc1.weight/csr/densities"] == [0.3, 0.05]
    assert set(csr_max_densities(measurements)) == {"fc1.weight", "fc2.weight"}
    if sparse_conv_available():
        assert measurements["conv2.weight/sparse-conv/densities"] == [0.3, 0.05]
        assert sparse_crossovers(measurements)["conv2.weight"][0] == "sparse-conv"
        assert set(sparse_crossovers(measurements)) == set(names)


def test_measurements_are_flat_plain_values_that_rebuild_the_profile(profiled):
    _, _, profile, measurements = profiled
    scalars = (str, int, float, bool)
    for key, value in measurements.items():
        assert isinstance(key, str)
        if isinstance(value, list):
            assert value and all(isinstance(v, type(value[0])) for v in value), key
            assert isinstance(value[0], scalars), key
        else:
            assert isinstance(value, scalars), key
    assert profile_from_measurements(measurements) == profile
    record = ConfigRecord(measurements)
    assert profile_from_measurements(dict(record)) == profile
    assert profile_from_measurements(dict(record)).layer_costs == profile.layer_costs
    assert "fc1.weight" in format_report(measurements)


def test_profiling_leaves_the_model_alone_and_reports_its_time(profiled):
    model, before, _, measurements = profiled
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    calibration = measurements["calibration/measured_s"]
    assert len(calibration) == len(measurements["calibration/densities"]) == 4
    assert all(t > 0 for t in calibration) and measurements["check/predicted_s"] > 0
    # The whole profile took at least the calibration rounds it reports (their fastest).
    assert measurements["seconds"] >= sum(calibration)


def test_profile_knows_each_layers_format_and_cost_by_density(profiled):
    model, _, profile, measurements = profiled
    crossovers = sparse_crossovers(measurements)
    assert set(profile.layer_costs) == set(prunable_names(model))
    for name, layer in profile.layer_costs.items():
        assert layer.numel == measurements[f"{name}/numel"]
        assert all(math.isfinite(v) and v >= 0 for v in layer.values()), name
        # The format choose_formats will use: sparse up to the measured crossover, else
        # dense.
        fmt, max_density = crossovers.get(name, ("none", 0.0))
        assert layer.sparse_max_density == max_density
        for density in measurements["densities"]:
            kept = int(density * layer.numel)
            sparse = layer.sparse_max_density > 0 and density <= layer.sparse_max_density
            assert layer.format_at(kept) == (fmt if sparse else "dense")
        # The solver's slope is the one of the format at low density.
        dense_low = layer.format_at(0) == "dense"
        low = layer.dense_s_per_param if dense_low else layer.sparse_s_per_param
        assert profile.compute_s_per_param[name] == pytest.approx(low)
    # fixed_s is the round at zero kept: the calibration rounds, less what the layers add.
    for density, measured, residual in zip(
        measurements["calibration/densities"],
        measurements["calibration/measured_s"],
        measurements["calibration/residual_s"],
        strict=True,
    ):
        assert math.isfinite(residual) and residual < measured, density
    profile.check()


def test_layer_costs_travel_in_the_flat_dict_and_follow_the_speed_factor(profiled):
    _, _, profile, measurements = profiled
    from clients.client_app import scaled_measurements  # what a simulated node replies

    record = dict(ConfigRecord(scaled_measurements(measurements, 2.5, 4e6)))
    slow = profile_from_measurements(record)
    expected = profile.scaled(2.5)
    assert slow.fixed_s == pytest.approx(expected.fixed_s)
    assert slow.compute_s_per_param == pytest.approx(expected.compute_s_per_param)
    for name, layer in expected.layer_costs.items():
        assert slow.layer_costs[name].values() == pytest.approx(layer.values()), name
    kept = {name: layer.numel // 50 for name, layer in profile.layer_costs.items()}
    assert slow.compute_time_s(kept) == pytest.approx(2.5 * profile.compute_time_s(kept))
    # A dict from profiler version 1 (no per-format lines) gives a linear profile.
    old = {k: v for k, v in measurements.items() if not k.endswith("/formats")}
    assert profile_from_measurements(old).layer_costs == {}


def test_fit_line_recovers_a_line_and_keeps_both_terms_non_negative():
    slope, intercept = fit_line([0, 10, 20], [1.0, 2.0, 3.0])
    assert slope == pytest.approx(0.1) and intercept == pytest.approx(1.0)
    assert fit_line([0, 10, 20], [3.0, 2.0, 1.0]) == (0.0, pytest.approx(2.0))
    slope, intercept = fit_line([10, 20, 30], [0.5, 2.0, 3.0])
    assert intercept == 0.0 and slope > 0
    assert fit_line([5], [0.2]) == (0.0, 0.2)
    # A slope within the noise (well under two standard errors) is no slope.
    assert fit_line([0, 10, 20, 30], [1.0, 1.5, 0.9, 1.4]) == (0.0, pytest.approx(1.2))


def test_fit_level_recovers_scale_and_fixed_cost_and_keeps_them_sane():
    variable = [0.01, 0.02, 0.05, 0.1]
    measured = [0.06 + 1.2 * v for v in variable]
    scale, fixed = fit_level(variable, measured)
    assert scale == pytest.approx(1.2) and fixed == pytest.approx(0.06)
    # Bounded: rounds that say the layer costs are 10x off move them at most 2x.
    assert fit_level(variable, [0.06 + 10 * v for v in variable])[0] == 2.0
    # One distinct variable tells no scale: 1.0, and the fixed cost is the residual.
    assert fit_level([0.02, 0.02], [0.08, 0.08]) == (1.0, pytest.approx(0.06))


def test_profile_device_rejects_bad_arguments():
    model = build_model("small-cnn", seed=0)
    with pytest.raises(ValueError, match="bandwidth"):
        profile_device(model, 1, 4, 0.0)
    with pytest.raises(ValueError, match="densities"):
        profile_device(model, 1, 4, 1e6, densities=(0.0,))


def test_crossover_density_interpolates_between_measured_densities():
    dense = {0.01: 10.0, 0.1: 10.0, 0.3: 10.0, 0.5: 10.0}
    assert crossover_density(dense, {0.01: 2.0, 0.1: 6.0, 0.3: 14.0, 0.5: 22.0}) == (
        pytest.approx(0.2)
    )
    assert crossover_density(dense, {0.01: 11.0, 0.1: 12.0}) == 0.0
    assert crossover_density(dense, {0.01: 1.0, 0.5: 9.0}) == 0.5
