import pytest
import torch
from torch import nn

from fedprune.data import DataSpec, data_shape
from fedprune.models import MODELS, build_model, count_parameters, prunable_names
from fedprune.settings import Settings, SettingsError

# (model, data set) -> parameters; the paper's counts for its three models.
PARAMETERS = {
    ("conv2", "femnist"): 6_603_710,
    ("conv2", "mnist"): 6_497_162,
    ("vgg11", "cifar10"): 9_750_922,
    ("resnet18", "cifar10"): 11_173_962,
}
PAIRS = [*PARAMETERS, ("small-cnn", "cifar10"), ("resnet18", "mnist")]


def _build(name, dataset, seed=None):
    num_classes, input_shape = data_shape(DataSpec(dataset=dataset))
    return build_model(name, num_classes, seed=seed, input_shape=input_shape)


@pytest.mark.parametrize(("name", "dataset"), list(PARAMETERS))
def test_parameter_counts_are_the_papers(name, dataset):
    assert count_parameters(_build(name, dataset)) == PARAMETERS[name, dataset]


@pytest.mark.parametrize(("name", "dataset"), PAIRS)
def test_forward_pass_takes_the_data_sets_images(name, dataset):
    model = _build(name, dataset, seed=0)
    num_classes, input_shape = data_shape(DataSpec(dataset=dataset))
    x = torch.rand(2, *input_shape)
    model.train()
    assert model(x).shape == (2, num_classes)
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


def test_the_named_data_sets_fix_classes_and_shape():
    assert data_shape(DataSpec(dataset="mnist")) == (10, (1, 28, 28))
    assert data_shape(DataSpec(dataset="femnist")) == (62, (1, 28, 28))
    assert data_shape(DataSpec(dataset="cifar10")) == (10, (3, 32, 32))


# ------------------------------------------------------------ a model by import path
TINY = "tests.tiny_model:build"


def test_a_model_by_import_path_is_built_for_the_data():
    model = build_model(TINY, 7, seed=1, input_shape=(3, 64, 64))
    assert model[-1].out_features == 7 and model[0].in_channels == 3
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 7)
    again = build_model(TINY, 7, seed=1, input_shape=(3, 64, 64))
    pairs = zip(model.parameters(), again.parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)
    assert Settings.from_run_config({"model": TINY, "cost-profile": "paper-uniform"}).model == TINY


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("resnet-9000", "one of .*import path"),
        ("tests.no_such_module:build", "cannot import module 'tests.no_such_module'"),
        ("tests.tiny_model:nothing", "has no 'nothing'"),
        ("tests.tiny_model:NOT_A_FACTORY", "not callable"),
        ("tests.tiny_model:", "import path"),
    ],
)
def test_a_model_that_cannot_be_used_is_refused_at_settings_time(model, message):
    with pytest.raises(SettingsError, match=message) as info:
        Settings.from_run_config({"model": model})
    assert "'model'" in str(info.value)


def test_a_user_model_with_buffers_or_the_wrong_output_is_refused():
    with pytest.raises(ValueError, match=r"running statistics.*track_running_stats=False"):
        build_model("tests.tiny_model:with_buffers", 10, input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match=r"2 images to \(2, 5\), not \(2, 10\)"):
        build_model("tests.tiny_model:five_outputs", 10, input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="fails to build as Linear"):
        build_model("torch.nn:Linear", 10, input_shape=(1, 28, 28))


def test_a_skeleton_takes_decoded_tensors_as_its_weights_without_a_copy():
    from fedprune.models import param_shapes, skeleton, with_parameters

    shell = skeleton("conv2", 10)
    assert all(p.is_meta for p in shell.parameters())  # no memory for initial weights
    real = build_model("conv2", 10, seed=3)
    assert param_shapes(shell) == param_shapes(real)
    params = {n: p.detach().clone() for n, p in real.named_parameters()}
    model = with_parameters(shell, params)
    for name, p in model.named_parameters():
        assert p.data_ptr() == params[name].data_ptr() and p.requires_grad, name
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(model(x), real(x))


@pytest.mark.parametrize("formats", ["dense", "sparse"])
def test_two_conv_nets_pooled_in_place_relu_trains_exactly_as_the_textbook_order(formats):
    """TwoConvNet pools its convolutions' outputs first and applies ReLU in place to the
    pooled tensors, to save work and activations; the parameters and importance after a
    local round are the bits of the textbook conv -> ReLU -> pool, masked dense and in the
    sparse formats."""
    import copy

    from fedprune.data import Examples
    from fedprune.masks import full_masks
    from fedprune.sparse import sparse_conv_available, train_sparse

    if formats == "sparse" and not sparse_conv_available():
        pytest.skip("the compiled kernels do not run here")

    def out_of_place(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))

    g = torch.Generator().manual_seed(0)
    data = Examples(
        torch.rand(60, 1, 28, 28, generator=g), torch.randint(0, 10, (60,), generator=g)
    )
    base = build_model("small-cnn", 10, seed=0)
    masks = {n: torch.rand(m.shape, generator=g) < 0.3 for n, m in full_masks(base).items()}
    chosen = {
        n: ("dense" if formats == "dense" else "sparse-conv" if m.dim() == 4 else "csr")
        for n, m in masks.items()
    }
    results = []
    for forward in (None, out_of_place):
        model = copy.deepcopy(base)
        if forward is not None:
            model.forward = forward.__get__(model)
        local = train_sparse(
            model, masks, data, steps=3, batch_size=20, lr=0.1, formats=chosen,
            generator=torch.Generator().manual_seed(1), track_importance=True,
        )  # fmt: skip
        results.append(({n: p.detach() for n, p in model.named_parameters()}, local.importance))
    (params, importance), (params_ref, importance_ref) = results
    assert all(torch.equal(params[n], params_ref[n]) for n in params_ref)
    assert all(torch.equal(importance[n], importance_ref[n]) for n in importance_ref)


