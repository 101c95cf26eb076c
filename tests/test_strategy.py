"""PruneFL strategy and ClientApp together, in one process (no Ray): what is sent, what
is accepted, what is rejected and why."""

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedprune import protocol as P
from fedprune.codec import MASK_PREFIXES
from fedprune.costs import named_profile
from fedprune.settings import Settings
from strategies.prunefl import PruneFL
from tests.inprocess import Federation, small_cnn_start

SETTINGS = Settings(
    model="small-cnn",
    cost_profile="paper-uniform",
    local_steps=2,
    batch_size=10,
    clients_per_round=3,
    learning_rate=0.1,
    importance_code="exact",  # bfloat16 "g/": the bad replies below edit it bit by bit
)
CODED = Settings(**{**SETTINGS.__dict__, "importance_code": "coded"})


def make_strategy(reconfig_interval=0, density=0.5, **kw):
    params, masks, names = small_cnn_start(density)
    return PruneFL(
        params=params,
        masks=masks,
        profile=named_profile("paper-uniform", names),
        clients_per_round=3,
        reconfig_interval=reconfig_interval,
        **kw,
    )


def snapshot(strategy):
    return {k: v.clone() for k, v in strategy.masked_params().items()}


def test_mask_goes_once_per_node_then_values_only():
    fed, strategy = Federation(SETTINGS, 3), make_strategy()
    msgs1, _, _ = fed.train_round(strategy, 1)
    msgs2, _, _ = fed.train_round(strategy, 2)
    has_mask = [
        any(k.split("/")[0] in MASK_PREFIXES for k in m.content[P.ARRAYS]) for m in msgs1 + msgs2
    ]
    assert has_mask == [True] * 3 + [False] * 3
    s1, s2 = strategy.stats[1], strategy.stats[2]
    assert s1.masks_sent == 3 and s2.masks_sent == 0
    assert s2.bytes_down < s1.bytes_down
    assert s1.replies == s2.replies == 3 and s1.dropped == 0


def test_values_sent_shrink_with_density():
    downs = {}
    for density in (0.9, 0.3):
        fed, strategy = Federation(SETTINGS, 3), make_strategy(density=density)
        fed.train_round(strategy, 1)
        fed.train_round(strategy, 2)
        downs[density] = strategy.stats[2].bytes_down
    assert downs[0.3] < 0.5 * downs[0.9]


def test_aggregation_is_the_sample_weighted_mean_of_kept_values():
    fed, strategy = Federation(SETTINGS, 3), make_strategy()
    before = snapshot(strategy)
    _, replies, (arrays, _) = fed.train_round(strategy, 1)
    weights = np.array([r.content[P.METRICS][P.NUM_EXAMPLES] for r in replies], dtype=float)
    values = [r.content[P.ARRAYS]["v/fc1.weight"].numpy() for r in replies]
    expected = sum(w * v for w, v in zip(weights / weights.sum(), values, strict=True))
    mask = strategy.masks["fc1.weight"]
    got = strategy.masked_params()["fc1.weight"][mask].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert torch.all(strategy.masked_params()["fc1.weight"][~mask] == 0)
    assert not torch.equal(before["fc1.weight"], strategy.masked_params()["fc1.weight"])
    # The round loop gets the global model in its wire form: the kept values nodes are sent.
    np.testing.assert_array_equal(arrays["v/fc1.weight"].numpy(), got)


def _replace(request: Message, reply: Message, arrays=None, metrics=None) -> Message:
    """A reply to `request` like `reply`, with its arrays and/or metrics swapped."""
    content = RecordDict(
        {
            P.ARRAYS: arrays if arrays is not None else reply.content[P.ARRAYS],
            P.METRICS: metrics if metrics is not None else reply.content[P.METRICS],
        }
    )
    TaskIdentity.node_id = request.metadata.dst_node_id
    try:
        return Message(content=content, reply_to=request)
    finally:
        TaskIdentity.node_id = 0


def _arrays(reply):
    return {k: reply.content[P.ARRAYS][k].numpy().copy() for k in reply.content[P.ARRAYS]}


