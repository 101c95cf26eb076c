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
    MASK_CHANGE_PREFIX,
    MASK_PREFIX,
    MASK_PREFIXES,
    CodecError,
    ImportanceCode,
    ImportanceUpload,
    decode_mask,
    decode_mask_change,
    decode_model,
    decode_update,
    encode_mask,
    encode_mask_change,
    encode_model,
    encode_update,
    payload_bytes,
)
from fedprune.maskcode import mask_bound_bits

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


def within_goal(nbytes: int, bound_bits: float) -> bool:
    """Issue 13's goal for one layer: at most 1.03 x the entropy bound plus 64 bytes."""
    return nbytes <= 1.03 * bound_bits / 8 + 64


@FAST
@given(
    shape=st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_mask_round_trip_near_bound(shape, density, seed):
    mask = make_masks({"m": shape}, ["m"], density, seed)["m"]
    prefix, data = encode_mask(mask)
    assert prefix == MASK_PREFIX
    assert data.dtype == np.uint8 and data.ndim == 1
    assert within_goal(data.nbytes, mask_bound_bits(mask.numel(), int(mask.sum())))
    back = decode_mask(prefix, data, shape)
    assert back.dtype == torch.bool
    assert back.shape == mask.shape
    assert torch.equal(back, mask)
    # read-only buffers (what a deserializer hands over) decode the same
    assert torch.equal(decode_mask(prefix, np.frombuffer(data.tobytes(), np.uint8), shape), mask)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 12345])
def test_density_zero_and_one_cost_almost_nothing(n):
    for mask in (torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)):
        prefix, data = encode_mask(mask)
        assert prefix == MASK_PREFIX and data.nbytes <= 4
        assert torch.equal(decode_mask(prefix, data, (n,)), mask)


@FAST
@given(
    n=st.integers(0, 3000),
    d_old=st.floats(0.0, 1.0),
    flip=st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 1000),
)
def test_mask_change_round_trip_near_bound(n, d_old, flip, seed):
    g = torch.Generator().manual_seed(seed)
    old = torch.rand(n, generator=g) < d_old
    new = old ^ (torch.rand(n, generator=g) < flip)
    prefix, data = encode_mask_change(old, new)
    assert prefix == MASK_CHANGE_PREFIX and data.dtype == np.uint8 and data.ndim == 1
    k = int(old.sum())
    removed, added = int((old & ~new).sum()), int((new & ~old).sum())
    bound = mask_bound_bits(k, removed) + mask_bound_bits(n - k, added)
    assert within_goal(data.nbytes, bound)
    assert torch.equal(decode_mask_change(old, data), new)


def test_decode_mask_errors():
    mask = torch.rand(500, generator=torch.Generator().manual_seed(0)) < 0.3
    _, good = encode_mask(mask)
    cases = {
        "format byte": np.concatenate([[np.uint8(9)], good[1:]]),
        "truncated": good[:-1],
        "truncated word": good[:-4],
        "extra word": np.concatenate([good, np.zeros(4, np.uint8)]),
        "extra byte": np.concatenate([good, np.zeros(1, np.uint8)]),
        "empty": good[:0],
        "kept count above n": np.frombuffer(bytes([1, 0xF5, 0x03]), np.uint8),  # 501
        # n - k ones use the same table, coded the other way round: the stream's start
        # state binds k, so this is caught too.
        "kept count n - k": np.concatenate(
            [_varint_header(1, 500 - int(mask.sum())), good[len(_varint_header(1, 1)) + 1 :]]
        ),
    }
    assert len(_varint_header(1, int(mask.sum()))) == 3  # so the slice above is the words
    for data in cases.values():
        with pytest.raises(CodecError, match=re.escape("'m/x'")):
            decode_mask("m", np.ascontiguousarray(data, dtype=np.uint8), (500,), key="m/x")
    with pytest.raises(CodecError, match="dtype"):
        decode_mask("m", good.astype(np.int8), (500,))
    with pytest.raises(CodecError, match="1-D"):
        decode_mask("m", good.reshape(1, -1), (500,))
    with pytest.raises(CodecError, match="unknown mask form"):
        decode_mask("mz", good, (500,))
    with pytest.raises(CodecError, match="needs the mask it changes"):
        decode_mask("md", good, (500,))
    with pytest.raises(CodecError, match="numpy array"):
        decode_mask("m", [1, 0], (500,))  # type: ignore[arg-type]


