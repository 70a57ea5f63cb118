"""How every kernel turns the lm_head product into logits, and the slope it needs for the gradient.

With ``x = h W^T + b`` (the float32 product and the bias), the logits are ``z = x / T`` or, for models that soft-cap
them (Gemma 2 / 3: ``final_logit_softcapping``), ``z = c tanh(x / c) / T``. Then ``dz/dx = (1 - tanh^2(x / c)) / T
= (1 - (z T / c)^2) / T``: the row kernels write ``dL/dz (1 - (z T / c)^2)`` and the host applies ``1 / T`` in the
products, as without a cap.

``tanh`` is written out (the same code in Triton's interpreter and on GPU): the odd Taylor series below 0.2, where
``1 - 2 / (exp(2x) + 1)`` would cancel, and that quotient above (exact to float32 rounding, +-1 at overflow).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    a = tl.abs(x)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    e = tl.exp(-2.0 * a)  # never overflows
    quotient = (1.0 - e) / (1.0 + e)
    return tl.where(a < 0.2, series, tl.where(x < 0, -quotient, quotient))


@triton.jit
def to_logits(b_x, inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr):
    """``z`` from ``x = h W^T + b``: ``x / T``, or ``c tanh(x / c) / T`` with a soft-cap ``c``."""
    if HAS_SOFTCAP:
        return softcap * inv_temperature * tanh(b_x / softcap)
    else:
        return b_x * inv_temperature


@triton.jit
def softcap_slope(b_z, inv_temperature, softcap):
    """``1 - tanh^2(x / c) = 1 - (z T / c)^2``: the soft-cap's factor of the logits gradient."""
    t = b_z / (softcap * inv_temperature)
    return 1.0 - t * t
