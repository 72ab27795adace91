"""kdcli.schedules: the reference's temperature and weight schedulers, the temperature
floor, no gradients, the builders' parsing and errors, parity with TextBrewer."""

from __future__ import annotations

import math

import pytest
import torch

from kdcli import losses, registry, schedules
from kdcli.schedules import build_temperature_scheduler, build_weight_scheduler

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("spec", ["none", None, "constant", ["constant"]])
def test_constant_returns_the_base_temperature(spec):
    sched = build_temperature_scheduler(spec)
    assert sched(rand(3, 2), rand(3, 2, seed=1), 4.0) == 4.0


def test_flsw_hand_values():
    S = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    T = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=F64)
    tau = build_temperature_scheduler(["flsw", 1, 2])(S, T, 4.0)
    # rows 0: parallel, <v, t> = (1 / (1 + 1e-4))^2; row 1: orthogonal, <v, t> = 0
    w0, w1 = (1 - (1 / 1.0001) ** 2) ** 2, 1.0
    mean = (w0 + w1) / 2
    assert tau.tolist() == pytest.approx([4 + (mean - w0), 4 + (mean - w1)], rel=1e-12)
    # gamma = 1, beta = 0.5
    tau = build_temperature_scheduler(["flsw", 0.5, 1])(S, T, 2.0)
    w0 = 1 - (1 / 1.0001) ** 2
    assert tau.tolist() == pytest.approx([2 + (w0 + 1) / 2 * 0.5 - w0 * 0.5, 2 + ((w0 + 1) / 2 - 1) * 0.5], rel=1e-12)


def test_cwsm_hand_values():
    S = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=F64)  # top probabilities 0.5, 0.75
    tau = build_temperature_scheduler(["cwsm", 2])(S, S * 0, 4.0)
    w = [1 / 0.501, 1 / 0.751]
    mean = sum(w) / 2
    assert tau.tolist() == pytest.approx([4 + (mean - w[0]) * 2, 4 + (mean - w[1]) * 2], rel=1e-12)


@pytest.mark.parametrize("spec", [["flsw", 50, 1], ["cwsm", 50]])
def test_temperature_never_goes_below_the_floor(spec):
    S = torch.tensor([[5.0, -5.0], [-5.0, 5.0], [0.0, 0.1]], dtype=F64)
    T = torch.tensor([[5.0, -5.0], [5.0, -5.0], [0.1, 0.0]], dtype=F64)
    tau = build_temperature_scheduler(spec)(S, T, 1.0)
    assert tau.min().item() == registry.MIN_TEMPERATURE  # the reference would go far below zero
    assert (tau > 1.0).any()  # the other side is untouched
    assert torch.isfinite(losses.kd_ce_loss(S, T, tau))


@pytest.mark.parametrize("spec", [["flsw", 1, 2], ["cwsm", 1]])
def test_shapes_no_gradient_and_half_precision(spec):
    sched = build_temperature_scheduler(spec)
    S2 = rand(4, 3).requires_grad_(True)
    tau = sched(S2, rand(4, 3, seed=1), 4.0)
    assert tau.shape == (4,) and not tau.requires_grad
    S3 = rand(2, 5, 3).requires_grad_(True)
    T3 = rand(2, 5, 3, seed=1)
    tau3 = sched(S3, T3, 4.0)
    assert tau3.shape == (2, 5) and not tau3.requires_grad
    # the (B, L) temperature feeds the KD losses; the mean runs over all B*L entries
    loss = losses.kd_ce_loss(S3, T3, tau3)
    loss.backward()
    assert S3.grad is not None and torch.isfinite(S3.grad).all()
    half = sched(S2.detach().half(), rand(4, 3, seed=1).half(), 4.0)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


