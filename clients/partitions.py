"""A client's share of the data: flwr-datasets' partitioners over `fedprune`'s client pool.

`fedprune.data` splits each data set into test, server and client pool without any Flower
package; this module builds the flwr-datasets partitioner that `partitioner` names, gives
it the pool's table (row numbers, labels, writers: never the images), and turns the rows
it picks for a partition back into examples. The partitioner is cached per process,
because the simulation engine calls the ClientApp many times in the same worker.
"""

from __future__ import annotations

import functools

import numpy as np

from fedprune.data import PARTITIONERS, DataSpec, Examples, client_examples, client_pool


def make_partitioner(spec: DataSpec, num_partitions: int, num_writers: int = 0):
    """The flwr-datasets partitioner of `spec.partitioner` for `num_partitions` clients.

    flwr-datasets is imported here, not at module import: it brings pandas, datasets and
    plotting libraries (2 s in a fresh process), which a node reading its own data folder
    never needs, and a deployed node starts a fresh process for every message.

    It partitions a table with columns `label` (and `writer_id` for "writers", with
    `num_writers` distinct writers).
    """
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        GroupedNaturalIdPartitioner,
        IidPartitioner,
        ShardPartitioner,
    )

    if spec.partitioner == "writers":
        if num_writers < num_partitions:
            raise ValueError(
                f"partitioner 'writers' needs a data set with at least {num_partitions} "
                f"client writers; {spec.dataset} has {num_writers}"
            )
        # Groups of n // P writers; "allow-bigger" spreads the remainder, one writer more
        # to some groups. That makes exactly P groups unless P is large next to n.
        group_size = num_writers // num_partitions
        if num_writers // group_size != num_partitions:
            raise ValueError(
                f"{num_writers} writers cannot be grouped into exactly {num_partitions} "
                "clients of whole writers; use fewer clients (or one per writer)"
            )
        return GroupedNaturalIdPartitioner(
            partition_by="writer_id", group_size=group_size, mode="allow-bigger"
        )
    if spec.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if spec.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=spec.dirichlet_alpha,
            min_partition_size=1,
            seed=spec.seed,
        )
    if spec.partitioner == "shards":
        return ShardPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_shards_per_partition=spec.shards_per_client,
            seed=spec.seed,
        )
    raise ValueError(f"unknown partitioner {spec.partitioner!r}; choose one of {PARTITIONERS}")


@functools.lru_cache(maxsize=4)
def _partitioner(spec: DataSpec, num_partitions: int):
    from datasets import Dataset

    table, num_writers = client_pool(spec)
    partitioner = make_partitioner(spec, num_partitions, num_writers)
    # Arrow format: the partitioners read whole columns, which then come as arrays rather
    # than row by row (FEMNIST's 700k rows: seconds instead of a minute; same partitions).
    partitioner.dataset = Dataset.from_dict(table).with_format("arrow")
    return partitioner


def client_partition(spec: DataSpec, partition_id: int, num_partitions: int) -> Examples:
    """The examples of one client, from its partition id among `num_partitions`."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    part = _partitioner(spec, num_partitions).load_partition(partition_id)
    return client_examples(spec, np.asarray(part["index"], dtype=np.int64))
