"""The value-code setting: kept values as quantised changes both ways (fedprune.value_code),
through the strategy and the ClientApp in one process."""

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.node_state import hold_value_memory, hold_values, value_memory
from fedprune import protocol as P
from fedprune.costs import named_profile
from fedprune.quantisation import dequantise
from fedprune.settings import Settings
from fedprune.value_code import ValueReference, encode_value_update, value_bits
from strategies.prunefl import PruneFL
from tests.inprocess import Federation, small_cnn_start

EXACT = Settings(
    model="small-cnn",
    cost_profile="paper-uniform",
    local_steps=2,
    batch_size=10,
    clients_per_round=3,
    learning_rate=0.1,
)
Q8 = Settings(**{**EXACT.__dict__, "value_code": "q8"})


def make_strategy(value_code="exact", reconfig_interval=0):
    params, masks, names = small_cnn_start(0.5)
    return PruneFL(
        params=params,
        masks=masks,
        profile=named_profile("paper-uniform", names),
        clients_per_round=3,
        reconfig_interval=reconfig_interval,
        value_code=value_code,
    )


def _config():
    return ConfigRecord({P.LEARNING_RATE: 0.1})


def _keys(message, prefix):
    return [k for k in message.content[P.ARRAYS] if k.split("/")[0] == prefix]


def test_value_code_setting():
    assert Settings().value_code == "exact"
    assert value_bits("exact") is None and value_bits("q8") == 8 and value_bits("q16") == 16
    with pytest.raises(ValueError):
        value_bits("q3")


def test_a_q8_round_lands_within_the_quantisation_bound_of_the_exact_one():
    """Round 1: both federations start from the same float32 values and train alike; only
    the upload differs, each value by at most one step (largest |update| / 127 per bucket)."""
    results = {}
    for settings, code in ((EXACT, "exact"), (Q8, "q8")):
        fed, strategy = Federation(settings, 3), make_strategy(code)
        before = strategy.model.kept_values()
        _, replies, _ = fed.train_round(strategy, 1)
        results[code] = (before, strategy.model.kept_values(), replies, strategy.stats[1])
    before, exact, exact_replies, exact_stats = results["exact"]
    _, q8, q8_replies, q8_stats = results["q8"]
    assert all(_keys(r, "vq") and not _keys(r, "v") for r in q8_replies)
    assert all(_keys(r, "v") and not _keys(r, "vq") for r in exact_replies)
    for name in exact:
        # the largest update any node made, over the 127 levels of 8 bits: one step
        steps = max(
            float(np.abs(r.content[P.ARRAYS][f"v/{name}"].numpy() - before[name].numpy()).max())
            for r in exact_replies
        )
        bound = steps / 127 + 1e-6
        assert float((q8[name] - exact[name]).abs().max()) <= bound, name
    # prunable values go up as 1 byte instead of 4 (plus a scale per 1024 and headers)
    assert q8_stats.bytes_up < 0.4 * exact_stats.bytes_up


def test_after_the_first_round_values_go_down_as_quantised_changes():
    fed, strategy = Federation(Q8, 3), make_strategy("q8")
    exact_fed, exact = Federation(EXACT, 3), make_strategy("exact")
    for r in (1, 2, 3):
        msgs, _, _ = fed.train_round(strategy, r)
        exact_fed.train_round(exact, r)
    assert all(_keys(m, "vq") and not _keys(m, "v") for m in msgs)
    assert all(m.content[P.CONFIG][P.VALUES_BASE_VERSION] == 2 for m in msgs)
    assert strategy.stats[3].dropped == 0 and strategy.stats[3].replies == 3
    assert strategy.stats[3].bytes_down < 0.4 * exact.stats[3].bytes_down
    assert strategy.stats[3].bytes_up < 0.4 * exact.stats[3].bytes_up
    # every node holds exactly the server's reference, bit for bit
    for context in fed.contexts.values():
        record = context.state[P.STATE_VALUES]
        for name, v in strategy.reference.values.items():
            assert np.array_equal(record[name].numpy(), v)
    # and the reference is within one step of the (exact) global values
    kept = strategy.model.kept_values()
    ref = strategy.reference
    ref.advance(kept, strategy.mask_version)
    for name, g in kept.items():
        err = np.abs(ref.values[name] - g.numpy()).max()
        assert err <= np.abs(g.numpy() - 0).max() / 127 + 1e-6


