import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedprune import kernels
from fedprune.data import Examples
from fedprune.masks import apply_masks, full_masks
from fedprune.models import build_model
from fedprune.sparse import (
    SparseLinear,
    export_for_inference,
    inference_latency,
    load_for_inference,
    read_export,
    sparse_layers,
    to_dense,
    to_formats,
    to_sparse,
    train_sparse,
)
from fedprune.training import masked_steps, train_masked

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")


def linear_with_mask(n_in, n_out, density, seed, zeros=3):
    """A Linear layer, a mask, and the layer's weight zeroed at pruned positions, with a
    few kept weights set to exactly 0.0."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n_in, n_out)
    mask = torch.rand(n_out, n_in, generator=g) < density
    with torch.no_grad():
        layer.weight.mul_(mask)
        kept = mask.nonzero()[:zeros]
        layer.weight[kept[:, 0], kept[:, 1]] = 0.0
    return layer, mask


def masked_dense_pass(layer, mask, x, grad_out):
    """Forward and backward of the dense layer whose weight is 0.0 at pruned positions, as
    train_masked runs it: output, input gradient, weight gradient at every position, bias
    gradient."""
    x = x.clone().requires_grad_(True)
    w = (layer.weight.detach() * mask).requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    y = torch.nn.functional.linear(x, w, b)
    y.backward(grad_out)
    return y.detach(), x.grad, w.grad, b.grad


@settings(max_examples=25, deadline=None)
@given(
    n_in=st.integers(1, 40),
    n_out=st.integers(1, 40),
    batch=st.integers(1, 9),
    density=st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]),
    seed=st.integers(0, 10_000),
)
def test_csr_forward_and_gradients_match_masked_dense(n_in, n_out, batch, density, seed):
    layer, mask = linear_with_mask(n_in, n_out, density, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, n_in, generator=g)
    grad_out = torch.randn(batch, n_out, generator=g)
    y_ref, gx_ref, gw_ref, gb_ref = masked_dense_pass(layer, mask, x, grad_out)

    sparse = SparseLinear.from_linear(layer, mask)
    assert sparse.nnz == int(mask.sum())  # exact zeros are kept in the structure
    xs = x.clone().requires_grad_(True)
    y = sparse(xs)
    y.backward(grad_out)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(xs.grad, gx_ref)
    torch.testing.assert_close(sparse.values.grad, gw_ref[mask])
    torch.testing.assert_close(sparse.bias.grad, gb_ref)


@pytest.mark.parametrize("compiled", [True, False])
def test_csr_weight_gradient_with_and_without_the_compiled_kernel(compiled, monkeypatch):
    """The weight gradient comes from `kernels.csr_sddmm_*` where the kernels run, from
    MKL's sampled_addmm where they do not; both equal the masked dense gradient (fc1's
    shape at the main job's density and batch, rows long enough for the kernel's blocks
    of eight)."""
    if compiled and not kernels.available():
        pytest.skip("the compiled kernels do not run here")
    if not compiled:
        monkeypatch.setattr(kernels, "available", lambda: False)
    layer, mask = linear_with_mask(3136, 64, 0.04, seed=5)
    g = torch.Generator().manual_seed(6)
    x, grad_out = torch.randn(20, 3136, generator=g), torch.randn(20, 64, generator=g)
    _, _, gw_ref, _ = masked_dense_pass(layer, mask, x, grad_out)
    sparse = SparseLinear.from_linear(layer, mask)
    sparse(x).backward(grad_out)
    torch.testing.assert_close(sparse.values.grad, gw_ref[mask])


def layer_pass(sparse, x, grad_out, track_importance=False):
    """Output, input gradient, values' and bias's gradients, and the tracked dense
    gradient (or None) of one forward and backward of `sparse`."""
    sparse.track_importance = track_importance
    sparse.values.grad = sparse.bias.grad = None
    xs = x.clone().requires_grad_(True)
    y = sparse(xs)
    y.backward(grad_out)
    return y.detach(), xs.grad, sparse.values.grad, sparse.bias.grad, sparse.dense_grad_sum()


@pytest.mark.skipif(not kernels.available(), reason="the compiled kernels do not run here")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("n_in", "n_out", "density", "batch"),
    [(3136, 256, 0.1, 20), (3136, 256, 0.04, 15), (300, 62, 0.6, 1), (97, 40, 0.3, 24),
     (97, 40, 0.3, 25), (64, 10, 0.0, 20), (64, 10, 1.0, 50)],
)  # fmt: skip
def test_batch_products_are_mkls_bit_for_bit(n_in, n_out, density, batch, threads, monkeypatch):
    """In training a CSR layer's forward and input gradient run on the compiled panel
    kernel (`kernels.csr_panel_mm`), its weight gradient reads the padded panels: every
    result, the tracked dense gradient included, is the one MKL's CSR products give,
    bit for bit, so moving training onto the kernel changed no run's numbers. fc1's shape
    at the main job's densities, a partial batch, one sample, a panel's width exactly and
    one past it, an empty and a full layer."""
    layer, mask = linear_with_mask(n_in, n_out, density, seed=batch)
    g = torch.Generator().manual_seed(7)
    x, grad_out = torch.randn(batch, n_in, generator=g), torch.randn(batch, n_out, generator=g)
    sparse = SparseLinear.from_linear(layer, mask)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = layer_pass(sparse, x, grad_out, track_importance=True)
        assert torch.get_num_threads() == threads  # numba's OpenMP layer leaves it alone
        monkeypatch.setattr(SparseLinear, "_panels_run", lambda self, x: False)
        want = layer_pass(sparse, x, grad_out, track_importance=True)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    _, gx_ref, gw_ref, _ = masked_dense_pass(layer, mask, x, grad_out)
    torch.testing.assert_close(got[1], gx_ref)
    torch.testing.assert_close(got[2], gw_ref[mask])


@pytest.mark.skipif(not kernels.available(), reason="the compiled kernels do not run here")
@pytest.mark.parametrize("threads", [1, 2])
def test_conv2_trains_to_the_same_bits_on_the_panel_kernel_as_on_mkl(threads, monkeypatch):
    """Conv-2 with fc1 and fc2 in CSR (conv2 a sparse convolution), nine steps of batch
    20 over 55 samples (a partial batch), momentum, weight decay and importance tracked:
    every parameter and the tracked gradients end the same, bit for bit, whether the CSR
    layers run the compiled panel kernel or MKL's products."""
    formats = {"conv1.weight": "dense", "conv2.weight": "sparse-conv", "fc1.weight": "csr",
               "fc2.weight": "csr"}  # fmt: skip

    def train():
        g = torch.Generator().manual_seed(1)
        data = Examples(
            torch.rand(55, 1, 28, 28, generator=g), torch.randint(0, 10, (55,), generator=g)
        )
        torch.manual_seed(0)
        model = build_model("conv2", num_classes=10)
        masks = {n: torch.rand(m.shape, generator=g) < 0.1 for n, m in full_masks(model).items()}
        apply_masks(model, masks)
        to_formats(model, masks, formats)
        csr = {n: m for n, m in sparse_layers(model).items() if isinstance(m, SparseLinear)}
        assert set(csr) == {"fc1.weight", "fc2.weight"}
        for layer in csr.values():
            layer.track_importance = True
        steps = masked_steps(model, masks, data, steps=9, batch_size=20, lr=0.05, momentum=0.9,
                             weight_decay=1e-4, generator=torch.Generator().manual_seed(0),
                             track_importance=True)  # fmt: skip
        state = {n: p.detach().clone() for n, p in model.state_dict().items()}
        state.update({f"{n} summed gradient": t for n, t in steps.grad_sum.items()})
        state.update({f"{n} dense gradient": layer.dense_grad_sum() for n, layer in csr.items()})
        return state

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = train()
        monkeypatch.setattr(SparseLinear, "_panels_run", lambda self, x: False)
        want = train()
    finally:
        torch.set_num_threads(before)
    assert got.keys() == want.keys()
    for name in got:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.skipif(not kernels.available(), reason="the compiled kernels do not run here")
