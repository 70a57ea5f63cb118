"""The training path, host side: three matrix products in all, the gate fused into one row kernel per token chunk.

Per chunk of ``n`` valid tokens:

1. ``acc = h W^T`` with ``torch.mm`` into a reused float32 ``[n, V]`` buffer (cuBLAS, float32 output);
2. one Triton program per token row (:mod:`fused_gates.kernels.row_kernels`) reads ``z = (acc + b) / T`` (or the
   soft-capped logits): the
   statistics, the objective's epilogue and ``dz``, written over the buffer or, for float16 / bfloat16 heads,
   straight into the low-precision operand of the next products (saving a copy pass);
3. ``dh = dz W / T`` and ``dW += dz^T h / T`` with cuBLAS (float32 accumulation; the first chunk writes dW instead
   of adding to zeros), ``db += sum_t dz / T``.

Why this split: the two products of the backward dominate (each ``2 n H V`` flops) and cuBLAS runs them near peak
on any GPU, whereas a hand-written Triton GEMM with a fused epilogue must match cuBLAS first to gain anything.
Keeping the chunk's logits between the statistics and the gradient pass removes the fourth product that a
recomputing design pays; what Triton fuses is the memory-bound part (the online statistics, the gate, the KL and
the softmax gradient), read twice and written once per logit.

Objectives that need whole rows (sequence-level importance sampling) take chunks of whole rows, a statistics-only
row kernel feeds the O(N) torch objective (``fused_gates.objective.evaluate_objective``), and a dz-only row kernel
turns the buffer into ``dz``; the recomputing backward (rows longer than a chunk, or a repeated backward) uses the
same dz-only kernel. A vocabulary-parallel head takes that split path too: between the two kernels, the slice's
statistics are made global (:mod:`fused_gates.vocab_parallel`), and dh is all-reduced at the end.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from ..backend import (
    GradientNeeds,
    Gradients,
    HeadSpec,
    LossForward,
    ProductOperands,
    SavedStatistics,
    addmm_into,
    mm_into,
    plan_chunk_tokens,
    row_aligned_chunks,
    saved_statistics,
    token_chunks,
)
from ..objective import ObjectiveConfig, TokenData, TokenTerms, evaluate_objective
from ..vocab_parallel import combine_slice_statistics
from .gates import kernel_gate
from .row_kernels import fused_token_rows_kernel, rows_grad_kernel, rows_statistics_kernel

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Rows are memory bound: wide vocabulary blocks, no autotuning (the kernels write their input buffer in place,
# so a tuning rerun would read gradients as logits).
ROW_BLOCK_V = 64 if INTERPRETED else 4096
ROW_NUM_WARPS = 1 if INTERPRETED else 16


class _Workspace:
    """The chunk's float32 product ``h W^T`` and, for low-precision heads, the dz operand of the backward products;
    reused by every chunk."""

    def __init__(self, rows: int, head: HeadSpec, device: torch.device, needs: GradientNeeds):
        self.operands = ProductOperands(head.weight, torch.float32)
        self.float32_dz = needs.bias  # the bias gradient sums dz's columns in float32
        self.logits = torch.empty(rows, head.vocab, device=device, dtype=torch.float32)
        low = self.operands.operand_dtype
        with_copy = needs.any and low != torch.float32
        self.dz = torch.empty(rows, head.vocab, device=device, dtype=low) if with_copy else None

    def product(self, hidden: Tensor) -> Tensor:
        return mm_into(self.logits[: hidden.shape[0]], self.operands.cast(hidden), self.operands.weight.t())

    def grad_buffer(self, rows: int) -> Tensor:
        """Where the row kernel writes dz: over the logits, or straight into the low-precision operand unless the
        bias gradient needs the float32 dz (its column sums)."""
        return self.logits[:rows] if self.dz is None or self.float32_dz else self.dz[:rows]

    def operand(self, dz: Tensor) -> Tensor:
        """dz in the dtype of the backward products."""
        return dz if dz.dtype == self.operands.operand_dtype else self.dz[: dz.shape[0]].copy_(dz)


def _plan(num_tokens: int, head: HeadSpec, device: torch.device, needs: GradientNeeds) -> tuple[int, _Workspace]:
    extra = 2 if needs.any and head.weight.dtype != torch.float32 else 0  # the low-precision dz operand
    budget = head.memory_budget_mb
    rows = plan_chunk_tokens(max(num_tokens, 1), head.planning_vocab, budget, extra_bytes_per_logit=extra)
    return rows, _Workspace(rows, head, device, needs)


def slice_targets(head: HeadSpec, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(read, one_hot)`` target columns of this rank's slice: ``read`` is safe to load (0 where another rank owns
    the target), ``one_hot`` is -1 there so that no column of this slice takes the one-hot part of dz."""
    if head.shard is None:
        return targets, targets
    local, owned = head.shard.local_targets(targets)
    return local, torch.where(owned, local, torch.full_like(local, -1))


