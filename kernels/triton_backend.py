"""The Triton backend: the chunk driver's contract over the kernels.

* training: per chunk, ``acc = h W^T`` with cuBLAS into a reused float32 ``[n, V]`` buffer, then one Triton program
  per token row (:mod:`fused_gates.kernels.row_kernels`): at token level one kernel does the statistics, the
  objective's epilogue and dz (:meth:`TritonChunks.fused_token_chunk`); where the objective needs whole rows or the
  head is a vocabulary slice, a statistics kernel, the O(n) torch objective and a dz kernel; dz is written over the
  buffer or, for float16 / bfloat16 heads, straight into the low-precision operand of the backward products. The
  products ``dh`` and ``dW`` are the driver's (cuBLAS, float32 accumulation).
* no gradient: ``tl.dot`` tiles that never write the logits (:mod:`fused_gates.kernels.logprob_stats`), or the
  cuBLAS chunks and the statistics kernel (:func:`choose_statistics_method`).

Why cuBLAS for the products: the two backward products dominate (each ``2 n H V`` flops) and cuBLAS runs them near
peak on any GPU; keeping the chunk's logits between the statistics and the gradient removes the fourth product that
a recomputing design pays; what Triton fuses is the memory-bound part, read twice and written once per logit.

The kernels compute in float32: float64 inputs, and custom gates registered without a Triton pair, are not
supported (``backend="auto"`` then takes the torch backend; an explicit ``backend="triton"`` says why it cannot).
"""

from __future__ import annotations

import numpy
import torch
import triton
from torch import Tensor

from ..chunk_driver import Backend
from ..contract import ChunkGradient, ChunkStatistics, ChunkTargets, FusedChunk, GradientNeeds, SavedStatistics
from ..environment import triton_interpreted
from ..gate_inputs import DPPO_RATIO_CAP
from ..head import Head
from ..objective import ObjectiveConfig, TokenData, TokenTerms
from ..products import ProductOperands, mm_into
from ..vocab_parallel import combine_slice_statistics
from .gates import kernel_gate
from .logprob_stats import token_statistics
from .row_kernels import fused_token_rows_kernel, rows_grad_kernel, rows_statistics_kernel

NAME = "triton"
# Rows are memory bound: wide vocabulary blocks, no autotuning (the kernels write their input buffer in place, so a
# tuning rerun would read gradients as logits).
ROW_BLOCK_V = 64 if triton_interpreted() else 4096
ROW_NUM_WARPS = 1 if triton_interpreted() else 16
PLANNING_BLOCK = 2048
"""The plan reserves ``2 x 2048`` float32 columns per row beyond the buffers (the torch backend's block scratch), so
that both backends take the same chunks for the same budget."""


def interpreter_bug() -> str | None:
    """Triton before 3.8 converts 1-element arrays with ``int()`` in its interpreter (``tl.tensor.__index__``), which
    NumPy 2.4 refuses: every ``range(0, V, BLOCK)`` over a runtime ``V`` then fails. Compiled kernels are unaffected."""
    if not triton_interpreted():
        return None
    triton_version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    numpy_version = tuple(int(x) for x in numpy.__version__.split(".")[:2])
    if triton_version < (3, 8) and numpy_version >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run the kernels with NumPy {numpy.__version__} "
                "(it converts 1-element arrays with int(), refused since NumPy 2.4): install numpy<2.4 or "
                "triton>=3.8")
    return None


def unsupported(head: Head, config: ObjectiveConfig | None) -> str | None:
    bug = interpreter_bug()
    if bug is not None:
        return bug
    if head.weight.dtype == torch.float64:
        return "the kernels compute in float32; float64 inputs need backend='torch' (or 'auto')"
    if config is not None and not config.gate.runs_in_kernels:
        return (
            f"gate {config.gate.name!r} has no Triton functions: pass triton_value/triton_derivative (@triton.jit "
            "functions of (ratio, tau)) to register_gate, or use backend='torch'"
        )
    if config is not None and config.gate.kernel_id is not None:
        kernel_gate(config.gate)  # a custom Triton pair that disagrees with its torch pair raises here
    return None


