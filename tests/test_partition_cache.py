"""A split's partitions kept on disk by the server and read by the nodes of its machine
(`fedprune.partition_cache`): the rows are the partitioner's, and a node that finds them
never imports flwr-datasets."""

import flwr_datasets.partitioner
import numpy as np
import pytest

import clients.partitions as partitions
from fedprune.data import DataSpec
from fedprune.partition_cache import (
    cached_partitions,
    every_partition,
    partition_sizes,
    partitions_key,
)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPRUNE_CACHE_DIR", str(tmp_path))


def _classes():
    return flwr_datasets.partitioner


def _no_partitioner():
    raise AssertionError("the partitioner was built, though the split is in the cache")


def _cut(spec, n):
    """Each partition's rows straight from a fresh flwr-datasets partitioner."""
    built = partitions.make_partitioner(spec, n)
    built.dataset = partitions._partitioner(spec, n).dataset
    return [np.asarray(built.load_partition(i)["index"]) for i in range(n)]


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shards"])
def test_the_nodes_read_the_partitions_the_server_cut(partitioner, monkeypatch):
    spec = DataSpec(partitioner=partitioner, seed=3)
    assert cached_partitions(spec, 4) is None  # nothing before the server cut it
    server = every_partition(spec, 4, _classes)
    want = _cut(spec, 4)
    assert [p.tolist() for p in server] == [p.tolist() for p in want]
    # A node of this machine: the rows from disk, without building a partitioner.
    monkeypatch.setattr(partitions, "_classes", _no_partitioner)
    partitions._partitioner.cache_clear()
    for i in range(4):
        assert np.array_equal(partitions.partition_rows(spec, i, 4), want[i])
    assert partition_sizes(spec, 4, _no_partitioner) == {i: len(w) for i, w in enumerate(want)}


def test_the_key_follows_what_the_partitions_depend_on():
    base = DataSpec(partitioner="dirichlet")
    keys = {
        partitions_key(base, 4),
        partitions_key(base, 5),
        partitions_key(DataSpec(partitioner="dirichlet", dirichlet_alpha=0.1), 4),
        partitions_key(DataSpec(partitioner="dirichlet", seed=1), 4),  # another pool, too
        partitions_key(DataSpec(partitioner="iid"), 4),
        partitions_key(DataSpec(partitioner="dirichlet", server_fraction=0.2), 4),
    }
    assert len(keys) == 6
    assert partitions_key(base, 4) == partitions_key(DataSpec(partitioner="dirichlet"), 4)
    every_partition(base, 4, _classes)
    assert cached_partitions(base, 5) is None


def test_a_damaged_file_is_cut_again_and_replaced(tmp_path):
    spec = DataSpec()
    want = [p.tolist() for p in every_partition(spec, 3, _classes)]
    (path,) = (tmp_path / "partitions").glob("*.npz")
    path.write_bytes(path.read_bytes()[:50])
    assert cached_partitions(spec, 3) is None
    assert [p.tolist() for p in every_partition(spec, 3, _classes)] == want
    assert [p.tolist() for p in cached_partitions(spec, 3)] == want


def test_a_cache_that_cannot_be_written_costs_only_time(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("FEDPRUNE_CACHE_DIR", str(blocked))
    sizes = partition_sizes(DataSpec(), 3, _classes)
    assert sum(sizes.values()) > 0 and cached_partitions(DataSpec(), 3) is None
