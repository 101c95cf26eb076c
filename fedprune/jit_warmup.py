"""Compile, when a node joins, every numba function its rounds will call.

numba compiles a function at its first call with a given signature and caches the machine
code on disk (`fedprune.numba_cache`: by the module's text, so every copy of the same code
shares it; until commit f3f6aca by the file's path, so each copy of the FAB compiled
again). A node's first rounds compiled whatever they first used: measured on the
edge testbed, the training kernels in round 1, the importance coder (`rans._encode` on
uint16 symbols) in round 10 and the mask-change decoder (`maskcode._merge`) in round 11:
handlers of 18-20 s (9 s of CPU) in rounds 1 and 11 and 7 s in round 10, against about
3 s in the others. Those rounds were not what the cost model predicts, and nothing in
them was training or transfer.

`compile_node_path` runs each of them once on tiny inputs, with the one thread a node
trains with, and checks each round trip, so that the compiling happens once, at the
node's first message (the server's identity query, before initial pruning), and later
messages load the machine code from the cache. In simulation the cache is shared by the
machine's virtual nodes, so this costs a load from disk per process.
"""

from __future__ import annotations

import time

import numpy as np

from fedprune import kernels, maskcode
from fedprune.importance_code import decode_importance, encode_importance

# Large enough that every coder takes its general path (both mask halves non-empty, more
# than one rANS word), small enough to cost nothing once compiled.
_POSITIONS = 4099


def compile_node_path() -> float:
    """Compile (or load from numba's cache) the kernels and coders of a node's rounds;
    return the seconds it took. Raises RuntimeError if a coder's round trip is wrong: the
    node would then corrupt every message, so it must not join."""
    start = time.perf_counter()
    with kernels.threads(1):  # the kernels' serial variants, as `receive` trains
        kernels.load(sparse=True)  # says once, itself, if the kernels do not run here
    rng = np.random.default_rng(0)
    old = rng.random(_POSITIONS) < 0.3
    new = old ^ (rng.random(_POSITIONS) < 0.05)
    _check("mask", maskcode.decode_mask_bytes(maskcode.encode_mask_bytes(old), old.size), old)
    change = maskcode.encode_mask_change(old, new)
    _check("mask change", maskcode.decode_mask_change(old, change), new)
    importance = rng.random(_POSITIONS).astype(np.float32)
    upload = decode_importance(encode_importance(importance, old, min_sent=0), old)
    # Values travel quantised (4 mantissa bits by default: relative error at most 1/32).
    _check("importance", np.isclose(upload.kept_values, importance[old], rtol=2**-5), True)
    return time.perf_counter() - start


def _check(what: str, got, want) -> None:
    if not np.all(got == want):
        raise RuntimeError(f"the compiled {what} coder gives a wrong round trip on this machine")