class _Gradients:
    """``dh = dz W / T``, ``dW = dz^T h / T``, ``db = sum_t dz / T`` accumulated in float32. The ``1 / T`` of dW is
    applied once at the end, that of dh per chunk (small)."""

    def __init__(self, num_tokens: int, hidden_size: int, head: HeadSpec, needs: GradientNeeds, device):
        self.head = head
        self.hidden = torch.zeros(num_tokens, hidden_size, device=device) if needs.hidden else None
        self.weight = torch.empty(head.weight.shape, device=device) if needs.weight else None
        self.bias = torch.zeros(head.vocab, device=device) if needs.bias else None
        self._weight_written = False

    def add(self, rows: slice, dz: Tensor, hidden: Tensor, ws: _Workspace) -> None:
        if self.bias is not None:
            self.bias.add_(dz.sum(dim=0, dtype=torch.float32), alpha=self.head.inv_temperature)
        if self.hidden is None and self.weight is None:
            return
        operand = ws.operand(dz)
        if self.hidden is not None:
            out = mm_into(self.hidden[rows], operand, ws.operands.weight)
            if self.head.inv_temperature != 1.0:
                out.mul_(self.head.inv_temperature)
        if self.weight is not None:
            addmm_into(self.weight, operand.t(), ws.operands.cast(hidden), overwrite=not self._weight_written)
            self._weight_written = True

    def result(self) -> Gradients:
        if self.weight is not None:
            if not self._weight_written:
                self.weight.zero_()
            elif self.head.inv_temperature != 1.0:
                self.weight.mul_(self.head.inv_temperature)
        if self.hidden is not None and self.head.shard is not None:
            self.head.shard.all_reduce(self.hidden)  # each slice's dh is a partial sum over the vocabulary
        return self.hidden, self.weight, self.bias


def _row_launch(num_rows: int) -> tuple[tuple[int], dict]:
    return (num_rows,), {"BLOCK_V": ROW_BLOCK_V, "num_warps": ROW_NUM_WARPS}


_ChunkStep = Callable[..., tuple[Tensor, TokenTerms]]


