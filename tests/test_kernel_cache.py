"""numba's cache of the compiled kernels follows the code, not the path it runs from.

Flower runs an app from its own copy of the project (`apps/<FAB hash>/` under FLWR_HOME),
a new copy for every code change and every fresh FLWR_HOME. A cache beside the file made
every process of every such run compile every kernel again."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedprune import kernels

PACKAGE = Path(kernels.__file__).resolve().parent

PROBE = """
import json, numpy as np
from fedprune import kernels
src, idx, out = np.arange(8, dtype=np.float32), np.array([3, 1], np.int32), np.zeros(2, np.float32)
kernels.gather(src, idx, out)
assert out.tolist() == [3.0, 1.0]
stats = kernels.gather.stats
print(json.dumps({"file": kernels.__file__, "hits": sum(stats.cache_hits.values()),
                  "misses": sum(stats.cache_misses.values())}))
"""


def _run_from(copy: Path, cache: Path) -> dict:
    env = {**os.environ, "FEDPRUNE_CACHE_DIR": str(cache), "PYTHONPATH": str(copy)}
    env.pop("NUMBA_CACHE_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=copy, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(kernels.numba is None, reason="numba does not import here")
def test_a_second_copy_of_the_same_code_loads_the_kernels_the_first_compiled(tmp_path):
    cache = tmp_path / "cache"
    copies = []
    for name in ("app-a", "app-b"):  # as two FABs of the same code would be installed
        shutil.copytree(
            PACKAGE, tmp_path / name / "fedprune", ignore=shutil.ignore_patterns("__pycache__")
        )
        copies.append(tmp_path / name)
    first, second = (_run_from(copy, cache) for copy in copies)
    assert first["file"].startswith(str(copies[0])) and second["file"].startswith(str(copies[1]))
    assert first["misses"] >= 1 and first["hits"] == 0  # compiled: the cache was empty
    assert second["hits"] >= 1 and second["misses"] == 0  # loaded what the first compiled
    assert list((cache / "numba").glob("kernels-*/*.nbi"))
    assert not list((copies[0] / "fedprune").rglob("*.nbi"))  # nothing beside the copy


@pytest.mark.skipif(kernels.numba is None, reason="numba does not import here")
def test_changed_kernel_code_gets_a_cache_of_its_own(tmp_path):
    cache = tmp_path / "cache"
    old, new = tmp_path / "old", tmp_path / "new"
    for copy in (old, new):
        shutil.copytree(PACKAGE, copy / "fedprune", ignore=shutil.ignore_patterns("__pycache__"))
    source = new / "fedprune" / "kernels.py"
    source.write_text(source.read_text() + "\n# a change\n")
    _run_from(old, cache)
    assert _run_from(new, cache)["misses"] >= 1  # compiled afresh, not the old code's
    assert len(list((cache / "numba").glob("kernels-*"))) == 2
