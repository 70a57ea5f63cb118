"""The contract between the ``autograd.Function`` and the backends (``torch`` and ``triton``): what a backend is
given, what it returns, whether it supports an input, how token chunks are planned, and the float32-output matrix
products both backends are built on.

A backend is a module with:

* ``NAME``;
* ``unsupported(head, config) -> str | None``: why it cannot run this input (``None``: it can);
* ``logprobs_and_entropy(hidden, targets, head) -> (logp, entropy, lse)``: the no-grad pass (one product);
* ``loss_forward(hidden, targets, tokens, head, config, needs) -> LossForward``: statistics, objective and, when
  the chunks allow it, the gradients in the same pass (three products in all);
* ``recompute_gradients(hidden, targets, head, needs, saved) -> (dh, dW, db)``: the backward from saved per-token
  statistics, recomputing the products (for rows too long for a chunk, and for a repeated backward).

Inputs are the valid tokens only: ``hidden`` [N, H], ``targets`` [N]; per-token results are [N] in the head's
accumulation dtype (float32; float64 for float64 inputs).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass, replace
from types import ModuleType

import torch
from torch import Tensor

from .objective import ObjectiveConfig, TokenData, TokenTerms
from .vocab_parallel import VocabShard

BACKENDS = ("auto", "torch", "triton")
STATISTICS_METHODS = ("auto", "dot", "cublas")
"""How the Triton backend's no-grad pass forms the logits: ``tl.dot`` tiles that never write them, or cuBLAS chunk
products into a float32 buffer read back by the statistics row kernel."""

CPU_MEMORY_BUDGET_MB = 128.0
"""Working buffers on CPU: 128 MiB keeps the loss within 1.04x of the three-product floor at Qwen2.5-0.5B's head
(2,048 tokens, 2 cores) with 4.7% of the materialised-logits version's extra memory (benchmarks/results/)."""
GPU_MEMORY_BUDGET_MB = 1792.0
GPU_MIN_MEMORY_BUDGET_MB = 256.0
GPU_FREE_MEMORY_SHARE = 0.1
"""On GPU every token chunk also reads and writes the float32 dW accumulator (8 V H bytes: 4.4 GB at Qwen2.5-7B's
head), against ``2 n H V`` flops of dW arithmetic: by roofline the traffic is ``4 F / (n B)`` of that arithmetic
(F flop/s, B bytes/s), ~900 / n on an H100, so chunks want thousands of rows. The default therefore takes the
largest budget that stays within the 2 GiB of extra memory this package allows itself (1.75 GiB of buffers: ~2,000
rows of float32 logits plus their bfloat16 dz at V = 152k), and less where the device has little free memory
(10% of what is free, at least 256 MiB). The first chunk writes dW rather than adding to zeros. The working budget
against step time at the 7B head is a curve in benchmarks/ (measured on GPU when one runs the GPU check)."""
VOCAB_BLOCK = 2048
"""Columns per elementwise step of the torch backend: a ``chunk x 2048`` float32 block stays in cache."""


def default_memory_budget_mb(device: torch.device) -> float:
    """The working-buffer budget when the caller gives none (see :data:`GPU_MEMORY_BUDGET_MB`)."""
    if device.type != "cuda":
        return CPU_MEMORY_BUDGET_MB
    free_bytes, _ = torch.cuda.mem_get_info(device)
    share = GPU_FREE_MEMORY_SHARE * free_bytes / 2**20
    return max(GPU_MIN_MEMORY_BUDGET_MB, min(GPU_MEMORY_BUDGET_MB, share))


@dataclass(frozen=True)
class HeadSpec:
    """The lm_head and how to evaluate it: ``z = x / temperature`` with ``x = hidden W^T + bias``, or
    ``z = softcap tanh(x / softcap) / temperature`` for soft-capped logits."""

    weight: Tensor  # [V, H]
    bias: Tensor | None  # [V]
    inv_temperature: float
    memory_budget_mb: float
    softcap: float | None = None
    shard: VocabShard | None = None  # the weight is this rank's slice of a vocabulary-parallel head
    statistics_method: str = "auto"  # the Triton backend's no-grad pass: "dot", "cublas" or "auto"

    @property
    def vocab(self) -> int:
        """Rows of ``weight`` (this rank's slice of a vocabulary-parallel head)."""
        return self.weight.shape[0]

    @property
    def planning_vocab(self) -> int:
        """The vocabulary the chunk plan is made for: every rank of a vocabulary-parallel head plans for the largest
        slice, so that all take the same chunks (their collectives must match)."""
        return self.vocab if self.shard is None else self.shard.largest_slice

    @property
    def accumulate_dtype(self) -> torch.dtype:
        """float32 statistics and gradients, float64 for float64 inputs (gradcheck, references)."""
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    def detached(self) -> HeadSpec:
        bias = None if self.bias is None else self.bias.detach()
        return replace(self, weight=self.weight.detach(), bias=bias)


@dataclass(frozen=True)
class GradientNeeds:
    hidden: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


Gradients = tuple[Tensor | None, Tensor | None, Tensor | None]
"""``(dh, dW, db)`` in the accumulation dtype, ``None`` where not needed."""


