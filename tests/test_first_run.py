"""A first run fails fast and says how to fix a bad setting; the defaults fit any
federation size."""

import time

import pytest

from experiments.local_run import local_superlink
from fedprune.settings import Settings, SettingsError
from strategies.accounting import RoundStats
from strategies.methods import ignored_settings
from strategies.server_app import check_federation, starting_inputs
from tests.inprocess import Federation

SMALL = Settings(model="small-cnn", cost_profile="paper-uniform")


def test_an_unknown_key_names_the_closest_one():
    with pytest.raises(SettingsError, match="did you mean 'clients-per-round'"):
        Settings.from_run_config({"clients-per-rund": 3})


def test_a_model_without_the_papers_constants_names_the_profiles_that_fit():
    with pytest.raises(SettingsError, match=r"'paper-scaled'.*'measured'"):
        starting_inputs(Settings(model="resnet18"))
    with pytest.raises(SettingsError, match=r"'model' = 'vgg11'.*32x32"):
        starting_inputs(Settings(model="vgg11", cost_profile="paper-uniform"))


def test_settings_the_method_ignores_are_named():
    assert ignored_settings(Settings(target_density=0.1)) == ["target-density"]
    assert ignored_settings(Settings(method="snip", target_density=0.1)) == []
    assert "reconfig-interval" not in ignored_settings(Settings(reconfig_interval=5))


def test_every_node_trains_by_default_whatever_the_federation_size():
    for nodes in (2, 7):
        fed = Federation(SMALL, nodes)
        sampler, size = check_federation(fed.grid, SMALL, RoundStats())
        assert size == nodes
        assert len(sampler.identities.client_of) == nodes


def test_accumulating_importance_on_sampled_nodes_is_refused_before_any_work():
    settings = Settings(**{**SMALL.__dict__, "importance_upload": "reconfig"})
    fed = Federation(settings, 4)
    check_federation(fed.grid, settings, RoundStats())  # every node trains: fine
    sampled = Settings(**{**settings.__dict__, "clients_per_round": 2})
    with pytest.raises(SettingsError, match="'every-round'"):
        check_federation(fed.grid, sampled, RoundStats())


def test_a_real_run_with_a_bad_combination_stops_in_seconds(tmp_path):
    """Through `flwr run`: the federation is checked before initial pruning starts."""
    config = (
        "model='small-cnn' cost-profile='paper-uniform' clients-per-round=1 "
        f"importance-upload='reconfig' output-dir='{tmp_path}'"
    )
    with local_superlink(tmp_path / "home") as link:
        t0 = time.monotonic()
        done = link.run(config, num_supernodes=2, timeout_s=300, capture=True)
        seconds = time.monotonic() - t0
    log = done.stdout + done.stderr
    assert "Use 'every-round'" in log, log[-3000:]
    assert "initial pruning:" not in log  # stopped before phase 1 began
    assert not (tmp_path / "outputs").exists()
    print(f"failed after {seconds:.0f} s")
