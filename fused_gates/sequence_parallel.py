"""Rows sharded by sequence (context parallelism: Ulysses, ring attention): each rank of a ``sequence_group`` holds
the same positions of every row -- a contiguous slice ``[t0, t1)`` (slices may be uneven or empty), or any other
split such as the load-balanced chunks of PyTorch's ring attention, since only sums over the positions are taken --
and every aggregation over a row or the batch is made whole by reductions of per-row sums.

What crosses the ranks is never a hidden state, a logit or a per-token value: per call, with ``B`` rows and ``s``
bytes per number (8 for float64 inputs, else 4),

1. before any work, one ``all_gather_object`` of each rank's fingerprint: its shapes (``B``, ``H``, dtype, head
   rows), every option, a digest of each per-row input's values (advantages [B], ``group_ids``), or instead the
   error its own argument checks raised, so that a rank whose arguments fail, or that disagrees with the others,
   stops every rank with an error that names the argument instead of leaving them waiting in a later collective
   (about 200 pickled bytes whatever B);
2. one ``all_reduce`` of the value checks' failure counts (4 to 10 float64), for the same reason;
3. one ``all_reduce`` of the row totals the aggregation divides by: each row's mask sum (``s B``), with an entropy
   mask and an entropy bonus the masked sum (``s B``), for vespo with the sampler's ratio its log-ratio sum
   (``s B``);
4. the objective's whole-row sums, only where a token's coefficient depends on its whole row: one ``all_reduce`` of
   ``s B`` each, 2 at sequence level (the row's mean log-ratio, then its sum of ``w dP/dr``), 1 for vespo (the row's
   log-ratio), 2 for the off-policy mask (the row's tokens and its log-ratio sum);
5. the loss and the metrics: one ``all_reduce(SUM)`` of ``s (2 B + k)`` (each row's tokens and ``sum m f'(r)``, and
   6 to 9 scalar sums) and one ``all_reduce(MAX)`` of ``s (2 + c B)`` (the ratio's range; ``c`` per-row flags where
   TRL counts them per row: 2 for ``clip`` and 1 for ``cispo`` at sequence level, 1 for ``vespo``, with [B]
   advantages).

That is ``3 s`` bytes per row at token level and at most ``11 s`` (vespo at sequence level with the sampler's ratio,
an entropy mask and bonus, and the off-policy mask): 12 to 44 bytes per row in float32 and bfloat16, 24 to 88 in
float64, plus about 300 bytes per call, independent of T, H and V. Measured by
``fused_gates.integrations.app.context_parallel`` (B = 8, float32, per rank): 168 bytes of all-reduces at token
level, 232 at sequence level, and a 195-byte fingerprint.

Each rank's loss is the global one (the others' part enters as a constant), so ``loss.backward()`` on every rank
gives the gradient of the global loss with respect to its own tokens' hidden states, and its own tokens' share of
the weight (and bias) gradient: the sum over the ranks is the unsharded call's (an ``all_reduce`` of the weight
gradient, as data parallelism already does). Where a token's coefficient depends on its whole row (sequence-level
ratios, vespo, the off-policy mask) the forward takes the statistics of every token first and the backward
recomputes the logits (four products instead of three), as an unsharded row longer than a chunk does.

:func:`high_entropy_mask` gives TRL's ``top_entropy_quantile`` mask (the ``entropy_mask`` input) over tokens spread
across ranks, exactly, by a radix selection of the quantile's order statistics (histograms, not entropies, cross the
ranks). The collectives need the group's device: CPU tensors with gloo, CUDA tensors (and
``torch.cuda.set_device``) with NCCL.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .entropy_trust import ESTR_METRIC
from .gate_inputs import DPPO_GATES
from .gates import Gate
from .metrics import cispo_flags, clip_flags, eur_from_row_sums
from .objective import ObjectiveConfig, TokenData
from .validation import check_number, fail

Checked = TypeVar("Checked")
Fingerprint = list[tuple[str, str, object]]  # (argument, what, value)

NOT_INITIALISED = "torch.distributed is not initialised"
UNFINGERPRINTED_OPTIONS = ("memory_budget_mb", "statistics_method", "sequence_group")
"""Options that may differ between the ranks of a sequence group (they change how this rank computes, not what)."""


@dataclass(frozen=True)
class SequenceShard:
    """This rank's place in a sequence group of ``size`` ranks."""

    group: object
    rank: int
    size: int

    def reduce(self, partial: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        """``partial`` (a fresh tensor: reduced in place) summed (or ``op``) over the group."""
        dist.all_reduce(partial, op=op, group=self.group)
        return partial

    def agree(self, failures: Tensor) -> Tensor:
        """The value checks' failure counts of every rank, summed: every rank raises the same error."""
        return self.reduce(failures)


def _group_place(group: object) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise fail("sequence_group", NOT_INITIALISED)
    return dist.get_rank(group), dist.get_world_size(group)


def checked_on_every_rank(
    group: object | None,
    check: Callable[[], Checked],
    fingerprint: Callable[[Checked], Fingerprint],
) -> tuple[Checked, SequenceShard | None]:
    """``check()`` (the argument checks) on every rank of ``group``, then one exchange of their outcomes and
    fingerprints: a rank whose checks failed re-raises its error and the others raise one naming that rank; ranks
    that disagree all raise an error naming the argument. Without a group: ``check()`` as it is."""
    if group is None:
        return check(), None
    rank, world = _group_place(group)
    error: BaseException | None = None
    checked, entries = None, None
    try:
        checked = check()
        entries = fingerprint(checked)
    except Exception as raised:  # every rank must learn of it before any of them waits in a collective
        error = raised
    # only the values travel: the names are the same code on every rank
    mine = (None if error is None else f"{type(error).__name__}: {error}",
            None if entries is None else [value for _, _, value in entries])
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    if error is not None:
        raise error
    for other, (message, _) in enumerate(gathered):
        if message is not None:
            raise ValueError(f"sequence_group: rank {other} of the group refused its arguments ({message}); every "
                             f"rank of the group stops here")
    _compare_fingerprints(entries, [values for _, values in gathered])
    return checked, SequenceShard(group, rank, world)


def _compare_fingerprints(entries: Fingerprint, tables: list[list[object]]) -> None:
    for column, (argument, what, _) in enumerate(entries):
        values = [table[column] for table in tables]
        if any(value != values[0] for value in values[1:]):
            raise ValueError(f"{argument}: the ranks of sequence_group disagree on {what}: {values} by rank")


def _describe(value: object) -> object:
    """A comparable description of an option's value: tensors of one value per row by a digest of their values
    (8 bytes whatever B), per-token tensors by their rows (their lengths are each rank's own), a gate by its name."""
    if isinstance(value, Tensor):
        if value.dim() <= 1:
            values = value.detach().double().cpu().reshape(-1).tolist()
            digest = hashlib.blake2b(struct.pack(f"<{len(values)}d", *values), digest_size=8).hexdigest()
            return f"{len(values)} values, digest {digest}"
        return ("per token", value.shape[0], str(value.dtype))
    if isinstance(value, Gate):
        return value.name
    if isinstance(value, (str, int, float, bool, tuple, type(None))):
        return value
    return "given"


def head_fingerprint(batch, options) -> Fingerprint:
    """The shapes and head options every rank of a sequence group must share (``batch``: a checked
    :class:`~fused_gates.arguments.Batch`, ``options``: its :class:`~fused_gates.options.HeadOptions`)."""
    rows, _ = batch.shape
    entries: Fingerprint = [
        ("hidden", "B (rows)", rows),
        ("hidden", "H", batch.hidden.shape[1]),
        ("hidden", "dtype", str(batch.hidden.dtype)),
        ("weight", "rows (the vocabulary, or this rank's slice of it)", batch.head.weight.shape[0]),
        ("completion_mask", "whether it is given", batch.mask is not None),
    ]
    for f in fields(options):
        if f.name not in UNFINGERPRINTED_OPTIONS:
            value = getattr(options, f.name)
            entries.append((f.name, "its value", "given" if f.name in ("bias", "process_group") and value is not None
                            else _describe(value)))
    return entries


def loss_fingerprint(batch, head_options, loss_options, advantages: Tensor, given: dict[str, object]) -> Fingerprint:
    """:func:`head_fingerprint` and every loss option, the per-row advantages' values and which per-token inputs
    (``given``: name -> value) are given."""
    entries = head_fingerprint(batch, head_options)
    entries.append(("advantages", "its values (per-row inputs are whole, the same on every rank) or shape",
                    _describe(advantages)))
    entries += [(name, "whether it is given", value is not None) for name, value in given.items()]
    for f in fields(loss_options):
        entries.append((f.name, "its value", _describe(getattr(loss_options, f.name))))
    return entries


# -- the loss and the metrics of whole rows ------------------------------------------------------------------------


def global_loss_and_metrics(
    sequence: SequenceShard,
    loss: Tensor,
    tokens: TokenData,
    config: ObjectiveConfig,
    group_size: int | None,
    group_ids: Tensor | None,
    row_advantages: bool,
    outputs: dict[str, Tensor],
    nonfinite: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The global loss (this rank's part differentiable, the others' a constant) and the metrics of
    :func:`fused_gates.metrics.loss_metrics` over every rank's tokens, from two reductions: a sum of per-row and
    scalar sums, a maximum of the ratio's range and per-row flags. ``outputs``: this rank's per-token ``entropy``,
    ``ratio``, ``gate_value``, ``gate_grad`` and ``kl`` (at the computed tokens)."""
    m, rows = tokens.mask, tokens.row
    entropy, ratio, gate_value, gate_grad = (outputs[k] for k in ("entropy", "ratio", "gate_value", "gate_grad"))
    count = tokens.num_rows

    def per_row(values: Tensor, reduce: str = "sum") -> Tensor:
        if reduce == "sum":
            return m.new_zeros(count).index_add_(0, rows, values)
        return m.new_zeros(count).scatter_reduce_(0, rows, values, reduce="amax")  # flags and weights are >= 0

    params = config.params
    per_row_flags = config.sequence_level and row_advantages  # TRL's ratio and advantage are then [B, 1]
    scalars = {"loss": loss.detach().reshape(()), "bonus": (tokens.entropy_weight * entropy).sum(),
               "nonfinite": nonfinite.to(m.dtype), "entropy": (entropy * m).sum(), "ratio": (ratio * m).sum(),
               "gate": (gate_value * m).sum()}
    if config.beta != 0:
        scalars["kl"] = (outputs["kl"] * m).sum()
    flags: dict[str, Tensor] = {}
    if config.gate.is_clip:
        low, high = clip_flags(ratio, tokens.advantages, params.epsilon_low, params.epsilon_high, params.delta)
        flags = {"clip_ratio/low_mean": low.to(m.dtype), "clip_ratio/high_mean": high.to(m.dtype)}
    elif config.gate.is_cispo:
        flags = {"cispo_clip_ratio": cispo_flags(ratio, tokens.advantages, params.epsilon_high).to(m.dtype)}
    elif config.gate.is_vespo:
        flags = {"vespo/phi_seq_mean": gate_value}
    elif config.gate.name in DPPO_GATES:  # gate_inputs.input_gate_metrics: the share of tokens masked
        flags = {f"{config.gate.name}/masked_fraction": (gate_value == 0).to(m.dtype)}
    if outputs.get("estr_dropped") is not None:  # the entropy-scaled trust region's dropped tokens
        flags[ESTR_METRIC] = outputs["estr_dropped"]
    by_row = per_row_flags or (config.gate.is_vespo and row_advantages)
    if not by_row:
        scalars.update({name: (values * m).sum() for name, values in flags.items()})

    names = list(scalars)
    summed = sequence.reduce(torch.cat([torch.stack([scalars[n] for n in names]), per_row(m), per_row(gate_grad * m)]))
    total = dict(zip(names, summed[:len(names)], strict=True))
    row_tokens, row_gate_grad = summed[len(names):len(names) + count], summed[len(names) + count:]
    inf = m.new_full((1,), torch.inf)
    extremes = [-ratio.min().reshape(1) if ratio.numel() else -inf, ratio.max().reshape(1) if ratio.numel() else -inf]
    if by_row:
        extremes += [per_row(values, "amax") for values in flags.values()]
    largest = sequence.reduce(torch.cat(extremes), dist.ReduceOp.MAX)

    tokens_total = row_tokens.sum()
    has_tokens = tokens_total > 0
    zero = m.new_zeros(())

    def mean(name: str) -> Tensor:
        return total[name] / tokens_total.clamp(min=1.0)

    global_loss = loss + (total["loss"] - loss.detach())
    metrics = {
        "eur": eur_from_row_sums(row_gate_grad, row_tokens, group_size, group_ids),
        "entropy": mean("entropy"),
        "ratio/mean": mean("ratio"),
        "ratio/min": (-largest[0]).where(has_tokens, zero),
        "ratio/max": largest[1].where(has_tokens, zero),
        "gate/mean": mean("gate"),
    }
    if config.beta != 0:
        metrics["kl"] = mean("kl")
    for index, name in enumerate(flags):
        if not by_row:
            metrics[name] = mean(name)
            continue
        row_values = largest[2 + index * count:2 + (index + 1) * count]
        if config.gate.is_vespo:  # one phi per row: the mean over rows that have a valid token
            present = row_tokens > 0
            metrics[name] = (row_values * present).sum() / present.sum().clamp(min=1)
        else:
            metrics[name] = row_values.mean()
    if config.gate.is_clip:
        metrics["clip_ratio/region_mean"] = metrics["clip_ratio/low_mean"] + metrics["clip_ratio/high_mean"]
    metrics["policy_loss"] = total["loss"] - total["bonus"]
    metrics["nonfinite_tokens"] = total["nonfinite"].to(nonfinite.dtype)
    return global_loss, metrics


# -- TRL's entropy mask over sharded rows --------------------------------------------------------------------------

_RADIX_BITS = 8


def _order_keys(values: Tensor) -> Tensor:
    """float32 values as int64 keys in [0, 2^32) with the same order (sign flipped, negatives' bits reversed)."""
    bits = values.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits | 0x80000000)


def _from_order_key(key: int) -> Tensor:
    bits = key & 0x7FFFFFFF if key >= 0x80000000 else 0xFFFFFFFF - key
    return torch.tensor([bits - (1 << 32) if bits >= 0x80000000 else bits], dtype=torch.int32).view(torch.float32)[0]


def _order_statistic(keys: Tensor, rank: int, group: object) -> int:
    """The ``rank``-th smallest (0-based) of the keys of every rank of ``group``: a radix selection, one all-reduce
    of a 256-bin histogram per byte of the key (4 of 2 KiB), no value crossing the ranks."""
    prefix, remaining = 0, rank
    for shift in range(32 - _RADIX_BITS, -1, -_RADIX_BITS):
        candidates = keys[(keys >> (shift + _RADIX_BITS)) == (prefix >> (shift + _RADIX_BITS))]
        digits = (candidates >> shift) & ((1 << _RADIX_BITS) - 1)
        histogram = torch.bincount(digits, minlength=1 << _RADIX_BITS)
        dist.all_reduce(histogram, group=group)
        cumulative = histogram.cumsum(0)
        digit = int(torch.searchsorted(cumulative, remaining, right=True))
        remaining -= int(cumulative[digit - 1]) if digit else 0
        prefix |= digit << shift
    return prefix


def high_entropy_mask(entropies: Tensor, mask: Tensor, threshold: float, group: object | None = None) -> Tensor:
    """TRL's ``top_entropy_quantile`` mask (``GRPOTrainer.get_high_entropy_mask``: the valid tokens whose float32
    entropy is at least the ``threshold`` quantile of every valid token's, ``torch.quantile``'s linear
    interpolation) when the tokens are spread over the ranks of ``group`` -- a sequence group's slices of the rows,
    or data-parallel processes -- exactly, without gathering the entropies: a radix selection of the two order
    statistics around the quantile (8 all-reduces of a 256-bin histogram, 2 KiB each, and one of the token count).
    ``entropies``, ``mask``: this rank's [B, T] (e.g. from :func:`fused_gates.token_logprobs`); returns a bool [B, T]
    to pass as ``entropy_mask``."""
    check_number("threshold", threshold, allow_minimum=True, maximum=1.0)
    valid = mask.bool()
    local = entropies[valid].float()
    count = torch.tensor([local.numel()], dtype=torch.int64, device=entropies.device)
    if group is not None:
        _group_place(group)
        dist.all_reduce(count, group=group)
    total = int(count)
    if total == 0:
        return torch.zeros_like(valid)
    position = torch.tensor(threshold, dtype=torch.float32) * (total - 1)  # torch.quantile's arithmetic, in float32
    below = position.floor()
    keys = _order_keys(local)
    if group is None:
        low_key, high_key = (int(keys.kthvalue(int(k) + 1).values) for k in (below, position.ceil()))
    else:
        low_key, high_key = (_order_statistic(keys, int(k), group) for k in (below, position.ceil()))
    quantile = torch.lerp(_from_order_key(low_key), _from_order_key(high_key), position - below)
    return (entropies * mask.float() >= quantile.to(entropies.device)) & valid  # TRL's comparison