@dataclass
class SavedStatistics:
    """Per-token results of the forward from which a backward can recompute the gradient: ``lse``, ``H`` and the
    gradient coefficients ``g = d loss / d logp`` and ``e = d loss / d H`` (``None`` without an entropy term)."""

    log_sum_exp: Tensor
    entropy: Tensor
    grad_logprobs: Tensor
    grad_entropy: Tensor | None
    chunks: list[slice] | None = None  # the forward's chunks, when it formed the gradients in them


@dataclass
class LossForward:
    """The forward's per-token results, the objective's terms, and the gradients when the pass could form them."""

    logprobs: Tensor
    entropy: Tensor
    terms: TokenTerms
    saved: SavedStatistics
    gradients: Gradients | None  # None: the backward recomputes from ``saved``


def saved_statistics(
    log_sum_exp: Tensor, entropy: Tensor, terms: TokenTerms, config: ObjectiveConfig, chunks: list[slice] | None = None
) -> SavedStatistics:
    return SavedStatistics(log_sum_exp, entropy, terms.grad_logprobs,
                           terms.grad_entropy if config.has_entropy_bonus else None, chunks)


# -- choosing a backend --------------------------------------------------------------------------------------------


def _triton_installed() -> bool:
    # Looked up, not imported: Triton decides at import whether its kernels run compiled or interpreted.
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend_module(name: str) -> ModuleType:
    if name == "torch":
        from . import torch_backend

        return torch_backend
    if name == "triton":
        from .kernels import launcher

        return launcher
    raise ValueError(f"backend: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def resolve_backend(requested: str, head: HeadSpec, config: ObjectiveConfig | None) -> ModuleType:
    """The backend module for ``requested`` (``auto``: Triton on CUDA when installed and it supports the input,
    else torch). An explicitly requested backend that cannot run the input raises, naming why."""
    if requested not in BACKENDS:
        raise ValueError(f"backend: unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    device = head.weight.device
    if requested == "auto":
        if device.type == "cuda" and _triton_installed():
            triton_backend = backend_module("triton")
            if triton_backend.unsupported(head, config) is None:
                return triton_backend
        requested = "torch"
    if requested == "triton":
        if not _triton_installed():
            raise ValueError("backend: backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and not triton_interpreted():
            raise ValueError(f"backend: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    module = backend_module(requested)
    reason = module.unsupported(head, config)
    if reason is not None:
        raise ValueError(f"backend: backend={requested!r} cannot run this input: {reason}")
    return module


# -- planning the chunks -------------------------------------------------------------------------------------------


def plan_chunk_tokens(num_tokens: int, vocab: int, memory_budget_mb: float, extra_bytes_per_logit: int = 0) -> int:
    """Tokens per chunk so that the chunk's ``n x V`` float32 logits (plus ``extra_bytes_per_logit``, e.g. a
    low-precision copy for the backward products) fit the budget; at least 1, at most ``num_tokens``. The tokens are
    then spread evenly over the chunks this takes, so that no chunk is a small remainder (each chunk pays the dW
    accumulator's traffic whatever its size)."""
    per_token = vocab * (4 + extra_bytes_per_logit) + 2 * min(VOCAB_BLOCK, vocab) * 4
    budget = int(memory_budget_mb * 2**20)
    capacity = max(1, min(num_tokens, budget // per_token))
    chunks = -(-num_tokens // capacity) if num_tokens else 1
    return max(1, -(-num_tokens // chunks)) if num_tokens else capacity


def token_chunks(num_tokens: int, rows: int) -> list[slice]:
    return [slice(s, min(s + rows, num_tokens)) for s in range(0, num_tokens, rows)]


def row_aligned_chunks(tokens: TokenData, rows: int, config: ObjectiveConfig) -> list[slice] | None:
    """Chunk boundaries of at most ``rows`` tokens; when the objective needs whole rows they must fall between rows of
    the batch (``None`` when one row alone exceeds a chunk)."""
    num_tokens = tokens.count
    if not config.needs_whole_rows:
        return token_chunks(num_tokens, rows)
    counts = torch.bincount(tokens.row, minlength=tokens.num_rows).tolist()
    chunks, start, size = [], 0, 0
    for count in counts:
        if count > rows:
            return None
        if size + count > rows:
            chunks.append(slice(start, start + size))
            start, size = start + size, 0
        size += count
    if size:
        chunks.append(slice(start, start + size))
    return chunks


# -- float32-output matrix products --------------------------------------------------------------------------------

_FLOAT32_OUTPUT: dict[tuple[str, int | None, torch.dtype], bool] = {}


def float32_output_products(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` works for ``dtype`` operands on ``device`` (probed once
    per device and dtype). Where it does not, the products take float32 copies of the low-precision operands; on
    CUDA that is much slower, and a warning naming the torch version says so once."""
    key = (device.type, device.index, dtype)
    if key not in _FLOAT32_OUTPUT:
        probe = torch.ones(2, 2, device=device, dtype=dtype)
        try:
            supported = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, NotImplementedError, RuntimeError) as error:  # tiny tensors: never out of memory
            supported = False
            reason = str(error).splitlines()[0][:160]
            if device.type == "cuda":
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
    float32: rounding each chunk's product to bf16 before summing biases training."""
    if overwrite:
        return mm_into(acc, a, b)
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        return acc.addmm_(a, b)
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