def _varint_header(fmt: int, k: int) -> np.ndarray:
    from fedprune.maskcode import write_varint

    return np.frombuffer(bytes([fmt]) + write_varint(k), np.uint8)


def test_decode_mask_huge_claims_do_not_allocate():
    # A 10**12-position layer: a kept count above n, or a stream without its state, is
    # rejected before anything of the layer's size is allocated.
    with pytest.raises(CodecError, match="exceeds"):
        decode_mask("m", _varint_header(1, 10**12 + 1), (10**6, 10**6), key="m/big")
    with pytest.raises(CodecError, match="coded words"):
        decode_mask("m", _varint_header(1, 5), (10**6, 10**6), key="m/big")
    with pytest.raises(CodecError, match="non-minimal"):
        decode_mask("m", np.array([1, 0x85, 0x00], np.uint8), (10,), key="m/x")


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


@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_model_encoded_by_kept_index_is_the_same_message(density):
    """The server gathers kept values by the positions it caches (`GlobalModel.kept_index`)
    instead of scanning the mask: the message is the same, array by array."""
    params = make_params(SHAPES)
    masks = make_masks(SHAPES, PRUNABLE, density)
    index = {n: torch.nonzero(m.reshape(-1)).squeeze(1) for n, m in masks.items()}
    want = encode_model(params, masks, include_masks=True, held_masks=MASKS)
    got = encode_model(params, masks, include_masks=True, held_masks=MASKS, kept_index=index)
    assert list(got) == list(want)
    for key, array in want.items():
        assert got[key].dtype == array.dtype and np.array_equal(got[key], array), key
    assert not np.shares_memory(got["v/" + PRUNABLE[0]], params[PRUNABLE[0]].numpy())


@FAST
@given(data=model_and_masks(), include_masks=st.booleans())
def test_model_round_trip_random(data, include_masks):
    shapes, prunable, params, masks = data
    msg = encode_model(params, masks, include_masks=include_masks)
    for name, m in masks.items():
        if include_masks:
            nbytes = msg[_mask_key(msg, name)].nbytes
            assert within_goal(nbytes, mask_bound_bits(m.numel(), int(m.sum())))
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


@FAST
@given(data=model_and_masks(), seed=st.integers(0, 1000))
def test_update_round_trip_coded_importance(data, seed):
    shapes, prunable, params, masks = data
    g = torch.Generator().manual_seed(seed)
    imp = {n: torch.rand(shapes[n], generator=g) for n in prunable}
    code = ImportanceCode(mantissa_bits=7, top_fraction=1.0)  # everything, fine-grained
    msg = encode_update(params, masks, imp, importance_code=code)
    assert {k for k in msg if not k.startswith("v/")} == {f"gc/{n}" for n in prunable}
    dense, got = decode_update(read_only(msg), shapes, masks, True)
    check_dense(dense, params, masks)
    for name in prunable:
        up = got[name]
        assert isinstance(up, ImportanceUpload)
        back = torch.from_numpy(up.dense()).reshape(shapes[name])
        # 7 mantissa bits: within 2**-8 relative
        assert torch.allclose(back, imp[name], rtol=2**-8, atol=0)


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


def _coded_msg() -> dict[str, np.ndarray]:
    msg = _model_msg()
    assert _mask_key(msg, "fc1.weight") == "m/fc1.weight"  # 180 positions, ~half kept
    return msg


NEW_MASKS = {
    name: m ^ (torch.arange(m.numel()).reshape(m.shape) % 7 == 0) for name, m in MASKS.items()
}


def _change_msg() -> dict[str, np.ndarray]:
    """New masks (a seventh of the positions flipped) as changes from MASKS."""
    msg = encode_model(make_params(SHAPES), NEW_MASKS, include_masks=True, held_masks=MASKS)
    assert _mask_key(msg, "fc1.weight") == "md/fc1.weight"
    return msg


