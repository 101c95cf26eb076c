"""The sparse wire format between server and clients.

A message is a plain ``dict[str, numpy.ndarray]`` of 1-D arrays; the Flower layer wraps
each array into a Flower ``Array`` inside an ``ArrayRecord``.  This module has no Flower
import, so both sides (``strategies/`` and ``clients/``) encode and decode with the same
code.

Conventions
-----------
* A *model* is an ordered ``dict[str, torch.Tensor]`` of parameters (float32).
* *Masks* are ``dict[str, torch.Tensor]`` of ``torch.bool``, keyed by the names of the
  *prunable* parameters only (a subset of the model's keys), with the same shapes.
  ``True`` means kept.  Non-prunable parameters (biases, ...) are always sent whole.

Keys on the wire
----------------
``"v/<name>"``
    float32 values.  For a prunable parameter, its kept values in row-major (flattened)
    order, ``mask.sum()`` of them; for any other parameter, the whole flattened tensor.
``"mb/<name>"``, ``"mi/<name>"``, ``"mc/<name>"``
    A mask, when sent, in exactly one of three forms, whichever is the smallest in bytes
    (ties go to the bitmap):

    * ``mb``: uint8 bitmap, ``np.packbits`` of the flattened mask (big bit order),
      ``ceil(n / 8)`` bytes, padding bits zero;
    * ``mi``: uint32 sorted indices of the kept positions (very sparse masks);
    * ``mc``: uint32 sorted indices of the pruned positions (very dense masks).

    So a mask never costs more than one bit per position, and masks of density 0 or 1
    cost nothing.
``"g/<name>"``
    importance, dense and flattened, one per prunable parameter (only in client replies on
    reconfiguration rounds), as bfloat16 bit patterns in uint16: half the bytes of float32.

The decoders treat their input as untrusted: anything that does not fit the model or the
mask it claims raises :class:`CodecError` whose text names the offending key; every
length is checked against the model before anything is allocated from it, and non-finite
values never get through.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "MASK_PREFIXES",
    "CodecError",
    "decode_mask",
    "decode_model",
    "decode_reply",
    "decode_update",
    "encode_mask",
    "encode_model",
    "encode_update",
    "payload_bytes",
]

MASK_PREFIXES: tuple[str, ...] = ("mb", "mi", "mc")
"""The three mask forms, in order of preference when sizes tie."""

_VALUES = "v"
_IMPORTANCE = "g"
_PREFIXES: tuple[str, ...] = (_VALUES, _IMPORTANCE, *MASK_PREFIXES)
_MAX_INDEX_N = 2**32  # positions 0 .. 2**32 - 1 fit in uint32


class CodecError(ValueError):
    """A message that does not fit the model or the mask it claims; the text says which key
    and why."""


# --------------------------------------------------------------------------------------
# helpers


def _numel(name: str, shape: Any) -> tuple[tuple[int, ...], int]:
    """Validate a (trusted, caller-given) shape; return it as a tuple and its size."""
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"shape of {name!r} is not a sequence of ints: {shape!r}") from exc
    if any(d < 0 for d in dims):
        raise ValueError(f"shape of {name!r} has a negative dimension: {dims}")
    return dims, math.prod(dims)


def _check_shapes(shapes: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], int]]:
    if not isinstance(shapes, Mapping):
        raise TypeError(f"shapes must be a mapping name -> shape, got {type(shapes).__name__}")
    return {name: _numel(name, shape) for name, shape in shapes.items()}


def _check_array(key: str, data: Any, dtype: np.dtype) -> np.ndarray:
    """``data`` must be a 1-D numpy array of exactly ``dtype`` (native byte order)."""
    if not isinstance(data, np.ndarray):
        raise CodecError(f"{key!r}: expected a numpy array, got {type(data).__name__}")
    if data.dtype != dtype:
        raise CodecError(f"{key!r}: expected dtype {np.dtype(dtype).name}, got {data.dtype!s}")
    if data.ndim != 1:
        raise CodecError(f"{key!r}: expected a 1-D array, got shape {data.shape}")
    return data.view(np.ndarray) if type(data) is not np.ndarray else data


def _group(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Split a message's keys ``"<prefix>/<name>"`` into ``{prefix: {name: array}}``."""
    if not isinstance(arrays, Mapping):
        raise CodecError(f"a message must be a mapping key -> array, got {type(arrays).__name__}")
    groups: dict[str, dict[str, Any]] = {p: {} for p in _PREFIXES}
    for key, data in arrays.items():
        if not isinstance(key, str):
            raise CodecError(f"unexpected key {key!r}: keys must be strings")
        prefix, sep, name = key.partition("/")
        if not sep or not name or prefix not in groups:
            raise CodecError(
                f"unexpected key {key!r}: not of the form '<prefix>/<name>' with prefix "
                f"in {list(_PREFIXES)}"
            )
        groups[prefix][name] = data
    return groups


