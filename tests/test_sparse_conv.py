import copy
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from fedprune import kernels, sparse_conv
from fedprune.data import Examples
from fedprune.masks import apply_masks, full_masks
from fedprune.models import build_model
from fedprune.sparse import (
    export_for_inference,
    layer_formats,
    load_for_inference,
    restore_dense,
    sparse_layers,
    supported_formats,
    to_formats,
    train_sparse,
)
from fedprune.sparse_conv import SparseConv2d, check_supported, sparse_conv_available
from fedprune.training import train_masked

pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state"),
    pytest.mark.skipif(
        not sparse_conv_available(),
        reason=f"sparse conv kernels unavailable: {sparse_conv.sparse_conv_unavailable_reason()}",
    ),
]


class threads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def check_against_conv2d(
    cin,
    cout,
    kernel,
    padding,
    batch,
    height,
    width,
    density,
    seed,
    dtype=torch.float64,
    n_threads=1,
    bias=True,
):
    """Forward, input gradient and weight gradient at the kept positions of a SparseConv2d
    against F.conv2d with the masked weight; returns the three pairs."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, kernel, padding=padding, bias=bias).to(dtype)
    mask = torch.rand(conv.weight.shape, generator=g) < density
    layer = SparseConv2d.from_conv(conv, mask)
    assert layer.nnz == int(mask.sum()) and layer.values.dtype == dtype
    weight = (conv.weight.detach() * mask).requires_grad_(True)
    x = torch.randn(batch, cin, height, width, generator=g, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with threads(n_threads):
        y = layer(x)
    b = None if conv.bias is None else conv.bias.detach()
    y_ref = F.conv2d(x_ref, weight, b, padding=layer.padding)
    grad = torch.randn(y_ref.shape, generator=g, dtype=dtype)
    with threads(n_threads):
        y.backward(grad)
    y_ref.backward(grad)
    pairs = [(y, y_ref), (x.grad, x_ref.grad), (layer.values.grad, weight.grad[mask])]
    if bias:
        pairs.append((layer.bias.grad, grad.sum((0, 2, 3))))
    return pairs


@settings(max_examples=30, deadline=None)
@given(
    cin=st.integers(1, 6),
    cout=st.integers(1, 7),
    kernel=st.sampled_from([1, 2, 3, 5, (3, 5), (2, 1)]),
    padding=st.sampled_from([0, 1, 2, 4, (2, 0), (0, 3)]),
    batch=st.integers(1, 5),
    size=st.tuples(st.integers(3, 9), st.integers(3, 9)),
    density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    n_threads=st.sampled_from([1, 2]),
    bias=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_matches_conv2d_on_random_shapes_and_masks(
    cin, cout, kernel, padding, batch, size, density, n_threads, bias, seed
):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    if size[0] + 2 * ph < kh or size[1] + 2 * pw < kw:
        return  # no output
    # float64: the kernels' index arithmetic must be exact, so the match is to rounding.
    for got, want in check_against_conv2d(
        cin, cout, kernel, padding, batch, *size, density, seed, n_threads=n_threads, bias=bias
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize(
    ("batch", "density"), [(20, 0.18), (20, 0.05), (1, 0.1), (3, 0.0), (2, 1.0)]
)
def test_conv2_layer_float32(batch, density, n_threads):
    """Conv-2's second layer (32 -> 64, 5x5, padding 2, 14x14) in float32, the training
    dtype: batch 1 and batch 20, density 0 and 1, serial and parallel kernels."""
    pairs = check_against_conv2d(
        32, 64, 5, 2, batch, 14, 14, density, seed=7, dtype=torch.float32, n_threads=n_threads
    )
    for got, want in pairs:
        scale = max(float(want.detach().abs().max()), 1.0) if want.numel() else 1.0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_conv1_layer_without_input_gradient():
    """Conv-2's first layer: one input channel, 28x28, and its input needs no gradient."""
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(1, 32, 5, padding=2)
    mask = torch.rand(conv.weight.shape, generator=g) < 0.76
    layer = SparseConv2d.from_conv(conv, mask)
    x = torch.rand(20, 1, 28, 28, generator=g)
    y = layer(x)
    weight = (conv.weight.detach() * mask).requires_grad_(True)
    y_ref = F.conv2d(x, weight, conv.bias.detach(), padding=2)
    grad = torch.randn(y_ref.shape, generator=g)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.values.grad, weight.grad[mask], rtol=1e-4, atol=1e-3)


