"""Tests for the sparse wire format (fedprune.codec)."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedprune.codec import (
    MASK_PREFIXES,
    CodecError,
    decode_mask,
    decode_model,
    decode_update,
    encode_mask,
    encode_model,
    encode_update,
    payload_bytes,
)

# --------------------------------------------------------------------------------------
# fixtures and strategies

SHAPES: dict[str, tuple[int, ...]] = {
    "conv1.weight": (4, 1, 3, 3),
    "conv1.bias": (4,),
    "fc1.weight": (5, 36),
    "fc1.bias": (5,),
    "fc2.weight": (3, 5),
}
PRUNABLE = ["conv1.weight", "fc1.weight", "fc2.weight"]


def make_params(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Values bounded away from 0 so that "kept" and "pruned" are told apart by value.
    return {
        name: (torch.rand(shape, generator=g) + 0.5)
        * (1 - 2 * (torch.rand(shape, generator=g) < 0.5))
        for name, shape in shapes.items()
    }


def make_masks(
    shapes: dict[str, tuple[int, ...]], prunable: list[str], density: float, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shapes[name], generator=g) < density for name in prunable}


def check_dense(
    decoded: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
) -> None:
    assert list(decoded) == list(params)
    for name, t in params.items():
        d = decoded[name]
        assert d.dtype == torch.float32
        assert d.shape == t.shape
        m = masks.get(name)
        if m is None:
            assert torch.equal(d, t)
        else:
            assert torch.equal(d[m], t[m])
            assert bool((d[~m] == 0).all())
            # exact +0.0, not -0.0
            assert not bool(torch.signbit(d[~m]).any())


@st.composite
def model_and_masks(draw):
    """Random model (1-4 params, random shapes, some prunable) and masks of mixed density."""
    k = draw(st.integers(1, 4))
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(k):
        shape = tuple(draw(st.lists(st.integers(0, 7), min_size=0, max_size=3)))
        shapes[f"layer{i}.weight"] = shape
    names = list(shapes)
    prunable = [n for n in names if draw(st.booleans())]
    seed = draw(st.integers(0, 2**16))
    params = make_params(shapes, seed)
    masks = {}
    for name in prunable:
        kind = draw(st.sampled_from(["zero", "one", "random"]))
        shape = shapes[name]
        if kind == "zero":
            masks[name] = torch.zeros(shape, dtype=torch.bool)
        elif kind == "one":
            masks[name] = torch.ones(shape, dtype=torch.bool)
        else:
            density = draw(st.floats(0.0, 1.0))
            masks[name] = make_masks(shapes, [name], density, seed + 1)[name]
    return shapes, prunable, params, masks


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def read_only(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a deserializer might hand over: read-only buffers (np.frombuffer)."""
    return {k: np.frombuffer(a.tobytes(), dtype=a.dtype) for k, a in arrays.items()}


# --------------------------------------------------------------------------------------
# masks


@FAST
@given(
    shape=st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_mask_round_trip_and_smallest_form(shape, density, seed):
    mask = make_masks({"m": shape}, ["m"], density, seed)["m"]
    n = mask.numel()
    k = int(mask.sum())
    prefix, data = encode_mask(mask)
    sizes = {"mb": math.ceil(n / 8), "mi": 4 * k, "mc": 4 * (n - k)}
    assert data.nbytes == sizes[prefix]
    assert data.nbytes == min(sizes.values())
    if sizes["mb"] == min(sizes.values()):
        assert prefix == "mb"  # ties go to the bitmap
    assert data.nbytes <= math.ceil(n / 8)
    assert data.ndim == 1
    assert data.dtype == (np.uint8 if prefix == "mb" else np.uint32)
    back = decode_mask(prefix, data, shape)
    assert back.dtype == torch.bool
    assert back.shape == mask.shape
    assert torch.equal(back, mask)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 12345])
def test_density_zero_and_one_cost_nothing(n):
    prefix, data = encode_mask(torch.zeros(n, dtype=torch.bool))
    assert (prefix, data.nbytes) == ("mi", 0)
    prefix, data = encode_mask(torch.ones(n, dtype=torch.bool))
    assert (prefix, data.nbytes) == ("mc", 0)