def test_a_node_that_missed_a_round_gets_float32_values_then_changes_again():
    fed, strategy = Federation(Q8, 3), make_strategy("q8")
    fed.train_round(strategy, 1)
    requests = list(strategy.configure_train(2, None, _config(), fed.grid))
    replies = fed.deliver(requests)
    silent = requests[0].metadata.dst_node_id
    strategy.aggregate_train(2, replies[1:])
    msgs3, _, _ = fed.train_round(strategy, 3)
    form = {m.metadata.dst_node_id: bool(_keys(m, "vq")) for m in msgs3}
    assert form == {n: n != silent for n in form}
    assert strategy.stats[3].replies == 3 and strategy.stats[3].dropped == 0
    msgs4, _, _ = fed.train_round(strategy, 4)
    assert all(_keys(m, "vq") for m in msgs4)


def _change(key, edit):
    def corrupt(reply):
        record = reply.content[P.ARRAYS]
        arrays = {k: record[k].numpy().copy() for k in record}
        edited = edit(arrays[key])
        if edited is None:
            del arrays[key]
        else:
            arrays[key] = edited
        content = RecordDict(
            {
                P.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                P.METRICS: reply.content[P.METRICS],
            }
        )
        return Message(content, reply_to=_request_of[reply.metadata.reply_to_message_id])

    return corrupt


def _set(i, value):
    def edit(v):
        v[i] = value
        return v

    return edit


