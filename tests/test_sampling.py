"""Partial participation: which nodes train is replayable from the seed, importance comes
from the sampled nodes' replies, and nodes keep no importance they will not upload."""

import logging

import pytest
import torch
from flwr.app import ConfigRecord

from clients.partitions import client_partition
from fedprune import protocol as P
from fedprune.codec import decode_update
from fedprune.costs import named_profile
from fedprune.data import save_folder
from fedprune.settings import Settings, SettingsError
from strategies.node_sampling import NodeSampler
from strategies.prunefl import PruneFL
from tests.inprocess import FakeGrid, Federation, small_cnn_start

# Exact (bfloat16) importance, so a test can add the uploads up itself.
SETTINGS = Settings(
    model="small-cnn",
    cost_profile="paper-uniform",
    local_steps=2,
    batch_size=10,
    importance_code="exact",
)
CONFIG = ConfigRecord({P.LEARNING_RATE: 0.1})


def make_strategy(clients=3, seed=0, **kw):
    params, masks, names = small_cnn_start(0.5)
    return PruneFL(
        params=params,
        masks=masks,
        profile=named_profile("paper-uniform", names),
        clients_per_round=clients,
        seed=seed,
        **kw,
    )


def samples(fed, seed, rounds=range(1, 9), clients=3):
    strategy = make_strategy(clients, seed)
    out = {}
    for r in rounds:
        strategy.configure_train(r, None, CONFIG, fed.grid)
        out[r] = strategy.sampled_clients[r]
    return out


def test_the_sample_follows_seed_and_round_not_node_ids():
    a = samples(Federation(SETTINGS, 20, first_node_id=100), seed=1)
    b = samples(Federation(SETTINGS, 20, first_node_id=987_654), seed=1)
    c = samples(Federation(SETTINGS, 20, first_node_id=100), seed=2)
    assert a == b  # other node ids, same clients
    assert a != c  # another seed, other clients
    assert len({tuple(v) for v in a.values()}) > 1  # rounds differ
    assert all(len(v) == 3 == len(set(v)) and v == sorted(v) for v in a.values())


def test_a_round_sample_does_not_depend_on_earlier_rounds():
    """A resumed run draws round 5 without having drawn rounds 1-4."""
    fed = Federation(SETTINGS, 20)
    assert samples(fed, 1, rounds=[5])[5] == samples(fed, 1)[5]


def test_every_client_gets_its_turn():
    counts = torch.zeros(20)
    for clients in samples(Federation(SETTINGS, 20), 0, rounds=range(1, 201)).values():
        counts[clients] += 1
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()


def test_nodes_are_identified_once():
    fed = Federation(SETTINGS, 6)
    grid = FakeGrid(list(fed.contexts), fed.deliver)
    strategy = make_strategy(2)
    for r in (1, 2, 3):
        strategy.configure_train(r, None, CONFIG, grid)
    identify = [m for m in grid.sent if m.metadata.message_type == "query.identify"]
    assert sorted(m.metadata.dst_node_id for m in identify) == sorted(fed.contexts)
    assert strategy.sampler.client_ids == {n: n - 100 for n in fed.contexts}


def test_missing_nodes_fail_before_any_work_with_what_to_start():
    fed = Federation(SETTINGS, 5)
    grid = FakeGrid(list(fed.contexts)[:3], fed.deliver)  # 2 of 5 never connect
    sampler = NodeSampler(seed=0, wait_s=0.5)
    with pytest.raises(RuntimeError, match="num-supernodes=5"):
        sampler.federation(grid, 0, lambda *a: None)


def test_a_node_that_leaves_for_good_does_not_stop_the_rounds():
    fed = Federation(SETTINGS, 5)
    strategy = make_strategy(0, node_wait_s=0.5)  # every node
    strategy.sampler.federation(fed.grid, 0, lambda *a: None)
    assert len(list(strategy.configure_train(1, None, CONFIG, fed.grid))) == 5
    gone = FakeGrid(list(fed.contexts)[:3], fed.deliver)  # two nodes die for good
    messages = list(strategy.configure_train(2, None, CONFIG, gone))
    assert sorted(m.metadata.dst_node_id for m in messages) == [100, 101, 102]
    strategy.min_replies = 4  # now a round cannot have enough nodes: it says so
    with pytest.raises(RuntimeError, match="fewer than the 4 a round needs"):
        strategy.configure_train(3, None, CONFIG, gone)


