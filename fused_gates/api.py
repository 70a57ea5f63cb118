"""The public entry points: :func:`gated_policy_loss` and :func:`token_logprobs`."""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .function import GatedPolicyLossFunction
from .gates import Gate, GateParameters, get_gate
from .objective import (
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_TYPES,
    ObjectiveConfig,
    TokenData,
    aggregation_weights,
    entropy_weights,
)
from .torch_backend import HeadSpec, default_memory_budget_mb, logprobs_and_entropy

BACKENDS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class GatedPolicyLossOutput:
    """Result of :func:`gated_policy_loss`.

    ``loss`` is differentiable w.r.t. ``hidden``, ``weight`` and ``bias``; everything else is detached. Per-token
    tensors are [B, T] float32 (float64 for float64 inputs) and hold 0 at masked positions. At sequence level
    ``ratio``, ``gate_value`` and ``gate_grad`` repeat the row's value on each of its tokens.
    """

    loss: Tensor
    logprobs: Tensor
    entropy: Tensor
    ratio: Tensor
    gate_value: Tensor
    gate_grad: Tensor
    eur: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def _fail(argument: str, message: str, kind: type[Exception] = ValueError) -> Exception:
    return kind(f"{argument}: {message}")


def _check_tensor(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Tensor):
        raise _fail(name, f"expected a torch.Tensor, got {type(value).__name__}", TypeError)


