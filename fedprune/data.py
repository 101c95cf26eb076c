"""Data: each data set split into the server's test split, its own share and the client pool.

Where the images come from (the embedded MNIST digits, the Hugging Face hub, a local copy)
is `fedprune.sources`' job; this module only splits what a source holds, the same way
for every data set, as a fixed function of the `DataSpec` (so the server and every
client agree without talking):

- test: the source's own `test` split where it has one (CIFAR-10, an image folder with a
  `test/` folder, ...). Otherwise `test-fraction` of the examples: of each writer's
  examples where the data has writers (rounded, always leaving a writer at least one
  training example, the way LEAF splits FEMNIST), else of all examples;
- server share, for initial pruning: `server-fraction` of the remaining examples, or,
  where the data has writers, all remaining examples of `server-fraction` of the writers
  (at least one);
- client pool: the rest. flwr-datasets' partitioners (built on the Flower side,
  `clients.partitions`) split it over the clients. They see a light table of row numbers,
  labels and writers (`client_pool`), never the images, and `client_examples` turns the
  rows they pick into examples.

`data_shape` gives the class count and image shape a model must be built for: fixed for
the named data sets, read from the source for `dataset = "local"`.

Examples are float32 pixels in [0, 1] (standardised per channel where the data set says
so: CIFAR-10) and int64 labels. Every function is deterministic in its arguments and
cached per process, because the simulation engine calls the ClientApp many times in the
same worker; decoded pixels are kept as uint8, a quarter of float32.

A device can also hold its own data in a folder (`save_folder`, `load_folder`), written by
`python -m clients.prepare_data`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedprune.sources import KNOWN, LOCAL, DataSourceError, Shape, known_shape, open_source

DATASETS = (*KNOWN, LOCAL)
# "writers": each client holds whole writers (data with a writer_id column: FEMNIST).
PARTITIONERS = ("iid", "dirichlet", "shards", "writers")


@dataclass(frozen=True)
class DataSpec:
    """How the data is split; hashable so the splits can be cached per process.

    dataset: "mnist", "femnist", "cifar10" or "local" (classes and shape from `source`).
    test_fraction: share of the examples held out for the server's test split (of each
        writer's examples where the data has writers), if the source has no test split.
    server_fraction: share of the remaining examples kept by the server (where the data
        has writers: share of the writers, whose examples all go to the server).
    source: where the images are read from: empty for the embedded MNIST digits or the
        Hugging Face hub, else a local path (see `fedprune.sources`).
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
    """Images (N, channels, height, width) float32 and labels (N,) int64. Pixels are in
    [0, 1]; CIFAR-10's are then standardised per channel."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


# ------------------------------------------------------------------ what to build for


def data_shape(spec: DataSpec, data_path: str = "") -> tuple[int, Shape]:
    """(num_classes, input_shape) of the spec's data set: the model's output size and the
    (channels, height, width) of its input images.

    mnist, femnist and cifar10 have fixed ones (no I/O). For `local` they are read from
    the source once per process (its labels and one decoded image), or, on a node given
    its own data folder (`data_path`), from the folder's meta.json (`num-classes`,
    `input-shape`, written by `clients.prepare_data`), so that a device needs no copy of
    the data source. Cheap after the first call: call it wherever a model is built.
    """
    fixed = known_shape(spec.dataset)
    if fixed is not None:
        return fixed
    if data_path:
        meta = _folder_meta(data_path)
        if "num-classes" in meta and "input-shape" in meta:
            return _meta_shape(data_path, meta["num-classes"], meta["input-shape"])
        if not spec.source:
            raise DataSourceError(
                f"dataset 'local' on a node with data-path {data_path!r}: the model's class "
                "count and image shape come from data-source (empty here) or from the "
                f"folder's {META_FILE} keys 'num-classes' and 'input-shape' (missing); "
                "write the folder with python -m clients.prepare_data, or add those keys"
            )
    return _source_shape(spec.dataset, spec.source)


def _meta_shape(path: str, num_classes, input_shape) -> tuple[int, Shape]:
    """A data folder's recorded class count and image shape, checked."""
    ok_classes = isinstance(num_classes, int) and num_classes >= 2
    ok_shape = (
        isinstance(input_shape, list)
        and len(input_shape) == 3
        and all(isinstance(v, int) and v > 0 for v in input_shape)
    )
    if not (ok_classes and ok_shape):
        raise ValueError(
            f"data-path {path!r}: {META_FILE} must give num-classes as an integer >= 2 and "
            f"input-shape as [channels, height, width], not {num_classes!r} and "
            f"{input_shape!r}"
        )
    return num_classes, tuple(input_shape)