def test_batch_products_in_float64_match_masked_dense():
    layer, mask = linear_with_mask(50, 30, 0.3, seed=3)
    layer = layer.double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(21, 50, generator=g, dtype=torch.float64)
    grad_out = torch.randn(21, 30, generator=g, dtype=torch.float64)
    sparse = SparseLinear.from_linear(layer, mask)
    assert sparse._panels_run(x)
    y, gx, gv, gb, _ = layer_pass(sparse, x, grad_out)
    y_ref, gx_ref, gw_ref, gb_ref = masked_dense_pass(layer, mask, x, grad_out)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gv, gw_ref[mask])
    torch.testing.assert_close(gb, gb_ref)


def test_exact_zero_weights_keep_their_place_and_train():
    layer, mask = linear_with_mask(12, 8, 0.5, seed=3, zeros=5)
    zero_kept = mask & (layer.weight == 0)
    assert int(zero_kept.sum()) == 5
    # What the module must not do: to_sparse_csr() drops the kept zeros.
    assert layer.weight.detach().to_sparse_csr().values().numel() == int(mask.sum()) - 5

    sparse = SparseLinear.from_linear(layer, mask)
    opt = torch.optim.SGD(sparse.parameters(), lr=0.5)
    sparse(torch.randn(4, 12)).square().sum().backward()
    opt.step()
    dense = sparse.dense_weight()
    assert torch.all(dense[~mask] == 0)
    assert torch.all(dense[zero_kept] != 0), "kept zeros got no gradient"
    assert torch.equal(sparse.mask(), mask)


