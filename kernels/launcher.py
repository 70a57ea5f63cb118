"""The Triton backend: the backend contract of :mod:`fused_gates.backend` over the kernels.

* no gradient: :func:`~fused_gates.kernels.logprob_stats.token_statistics` (one ``tl.dot`` pass, no logits in
  memory) or cuBLAS chunks and the statistics row kernel, then the O(N) objective in torch;
* training: :func:`~fused_gates.kernels.chunk_grad.fused_loss_chunks` (cuBLAS products, the gate fused into a row
  kernel), with the recomputing backward when a row that the objective needs whole does not fit a chunk.

The kernels compute in float32: float64 inputs, and custom gates registered without a Triton pair, are not
supported (``backend="auto"`` then takes the torch backend; an explicit ``backend="triton"`` says why it cannot).
"""

from __future__ import annotations

import os

import numpy
import torch
import triton
from torch import Tensor

from ..backend import GradientNeeds, Gradients, HeadSpec, LossForward, SavedStatistics, saved_statistics
from ..objective import ObjectiveConfig, TokenData, evaluate_objective
from ..vocab_parallel import combine_slice_statistics
from .chunk_grad import chunked_statistics, fused_loss_chunks, recompute_gradient_chunks, slice_targets
from .gates import kernel_gate
from .logprob_stats import token_statistics

NAME = "triton"


def interpreter_bug() -> str | None:
    """Triton before 3.8 converts 1-element arrays with ``int()`` in its interpreter (``tl.tensor.__index__``), which
    NumPy 2.4 refuses: every ``range(0, V, BLOCK)`` over a runtime ``V`` then fails. Compiled kernels are unaffected."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    triton_version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    numpy_version = tuple(int(x) for x in numpy.__version__.split(".")[:2])
    if triton_version < (3, 8) and numpy_version >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run the kernels with NumPy {numpy.__version__} "
                "(it converts 1-element arrays with int(), refused since NumPy 2.4): install numpy<2.4 or "
                "triton>=3.8")
    return None


def unsupported(head: HeadSpec, config: ObjectiveConfig | None) -> str | None:
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
    if config is not None:
        kernel_gate(config.gate)  # a custom Triton pair that disagrees with its torch pair raises here
    return None


CUBLAS_STATISTICS_MIN_TOKENS = 256
"""``statistics_method="auto"``: cuBLAS chunk products from this many tokens on, ``tl.dot`` tiles below. A prior from
the roofline, not yet a measurement: at Qwen2.5-7B's head and 8,192 tokens one product is 8.9 TFLOP, ~13 ms in
cuBLAS at ~85% of an H100's bf16 peak, plus ~3 ms to write and read the float32 logits (8 bytes each), whereas a
Triton ``tl.dot`` GEMM carrying the online softmax in registers is expected at ~55-65% of peak (~18-20 ms); with few
tokens the tile kernel splits the vocabulary across programs and avoids the buffer. The GPU benchmark times both
(``token_logprobs(..., statistics_method=...)``); this rule is to be replaced by its figures."""


def choose_statistics_method(num_tokens: int, head: HeadSpec) -> str:
    if head.statistics_method != "auto":
        return head.statistics_method
    return "cublas" if num_tokens >= CUBLAS_STATISTICS_MIN_TOKENS else "dot"


def logprobs_and_entropy(hidden: Tensor, targets: Tensor, head: HeadSpec) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)`` per token of ``hidden`` [N, H], no gradient: ``tl.dot`` tiles that never write the
    logits, or cuBLAS chunks read back by the statistics row kernel (:func:`choose_statistics_method`); for a slice
    of a vocabulary-parallel head, the slices' statistics combined."""
    head = head.detached()
    if choose_statistics_method(hidden.shape[0], head) == "cublas":
        return chunked_statistics(hidden.detach(), targets, head)
    _, one_hot_targets = slice_targets(head, targets)  # the tile kernel compares ids, never loads by them
    logp, entropy, lse = token_statistics(hidden.detach(), one_hot_targets, head.weight, head.bias,
                                          head.inv_temperature, head.softcap)
    if head.shard is None:
        return logp, entropy, lse
    return combine_slice_statistics(head.shard, logp, entropy, lse, targets)


def loss_forward(
    hidden: Tensor,
    targets: Tensor,
    tokens: TokenData,
    head: HeadSpec,
    config: ObjectiveConfig,
    needs: GradientNeeds,
) -> LossForward:
    """Statistics, objective and (when the chunks allow it) the gradients, as the torch backend's."""
    hidden, head = hidden.detach(), head.detached()
    if needs.any and hidden.shape[0]:
        result = fused_loss_chunks(hidden, targets, tokens, head, config, needs)
        if result is not None:
            return result
    # No gradient, or a whole row longer than a chunk: statistics now, gradients recomputed in backward.
    logprobs, entropy, log_sum_exp = logprobs_and_entropy(hidden, targets, head)
    terms = evaluate_objective(logprobs, entropy, tokens, config)
    return LossForward(logprobs, entropy, terms, saved_statistics(log_sum_exp, entropy, terms, config), None)


def recompute_gradients(
    hidden: Tensor, targets: Tensor, head: HeadSpec, needs: GradientNeeds, saved: SavedStatistics
) -> Gradients:
    """The backward that recomputes each chunk's product from the saved statistics."""
    return recompute_gradient_chunks(hidden.detach(), targets, head.detached(), needs, saved)