def test_round_trip_and_inference_path():
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    mask = torch.rand(conv.weight.shape, generator=g) < 0.4
    with torch.no_grad():
        conv.weight.mul_(mask)
        i = mask.nonzero()[0]
        conv.weight[tuple(i)] = 0.0  # a kept weight that is exactly zero stays kept
    layer = SparseConv2d.from_conv(conv, mask)
    assert layer.nnz == int(mask.sum())
    assert torch.equal(layer.mask(), mask)
    assert torch.equal(layer.dense_weight(), conv.weight.detach())
    back = layer.to_conv()
    assert torch.equal(back.weight, conv.weight) and torch.equal(back.bias, conv.bias)
    x = torch.randn(2, 3, 5, 5, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), conv(x))


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        (dict(stride=2), "stride"),
        (dict(dilation=2), "dilation"),
        (dict(groups=2), "groups"),
        (dict(padding=1, padding_mode="reflect"), "padding_mode"),
        (dict(padding="same", kernel_size=4), "even kernel"),
    ],
)
def test_unsupported_convolutions_raise(kwargs, what):
    kwargs = {"kernel_size": 3, **kwargs}
    conv = nn.Conv2d(4, 4, **kwargs)
    with pytest.raises(ValueError, match=what):
        check_supported(conv)
    with pytest.raises(ValueError, match=what):
        SparseConv2d.from_conv(conv, torch.ones(conv.weight.shape, dtype=torch.bool))


def test_same_and_valid_padding_strings():
    g = torch.Generator().manual_seed(5)
    for padding in ("same", "valid"):
        conv = nn.Conv2d(2, 3, 3, padding=padding)
        mask = torch.rand(conv.weight.shape, generator=g) < 0.5
        x = torch.randn(2, 2, 6, 6, generator=g)
        with torch.no_grad():
            conv.weight.mul_(mask)
            torch.testing.assert_close(SparseConv2d.from_conv(conv, mask)(x), conv(x))


def test_dense_grad_sum_is_the_dense_weight_gradient_summed_over_passes():
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    mask = torch.rand(conv.weight.shape, generator=g) < 0.3
    layer = SparseConv2d.from_conv(conv, mask)
    layer.track_importance = True
    weight = (conv.weight.detach() * mask).requires_grad_(True)
    for _ in range(3):
        x = torch.randn(5, 4, 7, 7, generator=g)
        grad = torch.randn(5, 6, 7, 7, generator=g)
        layer(x).backward(grad)
        F.conv2d(x, weight, padding=1).backward(grad)
    got = layer.dense_grad_sum()
    torch.testing.assert_close(got, weight.grad, rtol=1e-4, atol=1e-4)
    assert got[~mask].abs().sum() > 0  # pruned positions have importance too
    assert layer.dense_grad_sum() is None  # the stash is emptied


def masked_small_cnn(density, seed=0):
    model = build_model("small-cnn", seed=seed)
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(m.shape, generator=g) < density for n, m in full_masks(model).items()}
    masks["conv2.weight"][0] = False  # an output channel with no kept weight
    apply_masks(model, masks)
    return model, masks