def test_importance_is_the_dense_gradient_summed_over_passes_only_when_tracked():
    layer, mask = linear_with_mask(20, 15, 0.2, seed=5)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 20, generator=g) for _ in range(3)]
    grads = [torch.randn(6, 15, generator=g) for _ in range(3)]
    expected = sum(
        masked_dense_pass(layer, mask, x, go)[2] for x, go in zip(xs, grads, strict=True)
    )

    sparse = SparseLinear.from_linear(layer, mask)
    for x, go in zip(xs, grads, strict=True):
        sparse(x).backward(go)
    assert sparse.dense_grad_sum() is None  # not tracked: nothing kept, nothing computed

    sparse.track_importance = True
    for x, go in zip(xs, grads, strict=True):
        sparse(x).backward(go)
    total = sparse.dense_grad_sum()
    torch.testing.assert_close(total, expected)
    assert total[~mask].abs().sum() > 0, "no gradient at pruned positions"
    assert sparse.dense_grad_sum() is None  # the sum was consumed


def masked_small_cnn(density, seed=0):
    model = build_model("small-cnn", seed=seed)
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(m.shape, generator=g) < density for n, m in full_masks(model).items()}
    apply_masks(model, masks)
    with torch.no_grad():  # a kept weight that is exactly zero
        i, j = masks["fc1.weight"].nonzero()[0]
        model.fc1.weight[i, j] = 0.0
    return model, masks