def _fused_token_chunk(
    ws: _Workspace,
    hidden: Tensor,
    targets: Tensor,
    tokens: TokenData,
    head: HeadSpec,
    config: ObjectiveConfig,
    out: dict[str, Tensor],
) -> tuple[Tensor, TokenTerms]:
    """Token level: one row kernel does statistics, objective and dz; returns dz and the chunk's terms."""
    n = hidden.shape[0]
    logits = ws.product(hidden)
    dz = ws.grad_buffer(n)
    gate_id, value_fn, derivative_fn = kernel_gate(config.gate)
    has_kl = config.beta != 0.0
    terms = {
        name: torch.empty(n, device=hidden.device, dtype=torch.float32)
        for name in ("ratio", "gate_value", "gate_grad", "kl", "grad_logprobs", "token_loss")
    }
    params = config.params
    grid, launch = _row_launch(n)
    fused_token_rows_kernel[grid](
        logits,
        dz,
        head.bias,
        targets,
        tokens.advantages,
        tokens.old_logprobs,
        tokens.ref_logprobs if has_kl else None,
        tokens.loss_weight,
        tokens.entropy_weight if config.has_entropy_bonus else None,
        tokens.policy_weight,
        out["logprobs"],
        out["entropy"],
        out["log_sum_exp"],
        terms["ratio"],
        terms["gate_value"],
        terms["gate_grad"],
        terms["kl"],
        terms["grad_logprobs"],
        terms["token_loss"],
        head.vocab,
        logits.stride(0),
        dz.stride(0),
        head.inv_temperature,
        head.softcap,
        params.tau_pos,
        params.tau_neg,
        params.epsilon_low,
        params.epsilon_high,
        params.delta,
        config.beta,
        GATE=gate_id,
        CUSTOM_VALUE=value_fn,
        CUSTOM_DERIVATIVE=derivative_fn,
        BIAS_CORRECTION=config.use_bias_correction_kl,
        **launch,
    )
    chunk_terms = TokenTerms(
        loss=terms["token_loss"].sum(),
        grad_logprobs=terms["grad_logprobs"],
        grad_entropy=tokens.entropy_weight,
        ratio=terms["ratio"],
        gate_value=terms["gate_value"],
        gate_grad=terms["gate_grad"],
        kl=terms["kl"] if has_kl else None,
        policy_weight=tokens.policy_weight,
    )
    return dz, chunk_terms


def _statistics_then_grad_chunk(
    ws: _Workspace,
    hidden: Tensor,
    targets: Tensor,
    tokens: TokenData,
    head: HeadSpec,
    config: ObjectiveConfig,
    out: dict[str, Tensor],
) -> tuple[Tensor, TokenTerms]:
    """Whole rows in the chunk, or a slice of the vocabulary: statistics kernel, (the slices' statistics combined,)
    the O(n) torch objective, dz kernel."""
    n = hidden.shape[0]
    logits = ws.product(hidden)
    _launch_rows_statistics(logits, targets, head, out)
    terms = evaluate_objective(out["logprobs"], out["entropy"], tokens, config)
    dz = ws.grad_buffer(n)
    saved = saved_statistics(out["log_sum_exp"], out["entropy"], terms, config)
    _launch_rows_grad(logits, dz, slice_targets(head, targets)[1], head, saved)
    return dz, terms


def _launch_rows_statistics(logits: Tensor, targets: Tensor, head: HeadSpec, out: dict[str, Tensor]) -> None:
    """``logp``, ``H``, ``lse`` of the product's rows into ``out`` (global ones for a vocabulary-parallel slice)."""
    read_targets, _ = slice_targets(head, targets)
    grid, launch = _row_launch(logits.shape[0])
    rows_statistics_kernel[grid](
        logits,
        head.bias,
        read_targets,
        out["logprobs"],
        out["entropy"],
        out["log_sum_exp"],
        head.vocab,
        logits.stride(0),
        head.inv_temperature,
        head.softcap,
        **launch,
    )
    if head.shard is not None:
        combined = combine_slice_statistics(head.shard, out["logprobs"], out["entropy"], out["log_sum_exp"], targets)
        for name, value in zip(("logprobs", "entropy", "log_sum_exp"), combined, strict=True):
            out[name].copy_(value)