CUBLAS_STATISTICS_MIN_TOKENS = 256
"""``statistics_method="auto"``: cuBLAS chunk products from this many tokens on, ``tl.dot`` tiles below. A prior from
the roofline, not yet a measurement: at Qwen2.5-7B's head and 8,192 tokens one product is 8.9 TFLOP, ~13 ms in
cuBLAS at ~85% of an H100's bf16 peak, plus ~3 ms to write and read the float32 logits (8 bytes each), whereas a
Triton ``tl.dot`` GEMM carrying the online softmax in registers is expected at ~55-65% of peak (~18-20 ms); with few
tokens the tile kernel splits the vocabulary across programs and avoids the buffer. The GPU benchmark times both
(``token_logprobs(..., statistics_method=...)``); this rule is to be replaced by its figures."""


def choose_statistics_method(num_tokens: int, head: Head) -> str:
    if head.statistics_method != "auto":
        return head.statistics_method
    return "cublas" if num_tokens >= CUBLAS_STATISTICS_MIN_TOKENS else "dot"


def tile_statistics(hidden: Tensor, targets: Tensor, head: Head) -> tuple[Tensor, Tensor, Tensor] | None:
    """The no-grad pass as ``tl.dot`` tiles (``None`` where the cuBLAS chunks are chosen: the driver's loop)."""
    if choose_statistics_method(hidden.shape[0], head) == "cublas":
        return None
    if head.shard is None:
        return token_statistics(hidden, targets, head.weight, head.bias, head.inv_temperature, head.softcap)
    local, owned = head.shard.local_targets(targets)
    one_hot = torch.where(owned, local, torch.full_like(local, -1))  # the tile kernel compares ids, never loads them
    logp, entropy, lse = token_statistics(hidden, one_hot, head.weight, head.bias, head.inv_temperature, head.softcap)
    return combine_slice_statistics(head.shard, logp, entropy, lse, targets)


def _flat(x: Tensor | None) -> Tensor | None:
    """A per-token input as the kernels index it: float32, unit stride."""
    return None if x is None else x.to(torch.float32).contiguous()


def _row_launch(num_rows: int) -> tuple[tuple[int], dict]:
    return (num_rows,), {"BLOCK_V": ROW_BLOCK_V, "num_warps": ROW_NUM_WARPS}


