"""The robust rules and the bounds on sample counts, on plain tensors (no Flower run)."""

import flwr_datasets.partitioner
import numpy as np
import pytest
import scipy.stats
import torch

from clients.partitions import client_partition
from fedprune.aggregate import KeptMean, RobustKept, RobustRule, robust_importance
from fedprune.data import DataSpec
from fedprune.partition_cache import partition_sizes
from fedprune.replies import MAX_NUM_EXAMPLES
from fedprune.sample_counts import ExampleBounds
from strategies.sparse_fedavg import FLOWER_KERNELS

RULES = ("clipped-mean", "trimmed-mean", "median")


def rule(name, **kw):
    return RobustRule(name, FLOWER_KERNELS, **kw)


def honest_and_one_outlier(n_honest=9, size=50, outlier=1e6, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(size, generator=g), "b": torch.randn(3, generator=g)}
    replies = [
        {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        for _ in range(n_honest)
    ]
    replies.append({k: v * outlier for k, v in base.items()})
    return base, replies


def combined(name, base, replies, weights=None):
    agg = RobustKept(rule(name), base) if name != "mean" else KeptMean()
    for reply, w in zip(replies, weights or [100] * len(replies), strict=True):
        agg.add(w, reply)
    return agg.mean(), agg


@pytest.mark.parametrize("name", RULES)
def test_one_huge_reply_moves_a_robust_rule_little_and_the_mean_far(name):
    base, replies = honest_and_one_outlier()
    honest, _ = combined("mean", base, replies[:-1])
    mean, _ = combined("mean", base, replies)
    robust, _ = combined(name, base, replies)
    for k in base:
        assert (mean[k] - honest[k]).abs().max() > 1e3
        # The honest replies' spread is 0.01: each rule stays within a few of it.
        assert (robust[k] - honest[k]).abs().max() < 0.05, name


def test_the_rules_are_flowers_own_kernels_and_numpys_median():
    rows = np.random.default_rng(0).normal(size=(7, 20))
    stacked = [[r.astype(np.float32)] for r in rows]
    (trimmed,), _ = rule("trimmed-mean", trim_fraction=0.2).combine(stacked, [1] * 7)
    np.testing.assert_allclose(trimmed, scipy.stats.trim_mean(rows, 0.2, axis=0), rtol=1e-6)
    (median,), _ = rule("median").combine([[r.astype(np.float32)] for r in rows], [1] * 7)
    np.testing.assert_allclose(median, np.median(rows, axis=0), rtol=1e-6)


def test_clipped_mean_clips_updates_beyond_the_multiple_of_the_median_norm():
    base = {"w": torch.zeros(4)}
    norms = [1.0, 1.0, 2.0, 1.5, 10.0]  # median 1.5: bound 3.0 with multiple 2
    replies = [{"w": torch.tensor([n, 0.0, 0.0, 0.0])} for n in norms]
    out, agg = combined("clipped-mean", base, replies, [1] * 5)
    assert agg.clipped == 1
    assert out["w"][0].item() == pytest.approx((1 + 1 + 2 + 1.5 + 3.0) / 5)
    # Sample-weighted, as the mean: a node with twice the data counts twice.
    out, _ = combined("clipped-mean", base, replies[:2] + replies[2:3], [1, 1, 2])
    assert out["w"][0].item() == pytest.approx((1 + 1 + 2 * 2) / 4)


def test_the_robust_rules_act_on_updates_from_the_values_the_nodes_were_sent():
    """Median and trimmed mean do not care; clipping bounds the change, not the value."""
    base = {"w": torch.full((3,), 100.0)}
    replies = [{"w": torch.full((3,), 100.0 + d)} for d in (0.1, 0.2, 0.3, 0.2, 50.0)]
    out, _ = combined("clipped-mean", base, replies, [1] * 5)
    assert out["w"][0].item() == pytest.approx(100 + (0.1 + 0.2 + 0.3 + 0.2 + 0.4) / 5, rel=1e-6)


def test_trimmed_mean_of_few_replies_trims_whole_replies_only():
    base, replies = honest_and_one_outlier(n_honest=3)  # 4 replies, 0.2 x 4 < 1: no trim
    out, _ = combined("trimmed-mean", base, replies)
    assert out["w"].abs().max() > 1e3  # nothing was cut: it is the mean then
    out, _ = combined("trimmed-mean", base, replies[:3] + replies[3:] + replies[:1])  # 5
    assert out["w"].abs().max() < 10


SHAPES = {"w": (100,)}


def test_robust_importance_has_the_scale_of_the_sum_and_ignores_a_steering_upload():
    g = torch.Generator().manual_seed(1)
    per_example = torch.rand(100, generator=g)
    sizes = [300, 360, 400, 360, 340]
    uploads = [(n, {"w": per_example * n}, 2.0 * n) for n in sizes]
    plain = sum(n for n in sizes) * per_example
    for name in RULES:
        out, fixed, _ = robust_importance(rule(name), uploads, SHAPES)
        torch.testing.assert_close(out["w"], plain, rtol=1e-5, atol=1e-5)
        assert fixed == pytest.approx(2.0 * sum(sizes))
    steer = torch.zeros(100)
    steer[:5] = 1e20  # a node that wants positions 0-4 kept
    poisoned = [*uploads, (360, {"w": steer}, 0.0)]
    for name in ("trimmed-mean", "median"):
        out, _, _ = robust_importance(rule(name), poisoned, SHAPES)
        assert out["w"][:5].max() < 2 * plain.max(), name
    out, _, clipped = robust_importance(rule("clipped-mean"), poisoned, SHAPES)
    assert clipped == 1 and out["w"].max() < 1e6


def test_a_claimed_count_is_bounded_by_the_partition_and_the_setting():
    bounds = ExampleBounds({0: 360, 1: 350}, limit=0)
    assert bounds.count(0, 999_999_999) == 360
    assert bounds.count(1, 200) == 200  # fewer than expected: believed
    assert bounds.count(7, 999_999_999) == 999_999_999  # no size known: the codec's bound
    assert bounds.bound(None) == MAX_NUM_EXAMPLES
    limited = ExampleBounds({0: 360}, limit=300)
    assert limited.count(0, 999) == 300 and limited.count(7, 999) == 300


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shards"])
def test_the_server_knows_each_partitions_size_as_the_nodes_cut_it(partitioner):
    spec = DataSpec(partitioner=partitioner)
    sizes = partition_sizes(spec, 5, lambda: flwr_datasets.partitioner)
    assert sizes == {i: len(client_partition(spec, i, 5)) for i in range(5)}


def test_robust_importance_takes_coded_uploads_as_their_dense_values():
    """The wire's coded uploads (kept values plus the pruned positions sent) enter a robust
    rule as dense importance, 0 where a node sent nothing."""
    from fedprune.importance_code import ImportanceUpload

    kept = np.zeros(100, dtype=bool)
    kept[:10] = True
    uploads = []
    for n in (300, 360, 400):
        values = np.full(10, 0.5 * n, dtype=np.float32)
        sent = np.arange(10, 20, dtype=np.int64)
        upload = ImportanceUpload(kept, values, sent, np.full(10, 0.25 * n, dtype=np.float32))
        uploads.append((n, {"w": upload}, float(n)))
    out, fixed, _ = robust_importance(rule("median"), uploads, SHAPES)
    total = 300 + 360 + 400
    assert out["w"].shape == (100,)
    torch.testing.assert_close(out["w"][:10], torch.full((10,), 0.5 * total))
    torch.testing.assert_close(out["w"][10:20], torch.full((10,), 0.25 * total))
    assert float(out["w"][20:].abs().max()) == 0.0
    assert fixed == pytest.approx(total)
