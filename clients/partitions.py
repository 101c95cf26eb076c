"""A client's share of the data: flwr-datasets' partitioners over `fedprune`'s client pool.

`fedprune.data` splits each data set into test, server and client pool without any Flower
package, and names the flwr-datasets partitioner that `partitioner` stands for
(`partitioner_recipe`); this module hands it the classes, and turns the rows it picks for
a partition back into examples. The server builds the same partitioner from the same
recipe to know each partition's size (`strategies.expected_examples`). The partitioner is
cached per process, because the simulation engine calls the ClientApp many times in the
same worker. Where a server on the same machine has cut the split before, its partitions
are read from disk (`fedprune.partition_cache`) and flwr-datasets is not imported at all.
"""

from __future__ import annotations

import functools

import numpy as np

from fedprune.data import (
    DataSpec,
    Examples,
    build_partitioner,
    client_examples,
    partitioner_recipe,
)
from fedprune.partition_cache import cached_partitions


def _classes():
    """flwr-datasets' partitioner classes, imported only where a partition is made: the
    package brings pandas, datasets and plotting libraries (2 s in a fresh process), which
    a node reading its own data folder never needs, and a deployed node starts a fresh
    process for every message."""
    import flwr_datasets.partitioner

    return flwr_datasets.partitioner


def make_partitioner(spec: DataSpec, num_partitions: int, num_writers: int = 0):
    """The flwr-datasets partitioner of `spec.partitioner` for `num_partitions` clients,
    without data (see `fedprune.data.partitioner_recipe`)."""
    name, kwargs = partitioner_recipe(spec, num_partitions, num_writers)
    return getattr(_classes(), name)(**kwargs)


@functools.lru_cache(maxsize=4)
def _partitioner(spec: DataSpec, num_partitions: int):
    return build_partitioner(spec, num_partitions, _classes())


def partition_rows(spec: DataSpec, partition_id: int, num_partitions: int) -> np.ndarray:
    """The client pool's rows of one client, from its partition id among `num_partitions`."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    cached = cached_partitions(spec, num_partitions)
    if cached is not None:
        return cached[partition_id]
    part = _partitioner(spec, num_partitions).load_partition(partition_id)
    return np.asarray(part["index"], dtype=np.int64)


def client_partition(spec: DataSpec, partition_id: int, num_partitions: int) -> Examples:
    """The examples of one client, from its partition id among `num_partitions`."""
    return client_examples(spec, partition_rows(spec, partition_id, num_partitions))