def _mut(fn: Callable[[dict], None], base: Callable[[], dict] = _coded_msg):
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
    "coded importance in model msg": (
        _mut(_set("gc/fc1.weight", np.zeros(10, np.uint8))),
        "gc/fc1.weight",
    ),
    "mask for non-prunable": (
        _mut(_set("m/fc1.bias", encode_mask(MASKS["fc1.weight"])[1])),
        "m/fc1.bias",
    ),
    "mask for unknown param": (_mut(_set("m/nope", np.zeros(2, np.uint8))), "m/nope"),
    "two mask forms": (
        _mut(_set("md/fc1.weight", np.zeros(2, np.uint8))),
        "fc1.weight",
    ),
    "one mask missing": (_mut(_pop("m/fc1.weight")), "fc1.weight"),
    "change without a held mask": (_mut(lambda m: None, _change_msg), "md/fc1.weight"),
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
    "mask wrong dtype": (
        _mut(_apply("m/fc1.weight", lambda a: a.astype(np.int8))),
        "m/fc1.weight",
    ),
    "mask too short": (_mut(_apply("m/fc1.weight", lambda a: a[:-1])), "m/fc1.weight"),
    "mask a word short": (_mut(_apply("m/fc1.weight", lambda a: a[:-4])), "m/fc1.weight"),
    "mask too long": (
        _mut(_apply("m/fc1.weight", lambda a: np.append(a, np.uint8(0)))),
        "m/fc1.weight",
    ),
    "mask a word too long": (
        _mut(_apply("m/fc1.weight", lambda a: np.append(a, np.zeros(4, np.uint8)))),
        "m/fc1.weight",
    ),
    "mask format byte": (
        _mut(_apply("m/conv1.weight", lambda a: _xor_at(a, 0, 3))),
        "m/conv1.weight",
    ),
    "mask kept count": (
        _mut(_apply("m/conv1.weight", lambda a: _xor_at(a, 1, 1))),
        "m/conv1.weight",
    ),
    "mask last byte": (
        _mut(_apply("m/fc1.weight", lambda a: _xor_at(a, -1, 0x40))),
        "m/fc1.weight",
    ),
    "mask 2-D": (_mut(_apply("m/fc1.weight", lambda a: a.reshape(1, -1))), "m/fc1.weight"),
    "mask empty": (_mut(_apply("m/fc1.weight", lambda a: a[:0])), "m/fc1.weight"),
}

# Changes, decoded against the held MASKS.
CHANGE_CASES = {
    "change truncated": (
        _mut(_apply("md/fc1.weight", lambda a: a[:-1]), _change_msg),
        "md/fc1.weight",
    ),
    "change a word short": (
        _mut(_apply("md/fc1.weight", lambda a: a[:-4]), _change_msg),
        "md/fc1.weight",
    ),
    "change too long": (
        _mut(_apply("md/fc1.weight", lambda a: np.append(a, np.uint8(1))), _change_msg),
        "md/fc1.weight",
    ),
    "change format byte": (
        _mut(_apply("md/fc1.weight", lambda a: _xor_at(a, 0, 3)), _change_msg),
        "md/fc1.weight",
    ),
    "change removed count": (
        _mut(_apply("md/fc1.weight", lambda a: _xor_at(a, 1, 1)), _change_msg),
        "md/fc1.weight",
    ),
    "change split": (
        _mut(_apply("md/fc1.weight", lambda a: _xor_at(a, 3, 1)), _change_msg),
        "md/fc1.weight",
    ),
    "change last byte": (
        _mut(_apply("md/fc1.weight", lambda a: _xor_at(a, -1, 0x10)), _change_msg),
        "md/fc1.weight",
    ),
    "change wrong dtype": (
        _mut(_apply("md/fc1.weight", lambda a: a.view(np.int8)), _change_msg),
        "md/fc1.weight",
    ),
    "values laid out by the old mask": (
        _mut(
            lambda m: m.__setitem__("v/fc1.weight", _model_msg(False)["v/fc1.weight"]), _change_msg
        ),
        "v/fc1.weight",
    ),
}


def _xor_at(a: np.ndarray, i: int, bits: int) -> np.ndarray:
    a = a.copy()
    a[i] ^= bits
    return a


