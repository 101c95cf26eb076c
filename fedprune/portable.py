"""The pruned model in files that run without fedprune: TorchScript and ONNX.

`model_inference.pt` (`fedprune.sparse.export_for_inference`) is the fast form: each layer
in its faster format, the sparse convolution and CSR included, but loading it needs
fedprune (its kernels are numba code). These two are the portable forms: the masked
weights held densely (zeros at pruned positions) in a traced TorchScript module, which
`torch.jit.load` runs with torch alone, and in an ONNX graph (opset 17, the batch size
free), which any ONNX runtime runs. They trade the sparse kernels' speed for portability.

Each file is checked after it is written: loaded back (TorchScript by `torch.jit.load`,
ONNX by onnxruntime when it is installed) and its outputs compared with the pruned model's
on a random batch. A format that cannot be written or checked says why in the returned
block; nothing is skipped silently.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

TORCHSCRIPT_FILE = "model_inference.torchscript.pt"
ONNX_FILE = "model_inference.onnx"
ONNX_OPSET = 17
CHECK_BATCH = 3


def masked_copy(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of `model` in eval mode with every masked weight zeroed at pruned positions."""
    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name in masks:
                p.mul_(masks[name].to(p.dtype))
    return out


def export_portable(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    out_dir: Path,
    input_shape: tuple[int, ...],
    seed: int = 0,
) -> dict[str, Any]:
    """Write the pruned model as TorchScript and ONNX into `out_dir`, check each against
    the pruned model, and return a block for summary.json: per format the file and the
    largest absolute difference of its outputs (logits) on a random batch, or the reason
    it was not written or not checked."""
    pruned = masked_copy(model, masks)
    x = torch.rand((CHECK_BATCH, *input_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = pruned(x)
    return {
        "torchscript": _torchscript(pruned, x, expected, Path(out_dir) / TORCHSCRIPT_FILE),
        "onnx": _onnx(pruned, x, expected, Path(out_dir) / ONNX_FILE),
    }


def _torchscript(pruned: nn.Module, x, expected, path: Path) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            # torch 2.14 marks TorchScript deprecated in favour of torch.export, whose
            # files need torch's Python side to load; TorchScript is what C++ and mobile
            # runtimes (and the issue) ask for, so it stays while torch can write it.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            # No trace check: it runs the model again to compare, and the saved file is
            # compared with the pruned model below anyway (0.8 s of the main job's export).
            traced = torch.jit.trace(pruned, x, check_trace=False)
        traced.save(str(path))
        with torch.no_grad():
            got = torch.jit.load(str(path))(x)
    except (RuntimeError, TypeError, ValueError) as exc:
        return {"error": f"TorchScript export failed: {exc}"}
    return {"file": path.name, "max_abs_diff": float((got - expected).abs().max())}


def _onnx(pruned: nn.Module, x, expected, path: Path) -> dict[str, Any]:
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        return {"error": "not written: the onnx package is not installed (pip install onnx)"}
    try:
        torch.onnx.export(
            pruned,
            (x,),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )
    except Exception as exc:  # the exporter raises many types for unsupported operators
        return {"error": f"ONNX export failed: {type(exc).__name__}: {exc}"}
    try:
        import onnxruntime
    except ImportError:
        return {"file": path.name, "error": "not checked: onnxruntime is not installed"}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"x": x.numpy()})
    return {
        "file": path.name,
        "max_abs_diff": float((torch.from_numpy(got) - expected).abs().max()),
    }