class TritonChunks:
    """The Triton backend's side of the chunk driver's contract, for one call."""

    def __init__(self, head: Head, needs: GradientNeeds):
        self.head = head
        self.operands = ProductOperands(head.weight, torch.float32)
        self.low_precision = needs.any and self.operands.operand_dtype != torch.float32
        self.float32_dz = needs.bias  # the bias gradient sums dz's columns in float32

    def bytes_per_row(self) -> int:
        vocab = self.head.planning_vocab
        low = self.operands.operand_dtype.itemsize if self.low_precision else 0
        return vocab * (4 + low) + 2 * min(PLANNING_BLOCK, vocab) * 4

    def allocate(self, rows: int) -> None:
        device, vocab = self.head.weight.device, self.head.local_vocab
        self.logits = torch.empty(rows, vocab, device=device, dtype=torch.float32)
        low = self.operands.operand_dtype
        self.dz = torch.empty(rows, vocab, device=device, dtype=low) if self.low_precision else None

    def product_operands(self) -> ProductOperands:
        return self.operands

    def dz_operand(self, matrix: Tensor) -> Tensor:
        return matrix if matrix.dtype == self.operands.operand_dtype else self.dz[: matrix.shape[0]].copy_(matrix)

    def _product(self, hidden: Tensor) -> Tensor:
        return mm_into(self.logits[: hidden.shape[0]], self.operands.cast(hidden), self.operands.weight.t())

    def _grad_buffer(self, rows: int) -> Tensor:
        """Where a row kernel writes dz: over the logits, or straight into the low-precision operand unless the bias
        gradient needs the float32 dz (its column sums)."""
        return self.logits[:rows] if self.dz is None or self.float32_dz else self.dz[:rows]

    def statistics(self, hidden: Tensor, targets: ChunkTargets, keep: str | None) -> ChunkStatistics:
        logits = self._product(hidden)
        n = logits.shape[0]
        out = [torch.empty(n, device=logits.device, dtype=torch.float32) for _ in range(3)]
        grid, launch = _row_launch(n)
        rows_statistics_kernel[grid](
            logits, self.head.bias, targets.read.contiguous(), *out, self.head.local_vocab, logits.stride(0),
            self.head.inv_temperature, self.head.softcap, **launch,
        )
        return ChunkStatistics(*out)

    def _write_gradient(self, logits: Tensor, targets: ChunkTargets, saved: SavedStatistics) -> ChunkGradient:
        dz = self._grad_buffer(logits.shape[0])
        grid, launch = _row_launch(logits.shape[0])
        rows_grad_kernel[grid](
            logits, dz, self.head.bias, targets.one_hot.contiguous(), _flat(saved.log_sum_exp), _flat(saved.entropy),
            _flat(saved.grad_logprobs), _flat(saved.grad_entropy), self.head.local_vocab, logits.stride(0),
            dz.stride(0), self.head.inv_temperature, self.head.softcap, **launch,
        )
        return ChunkGradient(dz)

    def gradient(self, stats: ChunkStatistics, targets: ChunkTargets, grad_logprobs: Tensor,
                 grad_entropy: Tensor | None) -> ChunkGradient:
        n = grad_logprobs.shape[0]
        saved = SavedStatistics(stats.log_sum_exp, stats.entropy, grad_logprobs, grad_entropy)
        return self._write_gradient(self.logits[:n], targets, saved)

    def gradient_from_saved(self, hidden: Tensor, targets: ChunkTargets, saved: SavedStatistics) -> ChunkGradient:
        """The recomputing backward's chunk: the product again, then dz from the saved statistics (no statistics
        pass)."""
        return self._write_gradient(self._product(hidden), targets, saved)

    def fused_token_chunk(self, hidden: Tensor, targets: Tensor, tokens: TokenData,
                          config: ObjectiveConfig) -> FusedChunk:
        """Token level, whole head: one row kernel does statistics, objective and dz."""
        n = hidden.shape[0]
        head = self.head
        logits = self._product(hidden)
        dz = self._grad_buffer(n)
        gate_id, value_fn, derivative_fn = kernel_gate(config.gate)
        has_kl = config.beta != 0.0
        estr = config.estr_threshold is not None  # the entropy-scaled trust region in the epilogue
        names = ("logprobs", "entropy", "log_sum_exp", "ratio", "gate_value", "gate_grad", "kl", "grad_logprobs",
                 "token_loss")
        out = {name: torch.empty(n, device=hidden.device, dtype=torch.float32) for name in names}
        params = config.params
        inputs = config.input_params  # a gate that reads more than r: its bounds (fused_gates.gate_inputs)
        grid, launch = _row_launch(n)
        fused_token_rows_kernel[grid](
            logits, dz, head.bias, targets.contiguous(), _flat(tokens.advantages), _flat(tokens.old_logprobs),
            _flat(tokens.ref_logprobs) if has_kl else None, _flat(tokens.loss_weight),
            _flat(tokens.entropy_weight) if config.has_entropy_bonus else None, _flat(tokens.policy_weight),
            _flat(tokens.old_entropy) if estr else None,
            *(out[name] for name in names), head.local_vocab, logits.stride(0), dz.stride(0),
            head.inv_temperature, head.softcap, params.tau_pos, params.tau_neg, params.epsilon_low,
            params.epsilon_high, params.delta, config.beta,
            input_delta_low=0.0 if inputs is None else inputs.dppo_delta_low,
            input_delta_high=0.0 if inputs is None else inputs.dppo_delta_high,
            input_dual_clip=0.0 if inputs is None else inputs.aspo_dual_clip, input_ratio_cap=DPPO_RATIO_CAP,
            estr_threshold=config.estr_threshold if estr else 0.0, estr_epsilon=config.estr_epsilon,
            GATE=gate_id, CUSTOM_VALUE=value_fn, CUSTOM_DERIVATIVE=derivative_fn,
            BIAS_CORRECTION=config.use_bias_correction_kl, HAS_ESTR=estr, **launch,
        )
        terms = TokenTerms(
            loss=out["token_loss"].sum(),
            grad_logprobs=out["grad_logprobs"],
            grad_entropy=tokens.entropy_weight,
            ratio=out["ratio"],
            gate_value=out["gate_value"],
            gate_grad=out["gate_grad"],
            kl=out["kl"] if has_kl else None,
            policy_weight=tokens.policy_weight,
        )
        stats = ChunkStatistics(out["logprobs"], out["entropy"], out["log_sum_exp"])
        return FusedChunk(stats, terms, ChunkGradient(dz))


BACKEND = Backend(NAME, TritonChunks, unsupported, tile_statistics)
