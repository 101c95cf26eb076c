"""A node builds its model from the values the server sent, each layer already in its
format (`fedprune.sparse.model_in_formats`): a sparse layer never exists dense on the
node, and its round and reply are exactly those of a dense model converted for the round
(`fedprune.sparse.to_formats`), as nodes trained before."""

import numpy as np
import pytest
import torch

from fedprune.codec import (
    decode_kept,
    decode_model,
    encode_kept_update,
    encode_model,
    encode_update,
)
from fedprune.models import build_model, param_shapes, prunable_names, skeleton, with_parameters
from fedprune.sparse import (
    SparseLinear,
    kept_parameters,
    layer_formats,
    model_in_formats,
    train_sparse,
)
from fedprune.sparse_conv import sparse_conv_available
from tests.test_layer_format import NAMES, masks_at
from tests.test_sparse_conv import toy_data

MIXED = {
    "conv1.weight": "dense",
    "conv2.weight": "sparse-conv",
    "fc1.weight": "csr",
    "fc2.weight": "dense",
}


def message(name="small-cnn", density=0.2, seed=1):
    """(the server's message with masks, the masks, the model's shapes and prunable names)."""
    server = build_model(name, seed=seed)
    masks = masks_at(server, dict.fromkeys(NAMES, density), seed=seed)
    with torch.no_grad():
        params = {n: p * masks[n] if n in masks else p for n, p in server.named_parameters()}
    arrays = encode_model(params, masks, include_masks=True)
    return arrays, masks, param_shapes(server), prunable_names(server)


def seeded():
    return torch.Generator().manual_seed(0)


def copied(arrays):
    return {k: v.copy() for k, v in arrays.items()}


@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 1e-3)])
def test_a_round_from_the_kept_values_is_the_round_from_the_dense_model(
    track, momentum, weight_decay
):
    arrays, _, shapes, prunable = message()
    kw = dict(steps=3, batch_size=8, lr=0.5, momentum=momentum, weight_decay=weight_decay,
              track_importance=track, formats=MIXED)  # fmt: skip

    # Each path gets its own copy: a decoded message's whole parameters (biases) are its
    # arrays, and training changes them in place.
    params, masks = decode_model(copied(arrays), shapes, prunable, None)
    dense = with_parameters(skeleton("small-cnn"), params)
    before = train_sparse(dense, masks, toy_data(), generator=seeded(), **kw)
    imp = {n: before.importance[n] for n in masks} if track else None
    old_reply = encode_update({n: p.detach() for n, p in dense.named_parameters()}, masks, imp)

    kept, masks = decode_kept(copied(arrays), shapes, prunable, None)
    model = model_in_formats(skeleton("small-cnn"), kept, masks, MIXED)
    now = train_sparse(model, masks, toy_data(), generator=seeded(), **kw)
    imp = {n: now.importance[n] for n in masks} if track else None
    new_reply = encode_kept_update(kept_parameters(model, masks), masks, imp)

    assert now.formats == before.formats == layer_formats(model)
    assert isinstance(model.fc1, SparseLinear)  # trained as built, not converted back
    assert sorted(new_reply) == sorted(old_reply)
    for key in old_reply:
        assert np.array_equal(new_reply[key], old_reply[key]), key
    assert now.loss == before.loss


def test_a_sparse_layer_is_never_dense_on_the_node():
    """Conv-2 at the main job's final fc1 density: the node's fc1 holds its kept values
    and their structure, never a tensor the size of the dense weight."""
    arrays, _, shapes, prunable = message("conv2", density=0.05, seed=0)
    kept, masks = decode_kept(arrays, shapes, prunable, None)
    formats = dict(MIXED) if sparse_conv_available() else {**MIXED, "conv2.weight": "dense"}
    model = model_in_formats(skeleton("conv2"), kept, masks, formats)
    dense_size = shapes["fc1.weight"][0] * shapes["fc1.weight"][1]
    fc1 = model.fc1
    assert isinstance(fc1, SparseLinear)
    held = [*fc1.parameters(), *fc1.buffers()]
    assert max(t.numel() for t in held) < 0.1 * dense_size
    # What the decoded message holds for fc1 is its kept values too.
    assert kept["fc1.weight"].numel() == int(masks["fc1.weight"].sum()) < 0.1 * dense_size
    assert layer_formats(model) == formats


def test_the_reply_of_an_untrained_node_is_what_the_server_sent():
    arrays, _, shapes, prunable = message()
    kept, masks = decode_kept(arrays, shapes, prunable, None)
    sent = {k: v.copy() for k, v in arrays.items() if k.startswith("v/")}
    model = model_in_formats(skeleton("small-cnn"), kept, masks, MIXED)
    reply = encode_kept_update(kept_parameters(model, masks), masks)
    assert list(reply) == list(sent)  # the wire's order: the dense model's parameters
    for key, values in sent.items():
        assert np.array_equal(reply[key], values), key
        assert not np.shares_memory(reply[key], arrays[key])  # copied, not aliased


def test_values_that_do_not_fit_the_model_are_refused():
    arrays, _, shapes, prunable = message()
    kept, masks = decode_kept(arrays, shapes, prunable, None)
    missing = {k: v for k, v in kept.items() if k != "fc2.bias"}
    with pytest.raises(ValueError, match=r"missing.*fc2\.bias"):
        model_in_formats(skeleton("small-cnn"), missing, masks, MIXED)
    extra = {**kept, "fc9.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"extra.*fc9\.weight"):
        model_in_formats(skeleton("small-cnn"), extra, masks, MIXED)
    short = {**kept, "fc1.weight": kept["fc1.weight"][:-1]}
    with pytest.raises(ValueError, match="mask keeps"):
        model_in_formats(skeleton("small-cnn"), short, masks, MIXED)
    with pytest.raises(ValueError, match="mask keeps"):
        encode_kept_update(short, masks)
