"""Checking the public functions' arguments: every error names the argument; the result is a frozen spec.

:func:`check_head_arguments` checks what both entry points share (hidden states, lm_head, ids, mask, temperature,
budget, backend) and :func:`check_loss_arguments` the objective's arguments of :func:`fused_gates.gated_policy_loss`.
Checks that need tensor values (id ranges, finiteness) are collected as :class:`ValueCheck` s and run together by
:func:`run_value_checks`, in one host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .backend import BACKENDS, default_memory_budget_mb
from .gates import Gate, GateParameters, get_gate
from .objective import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, ObjectiveConfig
from .vocab_parallel import VocabShard, describe_shard, unwrap_dtensor_weight

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NONFINITE_POLICIES = ("raise", "zero", "propagate")


def fail(argument: str, message: str, kind: type[Exception] = ValueError) -> Exception:
    return kind(f"{argument}: {message}")


def check_tensor(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Tensor):
        raise fail(name, f"expected a torch.Tensor, got {type(value).__name__}", TypeError)


def check_float_tensor(name: str, value: object, shape: tuple[int, ...], device: torch.device) -> Tensor:
    check_tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise fail(name, f"expected a floating-point tensor, got dtype {value.dtype}", TypeError)
    if tuple(value.shape) != shape:
        raise fail(name, f"expected shape {list(shape)}, got {list(value.shape)}")
    if value.device != device:
        raise fail(name, f"expected device {device} (that of hidden), got {value.device}")
    return value


def check_number(name: str, value: object, *, minimum: float | None = 0.0, allow_minimum: bool = False) -> float:
    """A finite real number, above ``minimum`` (or equal to it with ``allow_minimum``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(name, f"expected a number, got {type(value).__name__}", TypeError)
    value = float(value)
    if minimum is None:
        if not math.isfinite(value):
            raise fail(name, f"must be a finite number, got {value}")
        return value
    if not math.isfinite(value) or value < minimum or (value == minimum and not allow_minimum):
        bound = f">= {minimum:g}" if allow_minimum else f"> {minimum:g}"
        raise fail(name, f"must be finite and {bound}, got {value}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise fail(name, f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(name, f"expected an int, got {type(value).__name__}", TypeError)
    if value <= 0:
        raise fail(name, f"must be > 0, got {value}")
    return value


@dataclass(frozen=True)
class HeadArguments:
    """The lm_head inputs, checked and flattened: ``z = (hidden W^T + bias) / temperature`` per token."""

    hidden: Tensor  # [B*T, H], in the compute dtype (the autocast dtype under autocast)
    weight: Tensor  # [V, H] (this rank's slice of a vocabulary-parallel head)
    bias: Tensor | None  # [V] (likewise)
    ids: Tensor  # [B*T] int64
    mask: Tensor | None  # [B, T] float32, None when every token is valid
    shape: tuple[int, int]  # (B, T)
    inv_temperature: float
    memory_budget_mb: float
    backend: str
    on_nonfinite: str
    softcap: float | None  # z = softcap tanh(x / softcap) / T
    shard: VocabShard | None  # the vocabulary-parallel head's slice, when there is one

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def vocab(self) -> int:
        """The whole vocabulary (all slices of a vocabulary-parallel head)."""
        return self.weight.shape[0] if self.shard is None else self.shard.vocab

    @property
    def accumulate_dtype(self) -> torch.dtype:
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32


def check_head_arguments(
    hidden: object,
    weight: object,
    completion_ids: object,
    completion_mask: object,
    bias: object,
    temperature: object,
    memory_budget_mb: object,
    backend: object,
    on_nonfinite: object,
    logit_softcap: object = None,
    process_group: object = None,
    nonfinite_policies: tuple[str, ...] = NONFINITE_POLICIES,
) -> HeadArguments:
    check_tensor("hidden", hidden)
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
    if tuple(completion_ids.shape) != (batch, length):
        raise fail("completion_ids", f"expected shape [{batch}, {length}] (B, T of hidden), got "
                   f"{list(completion_ids.shape)}")
    if completion_ids.dtype.is_floating_point or completion_ids.dtype.is_complex or completion_ids.dtype == torch.bool:
        raise fail("completion_ids", f"expected an integer tensor, got dtype {completion_ids.dtype}", TypeError)
    if completion_ids.device != device:
        raise fail("completion_ids", f"expected device {device} (that of hidden), got {completion_ids.device}")
    mask = None
    if completion_mask is not None:
        if tuple(completion_mask.shape) != (batch, length):
            raise fail("completion_mask", f"expected shape [{batch}, {length}], got {list(completion_mask.shape)}")
        if completion_mask.device != device:
            raise fail("completion_mask", f"expected device {device} (that of hidden), got {completion_mask.device}")
        if completion_mask.dtype.is_complex:
            raise fail("completion_mask", f"expected bool, integer or float, got {completion_mask.dtype}", TypeError)
        mask = completion_mask.float()
    inv_temperature = 1.0 / check_number("temperature", temperature)
    softcap = None if logit_softcap is None else check_number("logit_softcap", logit_softcap)
    budget = default_memory_budget_mb(device) if memory_budget_mb is None else check_number(
        "memory_budget_mb", memory_budget_mb
    )
    check_choice("backend", backend, BACKENDS, "backend")
    check_choice("on_nonfinite", on_nonfinite, nonfinite_policies, "policy")
    return HeadArguments(
        hidden=hidden.reshape(batch * length, hidden_size),
        weight=weight,
        bias=bias,
        ids=completion_ids.reshape(-1).long(),
        mask=mask,
        shape=(batch, length),
        inv_temperature=inv_temperature,
        memory_budget_mb=budget,
        backend=backend,
        on_nonfinite=on_nonfinite,
        softcap=softcap,
        shard=shard,
    )


@dataclass(frozen=True)
class LossArguments:
    """The objective's arguments of :func:`fused_gates.gated_policy_loss`, checked."""

    advantages: Tensor  # [B, T]
    row_advantages: bool  # given as [B]
    old_logprobs: Tensor | None  # [B, T]
    ref_logprobs: Tensor | None  # [B, T], None when beta == 0
    config: ObjectiveConfig
    loss_type: str
    max_completion_length: int | None
    num_items_in_batch: Tensor | float | None
    entropy_coef: float
    group_size: int | None
    group_ids: Tensor | None  # [B] int64 in [0, B)
    sampling_ratio: Tensor | None  # [B, T]
    entropy_mask: Tensor | None  # [B, T]
    sampling_logprobs: Tensor | None  # [B, T]


def _check_pair(name: str, value: object) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise fail(name, f"expected a (positive, negative) pair of numbers, got {value!r}", TypeError)
    return check_number(f"{name}[0]", value[0], minimum=None), check_number(f"{name}[1]", value[1], minimum=None)


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


def _only_with(name: str, value: object, condition: bool, requirement: str) -> None:
    """Refuse an option that would be ignored."""
    if value is not None and not condition:
        raise fail(name, f"only applies {requirement}; it would be ignored here")


def check_loss_arguments(
    head: HeadArguments,
    advantages: object,
    old_logprobs: object,
    ref_logprobs: object,
    *,
    gate: str | Gate,
    tau_pos: object,
    tau_neg: object,
    epsilon_low: object,
    epsilon_high: object,
    loss_type: object,
    max_completion_length: object,
    num_items_in_batch: object,
    importance_sampling_level: object,
    beta: object,
    use_bias_correction_kl: object,
    entropy_coef: object,
    group_size: object,
    group_ids: object,
    delta: object,
    vespo_k: object,
    vespo_lambda: object,
    sampling_ratio: object,
    entropy_mask: object,
    off_policy_mask_threshold: object,
    sampling_logprobs: object,
) -> LossArguments:
    batch, length = head.shape
    device = head.device
    gate_obj = get_gate(gate)
    _only_with("delta", delta, gate_obj.is_clip, "to gate='clip' (TRL's two-sided clipping)")
    _only_with("vespo_k", vespo_k, gate_obj.is_vespo, "to gate='vespo'")
    _only_with("vespo_lambda", vespo_lambda, gate_obj.is_vespo, "to gate='vespo'")
    _only_with("sampling_logprobs", sampling_logprobs, off_policy_mask_threshold is not None,
               "with off_policy_mask_threshold")
    delta = math.inf if delta is None else check_number("delta", delta)
    vespo_k = (2.0, 3.0) if vespo_k is None else _check_pair("vespo_k", vespo_k)
    vespo_lambda = (3.0, 2.0) if vespo_lambda is None else _check_pair("vespo_lambda", vespo_lambda)
    if off_policy_mask_threshold is not None:
        off_policy_mask_threshold = check_number("off_policy_mask_threshold", off_policy_mask_threshold, minimum=None)
    tau_pos = check_number("tau_pos", tau_pos)
    tau_neg = check_number("tau_neg", tau_neg)
    epsilon_low = check_number("epsilon_low", epsilon_low, allow_minimum=True)
    if epsilon_low > 1:
        raise fail("epsilon_low", f"must be in [0, 1] (the lower clip bound 1 - epsilon_low >= 0), got {epsilon_low}")
    epsilon_high = epsilon_low if epsilon_high is None else check_number(
        "epsilon_high", epsilon_high, allow_minimum=True
    )
    check_choice("loss_type", loss_type, LOSS_TYPES, "loss_type")
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise fail("max_completion_length", "is required for loss_type='dr_grpo'")
        check_positive_int("max_completion_length", max_completion_length)
    check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS, "level")
    beta = check_number("beta", beta, allow_minimum=True)
    entropy_coef = check_number("entropy_coef", entropy_coef, minimum=None)
    if beta != 0 and ref_logprobs is None:
        raise fail("ref_logprobs", "is required when beta != 0")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise fail("group_size", f"must be a positive int, got {group_size!r}")
        if batch % group_size:
            raise fail("group_size", f"{group_size} does not divide the batch size B={batch}")
    if group_ids is not None:
        if group_size is not None:
            raise fail("group_ids", "give group_size or group_ids, not both")
        check_tensor("group_ids", group_ids)
        if tuple(group_ids.shape) != (batch,) or group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
            raise fail("group_ids", f"expected an integer tensor of shape [{batch}], got {group_ids.dtype} "
                       f"{list(group_ids.shape)}", TypeError)
        if group_ids.device != device:
            raise fail("group_ids", f"expected device {device} (that of hidden), got {group_ids.device}")
        group_ids = group_ids.long()
    sampling_ratio = _check_optional_map("sampling_ratio", sampling_ratio, (batch, length), device)
    entropy_mask = _check_optional_map("entropy_mask", entropy_mask, (batch, length), device)
    if sampling_logprobs is not None:
        check_float_tensor("sampling_logprobs", sampling_logprobs, (batch, length), device)

    check_tensor("advantages", advantages)
    row_advantages = advantages.dim() == 1
    if row_advantages:
        check_float_tensor("advantages", advantages, (batch,), device)
        advantages = advantages.unsqueeze(1).expand(batch, length)
    else:
        check_float_tensor("advantages", advantages, (batch, length), device)
    for name, value in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if value is not None:
            check_float_tensor(name, value, (batch, length), device)
    if num_items_in_batch is not None and loss_type == "dapo":
        items = torch.as_tensor(num_items_in_batch)
        if items.numel() != 1 or items.is_complex():
            raise fail("num_items_in_batch", f"expected a number, got {num_items_in_batch!r}", TypeError)

    config = ObjectiveConfig(
        gate=gate_obj,
        params=GateParameters(tau_pos, tau_neg, epsilon_low, epsilon_high, delta, vespo_k[0], vespo_lambda[0],
                              vespo_k[1], vespo_lambda[1]),
        sequence_level=importance_sampling_level == "sequence",
        beta=beta,
        use_bias_correction_kl=bool(use_bias_correction_kl),
        has_entropy_bonus=entropy_coef != 0,
        off_policy_mask_threshold=off_policy_mask_threshold,
    )
    return LossArguments(
        advantages=advantages,
        row_advantages=row_advantages,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs if beta != 0 else None,
        config=config,
        loss_type=loss_type,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
        entropy_coef=entropy_coef,
        group_size=group_size,
        group_ids=group_ids,
        sampling_ratio=sampling_ratio,
        entropy_mask=entropy_mask,
        sampling_logprobs=sampling_logprobs,
    )


@dataclass(frozen=True)
class ValueCheck:
    """``failed`` is a 0-dim bool tensor or a count; when it is non-zero, ``argument: message`` is raised (with
    ``{count}`` in the message replaced by the count)."""

    argument: str
    message: str
    failed: Tensor


def run_value_checks(checks: list[ValueCheck]) -> None:
    """The checks that need tensor values, in one host synchronisation."""
    if not checks:
        return
    values = torch.stack([c.failed.reshape(()).to(torch.float64) for c in checks]).tolist()
    for check, value in zip(checks, values, strict=True):
        if value:
            raise fail(check.argument, check.message.replace("{count}", f"{value:.0f}"))