def _mask_np(name: str, mask: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A bool torch mask (trusted, caller-held) as a flat numpy bool array."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise CodecError(f"mask of {name!r} must be a torch.bool tensor, got {got}")
    if shape is not None and tuple(mask.shape) != shape:
        raise CodecError(
            f"mask of {name!r} has shape {tuple(mask.shape)}, the parameter has shape {shape}"
        )
    return mask.detach().reshape(-1).cpu().numpy()


def _param_flat(name: str, t: Any) -> torch.Tensor:
    """A parameter as a flat float32 tensor (no copy when already float32 and contiguous)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"parameter {name!r} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"parameter {name!r} has dtype {t.dtype}, expected a real dtype")
    return t.detach().reshape(-1).to(torch.float32)


def _encode_values(name: str, t: torch.Tensor, mask: torch.Tensor | None) -> np.ndarray:
    """Kept values of ``t`` (all of them when ``mask`` is None), as a fresh float32 array."""
    flat = _param_flat(name, t)
    if mask is None:
        # Always a copy: the message must not alias the live model.
        return flat.to("cpu", copy=True).numpy()
    if tuple(mask.shape) != tuple(t.shape):
        raise ValueError(
            f"mask of {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(t.shape)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask of {name!r} must be torch.bool, got {mask.dtype}")
    kept = flat[mask.detach().reshape(-1).to(flat.device)]  # boolean indexing: a new tensor
    return kept.cpu().numpy()


def _check_mask_names(
    params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> None:
    extra = [name for name in masks if name not in params]
    if extra:
        raise ValueError(f"masks for parameters the model does not have: {extra}")


def _finite_values(key: str, data: np.ndarray) -> None:
    if data.size and not np.isfinite(data).all():
        raise CodecError(f"{key!r}: contains non-finite values (NaN or inf)")


def _decode_values(
    key: str, data: Any, shape: tuple[int, ...], n: int, mask: np.ndarray | None
) -> torch.Tensor:
    """Dense float32 tensor of ``shape`` from ``v/`` data; 0.0 at pruned positions."""
    data = _check_array(key, data, np.dtype(np.float32))
    expected = n if mask is None else int(np.count_nonzero(mask))
    if data.shape[0] != expected:
        what = "the parameter's size" if mask is None else "the mask's kept count"
        raise CodecError(f"{key!r}: expected {expected} values ({what}), got {data.shape[0]}")
    _finite_values(key, data)
    if mask is None:
        # Alias the message's own buffer when it is writable; copy when read-only
        # (e.g. np.frombuffer) so the returned tensor never aliases a read-only buffer.
        out = np.require(data, requirements=["C", "W", "A"])
    else:
        out = np.zeros(n, dtype=np.float32)
        out[mask] = data
    return torch.from_numpy(out).reshape(shape)


# --------------------------------------------------------------------------------------
# masks


def encode_mask(mask: torch.Tensor) -> tuple[str, np.ndarray]:
    """Encode a bool mask in its smallest form; return ``(prefix, array)``.

    ``prefix`` is ``"mb"`` (uint8 bitmap), ``"mi"`` (uint32 kept indices) or ``"mc"``
    (uint32 pruned indices); ties go to the bitmap.  The array never exceeds
    ``ceil(n / 8)`` bytes.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"a mask must be a torch.bool tensor, got {got}")
    flat = mask.detach().reshape(-1).cpu().numpy()
    n = flat.size
    k = int(np.count_nonzero(flat))
    sizes = {"mb": (n + 7) // 8}
    if n <= _MAX_INDEX_N:
        sizes["mi"] = 4 * k
        sizes["mc"] = 4 * (n - k)
    prefix = min(MASK_PREFIXES, key=lambda p: sizes.get(p, math.inf))  # stable: mb first
    if prefix == "mb":
        return prefix, np.packbits(flat)
    if prefix == "mi":
        return prefix, np.flatnonzero(flat).astype(np.uint32)
    return prefix, np.flatnonzero(~flat).astype(np.uint32)


def _decode_mask_np(key: str, prefix: str, data: Any, n: int) -> np.ndarray:
    """Flat numpy bool mask of ``n`` positions; CodecError naming ``key`` if inconsistent."""
    if prefix == "mb":
        data = _check_array(key, data, np.dtype(np.uint8))
        nbytes = (n + 7) // 8
        if data.shape[0] != nbytes:
            raise CodecError(
                f"{key!r}: bitmap of {n} positions must have {nbytes} bytes, got {data.shape[0]}"
            )
        rem = n % 8
        if rem and data[-1] & ((1 << (8 - rem)) - 1):
            raise CodecError(f"{key!r}: nonzero padding bits in the last byte of the bitmap")
        return np.unpackbits(data, count=n).view(np.bool_)
    if prefix in ("mi", "mc"):
        data = _check_array(key, data, np.dtype(np.uint32))
        m = data.shape[0]
        if m > n:
            raise CodecError(f"{key!r}: {m} indices for a parameter of {n} positions")
        if m:
            if int(data[-1]) >= n:
                raise CodecError(f"{key!r}: index {int(data[-1])} out of range for {n} positions")
            if m > 1 and not np.all(data[1:] > data[:-1]):
                raise CodecError(f"{key!r}: indices are not strictly increasing")
        if prefix == "mi":
            out = np.zeros(n, dtype=np.bool_)
            out[data] = True
        else:
            out = np.ones(n, dtype=np.bool_)
            out[data] = False
        return out
    raise CodecError(f"{key!r}: unknown mask form {prefix!r}, expected one of {MASK_PREFIXES}")


def decode_mask(
    prefix: str, data: np.ndarray, shape: tuple[int, ...], *, key: str | None = None
) -> torch.Tensor:
    """Decode one mask form into a bool tensor of ``shape``.

    ``key`` (optional) is the wire key used in error messages; it defaults to
    ``"<prefix>/?"``.  Raises :class:`CodecError` if ``data`` is inconsistent with the form
    or the shape.
    """
    dims, n = _numel(key or "mask", shape)
    key = key if key is not None else f"{prefix}/?"
    return torch.from_numpy(_decode_mask_np(key, prefix, data, n)).reshape(dims)


# --------------------------------------------------------------------------------------
# server -> client


def encode_model(
    params: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    *,
    include_masks: bool,
) -> dict[str, np.ndarray]:
    """Server -> client.

    ``"v/<name>"`` for every parameter (kept values only for prunable ones), and when
    ``include_masks`` one mask form per prunable parameter.  The arrays are fresh copies
    that do not alias ``params``.
    """
    _check_mask_names(params, masks)
    out: dict[str, np.ndarray] = {}
    for name, t in params.items():
        mask = masks.get(name)
        out[f"{_VALUES}/{name}"] = _encode_values(name, t, mask)
        if include_masks and mask is not None:
            prefix, data = encode_mask(mask)
            out[f"{prefix}/{name}"] = data
    return out


def decode_model(
    arrays: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    prunable: Sequence[str],
    masks: Mapping[str, torch.Tensor] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Client side: decode a server message.

    ``shapes`` holds the model's parameter shapes (all parameters, in order) and
    ``prunable`` the names of the prunable ones.  If the message carries masks (it must
    then carry one for every prunable parameter) they are used and ``masks`` may be None;
    otherwise ``masks`` (the ones the node already holds) are used, and CodecError if
    there are none.

    Returns ``(params, masks)``: dense float32 parameters in the order of ``shapes``, with
    exact 0.0 at pruned positions, and the masks in use (the held ones are returned as
    given).  A non-prunable parameter's tensor may share memory with the message's array
    when that array is writable; it is copied otherwise.
    """
    spec = _check_shapes(shapes)
    prun = list(dict.fromkeys(prunable))
    for name in prun:
        if name not in spec:
            raise ValueError(f"prunable parameter {name!r} is not in shapes")
    prun_set = set(prun)
    groups = _group(arrays)

    # Unexpected keys.
    for name in groups[_VALUES]:
        if name not in spec:
            raise CodecError(f"unexpected key '{_VALUES}/{name}': the model has no such parameter")
    for name in groups[_IMPORTANCE]:
        raise CodecError(
            f"unexpected key '{_IMPORTANCE}/{name}': importance is not part of a model message"
        )
    forms: dict[str, str] = {}
    for prefix in MASK_PREFIXES:
        for name in groups[prefix]:
            key = f"{prefix}/{name}"
            if name not in spec:
                raise CodecError(f"unexpected key {key!r}: the model has no such parameter")
            if name not in prun_set:
                raise CodecError(f"unexpected key {key!r}: mask for non-prunable parameter")
            if name in forms:
                raise CodecError(
                    f"{key!r}: more than one mask form for {name!r} (also '{forms[name]}/{name}')"
                )
            forms[name] = prefix

    # Missing keys.
    for name in spec:
        if name not in groups[_VALUES]:
            raise CodecError(f"missing key '{_VALUES}/{name}'")

    # Masks: from the message, else the held ones.
    mask_np: dict[str, np.ndarray] = {}
    out_masks: dict[str, torch.Tensor] = {}
    if forms:
        for name in prun:
            if name not in forms:
                raise CodecError(
                    f"missing key 'mb/{name}' (or 'mi/{name}' / 'mc/{name}'): the message "
                    f"carries masks, but none for prunable parameter {name!r}"
                )
        for name in prun:
            prefix = forms[name]
            dims, n = spec[name]
            flat = _decode_mask_np(f"{prefix}/{name}", prefix, groups[prefix][name], n)
            mask_np[name] = flat
            out_masks[name] = torch.from_numpy(flat).reshape(dims)
    elif prun:
        if masks is None:
            raise CodecError(
                f"missing key 'mb/{prun[0]}': the message carries no masks and the node holds none"
            )
        mask_np = _held_masks(masks, spec, prun_set, "v")
        out_masks = {name: masks[name] for name in prun}

    params: dict[str, torch.Tensor] = {}
    for name, (dims, n) in spec.items():
        key = f"{_VALUES}/{name}"
        params[name] = _decode_values(key, groups[_VALUES][name], dims, n, mask_np.get(name))
    return params, out_masks


def _held_masks(
    masks: Mapping[str, torch.Tensor],
    spec: Mapping[str, tuple[tuple[int, ...], int]],
    prunable: set[str],
    prefix: str,
) -> dict[str, np.ndarray]:
    """Check the masks a node holds against the model; return them as flat numpy bools."""
    if not isinstance(masks, Mapping):
        raise CodecError(f"held masks must be a mapping, got {type(masks).__name__}")
    for name in masks:
        if name not in prunable:
            raise CodecError(f"held mask for {name!r}, which is not a prunable parameter")
    out: dict[str, np.ndarray] = {}
    for name in spec:
        if name not in prunable:
            continue
        if name not in masks:
            raise CodecError(f"'{prefix}/{name}': no mask held for prunable parameter {name!r}")
        out[name] = _mask_np(name, masks[name], spec[name][0])
    return out


# --------------------------------------------------------------------------------------
# client -> server


def encode_update(
    params: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    importance: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """Client -> server: ``"v/<name>"`` kept values (whole non-prunable parameters), plus
    ``"g/<name>"`` dense importance per prunable parameter when ``importance`` is given.
    Never masks.  NaN/inf are encoded as they are; the server's decoder rejects them."""
    _check_mask_names(params, masks)
    out: dict[str, np.ndarray] = {}
    for name, t in params.items():
        out[f"{_VALUES}/{name}"] = _encode_values(name, t, masks.get(name))
    if importance is not None:
        missing = [name for name in masks if name not in importance]
        extra = [name for name in importance if name not in masks]
        if missing or extra:
            raise ValueError(
                f"importance must cover exactly the prunable parameters; "
                f"missing {missing}, extra {extra}"
            )
        for name in params:
            if name not in masks:
                continue
            g = importance[name]
            if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(params[name].shape):
                got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise ValueError(
                    f"importance of {name!r} must be a tensor of shape "
                    f"{tuple(params[name].shape)}, got {got}"
                )
            out[f"{_IMPORTANCE}/{name}"] = _bfloat16_bits(_param_flat(name, g))
    return out


def _bfloat16_bits(t: torch.Tensor) -> np.ndarray:
    """bfloat16 (round to nearest) as its uint16 bit patterns: half the bytes of float32
    with float32's range, so squared gradients of 1e-30 survive; 8 bits of precision are
    plenty for ranking parameters."""
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy()


def _decode_bfloat16(key: str, data: Any, dims: tuple[int, ...], n: int) -> torch.Tensor:
    data = _check_array(key, data, np.dtype(np.uint16))
    if data.size != n:
        raise CodecError(f"{key!r}: expected {n} bfloat16 values, got {data.size}")
    values = (data.astype(np.uint32) << 16).view(np.float32)
    _finite_values(key, values)
    return torch.from_numpy(values).reshape(dims)


def decode_update(
    arrays: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    masks: Mapping[str, torch.Tensor],
    expect_importance: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Server side: decode a client's reply against the mask the server delivered.

    Returns ``(params, importance)``: dense float32 parameters in the order of ``shapes``
    with 0.0 at pruned positions, and the dense importance per prunable parameter when
    ``expect_importance`` (else None).  Raises CodecError for masks in the reply, missing
    or extra keys, wrong dtypes or lengths, non-finite values, and negative or non-finite
    importance.
    """
    spec = _check_shapes(shapes)
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping, got {type(masks).__name__}")
    for name in masks:
        if name not in spec:
            raise ValueError(f"mask for {name!r}, which is not in shapes")
    prun_set = set(masks)
    groups = _group(arrays)

    # Unexpected keys.
    for prefix in MASK_PREFIXES:
        for name in groups[prefix]:
            raise CodecError(
                f"unexpected key '{prefix}/{name}': a client update never carries masks"
            )
    for name in groups[_VALUES]:
        if name not in spec:
            raise CodecError(f"unexpected key '{_VALUES}/{name}': the model has no such parameter")
    for name in groups[_IMPORTANCE]:
        key = f"{_IMPORTANCE}/{name}"
        if not expect_importance:
            raise CodecError(f"unexpected key {key!r}: importance was not expected this round")
        if name not in prun_set:
            raise CodecError(f"unexpected key {key!r}: importance for a non-prunable parameter")

    # Missing keys.
    for name in spec:
        if name not in groups[_VALUES]:
            raise CodecError(f"missing key '{_VALUES}/{name}'")
    if expect_importance:
        for name in spec:
            if name in prun_set and name not in groups[_IMPORTANCE]:
                raise CodecError(f"missing key '{_IMPORTANCE}/{name}': importance was expected")

    mask_np = _held_masks(masks, spec, prun_set, _VALUES)
    params: dict[str, torch.Tensor] = {}
    for name, (dims, n) in spec.items():
        key = f"{_VALUES}/{name}"
        params[name] = _decode_values(key, groups[_VALUES][name], dims, n, mask_np.get(name))

    importance: dict[str, torch.Tensor] | None = None
    if expect_importance:
        importance = {}
        for name, (dims, n) in spec.items():
            if name not in prun_set:
                continue
            key = f"{_IMPORTANCE}/{name}"
            g = _decode_bfloat16(key, groups[_IMPORTANCE][name], dims, n)
            if n and bool((g < 0).any()):
                raise CodecError(f"{key!r}: negative importance")
            importance[name] = g
    return params, importance


def decode_reply(
    arrays: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    kept: Mapping[str, int],
    prunable: Sequence[str],
    expect_importance: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Server side: decode a client's reply without densifying its values.

    ``kept`` holds, per prunable parameter, the number of kept values the mask the server
    delivered has. Returns ``(values, importance)``: per parameter a 1-D float32 tensor,
    the kept values in wire order for a prunable one and the whole flattened tensor for
    any other; and the dense importance per prunable parameter when ``expect_importance``
    (else None). The same checks as :func:`decode_update`, so a reply that one rejects
    the other rejects too, with the same key in the message.
    """
    spec = _check_shapes(shapes)
    prun_set = set(prunable)
    groups = _group(arrays)
    for prefix in MASK_PREFIXES:
        for name in groups[prefix]:
            raise CodecError(
                f"unexpected key '{prefix}/{name}': a client update never carries masks"
            )
    for name in groups[_VALUES]:
        if name not in spec:
            raise CodecError(f"unexpected key '{_VALUES}/{name}': the model has no such parameter")
    for name in groups[_IMPORTANCE]:
        key = f"{_IMPORTANCE}/{name}"
        if not expect_importance:
            raise CodecError(f"unexpected key {key!r}: importance was not expected this round")
        if name not in prun_set:
            raise CodecError(f"unexpected key {key!r}: importance for a non-prunable parameter")
    values: dict[str, torch.Tensor] = {}
    for name, (_dims, n) in spec.items():
        key = f"{_VALUES}/{name}"
        if name not in groups[_VALUES]:
            raise CodecError(f"missing key {key!r}")
        data = _check_array(key, groups[_VALUES][name], np.dtype(np.float32))
        expected = int(kept[name]) if name in prun_set else n
        if data.shape[0] != expected:
            what = "the mask's kept count" if name in prun_set else "the parameter's size"
            raise CodecError(f"{key!r}: expected {expected} values ({what}), got {data.shape[0]}")
        _finite_values(key, data)
        values[name] = torch.from_numpy(np.require(data, requirements=["C", "W", "A"]))
    if not expect_importance:
        return values, None
    importance: dict[str, torch.Tensor] = {}
    for name, (dims, n) in spec.items():
        if name not in prun_set:
            continue
        key = f"{_IMPORTANCE}/{name}"
        if name not in groups[_IMPORTANCE]:
            raise CodecError(f"missing key {key!r}: importance was expected")
        g = _decode_bfloat16(key, groups[_IMPORTANCE][name], dims, n)
        if n and bool((g < 0).any()):
            raise CodecError(f"{key!r}: negative importance")
        importance[name] = g
    return values, importance


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Raw payload of a message: the sum of its arrays' ``nbytes`` (without framing)."""
    return sum(int(a.nbytes) for a in arrays.values())
