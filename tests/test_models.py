import pytest
import torch
from torch import nn

from fedprune.data import INPUT_SHAPE, NUM_CLASSES
from fedprune.models import MODELS, build_model, count_parameters, prunable_names

# (model, data set) -> parameters; the paper's counts for its three models.
PARAMETERS = {
    ("conv2", "femnist"): 6_603_710,
    ("conv2", "mnist"): 6_497_162,
    ("vgg11", "cifar10"): 9_750_922,
    ("resnet18", "cifar10"): 11_173_962,
}
PAIRS = [*PARAMETERS, ("small-cnn", "cifar10"), ("resnet18", "mnist")]


def _build(name, dataset, seed=None):
    return build_model(name, NUM_CLASSES[dataset], seed=seed, input_shape=INPUT_SHAPE[dataset])


@pytest.mark.parametrize(("name", "dataset"), list(PARAMETERS))
def test_parameter_counts_are_the_papers(name, dataset):
    assert count_parameters(_build(name, dataset)) == PARAMETERS[name, dataset]


@pytest.mark.parametrize(("name", "dataset"), PAIRS)
def test_forward_pass_takes_the_data_sets_images(name, dataset):
    model = _build(name, dataset, seed=0)
    x = torch.rand(2, *INPUT_SHAPE[dataset])
    model.train()
    assert model(x).shape == (2, NUM_CLASSES[dataset])
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_models_state_is_its_parameters(name):
    # The wire carries parameters only: a buffer (batch norm's running statistics) would
    # be lost on the way and break load_state_dict on the other side.
    model = _build(name, "cifar10")
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}


def test_prunable_weights_are_conv_and_linear_weights_only():
    vgg = _build("vgg11", "cifar10")
    names = prunable_names(vgg)
    assert len(names) == 11 and names[-1] == "classifier.4.weight"  # 8 conv, 3 linear
    resnet = _build("resnet18", "cifar10")
    names = prunable_names(resnet)
    # stem, 16 convs in the residual blocks, 3 downsampling 1x1 convs, fc
    assert len(names) == 21 and names[0] == "conv1.weight" and names[-1] == "fc.weight"
    modules = dict(resnet.named_modules())
    assert all(isinstance(modules[n.rsplit(".", 1)[0]], nn.Conv2d | nn.Linear) for n in names)
    assert not any(".bn" in n or "downsample.1" in n for n in names)


def test_resnet18_is_the_cifar_variant():
    model = _build("resnet18", "cifar10")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)


def test_seeded_models_are_reproducible():
    a, b = _build("vgg11", "cifar10", seed=3), _build("vgg11", "cifar10", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_vgg11_refuses_images_it_would_pool_away():
    with pytest.raises(ValueError, match="32x32"):
        _build("vgg11", "mnist")
