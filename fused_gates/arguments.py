"""Checking the public functions' arguments: every error names the argument; the result is a frozen spec.

:func:`check_batch` checks what both entry points share (hidden states, lm_head, ids, mask and the
:class:`~fused_gates.options.HeadOptions`) and :func:`check_loss_arguments` the objective's inputs and
:class:`~fused_gates.options.LossOptions` of :func:`fused_gates.gated_policy_loss`.
Checks that need tensor values (id ranges, finiteness) belong to the token plan (:mod:`fused_gates.tokens`), which
reads them with the plan's sizes in one host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .backends import BACKENDS
from .chunk_driver import default_memory_budget_mb
from .head import STATISTICS_METHODS, Head
from .objective import ObjectiveConfig
from .options import NONFINITE_POLICIES, HeadOptions, LossOptions
from .packed_rows import PackedRows
from .validation import check_choice, check_number, fail
from .vocab_parallel import describe_shard, unwrap_dtensor_weight

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Tensor):
        raise fail(name, f"expected a torch.Tensor, got {type(value).__name__}", TypeError)
    if value.layout != torch.strided:
        raise fail(name, f"expected a dense tensor, got layout {value.layout}", TypeError)


def check_float_tensor(name: str, value: object, shape: tuple[int, ...], device: torch.device) -> Tensor:
    check_tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise fail(name, f"expected a floating-point tensor, got dtype {value.dtype}", TypeError)
    if tuple(value.shape) != shape:
        raise fail(name, f"expected shape {list(shape)}, got {list(value.shape)}")
    if value.device != device:
        raise fail(name, f"expected device {device} (that of hidden), got {value.device}")
    return value


@dataclass(frozen=True)
class Batch:
    """The checked inputs of a call: the tokens (flattened) and the lm_head that scores them."""

    hidden: Tensor  # [B*T, H], in the compute dtype (the autocast dtype under autocast)
    ids: Tensor  # [B*T] int64
    mask: Tensor | None  # [B, T] in the accumulation dtype, None when every token is valid
    shape: tuple[int, int]  # (B, T)
    head: Head
    backend: str
    on_nonfinite: str

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def accumulate_dtype(self) -> torch.dtype:
        return self.head.accumulate_dtype


def check_batch(
    hidden: object,
    weight: object,
    completion_ids: object,
    completion_mask: object,
    options: HeadOptions,
    nonfinite_policies: tuple[str, ...] = NONFINITE_POLICIES,
) -> Batch:
    bias, process_group = options.bias, options.process_group
    check_tensor("hidden", hidden)
    if hidden.device.type == "meta":
        raise fail("hidden", "is on the meta device (it holds no values)")
    check_tensor("weight", weight)
    weight, bias, process_group = unwrap_dtensor_weight(weight, bias, process_group)
    # With a vocabulary-parallel head the ranks first agree on the shapes (one collective, before any check that
    # could fail on some ranks only and leave the others waiting in a later collective).
    shard = None if process_group is None else describe_shard(hidden, weight, bias, process_group)
    check_tensor("completion_ids", completion_ids)
    check_tensor("completion_mask", completion_mask, optional=True)
    check_tensor("bias", bias, optional=True)
    if hidden.dim() != 3:
        raise fail("hidden", f"expected 3 dimensions [B, T, H], got shape {list(hidden.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise fail("hidden", f"expected a floating-point tensor, got dtype {hidden.dtype}", TypeError)
    batch, length, hidden_size = hidden.shape
    device = hidden.device
    if weight.dim() != 2 or weight.shape[1] != hidden_size:
        slice_note = " (this rank's slice of the vocabulary)" if process_group is not None else ""
        raise fail("weight", f"expected shape [V, {hidden_size}]{slice_note} (H of hidden), got {list(weight.shape)}")
    if weight.shape[0] == 0:
        raise fail("weight", "the vocabulary is empty")
    if weight.device != device:
        raise fail("weight", f"expected device {device} (that of hidden), got {weight.device}")
    if torch.is_autocast_enabled(device.type):
        compute = torch.get_autocast_dtype(device.type)
        hidden, weight = hidden.to(compute), weight.to(compute)
        bias = None if bias is None else bias.to(compute)
    elif weight.dtype != hidden.dtype:
        raise fail("weight", f"dtype {weight.dtype} differs from hidden's {hidden.dtype}", TypeError)
    vocab = weight.shape[0]
    if bias is not None:
        if tuple(bias.shape) != (vocab,):
            raise fail("bias", f"expected shape [{vocab}] (rows of weight), got {list(bias.shape)}")
        if bias.device != device:
            raise fail("bias", f"expected device {device} (that of hidden), got {bias.device}")
        if bias.dtype != weight.dtype:
            raise fail("bias", f"dtype {bias.dtype} differs from weight's {weight.dtype}", TypeError)
        bias = bias.contiguous()  # the kernels index it with unit stride
    if tuple(completion_ids.shape) != (batch, length):
        raise fail("completion_ids", f"expected shape [{batch}, {length}] (B, T of hidden), got "
                   f"{list(completion_ids.shape)}")
    if completion_ids.dtype.is_floating_point or completion_ids.dtype.is_complex or completion_ids.dtype == torch.bool:
        raise fail("completion_ids", f"expected an integer tensor, got dtype {completion_ids.dtype}", TypeError)
    if completion_ids.device != device:
        raise fail("completion_ids", f"expected device {device} (that of hidden), got {completion_ids.device}")
    accumulate = torch.float64 if weight.dtype == torch.float64 else torch.float32
    mask = None
    if completion_mask is not None:
        if tuple(completion_mask.shape) != (batch, length):
            raise fail("completion_mask", f"expected shape [{batch}, {length}], got {list(completion_mask.shape)}")
        if completion_mask.device != device:
            raise fail("completion_mask", f"expected device {device} (that of hidden), got {completion_mask.device}")
        if completion_mask.dtype.is_complex:
            raise fail("completion_mask", f"expected bool, integer or float, got {completion_mask.dtype}", TypeError)
        mask = completion_mask.to(accumulate)
    inv_temperature = 1.0 / check_number("temperature", options.temperature)
    softcap = None if options.logit_softcap is None else check_number("logit_softcap", options.logit_softcap)
    budget = default_memory_budget_mb(device) if options.memory_budget_mb is None else check_number(
        "memory_budget_mb", options.memory_budget_mb
    )
    check_choice("backend", options.backend, BACKENDS, "backend")
    check_choice("on_nonfinite", options.on_nonfinite, nonfinite_policies, "policy")
    check_choice("statistics_method", options.statistics_method, STATISTICS_METHODS, "method")
    head = Head(weight, bias, inv_temperature, budget, softcap, shard, options.statistics_method)
    return Batch(
        hidden=hidden.reshape(batch * length, hidden_size),
        ids=completion_ids.reshape(-1).long(),
        mask=mask,
        shape=(batch, length),
        head=head,
        backend=options.backend,
        on_nonfinite=options.on_nonfinite,
    )


@dataclass(frozen=True)
class LossArguments:
    """The objective's inputs of :func:`fused_gates.gated_policy_loss`, checked against the batch."""

    advantages: Tensor  # [B, T]
    row_advantages: bool  # given as [B]
    old_logprobs: Tensor | None  # [B, T]
    ref_logprobs: Tensor | None  # [B, T], None when beta == 0
    config: ObjectiveConfig
    options: LossOptions  # tensor options checked (group_ids as int64)
    packed: PackedRows | None = None  # sequence_ids: the loss's rows are the packed sequences


