import torch

from fedprune.data import Examples
from fedprune.masks import full_masks
from fedprune.models import build_model
from fedprune.training import batches, evaluate, train_masked


def toy_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Examples(x, y)


def half_masks(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.shape, generator=g) < 0.5 for n, m in full_masks(model).items()}


def masked_model(seed=0):
    model = build_model("small-cnn", seed=seed)
    masks = half_masks(model, seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    return model, masks


def test_pruned_weights_stay_exactly_zero_with_momentum_and_weight_decay():
    model, masks = masked_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_masked(
        model,
        masks,
        toy_data(),
        steps=10,
        batch_size=8,
        lr=0.5,
        momentum=0.9,
        weight_decay=0.1,
        generator=torch.Generator().manual_seed(0),
    )
    params = dict(model.named_parameters())
    for n, mask in masks.items():
        assert torch.all(params[n][~mask] == 0), n
        assert not torch.equal(params[n][mask], before[n][mask]), f"{n} did not train"
    assert result.steps == 10 and result.samples == 80 and result.num_examples == 64


def test_importance_covers_pruned_parameters_and_scales_with_samples():
    model, masks = masked_model(1)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    r1 = train_masked(
        model,
        masks,
        toy_data(32),
        steps=1,
        batch_size=32,
        lr=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    # With lr = 0 one full-batch step: importance = grad^2 * n, at pruned positions too.
    for n, mask in masks.items():
        assert torch.all(r1.importance[n] >= 0)
        assert r1.importance[n][~mask].sum() > 0, f"no importance for pruned entries of {n}"
    model.load_state_dict(state)
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(toy_data(32).x), toy_data(32).y)
    loss.backward()
    grad = dict(model.named_parameters())["fc1.weight"].grad
    torch.testing.assert_close(r1.importance["fc1.weight"], grad.square() * 32)


def test_importance_is_square_of_summed_gradient_over_steps():
    model, masks = masked_model(2)
    data = toy_data(16)
    # lr = 0: the same gradient each step, so the sum over K steps is K * g, and the
    # importance (K g)^2 * K * B against g^2 * B: 27 times.
    r1 = train_masked(
        model,
        masks,
        data,
        steps=1,
        batch_size=16,
        lr=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    r3 = train_masked(
        model,
        masks,
        data,
        steps=3,
        batch_size=16,
        lr=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(r3.importance["fc2.weight"], 27 * r1.importance["fc2.weight"])


def test_importance_is_scaled_by_the_rounds_samples_not_the_local_data_size():
    """K x B, as the reference code does: a client holding 48 examples that trains one
    step of batch 16 weighs its squared gradient by 16, not 48 (which would weigh large
    clients more under non-IID splits)."""
    model, masks = masked_model(3)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = toy_data(48)
    r = train_masked(
        model, masks, data, steps=1, batch_size=16, lr=0.0,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    [idx] = list(batches(len(data), 1, 16, torch.Generator().manual_seed(0)))
    model.load_state_dict(state)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
    grad = dict(model.named_parameters())["fc1.weight"].grad
    assert r.samples == 16 and r.num_examples == 48
    torch.testing.assert_close(r.importance["fc1.weight"], grad.square() * 16)


def test_training_reduces_loss_on_a_learnable_task():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (128,), generator=g)
    x = torch.zeros(128, 1, 28, 28)
    x[y == 1, :, :14] = 1.0  # class 1: top half lit
    data = Examples(x, y)
    model = build_model("small-cnn", seed=0)
    loss0, _ = evaluate(model, data)
    train_masked(
        model,
        full_masks(model),
        data,
        steps=60,
        batch_size=16,
        lr=0.1,
        generator=torch.Generator().manual_seed(0),
    )
    loss1, acc1 = evaluate(model, data)
    assert loss1 < loss0 and acc1 > 0.9


def test_steps_count_the_examples_classified_right_as_they_were_trained_on():
    """`masked_steps` reports how many of the examples it drew the model got right before
    the step that trained on them (initial pruning's running training accuracy): with one
    step over the whole data that is the model's accuracy on it just before training."""
    from fedprune.training import masked_steps

    model, masks = masked_model()
    data = toy_data(n=50)
    with torch.no_grad():
        model.eval()
        expected = int((model(data.x).argmax(1) == data.y).sum())
    kwargs = dict(lr=0.5, momentum=0.0, weight_decay=0.0, track_importance=False)
    g = torch.Generator().manual_seed(0)
    first = masked_steps(model, masks, data, steps=1, batch_size=50, generator=g, **kwargs)
    assert first.samples == 50 and first.correct == expected
    with torch.no_grad():
        after = int((model(data.x).argmax(1) == data.y).sum())
    second = masked_steps(model, masks, data, steps=1, batch_size=50, generator=g, **kwargs)
    assert second.correct == after  # counted with the weights of its own step
