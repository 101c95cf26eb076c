"""Measured device costs and sparse training through the Flower app, in one process:
the profile query, per-node costs in the strategy, each layer's format through the
ClientApp,
and the inference block of summary.json."""

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

import clients.client_app as client_app
import strategies.prunefl as prunefl_module
from fedprune import protocol as P
from fedprune.costs import BYTES_PER_VALUE_ROUND_TRIP, named_profile
from fedprune.masks import full_masks, kept_counts
from fedprune.models import build_model
from fedprune.profiler import profile_device
from fedprune.settings import Settings, SettingsError
from fedprune.sparse import FORMATS, load_for_inference
from strategies.accounting import content_bytes
from strategies.methods import METHODS
from strategies.prunefl import PruneFL
from strategies.results import INFERENCE_FILE, inference_summary
from strategies.server_app import build_strategy, prior_profile, starting_inputs
from tests.inprocess import FakeGrid, Federation, small_cnn_start

BASE = dict(
    model="small-cnn",
    cost_profile="measured",
    profile_repeats=1,
    local_steps=2,
    batch_size=10,
    learning_rate=0.1,
)


@pytest.fixture(scope="module")
def measurements():
    """One real profile of the small CNN, shared by the tests that seed node caches."""
    torch.set_num_threads(1)
    _, out = profile_device(build_model("small-cnn"), 2, 10, 1e6, repeats=1)
    return out


def seed_cache(fed: Federation, measurements: dict) -> None:
    for context in fed.contexts.values():
        context.state[P.STATE_PROFILE] = ConfigRecord(measurements)


def make_strategy(num_nodes, density=0.5, reconfig_interval=0, measure_costs=True):
    params, masks, names = small_cnn_start(density)
    return PruneFL(
        params=params,
        masks=masks,
        profile=named_profile("paper-conv2", names),
        clients_per_round=num_nodes,
        reconfig_interval=reconfig_interval,
        measure_costs=measure_costs,
    )


def test_new_settings_are_validated_with_their_key():
    s = Settings.from_run_config({"speed-factors": "1, 2.5", "bandwidths": "1e6,2e6,3e6"})
    assert [s.speed_factor(i) for i in range(3)] == [1.0, 2.5, 1.0]
    assert s.bandwidth(4) == 2e6
    assert Settings().bandwidth(7) == Settings().bandwidth_bytes_per_s
    assert Settings().speed_factor(3) == 1.0
    for key, value in [
        ("speed-factors", "1,fast"),
        ("speed-factors", "1,-2"),
        ("bandwidths", "0"),
        ("bandwidths", "1e6,,2e6"),
        ("bandwidth-bytes-per-s", 0.0),
        ("profile-repeats", 0),
        ("cost-profile", "guessed"),
    ]:
        with pytest.raises(SettingsError) as info:
            Settings.from_run_config({key: value})
        assert repr(key) in str(info.value)


def test_measured_uses_a_paper_prior_and_turns_on_the_query():
    settings = Settings(**BASE)
    model = build_model("small-cnn")
    prior = prior_profile(settings, model, (1, 28, 28))
    assert prior.name == "paper-conv2"
    start = starting_inputs(settings)
    strategy = build_strategy(settings, METHODS["prunefl"], start, full_masks(model))
    assert strategy.measure_costs and strategy.profile.name == "paper-conv2"
    paper = Settings(model="small-cnn")
    assert not build_strategy(paper, METHODS["prunefl"], start, full_masks(model)).measure_costs


def test_profile_query_once_per_node_and_its_bytes_count():
    fed = Federation(Settings(**BASE, clients_per_round=3), 3)
    strategy = make_strategy(3)
    _, replies1, _ = fed.train_round(strategy, 1)
    _, replies2, _ = fed.train_round(strategy, 2)
    assert strategy.profiles.queries == {100: 1, 101: 1, 102: 1}
    assert set(strategy.profiles.by_node) == {100, 101, 102}
    assert all(P.STATE_PROFILE in c.state for c in fed.contexts.values())
    assert strategy.profile.name == "measured"
    # Round 1 also moved the queries and the profiles; round 2 only the training.
    train_up1 = sum(content_bytes(r.content) for r in replies1)
    train_up2 = sum(content_bytes(r.content) for r in replies2)
    assert strategy.stats[1].bytes_up > train_up1 + 3 * 1000  # a profile is a few kB
    assert strategy.stats[2].bytes_up == train_up2