@functools.lru_cache(maxsize=8)
def _source_shape(dataset: str, source: str) -> tuple[int, Shape]:
    src = open_source(dataset, source)
    return src.num_classes, src.shape


# ------------------------------------------------------------------------- splitting


def split_rows(
    n: int,
    writers: np.ndarray | None,
    *,
    has_test: bool,
    test_fraction: float,
    server_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test, server, clients) row numbers of the `train` split; disjoint, covering it.

    `writers` (n,) writer numbers, or None. Without a test split of its own, `test` holds
    `test_fraction` of each writer's rows (of all rows, without writers); else it is empty.
    The server takes `server_fraction` of the writers (of the remaining rows, without
    writers). `clients` comes shuffled: flwr-datasets' IidPartitioner cuts contiguous
    runs (and MNIST's digits are sorted by class), and the order of first appearance
    decides how writers are grouped.
    """
    rng = np.random.default_rng(seed)
    rows = rng.permutation(n)
    if writers is None:
        n_test = 0 if has_test else round(n * test_fraction)
        n_server = round((n - n_test) * server_fraction)
        test, server, clients = np.split(rows, [n_test, n_test + n_server])
        return np.sort(test), np.sort(server), clients
    counts = np.bincount(writers)
    if has_test:
        is_test = np.zeros(n, dtype=bool)
    else:
        # Rank of each row within its writer, in the random order `rows`.
        grouped = rows[np.argsort(writers[rows], kind="stable")]
        starts = np.cumsum(counts) - counts
        rank = np.empty(n, dtype=np.int64)
        rank[grouped] = np.arange(n) - np.repeat(starts, counts)
        held = np.minimum(np.floor(counts * test_fraction + 0.5), np.maximum(counts - 1, 0))
        is_test = rank < held[writers]
    present = np.flatnonzero(counts)
    n_server = min(max(1, round(len(present) * server_fraction)), len(present))
    server_writers = np.zeros(len(counts), dtype=bool)
    server_writers[rng.permutation(present)[:n_server]] = True
    at_server = server_writers[writers]
    test = np.flatnonzero(is_test)
    server = np.flatnonzero(~is_test & at_server)
    clients = rows[~is_test[rows] & ~at_server[rows]]
    return test, server, clients


@functools.lru_cache(maxsize=4)
def split_indices(spec: DataSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test, server, clients) rows of the source's `train` split (`split_rows`); test
    is empty where the source has a test split of its own."""
    src = open_source(spec.dataset, spec.source)
    return split_rows(
        len(src.labels["train"]),
        src.writers,
        has_test=src.has_test,
        test_fraction=spec.test_fraction,
        server_fraction=spec.server_fraction,
        seed=spec.seed,
    )


def client_pool(spec: DataSpec) -> tuple[dict[str, np.ndarray], int]:
    """The client pool as a table for a partitioner, and its number of writers (0 if the
    data has none): column `index` (the rows to hand to `client_examples`), `label`, and
    `writer_id` where the data has writers."""
    src = open_source(spec.dataset, spec.source)
    pool = split_indices(spec)[2]
    table = {"index": pool, "label": src.labels["train"][pool]}
    if src.writers is None:
        if spec.partitioner == "writers":
            raise ValueError(
                f"partitioner 'writers' needs data with a writer_id column, and {src.where} "
                "has none; use iid, dirichlet or shards"
            )
        return table, 0
    table["writer_id"] = src.writers[pool]
    return table, len(np.unique(table["writer_id"]))


# ----------------------------------------------------------------- rows to examples


def _examples(spec: DataSpec, pixels: np.ndarray, labels: np.ndarray) -> Examples:
    x = torch.from_numpy(pixels).float().div_(255.0)
    known = KNOWN.get(spec.dataset)
    if known is not None and known.standardise is not None:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in known.standardise)
        x = (x - mean) / std
    # A copy: the cached labels must not change if a caller edits its examples.
    return Examples(x, torch.from_numpy(labels.copy()))


