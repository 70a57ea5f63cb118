"""Gate formulas, the paper's admissibility properties and the registry."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fused_gates import SOFT_GATES, GateAdmissibilityError, GateParameters, check_admissible, get_gate, register_gate
from fused_gates.gates import available_gates, unregister_gate
from fused_gates.reference import reference_gate_value

taus = st.floats(min_value=0.5, max_value=20.0, allow_nan=False)


def gate_at(name: str, r: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    gate = get_gate(name)
    t = torch.full_like(r, tau)
    return gate.value(r, t), gate.derivative(r, t)


@pytest.mark.parametrize("name", SOFT_GATES)
@settings(max_examples=25, deadline=None)
@given(tau=taus)
def test_soft_gate_is_one_with_unit_slope_at_ratio_one(name, tau):
    value, slope = gate_at(name, torch.ones(1, dtype=torch.float64), tau)
    if name != "sigmoid":  # the paper's new gates pass through (1, 1); SAPO's sigmoid gives 2 / tau there
        assert value.item() == pytest.approx(1.0, abs=1e-12)
    else:
        assert value.item() == pytest.approx(2.0 / tau, rel=1e-12)
    assert slope.item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", SOFT_GATES)
@settings(max_examples=15, deadline=None)
@given(tau=taus)
def test_builtin_soft_gates_are_admissible(name, tau):
    gate = get_gate(name)
    check_admissible(name, gate.value, gate.derivative, [tau])


@pytest.mark.parametrize("name", SOFT_GATES)
@settings(max_examples=25, deadline=None)
@given(tau=taus, r=st.floats(min_value=1e-3, max_value=50.0))
def test_derivative_is_the_slope_of_the_paper_formula(name, tau, r):
    ratio = torch.tensor([r], dtype=torch.float64, requires_grad=True)
    advantage = torch.ones(1, dtype=torch.float64)
    paper = reference_gate_value(name, ratio, advantage, {"tau_pos": tau, "tau_neg": tau})
    (slope,) = torch.autograd.grad(paper.sum(), ratio)
    value, derivative = gate_at(name, ratio.detach(), tau)
    assert value.item() == pytest.approx(paper.item(), rel=1e-10, abs=1e-12)
    assert derivative.item() == pytest.approx(slope.item(), rel=1e-8, abs=1e-14)


@pytest.mark.parametrize("name", SOFT_GATES)
@settings(max_examples=25, deadline=None)
@given(tau=taus, side=st.sampled_from([-1.0, 1.0]), d=st.lists(st.floats(0.0, 0.999), min_size=2, max_size=2))
def test_derivative_decays_monotonically_away_from_one(name, tau, side, d):
    near, far = sorted(d)
    scale = 1.0 if side < 0 else 30.0  # below 1 the ratio stays positive; above, go out to r = 31
    _, derivative = gate_at(name, torch.tensor([1 + side * scale * near, 1 + side * scale * far],
                                              dtype=torch.float64), tau)
    assert derivative[0] >= derivative[1] - 1e-15


@pytest.mark.parametrize("name", SOFT_GATES)
def test_gates_stay_finite_for_extreme_ratios(name):
    r = torch.tensor([0.0, 1e-30, math.exp(-80), math.exp(80), 3e38], dtype=torch.float32)
    for tau in (0.5, 20.0):
        value, derivative = gate_at(name, r, tau)
        assert torch.isfinite(value).all() and torch.isfinite(derivative).all()
        assert torch.isfinite(derivative * r).all()
        assert (derivative[-1] * r[-1]).item() < 1e-2  # property (iv) holds numerically at the top of float32


def test_softsign_saturates_at_one_plus_inverse_tau():
    value, _ = gate_at("softsign", torch.tensor([math.exp(80)], dtype=torch.float32), 4.0)
    assert value.item() == pytest.approx(1.25, rel=1e-6)


def test_clip_gate_follows_the_sign_of_the_advantage():
    params = GateParameters(epsilon_low=0.2, epsilon_high=0.28)
    ratio = torch.tensor([0.5, 1.0, 1.5, 0.5, 1.0, 1.5, 0.5])
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 0.0])
    value, derivative = get_gate("clip").evaluate(ratio, advantages, params)
    assert value.tolist() == pytest.approx([0.5, 1.0, 1.28, 0.8, 1.0, 1.5, 0.8])
    assert derivative.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_temperature_follows_the_sign_of_the_advantage():
    params = GateParameters(tau_pos=2.0, tau_neg=7.0)
    ratio = torch.full((3,), 1.3, dtype=torch.float64)
    _, derivative = get_gate("erf").evaluate(ratio, torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64), params)
    expected = [math.exp(-0.5 * (t * 0.3) ** 2) for t in (2.0, 7.0, 7.0)]
    assert derivative.tolist() == pytest.approx(expected, rel=1e-12)


def cauchy_value(r, tau):
    # integral of 1 / (1 + x^2)^2, x = tau (r - 1): (x / (1 + x^2) + atan x) / (2 tau), shifted through (1, 1)
    x = tau * (r - 1)
    return 1 + (x / (1 + x * x) + torch.atan(x)) / (2 * tau)


def cauchy_derivative(r, tau):
    x = tau * (r - 1)
    return 1 / (1 + x * x) ** 2


def test_registering_an_admissible_custom_gate():
    gate = register_gate("cauchy_sq_test", cauchy_value, cauchy_derivative)
    try:
        assert "cauchy_sq_test" in available_gates()
        assert get_gate("cauchy_sq_test") is gate
        with pytest.raises(ValueError, match="already registered"):
            register_gate("cauchy_sq_test", cauchy_value, cauchy_derivative)
    finally:
        unregister_gate("cauchy_sq_test")
    with pytest.raises(ValueError, match="unknown gate 'cauchy_sq_test'"):
        get_gate("cauchy_sq_test")


BAD_GATES = {
    # (i): the derivative is not that of the value (the value has slope 2 at r = 1)
    "wrong_derivative": (lambda r, t: 1 + 2 * torch.atan(t * (r - 1)) / t, lambda r, t: 1 / (1 + (t * (r - 1)) ** 2),
                         r"\(i\)"),
    # (i): clip's derivative jumps
    "jump": (lambda r, t: torch.clamp(r, 0.8, 1.2), lambda r, t: ((r >= 0.8) & (r <= 1.2)).to(r.dtype), r"\(i\)"),
    # (ii): maximum 2 at r = 1
    "peak_two": (lambda r, t: 1 + 2 * torch.atan(t * (r - 1)) / t, lambda r, t: 2 / (1 + (t * (r - 1)) ** 2),
                 r"\(ii\)"),
    # (ii): maximum away from 1
    "shifted_peak": (lambda r, t: 1 + torch.atan(t * (r - 1.5)) / t, lambda r, t: 1 / (1 + (t * (r - 1.5)) ** 2),
                     r"\(ii\)"),
    # (iii): f' = 1 at r = 1 but rises again further out (a bump at r = 3)
    "second_bump": (
        lambda r, t: 1 + torch.atan(t * (r - 1)) / t + 0.3 * torch.atan(4 * (r - 3)) / 4,
        lambda r, t: 1 / (1 + (t * (r - 1)) ** 2) + 0.3 / (1 + (4 * (r - 3)) ** 2),
        r"\(ii\)|\(iii\)",
    ),
    # (iv): f'(r) r -> 1 / t^... no: f' ~ 1 / r decays but f' r does not vanish
    "heavy_tail": (
        lambda r, t: 1 + torch.log1p(t * (r - 1).clamp(min=0)) / t + torch.minimum(r - 1, torch.zeros_like(r)),
        lambda r, t: torch.where(r >= 1, 1 / (1 + t * (r - 1)), torch.ones_like(r)),
        r"\(iv\)",
    ),
}


@pytest.mark.parametrize("case", BAD_GATES.values(), ids=BAD_GATES.keys())
def test_inadmissible_gate_is_rejected_naming_the_property(case):
    value, derivative, prop = case
    with pytest.raises(GateAdmissibilityError, match=prop):
        register_gate("bad_gate_test", value, derivative)
    assert "bad_gate_test" not in available_gates()


def test_builtin_names_are_protected():
    with pytest.raises(ValueError, match="built-in"):
        register_gate("sigmoid", cauchy_value, cauchy_derivative)
    with pytest.raises(ValueError, match="built-in"):
        unregister_gate("clip")


# -- precision and range ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1e-6, 1e-3, 0.5, 12.0], ids=["tau1e-6", "tau1e-3", "tau0.5", "tau12"])
def test_erf_value_keeps_float32_precision_at_every_temperature(tau):
    """The paper's c (1 + erf) + 1 - c cancels c - c: at tau = 1e-6 in float32 it loses three digits."""
    r = torch.tensor([0.5, 0.9, 0.999, 1.001, 1.3, 2.0, 5.0], dtype=torch.float64)
    truth = reference_gate_value("erf", r, torch.ones_like(r), {"tau_pos": tau, "tau_neg": tau})
    value, _ = gate_at("erf", r.float(), tau)
    relative = ((value.double() - truth).abs() / truth.abs()).max().item()
    assert relative < 1e-6


