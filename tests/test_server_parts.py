"""The server's parts on plain tensors, without Flower: the global model and its versions,
what each node holds, reply checks, the running mean, the importance plan and sum."""

import numpy as np
import pytest
import torch

from fedprune import protocol as P
from fedprune.aggregate import KeptMean
from fedprune.codec import encode_update
from fedprune.global_model import GlobalModel
from fedprune.importance import ImportanceCollector
from fedprune.node_state import CHANGE, FULL, NONE, NodeLedger
from fedprune.replies import Expected, ReplyError, check_evaluate_reply, check_train_reply


def small_model():
    params = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(3)}
    masks = {"w": torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)}
    return GlobalModel(params, masks)


def test_model_version_moves_with_every_change_and_mask_version_with_the_mask():
    model = small_model()
    assert (model.model_version, model.mask_version) == (0, 0)
    model.set_kept({"w": torch.zeros(8), "b": torch.zeros(3)})
    assert (model.model_version, model.mask_version) == (1, 0)
    # Pruned positions keep their last value; kept ones take the new values.
    assert model.params["w"][0, 1] == 1.0 and model.params["w"][0, 0] == 0.0
    same = {k: m.clone() for k, m in model.masks.items()}
    assert model.install_masks(same) == (0, 0) and model.model_version == 1
    new = {"w": torch.ones(3, 4, dtype=torch.bool)}
    assert model.install_masks(new) == (4, 0)
    assert (model.model_version, model.mask_version) == (2, 1)
    assert model.params["w"][0, 1] == 1.0  # regrows from its last value (the paper)


def test_zero_regrowth_restarts_regrown_weights_at_zero():
    model = small_model()
    model.regrow_init = "zero"
    model.install_masks({"w": torch.ones(3, 4, dtype=torch.bool)})
    assert model.params["w"][0, 1] == 0.0 and model.params["w"][0, 0] == 0.0  # kept: 0 before
    assert model.params["w"][2, 3] == 11.0


def test_kept_values_land_in_wire_order():
    model = small_model()
    model.set_kept({"w": torch.arange(100, 108, dtype=torch.float32), "b": torch.zeros(3)})
    assert model.masked_params()["w"][model.masks["w"]].tolist() == list(range(100, 108))
    assert torch.all(model.masked_params()["w"][~model.masks["w"]] == 0)


def test_ledger_sends_the_mask_to_new_and_forgotten_nodes_only():
    nodes = NodeLedger()
    assert nodes.mask_to_send(7, 0) == FULL
    nodes.confirm(7, 0)
    assert nodes.mask_to_send(7, 0) == NONE
    assert nodes.mask_to_send(7, 1) == FULL
    assert nodes.mask_to_send(7, 1, change_available=True) == CHANGE
    assert nodes.mask_to_send(7, 2, change_available=True) == FULL  # two versions behind
    nodes.forget([7])
    assert nodes.mask_to_send(7, 0) == FULL


def reply(model, importance=False, **metrics):
    params = model.masked_params()
    imp = {"w": torch.rand(3, 4)} if importance else None
    arrays = encode_update(params, model.masks, imp)
    base = {P.NUM_EXAMPLES: 10, P.TRAIN_LOSS: 0.5, P.MASK_VERSION: 0}
    if importance:
        base.update({P.FIXED_IMPORTANCE: 1.0, P.IMPORTANCE_ROUNDS: 2})
    base.update(metrics)
    return arrays, {k: v for k, v in base.items() if v is not None}


def expected(model, covers=0):
    return Expected(0, model.shapes, model.masks, covers)


def test_a_valid_reply_decodes_to_kept_values_only():
    model = small_model()
    update = check_train_reply(*reply(model), expected(model))
    assert update.values["w"].shape == (8,) and update.values["b"].shape == (3,)
    assert update.importance is None and update.num_examples == 10


@pytest.mark.parametrize(
    "metrics, reason",
    [
        ({P.TRAIN_LOSS: "nan?"}, "train-loss"),  # was read as 0.0
        ({P.TRAIN_LOSS: float("nan")}, "train-loss"),
        ({P.TRAIN_LOSS: None}, "train-loss"),
        ({P.NUM_EXAMPLES: 0}, "num-examples"),
        ({P.NUM_EXAMPLES: True}, "num-examples"),
        ({P.MASK_VERSION: 3}, "mask version"),
        ({P.COMPUTE_S: -1.0}, "compute-s"),
        ({P.PEAK_MEMORY_MB: -1.0}, "peak-memory-mb"),
        ({P.PEAK_MEMORY_MB: float("inf")}, "peak-memory-mb"),
    ],
)
def test_claims_that_are_not_numbers_in_range_are_refused(metrics, reason):
    model = small_model()
    with pytest.raises(ReplyError, match=reason):
        check_train_reply(*reply(model, **metrics), expected(model))


