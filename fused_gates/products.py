"""The lm_head's matrix products with a float32 (or float64) result, whatever the operands' dtype: rounding each
chunk's product to bfloat16 before summing biases training, so every product accumulates and lands in float32."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

_FLOAT32_OUTPUT: dict[tuple[str, int | None, torch.dtype], bool] = {}


def float32_output_products(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm`` and ``torch.addmm`` with ``out_dtype=torch.float32`` work for ``dtype`` operands on
    ``device`` (probed once per device and dtype, both functions: a torch build may have one and not the other).
    Where they do not, the products take float32 copies of the low-precision operands; on CUDA that is much slower,
    and a warning naming the torch version says so once."""
    key = (device.type, device.index, dtype)
    if key not in _FLOAT32_OUTPUT:
        probe = torch.ones(2, 2, device=device, dtype=dtype)
        accumulator = torch.ones(2, 2, device=device, dtype=torch.float32)
        try:
            product = torch.mm(probe, probe, out_dtype=torch.float32)
            summed = torch.addmm(accumulator, probe, probe, out_dtype=torch.float32)
            supported = product.dtype == torch.float32 and summed.dtype == torch.float32
            supported = supported and bool((summed == 3).all()) and bool((product == 2).all())
            reason = "wrong results"
        except (TypeError, NotImplementedError, RuntimeError) as error:  # tiny tensors: never out of memory
            supported = False
            reason = str(error).splitlines()[0][:160]
        if not supported and device.type == "cuda":
            warnings.warn(
                f"fused_gates: torch {torch.__version__} cannot multiply {dtype} matrices into a float32 result on "
                f"{device} ({reason}); the lm_head products run on float32 copies of the operands instead "
                "(same numbers, several times slower). A torch release with mm(..., out_dtype=) restores speed.",
                RuntimeWarning,
                stacklevel=3,
            )
        _FLOAT32_OUTPUT[key] = supported
    return _FLOAT32_OUTPUT[key]


def mm_into(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``out = a @ b`` with ``out`` float32 (or float64) and ``a``, ``b`` of ``out``'s dtype or of one low-precision
    dtype for which :func:`float32_output_products` holds: the product is never rounded to the low precision."""
    if a.dtype == out.dtype and b.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    return torch.mm(a, b, out_dtype=out.dtype, out=out)


def addmm_into(acc: Tensor, a: Tensor, b: Tensor, *, overwrite: bool = False) -> Tensor:
    """``acc += a @ b`` (``acc = a @ b`` with ``overwrite``, saving a read of ``acc``), accumulated in ``acc``'s
    float32."""
    if overwrite:
        return mm_into(acc, a, b)
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if torch.compiler.is_compiling():
        # Some torch releases (2.11) have no fake-tensor kernel for addmm's out_dtype overload, so a traced step
        # takes the product and the sum apart (a second [V, H] pass, only under compilation).
        return acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    return torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)


class ProductOperands:
    """The lm_head weight as the products of one call take it: as it is where float32-output products of its dtype
    work, else one float32 copy made on first use and kept for the call (never a conversion per chunk)."""

    def __init__(self, weight: Tensor, accumulate: torch.dtype):
        self._weight = weight
        self.accumulate = accumulate
        self.direct = weight.dtype == accumulate or float32_output_products(weight.device, weight.dtype)
        self._converted: Tensor | None = None

    @property
    def operand_dtype(self) -> torch.dtype:
        """The dtype the other operand of a product with the weight must have."""
        return self._weight.dtype if self.direct else self.accumulate

    @property
    def weight(self) -> Tensor:
        if self.direct:
            return self._weight
        if self._converted is None:
            self._converted = self._weight.to(self.accumulate)
        return self._converted

    def cast(self, x: Tensor) -> Tensor:
        """A small operand (a chunk of hidden states, or a dz buffer) in :attr:`operand_dtype`."""
        return x if x.dtype == self.operand_dtype else x.to(self.operand_dtype)