def test_model_cases_are_what_they_say():
    assert _mask_key(_coded_msg(), "conv1.weight") == "m/conv1.weight"
    # fc1's kept count takes one byte, so byte 3 is the split of the change's parts
    assert _change_msg()["md/fc1.weight"][1] < 0x80


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_decode_model_errors(case):
    make, key = MODEL_CASES[case]
    msg = make()
    with pytest.raises(CodecError, match=re.escape(key)):
        decode_model(msg, SHAPES, PRUNABLE, None)


@pytest.mark.parametrize("case", list(CHANGE_CASES))
def test_decode_model_change_errors(case):
    make, key = CHANGE_CASES[case]
    msg = make()
    with pytest.raises(CodecError, match=re.escape(key)):
        decode_model(msg, SHAPES, PRUNABLE, MASKS)


def test_model_changes_round_trip_and_choice_of_form():
    params = make_params(SHAPES)
    msg = _change_msg()
    dense, got = decode_model(msg, SHAPES, PRUNABLE, MASKS)
    check_dense(dense, params, NEW_MASKS)
    for name in PRUNABLE:
        assert torch.equal(got[name], NEW_MASKS[name])
    # Whole masks where a change would cost more: a held mask unrelated to the new one.
    unrelated = make_masks(SHAPES, PRUNABLE, 0.5, seed=11)
    msg = encode_model(params, NEW_MASKS, include_masks=True, held_masks=unrelated)
    assert all(_mask_key(msg, n).startswith("m/") for n in PRUNABLE)
    # Each form is the smaller of the two.
    msg = encode_model(params, NEW_MASKS, include_masks=True, held_masks=MASKS)
    for name in PRUNABLE:
        whole = encode_mask(NEW_MASKS[name])[1].nbytes
        change = encode_mask_change(MASKS[name], NEW_MASKS[name])[1].nbytes
        assert msg[_mask_key(msg, name)].nbytes == min(whole, change)
    # A change needs the old mask, laid out as the model.
    with pytest.raises(CodecError, match=re.escape("fc1.weight")):
        bad = dict(MASKS)
        bad["fc1.weight"] = torch.ones(3, dtype=torch.bool)
        decode_model(_change_msg(), SHAPES, PRUNABLE, bad)
    with pytest.raises(ValueError, match="held_masks"):
        encode_model(params, MASKS, include_masks=False, held_masks=MASKS)


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


def _update_msg(importance: bool = True, coded: bool = False) -> dict[str, np.ndarray]:
    params = make_params(SHAPES, seed=1)
    g = torch.Generator().manual_seed(2)
    imp = {n: torch.rand(SHAPES[n], generator=g) for n in PRUNABLE} if importance else None
    code = ImportanceCode(top_fraction=0.3, min_sent=0) if coded else None
    return encode_update(params, MASKS, imp, importance_code=code)


def _umut(fn, importance=True, coded=False):
    def make():
        msg = _update_msg(importance, coded)
        fn(msg)
        return msg

    return make


