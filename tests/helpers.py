"""Random, odd-sized inputs for the loss (never zeros) and comparisons with the reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LossInputs:
    hidden: Tensor
    weight: Tensor
    bias: Tensor
    ids: Tensor
    advantages: Tensor
    mask: Tensor
    old: Tensor
    ref: Tensor

    def leaves(self, dtype: torch.dtype = torch.float64, bias: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """Fresh leaf copies of hidden, weight (and bias) in ``dtype`` that require grad."""
        h = self.hidden.detach().to(dtype, copy=True).requires_grad_(True)
        w = self.weight.detach().to(dtype, copy=True).requires_grad_(True)
        b = self.bias.detach().to(dtype, copy=True).requires_grad_(True) if bias else None
        return h, w, b


def make_inputs(
    batch: int = 4,
    length: int = 7,
    hidden_size: int = 13,
    vocab: int = 37,
    *,
    seed: int = 0,
    masked_row: bool = True,
    zero_advantage_row: bool = True,
    log_ratio_scale: float = 0.3,
    token_advantages: bool = False,
) -> LossInputs:
    """Inputs with a fully masked row, a row with A = 0 and log-ratios of a realistic spread."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) * 0.4
    bias = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.2
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    shape = (batch, length) if token_advantages else (batch,)
    advantages = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = (torch.rand(batch, length, generator=g) > 0.25).long()
    mask[:, 0] = 1
    if masked_row and batch > 2:
        mask[1] = 0
    if zero_advantage_row and batch > 3:
        advantages[2] = 0.0
    # old / ref log-probs near the policy's so that ratios spread around 1 on both sides of the clip range
    logits = hidden @ weight.T + bias
    logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = logp + log_ratio_scale * torch.randn(batch, length, generator=g, dtype=torch.float64)
    ref = logp + log_ratio_scale * torch.randn(batch, length, generator=g, dtype=torch.float64)
    return LossInputs(hidden, weight, bias, ids, advantages, mask, old, ref)


def max_abs(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def run_distributed(nproc: int, target: list[str], *, env: dict[str, str] | None = None, timeout: float = 600):
    """``torch.distributed.run`` of ``target`` (a script and its arguments, or ``-m module ...``) on ``nproc`` CPU
    processes (gloo) and a free local port; returns the completed process (output captured)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full_env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           *target]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