def _pool_both(pool: nn.Module, features: torch.Tensor, upstream: torch.Tensor):
    x = features.clone().requires_grad_()
    y = pool(x)
    (y * upstream).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("route", ["kernels", "channels-last"])
@pytest.mark.parametrize("threads", [1, 2])
def test_max_pool_is_torchs_to_the_bit(threads, route, monkeypatch):
    """`fedprune.models.MaxPool2d` pools by the compiled kernels (or, where they do not
    run, by torch in channels-last memory; torch's NCHW kernel is many times slower): the
    same output and input gradient bits as `nn.MaxPool2d`, on real digits through
    Conv-2's conv1, where the blank background makes ties in most windows (so the choice
    among equal maxima is checked too), in NCHW and in channels-last memory."""
    from fedprune import kernels
    from fedprune.data import heldout_split
    from fedprune.models import MaxPool2d

    if route == "kernels" and not kernels.available():
        pytest.skip(f"the compiled kernels do not run here: {kernels.unavailable_reason()}")
    if route == "channels-last":
        monkeypatch.setattr(kernels, "available", lambda: False)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        digits = heldout_split(Settings.from_run_config({}).server_data_spec()).x[:40]
        conv1 = build_model("conv2", 10, seed=0).conv1
        with torch.no_grad():
            features = conv1(digits)
        assert features.is_contiguous()
        windows = features.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)
        ties = (windows == windows.amax(-1, keepdim=True)).sum(-1) > 1
        assert ties.float().mean() > 0.25  # the case that could differ

        upstream = torch.randn(
            features[:, :, ::2, ::2].shape, generator=torch.Generator().manual_seed(1)
        )
        for layout in (torch.contiguous_format, torch.channels_last):
            x = features.contiguous(memory_format=layout)
            want, want_grad = _pool_both(nn.MaxPool2d(2), x, upstream)
            got, got_grad = _pool_both(MaxPool2d(2), x, upstream)
            # the input's memory format out, as torch's: the next layer is unchanged
            assert got.is_contiguous(memory_format=layout)
            assert got_grad.is_contiguous(memory_format=layout)
            assert torch.equal(got, want)
            assert torch.equal(got_grad, want_grad)
    finally:
        torch.set_num_threads(before)


def test_max_pool_kernels_choose_as_torch_with_nan_infinity_and_odd_sizes():
    """Odd sizes (the last row and column are dropped, and get a zero gradient), windows
    of -inf only (the first position wins) and NaN (it wins, the last one if several),
    float32 and float64, both memory formats."""
    from fedprune import kernels
    from fedprune.models import MaxPool2d

    if not kernels.available():
        pytest.skip(f"the compiled kernels do not run here: {kernels.unavailable_reason()}")
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(3, 4, 7, 9, generator=g, dtype=dtype).round(decimals=1)
        x[0, 0, :2, :2] = float("-inf")
        x[0, 1, 0, 1] = x[0, 1, 1, 0] = float("nan")
        x[2, 3, 5, 7] = float("nan")
        upstream = torch.randn(3, 4, 3, 4, generator=g, dtype=dtype)
        for layout in (torch.contiguous_format, torch.channels_last):
            xl = x.contiguous(memory_format=layout)
            want, want_grad = _pool_both(nn.MaxPool2d(2), xl, upstream)
            got, got_grad = _pool_both(MaxPool2d(2), xl, upstream)
            assert torch.equal(got.isnan(), want.isnan())
            assert torch.equal(got.nan_to_num(), want.nan_to_num())
            assert torch.equal(got_grad, want_grad)
            assert not got_grad[:, :, 6, :].any() and not got_grad[:, :, :, 8].any()


def test_max_pool_takes_torchs_path_where_it_cannot_pool_in_channels_last():
    """Overlapping windows and channels-last input are torch's own pooling, unchanged."""
    from fedprune.models import MaxPool2d

    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(MaxPool2d(3, stride=2)(x), nn.MaxPool2d(3, stride=2)(x))
    channels_last = x.contiguous(memory_format=torch.channels_last)
    out = MaxPool2d(2)(channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, nn.MaxPool2d(2)(x))
