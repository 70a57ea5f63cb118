"""A float16 dz keeps its small entries: the row kernels store each row scaled to its bound (2^14) and hand the
factor to the products, so that neither a unit upstream gradient nor the softmax tail flushes entries to zero."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
triton_backend = pytest.importorskip("fused_gates.kernels.triton_backend", reason="needs the triton package")
from fused_gates.kernels.row_kernels import rows_grad_kernel  # noqa: E402

ROWS, VOCAB = 3, 203


def _float16_dz(scaled: bool):
    """dz of rows whose logits span 40 nats (probabilities down to ~1e-17) with a small coefficient g, as the
    aggregation weight of a long batch makes it: float64 truth, and what the kernel stores and its row factor."""
    g = torch.Generator().manual_seed(3)
    logits = torch.linspace(0.0, -40.0, VOCAB, dtype=torch.float64).repeat(ROWS, 1)
    logits += 0.01 * torch.randn(ROWS, VOCAB, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 5, 17])
    grad_logprobs = torch.tensor([1e-3, -2e-4, 5e-4], dtype=torch.float64)
    lse = torch.logsumexp(logits, -1)
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    p = torch.softmax(logits, -1)
    truth = -grad_logprobs[:, None] * p
    truth[torch.arange(ROWS), targets] += grad_logprobs
    dz = torch.zeros(ROWS, VOCAB, dtype=torch.float16)
    row_scale = torch.empty(ROWS) if scaled else None
    flat = [x.float().contiguous() for x in (lse, entropy, grad_logprobs)]
    rows_grad_kernel[(ROWS,)](logits.float(), dz, None, targets, flat[0], flat[1], flat[2], None, row_scale, VOCAB,
                              VOCAB, VOCAB, 1.0, None, BLOCK_V=64, num_warps=1)
    stored = dz.double() * (1.0 if row_scale is None else row_scale.double()[:, None])
    return truth, stored


@pytest.mark.skipif(triton_backend.interpreter_bug() is not None, reason="Triton's interpreter cannot run here")
def test_scaled_float16_dz_keeps_the_tail_that_a_plain_one_flushes():
    truth, scaled = _float16_dz(scaled=True)
    _, plain = _float16_dz(scaled=False)
    # float16's smallest subnormal is 6e-8: the plain store loses every entry below it, the scaled one keeps entries
    # down to (row bound / 2^14) * 6e-8
    representable = truth.abs() > truth.abs().amax(-1, keepdim=True) * 2**-14 * 2**-14
    assert (plain[representable] == 0).any()
    assert (scaled[representable] != 0).all()
    normal = truth.abs() > truth.abs().amax(-1, keepdim=True) * 2**-14 * 6.2e-5
    relative = ((scaled - truth).abs() / truth.abs())[normal]
    assert relative.max() < 1e-3  # float16's half ulp, relative