_request_of: dict = {}
BAD_UPLOADS = {
    "truncated": (_change("vq/fc1.weight", lambda v: v[: len(v) // 2]), "vq/fc1.weight"),
    "a byte added": (_change("vq/fc2.weight", lambda v: np.append(v, np.uint8(0))), "bytes"),
    "another format": (_change("vq/conv1.weight", _set(0, 9)), "format byte 9"),
    "bits not allowed": (_change("vq/conv1.weight", _set(1, 9)), "9 bits per value"),
    "wrong count": (_change("vq/fc1.weight", _set(2, 3)), "vq/fc1.weight"),
    "a code above 254": (_change("vq/fc1.weight", _set(-1, 255)), "a code above 254"),
    "a NaN scale": (_change("vq/fc1.weight", lambda v: _nan_scale(v)), "scale"),
    "missing": (_change("vq/fc1.bias", lambda v: None), "missing key 'v/fc1.bias'"),
    "also as float32": (
        lambda r: _change("vq/fc1.bias", lambda v: v)(_add_v(r)),
        "also as 'v/'",
    ),
}


def _nan_scale(v):
    from fedprune.maskcode import read_varint

    _, pos = read_varint(v, 2, 1 << 30, "count")
    _, pos = read_varint(v, pos, 1 << 30, "bucket")
    v[pos : pos + 4] = np.array([np.nan], "<f4").view(np.uint8)
    return v


def _add_v(reply):
    record = reply.content[P.ARRAYS]
    n = len(dequantise(record["vq/fc1.bias"].numpy().copy(), _bias_count(reply)))
    record["v/fc1.bias"] = Array(np.zeros(n, np.float32))
    return reply


def _bias_count(reply):
    from fedprune.maskcode import read_varint

    data = reply.content[P.ARRAYS]["vq/fc1.bias"].numpy()
    return read_varint(data, 2, 1 << 30, "count")[0]


@pytest.mark.parametrize("kind", sorted(BAD_UPLOADS))
def test_a_bad_quantised_upload_is_dropped_with_a_reason(kind, caplog):
    corrupt, reason = BAD_UPLOADS[kind]
    fed, strategy = Federation(Q8, 3), make_strategy("q8")
    fed.train_round(strategy, 1)
    before = strategy.model.kept_values()
    requests = list(strategy.configure_train(2, None, _config(), fed.grid))
    _request_of.update({m.metadata.message_id: m for m in requests})
    replies = fed.deliver(requests)
    replies[0] = corrupt(replies[0])
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(2, replies)
    assert strategy.stats[2].dropped == 1 and strategy.stats[2].replies == 2
    assert "round 2: dropped reply from node" in caplog.text and reason in caplog.text
    after = strategy.model.kept_values()
    assert all(torch.isfinite(after[k]).all() for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the two good ones
    # the dropped node is sent float32 values next round
    msgs3 = list(strategy.configure_train(3, None, _config(), fed.grid))
    dropped = requests[0].metadata.dst_node_id
    form = {m.metadata.dst_node_id: bool(_keys(m, "v")) for m in msgs3}
    assert form == {n: n == dropped for n in form}


def test_error_feedback_memory_carries_what_was_not_sent():
    rng = np.random.default_rng(0)
    received = {"w": np.zeros(3000, np.float32), "b": np.zeros(10, np.float32)}
    memory, sent, total = None, {k: 0.0 for k in received}, {k: 0.0 for k in received}
    for _ in range(5):
        trained = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in received.items()}
        arrays, memory = encode_value_update(trained, received, memory, 4, rng)
        for k, v in trained.items():
            total[k] = total[k] + v.astype(np.float64)
            sent[k] = sent[k] + dequantise(arrays[f"vq/{k}"], v.size).astype(np.float64)
    for k in received:
        # what went out plus what is held equals everything given, to float32 rounding
        np.testing.assert_allclose(sent[k] + memory[k], total[k], atol=1e-4)
        assert np.abs(memory[k]).max() > 0  # 4 bits: something was held back


def test_a_node_with_a_new_mask_starts_its_memory_afresh():
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    hold_values(context, 1, 0, {"w": np.zeros(4, np.float32)})
    hold_value_memory(context, 0, {"w": np.ones(4, np.float32)})
    assert value_memory(context, 0)["w"].tolist() == [1, 1, 1, 1]
    hold_values(context, 2, 0, {"w": np.zeros(4, np.float32)})  # same mask: kept
    assert value_memory(context, 0) is not None
    hold_values(context, 3, 1, {"w": np.zeros(6, np.float32)})  # a new mask: gone
    assert value_memory(context, 1) is None and value_memory(context, 0) is None


def test_through_a_mask_change_nodes_get_float32_values_and_fresh_memory():
    fed, strategy = Federation(Q8, 3), make_strategy("q8", reconfig_interval=2)
    fed.train_round(strategy, 1)
    fed.train_round(strategy, 2)  # reconfigures
    assert strategy.mask_version == 1
    msgs3, _, _ = fed.train_round(strategy, 3)
    assert all(_keys(m, "v") and not _keys(m, "vq") for m in msgs3)
    assert strategy.stats[3].replies == 3
    kept = strategy.model.kept_counts()
    for context in fed.contexts.values():
        memory = value_memory(context, 1)
        assert memory is not None
        assert all(memory[k].size == kept[k] for k in kept)
    msgs4, _, _ = fed.train_round(strategy, 4)
    assert all(_keys(m, "vq") for m in msgs4) and strategy.stats[4].replies == 3


def test_the_reference_follows_the_global_values_within_a_step():
    g = {"w": torch.randn(5000)}
    ref = ValueReference(8)
    ref.advance(g, 0)
    assert ref.change is None and np.array_equal(ref.values["w"], g["w"].numpy())
    for _ in range(5):
        g = {"w": g["w"] + 0.01 * torch.randn(5000)}
        ref.advance(g, 0)
        assert ref.change is not None
        step = 0.05 / 127  # |g - previous reference| < 0.05 here
        assert np.abs(ref.values["w"] - g["w"].numpy()).max() <= step
    ref.advance(g, 1)  # a new mask: the values themselves
    assert ref.change is None
