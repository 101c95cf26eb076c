"""Which CPU this is, in words precise enough to tell two machines apart.

`/proc/cpuinfo`'s model name alone is not: virtual machines often report a bare
"AMD EPYC", for a Zen 3 core with AVX2 and for a Zen 4 core with AVX-512 alike, and this
project's measurements differ by 2x between those two (the main job took 90 s on one and
183 s on the other). So a machine is named by its model name, its CPU family, model and
stepping, and the widest vector instructions it has. Benchmarks print `describe()`; the
device-profile cache and the kernels' self-test key on `identity()`, so a profile measured
on one kind of core is never reused on another that shares a model name.
"""

from __future__ import annotations

import contextlib
import os
import platform
from functools import cache
from pathlib import Path

# Vector extensions that change what the kernels and torch's GEMMs can do, widest first.
_SIMD = (
    ("avx512f", "AVX-512"),
    ("avx2", "AVX2"),
    ("avx", "AVX"),
    ("asimd", "NEON"),
    ("sse4_2", "SSE4.2"),
)


@cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo, lower-case keys ({} elsewhere)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                if fields:
                    break
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


def cpu_model() -> str:
    """The model name the CPU reports ("AMD EPYC", "Intel(R) Xeon(R) ...")."""
    info = _cpuinfo()
    for key in ("model name", "cpu model", "hardware"):
        if info.get(key):
            return info[key]
    return platform.processor() or platform.machine()


def simd() -> str:
    """The widest vector instruction set named in the CPU's flags ("AVX-512", "AVX2",
    ...), or "" where the flags are not readable."""
    flags = set((_cpuinfo().get("flags") or _cpuinfo().get("features") or "").split())
    return next((name for flag, name in _SIMD if flag in flags), "")


def identity() -> str:
    """Model name, family/model/stepping and vector ISA, as one string (a cache key)."""
    info = _cpuinfo()
    numbers = "/".join(info.get(k, "?") for k in ("cpu family", "model", "stepping"))
    return f"{cpu_model()} [{numbers}] {simd() or 'no SIMD flags'}"


def cpu() -> str:
    """The processor for a benchmark's header: "AMD EPYC (family 25, model 1), AVX2"."""
    info = _cpuinfo()
    name = cpu_model()
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return f"{name}, {simd()}" if simd() else name


def describe() -> str:
    """`cpu()` and the core count: "AMD EPYC (family 25, model 1), AVX2, 2 CPUs"."""
    return f"{cpu()}, {os.cpu_count()} CPUs"