def test_mask_forms_by_density():
    n = 10_000
    mask = torch.zeros(n, dtype=torch.bool)
    mask[::500] = True  # 20 kept: 80 bytes of indices < 1250 bytes of bitmap
    assert encode_mask(mask)[0] == "mi"
    assert encode_mask(~mask)[0] == "mc"
    half = torch.arange(n) % 2 == 0
    prefix, data = encode_mask(half)
    assert prefix == "mb"
    assert data.nbytes == n // 8


def test_bitmap_is_packbits_big_endian():
    mask = torch.tensor([True, False, True, True, False, False, False, False, True, True, True])
    mask = mask.repeat(3)  # 33 positions, dense enough for a bitmap
    prefix, data = encode_mask(mask)
    assert prefix == "mb"
    np.testing.assert_array_equal(data, np.packbits(mask.numpy()))
    assert data[-1] & 0x7F == 0  # padding bits zero


def test_decode_mask_errors():
    with pytest.raises(CodecError, match="padding"):
        decode_mask("mb", np.array([0xFF], dtype=np.uint8), (7,), key="mb/x")
    with pytest.raises(CodecError, match=re.escape("'mb/x'")):
        decode_mask("mb", np.array([0xFF, 0], dtype=np.uint8), (7,), key="mb/x")
    with pytest.raises(CodecError, match="strictly increasing"):
        decode_mask("mi", np.array([3, 1], dtype=np.uint32), (7,))
    with pytest.raises(CodecError, match="strictly increasing"):
        decode_mask("mc", np.array([1, 1], dtype=np.uint32), (7,))
    with pytest.raises(CodecError, match="out of range"):
        decode_mask("mi", np.array([1, 7], dtype=np.uint32), (7,))
    with pytest.raises(CodecError, match="indices for a parameter"):
        decode_mask("mi", np.arange(8, dtype=np.uint32), (7,))
    with pytest.raises(CodecError, match="dtype"):
        decode_mask("mi", np.array([1], dtype=np.int64), (7,))
    with pytest.raises(CodecError, match="1-D"):
        decode_mask("mb", np.zeros((1, 1), dtype=np.uint8), (7,))
    with pytest.raises(CodecError, match="unknown mask form"):
        decode_mask("mz", np.zeros(1, dtype=np.uint8), (7,))
    with pytest.raises(CodecError, match="numpy array"):
        decode_mask("mb", [0], (7,))  # type: ignore[arg-type]


def test_decode_mask_huge_claims_do_not_allocate():
    # A 10**12-position parameter with a 1-byte bitmap is rejected before any allocation.
    with pytest.raises(CodecError, match="bytes"):
        decode_mask("mb", np.zeros(1, dtype=np.uint8), (10**6, 10**6), key="mb/big")


# --------------------------------------------------------------------------------------
# model round trips


@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("include_masks", [True, False])
def test_model_round_trip(density, include_masks):
    params = make_params(SHAPES)
    masks = make_masks(SHAPES, PRUNABLE, density)
    msg = encode_model(params, masks, include_masks=include_masks)
    assert all(a.ndim == 1 for a in msg.values())
    assert {k for k in msg if k.startswith("v/")} == {f"v/{n}" for n in SHAPES}
    n_mask_keys = sum(k.split("/")[0] in MASK_PREFIXES for k in msg)
    assert n_mask_keys == (len(PRUNABLE) if include_masks else 0)
    for name in PRUNABLE:
        assert msg[f"v/{name}"].shape == (int(masks[name].sum()),)
    held = None if include_masks else masks
    dense, got_masks = decode_model(msg, SHAPES, PRUNABLE, held)
    check_dense(dense, params, masks)
    assert list(got_masks) == PRUNABLE
    for name in PRUNABLE:
        assert torch.equal(got_masks[name], masks[name])
    # The message's masks win over the held ones.
    if include_masks:
        other = make_masks(SHAPES, PRUNABLE, 0.5, seed=9)
        _, got2 = decode_model(msg, SHAPES, PRUNABLE, other)
        for name in PRUNABLE:
            assert torch.equal(got2[name], masks[name])


