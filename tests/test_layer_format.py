"""The default path: each layer's training format follows the node's measurement
(`layer-format`), pruned weights stay exactly 0 in every format, and the node says once
when the compiled kernels do not run."""

import logging

import pytest
import torch
from flwr.app import ConfigRecord

import clients.client_app as client_app
from fedprune import kernels
from fedprune import protocol as P
from fedprune.masks import full_masks
from fedprune.models import build_model
from fedprune.profiler import sparse_crossovers
from fedprune.replies import FORMAT_CODES, ReplyError, layer_formats
from fedprune.settings import Settings, SettingsError
from fedprune.sparse import FORMATS, choose_formats, compact_formats, train_sparse
from fedprune.sparse_conv import sparse_conv_available
from tests.test_sparse_conv import toy_data

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")

NAMES = ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight")


def masks_at(model, densities, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, full in full_masks(model).items():
        masks[name] = torch.rand(full.shape, generator=g) < densities[name]
    return masks


def measurements_with(crossovers: dict) -> dict:
    """A measurement dict as `profile_device` writes it, for these layers only."""
    out = {"layers": list(NAMES)}
    for name in NAMES:
        fmt, density = crossovers.get(name, ("none", 0.0))
        out[f"{name}/sparse_format"] = fmt
        out[f"{name}/sparse_max_density"] = density
    return out


def test_measured_formats_follow_each_layers_crossover_and_density():
    model = build_model("small-cnn", seed=0)
    # The default run's final mask: conv1 0.76, conv2 0.18, fc1 0.039, fc2 0.59.
    masks = masks_at(
        model, {"conv1.weight": 0.76, "conv2.weight": 0.18, "fc1.weight": 0.039, "fc2.weight": 0.59}
    )
    measured = measurements_with(
        {
            "conv1.weight": ("sparse-conv", 0.3),  # 0.76 above it: dense
            "conv2.weight": ("sparse-conv", 0.25),  # 0.18 below: sparse
            "fc1.weight": ("csr", 0.28),
            # fc2: no sparse format measured (a layer the profile could not time sparse)
        }
    )
    crossovers = sparse_crossovers(measured)
    assert set(crossovers) == {"conv1.weight", "conv2.weight", "fc1.weight"}
    conv = "sparse-conv" if sparse_conv_available() else "dense"
    chosen = choose_formats(model, masks, "measured", crossovers)
    assert chosen == {
        "conv1.weight": "dense",
        "conv2.weight": conv,
        "fc1.weight": "csr",
        "fc2.weight": "dense",
    }
    assert compact_formats(chosen) == f"conv1:dense,conv2:{conv},fc1:csr,fc2:dense"
    # A crossover of 0.0 (the sparse format never won) keeps the layer dense at any density.
    never = sparse_crossovers(measurements_with({"fc1.weight": ("csr", 0.0)}))
    assert choose_formats(model, masks, "measured", never)["fc1.weight"] == "dense"
    # A format measured for another layer type (a profile that does not fit): dense.
    wrong = sparse_crossovers(measurements_with({"fc1.weight": ("sparse-conv", 1.0)}))
    assert choose_formats(model, masks, "measured", wrong)["fc1.weight"] == "dense"
    # Forced formats ignore the measurement.
    assert choose_formats(model, masks, "dense", crossovers) == dict.fromkeys(NAMES, "dense")
    assert choose_formats(model, masks, "sparse") == {
        "conv1.weight": conv,
        "conv2.weight": conv,
        "fc1.weight": "csr",
        "fc2.weight": "csr",
    }
    with pytest.raises(ValueError, match="crossovers"):
        choose_formats(model, masks, "measured")
    with pytest.raises(ValueError, match="unknown layer format"):
        choose_formats(model, masks, "fastest", crossovers)


def test_the_old_sparse_training_key_names_its_replacement():
    assert Settings().layer_format == "measured"
    for value in (True, False):
        with pytest.raises(SettingsError, match="'layer-format' replaces it") as info:
            Settings.from_run_config({"sparse-training": value})
        assert "'sparse-training'" in str(info.value)
    with pytest.raises(SettingsError, match="'layer-format'"):
        Settings.from_run_config({"layer-format": "csr"})
    assert Settings.from_run_config({"layer-format": "sparse"}).layer_format == "sparse"


@pytest.mark.parametrize("layer_format", ["dense", "sparse", "mixed"])
@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 1e-3)])
def test_pruned_weights_stay_exactly_zero_in_every_format(layer_format, momentum, weight_decay):
    model = build_model("small-cnn", seed=1)
    masks = masks_at(model, dict.fromkeys(NAMES, 0.2), seed=1)
    # Pruned weights that arrive nonzero (a server that sent them so) are zeroed too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.add_(0.01)
    if layer_format == "mixed":
        formats = {"conv1.weight": "dense", "conv2.weight": "sparse-conv", "fc1.weight": "csr",
                   "fc2.weight": "dense"}  # fmt: skip
    else:
        formats = choose_formats(model, masks, layer_format)
    result = train_sparse(
        model, masks, toy_data(), steps=3, batch_size=8, lr=0.5, momentum=momentum,
        weight_decay=weight_decay, generator=torch.Generator().manual_seed(0),
        track_importance=True, formats=formats,
    )  # fmt: skip
    expected = dict(formats)
    if not sparse_conv_available():
        expected = {n: "dense" if f == "sparse-conv" else f for n, f in expected.items()}
    assert result.formats == expected
    params = dict(model.named_parameters())
    assert set(params) >= set(NAMES)  # converted back: the model's own parameters
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0.0), name
        assert torch.count_nonzero(params[name][mask]) == mask.sum(), name  # kept ones train
        assert result.importance[name][~mask].abs().sum() > 0, name  # grow-back scores


