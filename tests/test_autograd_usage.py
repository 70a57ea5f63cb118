"""Ordinary autograd usages of the loss: repeated backward through a retained graph, zeroing gradients between
backwards, the upstream gradient's scale, and double backward (refused with a clear error, never a gradient
without a graph). Both backends (Triton in its interpreter on CPU), with and without a mask, float32 and a low
precision (bfloat16 for torch; float16 for Triton, whose interpreter mishandles bfloat16 products)."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, make_inputs

from fused_gates import BACKENDS, gated_policy_loss

COMPUTING_BACKENDS = [b for b in BACKENDS if b != "auto"]
SETTINGS = {
    "torch-fp32": ("torch", torch.float32),
    "torch-bf16": ("torch", torch.bfloat16),
    "triton-fp32": ("triton", torch.float32),
    "triton-fp16": ("triton", torch.float16),
}
# relative tolerance of "three backwards == three times one": the sum of three rounded gradients in the dtype
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}
OPTIONS = {
    # the forward forms the gradients (three products)
    "token-level": dict(gate="erf", tau_pos=2.0, tau_neg=3.0, entropy_coef=0.02),
    # rows longer than a chunk: the backward recomputes the products
    "sequence-recompute": dict(gate="sigmoid", importance_sampling_level="sequence", memory_budget_mb=0.003),
}


def _leaves(inputs, dtype):
    h, w, b = inputs.leaves(dtype)
    return (h.detach().to(DEVICE).requires_grad_(), w.detach().to(DEVICE).requires_grad_(),
            b.detach().to(DEVICE).requires_grad_())


def _loss(inputs, h, w, b, backend, masked, options):
    dtype = h.dtype
    mask = inputs.mask.to(DEVICE) if masked else None
    return gated_policy_loss(h, w, inputs.ids.to(DEVICE), inputs.advantages.to(DEVICE, dtype), mask,
                             inputs.old.to(DEVICE, dtype), bias=b, backend=backend, **options).loss


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    a, b = a.double().cpu(), b.double().cpu()
    return bool(((a - b).abs() <= rtol * (b.abs().max() + 1e-30)).all())


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("setting", SETTINGS.values(), ids=SETTINGS.keys())
def test_three_retained_backwards_give_three_times_the_gradient(setting, masked, options):
    backend, dtype = setting
    inputs = make_inputs(batch=3, length=5, hidden_size=12, vocab=70, seed=21)
    once = _leaves(inputs, dtype)
    _loss(inputs, *once, backend, masked, options).backward()
    thrice = _leaves(inputs, dtype)
    loss = _loss(inputs, *thrice, backend, masked, options)
    for _ in range(3):
        loss.backward(retain_graph=True)
    for name, single, triple in zip(("hidden", "weight", "bias"), once, thrice, strict=True):
        assert _close(triple.grad, 3 * single.grad.double(), TOLERANCE[dtype]), name


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("setting", SETTINGS.values(), ids=SETTINGS.keys())
def test_zeroing_the_gradient_between_backwards_leaves_one_gradient(setting, masked):
    backend, dtype = setting
    inputs = make_inputs(batch=3, length=5, hidden_size=12, vocab=70, seed=22)
    options = OPTIONS["token-level"]
    reference = _leaves(inputs, dtype)
    _loss(inputs, *reference, backend, masked, options).backward()
    leaves = _leaves(inputs, dtype)
    loss = _loss(inputs, *leaves, backend, masked, options)
    loss.backward(retain_graph=True)
    for leaf in leaves:
        leaf.grad.zero_()
    loss.backward()
    for name, expected, leaf in zip(("hidden", "weight", "bias"), reference, leaves, strict=True):
        assert _close(leaf.grad, expected.grad, 1e-6), name


@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
def test_upstream_gradient_scales_a_repeated_backward(backend):
    inputs = make_inputs(batch=3, length=5, hidden_size=12, vocab=70, seed=23)
    options = OPTIONS["token-level"]
    reference = _leaves(inputs, torch.float32)
    _loss(inputs, *reference, backend, True, options).backward()
    leaves = _leaves(inputs, torch.float32)
    loss = _loss(inputs, *leaves, backend, True, options)
    (loss * 0.5).backward(retain_graph=True)
    (loss * -2.0).backward()
    for name, expected, leaf in zip(("hidden", "weight", "bias"), reference, leaves, strict=True):
        assert _close(leaf.grad, -1.5 * expected.grad, 1e-6), name


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
def test_double_backward_raises_instead_of_returning_a_gradient_without_graph(backend, options):
    inputs = make_inputs(batch=3, length=5, hidden_size=12, vocab=70, seed=24)
    h, w, b = _leaves(inputs, torch.float32)
    loss = _loss(inputs, h, w, b, backend, True, options)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, h, create_graph=True)
    (grad,) = torch.autograd.grad(loss, h)  # a plain first-order gradient still works afterwards
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
