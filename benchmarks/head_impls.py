"""The implementations the benchmarks compare, each as ``step(case) -> loss`` doing forward + backward.

All compute the SAPO objective (sigmoid gate, TRL's ``grpo`` aggregation) from last hidden states and the lm_head:
ours, the naive materialised-logits version, TRL 1.16's fused LM head + its SAPO formula, Liger-Kernel's fused
linear GRPO loss; ``floor`` is the three bare matrix products any forward + backward needs (logits, dh, dW).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

TAU_POS, TAU_NEG = 1.0, 1.05


@dataclass
class Case:
    hidden: Tensor  # [B, T, H], requires grad
    weight: Tensor  # [V, H], requires grad
    ids: Tensor
    advantages: Tensor
    mask: Tensor
    old: Tensor

    @property
    def flops_floor(self) -> float:
        # three products of 2 N H V flops each: logits = h W^T, dh = dz W, dW = dz^T h
        b, t, h = self.hidden.shape
        return 3 * 2 * b * t * h * self.weight.shape[0]


def make_case(batch: int, length: int, hidden_size: int, vocab: int, dtype=torch.float32, device="cpu",
              seed: int = 0) -> Case:
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(batch, length, hidden_size, generator=g).to(device, dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.02).to(device, dtype)
    ids = torch.randint(0, vocab, (batch, length), generator=g).to(device)
    advantages = torch.randn(batch, generator=g).to(device)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    mask[:, length - length // 8 :] = 0
    # old log-probs near the policy's: log-ratios of about +-0.1 (uniform log-probs under these weights)
    old = (-torch.log(torch.tensor(float(vocab))) + 0.1 * torch.randn(batch, length, generator=g)).to(device)
    return Case(hidden.requires_grad_(True), weight.requires_grad_(True), ids, advantages, mask, old)


def _grpo_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(per_token.dtype)
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()


def _sapo(logps: Tensor, case: Case) -> Tensor:
    """TRL 1.16's SAPO formula on given log-probs."""
    ratio = torch.exp(logps - case.old)
    adv = case.advantages.unsqueeze(1)
    tau = torch.where(adv > 0, TAU_POS, TAU_NEG)
    return _grpo_mean(-torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv, case.mask)


def ours(case: Case) -> Tensor:
    from fused_gates import gated_policy_loss

    out = gated_policy_loss(case.hidden, case.weight, case.ids, case.advantages, case.mask, case.old, gate="sigmoid",
                            tau_pos=TAU_POS, tau_neg=TAU_NEG, backend="auto")
    out.loss.backward()
    return out.loss.detach()


def naive(case: Case) -> Tensor:
    logits = (case.hidden @ case.weight.T).float()
    logps = torch.log_softmax(logits, -1).gather(-1, case.ids.unsqueeze(-1)).squeeze(-1)
    loss = _sapo(logps, case)
    loss.backward()
    return loss.detach()


def trl_chunked(case: Case) -> Tensor:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    b, t, h = case.hidden.shape
    logps, *_ = ChunkedLogProbFunction.apply(case.hidden.reshape(b * t, h), case.weight, None, case.ids.reshape(-1),
                                             1.0, 32768, None, 1.0, ())
    loss = _sapo(logps.view(b, t), case)
    loss.backward()
    return loss.detach()


def liger(case: Case) -> Tensor:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # compiled=False: torch.compile's CPU code generation would add minutes of compilation to each process
    fn = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, loss_type="sapo",
                                  sapo_temperature_pos=TAU_POS, sapo_temperature_neg=TAU_NEG)
    loss, _ = fn(case.hidden, case.weight, case.ids, case.mask, case.advantages, old_per_token_logps=case.old)
    loss.backward()
    return loss.detach()


def floor(case: Case) -> Tensor:
    b, t, h = case.hidden.shape
    with torch.no_grad():
        x = case.hidden.reshape(b * t, h)
        z = x @ case.weight.T
        dh = z @ case.weight
        dw = z.T @ x
    return (dh.sum() + dw.sum()) * 0


IMPLEMENTATIONS: dict[str, tuple[Callable[[Case], Tensor], str | None]] = {
    # name: (step, module that must be importable)
    "fused_gates": (ours, None),
    "naive_torch": (naive, None),
    "trl_chunked_logprob": (trl_chunked, "trl"),
    "liger_fused_linear_grpo": (liger, "liger_kernel"),
    "floor_3_gemms": (floor, None),
}


def missing_dependency(name: str) -> str | None:
    module = IMPLEMENTATIONS[name][1]
    if module is not None and importlib.util.find_spec(module) is None:
        return f"{name} needs the '{module}' package (pip install -e '.[bench]')"
    return None
