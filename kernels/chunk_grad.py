"""The training path: three matrix products in all, the gate fused into one row kernel per token chunk.

Per chunk of ``n`` valid tokens:

1. ``acc = h W^T`` with ``torch.mm`` into a reused float32 ``[n, V]`` buffer (cuBLAS, float32 output);
2. one Triton program per token row reads ``z = (acc + b) / T`` block by block and

   * pass 1: online ``m = max z``, ``S = sum exp(z - m)``, ``Z = sum exp(z - m)(z - m)`` and ``z_y``, so
     ``lse = m + log S``, ``logp = z_y - lse``, ``H = log S - Z / S`` and ``mean_p z = m + Z / S``;
   * epilogue in registers (token-level importance sampling, :func:`fused_gates.objective.evaluate_objective`):
     ``r = exp(logp - old)``, ``f(r)``, ``f'(r)`` from the constexpr-selected gate, the k3 KL (optionally
     times ``r``), the weighted per-token loss and ``g = d loss / d logp``; ``e = d loss / d H`` is given;
   * pass 2: ``dz = g (onehot(y) - p) - e p (z - mean_p z)`` written over the buffer (or, for float16 / bfloat16
     heads, into the low-precision operand of the next products, saving a copy pass);
3. ``dh = dz W / T`` and ``dW += dz^T h / T`` with cuBLAS (float32 accumulation), ``db += sum_t dz / T``.

Why this split: the two products of the backward dominate (each ``2 n H V`` flops) and cuBLAS runs them near peak
on any GPU, whereas a hand-written Triton GEMM with a fused epilogue must match cuBLAS first to gain anything.
Keeping the chunk's logits between the statistics and the gradient pass removes the fourth product that a
recomputing design pays; what Triton fuses is the memory-bound part (the online statistics, the gate, the KL and
the softmax gradient), read twice and written once per logit instead of the five or more elementwise passes of
the torch backend. Which of this and a fully fused Triton kernel is faster is for the GPU benchmark to decide
(``benchmarks/gpu_bench.py``).

Sequence-level importance sampling needs whole rows for each ratio: chunks then hold whole rows, a statistics-only
row kernel feeds the O(N) torch objective (:func:`~fused_gates.objective.evaluate_objective`), and a dz-only row
kernel turns the buffer into ``dz`` given ``lse``, ``H``, ``g`` and ``e``; the recomputing backward (rows longer
than a chunk) uses the same dz-only kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..objective import MAX_LOG_RATIO, ObjectiveConfig, TokenData, TokenTerms, evaluate_objective
from ..torch_backend import GradientNeeds, HeadSpec, addmm_fp32, mm_into_fp32, plan_chunk_tokens, row_aligned_chunks
from .gates import gate_value_and_derivative, kernel_gate

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Rows are memory bound: wide vocabulary blocks, no autotuning (the kernels write their input buffer in place,
# so a tuning rerun would read gradients as logits).
ROW_BLOCK_V = 64 if INTERPRETED else 4096
ROW_NUM_WARPS = 1 if INTERPRETED else 16

_MAX_LOG_RATIO = tl.constexpr(MAX_LOG_RATIO)


@triton.jit
def _load_logits(p_row, p_bias, o_v, m_v, inv_temperature, pad, HAS_BIAS: tl.constexpr):
    """``z = (acc + b) / T`` of one vocabulary block; ``pad`` in padded columns."""
    b_z = tl.load(p_row + o_v, mask=m_v, other=0.0) * inv_temperature
    if HAS_BIAS:
        b_z += tl.load(p_bias + o_v, mask=m_v, other=0.0).to(tl.float32) * inv_temperature
    return tl.where(m_v, b_z, pad)


@triton.jit
def _row_statistics(p_row, p_bias, target, V, inv_temperature, HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 1 over a row: ``(lse, entropy, mean_p z, z_y)``."""
    target_logit = tl.load(p_row + target) * inv_temperature
    if HAS_BIAS:
        target_logit += tl.load(p_bias + target).to(tl.float32) * inv_temperature
    row_max = float("-inf")
    sum_exp = 0.0
    sum_exp_shifted = 0.0
    for v_start in range(0, V, BLOCK_V):
        o_v = v_start + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_z = _load_logits(p_row, p_bias, o_v, m_v, inv_temperature, float("-inf"), HAS_BIAS)
        new_max = tl.maximum(row_max, tl.max(b_z, axis=0))  # finite: every block has a column
        scale = tl.exp(row_max - new_max)
        b_shift = b_z - new_max
        b_p = tl.exp(b_shift)
        max_step = tl.where(sum_exp > 0, row_max - new_max, 0.0)  # -inf * 0 on the first block
        b_pz = b_p * tl.where(m_v, b_shift, 0.0)  # padded columns: 0, not 0 * -inf
        sum_exp_shifted = scale * (sum_exp_shifted + max_step * sum_exp) + tl.sum(b_pz, axis=0)
        sum_exp = scale * sum_exp + tl.sum(b_p, axis=0)
        row_max = new_max
    log_sum = tl.log(sum_exp)
    mean_shifted = sum_exp_shifted / sum_exp
    return row_max + log_sum, log_sum - mean_shifted, row_max + mean_shifted, target_logit


