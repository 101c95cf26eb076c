"""The compression-only reference: top-k updates with error feedback. A node sends at most
k values plus their coded positions, its error memory carries exactly what it did not
send, the server adds the sample-weighted mean of the sparse updates into the dense model,
and the decoder refuses malformed input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedprune import protocol as P
from fedprune.codec import CodecError
from fedprune.costs import named_profile
from fedprune.masks import full_masks
from fedprune.models import build_model, prunable_names
from fedprune.settings import Settings
from fedprune.topk import (
    add_sparse,
    budget,
    decode_positions,
    decode_sparse,
    encode_positions,
    encode_sparse,
    topk_step,
)
from strategies.compression import TopKCompression
from tests.inprocess import Federation

SHAPES = {"w": (6, 7), "b": (5,)}


def tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * scale for n, s in SHAPES.items()}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(0, 60), with_error=st.booleans())
def test_topk_step_sends_at_most_k_largest_and_keeps_the_rest_exactly(seed, k, with_error):
    update = tensors(seed)
    error = tensors(seed + 1, 0.5) if with_error else None
    sent, new_error = topk_step(update, error, k)
    total = {n: update[n] + (error[n] if error else 0) for n in SHAPES}
    count = sum(len(p) for p, _ in sent.values())
    assert count == min(k, 47)
    # Sent plus the new error memory is update plus the old memory, entry for entry.
    rebuilt = add_sparse(new_error, sent)
    for n in SHAPES:
        assert torch.equal(rebuilt[n], total[n].reshape(-1)), n
    smallest_sent = min((float(v.abs().min()) for _, v in sent.values()), default=math.inf)
    largest_kept = max(float(e.abs().max()) for e in new_error.values())
    assert smallest_sent >= largest_kept or count == 0


@settings(max_examples=80, deadline=None)
@given(st.sets(st.integers(0, 2**32 - 1), max_size=50))
def test_positions_round_trip_in_at_most_five_bytes_each(chosen):
    positions = np.array(sorted(chosen), dtype=np.int64)
    data = encode_positions(positions)
    assert data.dtype == np.uint8 and data.size <= 5 * len(positions)
    assert np.array_equal(decode_positions("tp/x", data, len(positions), 2**32), positions)


def test_dense_runs_of_positions_cost_one_byte_each():
    assert encode_positions(np.arange(0, 1000, 3)).size == 334


def test_sparse_update_round_trips():
    sent, _ = topk_step(tensors(0), None, 10)
    arrays = encode_sparse(sent)
    assert set(arrays) <= {"tp/w", "tv/w", "tp/b", "tv/b"}
    back = decode_sparse(arrays, SHAPES, 10)
    for n, (p, v) in sent.items():
        assert torch.equal(back[n][0], p) and torch.equal(back[n][1], v)


@pytest.mark.parametrize(
    "tamper, match",
    [
        (lambda a: {**a, "v/w": a["tv/w"]}, "unexpected key 'v/w'"),
        (lambda a: {**a, "tv/zz": a["tv/w"], "tp/zz": a["tp/w"]}, "unexpected key 'tv/zz'"),
        (lambda a: {k: v for k, v in a.items() if k != "tp/w"}, "unpaired"),
        (lambda a: {**a, "tv/w": a["tv/w"].astype(np.float64)}, "'tv/w'.*float32"),
        (lambda a: {**a, "tv/w": np.full_like(a["tv/w"], np.nan)}, "'tv/w'.*non-finite"),
        (lambda a: {**a, "tp/w": a["tp/w"][:-1]}, "'tp/w'"),
        (lambda a: {**a, "tp/w": np.full(a["tp/w"].size, 0x80, np.uint8)}, "'tp/w'.*truncated"),
        (lambda a: {**a, "tp/w": encode_positions(np.arange(3)) * 0}, "'tp/w'.*increasing"),
        (lambda a: {**a, "tp/w": encode_positions(np.array([0, 1, 42]))}, "'tp/w'.*outside"),
        (lambda a: {**a, "tp/w": np.array([0xFF] * 5 + [1, 1, 1], np.uint8)}, "'tp/w'"),
    ],
)
def test_the_decoder_refuses_malformed_updates(tamper, match):
    sent, _ = topk_step(tensors(0), None, 6)
    sent = {"w": (torch.tensor([1, 5, 9]), torch.ones(3)), "b": sent.get("b", sent["w"])}
    sent["b"] = (torch.tensor([0, 4]), torch.ones(2))
    arrays = encode_sparse(sent)
    with pytest.raises(CodecError, match=match):
        decode_sparse(tamper(arrays), SHAPES, 6)


def test_the_decoder_refuses_more_values_than_k_before_decoding_positions():
    sent, _ = topk_step(tensors(0), None, 8)
    with pytest.raises(CodecError, match="at most"):
        decode_sparse(encode_sparse(sent), SHAPES, 7)


def test_budget_is_what_a_model_pruned_to_the_density_sends():
    assert budget(0.1, 1000, 30) == 130
    assert budget(1e-9, 10, 0) == 1


def test_nodes_send_topk_updates_keep_error_memory_and_the_server_adds_the_mean():
    cfg = Settings(
        method="topk",
        target_density=0.05,
        model="small-cnn",
        cost_profile="paper-uniform",
        local_steps=2,
        batch_size=10,
        clients_per_round=3,
    )
    model = build_model("small-cnn", seed=0)
    strategy = TopKCompression(
        params={n: p.detach().clone() for n, p in model.named_parameters()},
        masks=full_masks(model),
        profile=named_profile("paper-uniform", prunable_names(model)),
        clients_per_round=3,
        **TopKCompression.options(cfg),
    )
    shapes = strategy.model.shapes
    k = strategy.k
    assert k == budget(
        0.05, sum(m.numel() for m in strategy.masks.values()), strategy.model.never_pruned
    )
    fed = Federation(cfg, 3)
    before = {n: t.clone().reshape(-1) for n, t in strategy.model.params.items()}
    messages, replies, _ = fed.train_round(strategy, 1)
    assert all(int(m.content[P.CONFIG][P.TOPK_VALUES]) == k for m in messages)
    expected_sum = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in before.items()}
    weight = 0
    for reply in replies:
        record = reply.content[P.ARRAYS]
        arrays = {key: record[key].numpy() for key in record}
        assert all(key.split("/")[0] in ("tp", "tv") for key in arrays)
        sparse = decode_sparse(arrays, shapes, k)
        values = sum(len(v) for _, v in sparse.values())
        assert values <= k
        # Positions cost 1 to 5 bytes each, values 4: far below the dense model's 4 per entry.
        assert sum(a.nbytes for a in arrays.values()) <= 9 * values
        # Its error memory is zero where it sent and never larger than what it sent.
        state = fed.contexts[reply.metadata.src_node_id].state[P.STATE_TOPK_ERROR]
        error = {n: torch.from_numpy(state[n].numpy()).reshape(-1) for n in shapes}
        assert sum(int((e != 0).sum()) for e in error.values()) > 0
        smallest_sent = min(float(v.abs().min()) for _, v in sparse.values())
        assert max(float(e.abs().max()) for e in error.values()) <= smallest_sent
        for n, (p, _) in sparse.items():
            assert torch.all(error[n][p] == 0)
        n_examples = int(reply.content[P.METRICS][P.NUM_EXAMPLES])
        weight += n_examples
        for n, (p, v) in sparse.items():
            expected_sum[n].index_add_(0, p, v.double() * n_examples)
    after = {n: t.reshape(-1) for n, t in strategy.model.params.items()}
    for n in before:
        assert torch.allclose(after[n] - before[n], (expected_sum[n] / weight).float(), atol=1e-6)
    # A second round: the nodes' memories carry on (not reset) and still hold back the rest.
    fed.train_round(strategy, 2)
    assert strategy.stats[2].replies == 3
