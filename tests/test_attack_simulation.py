"""Each attack of issue 15 through the real Simulation Engine (`flwr run`, Ray): a copy of
the project whose ClientApp is `experiments.hostile.app`, 5 nodes of which partition 3 is
hostile, small-cnn, 4 rounds, one reconfiguration. With the defence on
(`aggregation = trimmed-mean`, counts bounded by the partitions) the final accuracy and
mask stay those of the honest run under the same settings; off (`mean`, counts believed),
the attack shows. The same, faster and in one process: tests/test_attacks.py.
"""

import pytest

from experiments.bench_attacks import arm_config, jaccard, run_arm
from experiments.hostile import hostile_project
from experiments.local_run import local_superlink

pytestmark = pytest.mark.slow

NODES, HOSTILE, DEFENCE = 5, 3, "trimmed-mean"
TASK = (
    "model='small-cnn' cost-profile='paper-uniform' num-server-rounds=4 reconfig-interval=2 "
    "ip-max-iterations=40 ip-interval=20 node-wait-s=30"
)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """run(attack, defence) -> (final accuracy, final masks), one SuperLink for the module;
    each arm runs once."""
    root = tmp_path_factory.mktemp("attacks")
    project = hostile_project(root / "project")
    done = {}
    with local_superlink(root / "flwr-home") as link:

        def run(attack: str, defence: str):
            name = f"{attack or 'honest'}-{defence}"
            if name not in done:
                config = f"{TASK} {arm_config(attack, defence, HOSTILE)}"
                r = run_arm(link, project, root, name, config, NODES, timeout_s=600)
                done[name] = (r["accuracy"], r["masks"])
            return done[name]

        yield run


def moved(sim, attack, defence):
    """(accuracy lost, mask agreement) of the attacked run against the honest one under the
    same defence."""
    attacked, honest = sim(attack, defence), sim("", defence)
    return honest[0] - attacked[0], jaccard(attacked[1], honest[1])


def test_a_huge_num_partitions_neither_stalls_nor_moves_the_run(sim):
    lost, agreement = moved(sim, "num-partitions", DEFENCE)
    assert lost == 0 and agreement == 1.0  # the liar trains honestly: nothing changes


def test_a_stolen_client_id_does_not_stall_the_run(sim):
    lost, agreement = moved(sim, "client-id", DEFENCE)  # two of five nodes left out
    assert lost < 0.1 and agreement > 0.9


def test_a_huge_num_examples_claim_is_bounded(sim):
    lost, agreement = moved(sim, "num-examples", DEFENCE)
    assert abs(lost) < 0.02 and agreement > 0.98
    off_lost, _ = moved(sim, "num-examples", "off")
    assert off_lost > 0.1


def test_huge_kept_values_are_outvoted(sim):
    lost, agreement = moved(sim, "values", DEFENCE)
    assert lost < 0.1 and agreement > 0.95  # see tests/test_attacks.py
    off_lost, _ = moved(sim, "values", "off")
    assert off_lost > 0.3


def test_importance_that_steers_the_mask_is_outvoted(sim):
    lost, agreement = moved(sim, "importance", DEFENCE)
    assert abs(lost) < 0.05 and agreement > 0.95
    _, off_agreement = moved(sim, "importance", "off")
    assert off_agreement < 0.9
