"""Test-wide settings: device profiles are cached in a folder of this test session, so
one test's (or an earlier run's) measurements never stand in for another's.

numba's machine code goes to the same folder (`fedprune.numba_cache`), so a session starts
with none. It is compiled once, here, in a child process that sees the session's folder,
before any test: otherwise the first simulation's virtual nodes all compile the same
kernels at once at their first message, on a machine's 2 cores, and a slow machine can
take longer than the 120 s the server waits for its nodes to identify themselves."""

import os
import subprocess
import sys

import pytest

_COMPILE = "from fedprune.jit_warmup import compile_node_path; compile_node_path()"


@pytest.fixture(autouse=True, scope="session")
def _profile_cache(tmp_path_factory):
    saved = os.environ.get("FEDPRUNE_CACHE_DIR")
    os.environ["FEDPRUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("fedprune-cache"))
    subprocess.run([sys.executable, "-c", _COMPILE], check=True, timeout=600)
    yield
    if saved is None:
        os.environ.pop("FEDPRUNE_CACHE_DIR", None)
    else:
        os.environ["FEDPRUNE_CACHE_DIR"] = saved
