"""Each baseline's masks behave as the method claims, through the strategy and the
ClientApp in one process, plus the pure policies on plain tensors."""

import itertools

import pytest
import torch

from fedprune import policies
from fedprune.costs import named_profile
from fedprune.data import server_share
from fedprune.masks import density, full_masks
from fedprune.models import build_model, prunable_names
from fedprune.settings import Settings, SettingsError
from strategies.baselines import FedAvgDense, FedDST, IterativeMagnitude, Snip
from strategies.method import Start
from strategies.methods import method_of
from tests.inprocess import Federation

SETTINGS = Settings(
    model="small-cnn",
    cost_profile="paper-uniform",
    local_steps=2,
    batch_size=10,
    clients_per_round=3,
)


def common(masks=None):
    model = build_model("small-cnn", seed=0)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return dict(
        params=params,
        masks=masks if masks is not None else full_masks(model),
        profile=named_profile("paper-uniform", prunable_names(model)),
        clients_per_round=3,
    )


def run(strategy, rounds):
    fed = Federation(SETTINGS, 3)
    densities = []
    for r in range(1, rounds + 1):
        fed.train_round(strategy, r)
        densities.append(density(strategy.masks))
        assert strategy.stats[r].replies == 3
    return densities


def test_fedavg_stays_dense():
    strategy = FedAvgDense(**common())
    assert run(strategy, 3) == [1.0, 1.0, 1.0]
    assert strategy.mask_version == 0


def test_snip_prunes_once_to_its_target_and_holds_it():
    strategy = Snip(target_density=0.2, **common())
    densities = run(strategy, 4)
    assert all(d == pytest.approx(0.2, abs=1e-4) for d in densities)
    assert strategy.mask_version == 1


def test_iterative_shrinks_monotonically_to_its_target():
    strategy = IterativeMagnitude(target_density=0.1, steps=4, ramp_rounds=4, **common())
    densities = run(strategy, 5)
    assert all(b <= a for a, b in itertools.pairwise(densities))
    assert densities[0] < 1.0 and densities[-1] == pytest.approx(0.1, abs=1e-4)


def test_feddst_changes_its_mask_but_holds_its_density():
    c = common()
    model = build_model("small-cnn", seed=0)
    start = Start(model, c["profile"], server_share(SETTINGS.data_spec()), 10, (1, 28, 28))
    masks, _ = FedDST.starting_point(Settings(target_density=0.3), start)
    strategy = FedDST(interval=2, **dict(c, masks=masks))
    start = {k: m.clone() for k, m in masks.items()}
    densities = run(strategy, 4)
    assert all(d == pytest.approx(density(start), abs=1e-9) for d in densities)
    assert strategy.mask_version == 2
    assert any(not torch.equal(start[k], strategy.masks[k]) for k in start)


def test_policies_on_plain_tensors():
    w = {"a": torch.tensor([[0.1, -3.0], [2.0, 0.5]]), "b": torch.tensor([1.0, -0.2, 4.0])}
    g = {"a": torch.ones(2, 2), "b": torch.ones(3)}
    keep = policies.snip(w, g, density=3 / 7)
    assert [keep["a"].tolist(), keep["b"].tolist()] == [
        [[False, True], [True, False]],
        [False, False, True],
    ]
    m = policies.magnitude(
        w,
        {"a": torch.ones(2, 2, dtype=torch.bool), "b": torch.tensor([True, True, False])},
        density=2 / 7,
    )
    assert int(m["b"][2]) == 0, "magnitude pruning must not regrow"
    assert policies.iterative_density(0, 0.1, 20, 10) == 1.0
    assert policies.iterative_density(10, 0.1, 20, 10) == pytest.approx(0.1)
    mask = {"a": torch.tensor([True, True, False, False])}
    new = policies.prune_and_regrow(
        {"a": torch.tensor([5.0, 0.1, 0.0, 0.0])},
        mask,
        {"a": torch.tensor([0.0, 0.0, 1.0, 9.0])},
        fraction=0.5,
    )
    assert new["a"].tolist() == [True, False, False, True]


def test_methods_that_prune_to_a_density_need_one():
    for method in ("snip", "iterative", "feddst"):
        with pytest.raises(SettingsError, match="'target-density'"):
            method_of(Settings(method=method))
        method_of(Settings(method=method, target_density=0.1))
    with pytest.raises(SettingsError, match="'mask-path'"):
        method_of(Settings(method="lottery"))
    with pytest.raises(SettingsError, match="did you mean 'feddst'"):
        method_of(Settings(method="fedst"))


def test_erk_keeps_small_layers_denser_and_hits_the_overall_density():
    model = build_model("conv2")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in full_masks(model)}
    d = policies.erk_densities(shapes, 0.04)
    sizes = {k: torch.Size(s).numel() for k, s in shapes.items()}
    overall = sum(d[k] * sizes[k] for k in d) / sum(sizes.values())
    assert overall == pytest.approx(0.04)
    assert all(0 < v <= 1 for v in d.values())
    assert d["conv1.weight"] > d["conv2.weight"] > d["fc1.weight"]
