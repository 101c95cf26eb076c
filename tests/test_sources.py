"""FEMNIST and CIFAR-10 sources: loading, splitting, partitioning, on tiny look-alikes.

No test touches the network: local sources are written to temporary folders, and the hub
path is only checked for failing fast with advice on local sources.
"""

import os
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

from clients.partitions import _partitioner, client_partition
from fedprune import sources
from fedprune.costs import named_profile
from fedprune.data import (
    DataSpec,
    data_shape,
    heldout_split,
    server_share,
    split_indices,
    split_rows,
)
from fedprune.models import build_model, output_positions, prunable_names
from fedprune.settings import Settings, SettingsError
from fedprune.sources import KNOWN, DataSourceError, load_splits, open_source

ROOT = Path(__file__).resolve().parent.parent
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer"]
CIFAR_NAMES += ["dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module", autouse=True)
def _private_hf_cache(tmp_path_factory):
    # load_dataset copies parquet and image folders into the datasets cache: keep it private.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-cache"))
        datasets.disable_progress_bars()
        yield


def femnist_like(seed=0):
    """24 writers with 5..11 examples each: 28x28 grayscale, `character` 0..61, writer_id."""
    rng = np.random.default_rng(seed)
    writers = [f"f{w:04d}_{w % 3:02d}" for w in range(24) for _ in range(5 + w % 7)]
    pixels = rng.integers(0, 256, (len(writers), 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 62, len(writers)).tolist()
    features = Features(
        {"image": Image(), "writer_id": Value("string"), "character": ClassLabel(num_classes=62)}
    )
    ds = Dataset.from_dict(
        {
            "image": [PILImage.fromarray(p, "L") for p in pixels],
            "writer_id": writers,
            "character": labels,
        },
        features=features,
    )
    return ds, pixels, np.array(labels), np.array(writers)


def cifar_like(n_train=120, n_test=30, seed=1):
    """`img` 32x32 RGB and `label` with CIFAR-10's class names, train and test splits."""
    rng = np.random.default_rng(seed)
    features = Features({"img": Image(), "label": ClassLabel(names=CIFAR_NAMES)})
    splits, raw = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        pixels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % 10)  # every class present
        images = [PILImage.fromarray(p, "RGB") for p in pixels]
        splits[split] = Dataset.from_dict(
            {"img": images, "label": labels.tolist()}, features=features
        )
        raw[split] = (pixels, labels)
    return DatasetDict(splits), raw


@pytest.fixture(scope="module")
def femnist(tmp_path_factory):
    ds, pixels, labels, writers = femnist_like()
    folder = tmp_path_factory.mktemp("femnist") / "saved"
    DatasetDict({"train": ds}).save_to_disk(folder)
    return folder, pixels, labels, writers


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    dd, raw = cifar_like()
    folder = tmp_path_factory.mktemp("cifar") / "saved"
    dd.save_to_disk(folder)
    return folder, raw


# ------------------------------------------------------------------------- splits


def test_femnist_test_split_is_a_fixed_share_of_each_writer():
    writers = np.repeat(np.arange(12), np.arange(1, 13))  # writer w has w + 1 examples
    test, server, clients = split_rows(
        len(writers), writers, has_test=False, test_fraction=0.25, server_fraction=0.2, seed=4
    )
    everything = np.concatenate([test, server, clients])
    assert len(everything) == len(np.unique(everything)) == len(writers)
    counts = np.bincount(writers)
    held = np.bincount(writers[test], minlength=12)
    expected = np.minimum(np.floor(counts * 0.25 + 0.5), np.maximum(counts - 1, 0))
    assert held.tolist() == expected.tolist()  # a writer always keeps a training example
    server_writers, client_writers = set(writers[server]), set(writers[clients])
    assert len(server_writers) == round(12 * 0.2) and not server_writers & client_writers
    assert server_writers | client_writers == set(range(12))
    again = split_rows(
        len(writers), writers, has_test=False, test_fraction=0.25, server_fraction=0.2, seed=4
    )
    assert all(np.array_equal(a, b) for a, b in zip(again, (test, server, clients), strict=True))
    other = split_rows(
        len(writers), writers, has_test=False, test_fraction=0.25, server_fraction=0.2, seed=5
    )
    assert not np.array_equal(other[0], test)


