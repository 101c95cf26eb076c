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
``"vq/<name>"``
    Instead of ``"v/<name>"`` (with the `value-code` setting): the values as a quantised
    change (format 4, `fedprune.value_code`): server -> client, the change from the values
    the node holds, for every parameter and without masks; client -> server, the node's
    update (trained minus received values), per parameter.
``"m/<name>"``
    A mask, when sent: uint8, coded near its entropy bound log2 C(n, k) bits
    (`fedprune.maskcode`: a format byte, the kept count, rANS words).  Masks of density 0
    or 1 cost 2 to 11 bytes.
``"md/<name>"``
    Instead of ``"m/<name>"``, for a node that holds the previous mask version: the change
    from the mask it holds (removed and added positions, `fedprune.maskcode`), uint8.  A
    message carries a mask for every prunable parameter or for none; each in either form.
``"g/<name>"``
    importance, dense and flattened, one per prunable parameter (only in client replies on
    reconfiguration rounds), as bfloat16 bit patterns in uint16: half the bytes of float32.
``"gc/<name>"``
    Instead of ``"g/<name>"``: the coded importance upload (`fedprune.importance_code`),
    uint8: the kept weights' importance and the node's most important pruned ones,
    log-quantised and entropy coded, about 1/12 of bfloat16's bytes on the default task.

The full byte layout is specified in ``docs/wire.md``.

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

from fedprune import maskcode
from fedprune.errors import CodecError
from fedprune.importance_code import ImportanceCode, ImportanceUpload, decode_importance
from fedprune.quantisation import dequantise

__all__ = [
    "MASK_CHANGE_PREFIX",
    "MASK_PREFIX",
    "MASK_PREFIXES",
    "CodecError",
    "ImportanceCode",
    "ImportanceUpload",
    "decode_kept",
    "decode_mask",
    "decode_mask_change",
    "decode_model",
    "decode_reply",
    "decode_update",
    "dense_from_kept",
    "encode_kept_update",
    "encode_mask",
    "encode_mask_change",
    "encode_model",
    "encode_update",
    "payload_bytes",
]

MASK_PREFIX = "m"
"""A whole mask, coded (`fedprune.maskcode.encode_mask_bytes`)."""
MASK_CHANGE_PREFIX = "md"
"""A mask as its change from the one the node holds (`fedprune.maskcode`)."""
MASK_PREFIXES: tuple[str, ...] = (MASK_PREFIX, MASK_CHANGE_PREFIX)
"""The two mask forms: a message that carries either carries masks."""

_VALUES = "v"
_IMPORTANCE = "g"
_CODED_IMPORTANCE = "gc"
_IMPORTANCE_PREFIXES = (_IMPORTANCE, _CODED_IMPORTANCE)
_VALUE_CHANGE = "vq"  # a quantised change of values (fedprune.value_code)
_PREFIXES: tuple[str, ...] = (_VALUES, _VALUE_CHANGE, *_IMPORTANCE_PREFIXES, *MASK_PREFIXES)


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


def _kept_flat(
    name: str, t: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor | None = None
) -> torch.Tensor:
    """Kept values of ``t`` (all of them when ``mask`` is None), flat float32; may alias
    ``t`` when ``mask`` is None. ``index``: the mask's flat True positions, ascending, when
    the caller holds them (a gather of the kept values instead of a scan of the mask)."""
    flat = _param_flat(name, t)
    if mask is None:
        return flat
    if tuple(mask.shape) != tuple(t.shape):
        raise ValueError(
            f"mask of {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(t.shape)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask of {name!r} must be torch.bool, got {mask.dtype}")
    if index is not None:  # a new tensor, as boolean indexing gives
        return flat.index_select(0, index.to(flat.device))
    return flat[mask.detach().reshape(-1).to(flat.device)]  # boolean indexing: a new tensor


def _encode_values(
    name: str, t: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor | None = None
) -> np.ndarray:
    """Kept values of ``t`` (all of them when ``mask`` is None), as a fresh float32 array."""
    # Always a copy: the message must not alias the live model.
    return _kept_flat(name, t, mask, index).to("cpu", copy=True).numpy()


