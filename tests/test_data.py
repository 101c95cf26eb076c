"""The split of every data set, and local image data sets of any class count and shape."""

import hashlib
import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from clients.partitions import _partitioner, client_partition
from clients.prepare_data import prepare
from fedprune.data import (
    DataSpec,
    client_pool,
    data_shape,
    heldout_split,
    load_folder,
    server_share,
    split_indices,
)
from fedprune.masks import full_masks
from fedprune.models import build_model, prunable_names
from fedprune.settings import Settings, SettingsError
from fedprune.sources import DataSourceError
from fedprune.training import train_masked
from tests.image_folders import write_image_folder


@pytest.fixture(scope="module", autouse=True)
def _private_hf_cache(tmp_path_factory):
    # load_dataset copies image folders into the datasets cache: keep it private.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-cache"))
        datasets.disable_progress_bars()
        yield


# ---------------------------------------------------------------- the embedded digits


def test_splits_are_disjoint_and_cover_the_data():
    spec = DataSpec(seed=3)
    test, server, clients = split_indices(spec)
    assert len(test) == 1000 and len(server) == 400 and len(clients) == 3600
    union = np.concatenate([test, server, clients])
    assert len(np.unique(union)) == 5000
    assert len(heldout_split(spec)) == 1000 and len(server_share(spec)) == 400


def _digest(t) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


# sha256 prefixes of (test x, test y, server x, server y, client pool rows) for seeds 0
# and 3, computed with fedprune/data.py of commit f3749d8, before sources were split off.
BEFORE = {
    0: ("38ac2dd376f6817e", "6d851cbff5fa6b6a", "9009cb9f918564aa", "40bedb589712914e"),
    3: ("515998230c40bae1", "25d8bb36578f4e81", "107b928bbe6eca04", "323edc1b9b6050cf"),
}
POOL_BEFORE = {0: "adb78b08e3bb8614", 3: "8b4e385a3e0fec04"}


@pytest.mark.parametrize("seed", sorted(BEFORE))
def test_the_mnist_split_is_the_same_as_before(seed):
    spec = DataSpec(seed=seed)
    test, share = heldout_split(spec), server_share(spec)
    assert (_digest(test.x), _digest(test.y), _digest(share.x), _digest(share.y)) == BEFORE[seed]
    pool = client_pool(spec)[0]["index"]
    assert hashlib.sha256(pool.tobytes()).hexdigest()[:16] == POOL_BEFORE[seed]
    assert data_shape(spec) == (10, (1, 28, 28))


def test_images_are_real_digits_in_unit_range():
    data = heldout_split(DataSpec())
    assert data.x.shape[1:] == (1, 28, 28) and data.x.dtype == torch.float32
    assert float(data.x.min()) >= 0.0 and float(data.x.max()) <= 1.0
    assert set(data.y.unique().tolist()) == set(range(10))


def test_editing_examples_leaves_the_cached_split_alone():
    spec = DataSpec()
    heldout_split(spec).y.fill_(-1)
    assert int(heldout_split(spec).y.min()) == 0


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shards"])
def test_client_partitions_are_disjoint_and_drawn_from_the_client_pool(partitioner):
    spec = DataSpec(partitioner=partitioner, dirichlet_alpha=0.3)
    test, server, pool = split_indices(spec)
    partitioner_ = _partitioner(spec, 5)
    parts = [np.asarray(partitioner_.load_partition(i)["index"]) for i in range(5)]
    everything = np.concatenate(parts)
    assert len(everything) == len(np.unique(everything)) == len(pool)
    assert set(everything) == set(pool)
    assert not set(everything) & (set(test) | set(server))
    sizes = [len(client_partition(spec, i, 5)) for i in range(5)]
    assert sizes == [len(p) for p in parts]


def test_iid_partitions_hold_every_class_and_non_iid_ones_do_not():
    iid = client_partition(DataSpec(partitioner="iid"), 0, 10)
    assert len(iid.y.unique()) == 10
    shards = client_partition(DataSpec(partitioner="shards", shards_per_client=2), 0, 10)
    assert len(shards.y.unique()) <= 3


def test_partition_id_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="partition-id 10"):
        client_partition(DataSpec(), 10, 10)


# ------------------------------------------------------------ local image folders


@pytest.fixture(scope="module")
def gray(tmp_path_factory):
    """10 classes of 28x28 grayscale, 20 training and 5 test images each."""
    return write_image_folder(tmp_path_factory.mktemp("gray"), 10, (1, 28, 28), 20, True)


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    """3 named classes of 64x64 RGB, 20 images each, no test split."""
    path = tmp_path_factory.mktemp("colour")
    return write_image_folder(path, 3, (3, 64, 64), 20, False, numbered=False)