def _check_optional_map(name: str, value: object, shape: tuple[int, int], device: torch.device) -> Tensor | None:
    """An optional [B, T] tensor of numbers (bool and integer allowed)."""
    if value is None:
        return None
    check_tensor(name, value)
    if tuple(value.shape) != shape:
        raise fail(name, f"expected shape {list(shape)}, got {list(value.shape)}")
    if value.device != device:
        raise fail(name, f"expected device {device} (that of hidden), got {value.device}")
    if value.dtype.is_complex:
        raise fail(name, f"expected bool, integer or float, got {value.dtype}", TypeError)
    return value


def _check_topk(ids: object, logprobs: object, shape: tuple[int, int], device: torch.device) -> None:
    """DPPO's Top-K inputs: integer ids and float log-probs, both [B, T, K] with K >= 1."""
    check_tensor("old_topk_ids", ids)
    if ids.dim() != 3 or tuple(ids.shape[:2]) != shape or ids.shape[2] < 1:
        raise fail("old_topk_ids", f"expected shape [{shape[0]}, {shape[1]}, K] (B, T of hidden; K >= 1), got "
                   f"{list(ids.shape)}")
    if ids.dtype.is_floating_point or ids.is_complex() or ids.dtype == torch.bool:
        raise fail("old_topk_ids", f"expected an integer tensor, got {ids.dtype}", TypeError)
    if ids.device != device:
        raise fail("old_topk_ids", f"expected device {device} (that of hidden), got {ids.device}")
    check_float_tensor("old_topk_logprobs", logprobs, tuple(ids.shape), device)