@FAST
@given(data=model_and_masks(), include_masks=st.booleans())
def test_model_round_trip_random(data, include_masks):
    shapes, prunable, params, masks = data
    msg = encode_model(params, masks, include_masks=include_masks)
    for name, m in masks.items():
        if include_masks:
            assert msg[_mask_key(msg, name)].nbytes <= math.ceil(m.numel() / 8)
    dense, got = decode_model(read_only(msg), shapes, prunable, None if include_masks else masks)
    check_dense(dense, params, masks)
    assert set(got) == set(prunable)
    for name in prunable:
        assert torch.equal(got[name], masks[name])


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("with_importance", [True, False])
def test_update_round_trip(density, with_importance):
    params = make_params(SHAPES, seed=3)
    masks = make_masks(SHAPES, PRUNABLE, density, seed=4)
    imp = {n: torch.rand(SHAPES[n]) for n in PRUNABLE} if with_importance else None
    msg = encode_update(params, masks, imp)
    assert not any(k.split("/")[0] in MASK_PREFIXES for k in msg)
    assert sum(k.startswith("g/") for k in msg) == (len(PRUNABLE) if with_importance else 0)
    dense, got_imp = decode_update(msg, SHAPES, masks, expect_importance=with_importance)
    check_dense(dense, params, masks)
    if with_importance:
        assert got_imp is not None and list(got_imp) == PRUNABLE
        for name in PRUNABLE:  # importance travels as bfloat16
            assert torch.equal(got_imp[name], imp[name].to(torch.bfloat16).float())
    else:
        assert got_imp is None


@FAST
@given(data=model_and_masks(), with_importance=st.booleans())
def test_update_round_trip_random(data, with_importance):
    shapes, prunable, params, masks = data
    imp = {n: torch.rand(shapes[n]) for n in prunable} if with_importance else None
    msg = encode_update(params, masks, imp)
    dense, got_imp = decode_update(read_only(msg), shapes, masks, with_importance)
    check_dense(dense, params, masks)
    if with_importance:
        for name in prunable:
            assert torch.equal(got_imp[name], imp[name].to(torch.bfloat16).float())


def test_payload_bytes_counts_sparse_values():
    params = make_params(SHAPES)
    masks = make_masks(SHAPES, PRUNABLE, 0.25)
    msg = encode_update(params, masks)
    kept = sum(int(m.sum()) for m in masks.values())
    whole = sum(math.prod(s) for n, s in SHAPES.items() if n not in masks)
    assert payload_bytes(msg) == 4 * (kept + whole)
    msg2 = encode_model(params, masks, include_masks=True)
    assert payload_bytes(msg2) == sum(a.nbytes for a in msg2.values())
    assert payload_bytes(msg2) > payload_bytes(msg)


def test_no_aliasing():
    params = make_params(SHAPES)
    masks = make_masks(SHAPES, PRUNABLE, 0.5)
    msg = encode_model(params, masks, include_masks=True)
    saved = {k: a.copy() for k, a in msg.items()}
    for t in params.values():
        t.add_(1.0)  # the message must not see later changes to the model
    for k, a in msg.items():
        np.testing.assert_array_equal(a, saved[k])
    # Decoding read-only buffers gives writable tensors, without torch's warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense, got = decode_model(read_only(msg), SHAPES, PRUNABLE, None)
        for t in [*dense.values(), *got.values()]:
            t.zero_() if t.dtype != torch.bool else t.logical_not_()


def test_gpu_tensors_if_available():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    params = {k: v.cuda() for k, v in make_params(SHAPES).items()}
    masks = {k: v.cuda() for k, v in make_masks(SHAPES, PRUNABLE, 0.4).items()}
    msg = encode_model(params, masks, include_masks=True)
    dense, _ = decode_model(msg, SHAPES, PRUNABLE, None)
    check_dense(
        dense, {k: v.cpu() for k, v in params.items()}, {k: v.cpu() for k, v in masks.items()}
    )


# --------------------------------------------------------------------------------------
# every CodecError case names the key


def _model_msg(include_masks: bool = True, density: float = 0.5) -> dict[str, np.ndarray]:
    params = make_params(SHAPES)
    masks = make_masks(SHAPES, PRUNABLE, density)
    return encode_model(params, masks, include_masks=include_masks)


def _mask_key(msg: dict[str, np.ndarray], name: str) -> str:
    (key,) = [k for k in msg if k.partition("/")[::2] in {(p, name) for p in MASK_PREFIXES}]
    return key


MASKS = make_masks(SHAPES, PRUNABLE, 0.5)


def _bitmap_msg() -> dict[str, np.ndarray]:
    msg = _model_msg()
    assert _mask_key(msg, "fc1.weight") == "mb/fc1.weight"  # 180 positions, ~half kept
    return msg


def _sparse_msg() -> dict[str, np.ndarray]:
    msg = _model_msg(density=0.02)
    assert _mask_key(msg, "fc1.weight") == "mi/fc1.weight"
    return msg


