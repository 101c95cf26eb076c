"""FEMNIST and CIFAR-10: read from the Hugging Face hub or a local copy, split, partitioned.

Where the data comes from (run-config key `data-source`):
- empty: the hub, `flwrlabs/femnist` or `uoft-cs/cifar10`, through `datasets.load_dataset`
  (what flwr-datasets' `FederatedDataset` calls). The hub is probed first with a short
  timeout, so a machine without internet fails within seconds, with a message on how to
  use a local copy, instead of after `datasets`' retries (about 25 s per call);
- a folder written by `datasets.save_to_disk` (a `DatasetDict` or a single `Dataset`);
- a parquet file, or a folder of them (splits from the file names, as on the hub:
  `train-*.parquet`, `test-*.parquet`; otherwise everything is `train`);
- an image folder, read by datasets' `imagefolder`: `train/<class>/*.png` and optionally
  `test/<class>/*.png`; a `metadata.csv` (`file_name,label,writer_id`) beside the images
  gives FEMNIST its writers.
Columns: the image is `image` (or `img`), the label `label` (or `character`), FEMNIST's
writer `writer_id`. Class names that are all integers ("0".."61") are read as those
integers; other class names keep their (alphabetical) order, which for CIFAR-10 is its
label order.

How it is split (a fixed function of the `DataSpec`, so the server and every client
agree without talking):
- test: the source's own `test` split where it has one (CIFAR-10). FEMNIST has only
  `train`: `test-fraction` of each writer's examples (rounded, always leaving a writer at
  least one training example) are held out, the way LEAF splits it per writer;
- server share: FEMNIST, all remaining examples of `server-fraction` of the writers (at
  least one); CIFAR-10, a `server-fraction` slice of the training examples;
- clients: the rest, partitioned by a flwr-datasets partitioner: `writers`
  (GroupedNaturalIdPartitioner on `writer_id`: each client holds whole writers, n // P or
  one more of them), `iid`, `dirichlet` (by label) or `shards`.

The partitioners (built on the Flower side, `clients.partitions`) see a light table of
row numbers, labels and writers from `client_pool`, as for MNIST, not the image data: a
partitioner assigned a subset of a `datasets.Dataset` (what
`FederatedDataset` would hand it after our re-split) copies the whole subset, images
included, when it asks for the unique writers or labels. The chosen rows are then
decoded once per process and kept as uint8.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedprune.data import INPUT_SHAPE, NUM_CLASSES, DataSpec, Examples

HUB_IDS = {"femnist": "flwrlabs/femnist", "cifar10": "uoft-cs/cifar10"}
WRITER_DATASETS = ("femnist",)
WRITER_COLUMN = "writer_id"
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "character")
# Per-channel mean and standard deviation of CIFAR-10's training images (pixels in [0, 1]).
STANDARDISE = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}
HUB_TIMEOUT_S = 5.0  # seconds the reachability probe waits for the hub


class DataSourceError(RuntimeError):
    """A data set that cannot be read from the configured source; says what to do."""


# --------------------------------------------------------------------------- loading


def _hub_help(dataset: str, hub_id: str, reason: str) -> str:
    return (
        f"cannot load {dataset} from the Hugging Face hub ({hub_id}): {reason}\n"
        "Without internet, use a local copy. On a machine with internet run\n"
        f"    python -c \"import datasets; datasets.load_dataset('{hub_id}')"
        f".save_to_disk('{dataset}-data')\"\n"
        "copy the folder here and set the run-config key data-source to its absolute path:\n"
        f"    flwr run . --run-config \"dataset='{dataset}' "
        f"data-source='/abs/path/{dataset}-data'\"\n"
        "Parquet files or an image folder work too (README, 'Other data sets and models'). "
        "If the data set is already in this machine's Hugging Face cache, set "
        "HF_HUB_OFFLINE=1 to read it from there."
    )


def _load_hub(dataset: str, timeout_s: float):
    import datasets
    import httpx
    from huggingface_hub import HfApi

    hub_id = HUB_IDS[dataset]
    # In offline mode datasets reads only its local cache, at once; a miss is reported
    # below. Otherwise probe: an unreachable hub costs `timeout_s`, not retries.
    if not datasets.config.HF_HUB_OFFLINE:
        try:
            HfApi().dataset_info(hub_id, timeout=timeout_s)
        except Exception as exc:  # no network, DNS, proxy, HTTP status: all mean "cannot"
            reason = f"{type(exc).__name__}: {exc}"
            raise DataSourceError(_hub_help(dataset, hub_id, reason)) from exc
    try:
        return datasets.load_dataset(hub_id)
    except (ConnectionError, TimeoutError, httpx.TransportError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise DataSourceError(_hub_help(dataset, hub_id, reason)) from exc


def _load_local(source: str):
    import datasets

    path = Path(source).expanduser()
    if not path.exists():
        raise DataSourceError(
            f"data-source {source!r} does not exist (relative paths start at {Path.cwd()}); "
            "give the absolute path of a datasets.save_to_disk folder, a parquet file or "
            "folder, or an image folder"
        )
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
            kind = "a datasets.save_to_disk folder"
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file() and path.suffix == ".parquet":
            kind = "a parquet file"
            loaded = datasets.load_dataset("parquet", data_files={"train": str(path)})
        elif path.is_dir() and (any(path.glob("*.parquet")) or any(path.glob("*/*.parquet"))):
            kind = "a folder of parquet files"
            loaded = datasets.load_dataset("parquet", data_dir=str(path))
        elif path.is_dir():
            kind = "an image folder"
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
        else:
            raise DataSourceError(
                f"data-source {source!r} is a file but not a .parquet file; give a "
                "save_to_disk folder, parquet file or folder, or an image folder"
            )
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetGenerationError) as exc:
        raise DataSourceError(f"cannot read data-source {source!r} as {kind}: {exc}") from exc
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def load_source(dataset: str, source: str = "", *, hub_timeout_s: float = HUB_TIMEOUT_S):
    """The data set as a `datasets.DatasetDict`, from the hub (`source` empty) or a local
    path. Raises DataSourceError, within about `hub_timeout_s` seconds when the hub is
    unreachable, with a message on what to do."""
    if dataset not in HUB_IDS:
        raise ValueError(f"dataset {dataset!r} is not read from a source; one of {list(HUB_IDS)}")
    return _load_local(source) if source else _load_hub(dataset, hub_timeout_s)


# ---------------------------------------------------------------- the source, indexed


@dataclass(frozen=True)
class _Source:
    """A loaded data set with the columns found and the labels/writers as arrays."""

    dataset: str
    splits: object  # datasets.DatasetDict
    image_column: str
    label_column: str
    labels: dict[str, np.ndarray]  # split -> (rows,) int64 labels
    writers: np.ndarray | None  # (train rows,) int64 writer number, writer data sets only


def _column(ds, name: str) -> np.ndarray:
    return np.asarray(ds.with_format("numpy", columns=[name])[:][name])


def _pick(columns: list[str], choices: tuple[str, ...], what: str, where: str) -> str:
    for c in choices:
        if c in columns:
            return c
    raise DataSourceError(f"{where} has no {what} column (one of {choices}); it has {columns}")


def _label_ids(feature) -> np.ndarray | None:
    """Class index -> label, when the class names are integers ("0".."61", sorted as text
    by an image folder); None keeps the index."""
    names = getattr(feature, "names", None)
    if names and all(n.isdigit() for n in names):
        return np.array([int(n) for n in names], dtype=np.int64)
    return None


@functools.lru_cache(maxsize=2)
def _source(dataset: str, source: str) -> _Source:
    splits = load_source(dataset, source)
    where = f"{dataset} from {source or HUB_IDS[dataset]}"
    if "train" not in splits:
        raise DataSourceError(f"{where} has no 'train' split; it has {list(splits)}")
    train = splits["train"]
    image_column = _pick(train.column_names, IMAGE_COLUMNS, "image", where)
    label_column = _pick(train.column_names, LABEL_COLUMNS, "label", where)
    labels = {}
    for split in ("train", "test"):
        if split not in splits:
            continue
        y = _column(splits[split], label_column).astype(np.int64)
        ids = _label_ids(splits[split].features[label_column])
        y = ids[y] if ids is not None else y
        if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES[dataset]):
            raise DataSourceError(
                f"{where}: labels of split {split!r} must be in [0, {NUM_CLASSES[dataset]})"
            )
        labels[split] = y
    writers = None
    if dataset in WRITER_DATASETS:
        if WRITER_COLUMN not in train.column_names:
            raise DataSourceError(
                f"{where} has no {WRITER_COLUMN!r} column; {dataset} is split by writer"
            )
        writers = np.unique(_column(train, WRITER_COLUMN), return_inverse=True)[1]
    return _Source(dataset, splits, image_column, label_column, labels, writers)


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
    runs, and the order of first appearance decides how writers are grouped.
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
def _split(spec: DataSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = _source(spec.dataset, spec.source)
    return split_rows(
        len(src.labels["train"]),
        src.writers,
        has_test="test" in src.labels,
        test_fraction=spec.test_fraction,
        server_fraction=spec.server_fraction,
        seed=spec.seed,
    )


def client_pool(spec: DataSpec) -> tuple[dict[str, np.ndarray], int]:
    """`fedprune.data.client_pool` for a hub data set."""
    src = _source(spec.dataset, spec.source)
    pool = _split(spec)[2]
    table = {"index": pool, "label": src.labels["train"][pool]}
    num_writers = 0
    if src.writers is not None:
        table["writer_id"] = src.writers[pool]
        num_writers = len(np.unique(table["writer_id"]))
    elif spec.partitioner == "writers":
        raise ValueError(f"partitioner 'writers' needs a data set with writers, not {spec.dataset}")
    return table, num_writers


# ----------------------------------------------------------------- rows to tensors


def _decode(spec: DataSpec, split: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, C, H, W) and int64 labels of `rows` of `split`."""
    from datasets import Image

    src = _source(spec.dataset, spec.source)
    channels, height, width = INPUT_SHAPE[spec.dataset]
    labels = src.labels[split][rows]
    if len(rows) == 0:
        return np.zeros((0, channels, height, width), dtype=np.uint8), labels
    part = src.splits[split].select(rows).select_columns([src.image_column])
    part = part.cast_column(src.image_column, Image(mode="L" if channels == 1 else "RGB"))
    pixels = part.with_format("numpy")[:][src.image_column]
    if (
        not isinstance(pixels, np.ndarray)
        or pixels.dtype == object
        or pixels.shape[1:3]
        != (
            height,
            width,
        )
    ):
        found = getattr(pixels, "shape", "images of several sizes")
        raise DataSourceError(
            f"{spec.dataset} images must be {height}x{width} pixels; found {found} in "
            f"{spec.source or HUB_IDS[spec.dataset]}"
        )
    pixels = pixels.reshape(len(rows), height, width, channels).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(pixels), labels


