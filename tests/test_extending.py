"""docs/extending.md's worked example runs as written: its class, registered, trains
through the strategy and the ClientApp and prunes once to its target."""

import re
from pathlib import Path

import pytest

from fedprune.costs import named_profile
from fedprune.masks import density, full_masks
from fedprune.models import build_model, prunable_names
from fedprune.settings import Settings, SettingsError
from strategies import methods
from tests.inprocess import Federation

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def example_class():
    block = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(block, str(DOC), "exec"), namespace)
    return namespace["MagnitudeOnce"]


def test_the_worked_example_is_a_method_that_prunes_once(monkeypatch):
    cls = example_class()
    monkeypatch.setattr(methods, "METHODS", {**methods.METHODS, cls.name: cls})
    settings = Settings(
        method="magnitude-once",
        target_density=0.2,
        model="small-cnn",
        cost_profile="paper-uniform",
        local_steps=2,
        batch_size=10,
        clients_per_round=3,
    )
    assert methods.method_of(settings) is cls
    with pytest.raises(SettingsError, match="'target-density'"):
        methods.method_of(Settings(method="magnitude-once"))
    model = build_model("small-cnn", seed=0)
    strategy = cls(
        params={n: p.detach().clone() for n, p in model.named_parameters()},
        masks=full_masks(model),
        profile=named_profile("paper-uniform", prunable_names(model)),
        clients_per_round=3,
        **cls.options(settings),
    )
    fed = Federation(settings, 3)
    densities = []
    for r in (1, 2, 3):
        fed.train_round(strategy, r)
        densities.append(density(strategy.masks))
        assert strategy.stats[r].replies == 3
    assert densities == pytest.approx([0.2, 0.2, 0.2], abs=1e-4)
    assert strategy.mask_version == 1