def toy_data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Examples(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


MIXED = {
    "conv1.weight": "sparse-conv",
    "conv2.weight": "sparse-conv",
    "fc1.weight": "csr",
    "fc2.weight": "dense",
}


@pytest.mark.parametrize(
    ("momentum", "weight_decay", "track_importance", "n_threads"),
    [(0.0, 0.0, True, 1), (0.9, 0.05, True, 2), (0.5, 0.0, False, 1)],
)
def test_train_sparse_in_mixed_formats_matches_train_masked(
    momentum, weight_decay, track_importance, n_threads
):
    model, masks = masked_small_cnn(0.3)
    twin = copy.deepcopy(model)
    params_before = {n: id(p) for n, p in twin.named_parameters()}
    kw = dict(
        steps=6,
        batch_size=16,
        lr=0.2,
        momentum=momentum,
        weight_decay=weight_decay,
        track_importance=track_importance,
    )
    with threads(n_threads):
        ref = train_masked(
            model, masks, toy_data(), generator=torch.Generator().manual_seed(4), **kw
        )
        got = train_sparse(
            twin, masks, toy_data(), generator=torch.Generator().manual_seed(4), formats=MIXED, **kw
        )
    assert got.formats == MIXED
    assert not sparse_layers(twin) and isinstance(twin.conv2, nn.Conv2d)
    assert {n: id(p) for n, p in twin.named_parameters()} == params_before
    assert got.loss == pytest.approx(ref.loss, rel=1e-5)
    ref_params = dict(model.named_parameters())
    for name, p in twin.named_parameters():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-4, atol=1e-5, msg=name)
        if name in masks:  # pruned weights stay exactly zero under every format
            assert torch.all(p[~masks[name]] == 0), name
    if not track_importance:
        assert got.importance is None
        return
    assert list(got.importance) == list(ref.importance)
    for name, imp in ref.importance.items():
        torch.testing.assert_close(got.importance[name], imp, rtol=1e-3, atol=1e-7, msg=name)
    for name in ("conv1.weight", "conv2.weight"):
        assert got.importance[name][~masks[name]].sum() > 0


def test_pruned_weights_of_sparse_layers_stay_zero_through_sgd():
    """The layers hold no pruned positions, so whatever SGD does (momentum, weight decay),
    the dense weights they give back are exactly 0.0 where pruned."""
    model, masks = masked_small_cnn(0.2, seed=2)
    to_formats(model, masks, MIXED)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    data = toy_data()
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(data.x[:16]), data.y[:16]).backward()
        opt.step()
    for name, layer in sparse_layers(model).items():
        assert torch.all(layer.dense_weight()[~masks[name]] == 0), name


def test_to_formats_round_trip_and_errors():
    model, masks = masked_small_cnn(0.3)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert supported_formats(model)["conv2.weight"] == ("dense", "sparse-conv")
    assert supported_formats(model)["fc1.weight"] == ("dense", "csr")
    originals = to_formats(model, masks, MIXED)
    assert set(originals) == {"conv1", "conv2", "fc1"}
    assert layer_formats(model) == MIXED
    x = toy_data().x[:4]
    with torch.inference_mode():
        sparse_out = model(x)
    restore_dense(model, originals)
    assert layer_formats(model) == dict.fromkeys(MIXED, "dense")
    for n, p in model.named_parameters():
        assert torch.equal(p, reference[n]), n
    with torch.inference_mode():
        torch.testing.assert_close(model(x), sparse_out, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="Linear"):
        to_formats(model, masks, {"conv1.weight": "csr"})
    with pytest.raises(ValueError, match="Conv2d"):
        to_formats(model, masks, {"fc1.weight": "sparse-conv"})
    with pytest.raises(ValueError, match="unknown format"):
        to_formats(model, masks, {"fc1.weight": "coo"})


def test_export_with_sparse_convolutions(tmp_path):
    model, masks = masked_small_cnn(0.2)
    path = tmp_path / "model.pt"
    chosen = export_for_inference(model, masks, path, formats=MIXED)
    assert chosen == MIXED
    loaded = load_for_inference(path)
    assert layer_formats(loaded) == MIXED
    x = toy_data().x[:3]
    model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded(x[:1]), model(x[:1]), rtol=1e-4, atol=1e-5)


