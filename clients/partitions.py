"""A client's share of the data: flwr-datasets' partitioners over `fedprune`'s client pool.

`fedprune.data` splits each data set into test, server and client pool without any Flower
package, and names the flwr-datasets partitioner that `partitioner` stands for
(`partitioner_recipe`); this module hands it the classes, and turns the rows it picks for
a partition back into examples. The server builds the same partitioner from the same
recipe to know each partition's size (`strategies.expected_examples`). The partitioner is
cached per process, because the simulation engine calls the ClientApp many times in the
same worker.
"""

from __future__ import annotations

import functools

import flwr_datasets.partitioner
import numpy as np
from flwr_datasets.partitioner import Partitioner

from fedprune.data import (
    DataSpec,
    Examples,
    build_partitioner,
    client_examples,
    partitioner_recipe,
)


def make_partitioner(spec: DataSpec, num_partitions: int, num_writers: int = 0) -> Partitioner:
    """The flwr-datasets partitioner of `spec.partitioner` for `num_partitions` clients,
    without data (see `fedprune.data.partitioner_recipe`)."""
    name, kwargs = partitioner_recipe(spec, num_partitions, num_writers)
    return getattr(flwr_datasets.partitioner, name)(**kwargs)


@functools.lru_cache(maxsize=4)
def _partitioner(spec: DataSpec, num_partitions: int) -> Partitioner:
    return build_partitioner(spec, num_partitions, flwr_datasets.partitioner)


def client_partition(spec: DataSpec, partition_id: int, num_partitions: int) -> Examples:
    """The examples of one client, from its partition id among `num_partitions`."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    part = _partitioner(spec, num_partitions).load_partition(partition_id)
    return client_examples(spec, np.asarray(part["index"], dtype=np.int64))