def test_a_grayscale_folder_with_a_test_split(gray):
    spec = DataSpec(dataset="local", source=str(gray), seed=1)
    assert data_shape(spec) == (10, (1, 28, 28))
    test, server, pool = split_indices(spec)
    assert len(test) == 0  # the folder's own test split is the test split
    held = heldout_split(spec)
    assert held.x.shape == (50, 1, 28, 28) and held.y.bincount().tolist() == [5] * 10
    share = server_share(spec)
    assert len(share) == len(server) == 20 and len(pool) == 180  # 10 % of 200
    # Numbered class folders keep their numbers: "3/0.png" is a 3.
    want = np.asarray(PILImage.open(gray / "test" / "3" / "0.png"), dtype=np.float32) / 255
    matches = [i for i in range(len(held)) if np.array_equal(held.x[i, 0].numpy(), want)]
    assert len(matches) == 1 and int(held.y[matches[0]]) == 3


def test_a_colour_folder_without_a_test_split_uses_test_fraction(colour):
    spec = DataSpec(dataset="local", source=str(colour), test_fraction=0.25)
    assert data_shape(spec) == (3, (3, 64, 64))
    test, server, pool = split_indices(spec)
    assert (len(test), len(server), len(pool)) == (15, 4, 41)  # 60 images
    held = heldout_split(spec)
    assert held.x.shape == (15, 3, 64, 64) and held.x.dtype == torch.float32
    assert float(held.x.min()) >= 0.0 and float(held.x.max()) <= 1.0
    assert set(held.y.tolist()) <= {0, 1, 2}
    parts = [client_partition(spec, i, 3) for i in range(3)]
    assert sum(map(len, parts)) == 41 and all(p.x.shape[1:] == (3, 64, 64) for p in parts)


@pytest.mark.parametrize("which", ["gray", "colour"])
@pytest.mark.parametrize("name", ["small-cnn", "conv2"])
def test_the_model_is_built_to_fit_the_folder(which, name, request):
    spec = DataSpec(dataset="local", source=str(request.getfixturevalue(which)))
    num_classes, input_shape = data_shape(spec)
    model = build_model(name, num_classes, seed=0, input_shape=input_shape)
    assert model.fc2.out_features == num_classes and model.conv1.in_channels == input_shape[0]
    batch = server_share(spec)
    assert model(batch.x).shape == (len(batch), num_classes)


def test_partitions_of_a_folder_come_through_flwr_datasets(colour):
    spec = DataSpec(dataset="local", source=str(colour), partitioner="dirichlet", seed=2)
    test, server, pool = split_indices(spec)
    partitioner = _partitioner(spec, 4)
    parts = [np.asarray(partitioner.load_partition(i)["index"]) for i in range(4)]
    assert sorted(np.concatenate(parts).tolist()) == sorted(pool.tolist())
    assert not set(pool) & (set(test) | set(server))


def test_mnist_takes_a_local_source_with_its_own_test_split(gray):
    spec = DataSpec(dataset="mnist", source=str(gray))
    assert data_shape(spec) == (10, (1, 28, 28))
    assert len(heldout_split(spec)) == 50 and len(server_share(spec)) == 20
    assert Settings.from_run_config({"data-source": str(gray)}).data_spec() == spec


def test_prepared_folders_of_a_local_source_record_its_shape(colour, tmp_path):
    spec = DataSpec(dataset="local", source=str(colour))
    folders = prepare(tmp_path, 2, spec)
    meta = json.loads((folders[0] / "meta.json").read_text())
    assert meta["num-classes"] == 3 and meta["input-shape"] == [3, 64, 64]
    # A device with only its folder learns the model's shape from it, not the source.
    device_spec = DataSpec(dataset="local")
    assert data_shape(device_spec, str(folders[0])) == (3, (3, 64, 64))
    got = load_folder(str(folders[1]), *data_shape(device_spec, str(folders[1])))
    want = client_partition(spec, 1, 2)
    assert torch.equal(got.x, want.x) and torch.equal(got.y, want.y)
    (folders[0] / "meta.json").unlink()
    with pytest.raises(DataSourceError, match="num-classes"):
        data_shape(device_spec, str(folders[0] / "data.npz"))


def test_the_server_can_take_its_data_from_its_own_source(gray, colour):
    s = Settings.from_run_config(
        {"dataset": "local", "data-source": str(colour), "server-data-source": str(gray)}
    )
    assert s.data_spec().source == str(colour) and s.server_data_spec().source == str(gray)
    assert data_shape(s.server_data_spec()) == (10, (1, 28, 28))
    same = Settings.from_run_config({"dataset": "local", "data-source": str(colour)})
    assert same.server_data_spec() == same.data_spec()
    with pytest.raises(SettingsError, match="'data-source'"):
        Settings.from_run_config({"dataset": "local"})


