"""A simulation with fewer nodes than the paper's clients: each node trains as several
clients (`simulated-clients`), and one node's reply is what FedAvg over those clients
would have averaged."""

import copy

import pytest
import torch

from fedprune.identities import clients_of_node
from fedprune.training import train_as_clients, train_masked
from strategies.server_app import simulated_clients
from tests.test_training import masked_model, toy_data


def test_the_nodes_share_the_client_ids_out_exactly():
    assert clients_of_node(10, 0, 2) == [0, 2, 4, 6, 8]
    assert clients_of_node(10, 1, 2) == [1, 3, 5, 7, 9]
    assert clients_of_node(10, 3, 4) == [3, 7]
    for total, nodes in ((10, 2), (10, 3), (10, 4), (7, 7), (3, 5), (10, 10)):
        ids = sorted(c for p in range(nodes) for c in clients_of_node(total, p, nodes))
        assert ids == list(range(max(total, nodes))), (total, nodes)
    assert clients_of_node(3, 4, 5) == [4]  # more nodes than clients: its own id
    with pytest.raises(ValueError, match="partition id 2"):
        clients_of_node(10, 2, 2)


def _train(model, masks, data, seed, track=True):
    return train_masked(
        model,
        masks,
        data,
        steps=3,
        batch_size=4,
        lr=0.2,
        generator=torch.Generator().manual_seed(seed),
        track_importance=track,
    )


def test_a_node_as_two_clients_replies_their_fedavg_mean_and_summed_importance():
    model, masks = masked_model(2)
    data = toy_data(30)
    # What two separate clients would do, each from the received weights on its share.
    shares = [(data.x[j::2], data.y[j::2]) for j in range(2)]
    alone = []
    for j, (x, y) in enumerate(shares):
        clone = copy.deepcopy(model)
        result = _train(clone, masks, type(data)(x, y), seed=100 + j)
        alone.append((dict(clone.named_parameters()), result))

    node = train_as_clients(
        model, data, 2, lambda share, j: _train(model, masks, share, seed=100 + j)
    )
    weights = [len(shares[0][1]) / len(data), len(shares[1][1]) / len(data)]
    for name, p in model.named_parameters():
        expected = weights[0] * alone[0][0][name] + weights[1] * alone[1][0][name]
        torch.testing.assert_close(p.detach(), expected.detach(), rtol=1e-6, atol=1e-7)
        if name in masks:  # pruned weights stay exactly 0.0
            assert torch.all(p[~masks[name]] == 0)
    for name, g in node.importance.items():
        torch.testing.assert_close(g, alone[0][1].importance[name] + alone[1][1].importance[name])
    assert node.num_examples == 30 and node.samples == 2 * 3 * 4 and node.steps == 3
    assert node.loss == pytest.approx((alone[0][1].loss * 15 + alone[1][1].loss * 15) / 30)


def test_one_client_is_the_plain_round_and_no_importance_stays_none():
    model, masks = masked_model(3)
    twin = copy.deepcopy(model)
    data = toy_data(16)
    one = train_as_clients(model, data, 1, lambda share, j: _train(model, masks, share, 7))
    plain = _train(twin, masks, data, 7)
    for (_, a), (_, b) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.equal(a, b)
    assert one.loss == plain.loss
    untracked = train_as_clients(
        model, data, 3, lambda share, j: _train(model, masks, share, j, track=False)
    )
    assert untracked.importance is None
    with pytest.raises(ValueError, match="cannot be shared by 20 clients"):
        train_as_clients(model, data, 20, lambda share, j: None)


class InMemoryGrid:  # the simulation's grid, by name (as `simulated_clients` tells it)
    pass


class GrpcGrid:
    pass


def test_only_a_simulation_smaller_than_the_paper_stands_for_more_clients():
    from fedprune.settings import Settings

    settings = Settings()
    assert settings.simulated_clients == 10
    assert simulated_clients(InMemoryGrid(), settings, 2) == 10
    assert simulated_clients(InMemoryGrid(), settings, 10) == 0  # one client per node
    assert simulated_clients(GrpcGrid(), settings, 2) == 0  # a deployment: real devices
    assert simulated_clients(InMemoryGrid(), Settings(simulated_clients=0), 2) == 0
