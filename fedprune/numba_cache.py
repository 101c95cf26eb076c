"""Where numba keeps fedprune's compiled functions: fedprune's cache directory, under a
digest of each module's text, not the `__pycache__` beside the module.

Flower runs an app from its own copy of the project (`apps/<FAB hash>/` under
FLWR_HOME). With numba's default cache beside the file, every new copy (any code change,
and every fresh FLWR_HOME, such as each test's and benchmark's) started with an empty
cache, so every process of a run compiled every function it used again: in the main job
6.4 s of the server's initial pruning went to compiling the kernels and 1.1 s more to the
mask and importance coders (py-spy, 2026-12-03), and each simulation worker paid the same
in its first rounds. Keyed by content, one compile serves every copy of the same code,
and copies of other versions keep their own entries. numba still checks each entry
against the source (a content hash) and the CPU it was compiled for.

`install()` registers the locator; a module that compiles with numba calls it before its
first `@njit(cache=True)`. It applies to the modules of this package only. A user's
`NUMBA_CACHE_DIR` comes first, as numba documents it; where fedprune's cache directory
cannot be written, numba's own locators apply. Old versions' entries stay until the
directory is cleared (a few MB each).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def compiled_cache_dir(source: Path) -> Path:
    """Where numba caches the functions of the module at `source`."""
    from fedprune.profile_cache import cache_dir

    return cache_dir() / "numba" / f"{source.stem}-{_digest(source.resolve())}"


@functools.cache
def _digest(source: Path) -> str:
    """The module's text, hashed once per process (not once per compiled function)."""
    return hashlib.sha256(source.read_bytes()).hexdigest()[:16]


def _in_package(py_file: str) -> bool:
    try:
        return Path(py_file).resolve().parent == _PACKAGE_DIR
    except OSError:
        return False


def install() -> None:
    """Register the locator with numba (once; nothing where numba does not import)."""
    try:
        from numba.core import caching
    except ImportError:  # pragma: no cover - numba is a dependency
        return
    locators = caching.CacheImpl._locator_classes
    if any(getattr(c, "__qualname__", "") == "SharedCacheLocator" for c in locators):
        return

    class SharedCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
        def __init__(self, py_func, py_file) -> None:
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = str(compiled_cache_dir(Path(py_file)))

        def get_cache_path(self) -> str:
            return self._cache_path

        @classmethod
        def from_function(cls, py_func, py_file):
            if not _in_package(py_file):
                return None  # another package's functions: numba's own locators
            return super().from_function(py_func, py_file)  # None where not writable

    locators.insert(1, SharedCacheLocator)  # after the user's NUMBA_CACHE_DIR