def _mut(fn: Callable[[dict], None], base: Callable[[], dict] = _bitmap_msg):
    def make():
        msg = base()
        fn(msg)
        return msg

    return make


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _pop(key):
    return lambda m: m.pop(key)


def _apply(key, f):
    return lambda m: m.__setitem__(key, f(m[key]))


def _bits_at(i, bits):
    """Set entry i of a bfloat16 (uint16 bits) array to `bits` (0x7FC0 is a NaN)."""

    def f(a):
        a = a.copy()
        a[i] = bits
        return a

    return f


def _nan_at(i):
    def f(a):
        a = a.copy()
        a[i] = np.nan
        return a

    return f


MODEL_CASES = {
    "missing values": (_mut(_pop("v/fc1.bias")), "v/fc1.bias"),
    "missing prunable values": (_mut(_pop("v/fc2.weight")), "v/fc2.weight"),
    "extra values key": (_mut(_set("v/fc9.weight", np.zeros(3, np.float32))), "v/fc9.weight"),
    "unknown prefix": (_mut(_set("x/fc1.weight", np.zeros(3, np.float32))), "x/fc1.weight"),
    "no prefix": (_mut(_set("fc1weight", np.zeros(3, np.float32))), "fc1weight"),
    "importance in model msg": (
        _mut(_set("g/fc1.weight", np.zeros(180, np.float32))),
        "g/fc1.weight",
    ),
    "mask for non-prunable": (_mut(_set("mi/fc1.bias", np.zeros(0, np.uint32))), "mi/fc1.bias"),
    "mask for unknown param": (_mut(_set("mc/nope", np.zeros(0, np.uint32))), "mc/nope"),
    "two mask forms": (
        _mut(_set("mi/fc1.weight", np.zeros(0, np.uint32))),
        "fc1.weight",
    ),
    "one mask missing": (_mut(_pop("mb/fc1.weight")), "fc1.weight"),
    "values wrong dtype": (
        _mut(_apply("v/fc1.bias", lambda a: a.astype(np.float64))),
        "v/fc1.bias",
    ),
    "values big-endian": (_mut(_apply("v/fc1.bias", lambda a: a.astype(">f4"))), "v/fc1.bias"),
    "values 2-D": (_mut(_apply("v/fc1.bias", lambda a: a.reshape(1, -1))), "v/fc1.bias"),
    "values 0-D": (_mut(_set("v/fc1.bias", np.float32(1.0))), "v/fc1.bias"),
    "values not array": (_mut(_set("v/fc1.bias", [1.0] * 5)), "v/fc1.bias"),
    "values too short": (_mut(_apply("v/fc1.weight", lambda a: a[:-1])), "v/fc1.weight"),
    "values too long": (
        _mut(_apply("v/fc1.weight", lambda a: np.append(a, np.float32(1)))),
        "v/fc1.weight",
    ),
    "whole param too short": (_mut(_apply("v/conv1.bias", lambda a: a[:-1])), "v/conv1.bias"),
    "NaN in values": (_mut(_apply("v/fc1.weight", _nan_at(0))), "v/fc1.weight"),
    "inf in whole param": (
        _mut(_apply("v/fc1.bias", lambda a: np.full_like(a, np.inf))),
        "v/fc1.bias",
    ),
    "bitmap wrong dtype": (
        _mut(_apply("mb/fc1.weight", lambda a: a.astype(np.int8))),
        "mb/fc1.weight",
    ),
    "bitmap too short": (_mut(_apply("mb/fc1.weight", lambda a: a[:-1])), "mb/fc1.weight"),
    "bitmap too long": (
        _mut(_apply("mb/fc1.weight", lambda a: np.append(a, np.uint8(0)))),
        "mb/fc1.weight",
    ),
    "bitmap padding bits": (
        # conv1.weight has 36 positions: 4 padding bits in the last byte.
        _mut(lambda m: m.__setitem__("mb/conv1.weight", _flip_pad(m["mb/conv1.weight"]))),
        "mb/conv1.weight",
    ),
    "indices wrong dtype": (
        _mut(_apply("mi/fc1.weight", lambda a: a.astype(np.int64)), _sparse_msg),
        "mi/fc1.weight",
    ),
    "indices not increasing": (
        _mut(_apply("mi/fc1.weight", lambda a: a[::-1].copy()), _sparse_msg),
        "mi/fc1.weight",
    ),
    "indices duplicated": (
        _mut(_apply("mi/fc1.weight", lambda a: np.sort(np.append(a, a[:1]))), _sparse_msg),
        "mi/fc1.weight",
    ),
    "index out of range": (
        _mut(_apply("mi/fc1.weight", lambda a: np.append(a, np.uint32(180))), _sparse_msg),
        "mi/fc1.weight",
    ),
    "index 2**32-1": (
        _mut(_apply("mi/fc1.weight", lambda a: np.append(a, np.uint32(2**32 - 1))), _sparse_msg),
        "mi/fc1.weight",
    ),
    "too many indices": (
        _mut(
            _set("mc/fc2.weight", np.arange(16, dtype=np.uint32)),
            lambda: _pop_mask(_sparse_msg(), "fc2.weight"),
        ),
        "mc/fc2.weight",
    ),
    "complement indices 2-D": (
        _mut(
            _set("mc/fc2.weight", np.zeros((1, 1), np.uint32)),
            lambda: _pop_mask(_sparse_msg(), "fc2.weight"),
        ),
        "mc/fc2.weight",
    ),
}


