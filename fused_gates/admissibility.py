"""The numerical check of a gate against the paper's admissibility properties (section 4), run by ``register_gate``.

A user's gate is a pair of elementwise torch functions ``f(r, tau)``, ``f'(r, tau)``. Before it may enter a loss it
must (i) be continuously differentiable, (ii) have f' maximal and equal to 1 at r = 1, (iii) have f' decreasing
away from 1, (iv) have f'(r) r -> 0, and stay finite wherever the loss can evaluate it: ratios reach
``exp(+-MAX_LOG_RATIO)`` (the clamp of the log-ratio) in float32, and the gradient uses ``f'(r) r``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

GateFunction = Callable[[Tensor, Tensor], Tensor]
"""``(ratio, tau) -> tensor``: a gate's value or derivative, elementwise, ``tau`` broadcast to ``ratio``."""

MAX_LOG_RATIO = 80.0
"""Log-ratios (and the KL's ``ref - logp``) are clamped to +-80 before exponentiation: exp(80) = 5.5e34 keeps
``A * r`` finite in float32, whereas exp(89) is already infinite. Gates are therefore evaluated on
``[exp(-80), exp(80)]`` and are checked on all of it when registered."""


class GateAdmissibilityError(ValueError):
    """A gate violates one of the paper's admissibility properties (i)-(iv); the message names which and where."""