def _with_array(reply, key, value):
    arrays = _arrays(reply)
    if value is None:
        arrays.pop(key)
    else:
        arrays[key] = value
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _with_metric(reply, key, value):
    metrics = dict(reply.content[P.METRICS])
    if value is None:
        metrics.pop(key)
    else:
        metrics[key] = value
    return MetricRecord(metrics)


def _nan_value(request, reply):
    v = _arrays(reply)["v/fc1.weight"]
    v[0] = np.nan
    return _replace(request, reply, arrays=_with_array(reply, "v/fc1.weight", v))


def _array_change(key, change):
    return lambda req, rep: _replace(
        req, rep, arrays=_with_array(rep, key, change(_arrays(rep)[key]))
    )


def _metric_change(key, value):
    return lambda req, rep: _replace(req, rep, metrics=_with_metric(rep, key, value))


def _error_reply(request, reply):
    TaskIdentity.node_id = request.metadata.dst_node_id
    try:
        return Message(error=Error(code=0, reason="ClientApp raised ValueError"), reply_to=request)
    finally:
        TaskIdentity.node_id = 0


def _without(record_key):
    def corrupt(request, reply):
        content = RecordDict({k: v for k, v in reply.content.items() if k != record_key})
        TaskIdentity.node_id = request.metadata.dst_node_id
        try:
            return Message(content=content, reply_to=request)
        finally:
            TaskIdentity.node_id = 0

    return corrupt


def _bf16_at(i, bits):
    def change(a):
        a = a.copy()
        a[i] = bits
        return a

    return change


def _added(key, value):
    return lambda req, rep: _replace(req, rep, arrays=_with_array(rep, key, value))


BAD_REPLIES = {
    "NaN value": (_nan_value, "non-finite"),
    "inf value": (_array_change("v/fc2.weight", lambda v: np.full_like(v, np.inf)), "non-finite"),
    "one value short": (_array_change("v/fc1.weight", lambda v: v[:-1]), "v/fc1.weight"),
    "one value too many": (
        _array_change("v/fc1.weight", lambda v: np.append(v, 1.0)),
        "v/fc1.weight",
    ),
    "missing parameter": (_array_change("v/fc2.bias", lambda v: None), "v/fc2.bias"),
    "unknown parameter": (_added("v/fc3.weight", np.zeros(4, np.float32)), "v/fc3.weight"),
    "a mask in a reply": (_added("m/fc1.weight", np.zeros(8, np.uint8)), "m/fc1.weight"),
    "float64 values": (
        _array_change("v/fc1.weight", lambda v: v.astype(np.float64)),
        "v/fc1.weight",
    ),
    "zero examples": (_metric_change(P.NUM_EXAMPLES, 0), "num-examples"),
    "negative examples": (_metric_change(P.NUM_EXAMPLES, -5), "num-examples"),
    "absurd examples": (_metric_change(P.NUM_EXAMPLES, 10**12), "num-examples"),
    "fractional examples": (_metric_change(P.NUM_EXAMPLES, 2.5), "num-examples"),
    "no examples key": (_metric_change(P.NUM_EXAMPLES, None), "num-examples"),
    "stale mask version": (_metric_change(P.MASK_VERSION, 7), "mask version"),
    "importance missing": (_array_change("g/fc1.weight", lambda v: None), "g/fc1.weight"),
    "importance too short": (_array_change("g/fc2.weight", lambda v: v[:-1]), "g/fc2.weight"),
    "importance negative": (_array_change("g/fc1.weight", _bf16_at(0, 0xBF80)), "negative"),
    "importance NaN": (_array_change("g/fc1.weight", _bf16_at(0, 0x7FC0)), "non-finite"),
    "negative fixed importance": (_metric_change(P.FIXED_IMPORTANCE, -1.0), "importance-fixed"),
    "no ArrayRecord": (_without(P.ARRAYS), "no ArrayRecord"),
    "no MetricRecord": (_without(P.METRICS), "no MetricRecord"),
    "client error": (_error_reply, "ClientApp raised ValueError"),
}


def _config():
    return ConfigRecord({P.LEARNING_RATE: 0.1})