def _flip_pad(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[-1] |= 1
    return a


def _pop_mask(msg: dict, name: str) -> dict:
    msg.pop(_mask_key(msg, name))
    return msg


def test_model_cases_are_what_they_say():
    assert _mask_key(_bitmap_msg(), "conv1.weight") == "mb/conv1.weight"


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_decode_model_errors(case):
    make, key = MODEL_CASES[case]
    msg = make()
    with pytest.raises(CodecError, match=re.escape(key)):
        decode_model(msg, SHAPES, PRUNABLE, None)


def test_decode_model_needs_some_masks():
    msg = _model_msg(include_masks=False)
    with pytest.raises(CodecError, match=re.escape("conv1.weight")):
        decode_model(msg, SHAPES, PRUNABLE, None)
    # Held masks that do not fit the model.
    bad = dict(MASKS)
    bad["fc1.weight"] = torch.ones(3, dtype=torch.bool)
    with pytest.raises(CodecError, match=re.escape("fc1.weight")):
        decode_model(msg, SHAPES, PRUNABLE, bad)
    bad = {k: v for k, v in MASKS.items() if k != "fc2.weight"}
    with pytest.raises(CodecError, match=re.escape("fc2.weight")):
        decode_model(msg, SHAPES, PRUNABLE, bad)
    # Values that do not fit the held mask.
    other = make_masks(SHAPES, PRUNABLE, 0.1, seed=5)
    with pytest.raises(CodecError, match=re.escape("v/")):
        decode_model(msg, SHAPES, PRUNABLE, other)
    # Nothing prunable: no masks needed.
    params = make_params(SHAPES)
    dense, got = decode_model(encode_model(params, {}, include_masks=True), SHAPES, [], None)
    assert got == {}
    check_dense(dense, params, {})


def _update_msg(importance: bool = True) -> dict[str, np.ndarray]:
    params = make_params(SHAPES, seed=1)
    imp = {n: torch.rand(SHAPES[n]) for n in PRUNABLE} if importance else None
    return encode_update(params, MASKS, imp)


def _umut(fn, importance=True):
    def make():
        msg = _update_msg(importance)
        fn(msg)
        return msg

    return make


UPDATE_CASES = {
    "missing values": (_umut(_pop("v/conv1.weight")), True, "v/conv1.weight"),
    "extra values": (_umut(_set("v/zzz", np.zeros(1, np.float32))), True, "v/zzz"),
    "mask in update": (_umut(_set("mb/fc1.weight", np.zeros(23, np.uint8))), True, "mb/fc1.weight"),
    "importance missing": (_umut(_pop("g/fc2.weight")), True, "g/fc2.weight"),
    "importance all missing": (_umut(lambda m: None, importance=False), True, "g/conv1.weight"),
    "importance unexpected": (_umut(lambda m: None), False, "g/conv1.weight"),
    "importance non-prunable": (
        _umut(_set("g/fc1.bias", np.zeros(5, np.float32))),
        True,
        "g/fc1.bias",
    ),
    "importance too short": (_umut(_apply("g/fc1.weight", lambda a: a[1:])), True, "g/fc1.weight"),
    "importance sparse length": (
        _umut(lambda m: m.__setitem__("g/fc1.weight", m["v/fc1.weight"].copy())),
        True,
        "g/fc1.weight",
    ),
    "importance wrong dtype": (
        _umut(_apply("g/fc1.weight", lambda a: a.astype(np.float16))),
        True,
        "g/fc1.weight",
    ),
    "importance negative": (_umut(_apply("g/fc1.weight", lambda a: -a)), True, "g/fc1.weight"),
    "importance NaN": (_umut(_apply("g/fc1.weight", _bits_at(3, 0x7FC0))), True, "g/fc1.weight"),
    "importance inf": (
        _umut(_apply("g/fc1.weight", lambda a: np.full_like(a, 0x7F80))),  # bfloat16 inf
        True,
        "g/fc1.weight",
    ),
    "values NaN": (_umut(_apply("v/fc2.weight", _nan_at(0))), True, "v/fc2.weight"),
    "values -inf": (
        _umut(_apply("v/conv1.bias", lambda a: np.full_like(a, -np.inf))),
        True,
        "v/conv1.bias",
    ),
    "values too long": (
        _umut(_apply("v/fc2.weight", lambda a: np.append(a, np.float32(0)))),
        True,
        "v/fc2.weight",
    ),
    "values wrong dtype": (
        _umut(_apply("v/fc2.weight", lambda a: a.astype(np.float64))),
        True,
        "v/fc2.weight",
    ),
    "values 2-D": (_umut(_apply("v/fc1.bias", lambda a: a.reshape(-1, 1))), True, "v/fc1.bias"),
}


@pytest.mark.parametrize("case", list(UPDATE_CASES))
def test_decode_update_errors(case):
    make, expect, key = UPDATE_CASES[case]
    with pytest.raises(CodecError, match=re.escape(key)):
        decode_update(make(), SHAPES, MASKS, expect)


def test_encode_rejects_inconsistent_inputs():
    params = make_params(SHAPES)
    with pytest.raises(ValueError, match="fc9"):
        encode_model(params, {"fc9.weight": torch.ones(3, dtype=torch.bool)}, include_masks=True)
    with pytest.raises(ValueError, match=r"fc1\.weight"):
        encode_update(params, {"fc1.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(TypeError):
        encode_mask(torch.ones(3))
    with pytest.raises(ValueError, match="importance"):
        encode_update(params, MASKS, {"fc1.weight": torch.ones(5, 36)})


# --------------------------------------------------------------------------------------
# fuzz: mutations of a valid message decode consistently or raise CodecError


def _fuzz_base(draw):
    """A valid model or update message with masks of mixed forms."""
    density = draw(st.sampled_from([0.0, 0.01, 0.5, 0.99, 1.0]))
    seed = draw(st.integers(0, 1000))
    params = make_params(SHAPES, seed)
    masks = make_masks(SHAPES, PRUNABLE, density, seed)
    if draw(st.booleans()):  # mix of forms within one message
        masks["fc2.weight"] = torch.zeros(SHAPES["fc2.weight"], dtype=torch.bool)
        masks["conv1.weight"] = make_masks(SHAPES, ["conv1.weight"], 0.5, seed)["conv1.weight"]
    kind = draw(st.sampled_from(["model", "update"]))
    if kind == "model":
        msg = encode_model(params, masks, include_masks=draw(st.booleans()))
        return kind, msg, masks, False
    has_imp = draw(st.booleans())
    expect = has_imp if draw(st.integers(0, 4)) else not has_imp
    imp = {n: torch.rand(SHAPES[n]) for n in PRUNABLE} if has_imp else None
    return kind, encode_update(params, masks, imp), masks, expect


_DTYPES = [
    np.float64,
    np.float16,
    np.int32,
    np.uint32,
    np.uint8,
    np.int8,
    np.uint64,
    np.bool_,
    ">f4",
    ">u4",
]


@st.composite
def mutated(draw):
    kind, msg, masks, expect = _fuzz_base(draw)
    msg = dict(msg)
    keys = sorted(msg)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(
            st.sampled_from(
                [
                    "truncate",
                    "extend",
                    "dtype",
                    "reshape",
                    "drop",
                    "add",
                    "pad",
                    "shuffle",
                    "nan",
                    "index",
                    "nonarray",
                    "neg",
                    "swapform",
                ]
            )
        )
        key = draw(st.sampled_from(keys)) if keys else None
        if key is None or key not in msg:
            op = "add"
        elif not isinstance(msg[key], np.ndarray) and op not in ("drop", "add", "swapform"):
            op = "drop"
        if op == "truncate":
            a = msg[key]
            msg[key] = a[: draw(st.integers(0, max(0, a.size - 1)))]
        elif op == "extend":
            a = msg[key].reshape(-1)
            extra = np.frombuffer(
                draw(st.binary(min_size=a.itemsize, max_size=4 * a.itemsize)), np.uint8
            )
            extra = extra[: extra.size // a.itemsize * a.itemsize].view(a.dtype)
            msg[key] = np.concatenate([a, extra])
        elif op == "dtype":
            with np.errstate(all="ignore"):
                msg[key] = msg[key].astype(draw(st.sampled_from(_DTYPES)))
        elif op == "reshape":
            msg[key] = msg[key].reshape(1, -1) if draw(st.booleans()) else msg[key].reshape(-1, 1)
        elif op == "drop":
            msg.pop(key)
        elif op == "add":
            name = draw(st.sampled_from([*SHAPES, "nope", ""]))
            prefix = draw(st.sampled_from(["v", "g", "mb", "mi", "mc", "zz", ""]))
            size = draw(st.integers(0, 200))
            dt = draw(st.sampled_from([np.float32, np.uint8, np.uint32]))
            msg[f"{prefix}/{name}"] = np.sort(
                np.random.default_rng(size).integers(0, 250, size)
            ).astype(dt)
        elif op == "pad":
            a = msg[key].copy()
            if a.size and a.dtype == np.uint8:
                a.reshape(-1)[-1] |= 1 << draw(st.integers(0, 7))
            msg[key] = a
        elif op == "shuffle":
            a = msg[key].copy()
            np.random.default_rng(draw(st.integers(0, 100))).shuffle(a)
            msg[key] = a
        elif op == "nan":
            a = msg[key].copy()
            if a.size and a.dtype == np.float32:
                a.reshape(-1)[draw(st.integers(0, a.size - 1))] = draw(
                    st.sampled_from([np.nan, np.inf, -np.inf])
                )
            msg[key] = a
        elif op == "index":
            a = msg[key]
            if a.dtype == np.uint32:
                v = draw(st.sampled_from([0, 35, 36, 179, 180, 2**31, 2**32 - 1]))
                msg[key] = np.append(a, np.uint32(v))
        elif op == "nonarray":
            msg[key] = draw(st.sampled_from([None, 1.5, [1, 2], "x", torch.zeros(3)]))
        elif op == "neg":
            a = msg[key]
            if a.dtype == np.float32:
                msg[key] = -a
        elif op == "swapform":
            prefix, name = key.split("/", 1)
            if prefix in MASK_PREFIXES:
                new = draw(st.sampled_from([p for p in MASK_PREFIXES if p != prefix]))
                msg[f"{new}/{name}"] = msg.pop(key)
        keys = sorted(msg)
    if draw(st.booleans()):
        msg = read_only({k: v for k, v in msg.items() if isinstance(v, np.ndarray)}) | {
            k: v for k, v in msg.items() if not isinstance(v, np.ndarray)
        }
    return kind, msg, masks, expect


def _consistent(dense, got_masks, shapes):
    assert list(dense) == list(shapes)
    for name, shape in shapes.items():
        t = dense[name]
        assert t.dtype == torch.float32 and tuple(t.shape) == shape
        assert bool(torch.isfinite(t).all())
        if name in got_masks:
            m = got_masks[name]
            assert m.dtype == torch.bool and tuple(m.shape) == shape
            assert bool((t[~m] == 0).all())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated())
def test_fuzz_mutations(case):
    kind, msg, masks, expect = case
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            if kind == "model":
                held = (
                    masks
                    if msg
                    and not any(
                        isinstance(k, str) and k.split("/")[0] in MASK_PREFIXES for k in msg
                    )
                    else None
                )
                dense, got = decode_model(msg, SHAPES, PRUNABLE, held)
                _consistent(dense, got, SHAPES)
                assert set(got) == set(PRUNABLE)
            else:
                dense, imp = decode_update(msg, SHAPES, masks, expect)
                _consistent(dense, masks, SHAPES)
                assert (imp is not None) == expect
                if imp is not None:
                    assert set(imp) == set(PRUNABLE)
                    for name, g in imp.items():
                        assert tuple(g.shape) == SHAPES[name]
                        assert bool(torch.isfinite(g).all()) and bool((g >= 0).all())
        except CodecError as exc:
            assert str(exc)
