"""The server computes in sparse formats where its mask allows: PruneFL's phase 1 trains
its pruned layers sparse between reconfigurations, and the global model is evaluated with
its pruned layers sparse. Both must give what the dense computation gives."""

import copy
import dataclasses
from functools import partial

import pytest
import torch
from torch import nn

from fedprune.costs import named_profile
from fedprune.data import DataSpec, heldout_split, server_share
from fedprune.global_model import GlobalModel
from fedprune.initial_pruning import _dense_importance, _train_block, initial_prune
from fedprune.masks import full_masks
from fedprune.models import build_model, prunable_names, skeleton
from fedprune.sparse import (
    choose_formats,
    restore_dense,
    sparse_layers,
    to_formats,
)
from fedprune.sparse_conv import sparse_conv_available
from fedprune.training import evaluate, train_masked
from strategies.server_formats import GlobalEvaluation

DATA = server_share(DataSpec())


def random_masks(model, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(p.shape, generator=g) < density
        for n, p in model.named_parameters()
        if n in full_masks(model)
    }


def pruned_model(density, seed=0):
    model = build_model("small-cnn", seed=seed)
    masks = random_masks(model, density, seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    return model, masks


def every_layer_sparse(model):
    return lambda masks: choose_formats(model, masks, "sparse")


def test_a_sparse_block_trains_and_scores_the_kept_weights_as_the_dense_block_does():
    dense, masks = pruned_model(0.3)
    sparse = copy.deepcopy(dense)
    originals = to_formats(sparse, masks, every_layer_sparse(sparse)(masks))
    assert sparse_layers(sparse), "nothing converted"
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    want = train_masked(dense, masks, DATA, steps=5, batch_size=20, lr=0.1, generator=g1)
    importance, samples, _ = _train_block(sparse, masks, DATA, 5, 20, 0.1, g2)
    assert samples == 5 * 20
    got = _dense_importance(sparse, importance)
    restore_dense(sparse, originals)
    params = dict(sparse.named_parameters())
    for name, p in dense.named_parameters():
        torch.testing.assert_close(params[name], p, rtol=1e-4, atol=1e-5)
        keep = masks.get(name, torch.ones_like(p, dtype=torch.bool))
        torch.testing.assert_close(
            got[name][keep], want.importance[name][keep], rtol=1e-3, atol=1e-7
        )
        assert torch.all(got[name][~keep] == 0)
    assert list(got) == list(want.importance)  # the dense model's names, in its order


def test_phase1_in_dense_formats_is_phase1_without_formats():
    def run(formats_for):
        model = build_model("small-cnn", seed=0)
        profile = named_profile("paper-uniform", prunable_names(model))
        result = initial_prune(
            model, DATA, profile, num_classes=10, lr=0.1, batch_size=20, local_steps=5,
            interval=20, max_iterations=60, seed=0, formats_for=formats_for,
        )  # fmt: skip
        return model, result

    model_a, a = run(None)
    model_b, b = run(lambda masks: {n: "dense" for n in masks})
    assert a.history == b.history
    for n, m in a.masks.items():
        assert torch.equal(m, b.masks[n])
    for (n, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_phase1_with_sparse_layers_prunes_and_ends_with_the_dense_model():
    model = build_model("small-cnn", seed=0)
    params_before = list(model.parameters())
    profile = named_profile("paper-uniform", prunable_names(model))
    formats_seen = []

    def formats_for(masks):
        formats = choose_formats(model, masks, "sparse")
        formats_seen.append(formats)
        return formats

    result = initial_prune(
        model, DATA, profile, num_classes=10, lr=0.1, batch_size=20, local_steps=5,
        interval=20, max_iterations=200, seed=0, formats_for=formats_for,
    )  # fmt: skip
    assert result.history, "no reconfiguration happened"
    # Once per mask the phase trained: the first, and each after a reconfiguration that
    # came before the last iteration.
    trained_masks = 1 + sum(1 for iteration, *_ in result.history if iteration < result.iterations)
    assert len(formats_seen) == trained_masks
    assert any(f == "csr" for formats in formats_seen for f in formats.values())
    # The model is dense again: its own modules and parameter objects, pruned weights 0.
    assert not sparse_layers(model)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params_before]
    params = dict(model.named_parameters())
    for name, mask in result.masks.items():
        assert torch.all(params[name][~mask] == 0)
        assert mask.sum() < mask.numel()
    sizes = [kept for _, kept, _ in result.history]
    assert sizes == sorted(sizes, reverse=True)


def test_phase1_puts_the_dense_layers_back_when_training_fails():
    model = build_model("small-cnn", seed=0)
    profile = named_profile("paper-uniform", prunable_names(model))
    calls = []

    def formats_for(masks):
        calls.append(1)
        return choose_formats(model, masks, "sparse")

    labels = DATA.y.clone()
    labels[0] = 10**6  # a label out of range: cross-entropy raises
    broken = dataclasses.replace(DATA, y=labels)
    with pytest.raises((IndexError, RuntimeError)):
        initial_prune(
            model, broken, profile, num_classes=10, lr=0.1, batch_size=len(broken),
            local_steps=1, interval=20, max_iterations=5, seed=0, formats_for=formats_for,
        )  # fmt: skip
    assert calls and not sparse_layers(model)
    assert all(isinstance(m, nn.Linear | nn.Conv2d) for m in (model.fc1, model.conv1))


@pytest.mark.parametrize("formats", ["sparse", "dense"])
def test_the_global_evaluation_in_sparse_formats_scores_as_dense(formats):
    model, masks = pruned_model(0.2, seed=1)
    global_model = GlobalModel(dict(model.named_parameters()), masks)
    data = heldout_split(DataSpec())
    reference = build_model("small-cnn", seed=5)
    reference.load_state_dict(global_model.masked_params())
    want_loss, want_acc = evaluate(reference, data)
    used = []

    def formats_for(masks):
        chosen = choose_formats(reference, masks, formats)
        used.append(chosen)
        return chosen

    evaluation = GlobalEvaluation(partial(skeleton, "small-cnn"), data, formats_for)
    for _ in range(2):  # twice: each call builds its own model
        loss, acc = evaluation(global_model.kept_values(), global_model.masks)
        assert acc == want_acc
        assert loss == pytest.approx(want_loss, rel=1e-5)
    # the strategy's model is read, never changed
    assert torch.equal(global_model.masked_params()["fc1.weight"], reference.fc1.weight)
    if formats == "sparse":
        assert used[-1]["fc1.weight"] == "csr"
        if sparse_conv_available():
            assert used[-1]["conv1.weight"] == "sparse-conv"