def test_femnist_clients_are_groups_of_whole_writers(femnist):
    folder, pixels, labels, writers = femnist
    spec = DataSpec(dataset="femnist", source=str(folder), partitioner="writers", test_fraction=0.2)
    test, server, pool = split_indices(spec)
    partitioner = _partitioner(spec, 4)
    parts = [np.asarray(partitioner.load_partition(i)["index"]) for i in range(4)]
    everything = np.concatenate(parts)
    assert len(everything) == len(np.unique(everything)) == len(pool)
    assert set(everything) == set(pool)
    assert not set(everything) & (set(test) | set(server))
    groups = [set(writers[p]) for p in parts]
    assert all(groups) and sum(len(g) for g in groups) == len(set().union(*groups))
    assert not set().union(*groups) & set(writers[server])
    for i, rows in enumerate(parts):
        local = client_partition(spec, i, 4)
        assert local.x.shape == (len(rows), 1, 28, 28) and local.x.dtype == torch.float32
        assert torch.equal(local.y, torch.from_numpy(labels[rows]))
        assert torch.equal(
            torch.round(local.x[:, 0] * 255).to(torch.uint8), torch.from_numpy(pixels[rows])
        )
    assert len(heldout_split(spec)) == len(test) and len(server_share(spec)) == len(server)


def test_writers_that_cannot_make_exact_client_groups_are_an_error(femnist):
    folder = femnist[0]
    spec = DataSpec(dataset="femnist", source=str(folder), partitioner="writers")
    n = len(set(femnist[3][split_indices(spec)[2]]))  # 22 client writers
    assert _partitioner(spec, n).num_partitions == n  # one writer each
    with pytest.raises(ValueError, match="cannot be grouped"):
        _partitioner(spec, 10)
    with pytest.raises(ValueError, match="at least"):
        _partitioner(spec, n + 1)


def test_femnist_can_also_be_split_iid_over_its_client_writers(femnist):
    spec = DataSpec(dataset="femnist", source=str(femnist[0]), partitioner="iid")
    sizes = [len(client_partition(spec, i, 3)) for i in range(3)]
    assert sum(sizes) == len(split_indices(spec)[2]) and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_cifar_partitions_are_disjoint_from_each_other_and_the_server(cifar, partitioner):
    folder, raw = cifar
    spec = DataSpec(
        dataset="cifar10", source=str(folder), partitioner=partitioner, dirichlet_alpha=0.1
    )
    test, server, pool = split_indices(spec)
    assert len(test) == 0 and len(server) == 12 and len(pool) == 108  # own test split
    partitioner_ = _partitioner(spec, 4)
    parts = [np.asarray(partitioner_.load_partition(i)["index"]) for i in range(4)]
    everything = np.concatenate(parts)
    assert len(everything) == len(np.unique(everything)) == len(pool)
    assert set(everything) == set(pool) and not set(everything) & set(server)
    top_share = max(np.bincount(raw["train"][1][p]).max() / len(p) for p in parts)
    if partitioner == "dirichlet":
        assert top_share > 0.4  # alpha 0.1: some client is dominated by one class
    else:
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_cifar_uses_its_own_test_split_and_standardises_pixels(cifar):
    folder, raw = cifar
    spec = DataSpec(dataset="cifar10", source=str(folder))
    test = heldout_split(spec)
    pixels, labels = raw["test"]
    assert test.x.shape == (30, 3, 32, 32) and test.x.dtype == torch.float32
    assert torch.equal(test.y, torch.from_numpy(labels))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in KNOWN["cifar10"].standardise)
    restored = torch.round((test.x * std + mean) * 255).to(torch.uint8)
    assert torch.equal(restored, torch.from_numpy(pixels).permute(0, 3, 1, 2))
    share = server_share(spec)
    assert len(share) == 12 and share.x.shape[1:] == (3, 32, 32)