def check_loss_arguments(
    batch: Batch, advantages: object, old_logprobs: object, ref_logprobs: object, options: LossOptions
) -> LossArguments:
    rows, length = batch.shape
    device = batch.device
    config = options.check_scalars()
    packed = _check_sequence_ids(options.sequence_ids, advantages, batch)
    sequences = rows if packed is None else packed.count  # the per-row inputs' length
    if config.beta != 0 and ref_logprobs is None:
        raise fail("ref_logprobs", "is required when beta != 0")
    if options.group_size is not None and sequences % options.group_size:
        what = "batch size B" if packed is None else "number of sequences S"
        raise fail("group_size", f"{options.group_size} does not divide the {what}={sequences}")
    group_ids = options.group_ids
    if group_ids is not None:
        check_tensor("group_ids", group_ids)
        if tuple(group_ids.shape) != (sequences,) or group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
            raise fail("group_ids", f"expected an integer tensor of shape [{sequences}], got {group_ids.dtype} "
                       f"{list(group_ids.shape)}", TypeError)
        if group_ids.device != device:
            raise fail("group_ids", f"expected device {device} (that of hidden), got {group_ids.device}")
        group_ids = group_ids.long()
    _check_optional_map("sampling_ratio", options.sampling_ratio, (rows, length), device)
    _check_optional_map("entropy_mask", options.entropy_mask, (rows, length), device)
    if options.sampling_logprobs is not None:
        check_float_tensor("sampling_logprobs", options.sampling_logprobs, (rows, length), device)
    if options.old_entropy is not None:
        check_float_tensor("old_entropy", options.old_entropy, (rows, length), device)
    if options.old_topk_ids is not None:
        _check_topk(options.old_topk_ids, options.old_topk_logprobs, (rows, length), device)
    items = options.num_items_in_batch
    if isinstance(items, Tensor) and options.loss_type == "dapo":
        check_tensor("num_items_in_batch", items)
        if items.numel() != 1 or items.is_complex() or items.dtype == torch.bool:
            raise fail("num_items_in_batch", f"expected a number, got a {items.dtype} tensor of shape "
                       f"{list(items.shape)}", TypeError)

    check_tensor("advantages", advantages)
    row_advantages = advantages.dim() == 1
    if row_advantages and packed is not None:
        advantages = check_float_tensor("advantages", advantages, (sequences,), device)[packed.index]
    elif row_advantages:
        check_float_tensor("advantages", advantages, (rows,), device)
        advantages = advantages.unsqueeze(1).expand(rows, length)
    else:
        check_float_tensor("advantages", advantages, (rows, length), device)
    for name, value in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if value is not None:
            check_float_tensor(name, value, (rows, length), device)
    return LossArguments(
        advantages=advantages,
        row_advantages=row_advantages,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs if config.beta != 0 else None,
        config=config,
        options=replace(options, group_ids=group_ids),
        packed=packed,
    )


def _check_sequence_ids(sequence_ids: object, advantages: object, batch: Batch) -> PackedRows | None:
    """Packed rows: ``sequence_ids`` [B, T] integers, with one advantage per sequence ([S], which sets S)."""
    if sequence_ids is None:
        return None
    check_tensor("sequence_ids", sequence_ids)
    if tuple(sequence_ids.shape) != batch.shape or sequence_ids.dtype.is_floating_point or sequence_ids.is_complex() \
            or sequence_ids.dtype == torch.bool:
        raise fail("sequence_ids", f"expected an integer tensor of shape {list(batch.shape)} (B, T of hidden), got "
                   f"{sequence_ids.dtype} {list(sequence_ids.shape)}", TypeError)
    if sequence_ids.device != batch.device:
        raise fail("sequence_ids", f"expected device {batch.device} (that of hidden), got {sequence_ids.device}")
    check_tensor("advantages", advantages)
    if advantages.dim() != 1:
        raise fail("advantages", f"with sequence_ids, expected one advantage per sequence [S], got shape "
                   f"{list(advantages.shape)} (per-token advantages of packed rows are not supported)")
    return PackedRows.of(sequence_ids, advantages.shape[0])