def test_a_passed_self_test_is_kept_on_disk_and_not_repeated(monkeypatch, tmp_path):
    """Each deployed message is a fresh process: the self-test runs once per machine and
    kernel source, and its pass is read back from the cache after that."""
    monkeypatch.setenv("FEDPRUNE_CACHE_DIR", str(tmp_path))
    fresh = {"checked": False, "ok": False, "reason": None}
    monkeypatch.setattr(kernels, "_availability", dict(fresh))
    assert kernels.available() and list(tmp_path.glob("kernels-passed-*"))
    monkeypatch.setattr(kernels, "_availability", dict(fresh))
    ran = []
    monkeypatch.setattr(kernels, "_self_test", lambda: ran.append(1) or "must not run")
    assert kernels.available() and kernels.unavailable_reason() is None and not ran
    # Another kernel source (or numba, numpy, CPU) is another key: tested again, and a
    # failure is said and not kept.
    monkeypatch.setattr(kernels, "_self_test_key", lambda: "other-source")
    monkeypatch.setattr(kernels, "_availability", dict(fresh))
    assert not kernels.available() and ran == [1]
    assert kernels.unavailable_reason() == "must not run"
    assert not (tmp_path / "kernels-passed-other-source").exists()


def test_unavailable_kernels_are_said_once_and_layers_stay_dense(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_availability", {"checked": False, "ok": False, "reason": None})
    monkeypatch.setattr(kernels, "_self_test", lambda: "no compiler on this machine")
    monkeypatch.setattr(kernels, "_passed_before", lambda: False)  # not a pass kept on disk
    model, masks = masked_small_cnn(0.3)
    with caplog.at_level(logging.WARNING, logger="fedprune.kernels"):
        assert not sparse_conv.sparse_conv_available()
        assert not sparse_conv.sparse_conv_available()
        originals = to_formats(model, masks, MIXED)
        result = train_sparse(
            model, masks, toy_data(), steps=2, batch_size=8, lr=0.1,
            generator=torch.Generator().manual_seed(0), formats=MIXED,
        )  # fmt: skip
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler on this machine" in warnings[0].getMessage()
    assert sparse_conv.sparse_conv_unavailable_reason() == "no compiler on this machine"
    assert set(originals) == {"fc1"}
    assert result.formats["conv2.weight"] == "dense" and result.formats["fc1.weight"] == "csr"
    assert supported_formats(model)["conv2.weight"] == ("dense",)


def test_reused_buffers_never_mix_steps():
    """Scratch buffers are reused across steps, never while a graph that saved one may
    still run backward: two forwards before one backward, a graph kept for a second
    backward, and many steps with fresh inputs all match conv2d."""
    g = torch.Generator().manual_seed(11)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    mask = torch.rand(conv.weight.shape, generator=g) < 0.5
    layer = SparseConv2d.from_conv(conv, mask)
    weight = (conv.weight.detach() * mask).requires_grad_(True)

    def both(fn):
        layer.values.grad = None
        weight.grad = None
        xs = [torch.randn(2, 3, 6, 6, generator=g) for _ in range(2)]
        fn(lambda x: layer(x), xs)
        fn(lambda x: F.conv2d(x, weight, conv.bias.detach(), padding=1), xs)
        torch.testing.assert_close(layer.values.grad, weight.grad[mask], rtol=1e-4, atol=1e-5)

    def two_forwards(f, xs):
        (f(xs[0]).square().sum() + 2 * f(xs[1]).sum()).backward()

    def retained(f, xs):
        loss = f(xs[0]).square().sum()
        loss.backward(retain_graph=True)
        f(xs[1]).sum().backward()  # a step in between, on another input
        loss.backward()

    both(two_forwards)
    both(retained)
    for _ in range(5):
        both(lambda f, xs: f(xs[0]).square().sum().backward())


def test_buffers_are_free_again_once_their_graph_is_gone():
    """A padded input stays taken while its graph lives, and is reused once it is gone:
    a training loop keeps two (this step's graph and the last loss's), plus one per graph
    kept alive elsewhere."""
    conv = nn.Conv2d(2, 3, 3, padding=1)
    layer = SparseConv2d.from_conv(conv, torch.rand(conv.weight.shape) < 0.5)
    x = torch.randn(2, 2, 5, 5)
    kept = layer(x).sum()  # a live graph: its buffer must not be handed out again
    (held,) = [
        e[0] for key, entries in layer._scratch._pool.items() if key[0] == "x" for e in entries
    ]
    loss = None
    for _ in range(6):
        loss = layer(x).square().sum()
        loss.backward()
    xs = [e[0] for key, entries in layer._scratch._pool.items() if key[0] == "x" for e in entries]
    assert len(xs) == 3 and any(b is held for b in xs)
    del kept, loss
    taken = layer._scratch.take("x", len(held), held.dtype, zeroed=True)
    assert any(taken is b for b in xs)


def bits(t):
    return t.contiguous().view(-1).view(torch.int32 if t.dtype == torch.float32 else torch.int64)


@settings(max_examples=25, deadline=None)
@given(
    cin=st.integers(1, 5),
    cout=st.integers(1, 6),
    kernel=st.sampled_from([1, 3, 5, (3, 5)]),
    padding=st.sampled_from([0, 1, 2, (2, 0)]),
    size=st.tuples(st.integers(5, 11), st.integers(5, 11)),  # odd sizes drop a row
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    n_threads=st.sampled_from([1, 2]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 10_000),
)
def test_pooled_relu_is_the_three_steps_bit_for_bit(
    cin, cout, kernel, padding, size, density, n_threads, dtype, seed
):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, kernel, padding=padding).to(dtype)
    layer = SparseConv2d.from_conv(conv, torch.rand(conv.weight.shape, generator=g) < density)
    x = torch.randn(1, cin, *size, generator=g, dtype=dtype)
    x[0, 0, 0, 0] = float("nan")  # a NaN window stays NaN, as torch pools and rectifies it
    with threads(n_threads), torch.inference_mode():
        if min(layer(x).shape[2:]) < 2:
            return  # nothing to pool
        got = layer.pooled_relu(x)
        want = torch.relu(F.max_pool2d(layer(x), 2))
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(bits(got), bits(want.contiguous(memory_format=torch.channels_last)))


