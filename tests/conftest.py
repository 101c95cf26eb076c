"""Test-wide settings: device profiles are cached in a folder of this test session, so
one test's (or an earlier run's) measurements never stand in for another's."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _profile_cache(tmp_path_factory):
    saved = os.environ.get("FEDPRUNE_CACHE_DIR")
    os.environ["FEDPRUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("fedprune-cache"))
    yield
    if saved is None:
        os.environ.pop("FEDPRUNE_CACHE_DIR", None)
    else:
        os.environ["FEDPRUNE_CACHE_DIR"] = saved
