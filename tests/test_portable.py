"""The portable forms of the pruned model run without fedprune and match it."""

import subprocess
import sys

import torch

from fedprune.models import build_model, prunable_names
from fedprune.portable import ONNX_FILE, TORCHSCRIPT_FILE, export_portable, masked_copy


def pruned_small_cnn():
    model = build_model("small-cnn", seed=0)
    g = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    masks = {n: torch.rand(params[n].shape, generator=g) < 0.3 for n in prunable_names(model)}
    return model, masks


def test_torchscript_and_onnx_match_the_pruned_model(tmp_path):
    model, masks = pruned_small_cnn()
    block = export_portable(model, masks, tmp_path, (1, 28, 28))
    assert block["torchscript"]["file"] == TORCHSCRIPT_FILE
    assert block["torchscript"]["max_abs_diff"] < 1e-5
    assert block["onnx"]["file"] == ONNX_FILE, block["onnx"]
    assert block["onnx"]["max_abs_diff"] < 1e-4
    # the pruned positions really are zero in what was exported
    pruned = masked_copy(model, masks)
    for name, mask in masks.items():
        assert torch.all(dict(pruned.named_parameters())[name][~mask] == 0)


def test_the_torchscript_file_runs_where_fedprune_cannot_be_imported(tmp_path):
    model, masks = pruned_small_cnn()
    export_portable(model, masks, tmp_path, (1, 28, 28))
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(masked_copy(model, masks)(x), tmp_path / "want.pt")
    code = (
        "import sys; sys.modules['fedprune'] = None\n"  # any import of fedprune now fails
        "import torch\n"
        f"m = torch.jit.load({str(tmp_path / TORCHSCRIPT_FILE)!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"want = torch.load({str(tmp_path / 'want.pt')!r})\n"
        "assert m(x).shape == (5, 10) and torch.allclose(m(x), want, atol=1e-5)\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
