"""The shared training loop: it learns, clips, accumulates, schedules and records as documented."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from finetune.training import epoch_means, fit, linear_decay_lambda, miphei_lr_lambda


def _regression(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.5], [-2.0], [0.5]]) + 0.3
    return x, y


def test_fit_reduces_a_toy_regression_loss():
    torch.manual_seed(0)
    x, y = _regression()
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(x), 16)]

    def step(batch):
        xb, yb = batch
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        return loss, {"mse": float(loss.detach())}

    history = fit(step, batches, optimizer, epochs=30, progress=False)
    assert len(history) == 30 * 4
    assert list(history["step"]) == list(range(1, 121))
    assert history["epoch"].iloc[0] == 1 and history["epoch"].iloc[-1] == 30
    assert history["loss"].iloc[-4:].mean() < 0.01 * history["loss"].iloc[:4].mean()
    means = epoch_means(history)
    assert [m["epoch"] for m in means] == list(range(1, 31))
    assert means[0]["mse"] == pytest.approx(history["mse"].iloc[:4].mean())


def test_clipping_caps_the_gradient_norm_and_records_it():
    param = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([param], lr=1.0)
    target = torch.tensor([30.0, 40.0, 0.0, 0.0])

    def step(_):
        return ((param - target) ** 2).sum() / 2, {}  # gradient = param - target, norm 50 at param = 0

    history = fit(step, [None], optimizer, epochs=1, grad_clip=1.0, progress=False)
    assert history["grad_norm"].iloc[0] == pytest.approx(50.0)
    # one SGD step of lr 1 moved param by the clipped gradient: norm 1, along (30, 40)
    assert torch.linalg.vector_norm(param.detach()).item() == pytest.approx(1.0, rel=1e-5)
    assert param.detach()[:2].tolist() == pytest.approx([0.6, 0.8], rel=1e-5)


def test_accumulation_equals_one_big_batch():
    x, y = _regression(32, seed=1)

    def run(batches, accumulation):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

        def step(batch):
            xb, yb = batch
            return torch.nn.functional.mse_loss(model(xb), yb), {}

        history = fit(step, batches, optimizer, epochs=3, accumulation=accumulation, grad_clip=1e9, progress=False)
        return model, history

    big, _ = run([(x, y)], 1)
    small, history = run([(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)], 4)
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # one optimiser step (with a gradient norm, the big batch's) per 4 batches
    assert history["grad_norm"].isna().sum() == 3 * 3
    assert history["grad_norm"].notna().sum() == 3


def test_partial_accumulation_window_steps_at_the_end_of_each_epoch():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    calls = []
    original = optimizer.step

    def counting_step(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    optimizer.step = counting_step
    history = fit(
        lambda _: (((param - 1) ** 2).sum(), {}), [0, 1, 2, 3, 4], optimizer, epochs=2, accumulation=2, progress=False
    )
    assert len(calls) == 2 * 3  # steps after batches 2, 4 and the lone 5th, per epoch
    assert history["grad_norm"].isna().all()  # no clipping asked: no norm computed


def test_total_steps_cut_the_last_pass_and_schedule_follows_lambda():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    history = fit(
        lambda _: ((param**2).sum(), {}),
        [0, 1, 2],
        optimizer,
        total_steps=7,
        lr_lambda=linear_decay_lambda(7, 0.5),
        progress=False,
    )
    assert len(history) == 7
    assert list(history["epoch"]) == [1, 1, 1, 2, 2, 2, 3]
    factor = linear_decay_lambda(7, 0.5)
    assert list(history["lr"]) == pytest.approx([2.0 * factor(s) for s in range(7)])


def test_epochs_from_a_function_of_the_epoch_and_weighted_means():
    seen = []
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)

    def batches(epoch):
        seen.append(epoch)
        return [epoch, epoch + 1]

    history = fit(lambda b: (((param - b) ** 2).sum(), {"n": b + 1}), batches, optimizer, epochs=3, progress=False)
    assert seen == [0, 1, 2]
    weighted = epoch_means(history, ["loss"], weight="n")
    plain = epoch_means(history, ["loss"])
    for epoch, (w, p) in enumerate(zip(weighted, plain)):
        l0, l1 = history["loss"].iloc[2 * epoch], history["loss"].iloc[2 * epoch + 1]
        assert w["loss"] == (l0 * (epoch + 1) + l1 * (epoch + 2)) / (2 * epoch + 3)
        assert p["loss"] == (l0 + l1) / 2


def test_aux_optimizers_share_the_schedule():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    main, aux = torch.optim.SGD([a], lr=1.0), torch.optim.SGD([b], lr=0.5)

    def step(_):
        aux.step()  # the step function steps its auxiliary optimiser itself (a GAN's discriminator)
        return (a**2).sum(), {}

    fit(step, [0] * 4, main, epochs=1, aux_optimizers=[aux], lr_lambda=linear_decay_lambda(4, 1.0), progress=False)
    assert main.param_groups[0]["lr"] == pytest.approx(0.0)
    assert aux.param_groups[0]["lr"] == pytest.approx(0.0)


def test_non_finite_loss_is_named_with_its_step():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    values = iter([1.0, float("nan")])

    def step(_):
        return (param.sum() + next(values)), {}

    with pytest.raises(FloatingPointError, match=r"toy: non-finite loss at step 2 \(lower the lr\)"):
        fit(
            step, [0, 1], optimizer, epochs=1, check_finite=True, finite_hint="lower the lr", desc="toy", progress=False
        )


def test_exactly_one_length_is_required():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    with pytest.raises(ValueError):
        fit(lambda _: (param.sum(), {}), [0], optimizer, progress=False)
    with pytest.raises(ValueError):
        fit(lambda _: (param.sum(), {}), [0], optimizer, epochs=1, total_steps=1, progress=False)


def test_lr_lambdas():
    f = linear_decay_lambda(10, 0.5)
    assert [f(s) for s in range(10)] == pytest.approx([1, 1, 1, 1, 1, 1.0, 0.8, 0.6, 0.4, 0.2])
    assert linear_decay_lambda(10, 0.0)(9) == 1.0
    g = miphei_lr_lambda(100, warmup_steps=10)
    assert g(0) == 0.0 and g(5) == pytest.approx(0.5) and g(10) == 1.0 and g(49) == 1.0
    assert g(50) == 1.0 and g(75) == pytest.approx(0.5) and g(100) == 0.0
    short = miphei_lr_lambda(10, warmup_steps=400)  # triangle: up over the first half, down over the second
    assert max(short(s) for s in range(10)) == 1.0 and short(0) == 0.0
    assert math.isclose(short(9), 0.2)
    assert np.all(np.diff([short(s) for s in range(5, 11)]) < 0)
