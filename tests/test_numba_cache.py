"""numba's cache of fedprune's compiled functions follows the code, not the path it runs
from (`fedprune.numba_cache`).

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
from fedprune import kernels, maskcode, rans
src, idx, out = np.arange(8, dtype=np.float32), np.array([3, 1], np.int32), np.zeros(2, np.float32)
kernels.gather(src, idx, out)
assert out.tolist() == [3.0, 1.0]
mask = np.arange(5000) % 7 == 0  # the mask coder's rANS loop
assert (maskcode.decode_mask_bytes(maskcode.encode_mask_bytes(mask), mask.size) == mask).all()
stats = [f.stats for f in (kernels.gather, rans._encode, rans._decode)]
print(json.dumps({"file": kernels.__file__,
                  "hits": [sum(s.cache_hits.values()) for s in stats],
                  "misses": [sum(s.cache_misses.values()) for s in stats]}))
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
    # Each function compiled in the first copy (the cache was empty), loaded in the second.
    assert all(m >= 1 for m in first["misses"]) and first["hits"] == [0, 0, 0]
    assert all(h >= 1 for h in second["hits"]) and second["misses"] == [0, 0, 0]
    assert list((cache / "numba").glob("kernels-*/*.nbi"))
    assert list((cache / "numba").glob("rans-*/*.nbi"))
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
    again = _run_from(new, cache)
    assert again["misses"][0] >= 1  # the changed module compiled afresh, not the old code's
    assert again["misses"][1:] == [0, 0]  # the unchanged ones loaded what the old copy made
    assert len(list((cache / "numba").glob("kernels-*"))) == 2