def test_round_time_and_solver_follow_the_slowest_node(measurements, monkeypatch):
    settings = Settings(**BASE, clients_per_round=2, speed_factors="1,3", bandwidths="2e6,5e5")
    fed = Federation(settings, 2)
    seed_cache(fed, measurements)
    strategy = make_strategy(2, reconfig_interval=1)
    seen = {}
    real = prunefl_module.reconfigure

    def spy(params, masks, importance, time_per_param, fixed_time_s, **kw):
        seen["time_per_param"], seen["fixed_time_s"] = time_per_param, fixed_time_s
        return real(params, masks, importance, time_per_param, fixed_time_s, **kw)

    monkeypatch.setattr(prunefl_module, "reconfigure", spy)
    kept = kept_counts(strategy.masks)
    fed.train_round(strategy, 1)
    fast, slow = strategy.profiles.by_node[100], strategy.profiles.by_node[101]
    for name, c in fast.compute_s_per_param.items():
        assert slow.compute_s_per_param[name] == pytest.approx(3 * c)
    assert slow.fixed_s == pytest.approx(3 * fast.fixed_s)
    assert fast.comm_s_per_param == pytest.approx(BYTES_PER_VALUE_ROUND_TRIP / 2e6)
    assert slow.comm_s_per_param == pytest.approx(BYTES_PER_VALUE_ROUND_TRIP / 5e5)
    # The round is modelled with the slower node's costs ...
    assert strategy.profile.compute_s_per_param == pytest.approx(slow.compute_s_per_param)
    stats = strategy.stats[1]
    moved = max(stats.per_node_bytes.values())
    assert stats.sim_time_s == pytest.approx(slow.round_time_s(kept, moved))
    assert stats.sim_time_s > fast.round_time_s(kept, moved)
    # ... and the solver got its slopes.
    assert seen["time_per_param"] == pytest.approx(slow.time_per_param())
    assert seen["fixed_time_s"] == pytest.approx(slow.fixed_time_s(strategy.model.never_pruned))


def test_a_bad_profile_reply_is_dropped_with_a_reason(measurements, caplog):
    fed = Federation(Settings(**BASE, clients_per_round=2), 2)
    seed_cache(fed, measurements)
    strategy = make_strategy(2)

    def corrupt(messages):
        replies = fed.deliver(messages)
        for reply in replies:
            if reply.metadata.src_node_id == 101 and P.PROFILE in reply.content:
                reply.content[P.PROFILE]["fixed_s"] = float("nan")
        return replies

    with caplog.at_level(logging.WARNING):
        strategy.configure_train(1, None, ConfigRecord({}), FakeGrid([100, 101], corrupt))
    assert set(strategy.profiles.by_node) == {100}
    assert "dropped profile reply from node 101" in caplog.text
    measured = strategy.profiles.by_node[100]
    assert strategy.profile.compute_s_per_param == measured.compute_s_per_param


def test_layer_formats_match_masked_dense_through_the_client(measurements, monkeypatch):
    """The default `layer-format = "measured"` with crossovers forced to 1.0 (every layer
    in its sparse format at any density), and `sparse`, give masked dense's replies to
    float tolerance (importance sent exact: coded bytes would differ in rounding); each
    reply names the formats its layers trained in."""
    forced = dict(measurements)
    for name in measurements["layers"]:
        if measurements[f"{name}/sparse_format"] != "none":
            forced[f"{name}/sparse_max_density"] = 1.0
    calls = []
    real = client_app.train_sparse

    def spy(*args, **kw):
        calls.append(dict(kw["formats"]))
        return real(*args, **kw)

    monkeypatch.setattr(client_app, "train_sparse", spy)
    results = {}
    for layer_format in ("dense", "measured", "sparse"):
        settings = Settings(
            **BASE, clients_per_round=2, layer_format=layer_format, importance_code="exact"
        )
        fed = Federation(settings, 2)
        seed_cache(fed, forced)
        strategy = make_strategy(2, density=0.2, reconfig_interval=1)
        _, replies, _ = fed.train_round(strategy, 1)
        results[layer_format] = (replies, strategy.masked_params())
        for reply in replies:
            codes = list(reply.content[P.METRICS][P.LAYER_FORMATS])
            assert [FORMATS[c] for c in codes] == list(calls[-1].values())
    sparse = {
        "conv1.weight": "sparse-conv",
        "conv2.weight": "sparse-conv",
        "fc1.weight": "csr",
        "fc2.weight": "csr",
    }
    assert calls == [dict.fromkeys(sparse, "dense")] * 2 + [sparse] * 4
    for layer_format in ("measured", "sparse"):
        for dense_reply, sparse_reply in zip(
            results["dense"][0], results[layer_format][0], strict=True
        ):
            d, s = dense_reply.content[P.ARRAYS], sparse_reply.content[P.ARRAYS]
            assert sorted(d) == sorted(s)
            for key in d:
                np.testing.assert_allclose(s[key].numpy(), d[key].numpy(), rtol=1e-4, atol=1e-6)
        for name, value in results["dense"][1].items():
            torch.testing.assert_close(results[layer_format][1][name], value, rtol=1e-4, atol=1e-6)


def test_inference_block_exports_reloads_and_times(tmp_path):
    model = build_model("small-cnn", seed=0)
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(m.shape, generator=g) < 0.1 for n, m in full_masks(model).items()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    block = inference_summary(
        model,
        masks,
        tmp_path,
        arch={"name": "small-cnn", "num_classes": 10, "input_shape": [1, 28, 28]},
        input_shape=(1, 28, 28),
        repeats=2,
        formats={"fc1.weight": "csr", "fc2.weight": "dense"},
    )
    assert block["file"] == INFERENCE_FILE and (tmp_path / INFERENCE_FILE).exists()
    assert block["formats"] == {"fc1.weight": "csr", "fc2.weight": "dense"}
    for batch in ("batch_1", "batch_20"):
        row = block[batch]
        assert row["dense_s"] > 0 and row["pruned_s"] > 0
        assert row["pruned_vs_dense"] == pytest.approx(row["pruned_s"] / row["dense_s"])
    json.dumps(block)  # goes into summary.json as is
    x = torch.rand(4, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(load_for_inference(tmp_path / INFERENCE_FILE)(x), model(x))
