"""A device profile is measured once per machine and model, whoever asks first."""

import threading
import time

from fedprune.profile_cache import cached_profile, profile_key


def test_concurrent_nodes_measure_once_and_share_the_result(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPRUNE_CACHE_DIR", str(tmp_path))
    key = profile_key({"w": (4, 3)}, {"local_steps": 5, "batch_size": 20})
    calls, results = [], []

    def measure():
        calls.append(1)
        time.sleep(0.2)  # others arrive while the first measures
        return {"fixed_s": 0.5}

    threads = [
        threading.Thread(target=lambda: results.append(cached_profile(key, measure)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(cached for _, cached in results) == [False, True, True, True]
    assert all(m == {"fixed_s": 0.5} for m, _ in results)


def test_another_model_or_round_is_measured_again_and_a_broken_file_too(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPRUNE_CACHE_DIR", str(tmp_path))
    first = profile_key({"w": (4, 3)}, {"local_steps": 5, "batch_size": 20})
    assert cached_profile(first, lambda: {"n": 0}) == ({"n": 0}, False)
    assert cached_profile(first, lambda: {"n": 9}) == ({"n": 0}, True)
    for key in (
        profile_key({"w": (4, 4)}, {"local_steps": 5, "batch_size": 20}),
        profile_key({"w": (4, 3)}, {"local_steps": 5, "batch_size": 10}),
    ):
        assert key != first
        assert cached_profile(key, lambda: {"n": 1}) == ({"n": 1}, False)
    for path in tmp_path.glob("profile-*.json"):
        path.write_text("{broken")
    assert cached_profile(first, lambda: {"n": 2}) == ({"n": 2}, False)


def test_the_servers_formats_only_profile_is_its_own_entry_and_is_leaner(tmp_path, monkeypatch):
    import fedprune.profiler as profiler
    from fedprune.models import build_model

    monkeypatch.setenv("FEDPRUNE_CACHE_DIR", str(tmp_path))
    seen = []
    real = profiler.profile_device

    def spy(*args, **kw):
        seen.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(profiler, "profile_device", spy)
    model = build_model("small-cnn", seed=0)
    kw = dict(repeats=1, input_shape=(1, 28, 28))
    node, cached = profiler.cached_measurements(model, 1, 4, 1e6, **kw)
    assert not cached
    server, cached = profiler.cached_measurements(model, 1, 4, 1e6, formats_only=True, **kw)
    assert not cached, "the formats-only profile reused the full one's entry"
    again, cached = profiler.cached_measurements(model, 1, 4, 1e6, formats_only=True, **kw)
    assert cached and again == server
    assert len(seen) == 2
    assert "check_density" not in seen[0] and seen[1]["check_density"] is None
    assert len(server["calibration/densities"]) == 1 < len(node["calibration/densities"])
    assert profiler.sparse_crossovers(server).keys() == profiler.sparse_crossovers(node).keys()


def test_a_change_to_the_timed_code_is_measured_again(tmp_path, monkeypatch):
    """A profile timed with other kernels is never reused: the key holds a digest of the
    source of the modules whose speed it measures."""
    import shutil

    from fedprune import profile_cache

    monkeypatch.setenv("FEDPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "fedprune"
    source.mkdir()
    for name in profile_cache.TIMED_MODULES:
        shutil.copy(profile_cache._SOURCE_DIR / f"{name}.py", source / f"{name}.py")
    monkeypatch.setattr(profile_cache, "_SOURCE_DIR", source)
    shapes, round_shape = {"w": (4, 3)}, {"local_steps": 5, "batch_size": 20}
    before = profile_key(shapes, round_shape)
    assert cached_profile(before, lambda: {"n": 0}) == ({"n": 0}, False)
    assert cached_profile(profile_key(shapes, round_shape), lambda: {"n": 1}) == ({"n": 0}, True)
    with (source / "kernels.py").open("a") as f:
        f.write("\n# a faster kernel\n")
    after = profile_key(shapes, round_shape)
    assert after["code"] != before["code"]
    assert cached_profile(after, lambda: {"n": 2}) == ({"n": 2}, False)