# ------------------------------------------------------------------ local sources


def _write_source(kind, folder: Path):
    ds, pixels, labels, writers = femnist_like(seed=2)
    if kind == "save_to_disk-dict":
        DatasetDict({"train": ds}).save_to_disk(folder)
    elif kind == "save_to_disk-dataset":
        ds.save_to_disk(folder)
    elif kind == "parquet-folder":
        folder.mkdir()
        ds.to_parquet(folder / "train-00000-of-00001.parquet")
    elif kind == "parquet-file":
        folder.mkdir()
        folder = folder / "femnist.parquet"
        ds.to_parquet(folder)
    elif kind == "imagefolder":
        (folder / "train").mkdir(parents=True)
        lines = ["file_name,label,writer_id"]
        for i, (p, y, w) in enumerate(zip(pixels, labels, writers, strict=True)):
            PILImage.fromarray(p, "L").save(folder / "train" / f"{i:04d}.png")
            lines.append(f"{i:04d}.png,{y},{w}")
        (folder / "train" / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder, pixels, labels, writers


@pytest.mark.parametrize(
    "kind",
    ["save_to_disk-dict", "save_to_disk-dataset", "parquet-folder", "parquet-file", "imagefolder"],
)
def test_every_local_source_gives_the_same_femnist(kind, tmp_path):
    source, pixels, labels, _ = _write_source(kind, tmp_path / "src")
    splits = load_splits("femnist", str(source))
    assert list(splits) == ["train"] and splits["train"].num_rows == len(labels)
    spec = DataSpec(dataset="femnist", source=str(source), partitioner="writers")
    parts = [client_partition(spec, i, 2) for i in range(2)]
    data = [heldout_split(spec), server_share(spec), *parts]
    assert sum(len(d) for d in data) == len(labels)
    # Same examples whatever the format: compare (label, pixels) as a multiset.
    got = sorted(
        (int(y), bytes(torch.round(x * 255).to(torch.uint8).numpy()))
        for d in data
        for x, y in zip(d.x, d.y, strict=True)
    )
    want = sorted((int(y), bytes(p[None])) for p, y in zip(pixels, labels, strict=True))
    assert got == want


def test_cifar_image_folder_with_class_folders_and_a_test_split(tmp_path):
    _, raw = cifar_like(n_train=20, n_test=10)
    for split, (pixels, labels) in raw.items():
        for i, (p, y) in enumerate(zip(pixels, labels, strict=True)):
            folder = tmp_path / split / CIFAR_NAMES[y]
            folder.mkdir(parents=True, exist_ok=True)
            PILImage.fromarray(p, "RGB").save(folder / f"{i}.png")
    splits = load_splits("cifar10", str(tmp_path))
    assert sorted(splits) == ["test", "train"]
    # Class folders sort alphabetically, which is CIFAR-10's label order.
    assert splits["train"].features["label"].names == CIFAR_NAMES
    test = heldout_split(DataSpec(dataset="cifar10", source=str(tmp_path)))
    assert sorted(test.y.tolist()) == sorted(raw["test"][1].tolist())


def test_integer_class_folders_keep_their_numbers(tmp_path):
    rng = np.random.default_rng(3)
    for y in (0, 3, 9):  # class indices 0, 1, 2; the labels are the folder names
        (tmp_path / "train" / str(y)).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            PILImage.fromarray(pixels, "RGB").save(tmp_path / "train" / str(y) / f"{i}.png")
    src = open_source("cifar10", str(tmp_path))
    assert sorted(src.labels["train"].tolist()) == [0, 0, 3, 3, 9, 9]
    # Sorted as text, "10" < "11" < "2": the names, not the positions, are the labels.
    assert sources._label_ids(ClassLabel(names=["10", "11", "2"])).tolist() == [10, 11, 2]
    assert sources._label_ids(ClassLabel(names=CIFAR_NAMES)) is None


def test_a_bad_local_source_says_what_is_wrong(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        load_splits("cifar10", str(tmp_path / "nowhere"))
    small = Dataset.from_dict(
        {"img": [PILImage.new("RGB", (16, 16))] * 3, "label": [0, 1, 2]},
        features=Features({"img": Image(), "label": Value("int64")}),
    )
    small.save_to_disk(tmp_path / "small")
    with pytest.raises(DataSourceError, match="32x32"):
        heldout_split(DataSpec(dataset="cifar10", source=str(tmp_path / "small")))
    no_writers = femnist_like()[0].remove_columns("writer_id")
    no_writers.save_to_disk(tmp_path / "nowriters")
    with pytest.raises(DataSourceError, match="writer_id"):
        server_share(DataSpec(dataset="femnist", source=str(tmp_path / "nowriters")))


# --------------------------------------------------------------- the hub, offline


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_hub_fails_fast_and_points_to_local_sources(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    with pytest.raises(DataSourceError) as info:
        load_splits("femnist", "", hub_timeout_s=2.0)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "flwrlabs/femnist" in message and "save_to_disk" in message
    assert "data-source" in message


def test_offline_mode_fails_fast_in_a_fresh_process(tmp_path):
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"),
        FLWR_TELEMETRY_ENABLED="0",
    )
    code = "from fedprune.data import DataSpec, server_share; server_share(DataSpec('cifar10'))"
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - start < 30  # imports included; the hub part is instant
    assert result.returncode != 0
    assert "DataSourceError" in result.stderr and "uoft-cs/cifar10" in result.stderr
    assert "data-source" in result.stderr


# ------------------------------------------------------------ settings and presets


def test_settings_refuse_writers_and_sources_where_they_do_not_apply():
    with pytest.raises(SettingsError, match="'partitioner'"):
        Settings.from_run_config({"dataset": "cifar10", "partitioner": "writers"})
    # Every data set takes a data source now (mnist: e.g. the full 70,000 digits).
    assert Settings.from_run_config({"data-source": "/data/mnist"}).data_source == "/data/mnist"
    s = Settings.from_run_config(
        {"dataset": "femnist", "partitioner": "writers", "data-source": "/data/femnist"}
    )
    assert s.data_spec().source == "/data/femnist" and s.data_spec().partitioner == "writers"


PRESETS = sorted((ROOT / "experiments" / "presets").glob("*.toml"))
PAPER = {
    "femnist-conv2": ("femnist", "conv2", 0.25),
    "cifar10-vgg11": ("cifar10", "vgg11", 0.1),
    "cifar10-resnet18": ("cifar10", "resnet18", 0.1),
}


def test_presets_exist_for_each_paper_task():
    assert {p.stem for p in PRESETS} >= {"default", *PAPER}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_a_preset_is_valid_run_config(path):
    preset = tomllib.loads(path.read_text())
    preset.pop("harness", None)  # experiments.compare's own options
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(preset) <= set(pyproject["tool"]["flwr"]["app"]["config"])
    settings = Settings.from_run_config(preset)
    num_classes, input_shape = data_shape(settings.data_spec())
    model = build_model(settings.model, num_classes, input_shape=input_shape)
    # the profile fits the model
    named_profile(
        settings.cost_profile, prunable_names(model), output_positions(model, input_shape)
    )
    if path.stem not in PAPER:
        return
    # What `flwr run . --run-config <preset>.toml` does with it: no unknown key.
    from flwr.common.config import fuse_dicts, parse_config_args

    fuse_dicts(pyproject["tool"]["flwr"]["app"]["config"], parse_config_args([str(path)]))
    dataset, model_name, lr = PAPER[path.stem]
    assert (settings.dataset, settings.model, settings.learning_rate) == (dataset, model_name, lr)
    assert (settings.batch_size, settings.local_steps, settings.momentum) == (20, 5, 0.0)
    assert settings.reconfig_interval == 50 and settings.clients_per_round == 10