def toy_data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Examples(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize(
    ("momentum", "weight_decay", "track_importance"),
    [(0.0, 0.0, True), (0.9, 0.05, True), (0.5, 0.0, False)],
)
def test_train_sparse_matches_train_masked(momentum, weight_decay, track_importance):
    model, masks = masked_small_cnn(0.2)
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
    ref = train_masked(model, masks, toy_data(), generator=torch.Generator().manual_seed(4), **kw)
    got = train_sparse(
        twin,
        masks,
        toy_data(),
        generator=torch.Generator().manual_seed(4),
        max_csr_density=0.5,
        **kw,
    )
    assert isinstance(twin.fc1, nn.Linear) and not sparse_layers(twin)
    assert {n: id(p) for n, p in twin.named_parameters()} == params_before
    assert (got.num_examples, got.steps, got.samples) == (ref.num_examples, ref.steps, ref.samples)
    assert got.loss == pytest.approx(ref.loss, rel=1e-5)
    ref_params = dict(model.named_parameters())
    for name, p in twin.named_parameters():
        torch.testing.assert_close(p, ref_params[name], msg=name)
        if name in masks:
            assert torch.all(p[~masks[name]] == 0), name
    if not track_importance:
        assert got.importance is None and ref.importance is None
        return
    assert list(got.importance) == list(ref.importance)
    for name, imp in ref.importance.items():
        torch.testing.assert_close(got.importance[name], imp, rtol=1e-4, atol=1e-9, msg=name)
    assert got.importance["fc1.weight"][~masks["fc1.weight"]].sum() > 0


def test_train_sparse_leaves_layers_that_were_already_sparse_sparse():
    model, masks = masked_small_cnn(0.2)
    twin = copy.deepcopy(model)
    to_sparse(twin, masks, max_csr_density={"fc1.weight": 1.0})
    kw = dict(steps=3, batch_size=16, lr=0.2)
    ref = train_masked(model, masks, toy_data(), generator=torch.Generator().manual_seed(1), **kw)
    got = train_sparse(twin, masks, toy_data(), generator=torch.Generator().manual_seed(1), **kw)
    assert isinstance(twin.fc1, SparseLinear) and isinstance(twin.fc2, nn.Linear)
    assert set(got.importance) == set(ref.importance)
    torch.testing.assert_close(got.importance["fc1.weight"], ref.importance["fc1.weight"])
    torch.testing.assert_close(twin.fc1.dense_weight(), model.fc1.weight.detach())


def test_to_sparse_follows_the_density_threshold_and_round_trips():
    model, masks = masked_small_cnn(0.2)
    masks["fc2.weight"] = torch.ones_like(masks["fc2.weight"])
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    replaced = to_sparse(model, masks, max_csr_density=0.3)
    assert list(replaced) == ["fc1"]
    assert isinstance(model.fc1, SparseLinear) and isinstance(model.fc2, nn.Linear)
    assert [n for n, _ in model.named_parameters()][4:6] == ["fc1.values", "fc1.bias"]
    back = to_dense(model)
    assert list(back) == ["fc1.weight"] and torch.equal(back["fc1.weight"], masks["fc1.weight"])
    for name, p in model.named_parameters():
        assert torch.equal(p, reference[name]), name

    per_layer = to_sparse(model, masks, max_csr_density={"fc2.weight": 1.0})
    assert list(per_layer) == ["fc2"] and isinstance(model.fc1, nn.Linear)
    to_dense(model, per_layer)
    assert model.fc2 is per_layer["fc2"]


def test_sparse_model_inference_matches_masked_dense():
    model, masks = masked_small_cnn(0.1)
    x = toy_data(5).x
    with torch.no_grad():
        expected = model(x)
    to_sparse(model, masks, max_csr_density=1.0)
    with torch.inference_mode():
        got = model(x)
    torch.testing.assert_close(got, expected)
    layer = model.fc1
    x3 = torch.randn(2, 3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x3), nn.functional.linear(x3, layer.dense_weight(), layer.bias)
        )


@pytest.mark.parametrize("formats", [None, {"fc1.weight": "csr", "fc2.weight": "dense"}])
def test_export_and_load_give_identical_outputs(tmp_path, formats):
    model, masks = masked_small_cnn(0.1)
    path = tmp_path / "model.pt"
    chosen = export_for_inference(model, masks, path, formats=formats)
    # Measured, every prunable layer gets a format (convolutions: dense or sparse-conv).
    expected_names = set(masks) if formats is None else set(formats)
    assert set(chosen) == expected_names
    assert set(chosen.values()) <= {"csr", "dense", "sparse-conv"}
    loaded = load_for_inference(path)
    assert isinstance(loaded.fc1, SparseLinear) == (chosen["fc1.weight"] == "csr")
    x = toy_data(7).x
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), expected)
    stored = read_export(path)
    assert stored["layer_formats"] == chosen
    for name, mask in masks.items():
        assert torch.equal(stored["masks"][name], mask)
    assert inference_latency(loaded, x[:1], repeats=3, warmup=1) > 0


def test_export_needs_an_architecture_for_unknown_models(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="arch"):
        export_for_inference(
            model, {"0.weight": torch.ones(3, 4, dtype=torch.bool)}, tmp_path / "m"
        )


