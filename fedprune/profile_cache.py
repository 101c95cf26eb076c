"""A device profile measured once per machine and model, kept on disk.

Measuring a profile takes seconds of the device's compute, and every node of a simulation
on one machine would measure the same thing (10 virtual nodes profiling themselves on 2
shared cores cost the default job two minutes in round 1). So a profile is cached on disk,
keyed by what it depends on: the hardware (CPU model, core count, architecture), the
software (torch and numba versions, the profiler's version, and the source of the modules
whose speed it times: a faster kernel makes every older profile wrong), the threads it
ran with, and the model's shape with the round's size (K steps of batch B on inputs of
one shape).
Concurrent callers (virtual nodes starting together) take a file lock: the first measures,
the others wait and read its result.

The cache lives in `$FEDPRUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/fedprune`, else
`~/.cache/fedprune`. A file that does not parse is measured again (and overwritten).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from fedprune import hardware

# The modules whose speed a profile measures (the layers' formats, their kernels, the
# training loop and the profiler itself). A profile timed with other versions of them
# says nothing about these: at commit df931cd a 2.3x faster sparse-convolution weight gradient
# moved conv2's crossover density from 0.25 to 0.37, and nodes that read the old profile
# from the cache would have kept it.
TIMED_MODULES = ("kernels", "sparse", "sparse_conv", "training", "profiler")
_SOURCE_DIR = Path(__file__).resolve().parent


def code_digest() -> str:
    """A digest of the source of `TIMED_MODULES`: part of every profile's key."""
    digest = hashlib.sha256()
    for name in TIMED_MODULES:
        digest.update(name.encode() + b"\0" + (_SOURCE_DIR / f"{name}.py").read_bytes())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """Where profiles are kept (see the module docstring)."""
    if os.environ.get("FEDPRUNE_CACHE_DIR"):
        return Path(os.environ["FEDPRUNE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedprune"


def profile_key(shapes: Mapping[str, tuple[int, ...]], round_shape: Mapping[str, Any]) -> dict:
    """Everything a profile depends on, as plain data: the machine, the software, the
    threads, the model's parameter shapes and the round (steps, batch, input shape...)."""
    try:
        import numba

        numba_version = numba.__version__
    except ImportError:  # pragma: no cover - numba is a dependency
        numba_version = "none"
    return {
        # model name, family/model and vector ISA: a bare "AMD EPYC" can be a Zen 3 with
        # AVX2 or a Zen 4 with AVX-512, whose profiles differ
        "cpu": hardware.identity(),
        "cpus": os.cpu_count(),
        "arch": platform.machine(),
        "torch": torch.__version__,
        "numba": numba_version,
        "code": code_digest(),
        "threads": torch.get_num_threads(),
        "shapes": {name: list(shape) for name, shape in shapes.items()},
        "round": dict(round_shape),
    }


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_profile(key: Mapping[str, Any], measure: Callable[[], dict]) -> tuple[dict, bool]:
    """(measurements, whether they came from the cache): `measure()` once per `key`
    (`profile_key`) on this machine; its result (a JSON-able dict) is kept on disk."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir() / f"profile-{digest}.json"
    with _locked(path.with_suffix(".lock")):
        with contextlib.suppress(OSError, ValueError):
            saved = json.loads(path.read_text())
            if saved.get("key") == json.loads(json.dumps(key)):
                return saved["measurements"], True
        measurements = measure()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "measurements": measurements}))
        tmp.replace(path)
        return measurements, False