UPDATE_CASES = {
    "missing values": (_umut(_pop("v/conv1.weight")), True, "v/conv1.weight"),
    "extra values": (_umut(_set("v/zzz", np.zeros(1, np.float32))), True, "v/zzz"),
    "mask in update": (_umut(_set("m/fc1.weight", np.zeros(23, np.uint8))), True, "m/fc1.weight"),
    "change in update": (
        _umut(_set("md/fc1.weight", np.zeros(3, np.uint8))),
        True,
        "md/fc1.weight",
    ),
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
    "coded importance unexpected": (_umut(lambda m: None, coded=True), False, "gc/conv1.weight"),
    "coded importance missing": (
        _umut(_pop("gc/fc2.weight"), coded=True),
        True,
        "gc/fc2.weight",
    ),
    "both importance forms": (
        _umut(_set("g/fc2.weight", np.zeros(15, np.uint16)), coded=True),
        True,
        "g/fc2.weight",
    ),
    "coded importance truncated": (
        _umut(_apply("gc/fc1.weight", lambda a: a[:-1]), coded=True),
        True,
        "gc/fc1.weight",
    ),
    "coded importance a word short": (
        _umut(_apply("gc/fc1.weight", lambda a: a[:-4]), coded=True),
        True,
        "gc/fc1.weight",
    ),
    "coded importance last byte": (
        _umut(_apply("gc/fc1.weight", lambda a: _xor_at(a, -1, 0x20)), coded=True),
        True,
        "gc/fc1.weight",
    ),
    "coded importance format": (
        _umut(_apply("gc/fc1.weight", lambda a: _xor_at(a, 0, 1)), coded=True),
        True,
        "gc/fc1.weight",
    ),
    "coded importance non-prunable": (
        _umut(_set("gc/fc1.bias", np.zeros(3, np.uint8)), coded=True),
        True,
        "gc/fc1.bias",
    ),
    "coded importance wrong dtype": (
        _umut(_apply("gc/conv1.weight", lambda a: a.astype(np.uint16)), coded=True),
        True,
        "gc/conv1.weight",
    ),
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
    """A valid model or update message with masks of mixed density and form; returns
    (kind, message, masks the values are laid out by, expect_importance, held masks)."""
    density = draw(st.sampled_from([0.0, 0.01, 0.5, 0.99, 1.0]))
    seed = draw(st.integers(0, 1000))
    params = make_params(SHAPES, seed)
    masks = make_masks(SHAPES, PRUNABLE, density, seed)
    if draw(st.booleans()):  # mixed densities within one message
        masks["fc2.weight"] = torch.zeros(SHAPES["fc2.weight"], dtype=torch.bool)
        masks["conv1.weight"] = make_masks(SHAPES, ["conv1.weight"], 0.5, seed)["conv1.weight"]
    kind = draw(st.sampled_from(["model", "update"]))
    if kind == "model":
        include = draw(st.booleans())
        if not include:
            return kind, encode_model(params, masks, include_masks=False), masks, False, masks
        # The node holds an older mask: some positions flipped (changes are then smaller).
        flips = make_masks(SHAPES, PRUNABLE, draw(st.sampled_from([0.0, 0.05, 0.5])), seed + 1)
        old = {n: m ^ flips[n] for n, m in masks.items()}
        as_changes = draw(st.booleans())
        msg = encode_model(
            params, masks, include_masks=True, held_masks=old if as_changes else None
        )
        return kind, msg, masks, False, old if as_changes or draw(st.booleans()) else None
    has_imp = draw(st.booleans())
    expect = has_imp if draw(st.integers(0, 4)) else not has_imp
    g = torch.Generator().manual_seed(seed)
    imp = {n: torch.rand(SHAPES[n], generator=g) for n in PRUNABLE} if has_imp else None
    code = draw(st.sampled_from([None, ImportanceCode(top_fraction=0.2, min_sent=3)]))
    return kind, encode_update(params, masks, imp, importance_code=code), masks, expect, masks


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
    kind, msg, masks, expect, held = _fuzz_base(draw)
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
                    "xor",
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
            prefix = draw(st.sampled_from(["v", "g", "gc", "m", "md", "zz", ""]))
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
        elif op == "xor":
            a = msg[key]
            if a.size and a.dtype == np.uint8:
                a = a.copy()  # contiguous: its flat view writes through, whatever its shape
                a.reshape(-1)[draw(st.integers(0, a.size - 1))] ^= draw(st.integers(1, 255))
                msg[key] = a
        elif op == "swapform":
            prefix, name = key.split("/", 1)
            for group in (MASK_PREFIXES, ("g", "gc")):
                if prefix in group:
                    new = draw(st.sampled_from([p for p in group if p != prefix]))
                    msg[f"{new}/{name}"] = msg.pop(key)
        keys = sorted(msg)
    if draw(st.booleans()):
        msg = read_only({k: v for k, v in msg.items() if isinstance(v, np.ndarray)}) | {
            k: v for k, v in msg.items() if not isinstance(v, np.ndarray)
        }
    return kind, msg, masks, expect, held


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
    kind, msg, masks, expect, held = case
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            if kind == "model":
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
                        if isinstance(g, ImportanceUpload):
                            assert torch.equal(torch.from_numpy(g.kept), masks[name].reshape(-1))
                            g = torch.from_numpy(g.dense()).reshape(SHAPES[name])
                        assert tuple(g.shape) == SHAPES[name]
                        assert bool(torch.isfinite(g).all()) and bool((g >= 0).all())
        except CodecError as exc:
            assert str(exc)