def _fine_grid() -> Tensor:
    # Fine steps where f' changes fastest (around r = 1 for tau up to ~20), geometric steps out to 1e8 for (iv).
    near = torch.linspace(1e-4, 4.0, 40_000, dtype=torch.float64)
    far = torch.logspace(math.log10(4.0), 8.0, 2_000, dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    return torch.unique(torch.cat([near, one, far]))


def _reachable_grid() -> Tensor:
    """Every decade of the ratios the loss can produce, exp(-80) ... exp(80), densely (8 points per unit of log r)."""
    log_r = torch.linspace(-MAX_LOG_RATIO, MAX_LOG_RATIO, int(16 * MAX_LOG_RATIO) + 1, dtype=torch.float64)
    return torch.unique(torch.cat([log_r.exp(), torch.ones(1, dtype=torch.float64)]))


def check_admissible(name: str, value: GateFunction, derivative: GateFunction, taus: Sequence[float]) -> None:
    """Check the paper's properties (section 4) numerically, for each tau.

    On r in (0, 1e8] in float64:

    (i) f is continuously differentiable: f' is finite, agrees with central differences of f, and has no jump
        larger than 0.01 between neighbouring grid points 1e-4 apart;
    (ii) f' attains its global maximum 1 at r = 1;
    (iii) f' is non-decreasing on (0, 1] and non-increasing on [1, inf);
    (iv) f'(r) r -> 0 as r -> inf: at most 1e-2 at r = 1e8 and non-increasing over r in [1e6, 1e8].

    And over every ratio the loss can reach, ``exp(-80) ... exp(80)``, in float64 and in float32 (the dtype the
    kernels and the float32 path evaluate gates in): f, f' and f'(r) r are finite, f' stays in [0, 1], and (iii)
    and (iv) still hold there (a gate that breaks down past the fine grid would otherwise poison the loss only when
    a large ratio first occurs in training).

    Raises :class:`GateAdmissibilityError` naming the first property that fails, the tau and the ratio.
    """
    for tau_value in taus:
        _check_one_temperature(name, value, derivative, float(tau_value))


def _evaluate(fn: GateFunction, r: Tensor, tau_value: float) -> Tensor:
    with torch.no_grad():
        return fn(r, torch.full_like(r, tau_value))


def _check_one_temperature(name: str, value: GateFunction, derivative: GateFunction, tau_value: float) -> None:
    def fail(prop: str, where: float, detail: str) -> GateAdmissibilityError:
        return GateAdmissibilityError(
            f"gate {name!r} violates admissibility property {prop} at r={where:.6g}, tau={tau_value:g}: {detail}"
        )

    c1, peak, monotone, tail = (
        "(i) (continuously differentiable)",
        "(ii) (f' has its maximum 1 at r = 1)",
        "(iii) (f' decreases monotonically away from r = 1)",
        "(iv) (f'(r) r -> 0 as r -> inf)",
    )
    r = _fine_grid()
    f = _evaluate(value, r, tau_value).to(torch.float64)
    df = _evaluate(derivative, r, tau_value).to(torch.float64)
    if f.shape != r.shape or df.shape != r.shape:
        raise GateAdmissibilityError(f"gate {name!r}: value and derivative must be elementwise (shape of r)")

    bad = ~(torch.isfinite(f) & torch.isfinite(df))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise fail(c1, r[i].item(), "f or f' is not finite")
    near = r <= 4.0
    jumps = (df[near][1:] - df[near][:-1]).abs()
    if (jumps > 1e-2).any():
        i = int((jumps > 1e-2).nonzero()[0])
        raise fail(c1, r[near][i].item(), f"f' jumps by {jumps[i].item():.3g}")
    h = 1e-6
    probe = torch.linspace(0.05, 3.0, 591, dtype=torch.float64)
    central = (_evaluate(value, probe + h, tau_value) - _evaluate(value, probe - h, tau_value)).to(torch.float64)
    central = central / (2 * h)
    stated = _evaluate(derivative, probe, tau_value).to(torch.float64)
    mismatch = (central - stated).abs() > 1e-4 * (1 + stated.abs())
    if mismatch.any():
        i = int(mismatch.nonzero()[0])
        raise fail(c1, probe[i].item(),
                   f"the derivative {stated[i].item():.6g} does not match the value's slope {central[i].item():.6g}")

    at_one = df[r == 1.0]
    if (at_one - 1).abs().max() > 1e-6:
        raise fail(peak, 1.0, f"f'(1) = {at_one.item():.6g}")
    above = df > 1 + 1e-9
    if above.any():
        i = int(above.nonzero()[0])
        raise fail(peak, r[i].item(), f"f' = {df[i].item():.6g} > 1")

    _check_monotone(r, df, lambda i, side: fail(monotone, r[i].item(), (
        f"f' is not monotone {side} 1: f'({r[i].item():.6g})={df[i].item():.6g}, "
        f"f'({r[i + 1].item():.6g})={df[i + 1].item():.6g}")))

    tail_r = torch.tensor([1e6, 1e7, 1e8], dtype=torch.float64)
    tail_values = _evaluate(derivative, tail_r, tau_value).to(torch.float64) * tail_r
    rising = (tail_values[1:] > tail_values[:-1] + 1e-12).any()
    if not torch.isfinite(tail_values).all() or tail_values[-1] > 1e-2 or rising:
        raise fail(tail, 1e8, "f'(r) r at r = 1e6, 1e7, 1e8: " + ", ".join(f"{t:.3g}" for t in tail_values.tolist()))

    _check_reachable_range(value, derivative, tau_value, fail, c1, peak, monotone, tail)


def _check_monotone(r: Tensor, df: Tensor, fail) -> None:
    step = df[1:] - df[:-1]
    rising_left = (r[1:] <= 1.0) & (step < -1e-12)
    falling_right = (r[:-1] >= 1.0) & (step > 1e-12)
    for wrong, side in ((rising_left, "below"), (falling_right, "above")):
        if wrong.any():
            raise fail(int(wrong.nonzero()[0]), side)


def _check_reachable_range(value, derivative, tau_value: float, fail, c1: str, peak: str, monotone: str,
                           tail: str) -> None:
    r64 = _reachable_grid()
    for dtype in (torch.float64, torch.float32):
        r = r64.to(dtype)
        f = _evaluate(value, r, tau_value)
        df = _evaluate(derivative, r, tau_value)
        bad = ~(torch.isfinite(f) & torch.isfinite(df) & torch.isfinite(df * r))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise fail(c1, r[i].item(), f"f, f' or f'(r) r is not finite in {dtype} "
                       f"(f={f[i].item():.6g}, f'={df[i].item():.6g}); ratios reach exp(+-{MAX_LOG_RATIO:g})")
        outside = (df < -1e-9) | (df > 1 + 1e-6)
        if outside.any():
            i = int(outside.nonzero()[0])
            raise fail(peak, r[i].item(), f"f' = {df[i].item():.6g} in {dtype} lies outside [0, 1]")
        if dtype == torch.float64:
            df64 = df.to(torch.float64)
            _check_monotone(r64, df64, lambda i, side, df64=df64: fail(monotone, r64[i].item(), (
                f"f' is not monotone {side} 1 in the reachable range: f'({r64[i].item():.6g})="
                f"{df64[i].item():.6g}, f'({r64[i + 1].item():.6g})={df64[i + 1].item():.6g}")))
            top = (df64 * r64)[-1].item()
            if top > 1e-2:
                raise fail(tail, r64[-1].item(), f"f'(r) r = {top:.3g} at the largest reachable ratio")
