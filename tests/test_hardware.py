"""Machines are told apart by more than their model name (fedprune.hardware)."""

from fedprune import hardware, profile_cache

ZEN3 = {"model name": "AMD EPYC", "cpu family": "25", "model": "1", "stepping": "1",
        "flags": "fpu sse4_2 avx avx2 fma"}  # fmt: skip
ZEN4 = {"model name": "AMD EPYC", "cpu family": "25", "model": "17", "stepping": "1",
        "flags": "fpu sse4_2 avx avx2 fma avx512f avx512bw"}  # fmt: skip


def _as(monkeypatch, info):
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: dict(info))


def test_two_cores_with_one_model_name_are_two_machines(monkeypatch):
    _as(monkeypatch, ZEN3)
    zen3 = (hardware.identity(), hardware.cpu(), profile_cache.profile_key({}, {})["cpu"])
    _as(monkeypatch, ZEN4)
    zen4 = (hardware.identity(), hardware.cpu(), profile_cache.profile_key({}, {})["cpu"])
    assert all(a != b for a, b in zip(zen3, zen4, strict=True))
    assert zen3[1] == "AMD EPYC (family 25, model 1), AVX2"
    assert zen4[1] == "AMD EPYC (family 25, model 17), AVX-512"


def test_describe_names_the_cores_and_survives_missing_fields(monkeypatch):
    _as(monkeypatch, {})
    assert hardware.simd() == ""
    assert hardware.describe().endswith(" CPUs")
    assert hardware.identity()  # never empty, even without /proc/cpuinfo


def test_this_machine_reads():
    hardware._cpuinfo.cache_clear()
    assert hardware.cpu_model()
    assert "CPUs" in hardware.describe()
