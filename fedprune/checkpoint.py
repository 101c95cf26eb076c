"""Checkpoint files: written atomically, refused with a clear message when damaged.

A checkpoint is one file: a header line, then the state saved with `torch.save`:

    FEDPRUNE-CHECKPOINT <format version> <payload bytes> <payload sha256>\\n<payload>

- Atomic: the file is written under a temporary name in the same folder, flushed to disk,
  then renamed over the old one. A crash mid-write leaves the previous checkpoint whole.
- Checked: a truncated file, a flipped bit or another file type fails the length or
  checksum test with a message that says so, before anything is unpickled.
- Safe to load: the payload is read with `torch.load(weights_only=True)`, so a checkpoint
  file cannot run code; it may hold tensors, numbers, strings, lists, tuples and dicts.
- Off the critical path where asked (`BackgroundWriter`): the state is copied at once
  (a deep copy), so later changes to it do not reach the file, and the serialising,
  checksum, write, flush and rename run in a thread while the caller goes on.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MAGIC = b"FEDPRUNE-CHECKPOINT"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 256


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and why."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically (see the module doc); return the path."""
    return _write_payload(Path(path), _serialise(state))


def _serialise(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _write_payload(path: Path, payload: bytes) -> Path:
    digest = hashlib.sha256(payload).hexdigest()
    header = b"%s %d %d %s\n" % (MAGIC, FORMAT_VERSION, len(payload), digest.encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


class BackgroundWriter:
    """Checkpoints written in a thread, one at a time and in order, so that a round's
    serialising, checksum, write and flush to disk overlap the next round instead of
    delaying it.

    `save` deep-copies the state before it returns (the caller may change it at once).
    For the main job's 33 MB state the copy took 4 ms, serialising 16 ms alone and about
    36 ms within a round (2026-12-04, 2 cores). It then waits for the previous write and
    hands the copy to a new thread. `wait` returns
    when the last write is on disk. A write that failed is not lost: the next `save` or
    `wait` raises CheckpointError with its cause. The thread is not a daemon, so a
    process that ends normally finishes its last write first; a process that is killed
    keeps the previous checkpoint whole (the writes are atomic), one round older at most.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._failure: tuple[Path, BaseException] | None = None

    def save(
        self,
        path: str | os.PathLike,
        state: dict[str, Any],
        then: Callable[[], None] | None = None,
    ) -> None:
        """Write `state` to `path` atomically, in the background; then call `then` (in the
        writer's thread, after the rename), if given."""
        state = copy.deepcopy(state)
        self.wait()
        path = Path(path)
        self._thread = threading.Thread(
            target=self._write, args=(path, state, then), name="fedprune-checkpoint"
        )
        self._thread.start()

    def _write(self, path: Path, state: dict[str, Any], then: Callable[[], None] | None) -> None:
        try:
            _write_payload(path, _serialise(state))
            if then is not None:
                then()
        except BaseException as exc:  # kept for the caller's thread, raised there
            self._failure = (path, exc)

    def wait(self) -> None:
        """Block until the last write is done; CheckpointError if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failure is not None:
            path, exc = self._failure
            self._failure = None
            raise CheckpointError(
                f"writing checkpoint {path} failed: {type(exc).__name__}: {exc}"
            ) from exc


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make `dst` the same checkpoint as `src`, atomically (a hard link where possible)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:  # a file system without hard links
        tmp.write_bytes(src.read_bytes())
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The state saved in `path`; CheckpointError if it is missing, damaged or foreign."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    newline = data.find(b"\n", 0, MAX_HEADER_BYTES)
    fields = data[:newline].split(b" ") if newline > 0 else []
    if len(fields) != 4 or fields[0] != MAGIC:
        raise CheckpointError(f"{path} is not a fedprune checkpoint (no valid header)")
    try:
        version, length = int(fields[1]), int(fields[2])
    except ValueError:
        raise CheckpointError(f"{path}: damaged header {data[:newline]!r}") from None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version}, this fedprune reads format {FORMAT_VERSION}"
        )
    payload = data[newline + 1 :]
    if len(payload) != length:
        raise CheckpointError(
            f"{path} is truncated or padded: {len(payload)} bytes of state, the header "
            f"says {length}; the file is damaged (an interrupted copy?)"
        )
    if hashlib.sha256(payload).hexdigest().encode() != fields[3]:
        raise CheckpointError(f"{path} is corrupt: its checksum does not match its content")
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as exc:  # the checksum matched, so this is not damage in transit
        raise CheckpointError(f"{path}: cannot load its state: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the state is a {type(state).__name__}, not a dict")
    return state


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