def test_the_federation_size_is_what_most_nodes_report_not_the_largest():
    fed = Federation(SETTINGS, 4)
    fed.contexts[103].node_config["num-partitions"] = 1000  # one liar
    sampler = NodeSampler(seed=0, wait_s=0.5)
    population = sampler.federation(fed.grid, 0, lambda *a: None)  # does not wait for 1,000
    assert len(population) == 4 and sampler.identities.federation_size() == 4
    assert NodeSampler(seed=0, num_clients=3).identities.federation_size() == 3


def test_a_client_id_claimed_twice_is_a_conflict_until_one_leaves(caplog):
    fed = Federation(SETTINGS, 4)
    fed.contexts[103].node_config["partition-id"] = 1  # claims node 101's client id
    sampler = NodeSampler(seed=0, num_clients=3, wait_s=0.5)
    with caplog.at_level(logging.WARNING):
        population = sampler.population(fed.grid, 1, 1, lambda *a: None)
    assert population == {0: 100, 2: 102}  # neither 101 nor 103 is sampled
    assert "claimed by nodes 101 and 103" in caplog.text
    population = sampler.population(FakeGrid([100, 101, 102], fed.deliver), 2, 1, lambda *a: None)
    assert population == {0: 100, 1: 101, 2: 102}  # 103 left: the conflict is resolved


def test_with_node_auth_a_bound_client_id_cannot_be_taken(caplog):
    fed = Federation(SETTINGS, 4)
    fed.contexts[103].node_config["partition-id"] = 1
    sampler = NodeSampler(seed=0, num_clients=3, wait_s=0.5, bind=True)
    first = sampler.population(FakeGrid([100, 101, 102], fed.deliver), 1, 1, lambda *a: None)
    with caplog.at_level(logging.WARNING):
        later = sampler.population(FakeGrid([100, 102, 103], fed.deliver), 2, 1, lambda *a: None)
    assert first == {0: 100, 1: 101, 2: 102}
    assert later == {0: 100, 2: 102}  # 101 is away, and 103 may not take its id
    assert "claims client id 1, bound to node 101: refused" in caplog.text


def test_fraction_train_samples_a_share_of_the_federation():
    fed = Federation(SETTINGS, 10)
    strategy = make_strategy(1, fraction_train=0.3)
    messages = list(strategy.configure_train(1, None, CONFIG, fed.grid))
    assert len(messages) == 3
    assert Settings(fraction_train=0.3).sample_size(10) == 3
    with pytest.raises(SettingsError, match="clients-per-round"):
        Settings(num_clients=5, clients_per_round=6)


def test_accumulating_on_nodes_with_sampling_is_refused():
    fed = Federation(SETTINGS, 4)
    strategy = make_strategy(2, importance_upload="reconfig", reconfig_interval=2)
    with pytest.raises(ValueError, match="every-round"):
        strategy.configure_train(1, None, CONFIG, fed.grid)


def test_with_sampling_importance_is_the_sum_of_the_sampled_replies(caplog):
    """2 of 6 nodes per round, reconfiguration every 3 rounds: the solver gets the sum of
    the importance each sampled node uploaded in rounds 1 to 3 (each already weighted by
    its samples), and no node keeps any."""
    fed = Federation(SETTINGS, 6)
    strategy = make_strategy(2, reconfig_interval=3)
    strategy.importance.num_rounds = 10
    seen = {}
    real_update = strategy.update_mask

    def spy(server_round, importance, fixed):
        if importance is not None:
            seen[server_round] = {k: v.clone() for k, v in importance.items()}, fixed
        return real_update(server_round, importance, fixed)

    strategy.update_mask = spy
    expected, fixed_expected, uploaders = None, 0.0, []
    for r in (1, 2, 3):
        messages = list(strategy.configure_train(r, None, CONFIG, fed.grid))
        assert all(m.content[P.CONFIG][P.SEND_IMPORTANCE] for m in messages)
        assert not any(m.content[P.CONFIG][P.ACCUMULATE_IMPORTANCE] for m in messages)
        replies = fed.deliver(messages)
        client = strategy.sampler.client_ids
        for reply in sorted(replies, key=lambda m: client[m.metadata.src_node_id]):
            arrays = {k: reply.content[P.ARRAYS][k].numpy() for k in reply.content[P.ARRAYS]}
            _, g = decode_update(arrays, strategy.model.shapes, strategy.masks, True)
            expected = g if expected is None else {k: expected[k] + g[k] for k in g}
            fixed_expected += reply.content[P.METRICS][P.FIXED_IMPORTANCE]
            uploaders.append(client[reply.metadata.src_node_id])
        with caplog.at_level(logging.INFO):
            strategy.aggregate_train(r, replies)
    assert strategy.importance.mode == "every-round"
    assert len(set(uploaders)) > 2  # more nodes than one round's sample contributed
    importance, fixed = seen[3]
    for k in expected:
        torch.testing.assert_close(importance[k], expected[k], rtol=1e-6, atol=0)
    assert fixed == pytest.approx(fixed_expected)
    assert "importance summed over 6 uploads from 3 rounds" in caplog.text
    assert strategy.importance.uploads == 0  # used, then cleared
    assert not any(P.STATE_IMPORTANCE in c.state for c in fed.contexts.values())