def _decoded(spec: DataSpec, split: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    src = open_source(spec.dataset, spec.source)
    return src.pixels(split, rows), src.labels[split][rows]


@functools.lru_cache(maxsize=2)
def _heldout(spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    src = open_source(spec.dataset, spec.source)
    if src.has_test:
        return _decoded(spec, "test", np.arange(len(src.labels["test"])))
    return _decoded(spec, "train", split_indices(spec)[0])


@functools.lru_cache(maxsize=2)
def _server(spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    return _decoded(spec, "train", split_indices(spec)[1])


# A worker of the simulation engine may serve several clients. Keyed by the rows' bytes,
# as arrays are not hashable.
@functools.lru_cache(maxsize=16)
def _client(spec: DataSpec, rows: bytes) -> tuple[np.ndarray, np.ndarray]:
    return _decoded(spec, "train", np.frombuffer(rows, dtype=np.int64))


def heldout_split(spec: DataSpec) -> Examples:
    """The server's test split: the source's `test` split, else the held-out rows."""
    return _examples(spec, *_heldout(spec))


def server_share(spec: DataSpec) -> Examples:
    """The server's own training data, for initial pruning."""
    return _examples(spec, *_server(spec))


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


def client_examples(spec: DataSpec, indices: np.ndarray) -> Examples:
    """The examples at `indices` of the client pool's `index` column."""
    rows = np.ascontiguousarray(indices, dtype=np.int64).tobytes()
    return _examples(spec, *_client(spec, rows))


# ---------------------------------------------------------------- local data folders
# A device without internet can hold its own data in a folder, given to its SuperNode as
# `--node-config 'data-path="/path/to/folder"'`. The folder holds `data.npz` with `x`, N
# images of the run's shape (any layout with the shape's number of values each: uint8
# pixels 0..255 are divided by 255, floats are taken as they are), and `y`, N integer
# labels; `python -m clients.prepare_data` writes such folders, with a meta.json that
# also records the class count and image shape. It is loaded with allow_pickle=False: a
# data file cannot run code.
DATA_FILE = "data.npz"
META_FILE = "meta.json"


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
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


@functools.lru_cache(maxsize=4)
def _folder_meta(path: str) -> dict:
    """The meta.json beside a data folder's data.npz, or {} if there is none."""
    folder = Path(path).expanduser()
    file = (folder if folder.is_dir() else folder.parent) / META_FILE
    if not file.is_file():
        return {}
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"data-path {path!r}: cannot read {META_FILE}: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"data-path {path!r}: {META_FILE} must hold a JSON object")
    return meta


@functools.lru_cache(maxsize=4)
def load_folder(
    path: str, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)
) -> Examples:
    """Examples from a data folder (or an .npz file) written by `save_folder`, checked
    against the run's `num_classes` and `input_shape` (`data_shape`)."""
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
    # For uint8 this equals the sources' float32 division by 255 (checked for all 256
    # values), so a folder gives bit-identical tensors.
    images = (x / 255.0 if np.issubdtype(x.dtype, np.integer) else x).astype(np.float32)
    return Examples(
        torch.from_numpy(images.reshape(-1, *input_shape)),
        torch.from_numpy(y.astype(np.int64)),
    )