@triton.jit
def _row_write_grad(
    p_row,
    p_dz_row,
    p_bias,
    target,
    V,
    inv_temperature,
    log_sum_exp,
    mean_logit,
    grad_logprob,
    grad_entropy,
    HAS_BIAS: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Pass 2: ``dz = g (onehot - p) - e p (z - mean_p z)`` (reads each block before writing it)."""
    for v_start in range(0, V, BLOCK_V):
        o_v = v_start + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_z = _load_logits(p_row, p_bias, o_v, m_v, inv_temperature, 0.0, HAS_BIAS)  # padded columns: not stored
        b_p = tl.exp(b_z - log_sum_exp)
        b_dz = b_p * (-grad_logprob - grad_entropy * (b_z - mean_logit)) if HAS_ENTROPY else -grad_logprob * b_p
        b_dz += tl.where(o_v == target, grad_logprob, 0.0)
        tl.store(p_dz_row + o_v, b_dz.to(p_dz_row.dtype.element_ty), mask=m_v)


@triton.jit
def _token_objective(
    logprob,
    entropy,
    advantage,
    old_logprob,
    ref_logprob,
    loss_weight,
    entropy_weight,
    tau_pos,
    tau_neg,
    epsilon_low,
    epsilon_high,
    beta,
    GATE: tl.constexpr,
    CUSTOM_VALUE: tl.constexpr,
    CUSTOM_DERIVATIVE: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_KL: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
):
    """Token-level objective: ``l = -f(r) A + beta kl [* r]``, loss ``w l + e H``, ``g = w (dl/dr r + dl/dlogp)``."""
    if HAS_OLD:
        log_ratio = tl.minimum(tl.maximum(logprob - old_logprob, -_MAX_LOG_RATIO), _MAX_LOG_RATIO)
    else:
        log_ratio = logprob * 0.0  # on-policy: r = 1 with gradient dr/dlogp = r
    ratio = tl.exp(log_ratio)
    value, derivative = gate_value_and_derivative(
        ratio, advantage, tau_pos, tau_neg, epsilon_low, epsilon_high, GATE, CUSTOM_VALUE, CUSTOM_DERIVATIVE
    )
    token_loss = -value * advantage
    grad_ratio = -advantage * derivative
    grad_local = logprob * 0.0
    kl = logprob * 0.0
    if HAS_KL:
        delta = tl.minimum(tl.maximum(ref_logprob - logprob, -_MAX_LOG_RATIO), _MAX_LOG_RATIO)
        exp_delta = tl.exp(delta)
        kl = exp_delta - delta - 1.0
        if BIAS_CORRECTION:
            grad_ratio += beta * kl
            grad_local = beta * (1.0 - exp_delta) * ratio
            kl = kl * ratio
        else:
            grad_local = beta * (1.0 - exp_delta)
        token_loss += beta * kl
    weighted_loss = loss_weight * token_loss
    if HAS_ENTROPY:
        weighted_loss += entropy_weight * entropy
    grad_logprob = loss_weight * (grad_ratio * ratio + grad_local)
    return weighted_loss, grad_logprob, ratio, value, derivative, kl


@triton.jit
def _fused_token_rows_kernel(
    p_logits,
    p_dz,
    p_bias,
    p_targets,
    p_advantages,
    p_old_logprobs,
    p_ref_logprobs,
    p_loss_weight,
    p_entropy_weight,
    p_logprobs,
    p_entropy,
    p_ratio,
    p_gate_value,
    p_gate_grad,
    p_kl,
    p_grad_logprobs,
    p_token_loss,
    V,
    stride_logits,
    stride_dz,
    inv_temperature,
    tau_pos,
    tau_neg,
    epsilon_low,
    epsilon_high,
    beta,
    GATE: tl.constexpr,
    CUSTOM_VALUE: tl.constexpr,
    CUSTOM_DERIVATIVE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_KL: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One token row: statistics, the objective's epilogue, then dz over the row."""
    i = tl.program_id(0)
    p_row = p_logits + i.to(tl.int64) * stride_logits
    target = tl.load(p_targets + i)
    log_sum_exp, entropy, mean_logit, target_logit = _row_statistics(
        p_row, p_bias, target, V, inv_temperature, HAS_BIAS, BLOCK_V
    )
    logprob = target_logit - log_sum_exp

    advantage = tl.load(p_advantages + i)
    old_logprob = tl.load(p_old_logprobs + i) if HAS_OLD else 0.0
    ref_logprob = tl.load(p_ref_logprobs + i) if HAS_KL else 0.0
    loss_weight = tl.load(p_loss_weight + i)
    entropy_weight = tl.load(p_entropy_weight + i)
    token_loss, grad_logprob, ratio, value, derivative, kl = _token_objective(
        logprob,
        entropy,
        advantage,
        old_logprob,
        ref_logprob,
        loss_weight,
        entropy_weight,
        tau_pos,
        tau_neg,
        epsilon_low,
        epsilon_high,
        beta,
        GATE,
        CUSTOM_VALUE,
        CUSTOM_DERIVATIVE,
        HAS_OLD,
        HAS_KL,
        BIAS_CORRECTION,
        HAS_ENTROPY,
    )
    tl.store(p_logprobs + i, logprob)
    tl.store(p_entropy + i, entropy)
    tl.store(p_ratio + i, ratio)
    tl.store(p_gate_value + i, value)
    tl.store(p_gate_grad + i, derivative)
    if HAS_KL:
        tl.store(p_kl + i, kl)
    tl.store(p_grad_logprobs + i, grad_logprob)
    tl.store(p_token_loss + i, token_loss)

    _row_write_grad(
        p_row,
        p_dz + i.to(tl.int64) * stride_dz,
        p_bias,
        target,
        V,
        inv_temperature,
        log_sum_exp,
        mean_logit,
        grad_logprob,
        entropy_weight,
        HAS_BIAS,
        HAS_ENTROPY,
        BLOCK_V,
    )


@triton.jit
def _rows_statistics_kernel(
    p_logits,
    p_bias,
    p_targets,
    p_logprobs,
    p_entropy,
    p_log_sum_exp,
    V,
    stride_logits,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i = tl.program_id(0)
    target = tl.load(p_targets + i)
    log_sum_exp, entropy, _, target_logit = _row_statistics(
        p_logits + i.to(tl.int64) * stride_logits, p_bias, target, V, inv_temperature, HAS_BIAS, BLOCK_V
    )
    tl.store(p_logprobs + i, target_logit - log_sum_exp)
    tl.store(p_entropy + i, entropy)
    tl.store(p_log_sum_exp + i, log_sum_exp)


@triton.jit
def _rows_grad_kernel(
    p_logits,
    p_dz,
    p_bias,
    p_targets,
    p_log_sum_exp,
    p_entropy,
    p_grad_logprobs,
    p_grad_entropy,
    V,
    stride_logits,
    stride_dz,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """dz of one row from saved statistics: ``mean_p z = lse - H``."""
    i = tl.program_id(0)
    log_sum_exp = tl.load(p_log_sum_exp + i)
    grad_entropy = tl.load(p_grad_entropy + i) if HAS_ENTROPY else 0.0
    mean_logit = log_sum_exp - tl.load(p_entropy + i) if HAS_ENTROPY else 0.0
    _row_write_grad(
        p_logits + i.to(tl.int64) * stride_logits,
        p_dz + i.to(tl.int64) * stride_dz,
        p_bias,
        tl.load(p_targets + i),
        V,
        inv_temperature,
        log_sum_exp,
        mean_logit,
        tl.load(p_grad_logprobs + i),
        grad_entropy,
        HAS_BIAS,
        HAS_ENTROPY,
        BLOCK_V,
    )


# ---------------------------------------------------------------------------------------------------------------
# Host side


class _Workspace:
    """The chunk's float32 product ``h W^T`` and, for low-precision heads, the dz operand of the backward products;
    reused by every chunk."""

    def __init__(self, rows: int, head: HeadSpec, device: torch.device, needs: GradientNeeds | None):
        with_grad = needs is not None and needs.any
        self.float32_dz = needs is not None and needs.bias
        self.logits = torch.empty(rows, head.vocab, device=device, dtype=torch.float32)
        low = head.weight.dtype != torch.float32
        self.dz = torch.empty(rows, head.vocab, device=device, dtype=head.weight.dtype) if with_grad and low else None

    def product(self, hidden: Tensor, weight: Tensor) -> Tensor:
        return mm_into_fp32(self.logits[: hidden.shape[0]], hidden, weight.t())

    def grad_buffer(self, rows: int) -> Tensor:
        """Where the row kernel writes dz: over the logits, or straight into the low-precision operand unless the
        bias gradient needs the float32 dz (its column sums)."""
        return self.logits[:rows] if self.dz is None or self.float32_dz else self.dz[:rows]

    def operand(self, dz: Tensor, dtype: torch.dtype) -> Tensor:
        """dz in the dtype of the backward products."""
        return dz if dz.dtype == dtype else self.dz[: dz.shape[0]].copy_(dz)


def _plan(num_tokens: int, head: HeadSpec, device: torch.device, needs: GradientNeeds) -> tuple[int, _Workspace]:
    extra = 2 if head.weight.dtype != torch.float32 else 0
    rows = plan_chunk_tokens(max(num_tokens, 1), head.vocab, head.memory_budget_mb, extra_bytes_per_logit=extra)
    return rows, _Workspace(rows, head, device, needs)


class _Gradients:
    """``dh = dz W / T``, ``dW = dz^T h / T``, ``db = sum_t dz / T`` accumulated in float32. The ``1 / T`` of dW is
    applied once at the end, that of dh per chunk (small)."""

    def __init__(self, num_tokens: int, hidden_size: int, head: HeadSpec, needs: GradientNeeds, device):
        self.head = head
        self.hidden = torch.zeros(num_tokens, hidden_size, device=device) if needs.hidden else None
        self.weight = torch.zeros(head.weight.shape, device=device) if needs.weight else None
        self.bias = torch.zeros(head.vocab, device=device) if needs.bias else None

    def add(self, rows: slice, dz: Tensor, hidden: Tensor, ws: _Workspace) -> None:
        if self.bias is not None:
            self.bias.add_(dz.sum(dim=0, dtype=torch.float32), alpha=self.head.inv_temperature)
        if self.hidden is None and self.weight is None:
            return
        operand = ws.operand(dz, self.head.weight.dtype)
        if self.hidden is not None:
            out = mm_into_fp32(self.hidden[rows], operand, self.head.weight)
            if self.head.inv_temperature != 1.0:
                out.mul_(self.head.inv_temperature)
        if self.weight is not None:
            addmm_fp32(self.weight, operand.t(), hidden)

    def result(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if self.weight is not None and self.head.inv_temperature != 1.0:
            self.weight.mul_(self.head.inv_temperature)
        return self.hidden, self.weight, self.bias


def _row_launch(num_rows: int) -> tuple[tuple[int], dict]:
    return (num_rows,), {"BLOCK_V": ROW_BLOCK_V, "num_warps": ROW_NUM_WARPS}


def _bias_pointer(head: HeadSpec, fallback: Tensor) -> Tensor:
    return head.bias if head.bias is not None else fallback


@dataclass
class ChunkResult:
    logprobs: Tensor
    entropy: Tensor
    terms: list[TokenTerms]
    gradients: tuple[Tensor | None, Tensor | None, Tensor | None]


def _fused_token_chunk(
    ws: _Workspace,
    hidden: Tensor,
    targets: Tensor,
    tokens: TokenData,
    head: HeadSpec,
    config: ObjectiveConfig,
    logprobs: Tensor,
    entropy: Tensor,
) -> tuple[Tensor, TokenTerms]:
    """Token level: one row kernel does statistics, objective and dz; returns dz and the chunk's terms."""
    n = hidden.shape[0]
    logits = ws.product(hidden, head.weight)
    dz = ws.grad_buffer(n)
    gate_id, value_fn, derivative_fn = kernel_gate(config.gate)
    has_kl = config.beta != 0.0
    out = {
        name: torch.empty(n, device=hidden.device, dtype=torch.float32)
        for name in ("ratio", "gate_value", "gate_grad", "kl", "grad_logprobs", "token_loss")
    }
    params = config.params
    grid, launch = _row_launch(n)
    _fused_token_rows_kernel[grid](
        logits,
        dz,
        _bias_pointer(head, logits),
        targets,
        tokens.advantages,
        tokens.old_logprobs if tokens.old_logprobs is not None else tokens.advantages,
        tokens.ref_logprobs if has_kl else tokens.advantages,
        tokens.loss_weight,
        tokens.entropy_weight,
        logprobs,
        entropy,
        out["ratio"],
        out["gate_value"],
        out["gate_grad"],
        out["kl"],
        out["grad_logprobs"],
        out["token_loss"],
        head.vocab,
        logits.stride(0),
        dz.stride(0),
        head.inv_temperature,
        params.tau_pos,
        params.tau_neg,
        params.epsilon_low,
        params.epsilon_high,
        config.beta,
        GATE=gate_id,
        CUSTOM_VALUE=value_fn,
        CUSTOM_DERIVATIVE=derivative_fn,
        HAS_BIAS=head.bias is not None,
        HAS_OLD=tokens.old_logprobs is not None,
        HAS_KL=has_kl,
        BIAS_CORRECTION=config.use_bias_correction_kl,
        HAS_ENTROPY=config.has_entropy_bonus,
        **launch,
    )
    terms = TokenTerms(
        loss=out["token_loss"].sum(),
        grad_logprobs=out["grad_logprobs"],
        grad_entropy=tokens.entropy_weight,
        ratio=out["ratio"],
        gate_value=out["gate_value"],
        gate_grad=out["gate_grad"],
        kl=out["kl"] if has_kl else None,
    )
    return dz, terms


def _statistics_then_grad_chunk(
    ws: _Workspace,
    hidden: Tensor,
    targets: Tensor,
    tokens: TokenData,
    head: HeadSpec,
    config: ObjectiveConfig,
    logprobs: Tensor,
    entropy: Tensor,
) -> tuple[Tensor, TokenTerms]:
    """Sequence level (whole rows in the chunk): statistics kernel, O(n) torch objective, dz kernel."""
    n = hidden.shape[0]
    logits = ws.product(hidden, head.weight)
    log_sum_exp = torch.empty(n, device=hidden.device, dtype=torch.float32)
    grid, launch = _row_launch(n)
    _rows_statistics_kernel[grid](
        logits,
        _bias_pointer(head, logits),
        targets,
        logprobs,
        entropy,
        log_sum_exp,
        head.vocab,
        logits.stride(0),
        head.inv_temperature,
        HAS_BIAS=head.bias is not None,
        **launch,
    )
    terms = evaluate_objective(logprobs, entropy, tokens, config)
    dz = ws.grad_buffer(n)
    _launch_rows_grad(
        logits, dz, targets, head, log_sum_exp, entropy, terms.grad_logprobs,
        terms.grad_entropy if config.has_entropy_bonus else None,
    )
    return dz, terms


def _launch_rows_grad(
    logits: Tensor,
    dz: Tensor,
    targets: Tensor,
    head: HeadSpec,
    log_sum_exp: Tensor,
    entropy: Tensor,
    grad_logprobs: Tensor,
    grad_entropy: Tensor | None,
) -> None:
    grid, launch = _row_launch(logits.shape[0])
    f32 = torch.float32
    _rows_grad_kernel[grid](
        logits,
        dz,
        _bias_pointer(head, logits),
        targets,
        log_sum_exp.to(f32).contiguous(),
        entropy.to(f32).contiguous(),
        grad_logprobs.to(f32).contiguous(),
        grad_entropy.to(f32).contiguous() if grad_entropy is not None else log_sum_exp,
        head.vocab,
        logits.stride(0),
        dz.stride(0),
        head.inv_temperature,
        HAS_BIAS=head.bias is not None,
        HAS_ENTROPY=grad_entropy is not None,
        **launch,
    )


def fused_loss_chunks(
    hidden: Tensor,
    targets: Tensor,
    tokens: TokenData,
    head: HeadSpec,
    config: ObjectiveConfig,
    needs: GradientNeeds,
) -> ChunkResult | None:
    """Statistics, objective and gradients chunk by chunk (three products); ``None`` when a row at sequence level
    exceeds a chunk (the caller then recomputes in backward)."""
    num_tokens = hidden.shape[0]
    rows, ws = _plan(num_tokens, head, hidden.device, needs)
    chunks = row_aligned_chunks(tokens, rows, config.sequence_level)
    if chunks is None:
        return None
    logprobs = torch.empty(num_tokens, device=hidden.device, dtype=torch.float32)
    entropy = torch.empty_like(logprobs)
    grads = _Gradients(num_tokens, hidden.shape[1], head, needs, hidden.device)
    chunk_step = _statistics_then_grad_chunk if config.sequence_level else _fused_token_chunk
    all_terms = []
    for chunk in chunks:
        dz, terms = chunk_step(
            ws, hidden[chunk], targets[chunk], tokens.select(chunk), head, config, logprobs[chunk], entropy[chunk]
        )
        all_terms.append(terms)
        grads.add(chunk, dz, hidden[chunk], ws)
    return ChunkResult(logprobs, entropy, all_terms, grads.result())


def recompute_gradient_chunks(
    hidden: Tensor,
    targets: Tensor,
    head: HeadSpec,
    needs: GradientNeeds,
    log_sum_exp: Tensor,
    entropy: Tensor,
    grad_logprobs: Tensor,
    grad_entropy: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward from saved per-token statistics: the chunk's product is recomputed (a fourth product)."""
    num_tokens = hidden.shape[0]
    grads = _Gradients(num_tokens, hidden.shape[1], head, needs, hidden.device)
    rows, ws = _plan(num_tokens, head, hidden.device, needs)
    for start in range(0, num_tokens, rows):
        chunk = slice(start, min(start + rows, num_tokens))
        logits = ws.product(hidden[chunk], head.weight)
        dz = ws.grad_buffer(logits.shape[0])
        _launch_rows_grad(
            logits,
            dz,
            targets[chunk],
            head,
            log_sum_exp[chunk],
            entropy[chunk],
            grad_logprobs[chunk],
            None if grad_entropy is None else grad_entropy[chunk],
        )
        grads.add(chunk, dz, hidden[chunk], ws)
    return grads.result()
