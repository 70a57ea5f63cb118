"""Per-token log-prob, entropy and log-sum-exp from hidden states and the lm_head, logits never written.

A program owns ``BLOCK_N`` tokens and a contiguous range of vocabulary blocks. For each ``BLOCK_N x BLOCK_V`` tile it
forms ``z = (h W^T + b) / T`` (or soft-capped: :mod:`fused_gates.kernels.logits`) on chip (``tl.dot`` over
``BLOCK_H`` slices of the hidden size, float32 accumulation) and folds the tile into per-token online statistics
relative to the running maximum ``m`` (``S = sum_v exp(z_v - m)``, ``Z = sum_v exp(z_v - m) (z_v - m)``) and the
target's logit ``z_y``. Then ``lse = m + log S``, ``logp = z_y - lse`` and ``H = lse - sum_v p_v z_v = log S - Z /
S``.

With few token blocks (short batches, the no-grad passes over old / reference policies) the vocabulary is split
across ``SPLIT`` programs per token block (a launch parameter); each writes its partial ``(m, S, Z, z_y)`` and a
small kernel merges them (every split holds at least one column). The online update and the merge are those of
:mod:`fused_gates.kernels.online_softmax`. Offsets into ``W`` and the hidden states are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..environment import triton_interpreted
from .logits import to_logits
from .online_softmax import block_statistics, finish_statistics, merge_statistics

INTERPRETED = triton_interpreted()

# Compiled ahead of time for sm_80 and sm_90 under Triton 3.6 and 3.9 (tests/test_kernels_compile_for_gpu.py): none
# of these spills registers; BLOCK_H = 64 with 128 x 256 tiles did (the float32 accumulator tile and two operand
# tiles in flight exceed 255 registers per thread).
_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_H": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_H": 64}, num_warps=8, num_stages=3),
]
# Small odd shapes in the interpreter: several vocabulary and hidden blocks, with ragged edges.
_INTERPRETER_META = {"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_H": 16}
_LARGEST_BLOCK_N = 128
_SPLIT_UNIT = 256  # the largest BLOCK_V of the configurations


@triton.heuristics(
    {"HAS_BIAS": lambda args: args["p_bias"] is not None, "HAS_SOFTCAP": lambda args: args["softcap"] is not None}
)
@triton.jit
def _tile_statistics_kernel(
    p_hidden,
    p_weight,
    p_bias,
    p_targets,
    p_part_max,
    p_part_sum_exp,
    p_part_sum_exp_shifted,
    p_part_target_logit,
    N,
    TOKENS_BUCKET,  # unused by the maths: the autotuning key (the best tile depends on how many tokens there are)
    V,
    H,
    stride_hidden,
    stride_weight,
    columns_per_split,
    inv_temperature,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_split = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_y = tl.load(p_targets + o_n, mask=m_n, other=-1)
    p_h_rows = p_hidden + o_n.to(tl.int64)[:, None] * stride_hidden

    b_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    b_sum_exp = tl.zeros([BLOCK_N], tl.float32)
    b_sum_exp_shifted = tl.zeros([BLOCK_N], tl.float32)
    b_target_logit = tl.zeros([BLOCK_N], tl.float32)

    v_begin = i_split * columns_per_split  # a multiple of BLOCK_V
    v_end = tl.minimum(V, v_begin + columns_per_split)
    for v_start in range(v_begin, v_end, BLOCK_V):
        o_v = v_start + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        p_w_cols = p_weight + o_v.to(tl.int64)[None, :] * stride_weight
        b_z = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for h_start in range(0, H, BLOCK_H):
            o_h = h_start + tl.arange(0, BLOCK_H)
            m_h = o_h < H
            b_h = tl.load(p_h_rows + o_h[None, :], mask=m_n[:, None] & m_h[None, :], other=0.0)
            b_wt = tl.load(p_w_cols + o_h[:, None], mask=m_h[:, None] & m_v[None, :], other=0.0)  # W^T tile
            b_z = tl.dot(b_h, b_wt, b_z, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            b_z += tl.load(p_bias + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
        b_z = tl.where(m_v[None, :], to_logits(b_z, inv_temperature, softcap, HAS_SOFTCAP), float("-inf"))
        b_target_logit += tl.sum(tl.where(o_v[None, :] == b_y[:, None], b_z, 0.0), axis=1)
        # every tile holds at least one column of the vocabulary
        b_tile_max, b_tile_sum_exp, b_tile_sum_exp_shifted = block_statistics(b_z, 1)
        b_max, b_sum_exp, b_sum_exp_shifted = merge_statistics(
            b_max, b_sum_exp, b_sum_exp_shifted, b_tile_max, b_tile_sum_exp, b_tile_sum_exp_shifted
        )

    o_part = i_split.to(tl.int64) * N + o_n
    tl.store(p_part_max + o_part, b_max, mask=m_n)
    tl.store(p_part_sum_exp + o_part, b_sum_exp, mask=m_n)
    tl.store(p_part_sum_exp_shifted + o_part, b_sum_exp_shifted, mask=m_n)
    tl.store(p_part_target_logit + o_part, b_target_logit, mask=m_n)


@triton.jit
def _merge_splits_kernel(
    p_part_max,
    p_part_sum_exp,
    p_part_sum_exp_shifted,
    p_part_target_logit,
    p_logprobs,
    p_entropy,
    p_log_sum_exp,
    N,
    SPLIT,
    BLOCK_N: tl.constexpr,
):
    o_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    b_sum_exp = tl.zeros([BLOCK_N], tl.float32)
    b_sum_exp_shifted = tl.zeros([BLOCK_N], tl.float32)
    b_target_logit = tl.zeros([BLOCK_N], tl.float32)
    for s in range(SPLIT):
        o_part = s * N + o_n
        # every split holds at least one column; padded tokens read a harmless (0, 1, 0)
        b_max, b_sum_exp, b_sum_exp_shifted = merge_statistics(
            b_max,
            b_sum_exp,
            b_sum_exp_shifted,
            tl.load(p_part_max + o_part, mask=m_n, other=0.0),
            tl.load(p_part_sum_exp + o_part, mask=m_n, other=1.0),
            tl.load(p_part_sum_exp_shifted + o_part, mask=m_n, other=0.0),
        )
        b_target_logit += tl.load(p_part_target_logit + o_part, mask=m_n, other=0.0)
    b_lse, b_entropy, _ = finish_statistics(b_max, b_sum_exp, b_sum_exp_shifted)
    tl.store(p_log_sum_exp + o_n, b_lse, mask=m_n)
    tl.store(p_logprobs + o_n, b_target_logit - b_lse, mask=m_n)
    tl.store(p_entropy + o_n, b_entropy, mask=m_n)


_tile_statistics = (
    _tile_statistics_kernel
    if INTERPRETED
    else triton.autotune(configs=_GPU_CONFIGS, key=["TOKENS_BUCKET", "V", "H", "INPUT_PRECISION"])(
        _tile_statistics_kernel
    )
)


def tokens_bucket(num_tokens: int) -> int:
    """Token counts that share a tuned configuration: powers of two up to 16,384 (a configuration tuned at the first
    call's 7 tokens must not serve 7,168)."""
    return min(triton.next_power_of_2(max(num_tokens, 1)), 16384)


def choose_vocab_splits(num_tokens: int, vocab: int, device: torch.device) -> int:
    """Vocabulary splits per token block: enough programs for about two waves over the SMs when the token blocks
    alone are too few; 1 on CPU (the interpreter)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    token_blocks = triton.cdiv(num_tokens, _LARGEST_BLOCK_N)
    if token_blocks >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, token_blocks), triton.cdiv(vocab, 1024), 128))


def dot_input_precision(dtype: torch.dtype) -> str:
    """float32 operands in full precision (Triton's default for them is TF32); other dtypes ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def token_statistics(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inv_temperature: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, entropy, lse)`` in float32 for ``hidden`` [N, H] (float16 / bfloat16 / float32)."""
    num_tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    out = [torch.empty(num_tokens, device=hidden.device, dtype=torch.float32) for _ in range(3)]
    if num_tokens == 0:
        return out[0], out[1], out[2]
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    targets = targets.contiguous()
    # A split covers a whole number of vocabulary blocks of every candidate BLOCK_V, so the split count does not
    # depend on the tuned configuration.
    unit = _INTERPRETER_META["BLOCK_V"] if INTERPRETED else _SPLIT_UNIT
    units = triton.cdiv(vocab, unit)
    columns_per_split = triton.cdiv(units, choose_vocab_splits(num_tokens, vocab, hidden.device)) * unit
    splits = triton.cdiv(vocab, columns_per_split)
    partials = torch.empty(4, splits, num_tokens, device=hidden.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(num_tokens, meta["BLOCK_N"]), splits)

    meta = _INTERPRETER_META if INTERPRETED else {}
    _tile_statistics[grid](
        hidden,
        weight,
        bias,
        targets,
        partials[0],
        partials[1],
        partials[2],
        partials[3],
        num_tokens,
        tokens_bucket(num_tokens),
        vocab,
        hidden_size,
        hidden.stride(0),
        weight.stride(0),
        columns_per_split,
        float(inv_temperature),
        softcap,
        INPUT_PRECISION=dot_input_precision(weight.dtype),
        **meta,
    )
    merge_block = 128
    _merge_splits_kernel[(triton.cdiv(num_tokens, merge_block),)](
        partials[0], partials[1], partials[2], partials[3], *out, num_tokens, splits, BLOCK_N=merge_block
    )
    logp, entropy, lse = out
    return logp, entropy, lse