def test_pooled_relu_declines_batches_and_graphs():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    layer = SparseConv2d.from_conv(conv, torch.rand(conv.weight.shape) < 0.5)
    with torch.inference_mode():
        assert layer.pooled_relu(torch.randn(2, 2, 6, 6)) is None
    assert layer.pooled_relu(torch.randn(1, 2, 6, 6)) is None  # the parameters need grads
    with torch.no_grad():
        assert layer.pooled_relu(torch.randn(1, 2, 6, 6)) is not None


def test_conv2_at_batch_1_fuses_its_sparse_convolutions_with_the_same_bits():
    """TwoConvNet at one sample without autograd pools and rectifies straight from each
    sparse convolution's buffer (`conv_block`); a batch, or training, runs the three steps.
    The two paths give the same bits, so the layers after them compute the same."""
    model, masks = masked_small_cnn(0.2)
    to_formats(model, masks, MIXED)
    x = toy_data(3).x
    calls = []
    for conv in (model.conv1, model.conv2):
        fused = conv.pooled_relu
        conv.pooled_relu = lambda x, fused=fused: calls.append(1) or fused(x)
    model.eval()
    with torch.inference_mode():
        one = model(x[:1])
        batch = model(x)
    assert len(calls) == 4  # two convolutions, two calls; the batch's declined
    with torch.no_grad():  # outside inference mode, on buffers made inside it
        pooled = torch.relu(F.max_pool2d(model.conv1(x[:1]), 2))
        pooled = torch.relu(F.max_pool2d(model.conv2(pooled), 2))
        unfused = model.fc2(torch.relu(model.fc1(torch.flatten(pooled, 1))))
    assert torch.equal(one, unfused)
    torch.testing.assert_close(batch[:1], one, rtol=1e-4, atol=1e-5)