def test_a_node_without_the_kernels_says_so_once_and_trains_convolutions_dense(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_availability", {"checked": False, "ok": False, "reason": None})
    monkeypatch.setattr(kernels, "_self_test", lambda: "numba does not import: test")
    monkeypatch.setattr(kernels, "_passed_before", lambda: False)  # not a pass kept on disk
    monkeypatch.setattr(client_app, "_said_unavailable", False)
    model = build_model("small-cnn", seed=0)
    masks = masks_at(model, dict.fromkeys(NAMES, 0.05))
    context = type("Ctx", (), {})()
    context.state = {P.STATE_PROFILE: ConfigRecord(measurements_with(
        {"conv2.weight": ("sparse-conv", 0.3), "fc1.weight": ("csr", 0.3)}
    ))}  # fmt: skip
    settings = Settings(model="small-cnn")
    with caplog.at_level(logging.WARNING):
        first = client_app.layer_formats(settings, context, model, masks)
        second = client_app.layer_formats(settings, context, model, masks)
    said = [r for r in caplog.records if "sparse convolutions unavailable" in r.getMessage()]
    assert len(said) == 1 and "numba does not import: test" in said[0].getMessage()
    assert said[0].levelno == logging.WARNING
    assert (
        first
        == second
        == {
            "conv1.weight": "dense",
            "conv2.weight": "dense",
            "fc1.weight": "csr",
            "fc2.weight": "dense",
        }
    )


def test_the_servers_reading_of_a_replys_formats_is_bounded():
    assert FORMAT_CODES == FORMATS
    names = list(NAMES)
    assert layer_formats({}, names) is None
    assert layer_formats({P.LAYER_FORMATS: [0, 2, 1, 0]}, names) == {
        "conv1.weight": "dense",
        "conv2.weight": "sparse-conv",
        "fc1.weight": "csr",
        "fc2.weight": "dense",
    }
    for bad in ([0, 1, 2], [0, 1, 2, 3], [0, 1, 2, -1], [0, 1, True, 0], 7, [0.0, 1, 2, 0]):
        with pytest.raises(ReplyError, match=P.LAYER_FORMATS):
            layer_formats({P.LAYER_FORMATS: bad}, names)
