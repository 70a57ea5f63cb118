"""Which tokens the pass computes, and the per-token inputs of those tokens: the plan between checking the arguments
and running a backend.

Only valid tokens (mask != 0) enter the vocabulary pass. Tokens whose hidden state holds inf / NaN are handled by
the ``on_nonfinite`` policy: ``raise`` (a ValueError naming ``hidden`` before any product), ``zero`` (dropped like
masked tokens: out of the loss, its normalisers and the gradients; with them tokens whose ``old_logprobs`` or
``ref_logprobs`` are non-finite) or ``propagate`` (computed as they are: NaN reaches the loss and every gradient).
The value checks of all arguments and the plan's sizes (tokens per row) are read in one host synchronisation, the
only one a call makes (a vocabulary-parallel head adds its shape agreement, a collective).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .arguments import Batch, LossArguments
from .objective import VESPO_LOG_RATIO_CLAMP, VESPO_LOWER_LOG_WEIGHT, TokenData, aggregation_weights, entropy_weights
from .packed_rows import PackedRows, whole_row_totals
from .sequence_parallel import SequenceShard
from .validation import fail

HIDDEN_NONFINITE = (
    "{count} token(s) where the mask is set have non-finite hidden states (inf or NaN, e.g. an overflow in the "
    "backbone); on_nonfinite='zero' drops such tokens, on_nonfinite='propagate' lets NaN through"
)


@dataclass(frozen=True)
class ValueCheck:
    """``failed`` is a 0-dim bool tensor or a count; when it is non-zero, ``argument: message`` is raised (with
    ``{count}`` in the message replaced by the count)."""

    argument: str
    message: str
    failed: Tensor


def run_value_checks(checks: list[ValueCheck], counts: Tensor | None = None,
                     agree: Callable[[Tensor], Tensor] | None = None) -> list[int]:
    """The checks that need tensor values, and the integer ``counts`` the plan needs on the host (e.g. how many tokens
    a pass computes), in one host synchronisation: the only one a call makes. ``agree`` (sequence-sharded rows) sums
    the failures over the ranks first, so that every rank raises the same error."""
    parts = [c.failed.reshape(1).to(torch.float64) for c in checks]
    if counts is not None:
        parts.append(counts.reshape(-1).to(torch.float64))  # exact below 2^53
    if not parts:
        return []
    values = torch.cat(parts)
    if agree is not None and checks:
        values = torch.cat([agree(values[:len(checks)].clone()), values[len(checks):]])
    values = values.tolist()
    for check, value in zip(checks, values, strict=False):
        if value:
            raise fail(check.argument, check.message.replace("{count}", f"{value:.0f}"))
    return [int(v) for v in values[len(checks):]]


@dataclass(frozen=True)
class TokenPlan:
    """The tokens of a ``[B, T]`` batch that the pass computes, and the way between the two layouts."""

    shape: tuple[int, int]
    valid_index: Tensor | None  # flat positions of the computed tokens; None when all are computed

    def gather(self, x: Tensor) -> Tensor:
        """A ``[B, T]`` tensor at the computed tokens, [N], with unit stride (the kernels index it so)."""
        return self.gather_rows(x.reshape(-1))

    def gather_rows(self, x: Tensor) -> Tensor:
        """A flat ``[B*T, ...]`` tensor at the computed tokens, [N, ...], contiguous."""
        return x.contiguous() if self.valid_index is None else x.index_select(0, self.valid_index)

    def scatter(self, values: Tensor) -> Tensor:
        """Per computed token ``values`` [N] as [B, T], 0 elsewhere."""
        batch, length = self.shape
        if self.valid_index is None:
            return values.reshape(batch, length)
        out = values.new_zeros(batch * length)
        out.index_copy_(0, self.valid_index, values)
        return out.reshape(batch, length)


def _finite_rows(hidden: Tensor) -> Tensor:
    return torch.isfinite(hidden).all(dim=1)


def _plan(shape: tuple[int, int], keep: Tensor | None, count: int) -> TokenPlan:
    """``count`` (read with the value checks) sizes the index, so that forming it needs no host synchronisation."""
    return TokenPlan(shape, None if keep is None else torch.nonzero_static(keep.reshape(-1), size=count).squeeze(1))


def _id_check(ids: Tensor, vocab: int, keep: Tensor | None) -> list[ValueCheck]:
    bad = (ids < 0) | (ids >= vocab)
    return [ValueCheck("completion_ids", f"token ids must lie in [0, {vocab}) (V of weight) where the mask is set",
                       (bad if keep is None else bad & keep.reshape(-1)).any())]


def _token_counts(keep: Tensor | None, shape: tuple[int, int], device: torch.device) -> Tensor:
    """Computed tokens of each row (the plan's sizes, read on the host with the checks)."""
    if keep is None:
        return torch.full((shape[0],), shape[1], device=device, dtype=torch.int64)
    return keep.reshape(shape).sum(-1)


def _mask_check(mask: Tensor | None) -> list[ValueCheck]:
    if mask is None:
        return []
    return [ValueCheck("completion_mask", "must be finite and >= 0", ~(torch.isfinite(mask) & (mask >= 0)).all())]


@dataclass
class LogprobTokens:
    plan: TokenPlan
    hidden: Tensor  # [N, H]
    ids: Tensor  # [N]


def plan_logprob_tokens(head: Batch, sequence: SequenceShard | None = None) -> LogprobTokens:
    """The tokens of :func:`fused_gates.token_logprobs` (``on_nonfinite``: raise or propagate)."""
    flat_mask = None if head.mask is None else head.mask.reshape(-1)
    keep = None if flat_mask is None else flat_mask != 0
    checks = _id_check(head.ids, head.head.vocab, keep) + _mask_check(head.mask)
    if head.on_nonfinite == "raise":
        bad = ~_finite_rows(head.hidden)
        checks.append(ValueCheck("hidden", HIDDEN_NONFINITE, (bad if keep is None else bad & keep).sum()))
    counts = run_value_checks(checks, None if keep is None else keep.sum(),
                              None if sequence is None else sequence.agree)
    plan = _plan(head.shape, keep, counts[0] if counts else 0)  # without a mask every token is computed
    return LogprobTokens(plan, plan.gather_rows(head.hidden), plan.gather_rows(head.ids))


@dataclass
class LossTokens:
    plan: TokenPlan
    hidden: Tensor  # [N, H]
    ids: Tensor  # [N]
    tokens: TokenData
    mask: Tensor  # [N] the weights m_t of the computed tokens
    flagged: Tensor  # [B, T] bool: tokens with mask set whose hidden state (or given log-prob) is non-finite


def plan_loss_tokens(head: Batch, args: LossArguments, sequence: SequenceShard | None = None) -> LossTokens:
    """Select the computed tokens, check every value, and build their :class:`TokenData` (``sequence``: the rows
    continue on the other ranks of a sequence group, whose sums the aggregation takes)."""
    batch, length = head.shape
    device = head.device
    acc = head.accumulate_dtype
    given_mask = head.mask.to(acc) if head.mask is not None else torch.ones(batch, length, device=device, dtype=acc)
    selected = given_mask != 0
    flagged = ~_finite_rows(head.hidden).reshape(batch, length) & selected
    given = [(name, value) for name, value in (("old_logprobs", args.old_logprobs),
                                               ("ref_logprobs", args.ref_logprobs)) if value is not None]
    checks = _mask_check(head.mask)
    if head.on_nonfinite == "zero":
        for _, value in given:
            flagged |= ~torch.isfinite(value) & selected
        keep = selected & ~flagged
        full_mask = given_mask * keep
    else:
        if head.on_nonfinite == "raise":
            checks.append(ValueCheck("hidden", HIDDEN_NONFINITE, flagged.sum()))
        full_mask = given_mask
        keep = None if head.mask is None else selected
    checks = _id_check(head.ids, head.head.vocab, keep) + checks + _option_checks(args, selected, head.head.vocab)
    inputs = [("advantages", args.advantages)]
    if head.on_nonfinite != "zero":
        inputs += [("old_logprobs", args.old_logprobs), ("ref_logprobs", args.ref_logprobs)]
    for name, value in inputs:
        if value is not None:
            bad = ~torch.isfinite(value)
            checks.append(ValueCheck(name, "must be finite where the mask is set",
                                     (bad if keep is None else bad & keep).any()))
    packed = args.packed
    if packed is not None:
        checks += _sequence_id_checks(packed, selected)
    counts = _token_counts(keep, head.shape, device) if packed is None else packed.sums(
        (selected if keep is None else keep).to(acc).unsqueeze(0))[0]
    row_counts = run_value_checks(checks, counts, None if sequence is None else sequence.agree)
    plan = _plan(head.shape, keep, sum(row_counts))

    options = args.options
    entropy_mask = None if options.entropy_mask is None else options.entropy_mask.to(acc)
    bonus_mask = full_mask if entropy_mask is None else full_mask * entropy_mask
    totals = bonus_total = vespo_offset = None
    if sequence is not None or packed is not None:
        totals, bonus_total, vespo_offset = whole_row_totals(
            packed, full_mask, bonus_mask if entropy_mask is not None and args.config.has_entropy_bonus else None,
            _vespo_log_ratio(args, acc), None if sequence is None else sequence.reduce)
    loss_weight = aggregation_weights(full_mask, options.loss_type, options.max_completion_length,
                                      options.num_items_in_batch, totals)
    row_tokens = (full_mask.sum(-1, keepdim=True) if totals is None else totals.row_tokens).clamp(min=1.0)
    rows = torch.arange(batch, device=device).unsqueeze(1).expand(batch, length) if packed is None else packed.index
    tokens = TokenData(
        advantages=plan.gather(args.advantages.to(acc)),
        mask=plan.gather(full_mask),
        loss_weight=plan.gather(loss_weight),
        entropy_weight=plan.gather(entropy_weights(bonus_mask, options.entropy_coef, bonus_total)),
        old_logprobs=None if args.old_logprobs is None else plan.gather(args.old_logprobs.to(acc)),
        ref_logprobs=None if args.ref_logprobs is None else plan.gather(args.ref_logprobs.to(acc)),
        row=plan.gather(rows),
        row_share=plan.gather(full_mask / row_tokens),
        num_rows=batch if packed is None else packed.count,
        policy_weight=_policy_weight(args, entropy_mask, acc, plan),
        sampling_logprobs=_sampling_logprobs(args, acc, plan),
        vespo_log_offset=_vespo_log_offset(args, acc, plan, vespo_offset),
        row_token_counts=row_counts,
        row_reduce=None if sequence is None else sequence.reduce,
        old_entropy=None if options.old_entropy is None else plan.gather(options.old_entropy.to(acc)),
        old_topk_logprobs=_topk_rows(options.old_topk_logprobs, acc, plan),
    )
    return LossTokens(plan, plan.gather_rows(head.hidden), plan.gather_rows(head.ids), tokens, tokens.mask, flagged)


def _topk_rows(values: Tensor | None, dtype: torch.dtype | None, plan: TokenPlan) -> Tensor | None:
    """A [B, T, K] input at the computed tokens, [N, K] (in ``dtype``, None: its own)."""
    if values is None:
        return None
    return plan.gather_rows(values.reshape(-1, values.shape[-1]).to(dtype or values.dtype))


def _policy_weight(args: LossArguments, entropy_mask: Tensor | None, acc: torch.dtype, plan: TokenPlan):
    """``q_t``: the sampler's importance ratio (TRL applies it to every objective but vespo, which takes it into its
    weight instead) times the entropy mask."""
    weight = None
    if args.options.sampling_ratio is not None and not args.config.gate.is_vespo:
        weight = args.options.sampling_ratio.to(acc)
    if entropy_mask is not None:
        weight = entropy_mask if weight is None else weight * entropy_mask
    return None if weight is None else plan.gather(weight)


def _sampling_logprobs(args: LossArguments, acc: torch.dtype, plan: TokenPlan) -> Tensor | None:
    """The off-policy mask's sampling log-probs: given, else the behaviour policy's, else (on-policy) none."""
    if args.config.off_policy_mask_threshold is None:
        return None
    given = args.options.sampling_logprobs
    sampling = given if given is not None else args.old_logprobs
    return None if sampling is None else plan.gather(sampling.to(acc))


def _vespo_log_ratio(args: LossArguments, acc: torch.dtype) -> Tensor | None:
    """vespo's ``clamp(log q^vllm_t, log 1e-8, 20)`` at every position (None: no vespo or no sampler ratio)."""
    if not args.config.gate.is_vespo or args.options.sampling_ratio is None:
        return None
    return torch.log(args.options.sampling_ratio.to(acc)).clamp(VESPO_LOWER_LOG_WEIGHT, VESPO_LOG_RATIO_CLAMP)


def _vespo_log_offset(args: LossArguments, acc: torch.dtype, plan: TokenPlan,
                      row_sums: Tensor | None = None) -> Tensor | None:
    """vespo's ``sum_t clamp(log q^vllm_t, log 1e-8, 20)`` of each row, over every position as TRL sums it
    (``row_sums`` [B, 1] or [B, T]: already summed over whole rows, across ranks or over packed sequences)."""
    log_ratio = _vespo_log_ratio(args, acc)
    if log_ratio is None:
        return None
    row_sum = (log_ratio.sum(-1, keepdim=True) if row_sums is None else row_sums).expand_as(log_ratio)
    return plan.gather(row_sum)


def _sequence_id_checks(packed: PackedRows, selected: Tensor) -> list[ValueCheck]:
    """Packed rows: every valid token in a sequence, the sequences in order (one run each)."""
    return [ValueCheck("sequence_ids", f"must lie in [0, {packed.count}) (S, the advantages' length) where the mask "
                       "is set", (selected & ~packed.member).any()),
            ValueCheck("sequence_ids", "must not decrease along the valid tokens of the batch (each sequence one "
                       "run of positions, in order)", packed.out_of_order(selected))]


def _option_checks(args: LossArguments, selected: Tensor, vocab: int) -> list[ValueCheck]:
    checks = []
    options = args.options
    items = options.num_items_in_batch
    if isinstance(items, Tensor) and options.loss_type == "dapo":
        checks.append(ValueCheck("num_items_in_batch", "must be finite and >= 0",
                                 ~(torch.isfinite(items) & (items >= 0)).all()))
    if options.sampling_ratio is not None:
        ratio = options.sampling_ratio
        checks.append(ValueCheck("sampling_ratio", "must be finite and >= 0 where the mask is set",
                                 (selected & ~(torch.isfinite(ratio) & (ratio >= 0))).any()))
    if options.old_topk_ids is not None:
        ids, logprobs = options.old_topk_ids, options.old_topk_logprobs
        checks.append(ValueCheck("old_topk_ids", f"ids must lie in [0, {vocab}) (V of weight) where the mask is set",
                                 (selected[..., None] & ((ids < 0) | (ids >= vocab))).any()))
        checks.append(ValueCheck("old_topk_logprobs", "must be finite and <= 0 where the mask is set",
                                 (selected[..., None] & ~(torch.isfinite(logprobs) & (logprobs <= 0))).any()))
    if options.old_entropy is not None:
        entropy = options.old_entropy
        checks.append(ValueCheck("old_entropy", "must be finite and >= 0 where the mask is set",
                                 (selected & ~(torch.isfinite(entropy) & (entropy >= 0))).any()))
    if options.entropy_mask is not None:
        mask = options.entropy_mask.float()
        checks.append(ValueCheck("entropy_mask", "must be finite and >= 0",
                                 ~(torch.isfinite(mask) & (mask >= 0)).all()))
    return checks
