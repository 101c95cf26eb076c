import pytest

from fedprune.costs import (
    PAPER_COMM_S_PER_PARAM,
    CostProfile,
    named_profile,
)
from fedprune.models import build_model, prunable_names


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
    assert p.fixed_time_s(never_pruned_params=3) == pytest.approx(1.0 + 3 * 8e-3)
    assert CostProfile.from_dict(p.to_dict()) == p


def test_profiles_check_the_model_shape():
    with pytest.raises(ValueError, match="4 layers"):
        named_profile("paper-conv2", ["a.weight", "b.weight"])
    uniform = named_profile("paper-uniform", ["a.weight", "b.weight"])
    assert uniform.comm_s_per_param == PAPER_COMM_S_PER_PARAM
    with pytest.raises(ValueError, match="unknown cost profile"):
        named_profile("nope", [])