def test_flsw_mean_over_all_tokens():
    S, T = rand(2, 3, 4), rand(2, 3, 4, seed=1)
    tau = build_temperature_scheduler(["flsw", 1, 1])(S, T, 3.0)
    flat = build_temperature_scheduler(["flsw", 1, 1])(S.reshape(6, 4), T.reshape(6, 4), 3.0)
    assert torch.allclose(tau.reshape(6), flat, rtol=1e-12)


@pytest.mark.parametrize(
    "spec,kwargs",
    [
        (["flsw", {"beta": 1, "gamma": 2}], {"beta": 1.0, "gamma": 2.0}),
        (["flsw", 1, 2, 1e-2], {"beta": 1.0, "gamma": 2.0, "eps": 1e-2}),
    ],
)
def test_dict_parameters_and_optional_eps(spec, kwargs):
    S, T = rand(4, 3), rand(4, 3, seed=1)
    got = build_temperature_scheduler(spec)(S, T, 4.0)
    assert torch.equal(got, schedules.flsw_temperature(**kwargs)(S, T, 4.0))


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("flsv", "unknown temperature scheduler \"flsv\". Fix: did you mean 'flsw'?"),
        (["flsw", 1], "temperature scheduler flsw takes beta, gamma, [eps]; got 1 value(s)"),
        (["flsw", {"beta": 1}], "temperature scheduler flsw needs gamma"),
        (["cwsm", 1, 2, 3], "temperature scheduler cwsm takes beta; got 3 value(s)"),
        (["cwsm", "1"], 'cwsm parameter beta must be a finite number, got "1"'),
        (["cwsm", True], "cwsm parameter beta must be a finite number, got true"),
        (
            ["flsw", {"beta": 1, "gama": 2}],
            "temperature scheduler flsw has no parameter \"gama\". Fix: did you mean 'gamma'?",
        ),
        ([1, 2], 'temperature_scheduler must be "none" or [name, *params], got [1, 2]'),
        (["linear_decay"], 'unknown temperature scheduler "linear_decay"'),
    ],
)
def test_bad_temperature_specs(spec, fragment):
    with pytest.raises(ValueError) as info:
        build_temperature_scheduler(spec)
    assert fragment in str(info.value)


def test_weight_schedulers():
    assert build_weight_scheduler("none") is None and build_weight_scheduler(None) is None
    decay, growth = build_weight_scheduler("linear_decay"), build_weight_scheduler("linear_growth")
    assert [decay(x) for x in (0.0, 0.25, 1.0)] == [1.0, 0.75, 0.0]
    assert [growth(x) for x in (0.0, 0.25, 1.0)] == [0.0, 0.25, 1.0]
    with pytest.raises(ValueError, match="choose one of none, linear_decay, linear_growth"):
        build_weight_scheduler("cosine")


def test_parity_with_textbrewer_schedulers():
    reference = pytest.importorskip("textbrewer.schedulers")
    for shape in ((8, 5), (3, 4, 5)):
        S, T = rand(*shape, seed=2), rand(*shape, seed=3)
        for ours, theirs in (
            (["flsw", 1.5, 2], reference.flsw_temperature_scheduler_builder(1.5, 2)),
            (["flsw", 0.5, 1], reference.flsw_temperature_scheduler_builder(0.5, 1)),
            (["cwsm", 1.0], reference.cwsm_temperature_scheduler_builder(1.0)),
        ):
            expected = theirs(S, T, 4.0)
            assert expected.min() > registry.MIN_TEMPERATURE  # above the floor: identical
            assert torch.allclose(build_temperature_scheduler(ours)(S, T, 4.0), expected, rtol=1e-12, atol=0)
        assert build_temperature_scheduler("constant")(S, T, 4.0) == reference.constant_temperature_scheduler(S, T, 4.0)
    for x in (0.0, 0.3, 1.0):
        assert build_weight_scheduler("linear_decay")(x) == reference.linear_decay_weight_scheduler(x)
        assert build_weight_scheduler("linear_growth")(x) == reference.linear_growth_weight_scheduler(x)