def test_nodes_keep_no_importance_when_no_method_uses_it():
    fed = Federation(SETTINGS, 3)
    strategy = make_strategy(3, reconfig_interval=0)  # never reconfigures
    for r in (1, 2):
        messages = list(strategy.configure_train(r, None, CONFIG, fed.grid))
        strategy.aggregate_train(r, fed.deliver(messages))
    assert not any(P.STATE_IMPORTANCE in c.state for c in fed.contexts.values())


def test_a_node_without_partition_id_is_sampled_by_node_id_with_a_warning(tmp_path, caplog):
    fed = Federation(SETTINGS, 2)
    folder = save_folder(tmp_path / "data", client_partition(SETTINGS.data_spec(), 0, 2))
    for ctx in fed.contexts.values():  # a device with its own data folder and no partition id
        ctx.node_config.pop("partition-id")
        ctx.node_config["data-path"] = str(folder)
    sampler = NodeSampler(seed=0, num_clients=2)
    with caplog.at_level(logging.WARNING):
        population = sampler.population(fed.grid, 1, 2, lambda *a: None)
    assert population == {100: 100, 101: 101}
    assert "changes between runs" in caplog.text


def test_server_keeps_a_small_record_per_node_that_took_part():
    """60 nodes, 3 sampled per round: what the server keeps per node is one client id per
    node that answered and one mask version per node that trained; importance is one sum
    over layers, whatever the number of nodes."""
    fed = Federation(SETTINGS, 60)
    strategy = make_strategy(3, reconfig_interval=2)
    strategy.importance.num_rounds = 10
    trained = set()
    for r in range(1, 6):
        messages = list(strategy.configure_train(r, None, CONFIG, fed.grid))
        trained |= {m.metadata.dst_node_id for m in messages}
        strategy.aggregate_train(r, fed.deliver(messages))
    assert 3 <= len(trained) <= 15
    assert set(strategy.nodes.mask_version) == trained  # every node that trained, no other
    assert all(isinstance(v, int) for v in strategy.nodes.mask_version.values())
    assert len(strategy.sampler.client_ids) == 60  # one int per node that answered
    # Round 5 uploaded importance for round 6's reconfiguration: one sum per prunable layer.
    assert set(strategy.importance.sum.total()) == set(strategy.masks)
    assert strategy.importance.uploads == 3
    # Round 1 also identified all 60 nodes; later rounds talk to the 3 sampled ones only.
    assert len(strategy.stats[1].per_node_bytes) == 60
    assert [len(strategy.stats[r].per_node_bytes) for r in range(2, 6)] == [3] * 4


def test_a_split_that_cannot_give_every_client_data_stops_the_run_clearly():
    """Dirichlet over 1,000 clients of the 3,500 training digits: every node says so when
    it is identified, and the run stops before anyone trains."""
    fed = Federation(Settings(**{**SETTINGS.__dict__, "partitioner": "dirichlet"}), 2)
    for ctx in fed.contexts.values():
        ctx.node_config["num-partitions"] = 1000
    with pytest.raises(RuntimeError, match="none of the 2 nodes that answered can train"):
        NodeSampler(seed=0, wait_s=5).federation(fed.grid, 0, lambda *a: None)


def test_a_node_that_cannot_load_its_data_is_left_out(tmp_path, caplog):
    fed = Federation(SETTINGS, 4)
    fed.contexts[101].node_config["data-path"] = str(tmp_path / "missing")
    strategy = make_strategy(3, num_clients=3)
    with caplog.at_level(logging.WARNING):
        messages = list(strategy.configure_train(1, None, CONFIG, fed.grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [100, 102, 103]
    assert "node 101 is left out: it cannot load its data" in caplog.text