def chunked_statistics(hidden: Tensor, targets: Tensor, head: HeadSpec) -> tuple[Tensor, Tensor, Tensor]:
    """The no-grad pass as cuBLAS chunk products and the statistics row kernel: ``(logp, entropy, lse)``."""
    num_tokens = hidden.shape[0]
    out = {name: torch.empty(num_tokens, device=hidden.device) for name in ("logprobs", "entropy", "log_sum_exp")}
    if num_tokens:
        rows, ws = _plan(num_tokens, head, hidden.device, GradientNeeds(False, False, False))
        for chunk in token_chunks(num_tokens, rows):
            logits = ws.product(hidden[chunk])
            _launch_rows_statistics(logits, targets[chunk], head, {k: v[chunk] for k, v in out.items()})
    return out["logprobs"], out["entropy"], out["log_sum_exp"]


def _launch_rows_grad(logits: Tensor, dz: Tensor, targets: Tensor, head: HeadSpec, saved: SavedStatistics) -> None:
    grid, launch = _row_launch(logits.shape[0])

    def f32(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(torch.float32).contiguous()

    rows_grad_kernel[grid](
        logits,
        dz,
        head.bias,
        targets,
        f32(saved.log_sum_exp),
        f32(saved.entropy),
        f32(saved.grad_logprobs),
        f32(saved.grad_entropy),
        head.vocab,
        logits.stride(0),
        dz.stride(0),
        head.inv_temperature,
        head.softcap,
        **launch,
    )


def fused_loss_chunks(
    hidden: Tensor,
    targets: Tensor,
    tokens: TokenData,
    head: HeadSpec,
    config: ObjectiveConfig,
    needs: GradientNeeds,
) -> LossForward | None:
    """Statistics, objective and gradients chunk by chunk (three products); ``None`` when a whole row exceeds a
    chunk where the objective needs whole rows (the caller then recomputes in backward)."""
    num_tokens = hidden.shape[0]
    rows, ws = _plan(num_tokens, head, hidden.device, needs)
    chunks = row_aligned_chunks(tokens, rows, config)
    if chunks is None:
        return None
    out = {name: torch.empty(num_tokens, device=hidden.device) for name in ("logprobs", "entropy", "log_sum_exp")}
    grads = _Gradients(num_tokens, hidden.shape[1], head, needs, hidden.device)
    split = config.needs_whole_rows or head.shard is not None
    chunk_step: _ChunkStep = _statistics_then_grad_chunk if split else _fused_token_chunk
    parts = []
    for chunk in chunks:
        chunk_out = {name: value[chunk] for name, value in out.items()}
        dz, terms = chunk_step(ws, hidden[chunk], targets[chunk], tokens.select(chunk), head, config, chunk_out)
        parts.append(terms)
        grads.add(chunk, dz, hidden[chunk], ws)
    terms = TokenTerms.concatenate(parts, out["logprobs"])
    saved = saved_statistics(out["log_sum_exp"], out["entropy"], terms, config, chunks)
    return LossForward(out["logprobs"], out["entropy"], terms, saved, grads.result())


def recompute_gradient_chunks(
    hidden: Tensor, targets: Tensor, head: HeadSpec, needs: GradientNeeds, saved: SavedStatistics
) -> Gradients:
    """Backward from saved per-token statistics: the chunk's product is recomputed (a fourth product)."""
    num_tokens = hidden.shape[0]
    grads = _Gradients(num_tokens, hidden.shape[1], head, needs, hidden.device)
    rows, ws = _plan(num_tokens, head, hidden.device, needs)
    for chunk in saved.chunks if saved.chunks is not None else token_chunks(num_tokens, rows):
        logits = ws.product(hidden[chunk])
        dz = ws.grad_buffer(logits.shape[0])
        chunk_saved = SavedStatistics(
            saved.log_sum_exp[chunk],
            saved.entropy[chunk],
            saved.grad_logprobs[chunk],
            None if saved.grad_entropy is None else saved.grad_entropy[chunk],
        )
        _launch_rows_grad(logits, dz, slice_targets(head, targets[chunk])[1], head, chunk_saved)
        grads.add(chunk, dz, hidden[chunk], ws)
    return grads.result()