def test_a_model_given_by_import_path_trains_on_a_colour_folder(colour):
    spec = DataSpec(dataset="local", source=str(colour))
    num_classes, input_shape = data_shape(spec)
    model = build_model("tests.tiny_model:build", num_classes, seed=0, input_shape=input_shape)
    assert prunable_names(model) == ["0.weight", "5.weight"]
    masks = full_masks(model)
    masks["5.weight"] = torch.rand(masks["5.weight"].shape) < 0.5
    with torch.no_grad():
        model.get_parameter("5.weight").mul_(masks["5.weight"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = client_partition(spec, 0, 2)
    result = train_masked(
        model, masks, data, steps=1, batch_size=8, lr=0.1, generator=torch.Generator()
    )
    assert result.steps == 1 and np.isfinite(result.loss)
    weight = model.get_parameter("5.weight")
    assert not torch.equal(weight, before["5.weight"])  # kept weights trained
    assert torch.all(weight[~masks["5.weight"]] == 0)  # pruned ones stayed 0
    assert set(result.importance) == set(before)


# ----------------------------------------------------------------------- bad data


def test_unreadable_sources_name_the_key_and_the_formats(tmp_path):
    (tmp_path / "notes.txt").write_text("not images")
    for source in (tmp_path / "nowhere", tmp_path / "notes.txt"):
        with pytest.raises(DataSourceError, match="data-source") as info:
            data_shape(DataSpec(dataset="local", source=str(source)))
        assert "image folder" in str(info.value)


def test_a_single_class_is_too_few(tmp_path):
    write_image_folder(tmp_path / "folder", 1, (1, 8, 8), 4)
    one_class = datasets.Dataset.from_dict(
        {"image": [PILImage.new("L", (8, 8))] * 3, "label": [0, 0, 0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    one_class.save_to_disk(tmp_path / "saved")
    for source in ("folder", "saved"):
        with pytest.raises(DataSourceError, match="at least 2 class"):
            data_shape(DataSpec(dataset="local", source=str(tmp_path / source)))


def test_images_of_several_sizes_are_refused_with_the_fix(tmp_path):
    write_image_folder(tmp_path, 2, (3, 16, 16), 10)
    PILImage.new("RGB", (20, 16)).save(tmp_path / "train" / "1" / "odd.png")
    spec = DataSpec(dataset="local", source=str(tmp_path), test_fraction=0.5)
    with pytest.raises(DataSourceError, match=r"must all be .*several sizes.*resize"):
        heldout_split(spec), server_share(spec), client_partition(spec, 0, 1)


def test_a_named_data_set_refuses_images_or_labels_that_do_not_fit(tmp_path):
    write_image_folder(tmp_path / "big", 10, (1, 32, 32), 2)
    with pytest.raises(DataSourceError, match=r"28x28.*dataset = 'local'"):
        server_share(DataSpec(dataset="mnist", source=str(tmp_path / "big"), server_fraction=0.5))
    write_image_folder(tmp_path / "many", 12, (1, 28, 28), 1)
    assert data_shape(DataSpec(dataset="local", source=str(tmp_path / "many")))[0] == 12
    with pytest.raises(DataSourceError, match=r"\[0, 10\).*dataset = 'local'"):
        heldout_split(DataSpec(dataset="mnist", source=str(tmp_path / "many")))


def test_fedprune_modules_import_each_other_without_a_cycle():
    # Function-level imports count too: a lazy import that closes a circle is still one.
    import ast
    import graphlib
    from pathlib import Path

    import fedprune

    graph = {}
    for file in Path(fedprune.__file__).parent.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedprune"):
                if node.module == "fedprune":
                    deps |= {f"fedprune.{a.name}" for a in node.names}
                else:
                    deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("fedprune")}
        graph[f"fedprune.{file.stem}"] = deps
    assert graph["fedprune.sources"] == set() and graph["fedprune.data"] == {"fedprune.sources"}
    list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a circle


def test_a_node_makes_its_partition_once_and_holds_its_rows(monkeypatch):
    """A deployed node's every message is a fresh process: the partition's rows are kept in
    the node's state, and only a different split makes them again."""
    from flwr.app import Context, RecordDict

    import clients.client_app as client_app
    from fedprune.settings import Settings

    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 1, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )
    settings = Settings.from_run_config({})
    first = client_app.local_data(settings, context)
    assert first.x.equal(client_partition(settings.data_spec(), 1, 3).x)
    made = []
    monkeypatch.setattr(
        client_app, "partition_rows", lambda *a: made.append(a) or np.arange(5, dtype=np.int64)
    )
    again = client_app.local_data(settings, context)
    assert made == [] and again.x.equal(first.x) and again.y.equal(first.y)
    other = Settings.from_run_config({"partitioner": "dirichlet"})
    assert len(client_app.local_data(other, context)) == 5 and len(made) == 1
