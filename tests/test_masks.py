import pytest
import torch
from torch.nn.utils import prune

from fedprune.masks import (
    apply_masks,
    attach,
    check_masks,
    density,
    from_prune_state,
    full_masks,
    layer_densities,
    masked_state,
    model_density,
    to_prune_state,
)
from fedprune.models import build_model, count_parameters, prunable_names


def random_masks(model, keep=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.shape, generator=g) < keep for n, m in full_masks(model).items()}


def test_prunable_weights_are_conv_and_linear_weights_only():
    model = build_model("conv2")
    assert prunable_names(model) == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    assert all(not n.endswith("bias") for n in full_masks(model))


def test_conv2_has_the_papers_parameter_count():
    assert count_parameters(build_model("conv2", num_classes=62)) == 6_603_710


def test_full_masks_have_density_one_and_biases_count_as_kept():
    model = build_model("small-cnn")
    masks = full_masks(model)
    check_masks(model, masks)
    assert density(masks) == 1.0
    assert all(d == 1.0 for d in layer_densities(masks).values())
    assert model_density(model, masks) == 1.0


def test_density_counts_kept_over_total():
    model = build_model("small-cnn")
    masks = {n: torch.zeros_like(m) for n, m in full_masks(model).items()}
    masks["fc2.weight"][0, :5] = True
    assert density(masks) == pytest.approx(5 / sum(m.numel() for m in masks.values()))
    biases = sum(p.numel() for n, p in model.named_parameters() if n not in masks)
    expected = (5 + biases) / count_parameters(model)
    assert model_density(model, masks) == pytest.approx(expected)


def test_apply_masks_zeroes_exactly_the_pruned_entries():
    model = build_model("small-cnn", seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = random_masks(model)
    apply_masks(model, masks)
    for n, p in model.named_parameters():
        if n in masks:
            assert torch.all(p[~masks[n]] == 0)
            assert torch.equal(p[masks[n]], before[n][masks[n]])
        else:
            assert torch.equal(p, before[n])
    state = masked_state(before, masks)
    assert all(torch.equal(state[n], dict(model.named_parameters())[n]) for n in state)


def test_check_masks_rejects_wrong_names_shapes_and_dtypes():
    model = build_model("small-cnn")
    masks = full_masks(model)
    with pytest.raises(ValueError, match="cover"):
        check_masks(model, {k: v for k, v in masks.items() if k != "fc1.weight"})
    bad = dict(masks, **{"fc1.weight": masks["fc1.weight"].float()})
    with pytest.raises(ValueError, match=r"fc1\.weight"):
        check_masks(model, bad)


def test_prune_state_round_trip_matches_torch_nn_utils_prune():
    model = build_model("small-cnn", seed=2)
    masks = random_masks(model, seed=3)
    # Our export has the buffer names and values torch.nn.utils.prune uses.
    attach(model, masks)
    state = model.state_dict()
    exported = to_prune_state(masks)
    for key, value in exported.items():
        assert torch.equal(state[key], value)
    assert all(
        torch.equal(a, b)
        for a, b in zip(from_prune_state(state, masks).values(), masks.values(), strict=True)
    )
    # PyTorch's own pruning composes with ours: pruning more keeps our zeros.
    prune.l1_unstructured(model.fc1, "weight", amount=0.5)
    again = from_prune_state(model.state_dict(), ["fc1.weight"])["fc1.weight"]
    assert not torch.any(again & ~masks["fc1.weight"])


def test_from_prune_state_names_a_missing_mask():
    with pytest.raises(KeyError, match=r"fc1\.weight_mask"):
        from_prune_state({}, ["fc1.weight"])