def nan_past_1e9_value(r, tau):
    return torch.where(r > 1e9, torch.full_like(r, float("nan")), 1 + torch.atan(tau * (r - 1)) / tau)


def nan_past_1e9_derivative(r, tau):
    return torch.where(r > 1e9, torch.full_like(r, float("nan")), 1 / (1 + (tau * (r - 1)) ** 2))


def float32_overflow_value(r, tau):
    return 1 + torch.atan(tau * (r - 1)) / tau


def float32_overflow_derivative(r, tau):
    # 1 / (1 + x^2) written as 1 - x^2 / (1 + x^2): finite in float64 up to x = 20 exp(80), but x^2 overflows
    # float32 past x = 1.8e19 and inf / inf is NaN
    x = tau * (r - 1)
    return 1 - x * x / (1 + x * x)


UNREACHED_FAILURES = {
    "nan-past-1e9": (nan_past_1e9_value, nan_past_1e9_derivative, r"\(i\).*not finite in torch.float64"),
    "float32-overflow": (float32_overflow_value, float32_overflow_derivative, r"\(i\).*not finite in torch.float32"),
}


@pytest.mark.parametrize("case", UNREACHED_FAILURES.values(), ids=UNREACHED_FAILURES.keys())
def test_gate_failing_beyond_the_fine_grid_is_rejected(case):
    """Ratios reach exp(80) = 5.5e34 at run time: a gate must stay finite over all of it, in float32 too."""
    value, derivative, message = case
    with pytest.raises(GateAdmissibilityError, match=message):
        register_gate("breaks_late_test", value, derivative)
    assert "breaks_late_test" not in available_gates()


def test_builtin_gates_pass_the_reachable_range_check():
    for name in SOFT_GATES:
        gate = get_gate(name)
        check_admissible(name, gate.value, gate.derivative, (0.5, 20.0, 100.0))
