"""A split's partitions, cut once per machine and kept on disk.

Cutting a partition needs flwr-datasets' partitioners, and importing that package takes
about 3 s of a core (it brings Hugging Face `datasets`, pandas, and for its plotting
helpers matplotlib, seaborn and scipy). In a simulation every process pays it: each of
Ray's node workers, at the nodes' first message (which the server waits for before it can
start), and the server, to bound each node's claimed number of examples. Yet the result is
a few thousand row numbers that depend only on the pool the partitioner sees (its rows,
labels and writers), the partitioner's recipe (`fedprune.data.partitioner_recipe`) and the
package's version.

So the server, which cuts every partition of a split anyway, keeps them on disk, keyed by
exactly those, in the per-machine cache folder of the device profiles
(`fedprune.profile_cache.cache_dir`). A node on the same machine then reads its rows from
there instead of importing the package; a node elsewhere, or before any server has cut
that split (the first run of a configuration), cuts its own partition as before. Either
way the rows are the partitioner's: the file only ever holds its output. A file that
cannot be read is ignored (the caller cuts the split again and the server overwrites it).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedprune.data import DataSpec, build_partitioner, client_pool, partitioner_recipe
from fedprune.profile_cache import cache_dir

FORMAT = 1


def _package_version() -> str:
    # The installed version from its metadata: no import of the package itself.
    try:
        return importlib.metadata.version("flwr-datasets")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def partitions_key(spec: DataSpec, num_partitions: int) -> str:
    """A digest of everything the partitions of `spec` into `num_partitions` depend on:
    the pool's table as the partitioner sees it, the partitioner's recipe and version."""
    table, num_writers = client_pool(spec)
    name, kwargs = partitioner_recipe(spec, num_partitions, num_writers)
    digest = hashlib.sha256()
    recipe = {"format": FORMAT, "partitioner": name, "kwargs": kwargs,
              "flwr-datasets": _package_version(), "columns": sorted(table)}  # fmt: skip
    digest.update(json.dumps(recipe, sort_keys=True, default=str).encode())
    for column in sorted(table):
        values = np.ascontiguousarray(table[column])
        digest.update(f"{column}:{values.dtype.str}:{values.shape}".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()[:32]


def partitions_path(spec: DataSpec, num_partitions: int) -> Path:
    """The file that holds the partitions of `spec` into `num_partitions` on this machine."""
    return cache_dir() / "partitions" / f"{partitions_key(spec, num_partitions)}.npz"


def cached_partitions(spec: DataSpec, num_partitions: int) -> list[np.ndarray] | None:
    """The rows of each of the `num_partitions` partitions of `spec`, if a server on this
    machine has cut that split before; else None."""
    path = partitions_path(spec, num_partitions)
    try:
        with np.load(path, allow_pickle=False) as data:
            rows, sizes = data["rows"], data["sizes"]
    # Absent, or not a whole file we wrote: cut again.
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if len(sizes) != num_partitions or int(sizes.sum()) != len(rows) or (sizes < 0).any():
        return None
    return np.split(rows.astype(np.int64, copy=False), np.cumsum(sizes)[:-1])


def store_partitions(spec: DataSpec, parts: list[np.ndarray]) -> None:
    """Keep `parts` (the rows of every partition of `spec`, as its partitioner cut them)
    for the nodes of this machine. Written atomically; a cache that cannot be written
    costs only the time (nothing reads a partial file)."""
    path = partitions_path(spec, len(parts))
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    rows = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if parts else sizes
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, rows=rows, sizes=sizes)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def every_partition(
    spec: DataSpec, num_partitions: int, classes: Callable[[], Any]
) -> list[np.ndarray]:
    """The rows of every partition of `spec` into `num_partitions` (the server's view):
    from the cache, else cut with the partitioner (`classes()` returns the module
    `flwr_datasets.partitioner`, imported only then) and kept for this machine's nodes."""
    parts = cached_partitions(spec, num_partitions)
    if parts is None:
        partitioner = build_partitioner(spec, num_partitions, classes())
        parts = [
            np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
            for i in range(num_partitions)
        ]
        store_partitions(spec, parts)
    return parts


def partition_sizes(
    spec: DataSpec, num_partitions: int, classes: Callable[[], Any]
) -> dict[int, int]:
    """Partition id -> examples of that partition, for every one of `num_partitions` (the
    sizes the nodes' data has when they hold the configured split); see `every_partition`."""
    return {i: len(rows) for i, rows in enumerate(every_partition(spec, num_partitions, classes))}