def _check_mask_names(
    params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> None:
    extra = [name for name in masks if name not in params]
    if extra:
        raise ValueError(f"masks for parameters the model does not have: {extra}")


def _finite_values(key: str, data: np.ndarray) -> None:
    if data.size and not np.isfinite(data).all():
        raise CodecError(f"{key!r}: contains non-finite values (NaN or inf)")


def _decode_values(key: str, data: Any, n: int, mask: np.ndarray | None) -> torch.Tensor:
    """The 1-D float32 values of ``v/`` data, checked: ``n`` of them, or the mask's kept
    count when ``mask`` is given; all finite."""
    data = _check_array(key, data, np.dtype(np.float32))
    expected = n if mask is None else int(np.count_nonzero(mask))
    if data.shape[0] != expected:
        what = "the parameter's size" if mask is None else "the mask's kept count"
        raise CodecError(f"{key!r}: expected {expected} values ({what}), got {data.shape[0]}")
    _finite_values(key, data)
    # Alias the message's own buffer when it is writable; copy when read-only
    # (e.g. np.frombuffer) so the returned tensor never aliases a read-only buffer.
    return torch.from_numpy(np.require(data, requirements=["C", "W", "A"]))


# --------------------------------------------------------------------------------------
# masks


def _check_mask_tensor(mask: Any, what: str = "a mask") -> np.ndarray:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{what} must be a torch.bool tensor, got {got}")
    return mask.detach().reshape(-1).cpu().numpy()


def encode_mask(mask: torch.Tensor) -> tuple[str, np.ndarray]:
    """Code a bool mask near log2 C(n, k) bits; return ``(MASK_PREFIX, uint8 array)``.

    About ``log2 C(n, k) / 8 + 12`` bytes (`fedprune.maskcode`); 2 to 11 bytes when the
    mask is all False or all True.
    """
    return MASK_PREFIX, maskcode.encode_mask_bytes(_check_mask_tensor(mask))


def encode_mask_change(old: torch.Tensor, new: torch.Tensor) -> tuple[str, np.ndarray]:
    """Code ``new`` as its change from ``old`` (same shape); return
    ``(MASK_CHANGE_PREFIX, uint8 array)``, about
    ``(log2 C(k, removed) + log2 C(n - k, added)) / 8 + 24`` bytes."""
    o = _check_mask_tensor(old, "the old mask")
    w = _check_mask_tensor(new, "the new mask")
    if tuple(old.shape) != tuple(new.shape):
        raise ValueError(f"old mask has shape {tuple(old.shape)}, new mask {tuple(new.shape)}")
    return MASK_CHANGE_PREFIX, maskcode.encode_mask_change(o, w)


def _decode_mask_np(key: str, prefix: str, data: Any, n: int) -> np.ndarray:
    """Flat numpy bool mask of ``n`` positions; CodecError naming ``key`` if inconsistent."""
    if prefix == MASK_PREFIX:
        return maskcode.decode_mask_bytes(data, n, what=repr(key))
    if prefix == MASK_CHANGE_PREFIX:
        raise CodecError(f"{key!r}: a mask change needs the mask it changes (decode_mask_change)")
    raise CodecError(f"{key!r}: unknown mask form {prefix!r}, expected {MASK_PREFIX!r}")


def decode_mask(
    prefix: str, data: np.ndarray, shape: tuple[int, ...], *, key: str | None = None
) -> torch.Tensor:
    """Decode a whole mask (form ``"m"``) into a bool tensor of ``shape``.

    ``key`` (optional) is the wire key used in error messages; it defaults to
    ``"<prefix>/?"``.  Raises :class:`CodecError` if ``data`` is inconsistent with the form
    or the shape; allocates nothing beyond the shape's size.
    """
    dims, n = _numel(key or "mask", shape)
    key = key if key is not None else f"{prefix}/?"
    return torch.from_numpy(_decode_mask_np(key, prefix, data, n)).reshape(dims)


def decode_mask_change(
    old: torch.Tensor, data: np.ndarray, *, key: str = f"{MASK_CHANGE_PREFIX}/?"
) -> torch.Tensor:
    """The new mask (a bool tensor of old's shape) from the mask the node holds (``old``,
    trusted) and a coded change (form ``"md"``, untrusted).  CodecError naming ``key``."""
    o = _check_mask_tensor(old, "the held mask")
    return torch.from_numpy(maskcode.decode_mask_change(o, data, what=repr(key))).reshape(old.shape)


# --------------------------------------------------------------------------------------
# server -> client


def encode_model(
    params: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    *,
    include_masks: bool,
    held_masks: Mapping[str, torch.Tensor] | None = None,
    kept_index: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """Server -> client.

    ``"v/<name>"`` for every parameter (kept values only for prunable ones), and when
    ``include_masks`` one mask per prunable parameter: ``"m/<name>"``, or, when
    ``held_masks`` (the masks the node holds: the previous version) are given and the
    change is smaller, ``"md/<name>"``, the change from the held mask.  The arrays are
    fresh copies that do not alias ``params``.

    ``kept_index``: per prunable parameter, the flat positions of its mask's True entries
    in ascending order, where the caller keeps them (`GlobalModel.kept_index`): the kept
    values are gathered by them (1.8 ms on fc1 of Conv-2 at 5 %, against 8.9 ms for a
    boolean scan of its 6.4 M mask entries); the message is the same.
    """
    _check_mask_names(params, masks)
    if held_masks is not None:
        if not include_masks:
            raise ValueError("held_masks is for messages that include masks")
        if set(held_masks) != set(masks):
            raise ValueError(
                f"held masks for {sorted(held_masks)}, but the masks are for {sorted(masks)}"
            )
    out: dict[str, np.ndarray] = {}
    for name, t in params.items():
        mask = masks.get(name)
        index = kept_index.get(name) if kept_index is not None and mask is not None else None
        out[f"{_VALUES}/{name}"] = _encode_values(name, t, mask, index)
        if include_masks and mask is not None:
            prefix, data = encode_mask(mask)
            if held_masks is not None:
                change = encode_mask_change(held_masks[name], mask)
                if change[1].nbytes < data.nbytes:
                    prefix, data = change
            out[f"{prefix}/{name}"] = data
    return out


def decode_model(
    arrays: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    prunable: Sequence[str],
    masks: Mapping[str, torch.Tensor] | None,
    held_values: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Client side: decode a server message into dense parameters (`decode_kept`, then
    each prunable parameter's kept values scattered into zeros).

    Returns ``(params, masks)``: dense float32 parameters in the order of ``shapes``, with
    exact 0.0 at pruned positions, and the masks in use (the held ones are returned as
    given).  A parameter without a mask, or whose mask keeps every position, may share
    memory with the message's array when that array is writable; it is copied otherwise.
    """
    kept, out_masks = decode_kept(arrays, shapes, prunable, masks, held_values)
    params = {
        name: dense_from_kept(kept[name], out_masks.get(name), dims)
        for name, dims in shapes.items()
    }
    return params, out_masks


def dense_from_kept(
    values: torch.Tensor, mask: torch.Tensor | None, shape: Sequence[int]
) -> torch.Tensor:
    """A parameter of `shape` from its values on the wire: `values` itself (reshaped) when
    it has no mask or its mask keeps every position (FedAvg's), else its kept `values` at
    the mask's True positions and 0.0 elsewhere."""
    if mask is None or values.numel() == mask.numel():
        return values.reshape(tuple(shape))
    out = torch.zeros(mask.numel(), dtype=values.dtype)
    out[mask.reshape(-1).to(torch.bool)] = values
    return out.reshape(tuple(shape))


def decode_kept(
    arrays: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    prunable: Sequence[str],
    masks: Mapping[str, torch.Tensor] | None,
    held_values: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Client side: decode a server message into the values it carries, never dense.

    A message whose values are quantised changes (``"vq/<name>"`` for every parameter,
    never with masks) applies them to ``held_values`` (the kept values the node holds, per
    parameter, 1-D float32 in wire order, laid out by ``masks``); CodecError without them.

    ``shapes`` holds the model's parameter shapes (all parameters, in order) and
    ``prunable`` the names of the prunable ones.  If the message carries masks (it must
    then carry one for every prunable parameter, ``"m/"`` or ``"md/"``) they are used;
    ``masks`` (the ones the node holds) are then needed only for the changes ``"md/"``,
    which apply to them.  Otherwise ``masks`` are used as they are.  CodecError when the
    masks needed are missing.

    Returns ``(kept, masks)``: per parameter, in the order of ``shapes``, a 1-D float32
    tensor: a prunable parameter's kept values in position order (the mask's True entries,
    row-major), any other parameter whole; and the masks in use (the held ones are
    returned as given).  A node whose layers train sparse builds them from these
    (`fedprune.sparse.model_in_formats`), so a pruned layer is never dense on the node.
    A tensor may share memory with the message's array when that array is writable; it is
    copied otherwise.
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
    for prefix in _IMPORTANCE_PREFIXES:
        for name in groups[prefix]:
            raise CodecError(
                f"unexpected key '{prefix}/{name}': importance is not part of a model message"
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

    # Missing keys: values for every parameter, all "v/" or all "vq/".
    changes = groups[_VALUE_CHANGE]
    if changes:
        _check_value_changes(groups, spec, forms, held_values)
    for name in spec:
        if name not in (changes or groups[_VALUES]):
            raise CodecError(f"missing key '{_VALUE_CHANGE if changes else _VALUES}/{name}'")

    # Masks: from the message, else the held ones.
    mask_np: dict[str, np.ndarray] = {}
    out_masks: dict[str, torch.Tensor] = {}
    if forms:
        for name in prun:
            if name not in forms:
                raise CodecError(
                    f"missing key '{MASK_PREFIX}/{name}' (or '{MASK_CHANGE_PREFIX}/{name}'): "
                    f"the message carries masks, but none for prunable parameter {name!r}"
                )
        for name in prun:
            prefix = forms[name]
            dims, n = spec[name]
            key = f"{prefix}/{name}"
            if prefix == MASK_CHANGE_PREFIX:
                if masks is None or not isinstance(masks, Mapping) or name not in masks:
                    raise CodecError(f"{key!r}: a mask change, but the node holds no mask")
                held = _mask_np(name, masks[name], dims)
                flat = maskcode.decode_mask_change(held, groups[prefix][name], what=repr(key))
            else:
                flat = _decode_mask_np(key, prefix, groups[prefix][name], n)
            mask_np[name] = flat
            out_masks[name] = torch.from_numpy(flat).reshape(dims)
    elif prun:
        if masks is None:
            raise CodecError(
                f"missing key '{MASK_PREFIX}/{prun[0]}': the message carries no masks and the "
                "node holds none"
            )
        mask_np = _held_masks(masks, spec, prun_set, "v")
        out_masks = {name: masks[name] for name in prun}

    kept: dict[str, torch.Tensor] = {}
    for name, (_, n) in spec.items():
        if changes:
            key = f"{_VALUE_CHANGE}/{name}"
            data = held_values[name] + dequantise(
                changes[name], held_values[name].shape[0], what=repr(key)
            )
        else:
            key, data = f"{_VALUES}/{name}", groups[_VALUES][name]
        kept[name] = _decode_values(key, data, n, mask_np.get(name))
    return kept, out_masks


def _check_value_changes(groups, spec, forms, held_values) -> None:
    """A message of quantised value changes: for every parameter, without "v/" keys or
    masks, and only to a node that holds values."""
    for name in groups[_VALUE_CHANGE]:
        if name not in spec:
            raise CodecError(
                f"unexpected key '{_VALUE_CHANGE}/{name}': the model has no such parameter"
            )
    if groups[_VALUES]:
        name = next(iter(groups[_VALUES]))
        raise CodecError(
            f"unexpected key '{_VALUES}/{name}': the message carries value changes "
            f"('{_VALUE_CHANGE}/'); one form per message"
        )
    if forms:
        name = next(iter(forms))
        raise CodecError(
            f"unexpected key '{forms[name]}/{name}': value changes apply to the held mask; "
            "a message with masks carries float32 values"
        )
    if held_values is None or any(name not in held_values for name in spec):
        raise CodecError(
            f"'{_VALUE_CHANGE}/{next(iter(groups[_VALUE_CHANGE]))}': value changes, but the "
            "node holds no values to apply them to"
        )


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
    *,
    importance_code: ImportanceCode | None = None,
) -> dict[str, np.ndarray]:
    """Client -> server, from dense parameters: `encode_kept_update` of their kept values
    (a prunable parameter's values where its mask is True)."""
    _check_mask_names(params, masks)
    kept = {name: _kept_flat(name, t, masks.get(name)) for name, t in params.items()}
    return encode_kept_update(kept, masks, importance, importance_code=importance_code)


def _kept_count(masks: Mapping[str, torch.Tensor], name: str) -> int:
    """How many positions `masks[name]` keeps. A mapping that can say without building
    the mask (`fedprune.sparse.LayerMasks`, for the layers it holds as indices) is asked;
    otherwise count_nonzero (a bool tensor's sum() costs 20x more: 18 ms on fc1's)."""
    kept_count = getattr(masks, "kept_count", None)
    return kept_count(name) if kept_count is not None else int(torch.count_nonzero(masks[name]))


def encode_kept_update(
    kept: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    importance: Mapping[str, torch.Tensor] | None = None,
    *,
    importance_code: ImportanceCode | None = None,
) -> dict[str, np.ndarray]:
    """Client -> server: ``"v/<name>"`` the values of ``kept`` (per parameter, 1-D: a
    prunable one's kept values in position order, as `decode_kept` gives them and a sparse
    layer holds them; any other whole), copied; plus the importance per prunable parameter
    (the shape of its mask) when ``importance`` is given: ``"g/<name>"`` dense bfloat16, or
    ``"gc/<name>"`` coded with ``importance_code`` when given (the importance must then be
    finite and >= 0: ValueError otherwise).  Never masks.  NaN/inf values are encoded as
    they are; the server's decoder rejects them."""
    _check_mask_names(kept, masks)
    out: dict[str, np.ndarray] = {}
    for name, t in kept.items():
        flat = _param_flat(name, t)
        kept_count = _kept_count(masks, name) if name in masks else flat.numel()
        if flat.numel() != kept_count:
            raise ValueError(f"{name!r}: {flat.numel()} values, but its mask keeps {kept_count}")
        # Always a copy: the message must not alias the live model.
        out[f"{_VALUES}/{name}"] = flat.to("cpu", copy=True).numpy()
    if importance is not None:
        missing = [name for name in masks if name not in importance]
        extra = [name for name in importance if name not in masks]
        if missing or extra:
            raise ValueError(
                f"importance must cover exactly the prunable parameters; "
                f"missing {missing}, extra {extra}"
            )
        for name in kept:
            if name not in masks:
                continue
            g, shape = importance[name], tuple(masks[name].shape)
            if not isinstance(g, torch.Tensor) or tuple(g.shape) != shape:
                got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise ValueError(
                    f"importance of {name!r} must be a tensor of shape {shape}, got {got}"
                )
            if importance_code is None:
                out[f"{_IMPORTANCE}/{name}"] = _bfloat16_bits(_param_flat(name, g))
            else:
                flat = _param_flat(name, g).cpu().numpy()
                out[f"{_CODED_IMPORTANCE}/{name}"] = importance_code.encode(
                    flat, _mask_np(name, masks[name], shape)
                )
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


def decode_reply(
    arrays: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    masks: Mapping[str, torch.Tensor],
    expect_importance: bool,
    base: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | dict[str, ImportanceUpload] | None]:
    """Server side: decode a client's reply against the mask the server delivered, without
    densifying its values.

    A parameter's values come as ``"v/<name>"`` (float32) or as ``"vq/<name>"``, a
    quantised update (format 4) added to ``base[name]`` (the round's global kept values,
    1-D float32 in wire order; CodecError for ``"vq/"`` without a base).

    Returns ``(values, importance)``: per parameter a 1-D float32 tensor, the kept values
    in wire order for a prunable one and the whole flattened tensor for any other; and,
    when ``expect_importance`` (else None), the importance per prunable parameter in the
    form the reply carried it: dense float32 tensors for ``"g/"`` (bfloat16),
    `ImportanceUpload` for ``"gc/"`` (coded; add it to a
    `fedprune.importance_code.ImportanceSum`, which also takes the dense tensors, or call its
    ``dense()``). A reply carries one form for all parameters. Raises CodecError for masks
    in the reply, missing or extra keys, wrong dtypes or lengths, non-finite values, and
    negative or non-finite importance.
    """
    spec = _check_shapes(shapes)
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping, got {type(masks).__name__}")
    for name in masks:
        if name not in spec:
            raise ValueError(f"mask for {name!r}, which is not in shapes")
    prun_set = set(masks)
    groups = _group(arrays)
    form = _check_reply_keys(groups, spec, prun_set, expect_importance)
    mask_np = _held_masks(masks, spec, prun_set, _VALUES)
    values: dict[str, torch.Tensor] = {}
    for name, (_dims, n) in spec.items():
        expected = int(np.count_nonzero(mask_np[name])) if name in prun_set else n
        if name in groups[_VALUE_CHANGE]:
            key = f"{_VALUE_CHANGE}/{name}"
            if base is None or name not in base:
                raise CodecError(f"{key!r}: a quantised update, but no values were sent to it")
            held = base[name].detach().reshape(-1).cpu().numpy()
            if held.dtype != np.float32 or held.shape[0] != expected:
                raise ValueError(f"base of {name!r}: expected {expected} float32 values")
            data = held + dequantise(groups[_VALUE_CHANGE][name], expected, what=repr(key))
            _finite_values(key, data)
            values[name] = torch.from_numpy(data)
            continue
        key = f"{_VALUES}/{name}"
        data = _check_array(key, groups[_VALUES][name], np.dtype(np.float32))
        if data.shape[0] != expected:
            what = "the mask's kept count" if name in prun_set else "the parameter's size"
            raise CodecError(f"{key!r}: expected {expected} values ({what}), got {data.shape[0]}")
        _finite_values(key, data)
        values[name] = torch.from_numpy(np.require(data, requirements=["C", "W", "A"]))
    if not expect_importance:
        return values, None
    importance: dict[str, Any] = {}
    for name, (dims, n) in spec.items():
        if name not in prun_set:
            continue
        key = f"{form}/{name}"
        if form == _CODED_IMPORTANCE:
            importance[name] = decode_importance(groups[form][name], mask_np[name], what=repr(key))
            continue
        g = _decode_bfloat16(key, groups[_IMPORTANCE][name], dims, n)
        if n and bool((g < 0).any()):
            raise CodecError(f"{key!r}: negative importance")
        importance[name] = g
    return values, importance


def _check_reply_keys(groups, spec, prun_set: set[str], expect_importance: bool) -> str:
    """CodecError for an unexpected or missing key of a reply; the importance form."""
    for prefix in MASK_PREFIXES:
        for name in groups[prefix]:
            raise CodecError(
                f"unexpected key '{prefix}/{name}': a client update never carries masks"
            )
    for prefix in (_VALUES, _VALUE_CHANGE):
        for name in groups[prefix]:
            if name not in spec:
                raise CodecError(
                    f"unexpected key '{prefix}/{name}': the model has no such parameter"
                )
            if prefix == _VALUE_CHANGE and name in groups[_VALUES]:
                raise CodecError(
                    f"'{_VALUE_CHANGE}/{name}': values for {name!r} also as '{_VALUES}/'"
                )
    for prefix in _IMPORTANCE_PREFIXES:
        for name in groups[prefix]:
            key = f"{prefix}/{name}"
            if not expect_importance:
                raise CodecError(f"unexpected key {key!r}: importance was not expected this round")
            if name not in prun_set:
                raise CodecError(f"unexpected key {key!r}: importance for a non-prunable parameter")
    # One form for the whole reply: the coded one if any key has it.
    form = _CODED_IMPORTANCE if groups[_CODED_IMPORTANCE] else _IMPORTANCE
    if groups[_CODED_IMPORTANCE] and groups[_IMPORTANCE]:
        name = next(iter(groups[_IMPORTANCE]))
        raise CodecError(
            f"unexpected key '{_IMPORTANCE}/{name}': the reply also carries coded importance "
            f"('{_CODED_IMPORTANCE}/'); one form per reply"
        )
    for name in spec:
        if name not in groups[_VALUES] and name not in groups[_VALUE_CHANGE]:
            raise CodecError(f"missing key '{_VALUES}/{name}' (or '{_VALUE_CHANGE}/{name}')")
        if expect_importance and name in prun_set and name not in groups[form]:
            raise CodecError(f"missing key '{form}/{name}': importance was expected")
    return form


def decode_update(
    arrays: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    masks: Mapping[str, torch.Tensor],
    expect_importance: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | dict[str, ImportanceUpload] | None]:
    """`decode_reply` with the values as dense float32 tensors of ``shapes`` (0.0 at
    pruned positions): for tests and tools that want whole tensors."""
    values, importance = decode_reply(arrays, shapes, masks, expect_importance)
    params: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name in masks:
            dense = torch.zeros(masks[name].numel(), dtype=torch.float32)
            dense[masks[name].reshape(-1)] = values[name]
            params[name] = dense.reshape(tuple(shape))
        else:
            params[name] = values[name].reshape(tuple(shape))
    return params, importance


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Raw payload of a message: the sum of its arrays' ``nbytes`` (without framing)."""
    return sum(int(a.nbytes) for a in arrays.values())