def _check_float_tensor(name: str, value: Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    _check_tensor(name, value)
    if value.dtype not in _FLOAT_DTYPES:
        raise _fail(name, f"expected a floating-point tensor, got dtype {value.dtype}", TypeError)
    if tuple(value.shape) != shape:
        raise _fail(name, f"expected shape {list(shape)}, got {list(value.shape)}")
    if value.device != device:
        raise _fail(name, f"expected device {device} (that of hidden), got {value.device}")


def _check_positive_float(name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(name, f"expected a number, got {type(value).__name__}", TypeError)
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise _fail(name, f"must be finite and {bound}, got {value}")
    return value


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise _fail("backend", f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "auto":
        if device.type == "cuda" and _triton_available():
            return "triton"
        return "torch"
    if backend == "triton":
        if not _triton_available():
            raise _fail("backend", "backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and not interpreted:
            raise _fail("backend", f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    return backend


def _triton_available() -> bool:
    # Looked up, not imported: Triton decides at import whether its kernels run compiled or interpreted.
    return importlib.util.find_spec("triton") is not None


@dataclass
class _Head:
    hidden: Tensor  # [B*T, H]
    weight: Tensor
    bias: Tensor | None
    ids: Tensor  # [B*T]
    valid_index: Tensor | None  # flat positions of valid tokens; None when all are valid
    shape: tuple[int, int]


def _prepare_head(
    hidden: object, weight: object, completion_ids: object, completion_mask: object, bias: object
) -> tuple[_Head, Tensor | None]:
    """Validate and flatten the lm_head inputs; returns the head and the mask (float32, or None)."""
    _check_tensor("hidden", hidden)
    _check_tensor("weight", weight)
    _check_tensor("completion_ids", completion_ids)
    _check_tensor("completion_mask", completion_mask, optional=True)
    _check_tensor("bias", bias, optional=True)
    if hidden.dim() != 3:
        raise _fail("hidden", f"expected 3 dimensions [B, T, H], got shape {list(hidden.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise _fail("hidden", f"expected a floating-point tensor, got dtype {hidden.dtype}", TypeError)
    batch, length, hidden_size = hidden.shape
    device = hidden.device
    if weight.dim() != 2 or weight.shape[1] != hidden_size:
        raise _fail("weight", f"expected shape [V, {hidden_size}] (H of hidden), got {list(weight.shape)}")
    if weight.shape[0] == 0:
        raise _fail("weight", "the vocabulary is empty")
    if weight.device != device:
        raise _fail("weight", f"expected device {device} (that of hidden), got {weight.device}")
    autocast = torch.is_autocast_enabled(device.type)
    if autocast:
        compute = torch.get_autocast_dtype(device.type)
        hidden, weight = hidden.to(compute), weight.to(compute)
        bias = None if bias is None else bias.to(compute)
    elif weight.dtype != hidden.dtype:
        raise _fail("weight", f"dtype {weight.dtype} differs from hidden's {hidden.dtype}", TypeError)
    vocab = weight.shape[0]
    if bias is not None:
        if tuple(bias.shape) != (vocab,):
            raise _fail("bias", f"expected shape [{vocab}] (V of weight), got {list(bias.shape)}")
        if bias.device != device:
            raise _fail("bias", f"expected device {device} (that of hidden), got {bias.device}")
        if bias.dtype != weight.dtype:
            raise _fail("bias", f"dtype {bias.dtype} differs from weight's {weight.dtype}", TypeError)
    if tuple(completion_ids.shape) != (batch, length):
        raise _fail("completion_ids", f"expected shape [{batch}, {length}] (B, T of hidden), got "
                    f"{list(completion_ids.shape)}")
    if completion_ids.dtype.is_floating_point or completion_ids.dtype.is_complex or completion_ids.dtype == torch.bool:
        raise _fail("completion_ids", f"expected an integer tensor, got dtype {completion_ids.dtype}", TypeError)
    if completion_ids.device != device:
        raise _fail("completion_ids", f"expected device {device} (that of hidden), got {completion_ids.device}")

    mask = None
    valid_index = None
    ids = completion_ids.reshape(-1).long()
    if completion_mask is not None:
        if tuple(completion_mask.shape) != (batch, length):
            raise _fail("completion_mask", f"expected shape [{batch}, {length}], got {list(completion_mask.shape)}")
        if completion_mask.device != device:
            raise _fail("completion_mask", f"expected device {device} (that of hidden), got {completion_mask.device}")
        if completion_mask.dtype.is_complex:
            raise _fail("completion_mask", f"expected bool, integer or float, got {completion_mask.dtype}", TypeError)
        mask = completion_mask.float()
        valid_index = (mask.reshape(-1) != 0).nonzero().squeeze(1)

    flat_hidden = hidden.reshape(batch * length, hidden_size)
    head = _Head(flat_hidden, weight, bias, ids, valid_index, (batch, length))
    return head, mask


def _check_values(checks: list[tuple[str, str, Tensor]]) -> None:
    """Data checks that need the values: one host synchronisation for all of them."""
    if not checks:
        return
    failed = torch.stack([c[2].reshape(()) for c in checks]).tolist()
    for (argument, message, _), bad in zip(checks, failed, strict=True):
        if bad:
            raise _fail(argument, message)


def _valid(head: _Head, x: Tensor) -> Tensor:
    flat = x.reshape(-1)
    return flat if head.valid_index is None else flat.index_select(0, head.valid_index)


def _scatter(head: _Head, values: Tensor) -> Tensor:
    batch, length = head.shape
    if head.valid_index is None:
        return values.reshape(batch, length)
    out = values.new_zeros(batch * length)
    out.index_copy_(0, head.valid_index, values)
    return out.reshape(batch, length)


def gated_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    advantages: Tensor,
    completion_mask: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    *,
    gate: str | Gate = "sigmoid",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    importance_sampling_level: str = "token",
    beta: float = 0.0,
    use_bias_correction_kl: bool = False,
    temperature: float = 1.0,
    entropy_coef: float = 0.0,
    bias: Tensor | None = None,
    group_size: int | None = None,
    backend: str = "auto",
    memory_budget_mb: float | None = None,
) -> GatedPolicyLossOutput:
    """Gated policy-gradient loss (GRPO / SAPO and the paper's soft gates) from last hidden states and the lm_head,
    without materialising the ``[B*T, V]`` logits.

    Per completion token, with ``z = (hidden @ weight.T + bias) / temperature``: ``logp = log_softmax(z)[id]``,
    ``r = exp(logp - old_logprobs)`` (``r = 1`` with the on-policy gradient when ``old_logprobs`` is None), the
    gate ``f(r)`` with ``tau = tau_pos`` where the advantage is positive and ``tau_neg`` otherwise (``clip`` uses
    ``epsilon_low`` / ``epsilon_high``), and the per-token loss ``-f(r) A + beta * k3_kl(ref, logp)``. The tokens are
    aggregated as TRL 1.16's ``GRPOTrainer`` does for ``loss_type`` (before dividing by gradient-accumulation
    steps): ``grpo`` (mean over rows of the row's token mean), ``bnpo`` (token mean over the batch), ``dr_grpo``
    (sum / (B * max_completion_length)), ``dapo`` (sum / num_items_in_batch, default the token count).
    ``entropy_coef`` subtracts ``entropy_coef * mean entropy``. ``gate="sigmoid"`` with ``loss_type="grpo"`` is
    TRL's ``loss_type="sapo"``; ``gate="clip"`` is TRL's clipped objective.

    Args:
        hidden: [B, T, H] states that predict ``completion_ids`` (already shifted).
        weight: [V, H] lm_head weight (same dtype as ``hidden`` unless autocast is on).
        completion_ids: [B, T] integer token ids in [0, V).
        advantages: [B] or [B, T].
        completion_mask: [B, T] (bool, integer or float weights); masked tokens are skipped entirely.
        old_logprobs: [B, T] behaviour-policy log-probs; None means on-policy.
        ref_logprobs: [B, T] reference-model log-probs, required when ``beta != 0``.
        gate: a registered gate name (``clip``, ``sigmoid``, ``erf``, ``arctan``, ``softsign``, or one added with
            :func:`fused_gates.register_gate`) or a :class:`Gate`.
        epsilon_high: defaults to ``epsilon_low``.
        num_items_in_batch: the ``dapo`` normaliser (ignored by the other loss types).
        importance_sampling_level: ``token`` or ``sequence`` (GSPO: one ratio per row, the exp of the row's mean
            log-ratio).
        use_bias_correction_kl: multiply the KL term by the importance ratio (TRL's flag).
        group_size: completions per prompt (consecutive rows); makes ``eur`` the paper's exact per-group mean.
        backend: ``auto`` (Triton on CUDA when installed, else ``torch``), ``torch`` or ``triton``.
        memory_budget_mb: bound on the backend's working buffers (default 128 MiB on CPU, 768 MiB on CUDA); sets
            the token chunk size.

    Returns:
        :class:`GatedPolicyLossOutput` with the scalar ``loss`` and detached per-token ``logprobs``, ``entropy``,
        ``ratio``, ``gate_value``, ``gate_grad`` (f'(r)), the Effective Update Ratio ``eur`` (paper eq. 12) and
        ``metrics`` (scalar tensors; no host synchronisation is forced to compute them).
    """
    head, mask = _prepare_head(hidden, weight, completion_ids, completion_mask, bias)
    batch, length = head.shape
    device = head.hidden.device

    gate_obj = get_gate(gate)
    tau_pos = _check_positive_float("tau_pos", tau_pos)
    tau_neg = _check_positive_float("tau_neg", tau_neg)
    epsilon_low = _check_positive_float("epsilon_low", epsilon_low, allow_zero=True)
    if epsilon_low > 1:
        raise _fail("epsilon_low", f"must be in [0, 1] (the lower clip bound 1 - epsilon_low >= 0), got {epsilon_low}")
    epsilon_high = epsilon_low if epsilon_high is None else _check_positive_float(
        "epsilon_high", epsilon_high, allow_zero=True
    )
    if loss_type not in LOSS_TYPES:
        raise _fail("loss_type", f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise _fail("max_completion_length", "is required for loss_type='dr_grpo'")
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int):
            raise _fail("max_completion_length", f"expected an int, got {type(max_completion_length).__name__}",
                        TypeError)
        if max_completion_length <= 0:
            raise _fail("max_completion_length", f"must be > 0, got {max_completion_length}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise _fail(
            "importance_sampling_level",
            f"unknown level {importance_sampling_level!r}; choose one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}",
        )
    beta = _check_positive_float("beta", beta, allow_zero=True)
    temperature = _check_positive_float("temperature", temperature)
    if isinstance(entropy_coef, bool) or not isinstance(entropy_coef, (int, float)) or not math.isfinite(entropy_coef):
        raise _fail("entropy_coef", f"must be a finite number, got {entropy_coef!r}")
    if beta != 0 and ref_logprobs is None:
        raise _fail("ref_logprobs", "is required when beta != 0")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise _fail("group_size", f"must be a positive int, got {group_size!r}")
        if batch % group_size:
            raise _fail("group_size", f"{group_size} does not divide the batch size B={batch}")
    budget = default_memory_budget_mb(device) if memory_budget_mb is None else _check_positive_float(
        "memory_budget_mb", memory_budget_mb
    )
    backend = _resolve_backend(backend, device)

    _check_tensor("advantages", advantages)
    row_advantages = advantages.dim() == 1
    if row_advantages:
        _check_float_tensor("advantages", advantages, (batch,), device)
        advantages = advantages.unsqueeze(1).expand(batch, length)
    else:
        _check_float_tensor("advantages", advantages, (batch, length), device)
    for name, value in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if value is not None:
            _check_float_tensor(name, value, (batch, length), device)
    if num_items_in_batch is not None and loss_type == "dapo":
        items = torch.as_tensor(num_items_in_batch)
        if items.numel() != 1 or items.is_complex():
            raise _fail("num_items_in_batch", f"expected a number, got {num_items_in_batch!r}", TypeError)

    # float32 per-token maths (float64 for float64 inputs: gradcheck and references)
    acc = torch.float64 if head.weight.dtype == torch.float64 else torch.float32
    full_mask = mask.to(acc) if mask is not None else torch.ones(batch, length, device=device, dtype=acc)
    loss_weight = aggregation_weights(full_mask, loss_type, max_completion_length, num_items_in_batch)
    entropy_weight = entropy_weights(full_mask, float(entropy_coef))
    row_tokens = full_mask.sum(-1, keepdim=True).clamp(min=1.0)
    rows = torch.arange(batch, device=device).unsqueeze(1).expand(batch, length)

    ids = _valid(head, head.ids)
    tokens = TokenData(
        advantages=_valid(head, advantages.to(acc)),
        mask=_valid(head, full_mask),
        loss_weight=_valid(head, loss_weight),
        entropy_weight=_valid(head, entropy_weight),
        old_logprobs=None if old_logprobs is None else _valid(head, old_logprobs.to(acc)),
        ref_logprobs=None if ref_logprobs is None or beta == 0 else _valid(head, ref_logprobs.to(acc)),
        row=_valid(head, rows),
        row_share=_valid(head, full_mask / row_tokens),
        num_rows=batch,
    )
    checks = []
    if ids.numel():
        vocab = head.weight.shape[0]
        checks += [
            ("completion_ids", f"token ids must lie in [0, {vocab}) (V of weight) where the mask is set",
             (ids.min() < 0) | (ids.max() >= vocab)),
            ("advantages", "must be finite where the mask is set", ~torch.isfinite(tokens.advantages).all()),
        ]
        for name, values in (("old_logprobs", tokens.old_logprobs), ("ref_logprobs", tokens.ref_logprobs)):
            if values is not None:
                checks.append((name, "must be finite where the mask is set", ~torch.isfinite(values).all()))
    if mask is not None:
        checks.append(("completion_mask", "must be finite and >= 0", ~(torch.isfinite(mask) & (mask >= 0)).all()))
    _check_values(checks)

    config = ObjectiveConfig(
        gate=gate_obj,
        params=GateParameters(tau_pos, tau_neg, epsilon_low, epsilon_high),
        sequence_level=importance_sampling_level == "sequence",
        beta=beta,
        use_bias_correction_kl=bool(use_bias_correction_kl),
        has_entropy_bonus=entropy_coef != 0,
    )
    valid_hidden = _valid_rows(head)
    loss, logp, entropy, ratio, gate_value, gate_grad, kl = GatedPolicyLossFunction.apply(
        valid_hidden, head.weight, head.bias, ids, tokens, config, 1.0 / temperature, budget, backend
    )
    metrics = _metrics(tokens, config, entropy, ratio, gate_value, gate_grad, kl, batch, group_size, row_advantages)
    return GatedPolicyLossOutput(
        loss=loss,
        logprobs=_scatter(head, logp),
        entropy=_scatter(head, entropy),
        ratio=_scatter(head, ratio),
        gate_value=_scatter(head, gate_value),
        gate_grad=_scatter(head, gate_grad),
        eur=metrics["eur"],
        metrics=metrics,
    )


def _valid_rows(head: _Head) -> Tensor:
    if head.valid_index is None:
        return head.hidden
    return head.hidden.index_select(0, head.valid_index)


def _masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def _metrics(
    tokens: TokenData,
    config: ObjectiveConfig,
    entropy: Tensor,
    ratio: Tensor,
    gate_value: Tensor,
    gate_grad: Tensor,
    kl: Tensor,
    batch: int,
    group_size: int | None,
    row_advantages: bool,
) -> dict[str, Tensor]:
    m = tokens.mask
    has_tokens = m.sum() > 0
    zero = m.new_zeros(())
    metrics: dict[str, Tensor] = {}
    if group_size is None:
        metrics["eur"] = _masked_mean(gate_grad, m)
    else:
        # Paper eq. 12: mean over prompt groups of the group's token mean of f'(r).
        groups = tokens.row // group_size
        num_groups = batch // group_size
        weighted = m.new_zeros(num_groups).index_add_(0, groups, gate_grad * m)
        counts = m.new_zeros(num_groups).index_add_(0, groups, m)
        present = counts > 0
        per_group = torch.where(present, weighted / counts.clamp(min=1e-30), zero)
        metrics["eur"] = per_group.sum() / present.sum().clamp(min=1)
    metrics["entropy"] = _masked_mean(entropy, m)
    metrics["ratio/mean"] = _masked_mean(ratio, m)
    if ratio.numel():
        metrics["ratio/min"] = torch.where(has_tokens, ratio.min(), zero)
        metrics["ratio/max"] = torch.where(has_tokens, ratio.max(), zero)
    else:
        metrics["ratio/min"] = metrics["ratio/max"] = zero
    metrics["gate/mean"] = _masked_mean(gate_value, m)
    if config.beta != 0:
        metrics["kl"] = _masked_mean(kl, m)
    if config.gate.is_clip:
        params = config.params
        low = ((ratio < 1 - params.epsilon_low) & (tokens.advantages < 0)).to(m.dtype)
        high = ((ratio > 1 + params.epsilon_high) & (tokens.advantages > 0)).to(m.dtype)
        if config.sequence_level and row_advantages:
            # TRL's ratio and advantage are then [B, 1]: it counts rows (every row of the batch), not tokens.
            low_mean = m.new_zeros(batch).scatter_reduce_(0, tokens.row, low, reduce="amax").mean()
            high_mean = m.new_zeros(batch).scatter_reduce_(0, tokens.row, high, reduce="amax").mean()
        else:
            low_mean, high_mean = _masked_mean(low, m), _masked_mean(high, m)
        metrics["clip_ratio/low_mean"] = low_mean
        metrics["clip_ratio/high_mean"] = high_mean
        metrics["clip_ratio/region_mean"] = low_mean + high_mean
    return metrics


@torch.no_grad()
def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    bias: Tensor | None = None,
    backend: str = "auto",
    memory_budget_mb: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token log-probs and entropies [B, T] (float32, 0 where masked) of ``completion_ids`` under the lm_head,
    without gradient and without materialising the logits: the old- and reference-policy passes of RL training.
    One matrix product of ``hidden @ weight.T``; arguments as in :func:`gated_policy_loss`."""
    head, _ = _prepare_head(hidden, weight, completion_ids, completion_mask, bias)
    temperature = _check_positive_float("temperature", temperature)
    budget = default_memory_budget_mb(head.hidden.device) if memory_budget_mb is None else _check_positive_float(
        "memory_budget_mb", memory_budget_mb
    )
    backend = _resolve_backend(backend, head.hidden.device)
    ids = _valid(head, head.ids)
    if ids.numel():
        vocab = head.weight.shape[0]
        _check_values([("completion_ids", f"token ids must lie in [0, {vocab}) (V of weight) where the mask is set",
                        (ids.min() < 0) | (ids.max() >= vocab))])
    spec = HeadSpec(head.weight, head.bias, 1.0 / temperature, budget)
    if backend == "triton":
        from .kernels import launcher

        logp, entropy, _ = launcher.logprobs_and_entropy(_valid_rows(head), ids, spec)
    else:
        logp, entropy, _ = logprobs_and_entropy(_valid_rows(head), ids, spec)
    return _scatter(head, logp), _scatter(head, entropy)