@pytest.mark.parametrize("track_importance", [False, True])
def test_layer_masks_hold_no_bool_copy_of_a_sparse_layers_mask_and_train_the_same(
    track_importance,
):
    """A node's round holds its masks as `LayerMasks`: the bool mask of a layer built
    sparse is freed (the layer's indices stand for it), reading it gives the same mask,
    and training and the reply are the bits the plain dict gives."""
    import gc
    import weakref

    from fedprune.codec import encode_kept_update
    from fedprune.sparse import LayerMasks, kept_parameters, model_in_formats

    g = torch.Generator().manual_seed(0)
    base = build_model("small-cnn", 10, seed=0)
    masks = {n: torch.rand(m.shape, generator=g) < 0.3 for n, m in full_masks(base).items()}
    formats = {n: "csr" if n.startswith("fc1") else "dense" for n in masks}
    kept = {
        n: p.detach()[masks[n]] if n in masks else p.detach().clone()
        for n, p in base.named_parameters()
    }
    x, y = torch.rand(40, 1, 28, 28, generator=g), torch.randint(0, 10, (40,), generator=g)
    data = Examples(x, y)
    replies = []
    for wrap in (False, True):
        round_masks = {n: m.clone() for n, m in masks.items()}
        fresh = {n: v.clone() for n, v in kept.items()}  # training writes what the model takes
        model = model_in_formats(copy.deepcopy(base), fresh, round_masks, formats)
        if wrap:
            freed = weakref.ref(round_masks["fc1.weight"])
            round_masks = LayerMasks(model, round_masks)
            gc.collect()
            assert freed() is None  # nothing holds fc1's bools any longer
            assert list(round_masks) == list(masks) and len(round_masks) == len(masks)
            for n, m in masks.items():
                assert torch.equal(round_masks[n], m), n
                assert round_masks.kept_count(n) == int(m.sum()), n
        local = train_sparse(
            model, round_masks, data, steps=2, batch_size=20, lr=0.1, formats=formats,
            generator=torch.Generator().manual_seed(1), track_importance=track_importance,
        )  # fmt: skip
        uploaded = {n: local.importance[n] for n in masks} if track_importance else None
        replies.append(
            encode_kept_update(kept_parameters(model, round_masks), round_masks, uploaded)
        )
    plain, wrapped = replies
    assert plain.keys() == wrapped.keys()
    assert all((plain[k] == wrapped[k]).all() for k in plain)


@settings(max_examples=25, deadline=None)
@given(
    n_in=st.integers(1, 60),
    n_out=st.integers(1, 40),
    density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    n_threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 10_000),
)
def test_one_sample_without_autograd_is_the_masked_dense_product(
    n_in, n_out, density, bias, dtype, n_threads, seed
):
    """Inference at batch 1 runs the compiled matrix-vector product (rows of 0 to n_in
    kept weights, with and without bias, both precisions, serial and parallel)."""
    layer, mask = linear_with_mask(n_in, n_out, density, seed)
    layer = layer.to(dtype)
    if not bias:
        layer.bias = None
    sparse = SparseLinear.from_linear(layer, mask)
    x = torch.randn(1, n_in, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    with kernels.threads(n_threads), torch.inference_mode():
        got = sparse(x)
        want = nn.functional.linear(x, layer.weight * mask, layer.bias)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tol)
    assert got.shape == (1, n_out) and got.dtype == dtype


@pytest.mark.skipif(not kernels.available(), reason="the compiled kernels do not run here")
def test_the_matrix_vector_product_streams_uint16_columns_where_they_fit():
    narrow, _ = linear_with_mask(3136, 8, 0.1, 0)
    wide, _ = linear_with_mask(70_000, 2, 0.001, 1)  # more inputs than uint16 can index
    for layer, dtype in ((narrow, np.uint16), (wide, np.int32)):
        mask = layer.weight != 0
        sparse = SparseLinear.from_linear(layer, mask)
        x = torch.randn(1, layer.in_features)
        with torch.no_grad():
            got = sparse(x)
            torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)
        assert sparse._narrow_cols.dtype == dtype
        # A batch takes MKL's product, which the server's evaluation uses.
        with torch.no_grad():
            torch.testing.assert_close(sparse(x.repeat(3, 1))[1:2], got, rtol=1e-5, atol=1e-5)