@pytest.mark.parametrize("kind", sorted(BAD_REPLIES))
def test_a_bad_reply_is_dropped_with_a_logged_reason(kind, caplog):
    corrupt, reason = BAD_REPLIES[kind]
    # Round 2 is a reconfiguration round: replies carry importance too.
    fed, strategy = Federation(SETTINGS, 3), make_strategy(reconfig_interval=2)
    fed.train_round(strategy, 1)  # nodes now hold the mask
    before = snapshot(strategy)
    masks_before = {k: m.clone() for k, m in strategy.masks.items()}
    requests = list(strategy.configure_train(2, None, _config(), fed.grid))
    replies = [corrupt(req, rep) for req, rep in zip(requests, fed.deliver(requests), strict=True)]
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is None
    assert strategy.stats[2].dropped == 3 and strategy.stats[2].replies == 0
    after = snapshot(strategy)
    assert all(torch.equal(before[k], after[k]) for k in before), "global model changed"
    assert strategy.mask_version == 0
    assert all(torch.equal(masks_before[k], strategy.masks[k]) for k in masks_before)
    assert "round 2: dropped reply from node" in caplog.text and reason in caplog.text


BAD_CODED_REPLIES = {
    "coded importance truncated": (
        _array_change("gc/fc1.weight", lambda v: v[: len(v) // 2]),
        "gc/fc1.weight",
    ),
    "coded importance with a byte added": (
        _array_change("gc/fc2.weight", lambda v: np.append(v, np.uint8(0))),
        "gc/fc2.weight",
    ),
    "coded importance of another format": (
        _array_change("gc/conv1.weight", lambda v: np.concatenate([[np.uint8(9)], v[1:]])),
        "gc/conv1.weight",
    ),
    "coded importance missing": (_array_change("gc/fc1.weight", lambda v: None), "gc/fc1.weight"),
    "exact and coded importance mixed": (
        _added("g/fc1.weight", np.zeros(4, np.uint16)),
        "one form per reply",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_CODED_REPLIES))
def test_a_bad_coded_importance_upload_is_dropped(kind, caplog):
    corrupt, reason = BAD_CODED_REPLIES[kind]
    fed, strategy = Federation(CODED, 3), make_strategy(reconfig_interval=2)
    fed.train_round(strategy, 1)
    before = snapshot(strategy)
    requests = list(strategy.configure_train(2, None, _config(), fed.grid))
    replies = [corrupt(req, rep) for req, rep in zip(requests, fed.deliver(requests), strict=True)]
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is None and strategy.stats[2].dropped == 3
    after = snapshot(strategy)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert strategy.mask_version == 0 and reason in caplog.text


def test_coded_importance_reconfigures_like_exact_importance():
    """The same round with coded and with exact uploads: the masks the solver builds agree
    on nearly every kept position (the coded upload is about 1/12 of the bytes)."""
    masks, up = {}, {}
    for settings in (SETTINGS, CODED):
        fed, strategy = Federation(settings, 3), make_strategy(reconfig_interval=2)
        fed.train_round(strategy, 1)
        fed.train_round(strategy, 2)
        assert strategy.mask_version == 1
        masks[settings.importance_code] = strategy.masks
        up[settings.importance_code] = strategy.stats[2].bytes_up - strategy.stats[1].bytes_up
    inter = sum(int((masks["exact"][k] & masks["coded"][k]).sum()) for k in masks["exact"])
    union = sum(int((masks["exact"][k] | masks["coded"][k]).sum()) for k in masks["exact"])
    assert inter / union > 0.95
    assert up["coded"] < 0.5 * up["exact"]


def test_one_bad_reply_does_not_spoil_the_good_ones():
    fed, strategy = Federation(SETTINGS, 3), make_strategy()
    requests = list(strategy.configure_train(1, None, _config(), fed.grid))
    replies = fed.deliver(requests)
    replies[0] = _nan_value(requests[0], replies[0])
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["replies"] == 2 and metrics["dropped"] == 1
    assert all(torch.isfinite(v).all() for v in strategy.masked_params().values())
    # The node whose reply was dropped gets the full mask again next round.
    bad_node = requests[0].metadata.dst_node_id
    msgs2 = list(strategy.configure_train(2, None, _config(), fed.grid))
    carried = {
        m.metadata.dst_node_id: any(k.startswith("m") for k in m.content[P.ARRAYS]) for m in msgs2
    }
    assert carried[bad_node] and sum(carried.values()) == 1


def test_reconfiguration_asks_for_importance_and_changes_the_mask():
    fed, strategy = Federation(SETTINGS, 3), make_strategy(reconfig_interval=2)
    msgs1, _, _ = fed.train_round(strategy, 1)
    assert not msgs1[0].content[P.CONFIG][P.SEND_IMPORTANCE]
    masks_before = {k: m.clone() for k, m in strategy.masks.items()}
    msgs2, replies2, _ = fed.train_round(strategy, 2)
    assert msgs2[0].content[P.CONFIG][P.SEND_IMPORTANCE]
    assert all("g/fc1.weight" in r.content[P.ARRAYS] for r in replies2)
    assert strategy.stats[2].reconfigured and strategy.mask_version == 1
    assert any(not torch.equal(masks_before[k], strategy.masks[k]) for k in masks_before)
    # The reply importance covered two local rounds: the node accumulated it.
    assert all(r.content[P.METRICS][P.IMPORTANCE_ROUNDS] == 2 for r in replies2)
    # Every node holds the previous mask, so round 3 sends each the change from it, with
    # the version it changes; every node applies it and trains on the new mask.
    messages3, _, _ = fed.train_round(strategy, 3)
    assert strategy.stats[3].mask_changes_sent == 3 and strategy.stats[3].masks_sent == 0
    assert all(m.content[P.CONFIG][P.MASK_BASE_VERSION] == 0 for m in messages3)
    assert strategy.stats[3].replies == 3 and strategy.stats[3].dropped == 0


def test_evaluate_round_reports_local_accuracy():
    fed, strategy = Federation(SETTINGS, 3), make_strategy(fraction_evaluate=1.0)
    fed.train_round(strategy, 1)
    msgs = list(strategy.configure_evaluate(1, None, _config(), fed.grid))
    assert len(msgs) == 3
    metrics = strategy.aggregate_evaluate(1, fed.deliver(msgs))
    assert 0.0 <= metrics[P.EVAL_ACCURACY] <= 1.0


def test_client_refuses_values_for_a_mask_it_does_not_hold():
    fed, strategy = Federation(SETTINGS, 3), make_strategy()
    fed.train_round(strategy, 1)
    strategy.model.mask_version += 1  # pretend the server moved on without telling the nodes
    for node_id in list(strategy.nodes.mask_version):
        strategy.nodes.confirm(node_id, strategy.mask_version)
    msgs = list(strategy.configure_train(2, None, _config(), fed.grid))
    with pytest.raises(RuntimeError, match="without the mask"):
        fed.deliver(msgs[:1])


def test_a_round_with_too_few_valid_replies_is_skipped(caplog):
    fed, strategy = Federation(SETTINGS, 3), make_strategy(min_replies=3)
    fed.train_round(strategy, 1)
    before = snapshot(strategy)
    requests = list(strategy.configure_train(2, None, _config(), fed.grid))
    replies = fed.deliver(requests)
    replies[1] = _nan_value(requests[1], replies[1])
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is None and "fewer than min-replies = 3" in caplog.text
    after = snapshot(strategy)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_replies_are_summed_in_partition_order_whatever_their_arrival():
    results = []
    for reverse in (False, True):
        fed, strategy = Federation(SETTINGS, 3), make_strategy()
        requests = list(strategy.configure_train(1, None, _config(), fed.grid))
        replies = fed.deliver(requests)
        strategy.aggregate_train(1, replies[::-1] if reverse else replies)
        results.append(strategy.masked_params())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_a_sampled_node_that_never_answers_gets_the_mask_again():
    fed, strategy = Federation(SETTINGS, 3), make_strategy()
    fed.train_round(strategy, 1)
    requests = list(strategy.configure_train(2, None, _config(), fed.grid))
    replies = fed.deliver(requests)
    silent = requests[0].metadata.dst_node_id
    strategy.aggregate_train(2, replies[1:])  # no reply at all from one node (timed out)
    msgs3 = list(strategy.configure_train(3, None, _config(), fed.grid))
    carried = {
        m.metadata.dst_node_id: any(k.startswith("m") for k in m.content[P.ARRAYS]) for m in msgs3
    }
    assert carried == {n: n == silent for n in carried}


# --- Defects found in review (each failed on the 650-line SparseFedAvg) ---------------


def _values_sent(message, strategy):
    """The dense weights a train/evaluate message carries, as the node decodes them."""
    from fedprune.codec import decode_model

    arrays = {k: message.content[P.ARRAYS][k].numpy() for k in message.content[P.ARRAYS]}
    params, _ = decode_model(arrays, strategy.model.shapes, list(strategy.masks), strategy.masks)
    return params


def test_evaluate_sends_the_model_after_this_rounds_aggregation_even_with_equal_configs():
    """The old payload cache keyed on (round, mask version, config): with equal train and
    evaluate configs, evaluation got the weights from before aggregation."""
    fed, strategy = Federation(SETTINGS, 3), make_strategy(fraction_evaluate=1.0)
    fed.train_round(strategy, 1)
    config = _config()
    requests = list(strategy.configure_train(2, None, config, fed.grid))
    strategy.aggregate_train(2, fed.deliver(requests))
    evaluate = list(strategy.configure_evaluate(2, None, config, fed.grid))
    sent, current = _values_sent(evaluate[0], strategy), strategy.masked_params()
    assert all(torch.equal(sent[k], current[k]) for k in current)


def test_server_memory_per_round_does_not_grow_with_the_replies():
    """Replies are summed as they are checked: 50 replies need about the memory of 5,
    not ten times it (the old strategy held a dense float32 copy of every reply)."""
    import tracemalloc

    peaks = {}
    for n in (5, 50):
        settings = Settings(**{**SETTINGS.__dict__, "clients_per_round": n})
        fed, strategy = Federation(settings, n), make_strategy(reconfig_interval=2, density=0.3)
        strategy.clients_per_round = n
        fed.train_round(strategy, 1)
        replies = fed.deliver(list(strategy.configure_train(2, None, _config(), fed.grid)))
        tracemalloc.start()
        strategy.aggregate_train(2, replies)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert strategy.stats[2].replies == n and strategy.stats[2].reconfigured
    assert peaks[50] < 2 * peaks[5], peaks


def test_a_reply_cannot_choose_its_place_in_the_sum():
    """The summation order is the server's record of each node's client id; a partition
    id claimed in a reply (once read, with a silent fallback to the node id) is ignored."""
    results = []
    for forged in (False, True):
        fed, strategy = Federation(SETTINGS, 3), make_strategy()
        requests = list(strategy.configure_train(1, None, _config(), fed.grid))
        replies = fed.deliver(requests)
        if forged:
            replies = [
                _metric_change("partition-id", 99 - i)(req, rep)
                for i, (req, rep) in enumerate(zip(requests, replies, strict=True))
            ]
        strategy.aggregate_train(1, replies)
        results.append(strategy.masked_params())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_no_importance_is_asked_for_in_the_last_round():
    """A mask update after the last round would never be trained: the old strategy asked
    the nodes for importance there, then dropped it."""
    fed, strategy = Federation(SETTINGS, 3), make_strategy(reconfig_interval=2)
    strategy.importance.num_rounds = 2
    fed.train_round(strategy, 1)
    messages, replies, _ = fed.train_round(strategy, 2)
    assert not any(m.content[P.CONFIG][P.SEND_IMPORTANCE] for m in messages)
    assert not any("g/fc1.weight" in r.content[P.ARRAYS] for r in replies)
    assert strategy.mask_version == 0


def test_a_skipped_reconfiguration_round_keeps_the_uploaded_importance(caplog):
    """The nodes cleared what they uploaded in a round that was then skipped (too few
    valid replies): the server keeps it and reconfigures in the next round."""
    fed, strategy = Federation(SETTINGS, 3), make_strategy(reconfig_interval=2, min_replies=3)
    fed.train_round(strategy, 1)
    requests = list(strategy.configure_train(2, None, _config(), fed.grid))
    replies = fed.deliver(requests)
    replies[0] = _nan_value(requests[0], replies[0])
    strategy.aggregate_train(2, replies)
    assert strategy.mask_version == 0 and strategy.importance.uploads == 2
    messages, _, _ = fed.train_round(strategy, 3)
    assert all(m.content[P.CONFIG][P.SEND_IMPORTANCE] for m in messages)
    assert strategy.mask_version == 1
    assert strategy.importance.used == (5, 2)  # 2 uploads kept from round 2, 3 from round 3


def test_importance_over_a_different_window_is_not_summed(caplog):
    """Nodes report how many rounds their importance covers; the server used to sum a
    restarted node's 1-round window with everyone else's 2-round ones."""
    fed, strategy = Federation(SETTINGS, 3), make_strategy(reconfig_interval=2)
    fed.train_round(strategy, 1)
    requests = list(strategy.configure_train(2, None, _config(), fed.grid))
    replies = fed.deliver(requests)
    replies[0] = _metric_change(P.IMPORTANCE_ROUNDS, 1)(requests[0], replies[0])
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(2, replies)
    assert strategy.stats[2].replies == 3 and strategy.importance.used == (2, 1)
    assert "covers 1 local rounds, the others' 2" in caplog.text


def test_a_mask_change_is_refused_by_a_node_without_its_base_version():
    """A change applied to another mask than its base could give a wrong mask silently:
    the node checks the base version the server names, and refuses otherwise."""
    fed, strategy = Federation(SETTINGS, 3), make_strategy(reconfig_interval=2)
    fed.train_round(strategy, 1)
    fed.train_round(strategy, 2)  # reconfigures: version 1
    for context in fed.contexts.values():  # every node restarts, holding version 0 no more
        context.state.clear()
    requests = list(strategy.configure_train(3, None, _config(), fed.grid))
    assert all(P.MASK_BASE_VERSION in m.content[P.CONFIG] for m in requests)
    with pytest.raises(RuntimeError, match="a mask change from mask version 0"):
        fed.deliver(requests[:1])


def test_a_node_unavailable_error_from_the_superlink_is_that_nodes_dropped_reply(caplog):
    """When a node misses its heartbeats, the SuperLink answers its message itself (the
    error reply comes from the SuperLink, not the node). The strategy matches it to the
    node by the message it answers: logged with the node's id and Flower's reason, and the
    node is forgotten, so it gets the whole mask when it is next sampled."""
    from flwr.server.superlink.linkstate.utils import (
        create_message_error_unavailable_res_message,
    )

    fed, strategy = Federation(SETTINGS, 3), make_strategy()
    fed.train_round(strategy, 1)
    msgs = list(strategy.configure_train(2, None, _config(), fed.grid))
    for msg in msgs:  # what Flower's Grid does when it pushes them
        msg.metadata.__dict__["_message_id"] = msg.object_id
    victim = msgs[0].metadata.dst_node_id
    error = create_message_error_unavailable_res_message(msgs[0].metadata, "node_unavail")
    assert error.metadata.src_node_id != victim
    with caplog.at_level(logging.WARNING):
        _, metrics = strategy.aggregate_train(2, [error, *fed.deliver(msgs[1:])])
    assert metrics["replies"] == 2 and metrics["dropped"] == 1
    [line] = [r.getMessage() for r in caplog.records if "dropped reply" in r.getMessage()]
    assert f"from node {victim}: client error: Error: Node Unavailable" in line
    assert victim not in strategy.nodes.mask_version
    assert all(n in strategy.nodes.mask_version for n in fed.contexts if n != victim)


def test_bytes_by_kind_add_up_to_what_flower_counts():
    from strategies.accounting import bytes_by_kind, content_bytes

    fed, strategy = Federation(SETTINGS, 2), make_strategy()
    msgs, replies, _ = fed.train_round(strategy, 1)
    for msg in [*msgs, *replies]:
        kinds = bytes_by_kind(msg.content)
        assert sum(kinds.values()) == content_bytes(msg.content)
    assert {"v", "m", "config"} <= set(bytes_by_kind(msgs[0].content))
    stats = strategy.stats[1]
    assert sum(stats.down_by_kind.values()) == stats.bytes_down
    assert sum(stats.up_by_kind.values()) == stats.bytes_up
    assert stats.up_by_kind["v"] > 0 and stats.up_by_kind["metric"] > 0
