import numpy as np
import pytest
import torch

from clients.partitions import _partitioner, client_partition
from fedprune.data import (
    DataSpec,
    _split_indices,
    heldout_split,
    server_share,
)


def test_splits_are_disjoint_and_cover_the_data():
    spec = DataSpec(seed=3)
    test, server, clients = _split_indices(spec)
    assert len(test) == 1000 and len(server) == 400 and len(clients) == 3600
    union = np.concatenate([test, server, clients])
    assert len(np.unique(union)) == 5000
    assert len(heldout_split(spec)) == 1000 and len(server_share(spec)) == 400


def test_images_are_real_digits_in_unit_range():
    data = heldout_split(DataSpec())
    assert data.x.shape[1:] == (1, 28, 28) and data.x.dtype == torch.float32
    assert float(data.x.min()) >= 0.0 and float(data.x.max()) <= 1.0
    assert set(data.y.unique().tolist()) == set(range(10))


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shards"])
def test_client_partitions_are_disjoint_and_drawn_from_the_client_pool(partitioner):
    spec = DataSpec(partitioner=partitioner, dirichlet_alpha=0.3)
    test, server, pool = _split_indices(spec)
    partitioner_ = _partitioner(spec, 5)
    parts = [np.asarray(partitioner_.load_partition(i)["index"]) for i in range(5)]
    everything = np.concatenate(parts)
    assert len(everything) == len(np.unique(everything)) == len(pool)
    assert set(everything) == set(pool)
    assert not set(everything) & (set(test) | set(server))
    sizes = [len(client_partition(spec, i, 5)) for i in range(5)]
    assert sizes == [len(p) for p in parts]


def test_iid_partitions_hold_every_class_and_non_iid_ones_do_not():
    iid = client_partition(DataSpec(partitioner="iid"), 0, 10)
    assert len(iid.y.unique()) == 10
    shards = client_partition(DataSpec(partitioner="shards", shards_per_client=2), 0, 10)
    assert len(shards.y.unique()) <= 3


def test_partition_id_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="partition-id 10"):
        client_partition(DataSpec(), 10, 10)