def test_missing_fixed_importance_is_refused_not_read_as_zero():
    model = small_model()
    arrays, metrics = reply(model, importance=True, **{P.FIXED_IMPORTANCE: None})
    with pytest.raises(ReplyError, match="importance-fixed"):
        check_train_reply(arrays, metrics, expected(model, covers=2))


def test_importance_over_another_window_is_set_aside_but_values_are_kept():
    model = small_model()
    arrays, metrics = reply(model, importance=True, **{P.IMPORTANCE_ROUNDS: 1})
    update = check_train_reply(arrays, metrics, expected(model, covers=2))
    assert update.importance is None and "covers 1 local rounds" in update.importance_note
    assert update.values["w"].shape == (8,)
    ok = check_train_reply(*reply(model, importance=True), expected(model, covers=2))
    assert ok.importance is not None and ok.importance_rounds == 2


def test_evaluate_reply_checks():
    assert check_evaluate_reply(
        {P.NUM_EXAMPLES: 4, P.EVAL_ACCURACY: 0.5, P.EVAL_LOSS: 1.0, P.MASK_VERSION: 0}, 0
    ) == (4, 0.5, 1.0)
    with pytest.raises(ReplyError, match="above 1"):
        check_evaluate_reply(
            {P.NUM_EXAMPLES: 4, P.EVAL_ACCURACY: 1.5, P.EVAL_LOSS: 1.0, P.MASK_VERSION: 0}, 0
        )


def test_kept_mean_is_the_sample_weighted_mean():
    mean = KeptMean()
    mean.add(1, {"w": torch.tensor([1.0, 2.0])})
    mean.add(3, {"w": torch.tensor([5.0, 6.0])})
    assert mean.mean()["w"].tolist() == [4.0, 5.0]
    with pytest.raises(ValueError):
        KeptMean().mean()


def test_importance_plan_with_a_window():
    collector = ImportanceCollector(lambda r: r % 10 == 0, num_rounds=40, window=2)
    collector.mode = "reconfig"
    tracked = [r for r in range(1, 41) if collector.plan(r).track]
    assert tracked == [9, 10, 19, 20, 29, 30]  # none for round 40: nothing would train it
    assert collector.plan(9).keep and not collector.plan(9).send
    collector.end_round(collector.plan(9), aggregated=True)
    plan = collector.plan(10)
    assert plan.send and plan.update and plan.covers == 2


def test_importance_plan_every_round_and_full_window():
    collector = ImportanceCollector(lambda r: r % 3 == 0, num_rounds=7, window=0)
    collector.mode = "every-round"
    plans = {r: collector.plan(r) for r in range(1, 8)}
    assert [r for r, p in plans.items() if p.send] == [1, 2, 3, 4, 5, 6]
    assert all(p.covers == 1 and not p.keep for p in plans.values() if p.send)
    assert [r for r, p in plans.items() if p.update] == [3, 6]


def test_a_skipped_update_round_keeps_what_was_uploaded_and_runs_next_round():
    collector = ImportanceCollector(lambda r: r == 2, num_rounds=10, shapes={"w": (2,)})
    collector.mode = "every-round"
    g = {"w": torch.ones(2)}
    for r in (1, 2):
        collector.add(g, 1.0)
        assert collector.end_round(collector.plan(r), aggregated=r != 2) == (None, 0.0)
    plan = collector.plan(3)  # round 2 was skipped: round 3 asks again and updates
    assert plan.send and plan.update
    collector.add(g, 1.0)
    importance, fixed = collector.end_round(plan, aggregated=True)
    assert importance["w"].tolist() == [3.0, 3.0] and fixed == 3.0
    assert collector.used == (3, 3) and not collector.plan(4).track


def test_reconfig_mode_with_sampling_is_refused_and_auto_picks():
    collector = ImportanceCollector(lambda r: False, num_rounds=5)
    assert collector.resolve_mode("auto", 10, 10) and collector.mode == "reconfig"
    assert collector.resolve_mode("auto", 5, 10) and collector.mode == "every-round"
    with pytest.raises(ValueError, match="every-round"):
        collector.resolve_mode("reconfig", 5, 10)
    np.testing.assert_equal(collector.resolve_mode("every-round", 5, 10), False)