def _examples(dataset: str, pixels: np.ndarray, labels: np.ndarray) -> Examples:
    x = torch.from_numpy(pixels).float().div_(255.0)
    if dataset in STANDARDISE:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in STANDARDISE[dataset])
        x = (x - mean) / std
    return Examples(x, torch.from_numpy(labels))


@functools.lru_cache(maxsize=2)
def _heldout(spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    src = _source(spec.dataset, spec.source)
    if "test" in src.labels:
        return _decode(spec, "test", np.arange(len(src.labels["test"])))
    return _decode(spec, "train", _split(spec)[0])


@functools.lru_cache(maxsize=2)
def _server(spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    return _decode(spec, "train", _split(spec)[1])


# A worker of the simulation engine may serve several clients; keeping their rows as
# uint8 costs a quarter of float32 (FEMNIST over 10 clients: about 60 MB each). Keyed by
# the rows' bytes, as arrays are not hashable.
@functools.lru_cache(maxsize=16)
def _client(spec: DataSpec, rows: bytes):
    return _decode(spec, "train", np.frombuffer(rows, dtype=np.int64))


def heldout_split(spec: DataSpec) -> Examples:
    """The server's test split: the source's `test` split, else the held-out rows."""
    return _examples(spec.dataset, *_heldout(spec))


def server_share(spec: DataSpec) -> Examples:
    """The server's own training data, for initial pruning."""
    return _examples(spec.dataset, *_server(spec))


def client_examples(spec: DataSpec, indices: np.ndarray) -> Examples:
    """`fedprune.data.client_examples` for a hub data set: rows of its train split."""
    rows = np.ascontiguousarray(indices, dtype=np.int64).tobytes()
    return _examples(spec.dataset, *_client(spec, rows))
